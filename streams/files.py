"""Files modelwatch reads and writes: profiles, JSON lines, the dead-letter file."""

from __future__ import annotations

import json
from pathlib import Path

import msgspec

from detectors.profile import Profile, ProfileError
from streams.tabular import UserError


def load_profile(path: str | Path) -> Profile:
    path = Path(path)
    try:
        doc = json.loads(path.read_bytes())
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


def write_profile(profile: Profile, path: str | Path) -> None:
    try:
        Path(path).write_text(json.dumps(profile.to_dict()) + "\n")
    except OSError as exc:
        raise UserError(f"{path}: cannot write: {exc.strerror}") from None


class DeadLetters:
    """Bad records, one JSON line each: where it came from, why, and the record itself."""

    def __init__(self, path: str | Path | None):
        self.path = path
        self.count = 0
        self._handle = None
        if path is not None:
            try:
                self._handle = open(path, "wb")  # noqa: SIM115 - closed in close()
            except OSError as exc:
                raise UserError(f"{path}: cannot write dead letters: {exc.strerror}") from None

    def add(self, source: str, line: int, reason: str, raw: bytes) -> None:
        self.count += 1
        if self._handle is not None:
            record = raw.decode("utf-8", errors="replace").rstrip("\r\n")
            self._handle.write(msgspec.json.encode(
                {"file": source, "line": line, "reason": reason, "record": record}) + b"\n")

    def close(self) -> None:
        if self._handle is not None:
            self._handle.close()
