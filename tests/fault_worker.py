"""``python -m tests.fault_worker worker …``: the worker, with a pipeline that fails on
the events of client ``fail-here`` — the fault an agent must stop the worker on."""

from __future__ import annotations

import sys

FAILING_CLIENT = "fail-here"


def _patch() -> None:
    from streams import pipeline

    judge = pipeline.Pipeline.process_inference

    def failing(self, events, *args, **kwargs):
        if any(e.client_id == FAILING_CLIENT for e in events):
            raise RuntimeError("injected failure")
        return judge(self, events, *args, **kwargs)

    pipeline.Pipeline.process_inference = failing


if __name__ == "__main__":  # imported by pytest's doctest collection too: patch nothing then
    from streams.cli import main

    _patch()
    sys.exit(main(sys.argv[1:]))
