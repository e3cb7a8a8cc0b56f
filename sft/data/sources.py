"""Sources: where raw rows come from.

``load_rows(source)`` yields ``(row_number, row_dict)`` pairs. ``source`` is one of:

- ``"bundled"``: the project's own sample (``sft.data.sample_data.BUNDLED``) as ``{"messages": [...]}`` rows;
- a local ``.jsonl`` / ``.json`` / ``.parquet`` file;
- a hub dataset id, through ``datasets.load_dataset`` (``streaming=True`` and the first ``limit``
  rows when ``limit`` is given, so OpenOrca's 4 M rows are never downloaded whole).

Row numbers are 1-based: for ``.jsonl`` the line number in the file (blank lines are skipped but
counted), otherwise the record's position; a malformed JSONL line's column is the character position in
that line. A UTF-8 byte-order mark at the start of a ``.jsonl`` / ``.json`` file is skipped. Errors (missing file, bytes that are not UTF-8, malformed
JSON line, JSON nested too deeply or with an over-long integer, a record that is not an object, a
corrupt parquet file) are ``DataError`` naming the source and the row.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

from sft.data.schema import DataError

FILE_SUFFIXES = (".jsonl", ".json", ".parquet")
_BOM = b"\xef\xbb\xbf"  # the UTF-8 byte-order mark: skipped at the start of a JSON / JSONL file


def is_local(source: str) -> bool:
    """True for a path-like source (a file suffix we read, or an existing path)."""
    return source.endswith(FILE_SUFFIXES) or Path(source).exists()


def _check_object(obj, source: str, row: int) -> dict:
    if not isinstance(obj, dict):
        raise DataError(f"expected a JSON object, got {type(obj).__name__}", source=source, row=row)
    return obj


def _jsonl(path: Path, limit: int | None) -> Iterator[tuple[int, dict]]:
    n = 0
    # bytes, decoded line by line: a line that is not UTF-8 is an error naming that line
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, start=1):
            if limit is not None and n >= limit:
                return
            if lineno == 1 and raw.startswith(_BOM):  # a UTF-8 byte-order mark (many Windows tools write one)
                raw = raw[len(_BOM) :]
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(
                    f"not UTF-8 (byte {e.start + 1} of the line)", source=str(path), row=lineno
                ) from None
            if not line.strip():
                continue
            # without its line break: an error at the end of the line is reported at its last column + 1
            obj = _loads(line.rstrip("\r\n"), str(path), lineno)
            n += 1
            yield lineno, _check_object(obj, str(path), lineno)


def _loads(text: str, source: str, row: int | None):
    """``json.loads`` whose every failure is a DataError: malformed JSON, but also nesting too deep for
    the parser (RecursionError) and integers over Python's digit limit (ValueError)."""
    what = "malformed JSON line" if row is not None else "malformed JSON"
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        # a JSONL row is one line: its column is the character position (a JSON string cannot hold a raw
        # line break, but the error may lie past one the parser was given)
        where = f"column {e.pos + 1}" if row is not None else f"line {e.lineno} column {e.colno}"
        raise DataError(f"{what}: {e.msg} at {where}", source=source, row=row) from None
    except RecursionError:
        raise DataError(f"{what}: nested too deeply", source=source, row=row) from None
    except ValueError as e:
        raise DataError(f"{what}: {str(e).split(';')[0]}", source=source, row=row) from None


def _json(path: Path, limit: int | None) -> Iterator[tuple[int, dict]]:
    try:
        text = path.read_bytes().removeprefix(_BOM).decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"not UTF-8 (byte {e.start + 1} of the file)", source=str(path)) from None
    data = _loads(text, str(path), None)
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
    batches = pf.iter_batches(batch_size=1024)
    while True:
        try:
            batch = next(batches, None)
        except Exception as e:  # a corrupt page further in the file
            raise DataError(f"cannot read parquet after row {i}: {e}", source=str(path)) from None
        if batch is None:
            return
        for obj in batch.to_pylist():
            if limit is not None and i >= limit:
                return
            i += 1
            yield i, obj


def _bundled(limit: int | None) -> Iterator[tuple[int, dict]]:
    from sft.data.sample_data import BUNDLED

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
        if path.is_dir():
            raise DataError(
                f"is a directory, not a data file: name a {'/'.join(FILE_SUFFIXES)} file inside it",
                source=source,
            )
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
