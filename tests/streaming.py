"""Helpers for integration tests against the embedded broker: topics, workers, reading topics."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from tests.conftest import ROOT

TOPICS = ("inference-logs", "training-stats", "security-alerts", "modelwatch-deadletter")
PARTITIONS = 8


def create_topics(broker) -> None:
    from kafka.admin import KafkaAdminClient, NewTopic

    admin = KafkaAdminClient(bootstrap_servers=broker.address, request_timeout_ms=5000)
    admin.create_topics([NewTopic(t, num_partitions=PARTITIONS, replication_factor=1)
                         for t in TOPICS])
    admin.close()


def start_worker(broker, profiles: Path, state_dir: Path, log: Path,
                 *flags: str) -> subprocess.Popen:
    """A worker in its own process group (so kill -9 takes all of it)."""
    flags = flags or ("--metrics-port", "0", "--log-level", "info")
    return subprocess.Popen(
        [sys.executable, "-m", "streams.cli", "worker", "--broker", broker.url,
         "--profiles", str(profiles), "--state-dir", str(state_dir), *flags],
        cwd=ROOT, stdout=open(log, "ab"), stderr=subprocess.STDOUT, start_new_session=True,
        env={**os.environ, "OPENBLAS_NUM_THREADS": "1"})


def kill9(worker: subprocess.Popen) -> None:
    os.killpg(worker.pid, signal.SIGKILL)
    worker.wait(timeout=10)


def stop(worker: subprocess.Popen) -> None:
    if worker.poll() is None:
        os.killpg(worker.pid, signal.SIGTERM)
        try:
            worker.wait(timeout=20)
        except subprocess.TimeoutExpired:
            kill9(worker)


def terminate(process: subprocess.Popen, timeout_s: float = 20.0) -> None:
    """SIGTERM, then SIGKILL if it has not ended in time."""
    process.terminate()
    try:
        process.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def send_records(broker, records) -> None:
    """(topic, key, value) records, each acknowledged by the broker."""
    from kafka import KafkaProducer

    producer = KafkaProducer(bootstrap_servers=broker.address, acks="all")
    for topic, key, value in records:
        producer.send(topic, key=key, value=value)
    producer.flush()
    producer.close()


def send_stats(broker, stats: Path) -> None:
    send_records(broker, [("training-stats", json.loads(line)["dataset"].encode(), line)
                          for line in stats.read_bytes().splitlines()])


def connection(broker) -> dict:
    """kafka-python options for a broker (anything with an ``address``) or for the
    client settings of one (TLS, SASL)."""
    from streams.settings import Settings
    from streams.worker.kafka import client_options

    if isinstance(broker, Settings):
        return client_options(broker)
    return {"bootstrap_servers": broker.address}


def read_topic(broker, topic: str, partitions: int = PARTITIONS) -> list:
    """Every record of a topic, read to the end without a consumer group."""
    from kafka import KafkaConsumer, TopicPartition

    consumer = KafkaConsumer(enable_auto_commit=False, auto_offset_reset="earliest",
                             consumer_timeout_ms=1500, **connection(broker))
    consumer.assign([TopicPartition(topic, p) for p in range(partitions)])
    records = list(consumer)
    consumer.close()
    return records


def wait_for_alerts(broker, until, timeout_s: float = 120.0) -> list[dict]:
    """Alerts on the alerts topic, read until ``until(alerts)`` holds or time runs out."""
    deadline = time.monotonic() + timeout_s
    while True:
        alerts = [json.loads(r.value) for r in read_topic(broker, "security-alerts")]
        if until(alerts) or time.monotonic() > deadline:
            return alerts
        time.sleep(0.5)


def latest_states(broker, table: str, cls) -> dict:
    """The last value of every key in a table's changelog, decoded."""
    from detectors.state import loads
    from streams.worker.tables import _APPLIED

    latest = {r.key.decode(): r.value for r in read_topic(broker, f"modelwatch-{table}-changelog")}
    return {k: loads(cls, v[_APPLIED.size:]) for k, v in latest.items() if v is not None}


def state_differences(a, b) -> list[str]:
    """Fields where two detector states differ: counts exactly, float64 to 1e-9 relative,
    float32 distances to 1e-4 (they come from ‖a‖² + ‖b‖² − 2a·b in float32 blocks,
    and a batch cut differently rounds them differently: seen up to 1.6e-5)."""
    out = []
    for f in dataclasses.fields(a):
        x, y = getattr(a, f.name), getattr(b, f.name)
        if isinstance(x, np.ndarray):
            rtol, atol = (1e-4, 1e-4) if x.dtype == np.float32 else (1e-9, 1e-12)
            same = x.shape == y.shape and (
                np.allclose(x, y, rtol=rtol, atol=atol, equal_nan=True)
                if x.dtype.kind == "f" else np.array_equal(x, y))
        elif isinstance(x, float):
            same = (np.isnan(x) and np.isnan(y)) or np.isclose(x, y, rtol=1e-9)
        else:
            same = x == y
        if not same:
            out.append(f.name)
    return out


def make_pki(folder: Path) -> dict[str, Path]:
    """A throwaway CA with a server certificate for 127.0.0.1 and a client certificate
    (openssl); also a second CA that signed neither, for the wrong-CA cases."""
    from tests.conftest import need_tool

    openssl = need_tool("openssl", package="openssl")
    folder.mkdir(parents=True, exist_ok=True)

    def run(*args: str) -> None:
        subprocess.run([openssl, *args], cwd=folder, check=True, capture_output=True)

    for ca in ("ca", "other-ca"):
        run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{ca}.key",
            "-out", f"{ca}.pem", "-days", "2", "-subj", f"/CN=modelwatch test {ca}")
    (folder / "server.ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    for name, ext in (("server", ["-extfile", "server.ext"]), ("client", [])):
        run("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out",
            f"{name}.csr", "-subj", f"/CN={name}")
        run("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
            "-CAcreateserial", "-out", f"{name}.pem", "-days", "2", *ext)
    return {name: folder / name for name in (
        "ca.pem", "other-ca.pem", "server.pem", "server.key", "client.pem", "client.key")}


class TlsFront:
    """TLS in front of a broker: clients speak TLS (with a client certificate) to
    ``port``, which forwards plain bytes to the broker. The bundled Tansu 0.6.0
    cannot serve TLS itself (its --cert and --key are refused together, and --cert
    alone leaves the listener plaintext), so the broker advertises this port."""

    def __init__(self, pki: dict[str, Path], port: int, upstream: int):
        import ssl
        import threading

        self.port, self.upstream = port, upstream
        self.context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=pki["ca.pem"])
        self.context.load_cert_chain(pki["server.pem"], pki["server.key"])
        self.context.verify_mode = ssl.CERT_REQUIRED
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)

    def __enter__(self) -> TlsFront:
        self._thread.start()
        assert self._ready.wait(10), "TLS front did not start"
        return self

    def __exit__(self, *exc) -> None:
        self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)

    def _serve(self) -> None:
        import asyncio

        async def pipe(reader, writer):
            try:
                while data := await reader.read(65536):
                    writer.write(data)
                    await writer.drain()
            except (ConnectionError, OSError):
                pass
            finally:
                writer.close()

        async def client(reader, writer):
            try:
                up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.upstream)
            except OSError:
                writer.close()
                return
            await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))

        async def main():
            self._loop, self._stop = asyncio.get_running_loop(), asyncio.Event()
            server = await asyncio.start_server(client, "127.0.0.1", self.port, ssl=self.context)
            self._ready.set()
            await self._stop.wait()
            server.close()

        asyncio.run(main())


class S3Store:
    """A local S3 server (moto) holding one bucket: durable storage for a broker that
    is stopped and started again. The bundled Tansu has no PostgreSQL engine, and
    its memory engine loses everything when it stops."""

    BUCKET = "modelwatch"

    def __init__(self, server: str, log: Path):
        from streams.worker.broker import free_port

        self.server, self.log, self.port = server, log, free_port()
        self.process: subprocess.Popen | None = None

    @property
    def environ(self) -> dict[str, str]:
        """What the broker needs to reach it (object_store's variables)."""
        return {"AWS_ENDPOINT": f"http://127.0.0.1:{self.port}", "AWS_ALLOW_HTTP": "true",
                "AWS_ACCESS_KEY_ID": "modelwatch", "AWS_SECRET_ACCESS_KEY": "modelwatch",
                "AWS_DEFAULT_REGION": "us-east-1"}

    @property
    def storage(self) -> str:
        return f"s3://{self.BUCKET}/"

    def __enter__(self) -> S3Store:
        import urllib.request

        with open(self.log, "ab") as out:
            self.process = subprocess.Popen(
                [self.server, "-H", "127.0.0.1", "-p", str(self.port)], stdout=out,
                stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 60
        while True:  # the bucket, once the server answers
            try:
                request = urllib.request.Request(
                    f"http://127.0.0.1:{self.port}/{self.BUCKET}", method="PUT")
                with urllib.request.urlopen(request, timeout=5):
                    return self
            except OSError:
                if time.monotonic() > deadline or self.process.poll() is not None:
                    self.__exit__()
                    raise RuntimeError(
                        f"S3 server did not start: {self.log.read_text()[-500:]}") from None
                time.sleep(0.2)

    def __exit__(self, *exc) -> None:
        if self.process is not None and self.process.poll() is None:
            stop(self.process)
