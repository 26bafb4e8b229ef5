"""Stage-2 data: MMEB-format training pairs (the `TIGER-Lab/MMEB-train` layout).

A row holds a query and its positive, optionally a hard negative::

    {"qry": str, "qry_image_path": str, "pos_text": str, "pos_image_path": str,
     "neg_text": str, "neg_image_path": str, "dataset": str}          # neg_* and dataset optional

Each side becomes one embedding input: its text (which keeps MMEB's `<|image_1|>` placeholder, where
`CoMaProcessor` puts the image tokens) and its image path (relative paths start at the image root). The loaded
dataset has flat string columns `anchor_text`, `anchor_image`, `positive_text`, `positive_image` (and
`negative_text`, `negative_image` when the data has negative columns; both empty for a row without one) plus
`dataset`; `embedding_input` turns a
text/image pair back into the `{"text", "image"}` dict that `encode` and the collators take. With `by_dataset=True`
the result is a `DatasetDict` keyed by dataset, so that sentence-transformers' multi-dataset batch sampler draws each
batch from one dataset (the paper's interleaving; `coma_hf.training.samplers` has the released code's chunked one).
`hard_negatives=False` drops the negative columns (the released code trains without them); `cap_per_dataset` keeps at
most a given number of rows of each dataset (the released code's per-subset caps, `parse_dataset_caps` reads them).
`coma_hf.training.CoMaContrastiveCollator` hands the rows to sentence-transformers as (anchor, positive[, negative])
inputs.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from ..inputs import CoMaInputError
from .sources import (
    ERROR_COLUMN,
    BadRow,
    check_readable,
    data_files,
    image_root_of,
    load_data_file,
    open_dataset,
    resolve_image_path,
    row_id,
)

logger = logging.getLogger(__name__)

REQUIRED = ("qry", "qry_image_path", "pos_text", "pos_image_path")
SIDES = (
    ("anchor", "qry", "qry_image_path"),
    ("positive", "pos_text", "pos_image_path"),
    ("negative", "neg_text", "neg_image_path"),
)


def normalize_pair(row: dict, index: int = 0, image_root: str | None = None, with_negative: bool = False) -> dict:
    """One MMEB training row → flat `{side}_text` / `{side}_image` columns; an error names the row and column."""
    sample = row_id(row, index)
    check_readable(row, sample)
    missing = [column for column in REQUIRED if column not in row]
    if missing:
        raise CoMaInputError(f"missing column(s) {missing}", sample, missing[0])
    pair = {"dataset": _dataset_name(row)}
    for side, text_column, image_column in SIDES:
        if side == "negative" and not with_negative:
            continue
        text, image = row.get(text_column) or "", row.get(image_column) or ""
        if not isinstance(text, str) or not isinstance(image, str):
            raise CoMaInputError(
                "expected strings", sample, text_column if not isinstance(text, str) else image_column
            )
        if not text.strip() and not image:
            if side == "negative":  # MMEB-train carries the columns but leaves most negatives empty
                pair["negative_text"] = pair["negative_image"] = ""
                continue
            raise CoMaInputError(f"both {text_column} and {image_column} are empty", sample, text_column)
        pair[f"{side}_text"], pair[f"{side}_image"] = text, resolve_image_path(image, image_root)
    return pair


def _dataset_name(row: dict) -> str:
    return str(row.get("dataset") or "default")


def embedding_input(text: str, image: str) -> dict[str, Any]:
    """The `{"text", "image"}` input of one side (no `image` key when there is none)."""
    return {"text": text, "image": image} if image else {"text": text}


def _read(source: str | os.PathLike, subsets, split: str):
    import datasets

    path = Path(source)
    if path.is_file():
        return load_data_file(path), image_root_of(path)
    if path.is_dir():
        files = data_files(path, subsets)
        if not files:
            raise ValueError(f"{source}: no JSONL or parquet files{' for ' + str(subsets) if subsets else ''}")
        parts = []
        for file in files:
            part, _ = _read(file, None, split)
            if "dataset" not in part.column_names and len(files) > 1:
                part = part.add_column("dataset", [file.stem] * len(part))
            parts.append(part)
        return datasets.concatenate_datasets(parts), str(path)
    if not subsets:
        raise ValueError("Loading MMEB-train from the Hub needs the subset names (one config each)")
    parts = []
    for subset in subsets:
        part = open_dataset(source, subset, split=split)
        parts.append(part.add_column("dataset", [subset] * len(part)) if "dataset" not in part.column_names else part)
    return datasets.concatenate_datasets(parts), None


def load_mmeb_train(
    source: str | os.PathLike,
    image_root: str | None = None,
    subsets: list[str] | None = None,
    split: str = "train",
    by_dataset: bool = False,
    hard_negatives: bool = True,
):
    """MMEB-format training pairs from a JSONL/parquet file, a folder of `{subset}` files, or a Hub id (with
    `subsets`). Relative image paths start at `image_root` (default: the file's folder). Hard negatives are kept when
    the data has `neg_text` / `neg_image_path`, unless `hard_negatives=False` (then they are not even read)."""
    raw, default_root = _read(source, subsets, split)
    root = image_root or default_root
    with_negative = hard_negatives and ("neg_text" in raw.column_names or "neg_image_path" in raw.column_names)
    pairs = raw.map(
        lambda row, index: _pair_or_error(row, index, root, with_negative),
        with_indices=True,
        remove_columns=raw.column_names,
        desc="Reading MMEB training pairs",
    )
    return split_by_dataset(pairs) if by_dataset else pairs


def _pair_or_error(row: dict, index: int, image_root: str | None, with_negative: bool) -> dict:
    """`normalize_pair`, or for a row it rejects, empty sides and the reason in `ERROR_COLUMN` (validation skips and
    counts such rows; the collator raises their error), so that one bad row does not stop loading."""
    identifier = str(row_id(row, index))
    try:
        return {**normalize_pair(row, index, image_root, with_negative), "id": identifier, ERROR_COLUMN: ""}
    except CoMaInputError as error:
        empty = {f"{side}_{kind}": "" for side, *_ in SIDES[: 3 if with_negative else 2] for kind in ("text", "image")}
        return {"dataset": _dataset_name(row), **empty, "id": identifier, ERROR_COLUMN: str(error)}


def split_by_dataset(pairs):
    """A `DatasetDict` with one split per value of the `dataset` column."""
    import datasets

    names = sorted(set(pairs["dataset"]))
    return datasets.DatasetDict({name: pairs.filter(lambda row, name=name: row["dataset"] == name) for name in names})


def parse_dataset_caps(text: str | None) -> dict[str, int] | int | None:
    """`"N"` (every dataset) or `"name=N,name=N"` (those datasets; the others uncapped) → the caps `cap_per_dataset`
    takes; `None` or empty → no cap. A malformed entry is an error naming it."""
    if not text or not text.strip():
        return None
    if "=" not in text:
        return _positive_cap(text.strip(), text)
    caps = {}
    for entry in text.split(","):
        name, _, value = entry.partition("=")
        if not name.strip() or not value.strip():
            raise ValueError(f"Dataset cap {entry!r}: expected name=rows")
        caps[name.strip()] = _positive_cap(value.strip(), entry)
    return caps


def _positive_cap(value: str, entry: str) -> int:
    if not value.isdigit() or int(value) < 1:
        raise ValueError(f"Dataset cap {entry!r}: the row count must be a positive integer")
    return int(value)


def cap_per_dataset(pairs_by_dataset, caps: dict[str, int] | int | None, seed: int = 42):
    """The `DatasetDict` with each dataset cut to its cap: shuffled with `seed`, then the first rows kept (as the
    released code does, seed 42). `caps`: one int for all, a dict by name (datasets it does not name stay whole), or
    `None`. Caps naming datasets that are not there are logged (a run on some of the subsets a preset caps is
    ordinary; a misspelt name should not pass unseen)."""
    import datasets

    if caps is None:
        return pairs_by_dataset
    if isinstance(caps, dict):
        unknown = sorted(set(caps) - set(pairs_by_dataset))
        if unknown:
            logger.warning("Caps for datasets not in the data (ignored): %s", ", ".join(unknown))
    capped = {}
    for name, part in pairs_by_dataset.items():
        cap = caps.get(name) if isinstance(caps, dict) else caps
        capped[name] = part.shuffle(seed=seed).select(range(cap)) if cap is not None and len(part) > cap else part
    return datasets.DatasetDict(capped)


def validate_pairs(pairs, processor) -> list[BadRow]:
    """Render every side of every row once (images decoded, lengths checked); the rows that fail, with reasons."""
    from transformers.utils.logging import tqdm

    bad = []
    for index in tqdm(range(len(pairs)), desc="Validating stage-2 pairs", unit="row"):
        row = pairs[index]
        if row.get(ERROR_COLUMN):
            bad.append(BadRow(index, index, row[ERROR_COLUMN]))
            continue
        for side in sides(row):
            try:
                processor.render_embedding_input(
                    **embedding_input(row[f"{side}_text"], row[f"{side}_image"]), sample=index
                )
            except CoMaInputError as error:
                bad.append(BadRow(index, index, f"{side}: {error}"))
                break
    return bad


def sides(row: dict) -> list[str]:
    """The sides a row has, in loss order; a negative only when it is not empty."""
    sides = ["anchor", "positive"]
    if row.get("negative_text") or row.get("negative_image"):
        sides.append("negative")
    return sides
