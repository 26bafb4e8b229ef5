"""Where rows come from, and the rules every reader shares (stage 1, stage 2, QA generation, evaluation and the
corpus encoder in `coma_hf.inference` all import them from here).

* Reading: JSONL line by line, so that a line that is not UTF-8 JSON is named by file and line number instead of
  failing deep inside pyarrow's JSON reader (which `datasets.load_dataset("json")` uses); one local data file by its
  suffix; the data files of a folder; a folder saved with `Dataset.save_to_disk`; a Hub id.
* Image paths: a relative path starts at an image root (`resolve_image_path`); what counts as an image file
  (`IMAGE_EXTENSIONS`, `image_files`).
* Bad rows: a row that stands for something unreadable carries its reason in `ERROR_COLUMN`; a row that cannot be
  used is reported as a `BadRow` (its position, its id — `row_id` — and why).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..inputs import CoMaInputError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
ERROR_COLUMN = "error"  # a row that did not load carries its reason here (and nothing else the reader made up)
DATA_FILE_PATTERNS = ("*.jsonl", "*.parquet")  # the files a folder of subsets / evaluation datasets holds


# --------------------------------------------------------------------------------------------------------------------
# Bad rows
# --------------------------------------------------------------------------------------------------------------------
@dataclass
class BadRow:
    """A row that cannot be used, and why: its position in what was read, its id (`row_id`) and the reason."""

    index: int
    id: Any
    error: str


def row_id(row: dict, index: int, id_field: str | None = "id") -> Any:
    """How errors and summaries name a row: its `id` (or `id_field`) when it has one, else its position."""
    return index if not id_field or row.get(id_field) is None else row[id_field]


def check_readable(row: dict, sample) -> None:
    """Raise the `CoMaInputError` of a row that stands for an unreadable line (see `load_jsonl_dataset`)."""
    if row.get(ERROR_COLUMN):
        raise CoMaInputError(row[ERROR_COLUMN], sample, "line")


# --------------------------------------------------------------------------------------------------------------------
# Image paths
# --------------------------------------------------------------------------------------------------------------------
def resolve_image_path(image: Any, image_root: str | os.PathLike | None) -> Any:
    """`image` joined to `image_root` when it is a relative path; anything else (an absolute path, a URL, an empty
    string, `None`, a PIL image, a `datasets.Image` value, or no root) is returned as it is."""
    if image_root and isinstance(image, (str, os.PathLike)):
        path = os.fspath(image)
        if path and not os.path.isabs(path) and "://" not in path:
            return os.path.join(image_root, path)
    return image


def image_root_of(path: str | os.PathLike, image_root: str | os.PathLike | None = None) -> str:
    """Where the relative image paths of the data file `path` start: `image_root` when given, else the file's
    folder."""
    return str(image_root) if image_root else str(Path(path).parent)


def image_files(folder: str | os.PathLike) -> list[str]:
    """The image files under `folder` (recursively, by `IMAGE_EXTENSIONS`) as relative POSIX paths, sorted."""
    root = Path(folder)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder not found: {folder}")
    return sorted(
        path.relative_to(root).as_posix() for path in root.rglob("*") if path.suffix.lower() in IMAGE_EXTENSIONS
    )


# --------------------------------------------------------------------------------------------------------------------
# JSONL
# --------------------------------------------------------------------------------------------------------------------
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
    for _, record, error in read_jsonl_lines(path):
        if error is not None:
            raise CoMaInputError(error, field="line")
        records.append(record)
    return records


def load_jsonl_dataset(path: str | os.PathLike):
    """A JSONL file as a `datasets.Dataset`, one row per non-blank line.

    Clean files go through `datasets`' own JSON loader. A file with unreadable lines is loaded record by record and
    each bad line becomes a row holding only `ERROR_COLUMN` (its reason), so row positions still follow the file and
    the stage's validation reports, skips and counts them like any other bad row.
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


# --------------------------------------------------------------------------------------------------------------------
# Files, folders, saved datasets, Hub ids
# --------------------------------------------------------------------------------------------------------------------
def load_data_file(path: str | os.PathLike):
    """One local file as a `datasets.Dataset`: JSONL line by line (see `load_jsonl_dataset`), parquet, else JSON."""
    import datasets

    path = Path(path)
    if path.suffix == ".jsonl":
        return load_jsonl_dataset(path)  # a line that is not JSON becomes a bad row, named by its line
    kind = "parquet" if path.suffix == ".parquet" else "json"
    return datasets.load_dataset(kind, data_files=str(path), split="train")


def read_records(path: str | os.PathLike) -> list[dict]:
    """Every record of one local JSONL or parquet file as plain dicts (no columns filled in); a bad JSONL line raises
    `CoMaInputError` naming the file and line (for readers that cannot skip a row, such as evaluation)."""
    path = Path(path)
    if path.suffix == ".parquet":
        import datasets

        return list(datasets.load_dataset("parquet", data_files=str(path), split="train"))
    return read_jsonl_records(path)


def data_files(folder: str | os.PathLike, names=None) -> list[Path]:
    """The JSONL and parquet files of `folder` (not recursive), sorted; with `names`, only those whose stem is one."""
    folder = Path(folder)
    files = sorted(file for pattern in DATA_FILE_PATTERNS for file in folder.glob(pattern))
    return [file for file in files if names is None or file.stem in names]


def is_saved_dataset(path: str | os.PathLike) -> bool:
    """Whether `path` is a folder written by `Dataset.save_to_disk` or `DatasetDict.save_to_disk`."""
    path = Path(path)
    return path.is_dir() and ((path / "dataset_dict.json").is_file() or (path / "state.json").is_file())


def open_dataset(source: str | os.PathLike, name: str | None = None, split: str = "train", streaming: bool = False):
    """A folder saved with `save_to_disk` (its `split` when it holds a `DatasetDict`), else whatever
    `datasets.load_dataset(source, name, split=split)` loads — a Hub id (the only case that may touch the network)."""
    import datasets

    if is_saved_dataset(source):
        loaded = datasets.load_from_disk(str(source))
        return loaded[split] if isinstance(loaded, datasets.DatasetDict) else loaded
    return datasets.load_dataset(str(source), name, split=split, streaming=streaming)
