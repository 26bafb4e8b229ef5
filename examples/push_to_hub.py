"""Share a trained CoMa model on the Hub: weights, remote code, processor and tokenizer, sentence-transformers files
and the CoMa model card, in one commit.

    python examples/push_to_hub.py --repo_id org/coma                       # outputs/stage2, public
    python examples/push_to_hub.py --repo_id org/coma --private --revision v1
    python examples/push_to_hub.py --repo_id org/coma --dry_run --output_dir outputs/upload   # write, list, no upload

The card's evaluation table comes from `--eval_results` (default: `outputs/eval/mmeb_results.json` when it exists,
written by `examples/evaluate.py`); `--mteb_results` (a results folder of `examples/evaluate_mteb.py`) adds each mteb
task's main score to the card's `model-index`. The token is resolved as transformers does it: `HF_TOKEN`, else
`hf auth login`; it is never written to a file or printed.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

from coma_hf import cli
from coma_hf.hub import prepare_upload, upload_folder_to_hub
from coma_hf.hub.card import HUB_ID

DEFAULT_EVAL_RESULTS = "outputs/eval/mmeb_results.json"


def check_arguments(args: argparse.Namespace) -> None:
    cli.coma_checkpoint(args.model_name_or_path, "--model_name_or_path")
    if not HUB_ID.match(args.repo_id):
        raise cli.UsageError("--repo_id", args.repo_id, "is not a Hub repository id", "pass owner/name")
    if args.eval_results is not None:
        cli.existing_file(args.eval_results, "--eval_results", "MMEB results JSON")
    if args.mteb_results is not None:
        cli.existing_folder(args.mteb_results, "--mteb_results", "mteb results folder")


def main(argv: list[str] | None = None) -> str | None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_name_or_path", default="outputs/stage2")
    parser.add_argument("--repo_id", required=True, help="owner/name on the Hub")
    parser.add_argument("--private", action="store_true", help="create the repository as private")
    parser.add_argument("--revision", default=None, help="branch to commit to (created if missing)")
    parser.add_argument("--commit_message", default="Upload CoMa model")
    parser.add_argument("--license", default="other", help="license identifier for the card's metadata")
    parser.add_argument("--eval_results", default=None, help=f"MMEB results JSON (default: {DEFAULT_EVAL_RESULTS})")
    parser.add_argument("--mteb_results", default=None, help="mteb results folder (examples/evaluate_mteb.py)")
    parser.add_argument("--dry_run", action="store_true", help="write the folder to --output_dir and list it")
    parser.add_argument("--output_dir", default="outputs/upload", help="where --dry_run writes the folder")
    cli.add_debug_flag(parser)
    args = parser.parse_args(argv)
    check_arguments(args)
    eval_results = args.eval_results or (DEFAULT_EVAL_RESULTS if Path(DEFAULT_EVAL_RESULTS).is_file() else None)
    mteb = {"mteb_results": args.mteb_results}

    if args.dry_run:
        folder = Path(args.output_dir)
        if folder.exists():
            shutil.rmtree(folder)
        folder.mkdir(parents=True)
        files = prepare_upload(
            args.model_name_or_path, folder, args.repo_id, license=args.license, eval_results=eval_results, **mteb
        )
        print(f"Dry run: {len(files)} files that would be uploaded to {args.repo_id} are in {folder}:")
        for name in files:
            print(f"  {name}  ({(folder / name).stat().st_size:,} bytes)")
        return None

    with tempfile.TemporaryDirectory() as folder:
        files = prepare_upload(
            args.model_name_or_path, folder, args.repo_id, license=args.license, eval_results=eval_results, **mteb
        )
        commit = upload_folder_to_hub(
            folder, args.repo_id, commit_message=args.commit_message, private=args.private, revision=args.revision
        )
    print(f"Uploaded {len(files)} files to {args.repo_id} in one commit: {commit}")
    return str(commit)


if __name__ == "__main__":
    cli.run(main)
