"""``modelwatch tail``: follow an inference log and ship it to Kafka.

Follows the file the way ``tail -F`` does (growing, rotated, truncated; ``-``
for standard input). Valid lines are grouped by the partition that Kafka's
default partitioner gives each event's ``client_id`` and sent as JSON arrays
with that explicit partition (contract v1, batched records), flushed by size or
after a short linger, with acks=all. The file position is checkpointed only
after the broker acknowledged everything before it, so a restart neither loses
lines nor re-sends acknowledged ones. Bad lines go to the dead-letter topic with
the reason, file and line in headers. While the broker is down, sending is
retried with backoff and no further lines are read, so memory stays bounded.
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import msgspec

from streams.records import partition_of, screen
from streams.settings import Settings
from streams.tabular import UserError
from streams.worker.kafka import client_options, refused


@dataclass
class Checkpoint:
    """Where shipping stopped: file identity, byte offset, line number (atomic writes)."""

    path: Path | None
    inode: int = -1
    offset: int = 0
    line: int = 0

    def load(self) -> Checkpoint:
        if self.path is not None and self.path.exists():
            try:
                saved = json.loads(self.path.read_text())
                self.inode, self.offset, self.line = saved["inode"], saved["offset"], saved["line"]
            except (ValueError, KeyError, TypeError):
                raise UserError(f"{self.path}: not a tail checkpoint; remove it to start over") from None
        return self

    def save(self, inode: int, offset: int, line: int) -> None:
        self.inode, self.offset, self.line = inode, offset, line
        if self.path is None:
            return
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"inode": inode, "offset": offset, "line": line}))
        os.replace(tmp, self.path)


@dataclass
class Shipper:
    """Batches valid events per partition; sends and waits for acknowledgement."""

    settings: Settings
    batch_events: int = 500
    linger_s: float = 0.2
    max_backoff_s: float = 30.0
    pending: dict = field(default_factory=dict)   # partition -> [event bytes]
    dead: list = field(default_factory=list)      # (raw, headers)
    count: int = 0
    first_at: float = 0.0
    shipped: int = 0
    rejected: int = 0
    # Turns one line into contract events (JSON bytes each), or gives the reason it cannot
    # (``tail --format oip``: see :func:`oip_converter`); None ships lines as written.
    convert: object = None

    def __post_init__(self):
        from kafka import KafkaProducer
        from kafka.errors import KafkaError

        backoff = 0.5
        while True:  # a shipper started before its broker waits for it
            try:
                # Idempotent (kafka-python's default with acks=all and its own retries):
                # a batch retried across a broker restart is stored once.
                self.producer = KafkaProducer(acks="all", linger_ms=5,
                                              **client_options(self.settings))
                partitions = self.producer.partitions_for(self.settings.topic_inference)
                break
            except KafkaError as exc:
                if (why := refused(self.settings, exc)) is not None:
                    raise why from None
                print(f"tail: broker {self.settings.broker} unavailable ({type(exc).__name__}); "
                      f"retrying in {backoff:.1f} s", file=sys.stderr)
                time.sleep(backoff)
                backoff = min(backoff * 2, self.max_backoff_s)
        if not partitions:
            raise UserError(f"{self.settings.topic_inference}: topic has no partitions")
        self.partitions = len(partitions)

    def add(self, raw: bytes, source: str, line: int) -> None:
        if self.convert is None:
            return self._add(raw, source, line)
        events, reason = self.convert(raw)
        if reason is not None:
            return self._dead(raw, reason, source, line)
        for event in events:  # one record each: a large batch is not one oversized array
            self._add(event, source, line)
        return None

    def _add(self, raw: bytes, source: str, line: int) -> None:
        result = screen([(raw, line)])
        for _, reason, original in result.rejected:
            self._dead(original, reason, source, line)
        for record in result.events:
            # A single event line ships as written; elements of an array line one by one.
            single = raw.lstrip()[:1] == b"{"
            body = raw.strip() if single else msgspec.json.encode(record)
            self.pending.setdefault(partition_of(record.client_id, self.partitions), []).append(body)
            if not self.count:
                self.first_at = time.monotonic()
            self.count += 1

    def _dead(self, raw: bytes, reason: str, source: str, line: int) -> None:
        self.rejected += 1
        self.dead.append((raw.rstrip(b"\r\n"), [("reason", reason.encode()),
                                               ("file", source.encode()),
                                               ("line", str(line).encode())]))

    def due(self) -> bool:
        return self.count >= self.batch_events or bool(self.dead) or (
            self.count > 0 and time.monotonic() - self.first_at >= self.linger_s)

    def flush(self) -> None:
        """Send everything pending; returns once the broker acknowledged all of it.

        The producer retries a send itself, with the sequence numbers of its first try,
        so a broker that stored a batch but went down before acknowledging it does not
        store it twice; only what it gave up on (after ``delivery_timeout_ms``) is sent
        again, and what was acknowledged is not.
        """
        from kafka.errors import KafkaError

        backoff = 0.5
        while self.pending or self.dead:
            sent = [(p, self.producer.send(self.settings.topic_inference, partition=p,
                                           value=b"[" + b",".join(events) + b"]"))
                    for p, events in self.pending.items()]
            dead = [(item, self.producer.send(self.settings.topic_deadletter, value=item[0],
                                              headers=item[1])) for item in self.dead]
            failed = None
            for p, future in sent:
                try:
                    future.get()
                except KafkaError as exc:
                    failed = exc
                    continue
                events = self.pending.pop(p)
                self.shipped += len(events)
                self.count -= len(events)
            for item, future in dead:
                try:
                    future.get()
                except KafkaError as exc:
                    failed = exc
                    continue
                self.dead.remove(item)
            if failed is not None:
                print(f"tail: broker unavailable ({type(failed).__name__}); retrying in "
                      f"{backoff:.1f} s", file=sys.stderr)
                time.sleep(backoff)
                backoff = min(backoff * 2, self.max_backoff_s)

    def close(self) -> None:
        self.producer.close()


def follow(path: str, shipper: Shipper, checkpoint: Checkpoint, *, once: bool,
           poll_s: float = 0.2) -> None:
    """Ship complete lines of ``path`` from the checkpoint on; with ``once``, stop at its end.

    A checkpoint of another file (the log was rotated while tail was stopped)
    starts the current file from its beginning; the rest of the old file is not
    shipped. Like ``tail -F``, a file that is not there yet is waited for (with
    ``once``, it is an error).
    """
    if path == "-":
        return _ship_stdin(shipper)
    checkpoint.load()
    if not once:
        _wait_for(path, poll_s)
    handle, inode = _open(path)
    if inode == checkpoint.inode:
        handle.seek(checkpoint.offset)
        offset, line = checkpoint.offset, checkpoint.line
    else:
        offset, line = 0, 0
    try:
        while True:
            raw = handle.readline()
            if raw.endswith(b"\n"):
                line += 1
                offset += len(raw)
                if raw.strip():
                    shipper.add(raw, path, line)
                if shipper.due():
                    shipper.flush()
                    checkpoint.save(inode, offset, line)
                continue
            handle.seek(offset)  # a partial last line waits for its newline
            shipper.flush()
            checkpoint.save(inode, offset, line)
            if once:
                return
            time.sleep(poll_s)
            try:
                now = os.stat(path)
            except FileNotFoundError:
                continue  # rotated away; the new file has not appeared yet
            if now.st_ino != inode:  # rotated: the old file was read to its end above
                handle.close()
                handle, inode = _open(path)
                offset, line = 0, 0
            elif now.st_size < offset:  # truncated in place
                handle.seek(0)
                offset, line = 0, 0
    finally:
        shipper.flush()
        checkpoint.save(inode, offset, line)
        handle.close()


def _wait_for(path: str, poll_s: float) -> None:
    """Until ``path`` exists; says so once on stderr."""
    if os.path.exists(path):
        return
    print(f"tail: {path}: no such file yet; waiting for it to appear", file=sys.stderr,
          flush=True)
    while not os.path.exists(path):
        time.sleep(poll_s)
    print(f"tail: {path}: appeared; shipping it", file=sys.stderr, flush=True)


def _open(path: str):
    try:
        handle = open(path, "rb")  # noqa: SIM115 - closed by follow()
    except OSError as exc:
        raise UserError(f"{path}: cannot read: {exc.strerror}") from None
    return handle, os.fstat(handle.fileno()).st_ino


def _ship_stdin(shipper: Shipper) -> None:
    for line, raw in enumerate(sys.stdin.buffer, start=1):
        if raw.strip():
            shipper.add(raw, "-", line)
        if shipper.due():
            shipper.flush()
    shipper.flush()


def oip_converter(profile, client_field: str = "client_id"):
    """``tail --format oip``: each line is one JSON object holding a served pair::

        {"ts": "2026-11-21T10:00:00Z", "client_id": "key-7f3a", "source_ip": "203.0.113.7",
         "request": {"id": "r1", "inputs": [...]}, "response": {"model_name": ..., "outputs": [...]}}

    ``request``/``response`` are Open Inference Protocol v2 bodies (or KServe v1
    ``{"instances": ...}``/``{"predictions": ...}``); an optional ``request_id``
    overrides the bodies' ``id``;
    the client id is read at ``client_field``, a dotted path (``headers.x-api-key``:
    keys match case-insensitively). Rows of a batched request become events of their
    own (see :mod:`streams.intake.oip`).
    """
    from streams.intake.oip import log_line_events

    def convert(raw: bytes):
        try:
            doc = json.loads(raw)
        except (ValueError, RecursionError) as exc:
            return None, f"oip line: not JSON: {str(exc)[:200]}"
        events, reason = log_line_events(doc, profile, client_field=client_field)
        if reason is not None:
            return None, reason
        return [json.dumps(e, allow_nan=False).encode() for e in events], None

    return convert
