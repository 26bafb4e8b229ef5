"""Stage 1 of CoMa (compression pre-training) — for now: build the embedded default and save it.

With no arguments this builds the embedded default (a tiny Qwen2.5-VL-architecture backbone with random weights,
made offline) turned into a CoMa model, and saves it to `outputs/stage1`. With `--model_name_or_path` it wraps a
pretrained MLLM (Hub id or folder) instead.
"""

from __future__ import annotations

import argparse
import logging

from coma_hf import CoMaModel
from coma_hf.tiny import build_tiny_coma

logger = logging.getLogger("pretrain")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_name_or_path", default=None, help="backbone MLLM: Hub id or folder (default: tiny)")
    parser.add_argument("--output_dir", default="outputs/stage1")
    parser.add_argument("--num_compression_tokens", type=int, default=32)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")

    if args.model_name_or_path is None:
        model, _ = build_tiny_coma(num_compression_tokens=args.num_compression_tokens)
    else:
        model = CoMaModel.from_backbone(args.model_name_or_path, num_compression_tokens=args.num_compression_tokens)
    model.save_pretrained(args.output_dir)
    logger.info("Saved a CoMa model (K=%d) to %s", model.config.num_compression_tokens, args.output_dir)


if __name__ == "__main__":
    main()
