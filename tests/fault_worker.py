"""``python -m tests.fault_worker worker …``: the worker, with a pipeline that fails on
the events of client ``fail-here`` — the fault an agent must stop the worker on."""

from __future__ import annotations

import sys

from streams import pipeline
from streams.cli import main

FAILING_CLIENT = "fail-here"
_judge = pipeline.Pipeline.process_inference


def _failing(self, events, *args, **kwargs):
    if any(e.client_id == FAILING_CLIENT for e in events):
        raise RuntimeError("injected failure")
    return _judge(self, events, *args, **kwargs)


pipeline.Pipeline.process_inference = _failing

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
