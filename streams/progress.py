"""Progress bars on a terminal, silence in a pipe."""

from __future__ import annotations

import contextlib
import io
import os
import sys
from pathlib import Path


def interactive() -> bool:
    return sys.stderr.isatty() and os.environ.get("TERM") != "dumb"


@contextlib.contextmanager
def tracked_open(path: Path, label: str, mode: str = "r"):
    """Open a file; on a terminal, show how much of it has been read."""
    handle = open(path, mode, newline="") if "b" not in mode else open(path, mode)  # noqa: SIM115
    if not interactive():
        try:
            yield handle
        finally:
            handle.close()
        return
    from rich.progress import Progress

    size = os.path.getsize(path)
    with Progress(transient=True) as progress, handle:
        task = progress.add_task(label, total=size)
        yield _Reporting(handle, lambda: progress.update(task, completed=handle.buffer.tell()
                                                         if hasattr(handle, "buffer") else handle.tell()))


class _Reporting(io.IOBase):
    """Iterates lines of a file and reports the position every few thousand lines."""

    def __init__(self, handle, report):
        self._handle, self._report, self._lines = handle, report, 0

    def __iter__(self):
        for line in self._handle:
            self._lines += 1
            if self._lines % 4096 == 0:
                self._report()
            yield line

    def read(self, *args):
        return self._handle.read(*args)

    def readline(self, *args):
        return self._handle.readline(*args)
