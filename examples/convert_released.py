"""Convert a checkpoint of the authors' CoMa release into a coma_hf checkpoint (AutoModel, SentenceTransformer, card).

    python examples/convert_released.py --source path/to/merged --output_dir outputs/released
    python examples/convert_released.py --source path/to/adapter --base_model path/to/base
    python examples/convert_released.py --source org/released-model --num_compression_tokens 32

`--source` is a folder or a Hub id holding their merged model (older or current key names; a tied model may lack
`lm_head`) or their peft adapter. K comes from the tokenizer's `<|ctoken_pad_i|>` tokens; a tokenizer saved without
them needs `--num_compression_tokens` (their code took K from an environment variable, 32 by default).

The converted checkpoint encodes as their evaluation did (its processor records their rendering rules, see
`coma_hf/released/evaluation.py`); score it on the MMEB-V2 instruct rows their scripts read with
`python examples/evaluate.py --model_name_or_path OUT --data ziyjiang/MMEB_Test_Instruct --datasets … --image_root …`.
"""

from __future__ import annotations

import argparse

from coma_hf import cli
from coma_hf.released import convert_released_checkpoint


def check_arguments(args: argparse.Namespace) -> None:
    source = cli.local_or_hub(args.source, "--source", "a released merged model or adapter folder")
    if source is not None and not any((source / name).is_file() for name in ("config.json", "adapter_config.json")):
        raise cli.UsageError(
            "--source", args.source, "holds neither config.json nor adapter_config.json", "pass their model's folder"
        )
    if args.base_model is not None:
        cli.local_or_hub(args.base_model, "--base_model", "the adapter's base model")
    cli.count(args.num_compression_tokens, "--num_compression_tokens", what="number of tokens")
    cli.output_folder(args.output_dir, "--output_dir", "pass a folder to write the checkpoint to")


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", required=True, help="folder or Hub id of a released merged model or adapter")
    parser.add_argument("--output_dir", default="outputs/released", help="where the CoMa checkpoint is written")
    parser.add_argument(
        "--num_compression_tokens", type=int, default=None, help="K, when the tokenizer lacks <|ctoken_pad_i|>"
    )
    parser.add_argument("--base_model", default=None, help="an adapter's base (default: from adapter_config.json)")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    cli.add_debug_flag(parser)
    args = parser.parse_args(argv)
    check_arguments(args)
    model = convert_released_checkpoint(
        args.source,
        args.output_dir,
        num_compression_tokens=args.num_compression_tokens,
        base_model=args.base_model,
        dtype=args.dtype,
    )
    print(
        f"Converted {args.source} into {args.output_dir}: K={model.config.num_compression_tokens}, compression "
        f"token ids {model.config.compression_token_ids}, pooling {model.config.pooling}"
    )
    return args.output_dir


if __name__ == "__main__":
    cli.run(main)
