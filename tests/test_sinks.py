"""SIEM outputs against real loopback listeners: the exact bytes on the wire."""

from __future__ import annotations

import asyncio
import copy
import hashlib
import hmac
import inspect
import json
import re
import socket
import ssl
import subprocess
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import msgspec
import pytest

from streams.sinks import SINKS, Outbox, Sink, open_sink, open_sinks
from streams.sinks.formats import VERSION, cef, ocsf
from streams.sinks.syslog_cef import syslog_message
from streams.tabular import UserError

ALERT = {
    "@timestamp": "2026-11-21T10:00:05.100Z",
    "event": {"kind": "alert", "category": ["intrusion_detection"], "type": ["info"],
              "id": "b1946ac92492d2347c6235b4d2611184", "severity": 73, "risk_score": 73.0,
              "created": "2026-11-21T10:00:05.140Z", "dataset": "modelwatch.alerts",
              "module": "modelwatch"},
    "rule": {"name": "extraction.query_distribution", "category": "extraction",
             "description": "queries a|b\\c spread = uniform\nover the space", "version": "1"},
    "threat": {"framework": "MITRE ATLAS",
               "technique": {"id": ["AML.T0024"], "name": ["Exfiltration via AI Inference API"],
                             "subtechnique": {"id": ["AML.T0024.002"],
                                              "name": ["Extract AI Model"]}},
               "tactic": {"id": ["AML.TA0010"], "name": ["Exfiltration"]}},
    "user": {"id": "key=7f3a"},
    "source": {"ip": "203.0.113.7"},
    "modelwatch": {"detector": "extraction", "model": "fraud-v3", "client_id": "key=7f3a",
                   "dataset": None, "batch_id": None, "source": None, "score": 0.97,
                   "threshold": 0.9, "events_seen": 412,
                   "trigger": {"request_id": "9c1e", "ts": "2026-11-21T10:00:05.100Z"},
                   "evidence": {"w": 0.81}},
    "message": "Extraction suspected: client key=7f3a | path C:\\tmp\nsecond line",
    "ecs": {"version": "8.17.0"},
}
RT_MS = 1795255205100  # ALERT's @timestamp in epoch milliseconds
CEF = (f"CEF:0|modelwatch|modelwatch|{VERSION}|extraction.query_distribution|"
       "queries a\\|b\\\\c spread = uniform over the space|8|"
       f"rt={RT_MS} cat=extraction externalId=b1946ac92492d2347c6235b4d2611184 "
       "suser=key\\=7f3a src=203.0.113.7 cs1Label=atlasTechnique cs1=AML.T0024,AML.T0024.002 "
       "cs2Label=model cs2=fraud-v3 cs6Label=requestId cs6=9c1e cfp1Label=score cfp1=0.97 "
       "cfp2Label=threshold cfp2=0.9 cn1Label=eventsSeen cn1=412 "
       "msg=Extraction suspected: client key\\=7f3a | path C:\\\\tmp\\nsecond line")
# local0 (16) * 8 + error (3): severity 73 is in the "high" band
SYSLOG = f"<131>1 2026-11-21T10:00:05.140Z mw-test modelwatch - extraction - {CEF}".encode()
FRAME = b"%d " % len(SYSLOG) + SYSLOG  # RFC 6587 octet counting


CEF_UNESCAPE = {"\\": "\\", "|": "|", "=": "=", "n": "\n", "r": "\r"}


def parse_cef(text: str) -> tuple[list[str], dict[str, str]]:
    """(the 7 header fields, the extension's key -> value), unescaped as a receiver does:
    a key is the word before an unescaped ``=``."""
    assert text.startswith("CEF:"), text[:20]
    header, field, i = [], [], 0
    while len(header) < 7:
        if text[i] == "\\":
            assert text[i + 1] in "\\|", f"bad header escape at {i}"
            field.append(text[i + 1])
            i += 2
        elif text[i] == "|":
            header.append("".join(field))
            field, i = [], i + 1
        else:
            field.append(text[i])
            i += 1
    chars: list[tuple[str, bool]] = []  # (character, was escaped)
    rest = text[i:]
    j = 0
    while j < len(rest):
        if rest[j] == "\\":
            assert rest[j + 1] in CEF_UNESCAPE, f"bad extension escape {rest[j:j + 2]!r}"
            chars.append((CEF_UNESCAPE[rest[j + 1]], True))
            j += 2
        else:
            chars.append((rest[j], False))
            j += 1
    extension, key, start = {}, None, 0
    for k, (ch, escaped) in enumerate(chars):
        if ch == "=" and not escaped:
            space = max((m for m in range(start, k) if chars[m] == (" ", False)), default=-1)
            if key is not None:
                extension[key] = "".join(c for c, _ in chars[start:space])
            key = "".join(c for c, _ in chars[space + 1:k])
            assert key.isalnum(), f"bad key {key!r}"
            start = k + 1
    if key is not None:
        extension[key] = "".join(c for c, _ in chars[start:])
    return header, extension


def alert(n: int, **changes) -> dict:
    doc = copy.deepcopy(ALERT)
    doc["event"]["id"] = f"{n:032x}"
    doc.update(changes)
    return doc


def run(coroutine):
    return asyncio.run(coroutine)


def send_once(sink: Sink, *batches: list[dict]) -> None:
    """Send the batches then close the sink, in one event loop; errors propagate."""
    async def main():
        try:
            for batch in batches:
                await sink.send(batch)
        finally:
            await sink.close()

    run(main())


async def wait_until(condition, timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.01)


def unframe(data: bytes) -> list[bytes]:
    """RFC 6587 octet counting: ``<length> SP <message>`` repeated; a frame still
    arriving is left out."""
    messages = []
    while data:
        length, _, rest = data.partition(b" ")
        if len(rest) < int(length):
            break
        messages.append(rest[:int(length)])
        data = rest[int(length):]
    return messages


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


async def stream_server(port: int = 0, tls: ssl.SSLContext | None = None,
                        close_after_read: bool = False):
    received = bytearray()

    async def handle(reader, writer):
        while chunk := await reader.read(65536):
            received.extend(chunk)
            if close_after_read:
                break
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", port, ssl=tls)
    return server, received, server.sockets[0].getsockname()[1]


@pytest.fixture(scope="session")
def certificate(tmp_path_factory):
    """A throwaway self-signed certificate for 127.0.0.1 (openssl CLI)."""
    folder = tmp_path_factory.mktemp("tls")
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", key,
                    "-out", cert, "-days", "2", "-subj", "/CN=127.0.0.1",
                    "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost"],
                   check=True, capture_output=True)
    return cert, key


def server_tls(certificate) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(*certificate)
    return context


class Receiver:
    """An HTTP(S) server on loopback in a thread that records every POST."""

    def __init__(self, tls: ssl.SSLContext | None = None, status: int = 200):
        self.requests: list[tuple[str, object, bytes]] = []
        self.status = status
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers["Content-Length"]))
                receiver.requests.append((self.path, self.headers, body))
                answer = b'{"text":"Success","code":0}'
                self.send_response(receiver.status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)

            def log_message(self, *_):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        if tls is not None:
            self.server.socket = tls.wrap_socket(self.server.socket, server_side=True)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def port(self) -> int:
        return self.server.server_address[1]

    def __enter__(self) -> Receiver:
        self.thread.start()
        return self

    def __exit__(self, *_):
        self.server.shutdown()
        self.server.server_close()


# --- formats ----------------------------------------------------------------------


def test_cef_escapes_header_and_extension_per_spec():
    assert cef(ALERT) == CEF


def test_syslog_message_is_rfc5424_with_cef():
    assert syslog_message(ALERT, hostname="mw-test") == SYSLOG


def test_syslog_facility_and_severity_make_the_pri():
    low = alert(1)
    low["event"]["severity"] = 45  # warning (4)
    assert syslog_message(low, facility=23, hostname="h").startswith(b"<188>1 ")  # local7


def test_ocsf_detection_finding():
    doc = ocsf(ALERT)
    assert (doc["class_uid"], doc["category_uid"], doc["type_uid"], doc["activity_id"]) == \
        (2004, 2, 200401, 1)
    assert doc["time"] == RT_MS and doc["severity_id"] == 4 and doc["is_alert"] is True
    assert doc["metadata"]["product"] == {"name": "modelwatch", "vendor_name": "modelwatch",
                                          "version": VERSION}
    assert doc["metadata"]["version"] == "1.8.0"
    info = doc["finding_info"]
    assert info["uid"] == ALERT["event"]["id"] and info["desc"] == ALERT["message"]
    assert info["title"] == ALERT["rule"]["description"]
    assert info["analytic"]["name"] == "extraction.query_distribution"
    assert info["analytic"]["type_id"] == 3
    assert info["attacks"] == [{
        "technique": {"uid": "AML.T0024", "name": "Exfiltration via AI Inference API"},
        "sub_technique": {"uid": "AML.T0024.002", "name": "Extract AI Model"},
        "tactic": {"uid": "AML.TA0010", "name": "Exfiltration"}}]
    assert doc["evidences"] == [{"actor": {"user": {"uid": "key=7f3a"}},
                                 "src_endpoint": {"ip": "203.0.113.7"}}]
    assert doc["resources"] == [{"name": "fraud-v3", "type": "ml_model"}]
    assert doc["unmapped"]["modelwatch"]["score"] == 0.97


@pytest.fixture(scope="module")
def worker_alerts() -> list[dict]:
    """Alerts as the worker makes them, one per family."""
    from detectors.base import Verdict
    from streams.alerts import build_alert

    def verdict(family, rule, techniques):
        return Verdict(detector=family, rule=rule, key="k", score=2.0, threshold=1.0,
                       events_seen=9, trigger=0, techniques=techniques,
                       description=f"{family} | = \\ test", evidence={"z": 3.5})

    made = [
        build_alert(verdict("extraction", "extraction.prada", ("AML.T0024.002",)),
                    trigger_ts=1e9, request_id="r1", model="m", client_id="c", source_ip="gw-7"),
        build_alert(verdict("adversarial", "adversarial.boundary", ("AML.T0043", "AML.T0043.001")),
                    trigger_ts=1e9, request_id="r2", model="m", client_id="c",
                    source_ip="2001:db8::1"),
        build_alert(verdict("poisoning", "poisoning.label_shift", ("AML.T0020",)), trigger_ts=1e9,
                    dataset="d", batch_id="b7", source="vendor"),
    ]
    return [msgspec.to_builtins(a) for a in made]


def test_every_family_of_worker_alert_formats(worker_alerts):
    extraction, adversarial, poisoning = worker_alerts
    assert " shost=gw-7 " in cef(extraction) and "src=" not in cef(extraction)
    assert " c6a2Label=Source IPv6 Address c6a2=2001:db8::1 " in cef(adversarial)
    assert "src=" not in cef(adversarial)  # CEF's src is IPv4 only
    assert "cs1=AML.T0043,AML.T0043.001" in cef(adversarial)
    assert "suser=" not in cef(poisoning) and "cs4Label=batchId cs4=b7" in cef(poisoning)
    assert "|adversarial \\| \\= \\\\ test|" not in cef(adversarial)  # header: only \ and |
    assert "|adversarial \\| = \\\\ test|" in cef(adversarial)
    [attack] = ocsf(adversarial)["finding_info"]["attacks"]
    assert attack["technique"]["uid"] == "AML.T0043"
    assert attack["sub_technique"] == {"uid": "AML.T0043.001", "name": "Black-Box Optimization"}
    tactics = [a["tactic"]["uid"] for a in ocsf(poisoning)["finding_info"]["attacks"]]
    assert tactics == ["AML.TA0003", "AML.TA0006"]
    assert ocsf(poisoning)["resources"] == [{"name": "d", "type": "dataset"}]
    assert ocsf(poisoning)["evidences"] == [{"data": {"dataset": "d", "batch_id": "b7",
                                                      "source": "vendor"}}]
    for doc in worker_alerts:
        assert syslog_message(doc).count(b"\n") == 0


# --- URLs -------------------------------------------------------------------------


def test_registry_is_a_dict_of_sink_classes():
    assert all(issubclass(kind, Sink) for kind in SINKS.values())
    assert set(SINKS) == {"syslog+udp", "syslog+tcp", "syslog+tls", "hec+https", "hec+http",
                          "webhook+https", "webhook+http", "file"}


@pytest.mark.parametrize(("url", "problem"), [
    ("siem.example:514", "unknown scheme 'siem.example'"),
    ("nonsense", "no scheme"),
    ("kafka://h:9092", "unknown scheme 'kafka'"),
    ("syslog+tcp://", "needs a host"),
    ("syslog+tcp://h:99999", "port is not a number"),
    ("syslog+udp://h:514?facility=local9", "facility='local9'"),
    ("syslog+tls://h:6514?ca=/no/such/ca.pem", "ca=/no/such/ca.pem: no such file"),
    ("syslog+tls://h:6514?insecure=maybe", "insecure='maybe'"),
    ("hec+https://h:8088?token_env=MW_TEST_NOT_SET", "MW_TEST_NOT_SET (token_env) is not set"),
    ("webhook+https://h/x?sekret_env=A", "unknown option 'sekret_env'"),
    ("webhook+https://h/x?format=cef", "format='cef': expected one of ecs, ocsf"),
    ("file://relative.jsonl", "needs an absolute path"),
    ("file:///no/such/folder/a.jsonl", "/no/such/folder: no such folder"),
])
def test_a_bad_url_is_one_clear_line(url, problem):
    with pytest.raises(UserError) as caught:
        open_sinks(f"file:///tmp/fine.jsonl,{url}")
    text = str(caught.value)
    assert text.startswith(f"sink {url}: ") and problem in text and "\n" not in text


def test_credentials_in_a_url_are_refused_without_echoing_them():
    with pytest.raises(UserError) as caught:
        open_sink("webhook+https://bob:hunter2@h/x")
    assert "hunter2" not in str(caught.value) and "environment variable" in str(caught.value)


def test_no_sinks_setting_means_no_outboxes():
    assert open_sinks(None) == [] and open_sinks(" , ") == []


# --- syslog over UDP, TCP, TLS ----------------------------------------------------


def test_syslog_udp_one_datagram_per_alert():
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as listener:
        listener.bind(("127.0.0.1", 0))
        listener.settimeout(5)
        sink = open_sink(f"syslog+udp://127.0.0.1:{listener.getsockname()[1]}")
        sink.hostname = "mw-test"
        send_once(sink, [ALERT, ALERT])
        assert [listener.recv(65535), listener.recv(65535)] == [SYSLOG, SYSLOG]
    assert sink.name == "syslog+udp"


def test_syslog_tcp_octet_counting_frames():
    async def main():
        server, received, port = await stream_server()
        sink = open_sink(f"syslog+tcp://127.0.0.1:{port}")
        sink.hostname = "mw-test"
        await sink.send([ALERT, ALERT])
        await sink.send([ALERT])
        await sink.close()
        await wait_until(lambda: len(received) >= 3 * len(FRAME))
        server.close()
        return bytes(received)

    data = run(main())
    assert data == FRAME * 3
    assert unframe(data) == [SYSLOG] * 3


def test_syslog_tls_verifies_the_server(certificate):
    cert, _ = certificate

    async def main():
        server, received, port = await stream_server(tls=server_tls(certificate))
        trusted = open_sink(f"syslog+tls://127.0.0.1:{port}?ca={cert}")
        trusted.hostname = "mw-test"
        await trusted.send([ALERT])
        await trusted.close()
        untrusted = open_sink(f"syslog+tls://127.0.0.1:{port}")
        with pytest.raises(ssl.SSLCertVerificationError):
            await untrusted.send([ALERT])
        await untrusted.close()
        unchecked = open_sink(f"syslog+tls://127.0.0.1:{port}?insecure=1")
        unchecked.hostname = "mw-test"
        await unchecked.send([ALERT])
        await unchecked.close()
        await wait_until(lambda: len(received) >= 2 * len(FRAME))
        server.close()
        return bytes(received)

    assert unframe(run(main())) == [SYSLOG, SYSLOG]


def test_syslog_tcp_reconnects_when_the_server_closed_the_connection():
    async def main():
        server, received, port = await stream_server(close_after_read=True)
        sink = open_sink(f"syslog+tcp://127.0.0.1:{port}")
        sink.hostname = "mw-test"
        await sink.send([ALERT])
        await wait_until(lambda: len(received) == len(FRAME))
        await asyncio.sleep(0.1)  # the server's close reaches the sink
        await sink.send([ALERT])  # not into the dead socket: a new connection
        await wait_until(lambda: len(received) == 2 * len(FRAME))
        await sink.close()
        server.close()
        return bytes(received)

    assert unframe(run(main())) == [SYSLOG, SYSLOG]


# --- Splunk HEC -------------------------------------------------------------------


def hec_envelope(doc: dict, sourcetype: str = "modelwatch:ecs", **index) -> dict:
    return {"time": 1795255205.1, "host": socket.gethostname(), "source": "modelwatch",
            "sourcetype": sourcetype, **index, "event": doc}


def test_hec_batches_events_in_one_post_over_https(certificate, monkeypatch):
    monkeypatch.setenv("MW_TEST_HEC_TOKEN", "0d2a6f1e-1234-4c4b-9a0a-5d1c2f6e7a8b")
    cert, _ = certificate
    with Receiver(tls=server_tls(certificate)) as receiver:
        sink = open_sink(f"hec+https://127.0.0.1:{receiver.port}/services/collector/event"
                         f"?token_env=MW_TEST_HEC_TOKEN&ca={cert}&index=security")
        send_once(sink, [ALERT, alert(2)])
    [(path, headers, body)] = receiver.requests
    assert path == "/services/collector/event"
    assert headers["Authorization"] == "Splunk 0d2a6f1e-1234-4c4b-9a0a-5d1c2f6e7a8b"
    assert headers["Content-Type"] == "application/json"
    expected = [hec_envelope(ALERT, index="security"), hec_envelope(alert(2), index="security")]
    assert body == b"\n".join(json.dumps(e, separators=(",", ":"), ensure_ascii=False).encode()
                              for e in expected)
    assert sink.name == "hec+https"


def test_hec_default_token_variable_path_and_ocsf(monkeypatch):
    monkeypatch.setenv("MODELWATCH_HEC_TOKEN", "tok")
    with Receiver() as receiver:
        sink = open_sink(f"hec+http://127.0.0.1:{receiver.port}?format=ocsf")
        send_once(sink, [ALERT])
    [(path, headers, body)] = receiver.requests
    assert path == "/services/collector/event" and headers["Authorization"] == "Splunk tok"
    assert json.loads(body) == hec_envelope(ocsf(ALERT), "modelwatch:ocsf")


def test_hec_refusal_raises(monkeypatch):
    monkeypatch.setenv("MODELWATCH_HEC_TOKEN", "wrong")
    with Receiver(status=403) as receiver:
        sink = open_sink(f"hec+http://127.0.0.1:{receiver.port}")
        with pytest.raises(Exception, match="HTTP 403"):
            send_once(sink, [ALERT])


# --- webhook ----------------------------------------------------------------------


def test_webhook_posts_each_alert_signed(monkeypatch):
    monkeypatch.setenv("MW_TEST_HOOK_SECRET", "s3cret")
    with Receiver() as receiver:
        sink = open_sink(f"webhook+http://127.0.0.1:{receiver.port}/hooks/mw"
                         "?secret_env=MW_TEST_HOOK_SECRET")
        send_once(sink, [ALERT, alert(2)])
    assert [json.loads(body) for _, _, body in receiver.requests] == [ALERT, alert(2)]
    for path, headers, body in receiver.requests:
        assert path == "/hooks/mw" and headers["Content-Type"] == "application/json"
        expected = hmac.new(b"s3cret", body, hashlib.sha256).hexdigest()
        assert headers["X-Modelwatch-Signature"] == f"sha256={expected}"
    assert receiver.requests[1][1]["X-Modelwatch-Event-Id"] == alert(2)["event"]["id"]


def test_webhook_without_secret_is_unsigned_and_can_send_ocsf():
    with Receiver() as receiver:
        sink = open_sink(f"webhook+http://127.0.0.1:{receiver.port}/x?format=ocsf")
        send_once(sink, [ALERT])
    [(_, headers, body)] = receiver.requests
    assert "X-Modelwatch-Signature" not in headers
    assert json.loads(body) == ocsf(ALERT)


def test_webhook_https_checks_the_certificate(certificate):
    cert, _ = certificate
    with Receiver(tls=server_tls(certificate)) as receiver:
        good = open_sink(f"webhook+https://127.0.0.1:{receiver.port}/x?ca={cert}")
        bad = open_sink(f"webhook+https://127.0.0.1:{receiver.port}/x")
        send_once(good, [ALERT])
        with pytest.raises(Exception, match="certificate verify failed"):
            send_once(bad, [ALERT])
    assert len(receiver.requests) == 1


# --- file -------------------------------------------------------------------------


def test_jsonl_appends_one_alert_per_line(tmp_path):
    path = tmp_path / "alerts.jsonl"
    path.write_text('{"earlier":1}\n')
    sink = open_sink(f"file://{path}")
    send_once(sink, [ALERT, alert(2)])
    ocsf_sink = open_sink(f"file://{path}?format=ocsf")
    send_once(ocsf_sink, [ALERT])
    lines = path.read_text().splitlines()
    assert [json.loads(line) for line in lines] == [{"earlier": 1}, ALERT, alert(2), ocsf(ALERT)]


# --- the outbox -------------------------------------------------------------------


def test_outbox_retries_a_sink_that_is_down_then_delivers():
    port = free_port()

    async def main():
        [outbox] = open_sinks(f"syslog+tcp://127.0.0.1:{port}", backoff=(0.01, 0.05))
        outbox.offer([alert(1), alert(2)])
        await wait_until(lambda: outbox.failed >= 3)
        assert outbox.delivered == 0 and outbox.queued == 2
        server, received, _ = await stream_server(port=port)
        await wait_until(lambda: outbox.delivered == 2)
        await outbox.close(timeout=1)
        await wait_until(lambda: len(unframe(bytes(received))) == 2)
        server.close()
        return outbox, bytes(received)

    outbox, data = run(main())
    assert outbox.dropped == 0 and outbox.name == "syslog+tcp"
    ids = [msg.split(b"externalId=")[1].split(b" ")[0] for msg in unframe(data)]
    assert ids == [alert(1)["event"]["id"].encode(), alert(2)["event"]["id"].encode()]


class StuckSink(Sink):
    """A destination that never answers."""

    name = "stuck"

    @classmethod
    def from_url(cls, url):
        return cls()

    async def send(self, alerts):
        await asyncio.Event().wait()


def test_offer_never_blocks_and_overflow_drops_the_oldest():
    assert not inspect.iscoroutinefunction(Outbox.offer)

    async def main():
        outbox = Outbox(StuckSink(), capacity=100, batch_size=10, send_timeout_s=60)
        started = time.perf_counter()
        for n in range(1000):
            outbox.offer([alert(n)] * 10)
        took = time.perf_counter() - started
        assert outbox.dropped == 9900 and outbox.queued == 100
        assert outbox._queue[0]["event"]["id"] == alert(990)["event"]["id"]  # the newest kept
        await asyncio.sleep(0.05)  # the sender takes a batch and hangs on it
        outbox.offer([alert(1)])
        started_close = time.perf_counter()
        await outbox.close(timeout=0.2)
        return outbox, took, time.perf_counter() - started_close

    outbox, took, closing = run(main())
    assert took < 1.0, f"offering 10000 alerts took {took:.2f} s"
    assert closing < 1.0
    assert outbox.delivered == 0 and outbox.dropped == 10_001 and outbox.queued == 0


def test_outbox_close_drains_what_is_queued(tmp_path):
    path = tmp_path / "a.jsonl"

    async def main():
        [outbox] = open_sinks(f"file://{path}", batch_size=2)
        outbox.offer([alert(n) for n in range(5)])
        await outbox.close(timeout=5)
        return outbox

    outbox = run(main())
    assert (outbox.delivered, outbox.failed, outbox.dropped) == (5, 0, 0)
    assert outbox.take_counts() == (5, 0, 0) and outbox.take_counts() == (0, 0, 0)
    assert [json.loads(line)["event"]["id"] for line in path.read_text().splitlines()] == \
        [alert(n)["event"]["id"] for n in range(5)]


# --- hostile text, sizes, addresses ---------------------------------------------------

# What no line-based output may carry raw: C0 (NUL, ESC, CR, LF …), DEL, C1 (U+0085 …),
# the line and paragraph separators, bidi overrides.
RAW_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]")
HOSTILE = "k\x00e\x1b[2J\x07y\u0085\u2028\u2029\u202e\x9b\r\nz\x7f"


def hostile_alert() -> dict:
    doc = alert(7)
    doc["user"]["id"] = doc["modelwatch"]["client_id"] = HOSTILE
    doc["modelwatch"]["trigger"]["request_id"] = "req" + HOSTILE
    doc["rule"]["description"] = "title" + HOSTILE
    doc["message"] = "message " + HOSTILE
    doc["source"] = {"address": "gw" + HOSTILE}
    return doc


def test_no_control_character_reaches_cef_syslog_or_the_terminal():
    from streams.alerts import alert_line
    from tests.test_ecs import FUZZED

    for doc in [hostile_alert(), *FUZZED]:
        message = syslog_message(doc, hostname="h\x1bost")
        assert not RAW_CONTROL.search(message.decode("utf-8")), doc["event"]["id"]
        assert not RAW_CONTROL.search(alert_line(doc)), doc["event"]["id"]
        parse_cef(cef(doc))  # every escape is one CEF defines
    header, fields = parse_cef(cef(hostile_alert()))
    # visible, not lost: the receiver reads \x1b where ESC was; CEF's own \n stays
    assert fields["suser"] == ("k\\x00e\\x1b[2J\\x07y\\x85\\u2028\\u2029\\u202e\\x9b"
                               "\r\nz\\x7f").replace("\r\n", "\n")
    assert fields["cs6"] == "req" + fields["suser"] and fields["shost"] == "gw" + fields["suser"]
    assert header[5].startswith("titlek\\x00e\\x1b") and "\n" not in header[5]
    from streams.alerts import alert_line
    assert "k\\x00e\\x1b[2J" in alert_line(hostile_alert())


def test_cef_fields_are_capped_at_the_spec_lengths_and_say_so():
    doc = alert(8)
    doc["modelwatch"]["trigger"]["request_id"] = "r" * 10_000
    doc["user"]["id"] = "u" * 5_000
    doc["source"] = {"address": "h" * 3_000}
    doc["rule"]["description"] = "d" * 2_000
    doc["message"] = "m" * 70_000
    header, fields = parse_cef(cef(doc))
    assert len(header[5]) == 512 and header[5].endswith("...")
    assert len(fields["cs6"]) == 4000 and fields["cs6"] == "r" * 3997 + "..."
    assert len(fields["suser"]) == len(fields["shost"]) == len(fields["msg"]) == 1023
    cut = (10_000 - 3997) + (5_000 - 1020) + (3_000 - 1020) + (2_000 - 509) + (70_000 - 1020)
    assert (fields["cn2Label"], fields["cn2"]) == ("truncatedChars", str(cut))
    assert "cn2" not in parse_cef(cef(ALERT))[1]  # nothing cut, nothing said


def test_cef_src_is_ipv4_and_ipv6_goes_to_c6a2():
    def fields(ip):
        return parse_cef(cef(alert(9, source={"ip": ip})))[1]

    assert fields("203.0.113.7")["src"] == "203.0.113.7"
    v6 = fields("2001:db8::1")
    assert "src" not in v6 and (v6["c6a2Label"], v6["c6a2"]) == ("Source IPv6 Address",
                                                                 "2001:db8::1")
    assert fields("::ffff:192.0.2.9")["src"] == "192.0.2.9"  # an IPv4 in IPv6 clothes
    assert "src" not in fields("not-an-address") and "c6a2" not in fields("not-an-address")


def test_syslog_msg_has_the_bom_only_when_it_is_not_ascii():
    assert b"\xef\xbb\xbf" not in SYSLOG
    doc = alert(10)
    doc["user"]["id"] = "clé-7"
    message = syslog_message(doc, hostname="mw-test")
    head = b"<131>1 2026-11-21T10:00:05.140Z mw-test modelwatch - extraction - "
    assert message.startswith(head + b"\xef\xbb\xbfCEF:0|")
    assert "suser=clé-7 " in message[len(head) + 3:].decode("utf-8")


@pytest.mark.parametrize("max_bytes", [480, 700, 2048, 8192])
def test_a_message_fits_max_bytes_by_cutting_input_sized_fields_first(max_bytes):
    doc = alert(11)
    doc["modelwatch"]["trigger"]["request_id"] = "r" * 10_000
    doc["message"] = "m\u2028" * 30_000
    doc["user"]["id"] = "ü" * 3_000
    message = syslog_message(doc, hostname="mw-test", max_bytes=max_bytes)
    assert len(message) <= max_bytes
    assert message.startswith(b"<131>1 2026-11-21T10:00:05.140Z mw-test modelwatch - extraction"
                              b" - \xef\xbb\xbfCEF:0|modelwatch|")
    text = message.decode("utf-8")  # cut at a character boundary
    assert "externalId=" + doc["event"]["id"] in text and "cn2Label=truncatedChars cn2=" in text
    if max_bytes >= 2048:  # room for every field: only input-sized values were cut
        _, fields = parse_cef(text.split(" - \ufeff", 1)[1])
        assert fields["cfp1"] == "0.97" and fields["cn1"] == "412"
        assert fields["cs1"] == "AML.T0024,AML.T0024.002"
        assert fields["cs6"].endswith("...") and fields["msg"].endswith("...")


def test_max_bytes_is_checked_in_the_url():
    for url, problem in [("syslog+udp://h?max_bytes=70000", "max_bytes='70000': expected a "
                          "number 480..65507"),
                         ("syslog+tcp://h?max_bytes=100", "max_bytes='100'"),
                         ("syslog+tls://h?max_bytes=lots", "max_bytes='lots'")]:
        with pytest.raises(UserError, match=re.escape(problem)):
            open_sink(url)
    assert open_sink("syslog+udp://h").max_bytes == 2048
    assert open_sink("syslog+tcp://h").max_bytes == open_sink("syslog+tls://h").max_bytes == 8192
    assert open_sink("syslog+udp://h?max_bytes=65507").max_bytes == 65507


def test_udp_keeps_a_huge_alert_within_one_datagram_of_the_configured_size():
    doc = alert(12)
    doc["modelwatch"]["trigger"]["request_id"] = "r" * 70_000
    doc["message"] = "m" * 70_000
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as listener:
        listener.bind(("127.0.0.1", 0))
        listener.settimeout(5)
        port = listener.getsockname()[1]
        small = open_sink(f"syslog+udp://127.0.0.1:{port}")
        large = open_sink(f"syslog+udp://127.0.0.1:{port}?max_bytes=65507")
        send_once(small, [doc, ALERT])
        send_once(large, [doc])
        got = [listener.recv(65535) for _ in range(3)]
    assert len(got[0]) <= 2048 and b"cn2Label=truncatedChars" in got[0]
    assert got[1].endswith(SYSLOG[SYSLOG.index(b" - CEF:"):])  # the next one, whole
    assert 2048 < len(got[2]) <= 65507
    assert b"\xef\xbb\xbf" not in got[0] + got[2]  # ASCII, even cut
    _, fields = parse_cef(got[2].split(b" - ", 2)[2].decode())
    assert len(fields["cs6"]) == 4000 and len(fields["msg"]) == 1023  # field caps only
    assert (small.truncated, large.truncated) == (1, 1)


def test_tcp_frames_keep_within_max_bytes():
    doc = alert(13)
    doc["modelwatch"]["trigger"]["request_id"] = "r" * 70_000

    async def main():
        server, received, port = await stream_server()
        sink = open_sink(f"syslog+tcp://127.0.0.1:{port}?max_bytes=1024")
        await sink.send([doc, ALERT])
        await sink.close()
        await wait_until(lambda: len(unframe(bytes(received))) == 2)
        server.close()
        return unframe(bytes(received))

    big, normal = run(main())
    assert len(big) <= 1024 and b"cn2Label=truncatedChars" in big
    assert normal.endswith(SYSLOG[SYSLOG.index(b" - CEF:"):])


def test_a_udp_send_that_fails_is_a_failure_of_its_own_alerts():
    """A datagram the kernel refuses (EMSGSIZE) raises from the send that carried it:
    the outbox counts a failure, not a delivery, and keeps the alert to retry."""
    import errno

    from streams.sinks.syslog_cef import SyslogUDPSink

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as listener:
        listener.bind(("127.0.0.1", 0))
        port = listener.getsockname()[1]
        sink = SyslogUDPSink("127.0.0.1", port)
        sink.message = lambda doc: b"x" * 70_000  # over any UDP payload

        with pytest.raises(OSError) as caught:
            send_once(sink, [ALERT])
        assert caught.value.errno == errno.EMSGSIZE

        async def main():
            outbox = Outbox(sink, backoff=(0.01, 0.02))
            outbox.offer([ALERT])
            await wait_until(lambda: outbox.failed >= 2)
            delivered = outbox.delivered
            await outbox.close(timeout=0.1)
            return outbox, delivered

        outbox, delivered = run(main())
    assert delivered == 0 and outbox.delivered == 0 and outbox.dropped == 1


def test_udp_refused_by_the_receiver_raises_on_a_send_not_silently():
    """ICMP port unreachable comes back after a datagram left: the next send raises
    (the batch is retried); nothing is counted as delivered after that."""
    port = free_port()
    sink = open_sink(f"syslog+udp://127.0.0.1:{port}")

    async def main():
        await sink.send([ALERT])
        deadline = time.monotonic() + 10
        with pytest.raises(ConnectionRefusedError):
            while time.monotonic() < deadline:  # the ICMP error arrives asynchronously
                await sink.send([ALERT])
                await asyncio.sleep(0.01)
        await sink.close()

    run(main())


def test_alerts_of_before_sub_techniques_had_their_field_format_the_same():
    """Alerts already on the topic list AML.T0024.002 in technique.id (contract v1's
    example): ``alerts forward`` turns them into the same OCSF attacks and CEF ids."""
    old = copy.deepcopy(ALERT)
    old["threat"] = {"framework": "MITRE ATLAS",
                     "technique": {"id": ["AML.T0024.002"], "name": ["Extract AI Model"]}}
    old["event"]["type"] = ["indicator"]
    del old["ecs"]
    assert ocsf(old)["finding_info"]["attacks"] == ocsf(ALERT)["finding_info"]["attacks"]
    assert parse_cef(cef(old))[1]["cs1"] == "AML.T0024.002"
    both = copy.deepcopy(old)
    both["threat"]["technique"]["id"] = ["AML.T0043", "AML.T0043.001"]
    [attack] = ocsf(both)["finding_info"]["attacks"]
    assert attack["sub_technique"]["uid"] == "AML.T0043.001"
