"""Sources: where raw rows come from.

``load_rows(source)`` yields ``(row_number, row_dict)`` pairs. ``source`` is one of:

- ``"bundled"``: the project's own sample (``sft.sample_data.BUNDLED``) as ``{"messages": [...]}`` rows;
- a local ``.jsonl`` / ``.json`` / ``.parquet`` file;
- a hub dataset id, through ``datasets.load_dataset`` (``streaming=True`` and the first ``limit``
  rows when ``limit`` is given, so OpenOrca's 4 M rows are never downloaded whole).

Row numbers are 1-based: for ``.jsonl`` the line number in the file (blank lines are skipped but
counted), otherwise the record's position. Errors (missing file, malformed JSON line, a record that
is not an object) are ``DataError`` naming the source and the row.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

from sft.schema import DataError

FILE_SUFFIXES = (".jsonl", ".json", ".parquet")


def is_local(source: str) -> bool:
    """True for a path-like source (a file suffix we read, or an existing path)."""
    return source.endswith(FILE_SUFFIXES) or Path(source).exists()


def _check_object(obj, source: str, row: int) -> dict:
    if not isinstance(obj, dict):
        raise DataError(f"expected a JSON object, got {type(obj).__name__}", source=source, row=row)
    return obj


def _jsonl(path: Path, limit: int | None) -> Iterator[tuple[int, dict]]:
    n = 0
    with path.open("r", encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if limit is not None and n >= limit:
                return
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(
                    f"malformed JSON line: {e.msg} at column {e.colno}", source=str(path), row=lineno
                ) from None
            n += 1
            yield lineno, _check_object(obj, str(path), lineno)


def _json(path: Path, limit: int | None) -> Iterator[tuple[int, dict]]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise DataError(
            f"malformed JSON: {e.msg} at line {e.lineno} column {e.colno}", source=str(path)
        ) from None
    if isinstance(data, dict) and isinstance(data.get("data"), list):
        data = data["data"]
    if not isinstance(data, list):
        raise DataError("expected a JSON list of objects (or {'data': [...]})", source=str(path))
    for i, obj in enumerate(data[:limit] if limit is not None else data, start=1):
        yield i, _check_object(obj, str(path), i)


def _parquet(path: Path, limit: int | None) -> Iterator[tuple[int, dict]]:
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises several types for a corrupt file
        raise DataError(f"cannot read parquet: {e}", source=str(path)) from None
    i = 0
    for batch in pf.iter_batches(batch_size=1024):
        for obj in batch.to_pylist():
            if limit is not None and i >= limit:
                return
            i += 1
            yield i, obj


def _bundled(limit: int | None) -> Iterator[tuple[int, dict]]:
    from sft.sample_data import BUNDLED

    for i, conv in enumerate(BUNDLED[:limit] if limit is not None else BUNDLED, start=1):
        yield i, {"messages": [dict(m) for m in conv]}


def _hub(source: str, limit: int | None, split: str) -> Iterator[tuple[int, dict]]:
    import datasets

    try:
        ds = datasets.load_dataset(source, split=split, streaming=limit is not None)
    except Exception as e:  # offline, unknown id, gated...: one line naming the source
        raise DataError(
            f"cannot load hub dataset ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})",
            source=source,
        ) from None
    for i, obj in enumerate(ds, start=1):
        if limit is not None and i > limit:
            return
        yield i, dict(obj)


def load_rows(source: str, *, limit: int | None = None, split: str = "train") -> Iterator[tuple[int, dict]]:
    """Yield ``(row_number, row)`` from ``source`` (see module docstring); at most ``limit`` rows."""
    source = str(source)
    if source == "bundled":
        return _bundled(limit)
    if is_local(source):
        path = Path(source)
        if not path.is_file():
            raise DataError("file not found", source=source)
        if source.endswith(".jsonl"):
            return _jsonl(path, limit)
        if source.endswith(".json"):
            return _json(path, limit)
        if source.endswith(".parquet"):
            return _parquet(path, limit)
        raise DataError(f"unsupported file type (expected one of {FILE_SUFFIXES})", source=source)
    return _hub(source, limit, split)
