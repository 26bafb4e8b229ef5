"""Shard storage: names by corpus range, atomic writes, reading, the finished shards of a folder, and the manifest."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from ..data.sources import BadRow

FORMATS = ("safetensors", "parquet")
SHARD_PREFIX = "embeddings-"


def shard_name(start: int, end: int, file_format: str = "safetensors") -> str:
    return f"{SHARD_PREFIX}{start:010d}-{end:010d}.{file_format}"


def finished_shards(folder: str | os.PathLike) -> list[Path]:
    """The complete shard files in `folder`, in corpus order (temporary files of a killed run are not listed)."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    return sorted(
        path for path in folder.iterdir() if path.name.startswith(SHARD_PREFIX) and path.suffix[1:] in FORMATS
    )


def finished_spans(folder: Path, shard_size: int) -> dict[int, Path]:
    """`start → file` of the shards already written as full shards of `shard_size`. A shorter one (the corpus end
    of an earlier run) is not listed, so it is redone if the corpus has grown; files cut with another shard size
    are an error rather than a silently mixed folder."""
    spans = {}
    for path in finished_shards(folder):
        start, end = (int(part) for part in path.stem[len(SHARD_PREFIX) :].split("-"))
        if start % shard_size or end - start > shard_size:
            raise ValueError(
                f"{folder} holds shards of another shard size ({path.name}); resume with the shard size "
                f"that wrote them, or use a new output folder"
            )
        if end - start == shard_size:
            spans[start] = path
    return spans


def remove_shorter_shards(folder: Path, path: Path) -> None:
    """Remove the shards that start where `path` does but end earlier (an earlier, smaller corpus's last shard)."""
    start = path.stem[len(SHARD_PREFIX) :].split("-")[0]
    for earlier in folder.glob(f"{SHARD_PREFIX}{start}-*"):
        if earlier != path and earlier.suffix[1:] in FORMATS:
            earlier.unlink()


def skipped_entry(bad: BadRow) -> dict:
    """How a shard and the manifest list a skipped row: `{"row": corpus position, "id", "error"}` (`row`, not
    `index`, as in every manifest written so far)."""
    return {"row": bad.index, "id": bad.id, "error": bad.error}


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
    manifest = {
        "rows": rows,
        "embedded": embedded,
        "skipped": len(skipped),
        "skipped_rows": skipped,
        "dimension": dimension,
        "shards": shards,
        **extra,
    }
    temporary = output / ".manifest.json.tmp"
    temporary.write_text(json.dumps(manifest, indent=2))
    os.replace(temporary, output / "manifest.json")
    return manifest
