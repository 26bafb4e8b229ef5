"""Embedding corpora larger than memory: lazy sources, shards named by corpus range, resume, many processes.

A corpus is a stream of `(id, input)` rows — from a folder of images, a JSONL or CSV file, or a `datasets` dataset
(streaming too) — where an input is what `CoMaModel.encode` takes (`{"text": …, "image": …}`). Consecutive rows
are cut into shards of `shard_size`: shard k holds rows [k·S, (k+1)·S) and is written as
`embeddings-{start:010d}-{end:010d}.safetensors` (or `.parquet`). Names come from the corpus range, not from the
process that wrote them, so a resumed run — with any number of processes — skips every finished shard, and the
files equal an uninterrupted run's (batches never cross a shard boundary). Shards go to processes round-robin.

Memory stays flat as the corpus grows: a process holds one batch of decoded images and one shard's vectors at a time.
A shard is written under a temporary name and renamed, so a killed run leaves only whole shards; storage can still
damage one later (a full disk, an interrupted copy, a bad sector), so a resumed run checks each finished shard before
it skips it — against the manifest's size and SHA-256, else by opening it and counting its rows — and redoes a damaged
one, with a warning naming it (`shards.shard_damage`; the checks themselves are `coma_hf.storage`'s). Rows that
cannot be embedded (missing or corrupt image, empty text, a line that is not JSON) are skipped and listed in their
shard with the reason; their ids are not in the embeddings.

Written by hand because neither `datasets.map` (keeps results with the dataset, no resume across process counts)
nor sentence-transformers' multi-process encoding (returns everything in memory) shards output by corpus range.

* `sources`: the corpus rows (`image_folder_rows`, `jsonl_rows`, `csv_rows`, `dataset_rows`);
* `shards`: shard names, atomic writes, reading, finished shards, the manifest, the damage checks (`shard_damage`,
  `verified_manifest`);
* `encode`: the encode loop (`encode_corpus`);
* `index`: `search`, which picks a backend (`"matrix"`, `"faiss"`, `"lancedb"`); the faiss index
  (`build_faiss_index`, `load_faiss_index` — which rebuilds a damaged one —, `search_index`, `search_loaded_index`)
  and the same search without faiss (`search_embeddings`);
* `lancedb_store`: the shards in a LanceDB table with metadata (`sync_lancedb`, `search_lancedb`, `listing_columns`);
* `cache`: cache keys for an embedded image folder (`folder_listing`, `corpus_cache_key`).
"""

from .cache import corpus_cache_key, folder_listing
from .encode import ROLES, encode_corpus, role_instruction
from .index import (
    BACKENDS,
    build_faiss_index,
    load_faiss_index,
    search,
    search_embeddings,
    search_index,
    search_loaded_index,
)
from .shards import (
    FORMATS,
    finished_shards,
    load_embeddings,
    read_shard,
    shard_damage,
    shard_name,
    verified_manifest,
    write_manifest,
    write_shard,
)
from .sources import CorpusRow, csv_rows, dataset_rows, image_folder_rows, jsonl_rows

__all__ = [
    "BACKENDS",
    "FORMATS",
    "ROLES",
    "CorpusRow",
    "build_faiss_index",
    "corpus_cache_key",
    "csv_rows",
    "dataset_rows",
    "encode_corpus",
    "finished_shards",
    "folder_listing",
    "image_folder_rows",
    "jsonl_rows",
    "load_embeddings",
    "load_faiss_index",
    "read_shard",
    "role_instruction",
    "search",
    "search_embeddings",
    "search_index",
    "search_loaded_index",
    "shard_damage",
    "shard_name",
    "verified_manifest",
    "write_manifest",
    "write_shard",
]
