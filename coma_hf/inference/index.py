"""An exact faiss index over a finished corpus folder, and searching it (`pip install faiss-cpu`); the same search
without faiss as one matrix product (`search_embeddings`)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from .shards import finished_shards, read_shard


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


def search_index(
    output_dir: str | os.PathLike, queries: torch.Tensor, top_k: int = 5
) -> list[list[tuple[str, float]]]:
    """For each query vector, the `top_k` nearest corpus ids with their cosine scores."""
    import faiss

    output = Path(output_dir)
    index = faiss.read_index(str(output / "index.faiss"))
    ids = json.loads((output / "index_ids.json").read_text())
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
