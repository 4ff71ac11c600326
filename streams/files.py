"""Files modelwatch reads and writes: profiles, JSON lines, the dead-letter file."""

from __future__ import annotations

import json
import shutil
import tempfile
import typing
from pathlib import Path

import msgspec

from detectors.config import Thresholds, load_thresholds
from detectors.profile import Profile, ProfileError
from streams.tabular import UserError


def load_profile(path: str | Path) -> Profile:
    path = Path(path)
    try:
        doc = _json_document(path.read_bytes())
    except OSError as exc:
        raise UserError(f"{path}: cannot read profile: {exc.strerror}") from None
    except ValueError as exc:
        raise UserError(f"{path}: profile is not valid JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise UserError(f"{path}: profile must be a JSON object")
    try:
        return Profile.from_dict(doc)
    except ProfileError as exc:
        raise UserError(f"{path}: not a modelwatch profile: {exc}") from None


def _json_document(blob: bytes):
    """msgspec parses a profile ~3x faster; ``json`` reads what it refuses (NaN, which
    ``json.dumps`` may write) and words the error."""
    try:
        return msgspec.json.decode(blob)
    except msgspec.DecodeError:
        return json.loads(blob)


def read_thresholds(path: str | Path | None) -> Thresholds:
    """Built-in thresholds, overridden by the TOML file at ``path`` if given."""
    if path is None:
        return load_thresholds()
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise UserError(f"{path}: cannot read thresholds: {exc.strerror}") from None
    return load_thresholds(text, str(path))


def write_profile(profile: Profile, path: str | Path) -> None:
    try:
        Path(path).write_text(json.dumps(profile.to_dict()) + "\n")
    except OSError as exc:
        raise UserError(f"{path}: cannot write: {exc.strerror}") from None


class DeadLetters:
    """Bad records, one JSON line each: where it came from, why, and the record itself.

    Written in file and line order. Some checks run in bulk, after the line they
    concern has been read, so letters are held until :meth:`spill` (the caller's
    promise that no later letter comes from an earlier line of the same file), then
    go to a temporary file per source: memory stays bounded by what is held.
    """

    def __init__(self, path: str | Path | None):
        self.path = path
        self.count = 0
        self._held: list[tuple[str, int, str, bytes]] = []
        self._spools: dict[str, typing.IO[bytes]] = {}
        if path is not None:
            try:
                Path(path).touch()
            except OSError as exc:
                raise UserError(f"{path}: cannot write dead letters: {exc.strerror}") from None

    def add(self, source: str, line: int, reason: str, raw: bytes) -> None:
        self.count += 1
        if self.path is not None:
            self._held.append((source, line, reason, raw))

    def spill(self) -> None:
        """Write the held letters out, in line order per source."""
        self._held.sort(key=lambda letter: (letter[0], letter[1]))
        for source, line, reason, raw in self._held:
            spool = self._spools.get(source)
            if spool is None:
                spool = self._spools[source] = tempfile.TemporaryFile()  # noqa: SIM115 - closed by close()
            record = raw.decode("utf-8", errors="replace").rstrip("\r\n")
            spool.write(msgspec.json.encode(
                {"file": source, "line": line, "reason": reason, "record": record}) + b"\n")
        self._held.clear()

    def close(self) -> None:
        if self.path is None:
            return
        self.spill()
        with open(self.path, "wb") as out:
            for source in sorted(self._spools):
                spool = self._spools.pop(source)
                spool.seek(0)
                shutil.copyfileobj(spool, out)
                spool.close()
