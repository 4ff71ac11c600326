"""detectors/ is pure: numpy, scipy and scikit-learn only, no I/O or plumbing."""

from __future__ import annotations

import ast

from tests.conftest import ROOT

ALLOWED = {"numpy", "scipy", "sklearn", "detectors", "__future__", "dataclasses", "functools",
           "typing", "types", "tomllib", "importlib", "json", "struct", "collections", "math",
           "warnings"}


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


#: streams/ in layers: a module imports only from lower ones, or within its own package.
LAYERS = {"cli": 3, "worker": 2, "demo": 2, "report": 2}  # the rest (1) is shared


def _imported(tree: ast.AST) -> list[str]:
    names = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module == "streams":
            names += [f"streams.{a.name}" for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            names.append(node.module)
    return [n for n in names if n.startswith("streams.")]


def test_streams_imports_flow_one_way():
    """cli -> worker / demo / report -> the shared modules (-> detectors)."""
    offenders = []
    for path in sorted((ROOT / "streams").rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        package = parts[1] if len(parts) > 2 else None
        own = LAYERS.get(package, 1)
        for name in _imported(ast.parse(path.read_text())):
            target = name.split(".")[1]
            layer = LAYERS.get(target, 1)
            if target != package and (layer > own or layer == own > 1):
                offenders.append(f"{'/'.join(parts)}: {name}")
    assert offenders == []
