"""The Faust worker against the real embedded broker: replay's alerts, on the alerts
topic and on the SIEM outputs beside it."""

from __future__ import annotations

import json
import re
import socket
import threading
import time

from detectors.config import load_thresholds
from streams.files import load_profile
from streams.replay import replay
from streams.worker.broker import EmbeddedBroker
from tests.conftest import run_cli
from tests.streaming import create_topics, send_stats, start_worker, stop, wait_for_alerts
from tests.test_sinks import unframe


class SyslogTCPListener:
    """A syslog receiver on loopback that keeps every byte it is sent."""

    def __init__(self):
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        self.received = bytearray()
        self.lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                connection, _ = self.server.accept()
            except OSError:
                return
            threading.Thread(target=self._read, args=(connection,), daemon=True).start()

    def _read(self, connection: socket.socket) -> None:
        with connection:
            while chunk := connection.recv(65536):
                with self.lock:
                    self.received += chunk

    def messages(self) -> list[bytes]:
        """The RFC 6587 octet-counted frames received so far."""
        with self.lock:
            return unframe(bytes(self.received))

    def close(self) -> None:
        self.server.close()


def test_worker_alerts_equal_replay_alerts_on_the_topic_and_every_sink(demo, tmp_path):
    folder, paths = demo
    expected = replay([load_profile(paths["profile"])], load_thresholds(),
                      inference_log=paths["inference.jsonl"], training_stats=paths["stats"],
                      deadletter=None)
    expected_ids = {a.event.id for a in expected.alerts}
    assert {a.rule.category for a in expected.alerts} == {"extraction", "adversarial", "poisoning"}

    syslog, alerts_file = SyslogTCPListener(), tmp_path / "alerts.jsonl"
    log = tmp_path / "worker.log"
    with EmbeddedBroker() as broker:
        create_topics(broker)
        worker = start_worker(broker, folder / "profiles", tmp_path / "state", log,
                              "--metrics-port", "0", "--sinks",
                              f"file://{alerts_file},syslog+tcp://127.0.0.1:{syslog.port}")
        try:
            shipped = run_cli("tail", paths["inference.jsonl"], "--once", "--broker", broker.url,
                              "--checkpoint", tmp_path / "cp.json")
            assert shipped.returncode == 0, shipped.stderr
            send_stats(broker, paths["stats"])
            got = wait_for_alerts(broker, lambda alerts: len(alerts) >= len(expected_ids), 90)
            deadline = time.monotonic() + 30  # the outboxes deliver in the background
            while time.monotonic() < deadline and len(syslog.messages()) < len(expected_ids):
                time.sleep(0.2)
            assert worker.poll() is None, log.read_text()[-3000:]
        finally:
            stop(worker)
            syslog.close()
    assert sorted(a["event"]["id"] for a in got) == sorted(expected_ids)  # each once

    in_file = [json.loads(line) for line in alerts_file.read_text().splitlines()]
    assert sorted(a["event"]["id"] for a in in_file) == sorted(expected_ids)

    frames = syslog.messages()
    external_ids = [re.search(rb"externalId=(\S+)", m).group(1).decode() for m in frames]
    assert sorted(external_ids) == sorted(expected_ids)
    assert all(re.match(rb"<\d+>1 \S+ \S+ modelwatch - \S+ - CEF:0\|", m) for m in frames)
