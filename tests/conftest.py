"""Shared fixtures: a digits model and its profile, and an event factory."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from sklearn.datasets import load_digits
from sklearn.linear_model import LogisticRegression

from detectors.profile import build_profile
from streams.records import format_ts

ROOT = Path(__file__).resolve().parents[1]
#: The project's fixed contract; CI always has shared/ beside the clone.
SHARED_CONTRACT = ROOT.parent / "shared" / "spec" / "contract.md"


def need(path: Path | None, what: str) -> Path:
    """``path``, or skip the test where it cannot run here; under CI a missing tool or
    file fails instead, so no test is ever put aside there."""
    if path is None or not Path(path).exists():
        message = f"{what} is not on this machine"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return Path(path)


def need_tool(*names: str, package: str) -> str:
    """The first of these commands on PATH (see :func:`need`)."""
    found = next((shutil.which(n) for n in names if shutil.which(n)), None)
    return str(need(found and Path(found), f"{names[0]} (apt-get install -y {package})"))
T0 = 1_790_000_000.0


class Digits:
    def __init__(self):
        data = load_digits()
        X, y = data.data, data.target
        rng = np.random.default_rng(0)
        order = rng.permutation(len(X))
        self.X_train, self.y_train = X[order[:1100]], y[order[:1100]]
        self.X_pool = X[order[1100:]]
        self.names = [f"px{i}" for i in range(64)]
        self.model = LogisticRegression(max_iter=2000).fit(self.X_train, self.y_train)
        self.profile = build_profile(self.X_train, self.y_train, self.names, model="digits",
                                     dataset="digits-train")

    def events(self, client: str, X: np.ndarray, t0: float = T0, gap: float = 1.0,
               ip: str | None = None) -> list[dict]:
        proba = self.model.predict_proba(X)
        return [{"ts": format_ts(t0 + i * gap), "model": "digits", "client_id": client,
                 "features": X[i].tolist(), "prediction": int(proba[i].argmax()),
                 "probabilities": np.round(proba[i], 4).tolist(),
                 "request_id": f"{client}-{i}", "source_ip": ip or f"203.0.113.{hash(client) % 250}"}
                for i in range(len(X))]


@pytest.fixture(scope="session")
def digits() -> Digits:
    return Digits()


def write_jsonl(path: Path, records) -> Path:
    with open(path, "w") as out:
        for r in records:
            out.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
    return path


def run_cli(*args, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "streams.cli", *map(str, args)],
                          capture_output=True, text=True, input=stdin, cwd=ROOT)


@pytest.fixture(scope="session")
def demo(tmp_path_factory):
    """The built-in demo scenario: (folder with profiles/, paths of its files)."""
    from streams.demo.play import prepare

    folder = tmp_path_factory.mktemp("demo")
    paths = prepare(folder)
    (folder / "profiles").mkdir()
    (folder / "profiles" / "digits.json").write_bytes(paths["profile"].read_bytes())
    return folder, paths


@pytest.fixture(scope="module")
def victim():
    """The scenario's digits victim (an MLP) with its pools: attack code's target."""
    from streams.demo import scenario

    return scenario.load_victim("digits", seed=0)


@pytest.fixture(scope="module")
def profile(victim):
    return build_profile(victim.X_train, victim.y_train, victim.feature_names,
                         model=victim.model_name, dataset="digits")


@pytest.fixture(scope="module")
def expected(demo):
    """What replay makes of the demo, judged as on the test topic's partitions: the
    worker tests' reference."""
    from detectors.config import load_thresholds
    from streams.files import load_profile
    from streams.replay import replay
    from tests.streaming import PARTITIONS

    _, paths = demo
    return replay([load_profile(paths["profile"])], load_thresholds(),
                  inference_log=paths["inference.jsonl"], training_stats=paths["stats"],
                  deadletter=None, partitions=PARTITIONS)
