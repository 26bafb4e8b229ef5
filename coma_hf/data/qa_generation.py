"""Automatic QA for real images, following the paper's two steps with any instruction-tuned VLM in transformers.

1. **Questions.** The VLM is asked, in one chat per image, for retrieval-oriented questions, one per turn and each
   about one of the paper's kinds (objects and attributes; scene, time and weather; visible text and logos; spatial
   relations; then objects again). Asking one per turn, rather than parsing a list, gives every image exactly
   `num_questions` questions (3–5) covering the kinds, whatever the model's formatting habits.
2. **Answers.** The same VLM answers the questions as one multi-turn chat about the image.

Batched across images, with a progress bar; records are appended to a JSONL file in the stage-1 schema as each batch
finishes, and images whose id is already in the file are skipped, so an interrupted run resumes where it stopped
(a last line the interruption cut is dropped first, so no record merges into it).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
from transformers.utils.logging import tqdm

from ..inputs import CoMaInputError, fit_aspect_ratio, load_image
from .sources import image_files, image_root_of, read_jsonl_lines, resolve_image_path

logger = logging.getLogger(__name__)

QUESTION_KINDS = (
    ("objects", "the main objects and their attributes (colour, size, material, count)"),
    ("scene", "the scene, the place, the time of day or the weather"),
    ("text", "any visible text, numbers, signs or logos"),
    ("spatial", "where things are relative to each other"),
    ("details", "a distinctive detail that sets this image apart from similar ones"),
)
FIRST_QUESTION = (
    "We want to find this image again in a large collection. Ask one short question about {about} in this "
    "image. Reply with the question only."
)
NEXT_QUESTION = "Ask one more short question, this time about {about}. Reply with the question only."


def iter_images(source: str | os.PathLike, image_root: str | None = None) -> Iterator[tuple[str, str]]:
    """`(id, path)` of every image in a folder (recursively; id = relative path) or a JSONL with `image` fields
    (relative paths start at `image_root`, else at the file's folder); a line that is not JSON stops with an error
    naming it."""
    source = Path(source)
    if source.is_dir():
        for relative in image_files(source):
            yield relative, str(source / relative)
        return
    root = image_root_of(source, image_root)
    for line_number, row, error in read_jsonl_lines(source):
        if error is not None:
            raise CoMaInputError(error, field="line")
        if "image" not in row:
            raise CoMaInputError("no 'image' field", f"line {line_number}", "image")
        yield str(row.get("id", row["image"])), resolve_image_path(row["image"], root)


def finished_ids(output_path: str | os.PathLike) -> set[str]:
    """Ids already written to `output_path` (a resumed run skips them)."""
    path = Path(output_path)
    if not path.exists():
        return set()
    # a line cut by an interruption is not JSON, so not done: that image is redone
    return {str(record["id"]) for _, record, error in read_jsonl_lines(path) if error is None and "id" in record}


def _record_id(line: str | bytes) -> str | None:
    """The id of a complete record line, or None for a blank or cut one."""
    try:
        return str(json.loads(line)["id"])
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError):
        return None


def repair_cut_last_line(output_path: str | os.PathLike) -> None:
    """End `output_path` on a complete line, so a resumed run's first record does not merge into a fragment.

    A kill mid-write leaves a last line without its newline: a fragment is cut off (its image is redone), a
    complete record that only lost its newline gets it back (it is already counted as done).
    """
    path = Path(output_path)
    if not path.exists():
        return
    with path.open("rb+") as handle:
        end = handle.seek(0, os.SEEK_END)
        if end == 0 or _byte_at(handle, end - 1) == b"\n":
            return
        start = _last_line_start(handle, end)
        handle.seek(start)
        if _record_id(handle.read()) is not None:
            handle.write(b"\n")
        else:
            logger.warning("Dropping the cut last line of %s (an interrupted run); its image is redone", path)
            handle.truncate(start)


def _byte_at(handle, offset: int) -> bytes:
    handle.seek(offset)
    return handle.read(1)


def _last_line_start(handle, end: int, chunk: int = 1 << 16) -> int:
    """Offset just after the last newline before `end` (0 if none), reading backwards so a large file is not read."""
    position = end
    while position > 0:
        size = min(chunk, position)
        position -= size
        handle.seek(position)
        newline = handle.read(size).rfind(b"\n")
        if newline >= 0:
            return position + newline + 1
    return 0


@torch.no_grad()
def _reply(model, processor, chats: list[list[dict]], max_new_tokens: int) -> list[str]:
    """One greedy assistant turn for each chat."""
    inputs = processor.apply_chat_template(
        chats, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt", padding=True
    ).to(model.device)
    output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    new_tokens = output[:, inputs["input_ids"].shape[1] :]
    return [text.strip() for text in processor.batch_decode(new_tokens, skip_special_tokens=True)]


def _user(text: str, image: Any = None) -> dict:
    content = ([{"type": "image", "image": image}] if image is not None else []) + [{"type": "text", "text": text}]
    return {"role": "user", "content": content}


def _assistant(text: str) -> dict:
    return {"role": "assistant", "content": [{"type": "text", "text": text}]}


def questions_and_answers(
    model, processor, images: list, num_questions: int = 4, max_new_tokens: int = 64
) -> list[list[dict]]:
    """For each image, `num_questions` questions (step 1) and their answers from one multi-turn chat (step 2)."""
    if not 3 <= num_questions <= 5:
        raise ValueError(f"num_questions must be between 3 and 5 (the paper's range), got {num_questions}")
    kinds = QUESTION_KINDS[:num_questions]
    asking = [[_user(FIRST_QUESTION.format(about=kinds[0][1]), image)] for image in images]
    questions: list[list[str]] = [[] for _ in images]
    for index, (_, about) in enumerate(kinds):
        if index:
            for chat in asking:
                chat.append(_user(NEXT_QUESTION.format(about=about)))
        for chat, asked, reply in zip(
            asking, questions, _reply(model, processor, asking, max_new_tokens), strict=False
        ):
            chat.append(_assistant(reply))
            asked.append(reply)
    answering = [[] for _ in images]
    turns: list[list[dict]] = [[] for _ in images]
    for index, (kind, _) in enumerate(kinds):
        for chat, image, asked in zip(answering, images, questions, strict=False):
            chat.append(_user(asked[index], image if index == 0 else None))
        for chat, record, asked, reply in zip(
            answering, turns, questions, _reply(model, processor, answering, max_new_tokens), strict=False
        ):
            chat.append(_assistant(reply))
            record.append({"question": asked[index], "answer": reply, "type": kind})
    return turns


def generate_qa(
    model,
    processor,
    images: Iterable[tuple[str, Any]],
    output_path: str | os.PathLike,
    num_questions: int = 4,
    batch_size: int = 8,
    max_new_tokens: int = 64,
    image_root: str | None = None,
    total: int | None = None,
) -> dict:
    """Write stage-1 records (`id`, `image`, `text`, `conversation`) for `images` (`(id, path or PIL image)` pairs)
    to `output_path`, skipping ids already there. Unreadable images are skipped, counted and logged.

    Returns counts: `written`, `skipped_done`, `skipped_unreadable`.
    """
    processor.tokenizer.padding_side = "left"  # generation continues from the right end
    repair_cut_last_line(output_path)
    done = finished_ids(output_path)
    counts = {"written": 0, "skipped_done": 0, "skipped_unreadable": 0}
    output_path = Path(output_path)
    output_path.parent.mkdir(parents=True, exist_ok=True)
    with (
        output_path.open("a", encoding="utf-8") as handle,
        tqdm(total=total, desc="Generating QA", unit="image") as bar,
    ):
        batch: list[tuple[str, Any, Any]] = []
        for image_id, image in images:
            if str(image_id) in done:
                counts["skipped_done"] += 1
                bar.update(1)
                continue
            try:
                batch.append((str(image_id), image, fit_aspect_ratio(load_image(image, sample=image_id))))
            except CoMaInputError as error:
                logger.warning("Skipping unreadable image: %s", error)
                counts["skipped_unreadable"] += 1
                bar.update(1)
                continue
            if len(batch) == batch_size:
                counts["written"] += _write_batch(
                    model, processor, batch, handle, num_questions, max_new_tokens, image_root
                )
                bar.update(len(batch))
                batch = []
        if batch:
            counts["written"] += _write_batch(
                model, processor, batch, handle, num_questions, max_new_tokens, image_root
            )
            bar.update(len(batch))
    return counts


def _write_batch(model, processor, batch, handle, num_questions, max_new_tokens, image_root) -> int:
    conversations = questions_and_answers(
        model, processor, [picture for _, _, picture in batch], num_questions, max_new_tokens
    )
    for (image_id, image, _), conversation in zip(batch, conversations, strict=False):
        stored = image if isinstance(image, str) else None
        if stored and image_root and os.path.isabs(stored):
            stored = os.path.relpath(stored, image_root)
        handle.write(json.dumps({"id": image_id, "image": stored, "text": None, "conversation": conversation}) + "\n")
    handle.flush()
    return len(batch)
