"""The sink interface, sink URLs, delivery with retries, and the non-blocking outbox.

A sink sends a batch of ECS alert dicts (contract v1) to one destination and
raises when the destination did not take them. Delivery is at least once: a
batch that failed part-way is sent again whole, and SIEMs drop the repeats by
``event.id``.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import os
import ssl
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import ClassVar
from urllib.parse import parse_qsl, urlsplit

from streams.tabular import UserError

log = logging.getLogger("modelwatch.sinks")

BACKOFF_MIN_S = 0.1
BACKOFF_MAX_S = 30.0


@dataclass(frozen=True)
class SinkURL:
    """A parsed sink URL; ``error`` names the URL in a one-line ``UserError``."""

    text: str
    scheme: str
    host: str
    port: int | None
    path: str
    options: dict[str, str]

    @classmethod
    def parse(cls, text: str) -> SinkURL:
        parts = urlsplit(text.strip())
        try:
            port = parts.port
        except ValueError:
            raise UserError(f"sink {text}: the port is not a number 0..65535") from None
        if parts.username is not None or parts.password is not None:
            shown = f"{parts.scheme}://{parts.hostname or ''}…"  # without the secret
            raise UserError(f"sink {shown}: no credentials in the URL; name an environment "
                            "variable instead (token_env=, secret_env=)")
        options = {}
        for key, value in parse_qsl(parts.query, keep_blank_values=True):
            if key in options:
                raise UserError(f"sink {text}: option {key!r} given twice")
            options[key] = value
        return cls(text=text.strip(), scheme=parts.scheme.lower(), host=parts.hostname or "",
                   port=port, path=parts.path, options=options)

    def error(self, problem: str) -> UserError:
        return UserError(f"sink {self.text}: {problem}")

    def check_options(self, known: Iterable[str]) -> None:
        unknown = sorted(set(self.options) - set(known))
        if unknown:
            names = ", ".join(sorted(known)) or "none"
            raise self.error(f"unknown option {unknown[0]!r} (known: {names})")

    def host_and_port(self) -> tuple[str, int]:
        if not self.host or self.port is None:
            raise self.error("needs host:port")
        return self.host, self.port

    def choice(self, name: str, allowed: tuple[str, ...], default: str) -> str:
        value = self.options.get(name, default)
        if value not in allowed:
            raise self.error(f"{name}={value!r}: expected one of {', '.join(allowed)}")
        return value

    def flag(self, name: str) -> bool:
        value = self.options.get(name, "0")
        if value not in ("0", "1", "true", "false"):
            raise self.error(f"{name}={value!r}: expected 1 or 0")
        return value in ("1", "true")

    def secret(self, option: str, default_env: str | None = None) -> str | None:
        """The secret from the environment variable the URL names (never from the URL)."""
        env = self.options.get(option, default_env)
        if env is None:
            return None
        value = os.environ.get(env)
        if not value:
            raise self.error(f"environment variable {env} ({option}) is not set")
        return value

    def tls_context(self) -> ssl.SSLContext:
        """Verifying by default; ``ca=/path.pem`` adds a CA, ``insecure=1`` skips checks."""
        ca = self.options.get("ca")
        if ca is not None and not os.path.isfile(ca):
            raise self.error(f"ca={ca}: no such file")
        try:
            context = ssl.create_default_context(cafile=ca)
        except ssl.SSLError as exc:
            raise self.error(f"ca={ca}: not a PEM certificate: {exc.reason}") from None
        if self.flag("insecure"):
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
        return context


class Sink(ABC):
    """One destination for alerts.

    ``name`` is a short fixed label (the URL scheme, e.g. ``syslog+tcp``), fit for
    a metric label; ``send`` raises on failure; ``close`` releases connections.
    """

    name: str = "sink"  # may be set per instance: hec+https and hec+http share a class
    options: ClassVar[tuple[str, ...]] = ()

    @classmethod
    @abstractmethod
    def from_url(cls, url: SinkURL) -> Sink:
        """Check the URL and build the sink; no connection is made yet."""

    @abstractmethod
    async def send(self, alerts: list[dict]) -> None:
        """Deliver every alert or raise."""

    async def close(self) -> None:  # noqa: B027 - most sinks hold nothing
        """Release connections and files."""


def backoff_delays(min_s: float = BACKOFF_MIN_S, max_s: float = BACKOFF_MAX_S):
    """0.1, 0.2, 0.4 … seconds, then ``max_s`` for ever."""
    delay = min_s
    while True:
        yield delay
        delay = min(delay * 2, max_s)


async def deliver(sink: Sink, alerts: list[dict], *, attempts: int | None = None,
                  timeout_s: float = 30.0, backoff: tuple[float, float] = (BACKOFF_MIN_S,
                                                                         BACKOFF_MAX_S),
                  on_failure: Callable[[Exception], None] | None = None) -> None:
    """Send until the sink takes the batch; after ``attempts`` failures re-raise the last."""
    delays = backoff_delays(*backoff)
    tries = 0
    while True:
        tries += 1
        try:
            # A peer that stops reading must not hold the batch for ever. (Not
            # wait_for: on Python 3.11 it can swallow a cancellation that comes as
            # the send completes, and a cancelled forward would then go on for ever.)
            async with asyncio.timeout(timeout_s):
                await sink.send(alerts)
            return
        except Exception as exc:
            if on_failure is not None:
                on_failure(exc)
            if attempts is not None and tries >= attempts:
                raise
            delay = next(delays)
            log.warning("sink %s: %s; retrying in %.1f s", sink.name, describe(exc), delay)
            await asyncio.sleep(delay)


def describe(exc: BaseException) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


class Outbox:
    """A bounded queue in front of a sink, so that the worker never waits on it.

    ``offer`` only appends; a background task sends batches with retries. When the
    queue is full the oldest alerts are dropped and counted: they are still on the
    alerts topic, and ``modelwatch alerts forward`` can send them again.
    """

    def __init__(self, sink: Sink, *, capacity: int = 10_000, batch_size: int = 100,
                 send_timeout_s: float = 30.0,
                 backoff: tuple[float, float] = (BACKOFF_MIN_S, BACKOFF_MAX_S)):
        self.sink = sink
        self.batch_size = batch_size
        self.send_timeout_s = send_timeout_s
        self.backoff = backoff
        self.delivered = 0   # alerts the sink took
        self.failed = 0      # failed send attempts
        self.dropped = 0     # alerts given up: queue overflow, or still queued at close
        self._queue: collections.deque[dict] = collections.deque(maxlen=capacity)
        self._in_flight = 0
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._closing = False
        self._reported = (0, 0, 0)

    @property
    def name(self) -> str:
        return self.sink.name

    @property
    def queued(self) -> int:
        return len(self._queue) + self._in_flight

    def offer(self, alerts: Iterable[dict]) -> None:
        """Queue alerts and return at once; call from the event loop's thread."""
        if self._closing:
            raise RuntimeError(f"outbox {self.name} is closed")
        for alert in alerts:
            if len(self._queue) == self._queue.maxlen:
                self.dropped += 1  # the deque pushes out its oldest
            self._queue.append(alert)
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(
                self._run(), name=f"outbox-{self.name}")
        self._wakeup.set()

    def take_counts(self) -> tuple[int, int, int]:
        """(delivered, failed, dropped) since the last call: increments for counters."""
        now = (self.delivered, self.failed, self.dropped)
        increments = tuple(a - b for a, b in zip(now, self._reported, strict=True))
        self._reported = now
        return increments

    def _count_failure(self, _exc: Exception) -> None:
        self.failed += 1

    async def _run(self) -> None:
        while True:
            while not self._queue:
                if self._closing:
                    return
                self._wakeup.clear()
                await self._wakeup.wait()
            take = min(self.batch_size, len(self._queue))
            batch = [self._queue.popleft() for _ in range(take)]
            self._in_flight = len(batch)
            await deliver(self.sink, batch, timeout_s=self.send_timeout_s, backoff=self.backoff,
                          on_failure=self._count_failure)
            self._in_flight = 0
            self.delivered += len(batch)

    async def close(self, timeout: float = 5.0) -> None:
        """Send what can be sent within ``timeout`` seconds; count the rest as dropped."""
        self._closing = True
        self._wakeup.set()
        if self._task is not None:
            try:
                async with asyncio.timeout(timeout):
                    await asyncio.shield(self._task)
            except TimeoutError:
                self._task.cancel()
                await asyncio.gather(self._task, return_exceptions=True)
        self.dropped += self.queued
        self._queue.clear()
        self._in_flight = 0
        await self.sink.close()


def open_url(url: SinkURL, registry: dict[str, type[Sink]]) -> Sink:
    if not url.scheme:
        raise url.error(f"no scheme; expected one of {', '.join(sorted(registry))}")
    kind = registry.get(url.scheme)
    if kind is None:
        raise url.error(f"unknown scheme {url.scheme!r}; expected one of "
                        f"{', '.join(sorted(registry))}")
    url.check_options(kind.options)
    return kind.from_url(url)



class DeliveryError(Exception):
    """The destination answered, but did not take the alerts."""


class HTTPSink(Sink):
    """POSTs over one kept-alive aiohttp session (made in the running loop, on first use)."""

    def __init__(self, url: str, *, tls: ssl.SSLContext | None = None,
                 timeout_s: float = 10.0):
        self.url = url
        self.tls = tls
        self.timeout_s = timeout_s
        self._session = None

    @staticmethod
    def target(url: SinkURL, default_path: str = "") -> str:
        """``hec+https://h:p/x?opts`` -> ``https://h:p/x``: every query option is ours."""
        if not url.host:
            raise url.error("needs a host")
        scheme = url.scheme.split("+", 1)[1]
        netloc = f"[{url.host}]" if ":" in url.host else url.host
        netloc += f":{url.port}" if url.port is not None else ""
        return f"{scheme}://{netloc}{url.path or default_path}"

    async def post(self, body: bytes, headers: dict[str, str]) -> None:
        import aiohttp

        if self._session is None:
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=self.timeout_s),
                connector=aiohttp.TCPConnector(ssl=self.tls if self.tls is not None else False))
        async with self._session.post(self.url, data=body, headers=headers) as response:
            if not 200 <= response.status < 300:
                text = (await response.text(errors="replace"))[:200].strip()
                raise DeliveryError(f"{self.url}: HTTP {response.status} {text}")
            await response.read()

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
        self._session = None
