"""The encode loop: a corpus's rows, cut into shards of consecutive rows, embedded batch by batch and written shard
by shard; finished shards are skipped (resume) once checked whole, and shards go to processes round-robin."""

from __future__ import annotations

import itertools
import logging
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch

from ..data.sources import BadRow
from ..inputs import CoMaInputError
from .shards import (
    FORMATS,
    finished_spans,
    manifest_entries,
    remove_shorter_shards,
    shard_damage,
    shard_name,
    skipped_entry,
    write_shard,
)
from .sources import CorpusRow

logger = logging.getLogger(__name__)

COUNTS = ("rows", "embedded", "skipped", "shards_written", "shards_already_done", "damaged_shards_redone")
ROLES = ("document", "query", "none")  # which of the processor's instructions goes with every row


def role_instruction(processor, role: str) -> str | None:
    """The processor's instruction for `role`: its `document_instruction`, its `query_instruction`, or none."""
    if role not in ROLES:
        raise ValueError(f"role must be one of {ROLES}, got {role!r}")
    return {"document": processor.document_instruction, "query": processor.query_instruction}.get(role)


# Kept long: 20 lines of docstring; the loop is one pass over the corpus with its shards and resume.
def encode_corpus(
    model: Any,
    rows: Iterable[CorpusRow],
    output_dir: str | os.PathLike,
    shard_size: int = 10_000,
    batch_size: int = 32,
    file_format: str = "safetensors",
    instruction: str | None = None,
    process_index: int = 0,
    num_processes: int = 1,
    progress: Any = None,
) -> dict:
    """Embed `rows` with `model.encode` into shard files in `output_dir`; returns counts for this process.

    Shard k goes to process `k % num_processes`; finished shards are skipped (resume) once checked whole
    (`shard_damage`: against the manifest's size and SHA-256, else by opening them) — a damaged one is redone, with a
    warning naming it and what is wrong. `progress`, if given, is a tqdm-like object updated with every row this
    process reads.
    """
    if file_format not in FORMATS:
        raise ValueError(f"file_format must be one of {FORMATS}, got {file_format!r}")
    if shard_size < 1 or batch_size < 1:
        raise ValueError("shard_size and batch_size must be positive")
    output = Path(output_dir)
    output.mkdir(parents=True, exist_ok=True)
    finished, recorded = finished_spans(output, shard_size), manifest_entries(output)
    counts = dict.fromkeys(COUNTS, 0)
    stream = iter(rows)
    for shard in itertools.count():
        start = shard * shard_size
        block = itertools.islice(stream, shard_size)
        mine = shard % num_processes == process_index
        if not mine or (start in finished and shard_is_whole(finished[start], recorded, counts)):
            size = sum(1 for _ in block)  # read past it without keeping its rows
            counts["rows"] += size
            if size and mine:
                counts["shards_already_done"] += 1
                _advance(progress, size)
            if size < shard_size:
                break
            continue
        size, embedded, skipped = encode_shard(
            model, block, start, output, batch_size, file_format, instruction, progress
        )
        counts["rows"] += size
        if size == 0:
            break
        counts["embedded"] += embedded
        counts["skipped"] += skipped
        counts["shards_written"] += 1
        if size < shard_size:
            break
    return counts


def encode_shard(
    model,
    rows: Iterable[CorpusRow],
    start: int,
    output: Path,
    batch_size: int,
    file_format: str,
    instruction: str | None,
    progress: Any = None,
) -> tuple[int, int, int]:
    """Embed one shard's rows (corpus positions from `start`) and write its file, replacing a shorter shard that
    started there (the last shard of an earlier, smaller corpus); returns `(rows, embedded, skipped)`. Nothing is
    written for no rows. The one shard writer of every engine (`encode_corpus`, `encode_corpus_ray`)."""
    size, ids, vectors, skipped = _embed_block(model, iter(rows), batch_size, instruction, progress)
    if size == 0:
        return 0, 0, 0
    metadata = {
        "start": start,
        "end": start + size,
        "skipped": [skipped_entry(bad) for bad in skipped],
        "instruction": instruction,
    }
    path = output / shard_name(start, start + size, file_format)
    write_shard(path, ids, vectors, metadata)
    remove_shorter_shards(output, path)
    for bad in skipped:
        logger.warning("Skipped row %d (id %s): %s", bad.index, bad.id, bad.error)
    return size, len(ids), len(skipped)


def shard_is_whole(path: Path, recorded: dict[str, dict], counts: dict) -> bool:
    """Whether a finished shard can be skipped; a damaged one is counted and named in a warning, and is redone."""
    damage = shard_damage(path, recorded.get(path.name))
    if damage is None:
        return True
    logger.warning("Redoing the damaged shard %s: %s", path, damage)
    counts["damaged_shards_redone"] += 1
    return False


def _embed_block(model, block: Iterator[CorpusRow], batch_size: int, instruction, progress):
    """`(rows read, ids, vectors, skipped)` of one shard, embedded in batches of consecutive rows (only one batch of
    rows is held at a time); rows that fail are dropped and reported with the reason."""
    size, ids, chunks, skipped = 0, [], [], []
    while batch := list(itertools.islice(block, batch_size)):
        size += len(batch)
        good = []
        for row in batch:
            if row.error is None:
                good.append(row)
            else:
                skipped.append(BadRow(row.position, row.id, row.error))
        vectors = _encode_dropping_bad_rows(model, good, instruction, skipped)
        if good:
            ids += [row.id for row in good]
            chunks.append(vectors)
        _advance(progress, len(batch))
    skipped.sort(key=lambda bad: bad.index)
    vectors = torch.cat(chunks) if chunks else torch.empty(0, model.config.embedding_size)
    return size, ids, vectors, skipped


def _encode_dropping_bad_rows(model, rows: list[CorpusRow], instruction, skipped: list[BadRow]) -> torch.Tensor | None:
    """Encode `rows` as one batch; a row the processor rejects is removed from `rows`, recorded, and the rest
    retried."""
    while rows:
        try:
            return model.encode(
                [row.input for row in rows], instruction=instruction, batch_size=len(rows), show_progress_bar=False
            )
        except CoMaInputError as error:  # names the failing input by its index in this batch
            position = error.position_in(rows)
            if position is None:
                raise
            bad = rows.pop(position)
            where = f"field {error.field!r}: " if error.field else ""
            skipped.append(BadRow(bad.position, bad.id, f"{where}{error.reason}"))
    return None


def _advance(progress, count: int) -> None:
    if progress is not None:
        progress.update(count)
