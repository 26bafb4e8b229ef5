"""Corpus encoding on Ray Data (`pip install "coma_hf[ray]"`): `encode_corpus`'s shards and manifest, written by a
pool of actors on one machine or a cluster.

The driver reads the corpus rows (`sources`) and cuts them into `encode_corpus`'s shard ranges; finished shards are
skipped as `encode_corpus` skips them (checked whole first). Each remaining shard is one item of a Ray dataset;
`map_batches` hands shards to a pool of actors (`ray.data.ActorPoolStrategy`), each of which loads the checkpoint
once, reads and decodes its shard's images with the package's own rules (`load_image`: EXIF orientation, one bad
file skipped and counted, not a failed block as with `ray.data.read_images`) and writes the shard with the one shard
writer (`encode.encode_shard`). A worker that dies is restarted and its shard retried; shard writes are atomic, so a
retried shard is written once. Search, LanceDB and the demo read the result as they read `encode_corpus`'s.

The driver holds the rows of the shards still to write (an id and an input each: for a folder, JSONL or CSV a text
and an image path, about 100 bytes), and every node sees the same filesystem for the images and the output.

Written on `map_batches` over shard ranges rather than `read_binary_files` + a shuffle into shards: a shard must hold
exactly its corpus positions for resuming and for equal output, and grouping bytes into shards would move every
image through the object store twice.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from .encode import COUNTS, ROLES, encode_shard, role_instruction, shard_is_whole
from .shards import FORMATS, finished_spans, manifest_entries
from .sources import CorpusRow


def encode_corpus_ray(
    model_name_or_path: str | os.PathLike,
    rows: Iterable[CorpusRow],
    output_dir: str | os.PathLike,
    shard_size: int = 10_000,
    batch_size: int = 32,
    file_format: str = "safetensors",
    role: str = "document",
    num_actors: int = 1,
    num_gpus_per_actor: float | None = None,
    dtype: str = "float32",
    encoder_class: type | None = None,
) -> dict:
    """Embed `rows` into `encode_corpus`'s shard files in `output_dir` with `num_actors` Ray actors (connects to the
    running Ray instance, `RAY_ADDRESS`, or starts a local one); returns the counts `encode_corpus` returns.

    `role` picks the checkpoint processor's instruction (`"document"`, `"query"` or `"none"`). `num_gpus_per_actor`
    defaults to 1 when the cluster has GPUs, else 0. `encoder_class` replaces `ShardEncoder` (same constructor)."""
    import ray
    import torch

    if file_format not in FORMATS:
        raise ValueError(f"file_format must be one of {FORMATS}, got {file_format!r}")
    if shard_size < 1 or batch_size < 1 or num_actors < 1:
        raise ValueError("shard_size, batch_size and num_actors must be positive")
    if role not in ROLES:
        raise ValueError(f"role must be one of {ROLES}, got {role!r}")
    if not isinstance(getattr(torch, dtype, None), torch.dtype):
        raise ValueError(f"dtype must name a torch dtype (float32, bfloat16, …), got {dtype!r}")
    # absolute: a cluster's workers run in the raylet's working directory, not the driver's
    output = Path(output_dir).resolve()
    if Path(model_name_or_path).exists():
        model_name_or_path = Path(model_name_or_path).resolve()
    output.mkdir(parents=True, exist_ok=True)
    counts = dict.fromkeys(COUNTS, 0)
    shards = pending_shards(rows, output, shard_size, counts)
    if not shards:
        return counts
    if not ray.is_initialized():
        ray.init(ignore_reinit_error=True, include_dashboard=False, log_to_driver=False)
    if num_gpus_per_actor is None:
        num_gpus_per_actor = 1 if ray.cluster_resources().get("GPU", 0) else 0
    settings = {
        "model_name_or_path": str(model_name_or_path),
        "output_dir": str(output),
        "batch_size": batch_size,
        "file_format": file_format,
        "role": role,
        "dtype": dtype,
    }
    written = (
        ray.data.from_items(shards, override_num_blocks=len(shards))
        .map_batches(
            encoder_class or ShardEncoder,
            batch_size=1,
            fn_constructor_kwargs=settings,
            compute=ray.data.ActorPoolStrategy(size=num_actors),
            num_gpus=num_gpus_per_actor,  # the pool's actors restart and retry by default (max_restarts=-1)
        )
        .take_all()
    )
    for result in written:
        counts["embedded"] += int(result["embedded"])
        counts["skipped"] += int(result["skipped"])
        counts["shards_written"] += 1
    return counts


def pending_shards(rows: Iterable[CorpusRow], output: Path, shard_size: int, counts: dict) -> list[dict]:
    """`{"start", "rows"}` of every shard range of `rows` still to write (a finished shard checked whole is skipped,
    a damaged one redone, as `encode_corpus` does); `counts` gets the rows read and the shards already done."""
    finished, recorded = finished_spans(output, shard_size), manifest_entries(output)
    stream, shards = iter(rows), []
    for shard in itertools.count():
        start = shard * shard_size
        block = list(itertools.islice(stream, shard_size))
        counts["rows"] += len(block)
        if not block:
            break
        if start in finished and shard_is_whole(finished[start], recorded, counts):
            counts["shards_already_done"] += 1
        else:
            shards.append({"start": start, "rows": [_as_item(row) for row in block]})
        if len(block) < shard_size:
            break
    return shards


def _as_item(row: CorpusRow) -> dict:
    """A row as the actors receive it, an image path made absolute (workers run elsewhere)."""
    value = dict(row.input) if row.input else row.input
    if value and isinstance(value.get("image"), (str, os.PathLike)):
        value["image"] = os.path.abspath(value["image"])
    return {"position": row.position, "id": row.id, "input": value, "error": row.error}


class ShardEncoder:
    """A Ray actor's work: the checkpoint loaded once (on the actor's GPU when it has one), then each shard it is
    handed embedded and written (`encode_shard`)."""

    def __init__(
        self, model_name_or_path: str, output_dir: str, batch_size: int, file_format: str, role: str, dtype: str
    ):
        import ray
        import torch
        from transformers import AutoModel

        device = "cuda" if ray.get_gpu_ids() else "cpu"  # only a GPU Ray gave this actor
        model = AutoModel.from_pretrained(model_name_or_path, trust_remote_code=True, dtype=getattr(torch, dtype))
        self.model = model.to(device).eval()
        self.instruction = role_instruction(self.model.processor, role)
        self.output, self.batch_size, self.file_format = Path(output_dir), batch_size, file_format

    def __call__(self, batch: dict[str, Any]) -> dict[str, list]:
        import torch

        results = {"start": [], "embedded": [], "skipped": []}
        for start, items in zip(batch["start"], batch["rows"], strict=True):
            rows = [CorpusRow(item["position"], item["id"], item["input"], item["error"]) for item in items]
            with torch.inference_mode():
                _, embedded, skipped = encode_shard(
                    self.model, rows, int(start), self.output, self.batch_size, self.file_format, self.instruction
                )
            results["start"].append(int(start))
            results["embedded"].append(embedded)
            results["skipped"].append(skipped)
        return results
