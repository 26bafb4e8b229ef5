"""Corpus rows: lazy sources of `(position, id, input)` rows from a folder of images, a JSONL or CSV file, or a
`datasets` dataset (streaming too). Reading and image-path rules come from `coma_hf.data.sources`."""

from __future__ import annotations

import csv
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..data.sources import image_files, image_root_of, read_jsonl_lines, resolve_image_path, row_id


@dataclass
class CorpusRow:
    """One corpus row: its position in the corpus, its id, and the encode input (or why it has none)."""

    position: int
    id: str
    input: dict | None
    error: str | None = None


def image_folder_rows(folder: str | os.PathLike) -> Iterator[CorpusRow]:
    """Every image file under `folder` (recursively, sorted by relative path); the id is that path."""
    root = Path(folder)
    for position, relative in enumerate(image_files(root)):
        yield CorpusRow(position, relative, {"image": str(root / relative)})


def jsonl_rows(
    path: str | os.PathLike,
    text_field: str | None = "text",
    image_field: str | None = "image",
    id_field: str | None = "id",
    image_root: str | None = None,
) -> Iterator[CorpusRow]:
    """One row per non-blank line of a JSONL file; a line that is not UTF-8 JSON is a row with an error that names the
    line. Image paths start at `image_root`, else at the file's folder."""
    root = image_root_of(path, image_root)
    for position, (_, record, error) in enumerate(read_jsonl_lines(path)):
        if error is not None:
            yield CorpusRow(position, str(position), None, error)
        else:
            yield _record_row(position, record, text_field, image_field, id_field, root)


def csv_rows(
    path: str | os.PathLike,
    text_field: str | None = "text",
    image_field: str | None = "image",
    id_field: str | None = "id",
    image_root: str | None = None,
) -> Iterator[CorpusRow]:
    """One row per CSV record (header first); image paths start at `image_root`, else at the file's folder."""
    root = image_root_of(path, image_root)
    with open(path, newline="", encoding="utf-8", errors="strict") as handle:
        for position, record in enumerate(csv.DictReader(handle)):
            yield _record_row(position, record, text_field, image_field, id_field, root)


def dataset_rows(
    dataset: Any,
    text_field: str | None = "text",
    image_field: str | None = "image",
    id_field: str | None = "id",
    image_root: str | None = None,
) -> Iterator[CorpusRow]:
    """Rows of a `datasets.Dataset` or `IterableDataset` (streaming). Image columns are read undecoded, so a row
    is decoded only when its batch is embedded."""
    features = getattr(dataset, "features", None) or {}
    if image_field and image_field in features and type(features[image_field]).__name__ == "Image":
        from datasets import Image as ImageFeature

        dataset = dataset.cast_column(image_field, ImageFeature(decode=False))
    for position, record in enumerate(dataset):
        yield _record_row(position, record, text_field, image_field, id_field, image_root)


def _record_row(position: int, record: dict, text_field, image_field, id_field, image_root) -> CorpusRow:
    identifier = str(row_id(record, position, id_field))
    text = record.get(text_field) if text_field else None
    image = record.get(image_field) if image_field else None
    if text is not None and not isinstance(text, str):
        return CorpusRow(
            position,
            identifier,
            None,
            f"row {position}, field {text_field!r}: expected text, got {type(text).__name__}",
        )
    image = resolve_image_path(image, image_root)
    if image in ("", None) and not (text or "").strip():
        fields = " or ".join(repr(name) for name in (text_field, image_field) if name)
        return CorpusRow(position, identifier, None, f"row {position}: no {fields} (or only whitespace)")
    item = {"text": text or ""}
    if image not in ("", None):
        item["image"] = image
    return CorpusRow(position, identifier, item)
