"""Open Inference Protocol v2 (and KServe v1) request/response pairs -> inference events.

Pure functions. A pair becomes one contract inference event per row of the batch;
the reference profile says what the rows are:

* **inputs -> features**: either one tensor of shape ``[n, d]`` (``d`` = the
  profile's feature count; ``[d]`` is one row), or one tensor per feature, named
  exactly like the profile's features, each of shape ``[n]`` or ``[n, 1]``, put in
  the profile's feature order. ``data`` may be flat (row-major, as the protocol
  says) or nested.
* **outputs -> prediction, probabilities**: a tensor of shape ``[n, k]`` with
  ``k`` = the profile's class count is the class probabilities (in the profile's
  class order); a tensor of shape ``[n]`` or ``[n, 1]`` is the predicted label.
  Without a label output the prediction is the class of the largest probability.

Anything else (a shape that does not match its data, a feature count or row count
that does not fit, a BYTES feature tensor, no usable output) is a reason string,
never an exception: the caller dead-letters the original record with it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

NUMERIC = {"BOOL", "UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64",
           "FP16", "FP32", "FP64", "BF16"}
MAX_ROWS = 100_000  # one request; larger batches are rejected, not half-shipped


class Bad(ValueError):
    """A pair that cannot be mapped; the message is the dead-letter reason."""


MAX_DEPTH = 32  # nested data deeper than any tensor's shape is refused, not recursed into


def _flatten(data: Any, out: list) -> None:
    """Row-major values of flat or nested ``data`` (iterative: no recursion limit)."""
    stack = [(iter(data if isinstance(data, list | tuple) else [data]), 0)]
    while stack:
        items, depth = stack[-1]
        for item in items:
            if isinstance(item, list | tuple):
                if depth >= MAX_DEPTH:
                    raise Bad(f"data nested deeper than {MAX_DEPTH} levels")
                stack.append((iter(item), depth + 1))
                break
            out.append(item)
        else:
            stack.pop()


def _tensor(t: Any, where: str) -> tuple[str, list[int], str, list]:
    """(name, shape, datatype, flat data) of one tensor, checked against its shape."""
    if not isinstance(t, Mapping):
        raise Bad(f"{where}: not a tensor object")
    name, shape, datatype = t.get("name"), t.get("shape"), t.get("datatype")
    if not isinstance(name, str):
        raise Bad(f"{where}: no tensor name")
    where = f"{where} {name!r}"
    if not isinstance(shape, list) or not shape or not all(
            isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in shape):
        raise Bad(f"{where}: shape must be a non-empty list of sizes, got {shape!r}")
    if "data" not in t:
        raise Bad(f"{where}: no data (binary tensor data is not supported)")
    flat: list = []
    try:
        _flatten(t["data"], flat)
    except Bad as exc:
        raise Bad(f"{where}: {exc}") from None
    size = math.prod(shape)
    if len(flat) != size:
        raise Bad(f"{where}: shape {shape} needs {size} values, data has {len(flat)}")
    return name, shape, str(datatype or "").upper(), flat


def _numbers(flat: list, where: str) -> list[float]:
    out = []
    for v in flat:
        try:  # bool is an int (BOOL tensors); ints beyond a double overflow
            number = float(v) if isinstance(v, int | float) else math.nan
        except OverflowError:
            number = math.nan
        if not math.isfinite(number):
            raise Bad(f"{where}: not a finite number: {str(v)[:40]!r}")
        out.append(number)
    return out


def _rows_of(shape: list[int]) -> int:
    return shape[0] if len(shape) >= 1 else 1


def feature_rows(inputs: Any, feature_names: Sequence[str]) -> list[list[float]]:
    """The feature vectors of an OIP request's ``inputs`` (see the module docstring)."""
    if not isinstance(inputs, list) or not inputs:
        raise Bad("request: inputs must be a non-empty list of tensors")
    d = len(feature_names)
    tensors = [_tensor(t, f"input {i}") for i, t in enumerate(inputs)]
    names = [t[0] for t in tensors]
    if len(tensors) > 1 or (d == 1 and names[0] == feature_names[0]):
        by_name = {t[0]: t for t in tensors}
        missing = [f for f in feature_names if f not in by_name]
        if missing:
            raise Bad(f"request: {len(tensors)} input tensors {names[:5]} are not one per "
                      f"profile feature; missing {missing[:5]}")
        columns, n = [], None
        for f in feature_names:
            name, shape, datatype, flat = by_name[f]
            if datatype not in NUMERIC:
                raise Bad(f"input {name!r}: datatype {datatype or 'missing'} is not numeric")
            if len(shape) > 2 or (len(shape) == 2 and shape[1] != 1):
                raise Bad(f"input {name!r}: shape {shape} is not [n] or [n, 1]")
            if n is not None and shape[0] != n:
                raise Bad(f"input {name!r}: {shape[0]} rows, other inputs have {n}")
            n = shape[0]
            columns.append(_numbers(flat, f"input {name!r}"))
        return [list(row) for row in zip(*columns, strict=True)]
    name, shape, datatype, flat = tensors[0]
    if datatype not in NUMERIC:
        raise Bad(f"input {name!r}: datatype {datatype or 'missing'} is not numeric")
    if len(shape) == 1:
        shape = [1, shape[0]]
    if len(shape) != 2:
        raise Bad(f"input {name!r}: shape {shape} is not [n, {d}]")
    if shape[1] != d:
        raise Bad(f"input {name!r}: shape {shape} has {shape[1]} features, the profile {d}")
    values = _numbers(flat, f"input {name!r}")
    return [values[i * d:(i + 1) * d] for i in range(shape[0])]


def _label(v: Any, classes: Sequence[str]) -> str | int:
    if isinstance(v, bool):
        v = int(v)
    if isinstance(v, float) and v.is_integer():
        v = int(v)
    if isinstance(v, int):
        return v
    if isinstance(v, str):
        return v
    raise Bad(f"output: label {v!r:.40} is neither a string nor an integer")


def class_label(index: int, classes: Sequence[str]) -> str | int:
    """The profile's class at ``index``, as an integer when it is one (like labels served)."""
    c = classes[index]
    try:
        return int(c) if str(int(c)) == c else c
    except ValueError:
        return c


def predictions(outputs: Any, n: int, classes: Sequence[str]
                ) -> tuple[list[str | int], list[list[float]] | None]:
    """(prediction per row, probabilities per row or None) of an OIP response's outputs."""
    if not isinstance(outputs, list) or not outputs:
        raise Bad("response: outputs must be a non-empty list of tensors")
    k = len(classes)
    labels = probs = None
    for i, t in enumerate(outputs):
        name, shape, datatype, flat = _tensor(t, f"output {i}")
        if _rows_of(shape) != n and not (len(shape) == 1 and n == 1 and shape[0] == k):
            continue
        if len(shape) == 1 and n == 1 and shape[0] == k and k > 1 and probs is None:
            probs = [_numbers(flat, f"output {name!r}")]
        elif len(shape) == 2 and shape[1] == k and k > 1 and probs is None \
                and datatype in NUMERIC:
            values = _numbers(flat, f"output {name!r}")
            probs = [values[r * k:(r + 1) * k] for r in range(n)]
        elif (len(shape) == 1 or (len(shape) == 2 and shape[1] == 1)) and labels is None:
            labels = [_label(v, classes) for v in flat]
    if labels is None and probs is None:
        raise Bad(f"response: no output of shape [{n}] (labels) or [{n}, {k}] "
                  f"(probabilities of the profile's {k} classes)")
    if labels is None:
        labels = [class_label(max(range(k), key=row.__getitem__), classes) for row in probs]
    return labels, probs


def _events(rows, labels, probs, *, model, ts, client_id, request_id, model_version,
            source_ip) -> list[dict]:
    n = len(rows)
    events = []
    for r in range(n):
        event: dict = {"ts": ts, "model": model, "client_id": client_id,
                       "features": rows[r], "prediction": labels[r]}
        if probs is not None:
            event["probabilities"] = probs[r]
        if request_id:
            event["request_id"] = request_id if n == 1 else f"{request_id}#{r}"
        if model_version:
            event["model_version"] = model_version
        if source_ip:
            event["source_ip"] = source_ip
        events.append(event)
    return events


def _check_rows(rows: list, what: str) -> None:
    if not rows:
        raise Bad(f"{what}: no rows")
    if len(rows) > MAX_ROWS:
        raise Bad(f"{what}: {len(rows)} rows, more than {MAX_ROWS}")


def oip_events(request: Any, response: Any, profile, *, ts, client_id: str,
               request_id: str | None = None, source_ip: str | None = None
               ) -> tuple[list[dict], str | None]:
    """Events of one OIP v2 request/response pair, or ``([], reason)``.

    ``model`` is the profile's (the profile is what says how to read the tensors);
    ``request_id`` is the one given (KServe: the CloudEvent id), else the request's
    ``id``, else the response's, with ``#row``
    for rows of a batch; ``model_version`` is the response's.
    """
    try:
        if not isinstance(request, Mapping) or not isinstance(response, Mapping):
            raise Bad("request and response must be JSON objects")
        if "error" in response and "outputs" not in response:
            raise Bad(f"response is an error: {str(response['error'])[:200]}")
        rows = feature_rows(request.get("inputs"), profile.feature_names)
        _check_rows(rows, "request")
        labels, probs = predictions(response.get("outputs"), len(rows), profile.classes)
        rid = request_id or request.get("id") or response.get("id")
        version = response.get("model_version")
        return _events(rows, labels, probs, model=profile.model, ts=ts, client_id=client_id,
                       request_id=str(rid) if rid else None,
                       model_version=str(version) if version else None,
                       source_ip=source_ip), None
    except Bad as exc:
        return [], str(exc)


def v1_events(request: Any, response: Any, profile, *, ts, client_id: str,
              request_id: str | None = None, source_ip: str | None = None
              ) -> tuple[list[dict], str | None]:
    """Events of one KServe v1 pair (``{"instances": [...]}`` / ``{"predictions": [...]}``).

    Each instance is a feature vector in the profile's order (or an object keyed by
    the profile's feature names); each prediction is a label, or a list of the
    profile's class probabilities.
    """
    try:
        if not isinstance(request, Mapping) or not isinstance(response, Mapping):
            raise Bad("request and response must be JSON objects")
        instances, preds = request.get("instances"), response.get("predictions")
        if not isinstance(instances, list) or not isinstance(preds, list):
            raise Bad("v1: request needs an instances list, response a predictions list")
        d, k, names = len(profile.feature_names), len(profile.classes), profile.feature_names
        rows = []
        for i, inst in enumerate(instances):
            if isinstance(inst, Mapping):
                missing = [f for f in names if f not in inst]
                if missing:
                    raise Bad(f"instance {i}: missing features {missing[:5]}")
                inst = [inst[f] for f in names]
            if not isinstance(inst, list) or len(inst) != d:
                raise Bad(f"instance {i}: not a list of the profile's {d} features")
            rows.append(_numbers(inst, f"instance {i}"))
        _check_rows(rows, "request")
        if len(preds) != len(rows):
            raise Bad(f"v1: {len(rows)} instances but {len(preds)} predictions")
        labels, probs = [], []
        for i, p in enumerate(preds):
            if isinstance(p, list):
                if len(p) != k:
                    raise Bad(f"prediction {i}: {len(p)} probabilities, the profile has {k} classes")
                row = _numbers(p, f"prediction {i}")
                probs.append(row)
                labels.append(class_label(max(range(k), key=row.__getitem__), profile.classes))
            else:
                labels.append(_label(p, profile.classes))
        if probs and len(probs) != len(rows):
            raise Bad("v1: predictions mix labels and probability lists")
        return _events(rows, labels, probs or None, model=profile.model, ts=ts,
                       client_id=client_id, request_id=request_id, model_version=None,
                       source_ip=source_ip), None
    except Bad as exc:
        return [], str(exc)


def pair_events(request: Any, response: Any, profile, **context) -> tuple[list[dict], str | None]:
    """OIP v2 or KServe v1, whichever the request is."""
    if isinstance(request, Mapping) and "inputs" in request:
        return oip_events(request, response, profile, **context)
    if isinstance(request, Mapping) and "instances" in request:
        return v1_events(request, response, profile, **context)
    return [], "request is neither OIP v2 (inputs) nor KServe v1 (instances)"


def lookup(doc: Mapping, path: str) -> Any:
    """``doc``'s value at a dotted path; keys match case-insensitively (HTTP headers)."""
    node: Any = doc
    for part in path.split("."):
        if not isinstance(node, Mapping):
            return None
        if part in node:
            node = node[part]
            continue
        lowered = part.lower()
        node = next((v for key, v in node.items() if str(key).lower() == lowered), None)
    return node


def log_line_events(line: Any, profile, *, client_field: str = "client_id"
                    ) -> tuple[list[dict], str | None]:
    """Events of one ``tail --format oip`` line (a JSON object; see ``streams.cli.tail``)."""
    if not isinstance(line, Mapping):
        return [], "oip line: not a JSON object"
    ts = line.get("ts")
    if not isinstance(ts, str | int | float) or isinstance(ts, bool):
        return [], "oip line: ts missing (RFC 3339 string or epoch seconds)"
    client = lookup(line, client_field)
    if not isinstance(client, str | int) or isinstance(client, bool) or not str(client):
        return [], f"oip line: client id ({client_field}) missing"
    if "request" not in line or "response" not in line:
        return [], "oip line: needs both request and response"
    source_ip = line.get("source_ip")
    return pair_events(line["request"], line["response"], profile, ts=ts,
                       client_id=str(client), request_id=line.get("request_id"),
                       source_ip=source_ip if isinstance(source_ip, str) else None)
