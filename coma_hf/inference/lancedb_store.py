"""A corpus folder's shards kept in LanceDB (`pip install "coma_hf[lancedb]"`): vectors with their metadata,
searched by cosine with an optional SQL filter, which faiss cannot do.

A table row is one embedded corpus row: `id`, `embedding` (unit-norm float32), `shard` (the file it came from) and
`shard_sha256`, plus any per-id columns the caller hands over (`listing_columns` gives an image folder's `path`,
`bytes` and `modified_ns`). `sync_lancedb` makes the table match the folder's finished shards: it adds the rows of
shards not yet in it, and removes the rows of shards that are gone or changed. So a re-run adds nothing twice, and
when a grown corpus replaces its last short shard (`encode_corpus`), the table replaces that shard's rows too.

Past `IVF_MIN_ROWS` rows the table gets an IVF index (`lancedb.index.IvfFlat`, cosine, about √rows partitions);
below it every search is exact (a flat scan). `exact=True` scans even past it.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from ..storage import file_sha256
from .cache import folder_listing
from .shards import finished_shards, read_shard

TABLE = "corpus"
VECTOR_COLUMN = "embedding"
IVF_MIN_ROWS = 20_000  # a flat scan of fewer rows is fast enough, and exact
NPROBES = 40  # partitions an IVF search visits: recall@10 0.93-0.96 on the 20k test corpus (about 0.8 at 20)


def listing_columns(folder: str | os.PathLike) -> dict[str, dict]:
    """Per-id columns of an image-folder corpus (whose ids are relative paths): `path`, `bytes`, `modified_ns`."""
    return {
        relative: {"path": relative, "bytes": size, "modified_ns": modified}
        for relative, size, modified in folder_listing(folder)
    }


def sync_lancedb(
    output_dir: str | os.PathLike,
    db_dir: str | os.PathLike,
    table_name: str = TABLE,
    columns: Mapping[str, dict] | None = None,
    index_min_rows: int = IVF_MIN_ROWS,
) -> dict:
    """Bring the LanceDB table `table_name` in `db_dir` in line with the finished shards of `output_dir`; returns
    `{"added_shards", "removed_shards", "rows", "indexed"}`. `columns` maps an id to extra fields for its row (every
    id gets the same keys; a missing id gets nulls)."""
    import lancedb

    database = lancedb.connect(str(db_dir))
    shards = {path.name: (path, file_sha256(path)) for path in finished_shards(output_dir)}
    table = database.open_table(table_name) if table_name in _table_names(database) else None
    stored = _stored_shards(table)
    stale = sorted(name for name, sha in stored.items() if shards.get(name, (None, None))[1] != sha)
    new = [name for name in shards if stored.get(name) != shards[name][1]]
    if table is not None and stale:
        table.delete(" OR ".join(f"shard = {_sql_string(name)}" for name in stale))
    for name in new:
        batch = _shard_table(*shards[name], columns)
        if batch is None:
            continue
        if table is None:
            table = database.create_table(table_name, data=batch)
        else:
            table.add(batch)
    rows = table.count_rows() if table is not None else 0
    indexed = table is not None and rows >= index_min_rows
    if indexed and (new or stale or not table.list_indices()):
        partitions = max(1, round(math.sqrt(rows)))
        table.create_index(
            VECTOR_COLUMN,
            config=lancedb.index.IvfFlat(distance_type="cosine", num_partitions=partitions),
            replace=True,
        )
    return {"added_shards": len(new), "removed_shards": len(stale), "rows": rows, "indexed": indexed}


def search_lancedb(
    db_dir: str | os.PathLike,
    queries: torch.Tensor,
    top_k: int = 5,
    where: str | None = None,
    table_name: str = TABLE,
    exact: bool = False,
) -> list[list[tuple[str, float]]]:
    """For each query vector, the `top_k` ids with the highest cosine scores among the rows that pass `where` (an SQL
    filter over the table's columns, e.g. `"path LIKE 'cats/%'"`), best first."""
    import lancedb

    table = lancedb.connect(str(db_dir)).open_table(table_name)
    results = []
    for vector in queries.float().numpy():
        query = table.search(vector, vector_column_name=VECTOR_COLUMN).distance_type("cosine").limit(top_k)
        if where:
            query = query.where(where, prefilter=True)
        query = query.bypass_vector_index() if exact else query.nprobes(NPROBES)
        hits = query.select(["id", "_distance"]).to_list()
        results.append([(hit["id"], 1.0 - float(hit["_distance"])) for hit in hits])
    return results


def _table_names(database: Any) -> list[str]:
    listed = database.list_tables()
    return list(getattr(listed, "tables", listed))


def _stored_shards(table: Any) -> dict[str, str]:
    """`shard file name → sha256` of the rows in `table` (none for no table)."""
    if table is None:
        return {}
    pairs = table.to_arrow().select(["shard", "shard_sha256"]).group_by(["shard", "shard_sha256"]).aggregate([])
    return dict(zip(pairs.column("shard").to_pylist(), pairs.column("shard_sha256").to_pylist(), strict=True))


def _shard_table(path: Path, sha256: str, columns: Mapping[str, dict] | None) -> Any:
    """One shard as an Arrow table of table rows (`None` when every row of it was skipped)."""
    import pyarrow as pa

    ids, vectors, _ = read_shard(path)
    if not ids:
        return None
    data = {
        "id": pa.array(ids, pa.string()),
        VECTOR_COLUMN: pa.FixedSizeListArray.from_arrays(
            pa.array(vectors.float().numpy().reshape(-1)), vectors.shape[1]
        ),
        "shard": pa.array([path.name] * len(ids), pa.string()),
        "shard_sha256": pa.array([sha256] * len(ids), pa.string()),
    }
    if columns:
        keys = sorted({key for fields in columns.values() for key in fields})
        for key in keys:
            data[key] = pa.array([columns.get(identifier, {}).get(key) for identifier in ids])
    return pa.table(data)


def _sql_string(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"
