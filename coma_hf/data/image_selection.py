"""The images stage-1 data is made for, chosen as the paper chose them: the unique images of chosen MMEB-train
subsets — every image a row names (query, positive, and a negative where the row has one, as the release's sampling
script took them) —, at most `per_subset` from each, drawn in a seeded order.

MMEB-train is read where the stage-2 reader reads it (`coma_hf.data.sources`; its image columns are stage 2's
`SIDES`): a folder holding one `{subset}.jsonl` / `.parquet` file per subset, a clone of the Hub dataset (one folder
per subset holding its parquet shards, images unpacked beside them), single files (a file's rows are one subset,
named by the file — or by its folder for a shard such as `train-00000-of-00001.parquet` — unless they carry a
`dataset` column), or a Hub id with the subset names (`datasets` configs). Relative image paths start at the image
root: `image_root` when given, else the folder given or the file's folder; a Hub id needs `image_root`.

Unique means one resolved, normalised path: an image named twice in a subset counts once, and an image already
chosen for an earlier subset (in the order the subsets are given) is not chosen again. Each subset's remaining
images are shuffled by a generator seeded with `seed` and the subset's name and the first `per_subset` are kept, so
the choice is deterministic. A larger cap keeps a smaller cap's images within one subset only where that subset's
candidates are the same under both caps: always for the first subset, and for a later one that shares no image with
the subsets before it. A shared image taken by an earlier subset under one cap and not the other changes the later
subset's candidates, hence their shuffled order and which of them are kept.
"""

from __future__ import annotations

import json
import os
import random
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..inputs import CoMaInputError
from .sources import ERROR_COLUMN, data_files, image_root_of, load_data_file, open_dataset, resolve_image_path
from .stage2 import SIDES

# The subsets and cap of the paper's stage-1 data (≈222K images): the release's sampling script.
PAPER_SUBSETS = (
    "N24News",
    "HatefulMemes",
    "VOC2007",
    "SUN397",
    "Visual7W",
    "MSCOCO",
    "VisDial",
    "CIRR",
    "MSCOCO_i2t",
    "MSCOCO_t2i",
    "NIGHTS",
    "WebQA",
)
PAPER_PER_SUBSET = 30_000
IMAGE_COLUMNS = tuple(image_column for _, _, image_column in SIDES)  # qry_image_path, pos_image_path, neg_image_path
_SHARD = re.compile(r"^[a-z]+-\d{5}-of-\d{5}$")  # datasets' shard names: the subset is the folder


@dataclass
class SubsetImages:
    """One subset's images as read: its rows, the rows that could not be read (`ERROR_COLUMN`), and its unique
    images, keyed by their resolved, normalised path in first-seen order: the resolved path (`images`) and the path
    as MMEB-train names it (`names`)."""

    rows: int = 0
    bad_rows: int = 0
    images: dict[str, str] = field(default_factory=dict)
    names: dict[str, str] = field(default_factory=dict)


@dataclass
class SubsetSelection:
    """What `select_images` did with one subset: rows read, unreadable rows, unique images, those already chosen for
    an earlier subset, and those chosen."""

    subset: str
    rows: int
    bad_rows: int
    unique_images: int
    chosen_earlier: int
    selected: int


def read_subset_images(
    sources: str | os.PathLike | Sequence[str | os.PathLike],
    subsets: Sequence[str] | None = None,
    image_root: str | os.PathLike | None = None,
) -> dict[str, SubsetImages]:
    """The images of each subset of MMEB-train `sources` (one or several; see the module docstring), only those of
    `subsets` when given (all of them must be found). An image value that is not a path string is an error naming
    the subset, row and column."""
    if isinstance(sources, (str, os.PathLike)):
        sources = [sources]
    wanted = set(subsets) if subsets is not None else None
    found: dict[str, SubsetImages] = {}
    for source in sources:
        for subset, table, root in _tables(source, subsets, image_root):
            _collect(table, subset, root, wanted, found)
    missing = [subset for subset in subsets or () if subset not in found]
    if missing:
        available = sorted({*found, *(name for source in sources for name in _local_subsets(source))})
        raise ValueError(f"subsets {missing} not found in {[str(source) for source in sources]}; found {available}")
    return found


def _local_subsets(source) -> list[str]:
    """The subsets a local folder holds by its layout (file stems, or subfolders with data files); [] otherwise."""
    path = Path(source)
    if not path.is_dir():
        return []
    files = data_files(path)
    if files:
        return [file.stem for file in files]
    return [child.name for child in path.iterdir() if child.is_dir() and data_files(child)]


def _tables(source, subsets, image_root) -> Iterator[tuple[str, Any, str | None]]:
    """`(default subset name, table, image root)` for each data file (or Hub config) of one source."""
    path = Path(source)
    if path.is_file():
        yield _file_subset(path), load_data_file(path), image_root_of(path, image_root)
        return
    if path.is_dir():
        root = str(image_root) if image_root else str(path)
        files = data_files(path)
        if files:  # one file per subset
            for file in files:
                if subsets is None or file.stem in subsets:
                    yield file.stem, load_data_file(file), root
            return
        folders = sorted(child for child in path.iterdir() if child.is_dir() and data_files(child))
        if not folders:
            raise ValueError(f"{source}: no JSONL or parquet files, neither in it nor in its subfolders")
        for folder in folders:  # a clone of the Hub dataset: one folder of shards per subset
            if subsets is None or folder.name in subsets:
                for file in data_files(folder):
                    yield folder.name, load_data_file(file), root
        return
    if not subsets:
        raise ValueError(f"{source}: reading MMEB-train from the Hub needs the subset names (one config each)")
    if not image_root:
        raise ValueError(f"{source}: reading MMEB-train from the Hub needs image_root (where its images are unpacked)")
    for subset in subsets:
        yield subset, open_dataset(source, subset), str(image_root)


def _file_subset(path: Path) -> str:
    """The subset a data file holds when its rows do not say: its name, or its folder's for a shard."""
    return path.parent.name if _SHARD.match(path.stem) else path.stem


def _collect(table, default_subset: str, root: str | None, wanted, found: dict[str, SubsetImages]) -> None:
    """Add the rows of `table` to `found`, each under its `dataset` column or `default_subset`."""
    columns = [column for column in (*IMAGE_COLUMNS, "dataset", ERROR_COLUMN) if column in table.column_names]
    if not any(column in IMAGE_COLUMNS for column in columns):
        raise ValueError(f"{default_subset}: no image column ({', '.join(IMAGE_COLUMNS)}); is this MMEB-train?")
    for batch in table.select_columns(columns).iter(batch_size=10_000):
        named = batch.get("dataset")
        for offset in range(len(batch[columns[0]])):
            subset = str(named[offset]) if named and named[offset] else default_subset
            if wanted is not None and subset not in wanted:
                continue
            images = found.setdefault(subset, SubsetImages())
            images.rows += 1
            if batch.get(ERROR_COLUMN) and batch[ERROR_COLUMN][offset]:
                images.bad_rows += 1
                continue
            for column in IMAGE_COLUMNS:
                value = batch[column][offset] if column in batch else None
                if value is None or value == "":
                    continue
                if not isinstance(value, str):
                    sample = f"{subset} row {images.rows - 1}"
                    raise CoMaInputError(f"expected an image path, got {type(value).__name__}", sample, column)
                resolved = resolve_image_path(value, root)
                key = os.path.normpath(resolved)
                if key not in images.images:
                    images.images[key] = resolved
                    images.names[key] = Path(os.path.normpath(value)).as_posix()


def select_images(
    sources: str | os.PathLike | Sequence[str | os.PathLike],
    subsets: Sequence[str] | None = PAPER_SUBSETS,
    per_subset: int = PAPER_PER_SUBSET,
    image_root: str | os.PathLike | None = None,
    seed: int = 0,
) -> tuple[list[dict[str, str]], list[SubsetSelection]]:
    """Unique images of MMEB-train `sources`, at most `per_subset` from each of `subsets` (default: the paper's 12;
    `None`: every subset found, in sorted order).

    Returns `(records, selections)`: one `{"id", "image", "subset"}` record per chosen image — `id` the path as
    MMEB-train names it (normalised, forward slashes), `image` the resolved path — subset by subset in the order
    given, and one `SubsetSelection` per subset.
    """
    if per_subset < 1:
        raise ValueError(f"per_subset must be at least 1, got {per_subset}")
    found = read_subset_images(sources, subsets, image_root)
    chosen: set[str] = set()
    records, selections = [], []
    for subset in subsets if subsets is not None else sorted(found):
        images = found[subset]
        candidates = [key for key in images.images if key not in chosen]
        random.Random(f"{seed}:{subset}").shuffle(candidates)
        taken = candidates[:per_subset]
        chosen.update(taken)
        records += [{"id": images.names[key], "image": images.images[key], "subset": subset} for key in taken]
        selections.append(
            SubsetSelection(
                subset,
                images.rows,
                images.bad_rows,
                len(images.images),
                len(images.images) - len(candidates),
                len(taken),
            )
        )
    return records, selections


def write_image_list(records: list[dict[str, str]], output_path: str | os.PathLike) -> None:
    """Write `records` (from `select_images`) as JSONL that `iter_images` reads: each `image` made relative to the
    output file's folder, where `iter_images` starts relative paths."""
    output_path = Path(output_path)
    output_path.parent.mkdir(parents=True, exist_ok=True)
    with output_path.open("w", encoding="utf-8") as handle:
        for record in records:
            image = Path(os.path.relpath(record["image"], output_path.parent)).as_posix()
            handle.write(json.dumps({**record, "image": image}) + "\n")
