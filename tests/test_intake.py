"""Intake from serving stacks: Open Inference Protocol v2 and KServe v1 pairs -> events.

Bodies and headers are the ones the servers' documentation shows (KServe's sklearn-iris
v1 and v2 examples and its inference-logger CloudEvents; the Open Inference Protocol's
own request/response example), mapped with an iris profile.
"""

from __future__ import annotations

import json

import pytest
from sklearn.datasets import load_iris

from detectors.profile import build_profile
from streams.files import write_profile
from streams.intake.oip import log_line_events, oip_events, v1_events
from streams.records import decode_inference
from tests.conftest import run_cli, write_jsonl

IRIS_NAMES = ["sepal_length", "sepal_width", "petal_length", "petal_width"]
TS = "2026-11-21T10:00:00Z"

# KServe "sklearn-v2-iris": iris-input-v2.json and the documented response.
KSERVE_V2_REQUEST = {"inputs": [{"name": "input-0", "shape": [2, 4], "datatype": "FP32",
                                 "data": [[6.8, 2.8, 4.8, 1.4], [6.0, 3.4, 4.5, 1.6]]}]}
KSERVE_V2_RESPONSE = {"model_name": "sklearn-v2-iris", "model_version": None,
                      "id": "1b479ed4-14ca-4b71-8a33-47a7d5c40134", "parameters": None,
                      "outputs": [{"name": "output-0", "shape": [2], "datatype": "INT32",
                                   "parameters": None, "data": [1, 1]}]}
# KServe v1 (the inference-logger demo's request and response bodies).
KSERVE_V1_REQUEST = {"instances": [[6.8, 2.8, 4.8, 1.4], [6.0, 3.4, 4.5, 1.6]]}
KSERVE_V1_RESPONSE = {"predictions": [1, 1]}
# The Open Inference Protocol's own example pair (two inputs, one of them BOOL [3] with a
# single value: its shape does not match its data).
OIP_SPEC_REQUEST = {"id": "42", "inputs": [
    {"name": "input0", "shape": [2, 2], "datatype": "UINT32", "data": [1, 2, 3, 4]},
    {"name": "input1", "shape": [3], "datatype": "BOOL", "data": [True]}],
    "outputs": [{"name": "output0"}]}
OIP_SPEC_RESPONSE = {"id": "42", "outputs": [
    {"name": "output0", "shape": [3, 2], "datatype": "FP32",
     "data": [1.0, 1.1, 2.0, 2.1, 3.0, 3.1]}]}


@pytest.fixture(scope="module")
def iris():
    data = load_iris()
    return build_profile(data.data, data.target, IRIS_NAMES, model="sklearn-iris",
                         dataset="iris")


def valid(events):
    """Every event passes the contract's own decoder."""
    for event in events:
        [record] = decode_inference(json.dumps(event).encode())
        assert not hasattr(record, "reason"), record
    return events


def test_kserve_v2_batch_is_one_event_per_row(iris):
    events, reason = oip_events(KSERVE_V2_REQUEST, KSERVE_V2_RESPONSE, iris, ts=TS,
                                client_id="key-7f3a")
    assert reason is None
    assert valid(events) == [
        {"ts": TS, "model": "sklearn-iris", "client_id": "key-7f3a",
         "features": [6.8, 2.8, 4.8, 1.4], "prediction": 1,
         "request_id": "1b479ed4-14ca-4b71-8a33-47a7d5c40134#0"},
        {"ts": TS, "model": "sklearn-iris", "client_id": "key-7f3a",
         "features": [6.0, 3.4, 4.5, 1.6], "prediction": 1,
         "request_id": "1b479ed4-14ca-4b71-8a33-47a7d5c40134#1"}]


def test_one_tensor_per_feature_and_probabilities_give_argmax(iris):
    request = {"id": "r9", "inputs": [  # named like the profile's features, any order
        {"name": n, "shape": [2, 1], "datatype": "FP64", "data": [[v1], [v2]]}
        for n, v1, v2 in reversed(list(zip(IRIS_NAMES, [5.1, 3.5, 1.4, 0.2],
                                           [6.7, 3.0, 5.2, 2.3], strict=True)))]}
    response = {"model_name": "iris", "model_version": "3", "id": "r9", "outputs": [
        {"name": "predict_proba", "shape": [2, 3], "datatype": "FP64",
         "data": [0.97, 0.02, 0.01, 0.01, 0.1, 0.89]}]}
    events, reason = oip_events(request, response, iris, ts=1.79e9, client_id="c1",
                                source_ip="203.0.113.7")
    assert reason is None
    valid(events)
    assert [e["features"] for e in events] == [[5.1, 3.5, 1.4, 0.2], [6.7, 3.0, 5.2, 2.3]]
    assert [e["prediction"] for e in events] == [0, 2]
    assert events[1]["probabilities"] == [0.01, 0.1, 0.89]
    assert events[0]["model_version"] == "3" and events[0]["source_ip"] == "203.0.113.7"


def test_a_label_output_wins_over_argmax_and_a_single_row_may_be_flat(iris):
    """Seldon Core 2 / MLServer answer [1, 1] INT64 'predict'; a [4] input is one row."""
    request = {"inputs": [{"name": "predict", "shape": [4], "datatype": "FP32",
                           "data": [1, 2, 3, 4]}]}
    response = {"model_name": "iris_1", "model_version": "1", "id": "x", "parameters": {},
                "outputs": [{"name": "proba", "shape": [1, 3], "datatype": "FP32",
                             "data": [[0.5, 0.3, 0.2]]},
                            {"name": "predict", "shape": [1, 1], "datatype": "INT64",
                             "parameters": {"content_type": "np"}, "data": [2]}]}
    [event], reason = oip_events(request, response, iris, ts=TS, client_id="c")
    assert reason is None and event["prediction"] == 2 and event["probabilities"] == [0.5, 0.3, 0.2]
    assert event["request_id"] == "x"


@pytest.mark.parametrize("request_, response, words", [
    (OIP_SPEC_REQUEST, OIP_SPEC_RESPONSE, "'input1': shape [3] needs 3 values, data has 1"),
    ({**OIP_SPEC_REQUEST, "inputs": OIP_SPEC_REQUEST["inputs"][:1] * 2}, OIP_SPEC_RESPONSE,
     "not one per profile feature"),
    ({"inputs": [{"name": "x", "shape": [2, 4], "datatype": "FP32", "data": [1, 2, 3]}]},
     KSERVE_V2_RESPONSE, "needs 8 values, data has 3"),
    ({"inputs": [{"name": "x", "shape": [2, 3], "datatype": "FP32", "data": [1] * 6}]},
     KSERVE_V2_RESPONSE, "3 features, the profile 4"),
    ({"inputs": [{"name": "x", "shape": [1, 4], "datatype": "BYTES", "data": ["a"] * 4}]},
     KSERVE_V2_RESPONSE, "BYTES is not numeric"),
    ({"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, "NaN", 4]}]},
     KSERVE_V2_RESPONSE, "not a finite number"),
    (KSERVE_V2_REQUEST, {"outputs": [{"name": "o", "shape": [3], "datatype": "INT32",
                                      "data": [1, 1, 1]}]}, "no output of shape [2]"),
    (KSERVE_V2_REQUEST, {"error": "model not ready"}, "response is an error"),
    ({"inputs": "nope"}, KSERVE_V2_RESPONSE, "inputs must be a non-empty list"),
    ({"inputs": [{"name": "x", "shape": [-1, 4], "datatype": "FP32", "data": []}]},
     KSERVE_V2_RESPONSE, "shape must be"),
    ([], {}, "must be JSON objects"),
])
def test_bad_shapes_are_reasons_not_exceptions(iris, request_, response, words):
    events, reason = oip_events(request_, response, iris, ts=TS, client_id="c")
    assert events == [] and words in reason, reason


def test_kserve_v1_instances_and_predictions(iris):
    events, reason = v1_events(KSERVE_V1_REQUEST, KSERVE_V1_RESPONSE, iris, ts=TS,
                               client_id="c", request_id="0009174a")
    assert reason is None and [e["prediction"] for e in valid(events)] == [1, 1]
    assert [e["request_id"] for e in events] == ["0009174a#0", "0009174a#1"]
    probs, reason = v1_events({"instances": [dict(zip(IRIS_NAMES, [5.1, 3.5, 1.4, 0.2],
                                                      strict=True))]},
                              {"predictions": [[0.9, 0.05, 0.05]]}, iris, ts=TS, client_id="c")
    assert reason is None and probs[0]["prediction"] == 0 and probs[0]["features"][0] == 5.1
    _, reason = v1_events(KSERVE_V1_REQUEST, {"predictions": [1]}, iris, ts=TS, client_id="c")
    assert "2 instances but 1 predictions" in reason


def test_log_lines_need_ts_client_and_both_halves(iris):
    line = {"ts": TS, "headers": {"X-Api-Key": "key-1"}, "request": KSERVE_V2_REQUEST,
            "response": KSERVE_V2_RESPONSE}
    events, reason = log_line_events(line, iris, client_field="headers.x-api-key")
    assert reason is None and {e["client_id"] for e in events} == {"key-1"}
    assert "client id (client_id) missing" in log_line_events(line, iris)[1]
    assert "ts missing" in log_line_events({**line, "ts": None}, iris,
                                           client_field="headers.x-api-key")[1]
    assert "needs both" in log_line_events({"ts": TS, "client_id": "c",
                                            "request": KSERVE_V2_REQUEST}, iris)[1]
    assert "not a JSON object" in log_line_events([1], iris)[1]


def test_tail_format_oip_needs_a_profile(tmp_path):
    log = write_jsonl(tmp_path / "oip.jsonl", [])
    done = run_cli("tail", log, "--once", "--format", "oip", "--broker", "kafka://127.0.0.1:9",
                   "--checkpoint", tmp_path / "cp.json")
    assert done.returncode == 2 and "needs --profile" in done.stderr and "Traceback" not in done.stderr


def test_tail_format_oip_ships_rows_and_dead_letters_bad_pairs(iris, tmp_path):
    from kafka.admin import KafkaAdminClient, NewTopic

    from streams.worker.broker import EmbeddedBroker
    from tests.test_tail import PARTITIONS, read_topic

    profile = tmp_path / "iris.json"
    write_profile(iris, profile)
    good = {"ts": TS, "client_id": "key-7f3a", "request": KSERVE_V2_REQUEST,
            "response": KSERVE_V2_RESPONSE}
    v1 = {"ts": TS, "client_id": "key-2", "request_id": "r-v1", "request": KSERVE_V1_REQUEST,
          "response": KSERVE_V1_RESPONSE}
    log = write_jsonl(tmp_path / "oip.jsonl", [good, {**good, "request": OIP_SPEC_REQUEST},
                                               "{broken", v1])

    with EmbeddedBroker() as running:
        admin = KafkaAdminClient(bootstrap_servers=running.address, request_timeout_ms=5000)
        admin.create_topics([NewTopic(t, num_partitions=PARTITIONS, replication_factor=1)
                             for t in ("inference-logs", "modelwatch-deadletter")])
        admin.close()
        done = run_cli("tail", log, "--once", "--format", "oip", "--profile", profile,
                       "--broker", running.url, "--checkpoint", tmp_path / "cp.json")
        assert done.returncode == 0, done.stderr
        assert "4 events shipped, 2 bad lines" in done.stderr
        shipped = [e for r in read_topic(running, "inference-logs", want=4)
                   for e in json.loads(r.value)]
        dead = read_topic(running, "modelwatch-deadletter", timeout_s=3)
    assert sorted(e["request_id"] for e in shipped) == [
        "1b479ed4-14ca-4b71-8a33-47a7d5c40134#0", "1b479ed4-14ca-4b71-8a33-47a7d5c40134#1",
        "r-v1#0", "r-v1#1"]
    assert all(e["model"] == "sklearn-iris" and len(e["features"]) == 4 for e in shipped)
    reasons = sorted(dict(r.headers)["reason"].decode() for r in dead)
    assert any("needs 3 values, data has 1" in r for r in reasons)
    assert any("not JSON" in r for r in reasons)


# --- KServe inference logger (CloudEvents over HTTP) -----------------------------------

CE_ID = "0009174a-24a8-4603-b098-09c8799950e9"


def ce_headers(kind, ce_id=CE_ID, time_="2021-04-10T00:23:26.0789529Z", **extra):
    """The headers KServe's logger sends (binary mode), as its message-dumper demo shows."""
    return {"ce-specversion": "1.0", "ce-type": f"org.kubeflow.serving.inference.{kind}",
            "ce-source": "http://localhost:9081/", "ce-id": ce_id, "ce-time": time_,
            "ce-endpoint": "", "ce-inferenceservicename": "sklearn-iris",
            "ce-namespace": "default", "ce-component": "predictor",
            "content-type": "application/json", **extra}


def test_pairing_waits_a_bounded_time_and_keeps_a_bounded_number():
    from streams.intake.kserve import Half, Pairing

    pairing = Pairing(wait_s=5, max_pending=2)
    assert pairing.add("response", "a", Half({}, {}, 0.0)) == (None, [])  # either order
    pair, dropped = pairing.add("request", "a", Half({}, {}, 1.0))
    assert set(pair) == {"request", "response"} and dropped == [] and not pairing.pending
    for i, ce_id in enumerate("bcd"):
        pair, dropped = pairing.add("request", ce_id, Half({}, {}, float(i)))
    assert pair is None and [d[0] for d in dropped] == ["b"] and "more than 2" in dropped[0][2]
    assert pairing.expire(5.5) == []
    [(ce_id, _, reason)] = pairing.expire(6.0)
    assert ce_id == "c" and reason == "kserve: no response within 5 s"
    _, [(ce_id, _, reason)] = pairing.add("request", "d", Half({}, {}, 7.0))
    assert ce_id == "d" and "a second request" in reason
    small = Pairing(max_bytes=100)
    small.add("request", "x", Half({}, {}, 0.0, 80))
    _, dropped = small.add("request", "y", Half({}, {}, 0.0, 80))
    assert [d[0] for d in dropped] == ["x"] and small.bytes == 80
    small.add("response", "y", Half({}, {}, 0.0, 10))
    assert small.bytes == 0 and not small.pending


def test_client_id_from_the_header_its_extension_or_kserve_metadata():
    from streams.intake.kserve import client_of

    assert client_of({"x-api-key": "k1"}, "X-Api-Key") == "k1"
    assert client_of({"ce-x-api-key": "k2"}, "X-Api-Key") == "k2"
    assert client_of({"ce-metadata": json.dumps({"X-Api-Key": ["k3"]})}, "x-api-key") == "k3"
    assert client_of({"ce-metadata": "{not json"}, "x-api-key") is None


def test_cloudevents_binary_and_structured():
    from streams.intake.kserve import read_event

    kind, ce_id, data = read_event(ce_headers("request"), json.dumps(KSERVE_V1_REQUEST).encode())
    assert (kind, ce_id, data) == ("request", CE_ID, KSERVE_V1_REQUEST)
    structured = {"specversion": "1.0", "type": "org.kubeflow.serving.inference.response",
                  "source": "http://localhost:9081/", "id": CE_ID, "time": "2021-04-10T00:23:26Z",
                  "datacontenttype": "application/json", "data": KSERVE_V1_RESPONSE}
    headers = {"content-type": "application/cloudevents+json"}
    assert read_event(headers, json.dumps(structured).encode()) == ("response", CE_ID,
                                                                    KSERVE_V1_RESPONSE)
    assert headers["ce-time"] == "2021-04-10T00:23:26Z"
    assert "not an inference" in read_event({**ce_headers("request"), "ce-type": "x"}, b"{}")
    assert "not JSON" in read_event(ce_headers("request"), b"{")


def test_intake_kserve_pairs_logger_events_and_ships_them(iris, tmp_path):
    import subprocess
    import sys
    import time
    import urllib.error
    import urllib.request

    from kafka.admin import KafkaAdminClient, NewTopic

    from streams.worker.broker import EmbeddedBroker, free_port
    from tests.conftest import ROOT
    from tests.test_tail import PARTITIONS, read_topic

    profile = tmp_path / "iris.json"
    write_profile(iris, profile)
    port = free_port()

    def post(headers, body):
        req = urllib.request.Request(f"http://127.0.0.1:{port}/", data=json.dumps(body).encode(),
                                     headers=headers, method="POST")
        try:
            with urllib.request.urlopen(req, timeout=10) as answer:
                return answer.status
        except urllib.error.HTTPError as exc:
            return exc.code

    with EmbeddedBroker() as running:
        admin = KafkaAdminClient(bootstrap_servers=running.address, request_timeout_ms=5000)
        admin.create_topics([NewTopic(t, num_partitions=PARTITIONS, replication_factor=1)
                             for t in ("inference-logs", "modelwatch-deadletter")])
        admin.close()
        server = subprocess.Popen(
            [sys.executable, "-m", "streams.cli", "intake", "kserve", "--listen",
             f"127.0.0.1:{port}", "--profile", str(profile), "--client-header", "X-Api-Key",
             "--source-header", "X-Forwarded-For", "--pair-timeout", "1",
             "--broker", running.url],
            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            line = server.stderr.readline()
            assert "listening" in line, line + (server.stderr.read() if server.poll() else "")
            # metadataHeaders: [X-Api-Key, X-Forwarded-For] -> the ce-metadata extension
            key = {"ce-metadata": json.dumps({"X-Api-Key": ["key-7f3a"],
                                              "X-Forwarded-For": ["203.0.113.7, 10.0.0.1"]})}
            # v1, response first; v2 (OIP) in order; a request whose response never comes;
            # a pair without the client header; not an inference event at all.
            assert post(ce_headers("response", **key), KSERVE_V1_RESPONSE) == 200
            assert post(ce_headers("request", **key), KSERVE_V1_REQUEST) == 200
            assert post(ce_headers("request", ce_id="v2", **key), KSERVE_V2_REQUEST) == 200
            assert post(ce_headers("response", ce_id="v2", **key), KSERVE_V2_RESPONSE) == 200
            assert post(ce_headers("request", ce_id="lonely", **key), KSERVE_V1_REQUEST) == 200
            anon = {"ce-metadata": json.dumps({"X-Request-Id": ["anon"]})}
            assert post(ce_headers("request", ce_id="anon", **anon), KSERVE_V1_REQUEST) == 200
            assert post(ce_headers("response", ce_id="anon", **anon), KSERVE_V1_RESPONSE) == 200
            assert post({**ce_headers("request"), "ce-type": "dev.knative.ping"}, {}) == 400
            shipped = [e for r in read_topic(running, "inference-logs", want=4)
                       for e in json.loads(r.value)]
            time.sleep(2.0)  # the lonely request expires
            dead = read_topic(running, "modelwatch-deadletter", want=None, timeout_s=3)
        finally:
            server.terminate()
            _, err = server.communicate(timeout=30)
    assert server.returncode == 0, err
    assert sorted(e["request_id"] for e in shipped) == [f"{CE_ID}#0", f"{CE_ID}#1", "v2#0", "v2#1"]
    assert {e["client_id"] for e in shipped} == {"key-7f3a"}
    assert {e["source_ip"] for e in shipped} == {"203.0.113.7"}
    assert {e["ts"] for e in shipped} == {"2021-04-10T00:23:26.0789529Z"}
    assert all(e["model"] == "sklearn-iris" and e["prediction"] == 1 for e in shipped)
    reasons = sorted(dict(r.headers)["reason"].decode() for r in dead)
    assert any("no response within 1 s" in r for r in reasons), reasons
    assert any("no client id in header X-Api-Key" in r for r in reasons), reasons
    assert any("not an inference request or response" in r for r in reasons), reasons
    assert "8 CloudEvents received, 4 events shipped" in err
