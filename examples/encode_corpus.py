"""Embed a corpus into sharded embedding files: a folder of images, a JSONL/CSV of texts and/or images, or a
`datasets` dataset (streaming supported). See `coma_hf/inference/` for the shard layout.

    python examples/encode_corpus.py --model outputs/stage2 --images photos/ --output_dir embeddings/photos
    python examples/encode_corpus.py --model outputs/stage2 --jsonl corpus.jsonl --text_field caption --output_dir out
    python examples/encode_corpus.py --model org/coma --dataset org/images --split train --streaming --output_dir out
    accelerate launch --num_processes 4 examples/encode_corpus.py ...   # shards spread over processes / GPUs

Run the same command again to resume: finished shards are skipped, with any number of processes, once checked whole
(against the manifest's size and SHA-256, else by opening them); a shard that storage damaged is redone, and the log
names it. `--faiss_index` then builds an exact cosine index (`pip install faiss-cpu`); `examples/search_corpus.py`
queries it (rebuilding a damaged index from the shards).

`--engine ray` writes the same shards and manifest from a Ray Data actor pool (`--num_actors`, one model each, a GPU
each when the cluster has GPUs), on a local Ray or the cluster at `--ray_address` / `RAY_ADDRESS`
(`coma_hf.inference.ray_engine`; `pip install -e ".[ray]"`).
"""

from __future__ import annotations

import argparse
import importlib.util
import itertools
import logging
import os
import sys

from coma_hf import cli, inference
from coma_hf.data.sources import open_dataset

logger = logging.getLogger("encode_corpus")


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="CoMa checkpoint (folder or Hub id).")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--images", help="Folder of images (recursively); ids are relative paths.")
    source.add_argument("--jsonl", help="JSONL file, one row per line.")
    source.add_argument("--csv", help="CSV file with a header.")
    source.add_argument("--dataset", help="`datasets` dataset: Hub id, saved folder (load_from_disk) or data files.")
    parser.add_argument("--output_dir", required=True, help="Where the shard files go.")
    parser.add_argument("--text_field", default="text", help="Column with text (JSONL/CSV/dataset).")
    parser.add_argument("--image_field", default="image", help="Column with an image path or image.")
    parser.add_argument("--id_field", default="id", help="Column with the row id (default: the row position).")
    parser.add_argument("--image_root", help="Folder that relative image paths start from (default: the file's).")
    parser.add_argument("--config_name", help="Dataset configuration.")
    parser.add_argument("--split", default="train", help="Dataset split.")
    parser.add_argument("--streaming", action="store_true", help="Stream the dataset instead of downloading it.")
    parser.add_argument("--max_rows", type=int, help="Embed only the first rows of the corpus.")
    parser.add_argument("--shard_size", type=int, default=10_000, help="Rows per shard file.")
    parser.add_argument("--batch_size", type=int, default=32, help="Rows embedded at once.")
    parser.add_argument("--format", choices=inference.FORMATS, default="safetensors", help="Shard file format.")
    parser.add_argument(
        "--role",
        choices=("document", "query", "none"),
        default="document",
        help="Which configured instruction goes with every row (none: no instruction).",
    )
    parser.add_argument("--faiss_index", action="store_true", help="Build index.faiss over all shards at the end.")
    parser.add_argument(
        "--engine",
        choices=("accelerate", "ray"),
        default="accelerate",
        help="accelerate: this launch's processes; ray: a Ray Data actor pool (pip install -e '.[ray]').",
    )
    parser.add_argument("--num_actors", type=int, default=1, help="Ray: actors (one model each; one GPU each if any).")
    parser.add_argument("--ray_address", help="Ray: the cluster to join (default: RAY_ADDRESS, else a local Ray).")
    parser.add_argument("--dtype", default="float32", help="Model dtype (bfloat16 on GPUs).")
    cli.add_debug_flag(parser)
    return parser.parse_args(argv)


def check_arguments(args: argparse.Namespace) -> None:
    cli.coma_checkpoint(args.model, "--model")
    if args.images is not None:
        cli.image_folder(args.images, "--images")
    for flag, value in (("--jsonl", args.jsonl), ("--csv", args.csv)):
        if value is not None:
            cli.existing_file(value, flag, f"{flag[2:].upper()} file")
    if args.image_root is not None:
        cli.existing_folder(args.image_root, "--image_root")
    cli.output_folder(args.output_dir, "--output_dir", "pass a folder for the shards")
    cli.batch_size(args.batch_size, "--batch_size")
    cli.count(args.shard_size, "--shard_size", what="number of rows")
    cli.count(args.max_rows, "--max_rows", what="number of rows")
    cli.count(args.num_actors, "--num_actors", what="number of actors")
    if args.engine != "ray" and (args.ray_address or args.num_actors != 1):
        raise cli.UsageError("--num_actors and --ray_address need --engine ray")
    if args.engine == "ray":
        if args.dataset:
            raise cli.UsageError(
                "--engine ray reads --images, --jsonl or --csv: a --dataset source would send every image through "
                "the driver; use the accelerate engine for it"
            )
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise cli.UsageError("--engine ray runs as one process: start it with python, not accelerate launch")
        if importlib.util.find_spec("ray") is None:
            raise cli.UsageError('--engine ray needs Ray Data: pip install -e ".[ray]"')


def corpus_rows(args: argparse.Namespace):
    fields = dict(
        text_field=args.text_field, image_field=args.image_field, id_field=args.id_field, image_root=args.image_root
    )
    if args.images:
        rows = inference.image_folder_rows(args.images)
    elif args.jsonl:
        rows = inference.jsonl_rows(args.jsonl, **fields)
    elif args.csv:
        rows = inference.csv_rows(args.csv, **fields)
    else:
        rows = inference.dataset_rows(load_dataset(args), **fields)
    return itertools.islice(rows, args.max_rows) if args.max_rows is not None else rows


def load_dataset(args: argparse.Namespace):
    return open_dataset(args.dataset, args.config_name, split=args.split, streaming=args.streaming)


def main_on_ray(args: argparse.Namespace) -> dict:
    """The corpus through a Ray Data actor pool (`coma_hf.inference.ray_engine`): the same shards and manifest."""
    import ray

    from coma_hf.inference.ray_engine import encode_corpus_ray

    if args.ray_address:
        ray.init(address=args.ray_address, include_dashboard=False)
    counts = encode_corpus_ray(
        args.model,
        corpus_rows(args),
        args.output_dir,
        shard_size=args.shard_size,
        batch_size=args.batch_size,
        file_format=args.format,
        role=args.role,
        num_actors=args.num_actors,
        dtype=args.dtype,
    )
    from transformers import AutoProcessor  # the driver loads no model: the instruction the manifest records

    processor = AutoProcessor.from_pretrained(args.model, trust_remote_code=True)
    return {"process": counts, "manifest": finish(args, inference.role_instruction(processor, args.role))}


def finish(args: argparse.Namespace, instruction: str | None) -> dict:
    """The manifest (and the faiss index when asked for) once every shard is written; the summary printed."""
    manifest = inference.write_manifest(args.output_dir, model=args.model, instruction=instruction)
    if args.faiss_index:
        inference.build_faiss_index(args.output_dir)
    print(
        f"{manifest['embedded']} of {manifest['rows']} rows embedded ({manifest['skipped']} skipped) in "
        f"{len(manifest['shards'])} shards under {args.output_dir}"
    )
    for entry in manifest["skipped_rows"][:20]:
        print(f"  skipped row {entry['row']} (id {entry['id']}): {entry['error']}")
    return manifest


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    check_arguments(args)
    cli.configure_logging(args.debug)
    if args.engine == "ray":
        return main_on_ray(args)
    import torch
    from accelerate import PartialState
    from tqdm.auto import tqdm
    from transformers import AutoModel

    state = PartialState()  # one process, or one per GPU under `accelerate launch`
    model = AutoModel.from_pretrained(args.model, trust_remote_code=True, dtype=getattr(torch, args.dtype))
    model = model.to(state.device).eval()
    instruction = inference.role_instruction(model.processor, args.role)
    progress = tqdm(
        desc=f"process {state.process_index}", unit="row", disable=not state.is_local_main_process, total=args.max_rows
    )
    with torch.inference_mode():
        counts = inference.encode_corpus(
            model,
            corpus_rows(args),
            args.output_dir,
            shard_size=args.shard_size,
            batch_size=args.batch_size,
            file_format=args.format,
            instruction=instruction,
            process_index=state.process_index,
            num_processes=state.num_processes,
            progress=progress,
        )
    progress.close()
    logger.info("process %d: %s", state.process_index, counts)
    state.wait_for_everyone()
    manifest = finish(args, instruction) if state.is_main_process else {}
    return {"process": counts, "manifest": manifest}


if __name__ == "__main__":
    cli.run(main)
