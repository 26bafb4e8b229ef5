"""Embedding corpora larger than memory: lazy sources, shards named by corpus range, resume, many processes.

A corpus is a stream of `(id, input)` rows — from a folder of images, a JSONL or CSV file, or a `datasets` dataset
(streaming too) — where an input is what `CoMaModel.encode` takes (`{"text": …, "image": …}`). Consecutive rows
are cut into shards of `shard_size`: shard k holds rows [k·S, (k+1)·S) and is written as
`embeddings-{start:010d}-{end:010d}.safetensors` (or `.parquet`). Names come from the corpus range, not from the
process that wrote them, so a resumed run — with any number of processes — skips every finished shard, and the
files equal an uninterrupted run's (batches never cross a shard boundary). Shards go to processes round-robin.

Memory stays flat as the corpus grows: a process holds one batch of decoded images and one shard's vectors at a time.
A shard is written under a temporary name and renamed, so a killed run leaves only whole shards. Rows that cannot be
embedded (missing or corrupt image, empty text, a line that is not JSON) are skipped and listed in their shard with
the reason; their ids are not in the embeddings.

Written by hand because neither `datasets.map` (keeps results with the dataset, no resume across process counts)
nor sentence-transformers' multi-process encoding (returns everything in memory) shards output by corpus range.
"""

from __future__ import annotations

import csv
import itertools
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator

import torch

from ..data.sources import read_jsonl_lines
from ..inputs import CoMaInputError

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
FORMATS = ("safetensors", "parquet")
SHARD_PREFIX = "embeddings-"


@dataclass
class CorpusRow:
    """One corpus row: its position in the corpus, its id, and the encode input (or why it has none)."""

    position: int
    id: str
    input: dict | None
    error: str | None = None


# --------------------------------------------------------------------------------------------------------------------
# Sources
# --------------------------------------------------------------------------------------------------------------------
def image_folder_rows(folder: str | os.PathLike) -> Iterator[CorpusRow]:
    """Every image file under `folder` (recursively, sorted by relative path); the id is that path."""
    root = Path(folder)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder not found: {folder}")
    paths = sorted(
        path.relative_to(root).as_posix() for path in root.rglob("*") if path.suffix.lower() in IMAGE_EXTENSIONS
    )
    for position, relative in enumerate(paths):
        yield CorpusRow(position, relative, {"image": str(root / relative)})


def jsonl_rows(
    path: str | os.PathLike, text_field: str | None = "text", image_field: str | None = "image",
    id_field: str | None = "id", image_root: str | None = None,
) -> Iterator[CorpusRow]:  # fmt: skip
    """One row per non-blank line of a JSONL file; a line that is not UTF-8 JSON is a row with an error that names the
    line. Image paths start at `image_root`, else at the file's folder."""
    root = image_root or str(Path(path).parent)
    for position, (_, record, error) in enumerate(read_jsonl_lines(path)):
        if error is not None:
            yield CorpusRow(position, str(position), None, error)
        else:
            yield _record_row(position, record, text_field, image_field, id_field, root)


def csv_rows(
    path: str | os.PathLike, text_field: str | None = "text", image_field: str | None = "image",
    id_field: str | None = "id", image_root: str | None = None,
) -> Iterator[CorpusRow]:  # fmt: skip
    """One row per CSV record (header first); image paths start at `image_root`, else at the file's folder."""
    root = image_root or str(Path(path).parent)
    with open(path, newline="", encoding="utf-8", errors="strict") as handle:
        for position, record in enumerate(csv.DictReader(handle)):
            yield _record_row(position, record, text_field, image_field, id_field, root)


def dataset_rows(
    dataset: Any, text_field: str | None = "text", image_field: str | None = "image", id_field: str | None = "id",
    image_root: str | None = None,
) -> Iterator[CorpusRow]:  # fmt: skip
    """Rows of a `datasets.Dataset` or `IterableDataset` (streaming). Image columns are read undecoded, so a row
    is decoded only when its batch is embedded."""
    features = getattr(dataset, "features", None) or {}
    if image_field and image_field in features and type(features[image_field]).__name__ == "Image":
        from datasets import Image as ImageFeature

        dataset = dataset.cast_column(image_field, ImageFeature(decode=False))
    for position, record in enumerate(dataset):
        yield _record_row(position, record, text_field, image_field, id_field, image_root)


def _record_row(position: int, record: dict, text_field, image_field, id_field, image_root) -> CorpusRow:
    identifier = str(record[id_field]) if id_field and record.get(id_field) is not None else str(position)
    text = record.get(text_field) if text_field else None
    image = record.get(image_field) if image_field else None
    if text is not None and not isinstance(text, str):
        return CorpusRow(position, identifier, None, f"row {position}, field {text_field!r}: expected text, got "
                         f"{type(text).__name__}")  # fmt: skip
    if isinstance(image, str) and image_root and not os.path.isabs(image) and "://" not in image:
        image = os.path.join(image_root, image)
    if image in ("", None) and not (text or "").strip():
        fields = " or ".join(repr(name) for name in (text_field, image_field) if name)
        return CorpusRow(position, identifier, None, f"row {position}: no {fields} (or only whitespace)")
    item = {"text": text or ""}
    if image not in ("", None):
        item["image"] = image
    return CorpusRow(position, identifier, item)


# --------------------------------------------------------------------------------------------------------------------
# Shards
# --------------------------------------------------------------------------------------------------------------------
def shard_name(start: int, end: int, file_format: str = "safetensors") -> str:
    return f"{SHARD_PREFIX}{start:010d}-{end:010d}.{file_format}"


def finished_shards(folder: str | os.PathLike) -> list[Path]:
    """The complete shard files in `folder`, in corpus order (temporary files of a killed run are not listed)."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    return sorted(path for path in folder.iterdir() if path.name.startswith(SHARD_PREFIX) and path.suffix[1:] in FORMATS)


def _finished_spans(folder: Path, shard_size: int) -> dict[int, Path]:
    """`start → file` of the shards already written as full shards of `shard_size`. A shorter one (the corpus end
    of an earlier run) is not listed, so it is redone if the corpus has grown; files cut with another shard size
    are an error rather than a silently mixed folder."""
    spans = {}
    for path in finished_shards(folder):
        start, end = (int(part) for part in path.stem[len(SHARD_PREFIX):].split("-"))
        if start % shard_size or end - start > shard_size:
            raise ValueError(f"{folder} holds shards of another shard size ({path.name}); resume with the shard size "
                             f"that wrote them, or use a new output folder")  # fmt: skip
        if end - start == shard_size:
            spans[start] = path
    return spans


def write_shard(path: Path, ids: list[str], vectors: torch.Tensor, metadata: dict) -> None:
    """Write one shard atomically: a temporary file in the same folder, then a rename."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        header = {key: json.dumps(value) for key, value in {**metadata, "ids": ids}.items()}
        save_file({"embeddings": vectors.contiguous()}, str(temporary), metadata=header)
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        column = pa.FixedSizeListArray.from_arrays(pa.array(vectors.numpy().reshape(-1)), vectors.shape[1])
        table = pa.table({"id": pa.array(ids, pa.string()), "embedding": column})
        table = table.replace_schema_metadata({key: json.dumps(value) for key, value in metadata.items()})
        pq.write_table(table, str(temporary))
    os.replace(temporary, path)


def read_shard(path: str | os.PathLike) -> tuple[list[str], torch.Tensor, dict]:
    """`(ids, [n, dim] float32 vectors, metadata)` of one shard file."""
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), "pt") as handle:
            header = {key: json.loads(value) for key, value in handle.metadata().items()}
            vectors = handle.get_tensor("embeddings")
        return header.pop("ids"), vectors, header
    import pyarrow.parquet as pq

    table = pq.read_table(str(path))
    metadata = {key.decode(): json.loads(value) for key, value in (table.schema.metadata or {}).items()}
    embeddings = table.column("embedding").combine_chunks()
    vectors = torch.from_numpy(embeddings.values.to_numpy(zero_copy_only=False).reshape(len(table), -1).copy())
    return table.column("id").to_pylist(), vectors, metadata


def load_embeddings(folder: str | os.PathLike) -> tuple[list[str], torch.Tensor]:
    """All ids and vectors of a finished corpus folder, in corpus order (this one holds everything in memory)."""
    ids, chunks = [], []
    for path in finished_shards(folder):
        shard_ids, vectors, _ = read_shard(path)
        ids += shard_ids
        chunks.append(vectors)
    return ids, torch.cat(chunks) if chunks else torch.empty(0, 0)


# --------------------------------------------------------------------------------------------------------------------
# Encoding
# --------------------------------------------------------------------------------------------------------------------
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

    Shard k goes to process `k % num_processes`; finished shards are skipped (resume). `progress`, if given, is a
    tqdm-like object updated with every row this process reads.
    """
    if file_format not in FORMATS:
        raise ValueError(f"file_format must be one of {FORMATS}, got {file_format!r}")
    if shard_size < 1 or batch_size < 1:
        raise ValueError("shard_size and batch_size must be positive")
    output = Path(output_dir)
    output.mkdir(parents=True, exist_ok=True)
    finished = _finished_spans(output, shard_size)
    counts = {"rows": 0, "embedded": 0, "skipped": 0, "shards_written": 0, "shards_already_done": 0}
    stream = iter(rows)
    for shard in itertools.count():
        start = shard * shard_size
        block = itertools.islice(stream, shard_size)
        if shard % num_processes != process_index or start in finished:
            size = sum(1 for _ in block)  # read past it without keeping its rows
            counts["rows"] += size
            if size and shard % num_processes == process_index:
                counts["shards_already_done"] += 1
                _advance(progress, size)
            if size < shard_size:
                break
            continue
        size, ids, vectors, skipped = _embed_block(model, block, batch_size, instruction, progress)
        counts["rows"] += size
        if size == 0:
            break
        end = start + size
        metadata = {"start": start, "end": end, "skipped": skipped, "instruction": instruction}
        path = output / shard_name(start, end, file_format)
        write_shard(path, ids, vectors, metadata)
        for earlier in output.glob(f"{SHARD_PREFIX}{start:010d}-*"):  # a shorter shard of an earlier, smaller corpus
            if earlier != path and earlier.suffix[1:] in FORMATS:
                earlier.unlink()
        counts["embedded"] += len(ids)
        counts["skipped"] += len(skipped)
        counts["shards_written"] += 1
        for entry in skipped:
            logger.warning("Skipped row %d (id %s): %s", entry["row"], entry["id"], entry["error"])
        if size < shard_size:
            break
    return counts


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
                skipped.append({"row": row.position, "id": row.id, "error": row.error})
        vectors = _encode_dropping_bad_rows(model, good, instruction, skipped)
        if good:
            ids += [row.id for row in good]
            chunks.append(vectors)
        _advance(progress, len(batch))
    skipped.sort(key=lambda entry: entry["row"])
    vectors = torch.cat(chunks) if chunks else torch.empty(0, model.config.embedding_size)
    return size, ids, vectors, skipped


def _encode_dropping_bad_rows(model, rows: list[CorpusRow], instruction, skipped: list[dict]) -> torch.Tensor | None:
    """Encode `rows` as one batch; a row the processor rejects is removed from `rows`, recorded, and the rest retried."""
    while rows:
        try:
            return model.encode([row.input for row in rows], instruction=instruction, batch_size=len(rows),
                                show_progress_bar=False)  # fmt: skip
        except CoMaInputError as error:  # names the failing input by its index in this batch
            position = error.position_in(rows)
            if position is None:
                raise
            bad = rows.pop(position)
            where = f"field {error.field!r}: " if error.field else ""
            skipped.append({"row": bad.position, "id": bad.id, "error": f"{where}{error.reason}"})
    return None


def _advance(progress, count: int) -> None:
    if progress is not None:
        progress.update(count)


def write_manifest(output_dir: str | os.PathLike, **extra: Any) -> dict:
    """Summarise the finished shards of `output_dir` in `manifest.json` (rows, embedded, skipped, dimension) and
    remove temporary files that killed runs left; call it once every process has finished."""
    output = Path(output_dir)
    for leftover in output.glob(f".{SHARD_PREFIX}*.tmp"):  # from killed runs; every process has finished by now
        leftover.unlink()
    shards, rows, embedded, skipped, dimension = [], 0, 0, [], None
    for path in finished_shards(output):
        ids, vectors, metadata = read_shard(path)
        shards.append({"file": path.name, "start": metadata["start"], "end": metadata["end"], "embedded": len(ids)})
        rows += metadata["end"] - metadata["start"]
        embedded += len(ids)
        skipped += metadata["skipped"]
        dimension = dimension or (vectors.shape[1] if len(ids) else None)
    manifest = {"rows": rows, "embedded": embedded, "skipped": len(skipped), "skipped_rows": skipped,
                "dimension": dimension, "shards": shards, **extra}  # fmt: skip
    temporary = output / ".manifest.json.tmp"
    temporary.write_text(json.dumps(manifest, indent=2))
    os.replace(temporary, output / "manifest.json")
    return manifest


def build_faiss_index(output_dir: str | os.PathLike) -> Path:
    """An exact inner-product faiss index (cosine: the vectors are unit-norm) over every shard, added shard by shard;
    written as `index.faiss` with `index_ids.json` (row i of the index is id i). Needs `pip install faiss-cpu`."""
    import faiss

    output = Path(output_dir)
    index, ids = None, []
    for path in finished_shards(output):
        shard_ids, vectors, _ = read_shard(path)
        if not shard_ids:
            continue
        index = index or faiss.IndexFlatIP(vectors.shape[1])
        index.add(vectors.float().numpy())
        ids += shard_ids
    if index is None:
        raise ValueError(f"no embeddings in {output_dir}")
    faiss.write_index(index, str(output / "index.faiss"))
    (output / "index_ids.json").write_text(json.dumps(ids))
    return output / "index.faiss"


def search_index(output_dir: str | os.PathLike, queries: torch.Tensor, top_k: int = 5) -> list[list[tuple[str, float]]]:
    """For each query vector, the `top_k` nearest corpus ids with their cosine scores."""
    import faiss

    output = Path(output_dir)
    index = faiss.read_index(str(output / "index.faiss"))
    ids = json.loads((output / "index_ids.json").read_text())
    scores, positions = index.search(queries.float().numpy(), min(top_k, index.ntotal))
    return [[(ids[p], float(s)) for p, s in zip(row_positions, row_scores) if p >= 0]
            for row_positions, row_scores in zip(positions, scores)]  # fmt: skip
