"""``modelwatch stats`` runs once per training batch: it must not import the heavy
libraries that only building a profile or running the worker needs, and its output must
not depend on which parsing path a batch took."""

from __future__ import annotations

import json
import subprocess
import sys

import msgspec
import numpy as np
import pytest

from streams.records import parse_ts
from streams.stats import stats_event
from streams.tabular import read_table
from tests.conftest import ROOT, run_cli

#: Never needed to describe a batch: scikit-learn and scipy.stats build profiles; the
#: rest are the worker's and the progress bar's.
HEAVY = ("sklearn", "scipy", "scipy.optimize", "faust", "aiokafka", "kafka", "rich")
TS = "2026-11-21T10:00:00Z"


@pytest.fixture(scope="module")
def batch(tmp_path_factory, digits):
    """A profile made by ``modelwatch profile`` and a 2,000-row batch of digits, its cells
    written with spaces around some numbers (as spreadsheets export them)."""
    folder = tmp_path_factory.mktemp("stats-speed")
    train = folder / "train.csv"
    with open(train, "w") as out:
        out.write(",".join([*digits.names, "y"]) + "\n")
        for row, label in zip(digits.X_train, digits.y_train, strict=True):
            out.write(",".join(f"{v:g}" for v in row) + f",{label}\n")
    profile = folder / "profile.json"
    done = run_cli("profile", "--model", "digits", "--data", train, "--label-column", "y",
                   "--dataset", "digits-train", "--out", profile)
    assert done.returncode == 0, done.stderr
    rng = np.random.default_rng(0)
    X = digits.X_pool[rng.integers(0, len(digits.X_pool), 2000)] + rng.integers(0, 2, (2000, 64)) / 4
    y = rng.integers(0, 10, 2000)
    path = folder / "batch.csv"
    with open(path, "w") as out:
        out.write(",".join([*digits.names, "y"]) + "\n")
        for i, (row, label) in enumerate(zip(X, y, strict=True)):
            cells = [f" {v:g} " if (i + j) % 7 == 0 else f"{v:g}" for j, v in enumerate(row)]
            out.write(",".join(cells) + f",{label}\n")
    return profile, path, X, y


def test_stats_imports_no_heavy_library_and_describes_the_batch_exactly(batch, digits):
    profile, path, X, y = batch
    script = (
        "import json, sys\n"
        "from streams.cli import main\n"
        "out = sys.stdout\n"
        "sys.stdout = open('/dev/null', 'w')\n"
        f"code = main(['stats', '--profile', {str(profile)!r}, '--source', 's1', '--batch-id', 'b1',"
        f" '--ts', {TS!r}, {str(path)!r}])\n"
        f"heavy = sorted(m for m in sys.modules if m.startswith({HEAVY!r}))\n"
        "out.write(json.dumps({'code': code, 'heavy': heavy}))\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          cwd=ROOT, check=True)
    result = json.loads(done.stdout)
    assert result == {"code": 0, "heavy": []}

    # The CLI's event, byte for byte, is the one built from the batch parsed independently.
    done = run_cli("stats", "--profile", profile, "--source", "s1", "--batch-id", "b1",
                   "--ts", TS, path)
    assert done.returncode == 0, done.stderr
    from streams.files import load_profile

    expected = stats_event(X, y.astype(str), load_profile(profile), dataset="digits-train",
                           source="s1", batch_id="b1", ts=parse_ts(TS))
    assert done.stdout.encode() == msgspec.json.encode(expected) + b"\n"


def test_every_cell_a_number_and_cells_left_empty_read_the_same(tmp_path):
    """The one-cast path (all numbers, spaces around some) and the column-by-column path
    (an empty cell) agree on every other cell; an empty cell in a column of one-character
    values is NaN, not a bad number."""
    full = tmp_path / "full.csv"
    full.write_text("a,b,c,y\n1, 2.5 ,3e-2,x\n4,5,-6,y\n7,8, 9 ,x\n")
    holed = tmp_path / "holed.csv"
    holed.write_text("a,b,c,y\n1, 2.5 ,3e-2,x\n4,5,-6,y\n7,8,,x\n")
    X_full, y_full, names = read_table(full, "y")
    X_holed, y_holed, _ = read_table(holed, "y")
    assert names == ["a", "b", "c"]
    assert X_full.tolist() == [[1, 2.5, 0.03], [4, 5, -6], [7, 8, 9]]
    assert np.isnan(X_holed[2, 2])
    assert np.array_equal(X_full.ravel()[:-1], X_holed.ravel()[:-1])
    assert y_full.tolist() == y_holed.tolist() == ["x", "y", "x"]
    narrow = tmp_path / "narrow.csv"
    narrow.write_text("a,b,y\n1,,0\n2,3,1\n")
    X_narrow, _, _ = read_table(narrow, "y")
    assert np.isnan(X_narrow[0, 1]) and X_narrow[1].tolist() == [2, 3]
