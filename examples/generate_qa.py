"""Generate stage-1 QA for real images with an instruction-tuned VLM (the paper's two steps).

    python examples/generate_qa.py --model_name_or_path Qwen/Qwen2.5-VL-7B-Instruct \
        --images path/to/images --output data/stage1.jsonl

`--images` is a folder (searched recursively) or a JSONL with `image` fields. Rerunning the same command resumes:
images already in `--output` are skipped. The output feeds `examples/pretrain.py --dataset`.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import torch
from transformers import AutoModelForImageTextToText, AutoProcessor

from coma_hf.data.qa_generation import generate_qa, iter_images


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_name_or_path", required=True, help="an instruction-tuned VLM: Hub id or folder")
    parser.add_argument("--images", required=True, help="a folder of images or a JSONL with 'image' fields")
    parser.add_argument("--output", required=True, help="JSONL to write (appended to, and resumed from)")
    parser.add_argument("--image_root", default=None, help="write image paths relative to this folder")
    parser.add_argument("--num_questions", type=int, default=4, help="questions per image, 3 to 5")
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--max_new_tokens", type=int, default=64)
    parser.add_argument("--dtype", default="auto", help="e.g. bfloat16")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")

    model = AutoModelForImageTextToText.from_pretrained(args.model_name_or_path, dtype=args.dtype).to(args.device)
    processor = AutoProcessor.from_pretrained(args.model_name_or_path)
    images = list(iter_images(args.images, args.image_root))
    default_root = args.images if Path(args.images).is_dir() else str(Path(args.images).parent)
    counts = generate_qa(
        model.eval(),
        processor,
        images,
        args.output,
        num_questions=args.num_questions,
        batch_size=args.batch_size,
        max_new_tokens=args.max_new_tokens,
        image_root=args.image_root or default_root,
        total=len(images),
    )
    logging.getLogger("generate_qa").info(
        "%d images written, %d already done, %d unreadable (skipped) -> %s",
        counts["written"],
        counts["skipped_done"],
        counts["skipped_unreadable"],
        args.output,
    )


if __name__ == "__main__":
    main()
