"""Choose the images to generate stage-1 data for, as the paper did: unique images of MMEB-train subsets, capped per
subset, in a seeded order.

    python examples/select_images.py --mmeb_train MMEB-train --output data/images.jsonl
    python examples/generate_qa.py --model_name_or_path Qwen/Qwen2.5-VL-7B-Instruct \
        --images data/images.jsonl --output data/stage1.jsonl

`--mmeb_train` is a folder (one `{subset}.jsonl`/`.parquet` per subset, or a clone of the Hub dataset with one folder
per subset and its images unpacked in it), data files, or a Hub id (then `--image_root` is needed). The defaults are
the paper's: its 12 subsets, at most 30,000 images each. The output's `image` paths are relative to its folder, so
`generate_qa.py --images` reads it as it is.
"""

from __future__ import annotations

import argparse
import logging
import sys

from coma_hf import cli
from coma_hf.data.image_selection import PAPER_PER_SUBSET, PAPER_SUBSETS, select_images, write_image_list

logger = logging.getLogger("select_images")


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mmeb_train", nargs="+", required=True, help="MMEB-train: folder(s), data file(s) or Hub id")
    parser.add_argument("--subsets", nargs="+", default=list(PAPER_SUBSETS), help="default: the paper's 12")
    parser.add_argument("--all_subsets", action="store_true", help="every subset found, instead of --subsets")
    parser.add_argument("--per_subset", type=int, default=PAPER_PER_SUBSET, help="at most this many images each")
    parser.add_argument("--image_root", default=None, help="where relative image paths start (default: the source)")
    parser.add_argument("--output", required=True, help="JSONL of {id, image, subset} to write")
    parser.add_argument("--seed", type=int, default=0)
    cli.add_debug_flag(parser)
    return parser.parse_args(argv)


def check_arguments(args: argparse.Namespace) -> None:
    for source in args.mmeb_train:
        cli.local_or_hub(source, "--mmeb_train", "MMEB-train (a folder or data files)")
    if args.image_root is not None:
        cli.existing_folder(args.image_root, "--image_root")
    cli.output_file(args.output, "--output", "pass the JSONL file to write")
    cli.count(args.per_subset, "--per_subset", what="number of images")


def main(argv: list[str] | None = None) -> list:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    check_arguments(args)
    cli.configure_logging(args.debug)
    records, selections = select_images(
        args.mmeb_train,
        subsets=None if args.all_subsets else args.subsets,
        per_subset=args.per_subset,
        image_root=args.image_root,
        seed=args.seed,
    )
    write_image_list(records, args.output)
    for selection in selections:
        logger.info(
            "%s: %d rows (%d unreadable), %d unique images, %d already chosen for an earlier subset, %d selected",
            selection.subset,
            selection.rows,
            selection.bad_rows,
            selection.unique_images,
            selection.chosen_earlier,
            selection.selected,
        )
    logger.info("%d images from %d subsets -> %s", len(records), len(selections), args.output)
    return selections


if __name__ == "__main__":
    cli.run(main)
