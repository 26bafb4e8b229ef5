"""MMEB-format evaluation of a CoMa model (or any SentenceTransformer).

    python examples/evaluate.py                                   # outputs/stage2 on the mini-MMEB test split
    python examples/evaluate.py --model_name_or_path outputs/stage1 --data outputs/synthetic/mini_mmeb/dev
    python examples/evaluate.py --data TIGER-Lab/MMEB-eval --datasets ImageNet-1K,MSCOCO_t2i --image_root eval_images
    python examples/evaluate.py --model_name_or_path outputs/released --data ziyjiang/MMEB_Test_Instruct \
        --datasets ImageNet-1K,OK-VQA --image_root MMEB-V2/image-tasks

`--data` is a folder of MMEB-format files (default: the synthetic mini-MMEB test split, generated if absent) or a
Hub dataset id with `--datasets` naming its configs. Rows in the MMEB-V2 instruct field layout (`qry_inst`, …, as
the authors' release evaluates) are rendered by each dataset family's rule (`coma_hf.evaluation.mmeb_v2`), which a
checkpoint converted by `examples/convert_released.py` carries; `--data_format` forces one reading. Prints a table;
writes `mmeb_results.json` and `mmeb_results.md` to `--output_dir`.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from coma_hf import cli
from coma_hf.data.mini_mmeb import mini_mmeb_split
from coma_hf.evaluation.mmeb import MMEBEvaluator, markdown_table
from coma_hf.evaluation.mmeb_v2 import DATA_FORMATS, load_evaluation_datasets

DEFAULT_SYNTHETIC = cli.DEFAULT_SYNTHETIC


def load_model(name_or_path: str):
    """A SentenceTransformer when the folder is one without CoMa's remote code, else a CoMa model via AutoModel."""
    folder = Path(name_or_path)
    if (folder / "modules.json").exists() and not (folder / "modeling_coma.py").exists():
        from sentence_transformers import SentenceTransformer

        return SentenceTransformer(name_or_path, trust_remote_code=True)
    from transformers import AutoModel

    return AutoModel.from_pretrained(name_or_path, trust_remote_code=True).eval()


def check_arguments(args: argparse.Namespace) -> None:
    folder = Path(args.model_name_or_path)
    cli.default_checkpoint_missing(args.model_name_or_path, "--model_name_or_path")
    if not (folder / "modules.json").is_file():  # a SentenceTransformer folder evaluates as it is
        cli.coma_checkpoint(args.model_name_or_path, "--model_name_or_path")
    if args.data is not None:
        cli.local_or_hub(args.data, "--data", "an MMEB-format folder")
    if args.image_root is not None:
        cli.existing_folder(args.image_root, "--image_root")
    cli.batch_size(args.batch_size, "--batch_size")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_name_or_path", default=cli.DEFAULT_STAGE2)
    parser.add_argument("--data", default=None, help="MMEB-format folder or Hub id (default: mini-MMEB test split)")
    parser.add_argument("--datasets", default=None, help="comma-separated dataset names (required for a Hub id)")
    parser.add_argument("--image_root", default=None, help="folder that image paths start from")
    parser.add_argument("--split", default="test", help="split of a Hub dataset")
    parser.add_argument("--output_dir", default="outputs/eval")
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument(
        "--data_format",
        default="auto",
        choices=DATA_FORMATS,
        help="mmeb: verbatim rows (qry_text, …); mmeb_v2: instruct rows (qry_inst, …); auto: from the rows",
    )
    cli.add_debug_flag(parser)
    args = parser.parse_args(argv)
    check_arguments(args)
    cli.configure_logging(args.debug)

    data = args.data if args.data is not None else str(mini_mmeb_split(DEFAULT_SYNTHETIC))
    names = args.datasets.split(",") if args.datasets else None
    datasets = load_evaluation_datasets(data, names, args.image_root, args.split, args.data_format)
    results = MMEBEvaluator(datasets, batch_size=args.batch_size)(load_model(args.model_name_or_path), args.output_dir)
    print(markdown_table(results))
    print(f"Results written to {args.output_dir}/mmeb_results.json and .md")
    return results


if __name__ == "__main__":
    cli.run(main)
