"""detectors/ is pure: numpy, scipy and scikit-learn only, no I/O or plumbing."""

from __future__ import annotations

import ast

from tests.conftest import ROOT

ALLOWED = {"numpy", "scipy", "sklearn", "detectors", "__future__", "dataclasses", "functools",
           "typing", "types", "tomllib", "importlib", "json", "struct", "collections", "math"}


def test_detectors_import_nothing_but_numerics():
    offenders = []
    for path in sorted((ROOT / "detectors").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module]
            offenders += [f"{path.name}: {n}" for n in names if n.split(".")[0] not in ALLOWED]
    assert offenders == []
