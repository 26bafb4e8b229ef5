"""JSONL files read line by line, so that a line that is not UTF-8 JSON is named by file and line number instead of
failing deep inside pyarrow's JSON reader (which `datasets.load_dataset("json")` uses)."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator

from ..inputs import CoMaInputError

ERROR_COLUMN = "_error"  # rows standing for unreadable lines carry only this column


def read_jsonl_lines(path: str | os.PathLike) -> Iterator[tuple[int, dict | None, str | None]]:
    """`(line number, record, None)` for each JSON-object line and `(line number, None, reason)` for each line that is
    not UTF-8 JSON or not an object; blank lines are skipped. Line numbers start at 1."""
    with open(path, "rb") as handle:
        for number, raw in enumerate(handle, 1):
            if not raw.strip():
                continue
            try:
                record = json.loads(raw.decode("utf-8"))
            except UnicodeDecodeError as error:
                yield number, None, f"line {number} of {path} is not UTF-8: {error}"
                continue
            except ValueError as error:
                yield number, None, f"line {number} of {path} is not JSON: {error}"
                continue
            if not isinstance(record, dict):
                yield number, None, f"line {number} of {path} is a JSON {type(record).__name__}, not an object"
                continue
            yield number, record, None


def read_jsonl_records(path: str | os.PathLike) -> list[dict]:
    """Every record of a JSONL file; the first bad line raises `CoMaInputError` naming the file and line."""
    records = []
    for number, record, error in read_jsonl_lines(path):
        if error is not None:
            raise CoMaInputError(error, field="line")
        records.append(record)
    return records


def load_jsonl_dataset(path: str | os.PathLike):
    """A JSONL file as a `datasets.Dataset`, one row per non-blank line.

    Clean files go through `datasets`' own JSON loader. A file with unreadable lines is loaded record by record and
    each bad line becomes a row holding only `_error` (its reason), so row positions still follow the file and the
    stage's validation reports, skips and counts them like any other bad row.
    """
    import datasets

    rows, bad = [], False
    for _, record, error in read_jsonl_lines(path):
        rows.append(record if error is None else {ERROR_COLUMN: error})
        bad = bad or error is not None
    if not bad:
        return datasets.load_dataset("json", data_files=str(path), split="train")
    columns = list(dict.fromkeys(key for row in rows for key in row))  # from_list would keep the first row's only
    return datasets.Dataset.from_list([{column: row.get(column) for column in columns} for row in rows])


def check_readable(row: dict, sample) -> None:
    """Raise the `CoMaInputError` of a row that stands for an unreadable line (see `load_jsonl_dataset`)."""
    if row.get(ERROR_COLUMN):
        raise CoMaInputError(row[ERROR_COLUMN], sample, "line")
