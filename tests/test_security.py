"""TLS and SASL against the real broker (issue 11, item 5).

The bundled Tansu 0.6.0 cannot serve TLS (its ``--cert`` and ``--key`` are refused
together; ``--cert`` alone leaves the listener plaintext), so TLS runs through a
TLS front (tests/streaming.py) that demands a client certificate, with the broker
behind it advertising the front. Its SASL cannot log anyone in: PLAIN is not
built in, and a SCRAM user cannot be created on an authenticating memory broker
(creating one needs a logged-in connection). So SASL is tested for what a user
meets there: one clear line, never a hang or a traceback; and a password given
to ``run`` reaches its children through their environment, never their argv.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from streams.settings import Settings, resolve
from streams.worker.broker import EmbeddedBroker, free_port
from streams.worker.kafka import client_options, create_topics
from tests.conftest import ROOT
from tests.streaming import (
    PARTITIONS,
    TOPICS,
    TlsFront,
    make_pki,
    read_topic,
    stop,
    terminate,
    wait_for_alerts,
)

pytestmark = pytest.mark.integration

PASSWORD = "pw-7c1e-never-in-argv"


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return make_pki(tmp_path_factory.mktemp("pki"))


def tls_env(pki, ca: str = "ca.pem") -> dict[str, str]:
    return {"MODELWATCH_TLS_CA": str(pki[ca]), "MODELWATCH_TLS_CERT": str(pki["client.pem"]),
            "MODELWATCH_TLS_KEY": str(pki["client.key"])}


@contextlib.contextmanager
def tls_broker(pki):
    """A broker behind a TLS front, its topics made; yields the test's own connection
    through the front (the broker advertises only it)."""
    import argparse

    front_port = free_port()
    with EmbeddedBroker(advertised_port=front_port) as broker, \
            TlsFront(pki, front_port, broker.port):
        mine = resolve(argparse.Namespace(broker=f"kafka://127.0.0.1:{front_port}"),
                       environ=tls_env(pki))
        # Before any record: the broker would make 4 partitions for an unknown topic.
        create_topics(mine, dict.fromkeys(TOPICS, PARTITIONS))
        yield mine


def send_stats(settings: Settings, stats: Path) -> None:
    from kafka import KafkaProducer

    producer = KafkaProducer(acks="all", **client_options(settings))
    for line in stats.read_bytes().splitlines():
        producer.send("training-stats", key=json.loads(line)["dataset"].encode(), value=line)
    producer.flush()
    producer.close()


def cli(*args, env: dict[str, str], **popen) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "streams.cli", *map(str, args)], cwd=ROOT,
                            env={**os.environ, "OPENBLAS_NUM_THREADS": "1", **env},
                            start_new_session=True, **popen)


def commands(folder: Path, paths: dict, tmp_path: Path) -> dict[str, list]:
    """Every client of the broker, each with what it needs besides the connection."""
    return {
        "worker": ["worker", "--profiles", folder / "profiles", "--state-dir",
                   tmp_path / "worker-state", "--metrics-port", "0"],
        "tail": ["tail", paths["inference.jsonl"], "--once", "--checkpoint",
                 tmp_path / "tail.json"],
        "stats --kafka": ["stats", "--kafka", "--profile", paths["profile"], "--source", "s1",
                          "--batch-id", "tls-1", "--ts", "2026-11-21T10:00:00Z",
                          folder / truth_batch(paths)],
        "alerts forward": ["alerts", "forward", "--to-end", "--sink",
                           f"file://{tmp_path / 'forwarded.jsonl'}"],
        "run": ["run", "--profiles", folder / "profiles", "--log", paths["inference.jsonl"],
                "--state-dir", tmp_path / "run-state", "--metrics-port", "0"],
    }


def truth_batch(paths) -> str:
    return json.loads(paths["truth.json"].read_text())["batches"][0]["path"]


def refused_in_one_line(runs: dict[str, subprocess.Popen], words: str) -> None:
    """Each command ended non-zero with one line on stderr, containing ``words``."""
    for name, process in runs.items():
        try:
            _, err = process.communicate(timeout=240)
        except subprocess.TimeoutExpired:
            terminate(process)
            pytest.fail(f"{name}: still running after 240 s instead of refusing")
        lines = err.decode(errors="replace").strip().splitlines()
        assert process.returncode not in (0, None), (name, lines)
        assert len(lines) == 1 and words in lines[0], (name, lines)
        assert lines[0].startswith("modelwatch: "), (name, lines)


def test_every_client_works_over_tls_with_a_client_certificate(demo, expected, pki, tmp_path):
    folder, paths = demo
    with tls_broker(pki) as mine:
        url = ["--broker", mine.broker]
        env = tls_env(pki)
        todo = commands(folder, paths, tmp_path)
        shipped = cli(*todo["tail"], *url, env=env, stderr=subprocess.PIPE)
        assert shipped.wait(timeout=120) == 0, shipped.stderr.read()
        sent = cli(*todo["stats --kafka"], *url, env=env, stderr=subprocess.PIPE)
        assert sent.wait(timeout=120) == 0, sent.stderr.read()
        send_stats(mine, paths["stats"])  # the rest of the scenario's batches
        worker_log = tmp_path / "worker.log"
        with open(worker_log, "wb") as log_out:
            worker = cli(*todo["worker"], *url, env=env, stdout=log_out, stderr=subprocess.STDOUT)
        try:
            expected_ids = {a.event.id for a in expected.alerts}
            alerts = wait_for_alerts(
                mine, lambda found: {a["event"]["id"] for a in found} >= expected_ids,
                timeout_s=300)
            assert worker.poll() is None, worker_log.read_text()[-3000:]
        finally:
            stop(worker)
        assert {a["event"]["id"] for a in alerts} >= expected_ids, worker_log.read_text()[-3000:]
        assert [json.loads(r.value)["batch_id"] for r in read_topic(mine, "training-stats")
                ].count("tls-1") == 1
        forwarded = cli(*todo["alerts forward"], *url, env=env, stderr=subprocess.PIPE)
        assert forwarded.wait(timeout=120) == 0, forwarded.stderr.read()
        lines = (tmp_path / "forwarded.jsonl").read_text().splitlines()
        assert {json.loads(line)["event"]["id"] for line in lines} == \
            {a["event"]["id"] for a in alerts}


def test_run_over_tls_prints_alerts_and_gives_its_children_no_secret_in_argv(
        demo, expected, pki, tmp_path):
    folder, paths = demo
    with tls_broker(pki) as mine:
        send_stats(mine, paths["stats"])
        todo = commands(folder, paths, tmp_path)
        # The password is given as a flag, which puts it in run's own argv (the user's
        # choice; --help says to prefer the environment): never in its children's.
        runner = cli(*todo["run"], "--broker", mine.broker,
                     "--sasl-password", PASSWORD, env=tls_env(pki), stdout=subprocess.PIPE,
                     stderr=subprocess.PIPE)
        try:
            children = wait_for_children(runner.pid, count=2)
            for pid in children:
                argv = Path(f"/proc/{pid}/cmdline").read_bytes()
                environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
                assert PASSWORD.encode() not in argv, argv
                assert b"MODELWATCH_SASL_PASSWORD=" + PASSWORD.encode() in environ
                assert b"--tls-ca" in argv  # TLS settings do reach the children
            expected_ids = {a.event.id for a in expected.alerts}
            seen = wait_for_alerts(mine, lambda found: {
                a["event"]["id"] for a in found} >= expected_ids, timeout_s=300)
            assert {a["event"]["id"] for a in seen} >= expected_ids
            time.sleep(2)  # run prints what it reads within a poll (0.5 s) or two
        finally:
            terminate(runner, timeout_s=60)
        out, err = runner.communicate()
        printed = out.decode().splitlines()
        assert len(printed) == len(expected.alerts) + 1, (printed, err[-2000:])  # + its start
        assert printed[0].startswith("run: broker kafka://127.0.0.1:"), printed
        for alert in expected.alerts:
            who = alert.modelwatch.client_id or alert.modelwatch.batch_id
            assert any(alert.rule.name in line and who in line for line in printed), (alert, printed)


def wait_for_children(pid: int, count: int, timeout_s: float = 120.0) -> list[int]:
    """Process ids of the modelwatch commands ``pid`` started (worker, tail)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        found = [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
        found = [p for p in found if b"streams.cli" in Path(f"/proc/{p}/cmdline").read_bytes()]
        if len(found) >= count:
            return found
        time.sleep(0.2)
    pytest.fail(f"run started {len(found)} of {count} children within {timeout_s:.0f} s")


def test_a_wrong_ca_is_refused_in_one_line_by_every_client(demo, pki, tmp_path):
    folder, paths = demo
    with tls_broker(pki) as mine:
        url = ["--broker", mine.broker]
        runs = {name: cli(*argv, *url, env=tls_env(pki, "other-ca.pem"),
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
                for name, argv in commands(folder, paths, tmp_path).items()}
        refused_in_one_line(runs, "TLS refused: certificate verify failed")
        assert not read_topic(mine, "inference-logs")


def test_sasl_that_the_broker_refuses_is_said_in_one_line_by_every_client(
        demo, tmp_path):
    folder, paths = demo
    env = {"MODELWATCH_SASL_MECHANISM": "SCRAM-SHA-256", "MODELWATCH_SASL_USERNAME": "alice",
           "MODELWATCH_SASL_PASSWORD": PASSWORD}
    with EmbeddedBroker(authentication=True) as broker:
        runs = {name: cli(*argv, "--broker", broker.url, env=env,
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
                for name, argv in commands(folder, paths, tmp_path).items()}
        refused_in_one_line(runs, "SASL SCRAM-SHA-256 login as 'alice' refused")
