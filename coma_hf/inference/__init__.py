"""Embedding corpora larger than memory."""

from .encode import (
    FORMATS,
    CorpusRow,
    build_faiss_index,
    csv_rows,
    dataset_rows,
    encode_corpus,
    finished_shards,
    image_folder_rows,
    jsonl_rows,
    load_embeddings,
    read_shard,
    search_index,
    shard_name,
    write_manifest,
    write_shard,
)
