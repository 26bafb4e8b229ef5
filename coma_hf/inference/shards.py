"""Shard storage: names by corpus range, atomic writes, reading, the finished shards of a folder, the manifest, and
the checks that keep a damaged shard from being trusted.

A shard is checked before a resumed run skips it (`shard_damage`): against its manifest entry (size and SHA-256,
recorded when the shard was read whole) when there is one, else by opening it and comparing its row counts (ids,
vectors, and its corpus range less its skipped rows). The manifest vouches only for shards not written after it (a
shard redone later is checked by opening it); a damaged manifest vouches for none.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from ..data.sources import BadRow
from ..storage import DamagedFileError, file_sha256, load_record, safetensors_damage, write_atomically, write_record

FORMATS = ("safetensors", "parquet")
SHARD_PREFIX = "embeddings-"
MANIFEST = "manifest.json"


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
    """`start → file` of the shards already written as full shards of `shard_size`, by name (`shard_damage` checks
    one before a resumed run skips it). A shorter one (the corpus end
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
    """Write one shard atomically: a temporary file in the same folder, then a rename (`write_atomically`)."""
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        header = {key: json.dumps(value) for key, value in {**metadata, "ids": ids}.items()}
        tensors = {"embeddings": vectors.contiguous()}
        write_atomically(path, lambda temporary: save_file(tensors, str(temporary), metadata=header))
        return
    import pyarrow as pa
    import pyarrow.parquet as pq

    column = pa.FixedSizeListArray.from_arrays(pa.array(vectors.numpy().reshape(-1)), vectors.shape[1])
    table = pa.table({"id": pa.array(ids, pa.string()), "embedding": column})
    table = table.replace_schema_metadata({key: json.dumps(value) for key, value in metadata.items()})
    write_atomically(path, lambda temporary: pq.write_table(table, str(temporary)))


def read_shard(path: str | os.PathLike) -> tuple[list[str], torch.Tensor, dict]:
    """`(ids, [n, dim] float32 vectors, metadata)` of one shard file; a damaged one raises `DamagedFileError` naming
    it (not the reader's own error, which names neither the file nor the remedy)."""
    path = Path(path)
    with _named_damage(path):
        if path.suffix == ".safetensors":
            with _open_safetensors(path) as handle:
                header = {key: json.loads(value) for key, value in handle.metadata().items()}
                vectors = handle.get_tensor("embeddings")
            return header.pop("ids"), vectors, header
        import pyarrow.parquet as pq

        table = pq.read_table(str(path))
        embeddings = table.column("embedding").combine_chunks()
        vectors = torch.from_numpy(embeddings.values.to_numpy(zero_copy_only=False).reshape(len(table), -1).copy())
        return table.column("id").to_pylist(), vectors, _parquet_metadata(table.schema)


def shard_damage(path: Path, recorded: dict | None = None) -> str | None:
    """What is wrong with a finished shard file, or `None` when a resumed run may skip it. With `recorded` (its
    manifest entry) the file's size and SHA-256 must be the recorded ones; without, it must open and its counts must
    agree: as many ids as vectors, and as many as its corpus range holds less its skipped rows."""
    if recorded is not None and "sha256" in recorded:
        if (size := path.stat().st_size) != recorded.get("bytes", size):
            return f"{size} bytes where the manifest recorded {recorded['bytes']}"
        if file_sha256(path) != recorded["sha256"]:
            return "its SHA-256 is not the one the manifest recorded"
        return None
    try:
        ids, rows, start, end, skipped = _shard_counts(path)
    except DamagedFileError as error:
        return error.damage
    if not ids == rows == end - start - skipped:
        return f"{ids} ids and {rows} vectors, but its range less its skipped rows holds {end - start - skipped}"
    if path.name != shard_name(start, end, path.suffix[1:]):
        return f"its metadata says rows {start}-{end}"
    return None


def _shard_counts(path: Path) -> tuple[int, int, int, int, int]:
    """`(ids, vectors, start, end, skipped rows)` of a shard, counted without reading its vectors."""
    with _named_damage(path):
        if path.suffix == ".safetensors":
            with _open_safetensors(path) as handle:
                metadata = {key: json.loads(value) for key, value in handle.metadata().items()}
                rows = handle.get_slice("embeddings").get_shape()[0]
            ids = len(metadata["ids"])
        else:
            import pyarrow.parquet as pq

            shard = pq.ParquetFile(str(path))
            ids = len(shard.read(columns=["id"]).column("id"))
            rows, metadata = shard.metadata.num_rows, _parquet_metadata(shard.schema_arrow)
        return ids, rows, int(metadata["start"]), int(metadata["end"]), len(metadata["skipped"])


def _parquet_metadata(schema) -> dict:
    return {key.decode(): json.loads(value) for key, value in (schema.metadata or {}).items()}


@contextlib.contextmanager
def _open_safetensors(path: Path) -> Iterator[Any]:
    """`safe_open` of a shard whose header and tensor ranges were checked first (`safetensors_damage`)."""
    from safetensors import safe_open

    if (damage := safetensors_damage(path)) is not None:
        raise DamagedFileError(path, damage)
    with safe_open(str(path), "pt") as handle:
        yield handle


@contextlib.contextmanager
def _named_damage(path: Path) -> Iterator[None]:
    """Any error of reading a shard that opened — a cut parquet file, metadata that is not JSON, a missing entry —
    as a `DamagedFileError` naming it."""
    from safetensors import SafetensorError

    try:
        yield
    except DamagedFileError:
        raise
    except (OSError, ValueError, KeyError, TypeError, SafetensorError) as error:
        raise DamagedFileError(path, f"cannot be read ({type(error).__name__}: {error})") from error


def load_embeddings(folder: str | os.PathLike) -> tuple[list[str], torch.Tensor]:
    """All ids and vectors of a finished corpus folder, in corpus order (this one holds everything in memory)."""
    ids, chunks = [], []
    for path in finished_shards(folder):
        shard_ids, vectors, _ = read_shard(path)
        ids += shard_ids
        chunks.append(vectors)
    return ids, torch.cat(chunks) if chunks else torch.empty(0, 0)


def write_manifest(output_dir: str | os.PathLike, **extra: Any) -> dict:
    """Summarise the finished shards of `output_dir` in `manifest.json` (rows, embedded, skipped, dimension, and per
    shard its size and SHA-256, which a resumed run checks) and remove temporary files that killed runs left; call it
    once every process has finished. A damaged shard raises `DamagedFileError` (running the encode again redoes it)."""
    output = Path(output_dir)
    for leftover in output.glob(f".{SHARD_PREFIX}*.tmp"):  # from killed runs; every process has finished by now
        leftover.unlink()
    shards, rows, embedded, skipped, dimension = [], 0, 0, [], None
    for path in finished_shards(output):
        if (damage := shard_damage(path)) is not None:
            raise DamagedFileError(path, f"{damage}; run the encode again to redo it")
        ids, vectors, metadata = read_shard(path)
        shards.append(
            {
                "file": path.name,
                "start": metadata["start"],
                "end": metadata["end"],
                "rows": metadata["end"] - metadata["start"],
                "embedded": len(ids),
                "bytes": path.stat().st_size,
                "sha256": file_sha256(path),
            }
        )
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
    write_record(output / MANIFEST, manifest, indent=2)
    return manifest


def manifest_entries(output_dir: str | os.PathLike) -> dict[str, dict]:
    """`file name → manifest entry` of the shards the manifest can vouch for: none when it is missing or damaged
    (`load_record` warns), and none written after it (a shard redone since, by a run killed before its manifest)."""
    path = Path(output_dir) / MANIFEST
    return _vouched_for(load_record(path), path)


def verified_manifest(output_dir: str | os.PathLike) -> dict | None:
    """The manifest of a finished folder when it and every shard it lists are whole (`shard_damage` against its
    entries); `None` when it is missing or damaged or a shard it lists is missing or damaged — the folder then needs
    an `encode_corpus` run, which redoes exactly the damaged shards and says which."""
    path = Path(output_dir) / MANIFEST
    manifest = load_record(path)
    shards = manifest.get("shards") if manifest is not None else None
    if not isinstance(shards, list):
        return None
    entries = _vouched_for(manifest, path)
    listed = [entry.get("file") if isinstance(entry, dict) else None for entry in shards]
    if any(name not in entries for name in listed):
        return None
    return manifest if all(shard_damage(path.parent / name, entries[name]) is None for name in listed) else None


def _vouched_for(manifest: dict | None, path: Path) -> dict[str, dict]:
    """The entries of `manifest` (read from `path`) whose shard file is there and not newer than the manifest."""
    if manifest is None or not isinstance(manifest.get("shards"), list):
        return {}
    written = path.stat().st_mtime_ns
    entries = {}
    for entry in manifest["shards"]:
        shard = path.parent / str(entry.get("file")) if isinstance(entry, dict) else None
        if shard is not None and shard.is_file() and shard.stat().st_mtime_ns <= written:
            entries[shard.name] = entry
    return entries
