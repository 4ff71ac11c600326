"""``replay`` on hostile files: bad lines never crash it and never change what the
valid ones give, wherever they sit (also across its reorder buffer's cuts)."""

from __future__ import annotations

import json
import random

import msgspec

from detectors.config import load_thresholds
from streams import replay as replay_module
from streams.files import load_profile
from streams.replay import replay
from tests.test_records import HOSTILE


def _docs(alerts) -> list[dict]:
    docs = [msgspec.to_builtins(a) for a in alerts]
    for d in docs:
        del d["event"]["created"]
    return sorted(docs, key=lambda d: d["event"]["id"])


def test_bad_lines_anywhere_leave_the_alerts_and_late_events_alone(demo, tmp_path, monkeypatch):
    _, paths = demo
    monkeypatch.setattr(replay_module, "CHUNK", 400)  # many reorder-buffer cuts
    lines = paths["inference.jsonl"].read_bytes().splitlines()
    rng = random.Random(5)
    for _ in range(40):  # some events far out of their place: judged late
        i, j = rng.randrange(len(lines)), rng.randrange(len(lines))
        lines.insert(j, lines.pop(i))
    clean = tmp_path / "clean.jsonl"
    clean.write_bytes(b"\n".join(lines) + b"\n")
    hostile = [v for v in HOSTILE.values() if v and b"\n" not in v and len(v) < 100_000]
    dirty = tmp_path / "dirty.jsonl"
    with open(dirty, "wb") as out:
        for line in lines:
            out.write(line + b"\n")
            for _ in range(rng.choice((0, 0, 1, 3))):
                out.write(rng.choice(hostile) + b"\n")
    profiles, thresholds = [load_profile(paths["profile"])], load_thresholds()
    a = replay(profiles, thresholds, inference_log=clean, training_stats=paths["stats"],
               deadletter=None)
    b = replay(profiles, thresholds, inference_log=dirty, training_stats=paths["stats"],
               deadletter=tmp_path / "dead.jsonl")
    assert a.late > 0 and (b.events, b.late) == (a.events, a.late)
    assert b.rejected > len(lines) // 2
    assert _docs(b.alerts) == _docs(a.alerts)
    dead = [json.loads(line) for line in (tmp_path / "dead.jsonl").read_bytes().splitlines()]
    assert len(dead) == b.rejected and all(d["reason"] for d in dead)
