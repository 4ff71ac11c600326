"""Training data from CSV (header row; one label column), with exact error places."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from streams.progress import tracked_open


class UserError(Exception):
    """A user mistake: printed as one line naming file, line and field; exit 2."""


def read_table(path: str | Path, label_column: str,
               feature_names: list[str] | None = None) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Features (rows × features, NaN for empty cells), labels, feature names.

    With ``feature_names`` the columns are taken in that order and must exist.
    """
    path = Path(path)
    if path.suffix.lower() == ".parquet":
        return _read_parquet(path, label_column, feature_names)
    try:
        with tracked_open(path, f"reading {path.name}") as handle:
            reader = csv.reader(handle)
            header = next(reader, None)
            if header is None:
                raise UserError(f"{path}:1: empty file: a header row is needed")
            header = [h.strip() for h in header]
            names = _columns(header, label_column, feature_names, f"{path}:1")
            rows = list(reader)
    except OSError as exc:
        raise UserError(f"{path}: cannot read: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise UserError(f"{path}: not a UTF-8 text file") from None
    except csv.Error as exc:
        raise UserError(f"{path}: malformed CSV: {exc}") from None
    if not rows:
        raise UserError(f"{path}:2: no data rows")
    for line, row in enumerate(rows, start=2):
        if len(row) != len(header):
            raise UserError(f"{path}:{line}: expected {len(header)} fields, got {len(row)}")
    columns = [header.index(n) for n in names]
    try:  # all cells numbers: Python's float() is ~3x numpy's cast from strings
        X = np.array([[float(row[c]) for c in columns] for row in rows], dtype=np.float64)
    except ValueError:  # empty cells (NaN) or a bad one: column by column, to name it
        X = _numbers(np.array(rows, dtype=str), columns, names, path)
    if not np.isfinite(X[~np.isnan(X)]).all():
        line = int(np.flatnonzero(np.isinf(X).any(1))[0]) + 2
        raise UserError(f"{path}:{line}: infinite value")
    label_at = header.index(label_column)
    labels = np.array([row[label_at].strip() for row in rows], dtype=str)
    empty = np.flatnonzero(labels == "")
    if len(empty):
        raise UserError(f"{path}:{int(empty[0]) + 2}: field {label_column!r}: empty label")
    return X, labels, names


def _numbers(cells: np.ndarray, columns: list[int], names: list[str], path: Path) -> np.ndarray:
    """Feature columns as floats, empty cells NaN; a cell that is no number is a UserError."""
    X = np.empty((len(cells), len(columns)))
    for out, col in enumerate(columns):
        values = np.char.strip(cells[:, col])
        values = np.where(values == "", "nan", values)  # widened: "nan" fits a 1-wide column
        try:
            X[:, out] = values.astype(np.float64)
        except ValueError:
            for line, value in enumerate(values, start=2):
                try:
                    float(value)
                except ValueError:
                    raise UserError(
                        f"{path}:{line}: field {names[out]!r}: not a number: {str(value)!r}") from None
    return X


def _columns(header: list[str], label_column: str, feature_names: list[str] | None,
             where: str) -> list[str]:
    """Feature columns to read: all but the label, or the profile's, which must exist."""
    if label_column not in header:
        raise UserError(f"{where}: field {label_column!r}: no such column (label column)")
    names = feature_names or [h for h in header if h != label_column]
    missing = [n for n in names if n not in header]
    if missing:
        raise UserError(f"{where}: field {missing[0]!r}: column missing (the profile has it)")
    return names


def _read_parquet(path, label_column, feature_names):
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise UserError(f"{path}: reading Parquet needs pyarrow: pip install pyarrow") from None
    try:
        table = pq.read_table(path)
    except Exception as exc:  # pyarrow raises many kinds; all mean "unreadable file"
        raise UserError(f"{path}: cannot read Parquet: {exc}") from None
    names = _columns(table.column_names, label_column, feature_names, str(path))
    try:
        X = np.column_stack([table.column(n).to_numpy(zero_copy_only=False).astype(np.float64)
                             for n in names])
    except (ValueError, TypeError) as exc:
        raise UserError(f"{path}: a feature column is not numeric: {exc}") from None
    labels = np.array([str(v) for v in table.column(label_column).to_pylist()])
    return X, labels, names
