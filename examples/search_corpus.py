"""Query an embedded corpus (made by `examples/encode_corpus.py --faiss_index`) with texts and/or images.

python examples/search_corpus.py --model outputs/stage2 --index_dir embeddings/photos --query "a red circle"
python examples/search_corpus.py --model outputs/stage2 --index_dir embeddings/photos --query_image probe.png
"""

from __future__ import annotations

import argparse
import sys

from coma_hf import cli
from coma_hf.inference import search_index


def main(argv: list[str] | None = None) -> list[list[tuple[str, float]]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="The CoMa checkpoint that embedded the corpus.")
    parser.add_argument("--index_dir", required=True, help="Folder with index.faiss and index_ids.json.")
    parser.add_argument("--query", action="append", default=[], help="A text query (repeatable).")
    parser.add_argument("--query_image", action="append", default=[], help="An image query (repeatable).")
    parser.add_argument("--top_k", type=int, default=5)
    cli.add_debug_flag(parser)
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    if not args.query and not args.query_image:
        parser.error("give at least one --query or --query_image")
    cli.coma_checkpoint(args.model, "--model")
    cli.existing_folder(args.index_dir, "--index_dir", "folder of embedded shards")
    for image in args.query_image:
        cli.existing_file(image, "--query_image", "image file")
    cli.count(args.top_k, "--top_k", what="number of results")
    from transformers import AutoModel

    model = AutoModel.from_pretrained(args.model, trust_remote_code=True).eval()
    queries = [{"text": text} for text in args.query] + [{"image": image} for image in args.query_image]
    hits = search_index(args.index_dir, model.encode_query(queries), args.top_k)
    for query, results in zip(args.query + args.query_image, hits, strict=False):
        print(f"{query}")
        for rank, (identifier, score) in enumerate(results, 1):
            print(f"  {rank}. {identifier}  {score:.3f}")
    return hits


if __name__ == "__main__":
    cli.run(main)
