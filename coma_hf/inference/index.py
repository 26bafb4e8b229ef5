"""Searching a finished corpus folder: `search` chooses the backend — one matrix product (`search_embeddings`), an
exact faiss index (`pip install faiss-cpu`), or a LanceDB table with metadata and filters (`lancedb_store`).

The index is derived data: `load_faiss_index` builds it when it is missing and rebuilds it from the shards, with a
warning naming the file and what is wrong, when it is damaged (zero-length, unreadable, or not matching its id list).
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import torch

from ..storage import DamagedFileError, write_atomically
from .shards import finished_shards, load_embeddings, read_shard

logger = logging.getLogger(__name__)

INDEX_FILE = "index.faiss"
INDEX_IDS_FILE = "index_ids.json"  # row i of the index is this list's id i
BACKENDS = ("matrix", "faiss", "lancedb")
LANCEDB_FOLDER = "lancedb"  # the default database folder, inside the corpus folder


def search(
    output_dir: str | os.PathLike,
    queries: torch.Tensor,
    top_k: int = 5,
    backend: str = "matrix",
    db_dir: str | os.PathLike | None = None,
    where: str | None = None,
    columns: dict[str, dict] | None = None,
    exact: bool = False,
) -> list[list[tuple[str, float]]]:
    """For each query vector, the `top_k` corpus ids with the highest cosine scores, best first, from the shards of
    `output_dir` by `backend`: `"matrix"` (everything in memory, one product), `"faiss"` (`index.faiss`, built when
    missing) or `"lancedb"` (the table in `db_dir`, default `{output_dir}/lancedb`, first synced with the shards and
    given per-id `columns`; `where` filters its rows; from `IVF_MIN_ROWS` rows its search is approximate unless
    `exact`). Exact searches agree on ids and scores, up to the order of equal scores."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if (where is not None or columns is not None) and backend != "lancedb":
        raise ValueError(f"filters and columns need the lancedb backend: the {backend} one has no metadata")
    if backend == "faiss":
        return search_index(output_dir, queries, top_k)
    if backend == "lancedb":
        from .lancedb_store import search_lancedb, sync_lancedb

        db_dir = db_dir if db_dir is not None else Path(output_dir) / LANCEDB_FOLDER
        sync_lancedb(output_dir, db_dir, columns=columns)
        return search_lancedb(db_dir, queries, top_k, where, exact=exact)
    return search_embeddings(*load_embeddings(output_dir), queries, top_k)


def build_faiss_index(output_dir: str | os.PathLike) -> Path:
    """An exact inner-product faiss index (cosine: the vectors are unit-norm) over every shard, added shard by shard;
    written (atomically) as `index.faiss` with `index_ids.json`. Needs `pip install faiss-cpu`."""
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
    text = json.dumps(ids)
    write_atomically(output / INDEX_IDS_FILE, lambda temporary: temporary.write_text(text))
    write_atomically(output / INDEX_FILE, lambda temporary: faiss.write_index(index, str(temporary)))
    return output / INDEX_FILE


def load_faiss_index(output_dir: str | os.PathLike) -> tuple[Any, list[str]]:
    """`(faiss index, ids)` of a corpus folder: built first when missing, rebuilt from the shards with a warning when
    damaged (a file cut to nothing or unreadable must not be trusted, nor end a search with faiss's own error)."""
    output = Path(output_dir)
    if not (output / INDEX_FILE).exists():
        build_faiss_index(output)
    loaded, damage = _read_index(output)
    if damage is None:
        return loaded
    logger.warning("Rebuilding the damaged index %s from the shards: %s", damage[0], damage[1])
    build_faiss_index(output)
    loaded, damage = _read_index(output)
    if damage is not None:
        raise DamagedFileError(*damage)
    return loaded


def _read_index(output: Path) -> tuple[tuple[Any, list[str]] | None, tuple[Path, str] | None]:
    """`((index, ids), None)`, or `(None, (file, what is wrong))` for a damaged index or id list."""
    import faiss

    path, ids_path = output / INDEX_FILE, output / INDEX_IDS_FILE
    if path.stat().st_size == 0:
        return None, (path, "zero-length")
    try:
        index = faiss.read_index(str(path))
    except RuntimeError as error:
        return None, (path, f"faiss cannot read it ({str(error).strip().splitlines()[-1]})")
    try:
        ids = json.loads(ids_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        return None, (ids_path, f"cannot be read as JSON ({error})")
    if not isinstance(ids, list) or len(ids) != index.ntotal:
        return None, (ids_path, f"does not list the index's {index.ntotal} ids")
    return (index, ids), None


def search_index(
    output_dir: str | os.PathLike, queries: torch.Tensor, top_k: int = 5
) -> list[list[tuple[str, float]]]:
    """For each query vector, the `top_k` nearest corpus ids with their cosine scores (`load_faiss_index`: a missing
    or damaged index is built from the shards first)."""
    return search_loaded_index(*load_faiss_index(output_dir), queries, top_k)


def search_loaded_index(index: Any, ids: list[str], queries: torch.Tensor, top_k: int = 5) -> list[list[tuple]]:
    """`search_index` over an index already loaded (`load_faiss_index`): what a server that keeps it in memory
    calls."""
    scores, positions = index.search(queries.float().numpy(), min(top_k, index.ntotal))
    return [
        [(ids[p], float(s)) for p, s in zip(row_positions, row_scores, strict=False) if p >= 0]
        for row_positions, row_scores in zip(positions, scores, strict=False)
    ]


def search_embeddings(
    ids: list[str], vectors: torch.Tensor, queries: torch.Tensor, top_k: int = 5
) -> list[list[tuple[str, float]]]:
    """`search_index` without faiss: for each query vector (`queries` `[q, dim]`), the `top_k` ids of the corpus
    (`ids`, `vectors` `[n, dim]`, unit-norm) with the highest cosine scores, best first; equal scores keep corpus
    order."""
    if len(ids) != len(vectors):
        raise ValueError(f"{len(ids)} ids for {len(vectors)} vectors")
    scores = queries.float() @ vectors.float().T
    order = torch.sort(scores, dim=1, descending=True, stable=True).indices[:, :top_k]
    return [
        [(ids[position], float(row_scores[position])) for position in row_order.tolist()]
        for row_order, row_scores in zip(order, scores, strict=True)
    ]
