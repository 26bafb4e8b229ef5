"""Generate stage-1 data for real images with an instruction-tuned VLM, as the CoMa release did.

    python examples/select_images.py --mmeb_train MMEB-train --output data/images.jsonl
    python examples/generate_qa.py --model_name_or_path Qwen/Qwen2.5-VL-7B-Instruct \
        --images data/images.jsonl --output data/stage1.jsonl [--task qa|caption|describe]

`--task qa` (the paper's data): the teacher lists 3–5 retrieval-oriented questions per image, then answers them as
one multi-turn chat. `--task caption`: one short one-sentence caption per image; `--task describe`: one detailed
description. Sampling at temperature 0.7 (0: greedy), seeded. `--images` is a folder (searched recursively) or a JSONL
with `image` fields. Rerunning the same command resumes: images already in `--output` are skipped. The last log line
gives the counts: images written and skipped, replies that stopped at their token limit, images/s and tokens/s. The
output feeds `examples/pretrain.py --dataset`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from coma_hf import cli
from coma_hf.configuration_coma import CoMaConfig
from coma_hf.data.qa_generation import (
    DEFAULT_MAX_ANSWER_TOKENS,
    DEFAULT_MAX_QUESTION_TOKENS,
    TASKS,
    Sampling,
    Teacher,
    generate_qa,
    iter_images,
)


def parse_args(argv: list[str]) -> argparse.Namespace:
    sampling = Sampling()  # the defaults
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_name_or_path", required=True, help="an instruction-tuned VLM: Hub id or folder")
    parser.add_argument("--images", required=True, help="a folder of images or a JSONL with 'image' fields")
    parser.add_argument("--output", required=True, help="JSONL to write (appended to, and resumed from)")
    parser.add_argument("--task", choices=TASKS, default="qa")
    parser.add_argument(
        "--image_root",
        default=None,
        help="where relative image paths start, in --images (default: its folder) and in --output (default: its "
        "folder, where the stage-1 reader starts them)",
    )
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--max_question_tokens", type=int, default=DEFAULT_MAX_QUESTION_TOKENS)
    parser.add_argument(
        "--max_answer_tokens", type=int, default=DEFAULT_MAX_ANSWER_TOKENS, help="answers, captions and descriptions"
    )
    parser.add_argument("--temperature", type=float, default=sampling.temperature, help="0: greedy")
    parser.add_argument("--top_p", type=float, default=sampling.top_p)
    parser.add_argument("--top_k", type=int, default=sampling.top_k, help="0: off")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", default="auto", help="e.g. bfloat16")
    parser.add_argument("--device", default=None, help="default: cuda when available")
    cli.add_debug_flag(parser)
    return parser.parse_args(argv)


def check_arguments(args: argparse.Namespace) -> None:
    config = cli.checkpoint_config(args.model_name_or_path, "--model_name_or_path")
    if config is not None and config.get("model_type") == CoMaConfig.model_type:
        raise cli.UsageError(
            "--model_name_or_path",
            args.model_name_or_path,
            "is a CoMa checkpoint, not an instruction-tuned VLM",
            "pass the teacher, e.g. Qwen/Qwen2.5-VL-7B-Instruct",
        )
    if not Path(args.images).is_file():  # a file is read as JSONL; anything else must be a folder of images
        cli.image_folder(args.images, "--images")
    if args.image_root is not None:
        cli.existing_folder(args.image_root, "--image_root")
    cli.output_file(args.output, "--output", "pass the JSONL file to write")
    cli.batch_size(args.batch_size, "--batch_size")
    cli.count(args.max_question_tokens, "--max_question_tokens", what="number of tokens")
    cli.count(args.max_answer_tokens, "--max_answer_tokens", what="number of tokens")


def main(argv: list[str] | None = None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    check_arguments(args)
    cli.configure_logging(args.debug)
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = AutoModelForImageTextToText.from_pretrained(args.model_name_or_path, dtype=args.dtype).to(device)
    processor = AutoProcessor.from_pretrained(args.model_name_or_path)
    teacher = Teacher(model.eval(), processor, Sampling(args.temperature, args.top_p, args.top_k))
    images = list(iter_images(args.images, args.image_root))
    return generate_qa(
        teacher,
        images,
        args.output,
        task=args.task,
        batch_size=args.batch_size,
        max_question_tokens=args.max_question_tokens,
        max_answer_tokens=args.max_answer_tokens,
        seed=args.seed,
        image_root=args.image_root,
        total=len(images),
    )


if __name__ == "__main__":
    cli.run(main)
