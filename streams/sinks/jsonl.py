"""JSON lines appended to a local file: ``file:///abs/path.jsonl[?format=ecs|ocsf]``."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import msgspec

from streams.sinks.base import Sink, SinkURL
from streams.sinks.formats import JSON_FORMATS


class JSONLSink(Sink):
    name = "file"
    options = ("format",)

    def __init__(self, path: Path, *, format: str = "ecs"):
        self.path = path
        self.format = format
        self._file = None

    @classmethod
    def from_url(cls, url: SinkURL) -> JSONLSink:
        if url.host not in ("", "localhost") or not url.path.startswith("/"):
            raise url.error("needs an absolute path: file:///abs/path.jsonl")
        path = Path(url.path)
        if not path.parent.is_dir():
            raise url.error(f"{path.parent}: no such folder")
        if path.is_dir():
            raise url.error(f"{path}: is a folder")
        if not os.access(path if path.exists() else path.parent, os.W_OK):
            raise url.error(f"{path}: not writable")
        return cls(path, format=url.choice("format", tuple(JSON_FORMATS), "ecs"))

    def _append(self, lines: bytes) -> None:
        if self._file is None:
            self._file = open(self.path, "ab")  # noqa: SIM115 - kept open across sends
        self._file.write(lines)
        self._file.flush()

    async def send(self, alerts: list[dict]) -> None:
        shape = JSON_FORMATS[self.format]
        lines = b"".join(msgspec.json.encode(shape(alert)) + b"\n" for alert in alerts)
        try:
            await asyncio.to_thread(self._append, lines)  # a slow disk must not stall the loop
        except OSError:
            await self.close()  # reopen next time: the file may have been rotated away
            raise

    async def close(self) -> None:
        if self._file is not None:
            self._file.close()
        self._file = None
