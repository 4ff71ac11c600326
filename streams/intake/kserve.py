"""``modelwatch intake kserve``: KServe's inference logger in, inference events out.

KServe's logger (``spec.predictor.logger``, ``mode: all``) POSTs each served request
and its response as two CloudEvents with the same id, in binary mode::

    POST /   ce-specversion: 1.0
             ce-type: org.kubeflow.serving.inference.request   (or ...inference.response)
             ce-id: 0009174a-24a8-4603-b098-09c8799950e9
             ce-source: http://localhost:9081/
             ce-time: 2021-04-10T00:23:26.0789529Z
             ce-inferenceservicename: sklearn-iris   ce-namespace: default   ce-endpoint: ...
             ce-component: predictor   ce-metadata: {"X-Api-Key":["key-7f3a"]}
             content-type: application/json
             {"instances": [[6.8, 2.8, 4.8, 1.4], ...]}   /   {"predictions": [1, 1]}

(v2 bodies are Open Inference Protocol JSON). Structured mode
(``content-type: application/cloudevents+json``) is read too. The two halves are
paired by ``ce-id`` (:class:`Pairing`: a bounded wait, a bounded number pending);
each pair becomes one event per row (:mod:`streams.intake.oip`), with ``ts`` from
the request's ``ce-time``, ``request_id`` from ``ce-id``, and ``client_id`` from a
configured header: an entry of the ``ce-metadata`` extension (JSON ``{header:
[values]}``: the request headers listed in the logger's ``metadataHeaders``), the
HTTP header itself, or its ``ce-`` extension form. Events ship
through :class:`streams.cli.tail.Shipper`, the producer path ``tail`` uses; a pair that
cannot be mapped, a half whose other half never came, and an event evicted because
too many were pending go to the dead-letter topic with the reason.
"""

from __future__ import annotations

import contextlib
import json
import sys
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

from streams.intake.oip import pair_events

REQUEST = "org.kubeflow.serving.inference.request"
RESPONSE = "org.kubeflow.serving.inference.response"
MAX_BODY = 16 << 20


@dataclass
class Half:
    body: Any
    headers: dict  # lower-cased names
    at: float
    size: int = 0  # bytes of the body as received


@dataclass
class Pairing:
    """Halves waiting for their other half, by CloudEvent id (oldest first)."""

    wait_s: float = 30.0
    max_pending: int = 10_000
    max_bytes: int = 256 << 20
    pending: OrderedDict = field(default_factory=OrderedDict)  # id -> {"request"|"response": Half}
    bytes: int = 0

    def add(self, kind: str, ce_id: str, half: Half) -> tuple[dict | None, list[tuple[str, dict, str]]]:
        """(both halves if this completed a pair, [(id, halves, reason) dropped meanwhile])."""
        dropped = []
        halves = self._pop(ce_id) or {}
        if kind in halves:
            dropped.append((ce_id, dict(halves), f"kserve: a second {kind} with id {ce_id}"))
            halves = {}
        halves[kind] = half
        if len(halves) == 2:
            return halves, dropped
        self.pending[ce_id] = halves
        self.bytes += half.size
        while len(self.pending) > self.max_pending or (self.bytes > self.max_bytes
                                                       and len(self.pending) > 1):
            old = next(iter(self.pending))
            dropped.append((old, self._pop(old), f"kserve: more than {self.max_pending} halves "
                            f"or {self.max_bytes >> 20} MiB pending; the oldest dropped unpaired"))
        return None, dropped

    def _pop(self, ce_id: str) -> dict | None:
        halves = self.pending.pop(ce_id, None)
        if halves:
            self.bytes -= sum(h.size for h in halves.values())
        return halves

    def expire(self, now: float) -> list[tuple[str, dict, str]]:
        """Halves that waited longer than ``wait_s`` for their other half."""
        dropped = []
        while self.pending:
            ce_id, halves = next(iter(self.pending.items()))
            first = min(h.at for h in halves.values())
            if now - first < self.wait_s:
                break
            self._pop(ce_id)
            [kind] = halves
            other = "response" if kind == "request" else "request"
            dropped.append((ce_id, halves, f"kserve: no {other} within {self.wait_s:g} s"))
        return dropped


def client_of(headers: dict, name: str) -> str | None:
    """The client id under header ``name``: itself, ``ce-<name>``, or in ``ce-metadata``."""
    name = name.lower()
    for key in (name, "ce-" + name, "ce-" + name.replace("-", "")):
        if headers.get(key):
            return headers[key]
    metadata = headers.get("ce-metadata")
    if metadata:
        try:
            doc = json.loads(metadata)
        except ValueError:
            return None
        if isinstance(doc, dict):
            for key, value in doc.items():
                if str(key).lower() == name:
                    value = value[0] if isinstance(value, list) and value else value
                    return str(value) if isinstance(value, str | int) and str(value) else None
    return None


def pair_to_events(ce_id: str, halves: dict, profile, client_header: str,
                   source_header: str | None = None) -> tuple[list[dict], str | None]:
    """Events of a completed pair, or ``([], reason)``."""
    request, response = halves["request"], halves["response"]
    client = client_of(request.headers, client_header) or client_of(response.headers, client_header)
    if client is None:
        return [], f"kserve: no client id in header {client_header}"
    ts = request.headers.get("ce-time") or response.headers.get("ce-time") or time.time()
    # The logger's own connection says nothing about the client: the address comes from a
    # forwarded header only (e.g. X-Forwarded-For, first hop), when one is configured.
    source = client_of(request.headers, source_header) if source_header else None
    source_ip = source.split(",")[0].strip()[:100] or None if source else None
    return pair_events(request.body, response.body, profile, ts=ts, client_id=client[:200],
                       request_id=ce_id, source_ip=source_ip)


def read_event(headers: dict, body: bytes) -> tuple[str, str, Any] | str:
    """(kind, id, data) of one CloudEvent POST (binary or structured), or a reason."""
    try:
        data = json.loads(body)
    except (ValueError, RecursionError):
        return "kserve: body is not JSON"
    ce_type, ce_id = headers.get("ce-type"), headers.get("ce-id")
    if headers.get("content-type", "").startswith("application/cloudevents+json"):
        if not isinstance(data, dict):
            return "kserve: structured CloudEvent is not a JSON object"
        ce_type, ce_id = data.get("type"), data.get("id")
        if "time" in data:
            headers["ce-time"] = str(data["time"])
        for key, value in data.items():  # extensions, as binary mode would carry them
            if key not in ("data", "data_base64") and isinstance(value, str):
                headers.setdefault("ce-" + key, value)
        data = data.get("data")
    if ce_type == REQUEST:
        kind = "request"
    elif ce_type == RESPONSE:
        kind = "response"
    else:
        return f"kserve: ce-type {str(ce_type)[:100]!r} is not an inference request or response"
    if not ce_id:
        return "kserve: no ce-id"
    return kind, str(ce_id)[:1024], data


class Receiver:
    """The HTTP side: aiohttp app; shipping runs on one thread (kafka-python blocks)."""

    def __init__(self, shipper, profile, client_header: str, *, wait_s: float = 30.0,
                 max_pending: int = 10_000, source_header: str | None = None):
        from concurrent.futures import ThreadPoolExecutor

        self.shipper, self.profile, self.client_header = shipper, profile, client_header
        self.source_header = source_header
        self.pairing = Pairing(wait_s=wait_s, max_pending=max_pending)
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kserve-ship")
        self.received = 0

    def _ship(self, events: list[bytes], dead: list[tuple[bytes, str, str]], flush: bool) -> None:
        for raw, reason, source in dead:
            self.shipper._dead(raw, reason, source, 0)
        for raw in events:
            self.shipper.add(raw, "kserve", 0)
        if flush or self.shipper.due():
            self.shipper.flush()

    async def _submit(self, events, dead, flush=False) -> None:
        import asyncio

        await asyncio.get_running_loop().run_in_executor(self.pool, self._ship, events, dead, flush)

    @staticmethod
    def _dead_of(dropped) -> list[tuple[bytes, str, str]]:
        return [(json.dumps({k: h.body for k, h in halves.items()}).encode(), reason,
                 f"kserve:{ce_id}") for ce_id, halves, reason in dropped]

    async def handle(self, request):
        from aiohttp import web

        body = await request.read()
        headers = {k.lower(): v for k, v in request.headers.items()}
        self.received += 1
        read = read_event(headers, body)
        if isinstance(read, str):
            await self._submit([], [(body, read, "kserve")])
            return web.Response(status=400, text=read + "\n")
        kind, ce_id, data = read
        pair, dropped = self.pairing.add(kind, ce_id, Half(data, headers, time.monotonic(),
                                                           len(body)))
        events, dead = [], self._dead_of(dropped)
        if pair is not None:
            mapped, reason = pair_to_events(ce_id, pair, self.profile, self.client_header,
                                            self.source_header)
            if reason is not None:
                dead += self._dead_of([(ce_id, pair, reason)])
            events = [json.dumps(e, allow_nan=False).encode() for e in mapped]
        if events or dead:
            await self._submit(events, dead)
        return web.Response(status=200)  # the logger reports anything else as an error

    async def tick(self) -> None:
        """Expire unpaired halves; flush what lingered."""
        await self._submit([], self._dead_of(self.pairing.expire(time.monotonic())), flush=True)

    def app(self):
        from aiohttp import web

        app = web.Application(client_max_size=MAX_BODY)
        app.router.add_post("/", self.handle)
        app.router.add_post("/{tail:.*}", self.handle)
        app.router.add_get("/healthz", lambda _: web.Response(text="ok\n"))
        return app


async def serve(receiver: Receiver, host: str, port: int, *, tick_s: float = 0.2,
                stop=None) -> None:
    """Serve until ``stop`` (an asyncio.Event) is set; then flush."""
    import asyncio

    from aiohttp import web

    runner = web.AppRunner(receiver.app())
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    print(f"intake kserve: listening on http://{host}:{port}/", file=sys.stderr, flush=True)
    stop = stop or asyncio.Event()
    try:
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=tick_s)
            await receiver.tick()
    finally:
        await runner.cleanup()
        await receiver.tick()
        receiver.pool.shutdown(wait=True)
