"""An exact faiss index over a finished corpus folder, and searching it (`pip install faiss-cpu`)."""

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
