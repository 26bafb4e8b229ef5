"""Query an embedded corpus (a folder of shards made by `examples/encode_corpus.py`) with texts and/or images.

python examples/search_corpus.py --model outputs/stage2 --index_dir embeddings/photos --query "a red circle"
python examples/search_corpus.py --model outputs/stage2 --index_dir embeddings/photos --query_image probe.png
python examples/search_corpus.py --model outputs/stage2 --index_dir embeddings/photos --query "a cat" \\
    --index lancedb --images photos/ --where "path LIKE 'pets/%'"

`--index_dir` is the corpus folder. `--index` picks the search: `faiss` (its `index.faiss`, built when missing),
`matrix` (one matrix product, no extra package) or `lancedb` (a LanceDB table in `--db`, default
`{index_dir}/lancedb`, synced with the shards first: only shards not yet in it are added; with `--images`, the
folder the corpus was embedded from, every row gets its `path`, `bytes` and `modified_ns` (the table is rebuilt when
they are new to it), which `--where` can filter on; from 20,000 rows an IVF index answers unless `--exact`).
"""

from __future__ import annotations

import argparse
import sys

from coma_hf import cli
from coma_hf.inference import BACKENDS, search
from coma_hf.inference.index import LANCEDB_FOLDER


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="The CoMa checkpoint that embedded the corpus.")
    parser.add_argument("--index_dir", required=True, help="The corpus folder (its shards and indexes).")
    parser.add_argument("--query", action="append", default=[], help="A text query (repeatable).")
    parser.add_argument("--query_image", action="append", default=[], help="An image query (repeatable).")
    parser.add_argument("--top_k", type=int, default=5)
    parser.add_argument("--index", choices=BACKENDS, default="faiss", help="Which search (default: faiss).")
    parser.add_argument("--db", default=None, help=f"LanceDB folder (default: {{index_dir}}/{LANCEDB_FOLDER}).")
    parser.add_argument("--where", default=None, help="SQL filter over the LanceDB table's columns.")
    parser.add_argument("--images", default=None, help="The image folder the corpus came from (lancedb columns).")
    parser.add_argument("--exact", action="store_true", help="LanceDB: scan every row even past its IVF index.")
    cli.add_debug_flag(parser)
    args = parser.parse_args(argv)
    if not args.query and not args.query_image:
        parser.error("give at least one --query or --query_image")
    return args


def check_arguments(args: argparse.Namespace) -> None:
    cli.coma_checkpoint(args.model, "--model")
    cli.existing_folder(args.index_dir, "--index_dir", "folder of embedded shards")
    for image in args.query_image:
        cli.existing_file(image, "--query_image", "image file")
    cli.count(args.top_k, "--top_k", what="number of results")
    if args.index != "lancedb":
        lancedb_flags = {"--db": args.db, "--where": args.where, "--images": args.images, "--exact": args.exact}
        for flag in (flag for flag, value in lancedb_flags.items() if value):
            raise cli.UsageError(f"{flag} needs --index lancedb (the {args.index} search has no table)")
    if args.images is not None:
        cli.image_folder(args.images, "--images")


def main(argv: list[str] | None = None) -> list[list[tuple[str, float]]]:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    check_arguments(args)
    cli.configure_logging(args.debug)
    from transformers import AutoModel

    model = AutoModel.from_pretrained(args.model, trust_remote_code=True).eval()
    queries = [{"text": text} for text in args.query] + [{"image": image} for image in args.query_image]
    columns = None
    if args.images is not None:
        from coma_hf.inference.lancedb_store import listing_columns

        columns = listing_columns(args.images)
    hits = search(
        args.index_dir,
        model.encode_query(queries),
        args.top_k,
        backend=args.index,
        db_dir=args.db,
        where=args.where,
        columns=columns,
        exact=args.exact,
    )
    for query, results in zip(args.query + args.query_image, hits, strict=False):
        print(f"{query}")
        for rank, (identifier, score) in enumerate(results, 1):
            print(f"  {rank}. {identifier}  {score:.3f}")
    return hits


if __name__ == "__main__":
    cli.run(main)
