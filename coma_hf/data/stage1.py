"""Stage-1 data: one schema, several readers.

The schema of one stage-1 sample (what `normalize_stage1_record` returns)::

    {"id": str, "image": path | PIL image | None, "text": str | None,
     "conversation": [{"question": str, "answer": str}, ...]}      # at least one turn

Readers accept, per row, any of:

* this schema (`conversation` with `question` / `answer`, an optional `type` per turn is kept);
* LLaVA / ShareGPT: `conversations` with `from` (`human`/`user`, `gpt`/`assistant`) and `value`; the `<image>`
  placeholder is removed from the questions;
* chat messages: `messages` with `role` and `content` (a string, or a list of `{"type": "text"|"image", …}`);

with the image under `image` (or the first of `images`): a path — relative paths are resolved against the image
root, which defaults to the JSONL file's folder — or a `datasets.Image` value.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import Any

from ..inputs import CoMaInputError
from ..processing_coma import processor_method
from .sources import (
    BadRow,
    check_readable,
    image_root_of,
    is_saved_dataset,
    load_data_file,
    open_dataset,
    resolve_image_path,
    row_id,
)

logger = logging.getLogger(__name__)
PLACEHOLDER = re.compile(r"<image>|<\|image_\d+\|>")
USER_ROLES = ("human", "user")
ASSISTANT_ROLES = ("gpt", "assistant", "model")


def load_stage1_dataset(source: str | os.PathLike, split: str = "train", image_root: str | None = None):
    """A `datasets.Dataset` of raw stage-1 rows and the image root to resolve them with.

    `source` is a JSONL, JSON or parquet file, a folder holding `{split}.jsonl` (as `write_synthetic_dataset`
    writes), a folder saved with `Dataset.save_to_disk`, or a Hub dataset id (the only case that may touch the
    network).
    Returns `(dataset, image_root)`.
    """
    path = Path(source)
    if path.is_file():
        return load_data_file(path), image_root_of(path, image_root)
    if path.is_dir() and (path / f"{split}.jsonl").is_file():
        return load_stage1_dataset(path / f"{split}.jsonl", split, image_root)
    if path.exists() and not is_saved_dataset(path):
        raise ValueError(f"{source}: not a JSONL file, a folder with {split}.jsonl, or a saved dataset")
    return open_dataset(source, split=split), image_root


def normalize_stage1_record(row: dict, index: int = 0, image_root: str | None = None) -> dict:
    """Map a row in any supported format onto the stage-1 schema; `CoMaInputError` names the row and field."""
    sample = row_id(row, index)
    check_readable(row, sample)
    image = resolve_image_path(_image_of(row), image_root)
    text = row.get("text")
    if text is not None and not isinstance(text, str):
        raise CoMaInputError(f"text must be a string, got {type(text).__name__}", sample, "text")
    if "conversation" in row and row["conversation"] is not None:
        conversation = _schema_turns(row["conversation"], sample)
    elif row.get("conversations") is not None:
        conversation = _pair_turns(
            [(turn.get("from"), turn.get("value")) for turn in row["conversations"]], sample, "conversations"
        )
    elif row.get("messages") is not None:
        conversation = _pair_turns(
            [
                (message.get("role"), _message_text(message.get("content")))
                for message in row["messages"]
                if message.get("role") != "system"
            ],
            sample,
            "messages",
        )
    else:
        raise CoMaInputError("no 'conversation', 'conversations' or 'messages' field", sample, "conversation")
    if not conversation:
        raise CoMaInputError("the conversation has no question/answer turn", sample, "conversation")
    return {"id": sample, "image": image, "text": text, "conversation": conversation}


def _image_of(row: dict) -> Any:
    image = row.get("image")
    if image is None and row.get("images"):
        image = row["images"][0]
    return image


def _schema_turns(turns: Any, sample: Any) -> list[dict]:
    if not isinstance(turns, list):
        raise CoMaInputError("conversation must be a list of {'question', 'answer'} turns", sample, "conversation")
    normalized = []
    for position, turn in enumerate(turns):
        if not isinstance(turn, dict) or "question" not in turn or "answer" not in turn:
            raise CoMaInputError(f"turn {position} needs 'question' and 'answer'", sample, "conversation")
        normalized.append({key: turn[key] for key in ("question", "answer", "type") if turn.get(key) is not None})
    return normalized


def _pair_turns(messages: list[tuple[Any, Any]], sample: Any, field_name: str) -> list[dict]:
    """Pair alternating user/assistant messages into turns."""
    turns = []
    for position in range(0, len(messages) - 1, 2):
        (user_role, question), (assistant_role, answer) = messages[position], messages[position + 1]
        if user_role not in USER_ROLES or assistant_role not in ASSISTANT_ROLES:
            raise CoMaInputError(
                f"messages {position} and {position + 1} must be a user turn then an assistant turn, got "
                f"{user_role!r}, {assistant_role!r}",
                sample,
                field_name,
            )
        turns.append({"question": PLACEHOLDER.sub("", question or "").strip(), "answer": (answer or "").strip()})
    return turns


def _message_text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(
            part.get("text", "") for part in content if isinstance(part, dict) and part.get("type") == "text"
        )
    return ""


def hold_out_by_image(dataset, percentage: float, max_rows: int, seed: int = 0, image_root: str | None = None):
    """Split `dataset` into (train, held out) so that no image is in both: whole groups of rows, drawn in a seeded
    order, until the held-out part has `percentage` % of the rows (at least one), never more than `max_rows`.

    A group is every row that shares an image with another row of it, transitively: each image of a multi-image row
    counts, and an image is known by its bytes (a path is read from `image_root`, else the current folder; a file
    that cannot be read is known by its path), so one picture at two paths stays on one side. Rows without an image
    are grouped by their text. Returns `(dataset, None)` when nothing can be held out (a percentage or cap of 0, or
    one group behind every row).
    """
    import math
    import random

    if not 0 <= percentage < 100:
        raise ValueError(f"the held-out percentage must be in [0, 100), got {percentage}")
    target = min(math.ceil(len(dataset) * percentage / 100), max_rows)
    if target <= 0 or len(dataset) < 2:
        return dataset, None
    groups = rows_sharing_images(_image_keys(dataset, image_root))
    order = sorted(groups)
    random.Random(seed).shuffle(order)
    held: list[int] = []
    for key in order[:-1]:  # the last group always trains
        if len(held) >= target:
            break
        if len(held) + len(groups[key]) > max_rows:
            continue  # a group with many rows would overshoot the cap; a smaller one may fit
        held += groups[key]
    if not held:
        return dataset, None
    kept = sorted(set(range(len(dataset))) - set(held))
    return dataset.select(kept), dataset.select(sorted(held))


def rows_sharing_images(keys: list[list[str]]) -> dict[str, list[int]]:
    """The rows grouped so that rows with a key in common are in one group, transitively (union-find over the keys of
    each row); each group is named by its smallest key, its rows in order."""
    parent = list(range(len(keys)))

    def root(row: int) -> int:
        while parent[row] != row:
            parent[row] = parent[parent[row]]
            row = parent[row]
        return row

    first_row: dict[str, int] = {}
    for row, row_keys in enumerate(keys):
        for key in row_keys:
            other = first_row.setdefault(key, row)
            parent[root(row)] = root(other)
    members: dict[int, list[int]] = {}
    for row in range(len(keys)):
        members.setdefault(root(row), []).append(row)
    return {min(key for row in rows for key in keys[row]): rows for rows in members.values()}


def _image_keys(dataset, image_root: str | None = None, batch_size: int = 1000) -> list[list[str]]:
    """The keys of each row: one per image (a digest of its bytes, else its path), or its text when it has none;
    read a batch at a time and without decoding images."""
    import datasets

    columns = dataset.column_names
    name = "image" if "image" in columns else "images" if "images" in columns else None
    if name is not None:
        feature = dataset.features[name]
        if isinstance(feature, datasets.Image):
            dataset = dataset.cast_column(name, datasets.Image(decode=False))
        elif isinstance(getattr(feature, "feature", None), datasets.Image):
            dataset = dataset.cast_column(name, datasets.List(datasets.Image(decode=False)))
    wanted = [column for column in (name, "text") if column in columns]
    if not wanted:  # rows with neither image nor text are bad rows; each its own group
        return [[f"row:{index}"] for index in range(len(dataset))]
    keys: list[list[str]] = []
    for batch in dataset.select_columns(wanted).iter(batch_size=batch_size):
        images = batch.get(name) or [None] * len(next(iter(batch.values())))
        texts = batch.get("text") or [None] * len(images)
        for image, text in zip(images, texts, strict=False):
            row_images = (image or []) if name == "images" else [image]
            row_keys = [key for key in (_image_key(item, image_root) for item in row_images) if key]
            keys.append(row_keys or [f"text:{text if text is not None else f'row {len(keys)}'}"])
    return keys


def _image_key(image, image_root: str | None = None) -> str | None:
    """`image:<sha1 of the bytes>`, or `path:<normalised path>` for a file that cannot be read; `None` without an
    image. Bytes first: files stored in a dataset often share bare names (`image.jpg`), and one picture may be stored
    at two paths."""
    import hashlib

    if isinstance(image, dict):
        data, image = image.get("bytes"), image.get("path")
        if data:
            return f"image:{hashlib.sha1(data).hexdigest()}"
    if isinstance(image, str) and image:
        path = Path(image_root or ".") / image
        try:
            return f"image:{hashlib.sha1(path.read_bytes()).hexdigest()}"
        except OSError:  # a bad row: the validation names it; here it only needs a group
            return f"path:{os.path.normpath(image)}"
    if image is not None and hasattr(image, "tobytes"):  # a PIL image
        return f"image:{hashlib.sha1(image.tobytes()).hexdigest()}"
    return None


def validate_stage1_dataset(dataset, processor, image_root: str | None = None) -> list[BadRow]:
    """Render every row once (images decoded, lengths checked) and return the rows that fail, with reasons."""
    from transformers.utils.logging import tqdm

    bad = []
    for index in tqdm(range(len(dataset)), desc="Validating stage-1 data", unit="row"):
        row = dataset[index]
        try:
            record = normalize_stage1_record(row, index, image_root)
            processor_method(processor, "render_qa_sample")(
                record["image"], record["text"], record["conversation"], sample=record["id"]
            )
        except CoMaInputError as error:
            bad.append(BadRow(index, row_id(row, index), str(error)))
    return bad
