"""Reading source files into rows (one dict per record) and writing JSONL deterministically.

Formats: `.jsonl` (one JSON object per line; blank lines are skipped), `.csv` (header row;
every value is a string) and `.parquet` (via pyarrow). Output JSONL has sorted keys, UTF-8
text (ensure_ascii=False) and "\\n" line ends, so the same rows always give the same bytes.
"""

from __future__ import annotations

import csv
import datetime as _dt
import decimal
import json
from pathlib import Path
from typing import Any, Iterable

from llmops import hashing
from llmops.fsutil import atomic_write_text
from llmops.errors import LlmopsError

FORMATS: dict[str, str] = {".jsonl": "jsonl", ".csv": "csv", ".parquet": "parquet"}


def detect_format(path: str | Path, fmt: str | None = None) -> str:
    """The format named by `fmt`, else the one given by the file's extension."""
    if fmt:
        if fmt not in FORMATS.values():
            raise LlmopsError(
                f"{path}: unknown format {fmt!r}; use one of {', '.join(sorted(FORMATS.values()))}."
            )
        return fmt
    ext = Path(path).suffix.lower()
    if ext not in FORMATS:
        raise LlmopsError(
            f"{path}: unknown file extension {ext or '(none)'!r}; use .jsonl, .csv or .parquet, "
            "or set the dataset's `format`."
        )
    return FORMATS[ext]


def read_rows(path: str | Path, fmt: str | None = None) -> list[dict[str, Any]]:
    """Read a JSONL, CSV or Parquet file into a list of dicts."""
    path = Path(path)
    kind = detect_format(path, fmt)
    if not path.is_file():
        raise LlmopsError(f"{path}: source file not found; create it or fix the dataset's `source`.")
    if kind == "jsonl":
        return read_jsonl(path)
    if kind == "csv":
        return _read_csv(path)
    return _read_parquet(path)


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """Read a JSONL file; every non-blank line must be a JSON object."""
    path = Path(path)
    rows: list[dict[str, Any]] = []
    try:
        fh = path.open("r", encoding="utf-8")
    except FileNotFoundError:
        raise LlmopsError(f"{path}: file not found.") from None
    with fh:
        try:
            for lineno, line in enumerate(fh, start=1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise LlmopsError(
                        f"{path}:{lineno}: malformed JSON ({exc.msg} at column {exc.colno}); "
                        "fix the line so that each line holds one JSON object."
                    ) from None
                if not isinstance(row, dict):
                    raise LlmopsError(
                        f"{path}:{lineno}: expected a JSON object, found {type(row).__name__}; "
                        "each line must hold one JSON object."
                    )
                rows.append(row)
        except UnicodeDecodeError as exc:
            raise LlmopsError(f"{path}: not UTF-8 text ({exc.reason}); re-encode the file as UTF-8.") from None
    return rows


def _read_csv(path: Path) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    try:
        with path.open("r", encoding="utf-8-sig", newline="") as fh:
            reader = csv.reader(fh)
            header = next(reader, None)
            if header is None:
                return rows
            if len(set(header)) != len(header):
                raise LlmopsError(f"{path}:1: duplicate column names in the CSV header; make them unique.")
            for record in reader:
                if not record:
                    continue
                if len(record) != len(header):
                    raise LlmopsError(
                        f"{path}:{reader.line_num}: {len(record)} values but the header has "
                        f"{len(header)} columns; fix the row (quote values holding commas)."
                    )
                rows.append(dict(zip(header, record)))
    except csv.Error as exc:
        raise LlmopsError(f"{path}: malformed CSV ({exc}); fix the file.") from None
    except UnicodeDecodeError as exc:
        raise LlmopsError(f"{path}: not UTF-8 text ({exc.reason}); re-encode the file as UTF-8.") from None
    return rows


def _read_parquet(path: Path) -> list[dict[str, Any]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError) as exc:
        raise LlmopsError(f"{path}: cannot read Parquet ({exc}); check that the file is a Parquet file.") from None
    return table.to_pylist()


def _json_default(value: Any) -> Any:
    if isinstance(value, (_dt.datetime, _dt.date, _dt.time)):
        return value.isoformat()
    if isinstance(value, decimal.Decimal):
        return str(value)
    if isinstance(value, bytes):
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError:
            pass
    if hasattr(value, "tolist"):  # numpy scalars and arrays
        return value.tolist()
    raise TypeError(f"value of type {type(value).__name__} cannot be written as JSON")


def canonical_json(value: Any) -> str:
    """Compact JSON with sorted keys: the identity of a row for hashing."""
    return hashing.canonical_json(value, default=_json_default)


def dumps_jsonl(rows: Iterable[dict[str, Any]]) -> str:
    """Rows as JSONL text: sorted keys, UTF-8, one object per "\\n"-terminated line."""
    try:
        return "".join(
            json.dumps(row, sort_keys=True, ensure_ascii=False, default=_json_default) + "\n" for row in rows
        )
    except (TypeError, ValueError) as exc:
        raise LlmopsError(f"a row cannot be written as JSON ({exc}); convert the field with a `map` step.") from None


def write_jsonl(path: str | Path, rows: Iterable[dict[str, Any]]) -> None:
    """Write rows as deterministic JSONL (see `dumps_jsonl`), atomically."""
    atomic_write_text(path, dumps_jsonl(rows))
