"""MTEB / MIEB evaluation of a CoMa checkpoint (needs the `[mteb]` extra).

    python examples/evaluate_mteb.py                              # outputs/stage2 on the mini-MMEB test split
    python examples/evaluate_mteb.py --model_name_or_path outputs/stage1 --data outputs/synthetic/mini_mmeb/dev
    python examples/evaluate_mteb.py --tasks MSCOCOI2TRetrieval,CIFAR10ZeroShot    # mteb's own tasks (downloads)
    python examples/evaluate_mteb.py --mock                       # mteb's mock tasks: a check that runs offline

`--data` is an MMEB-format folder, each of whose datasets becomes an mteb task (`coma_hf.integrations.mteb_tasks`:
zero-shot classification or Any2Any retrieval over each row's own candidates); `--tasks` names mteb tasks instead,
which mteb downloads from the Hub. Prints each task's main score and writes mteb's results folder (`ResultCache`
layout: `results/{model}/{revision}/{task}.json`) under `--output_dir`, which `examples/push_to_hub.py
--mteb_results` puts into the model card.
"""

from __future__ import annotations

import argparse

from coma_hf import cli

DEFAULT_SYNTHETIC = cli.DEFAULT_SYNTHETIC


def check_arguments(args: argparse.Namespace) -> None:
    cli.default_checkpoint_missing(args.model_name_or_path, "--model_name_or_path")
    cli.coma_checkpoint(args.model_name_or_path, "--model_name_or_path")
    if args.data is not None:
        cli.existing_folder(args.data, "--data", "MMEB-format folder")
    if sum(bool(value) for value in (args.data, args.tasks, args.mock)) > 1:
        raise cli.UsageError("--data, --tasks and --mock choose the tasks: give one of them")
    cli.output_folder(args.output_dir, "--output_dir", "name a folder for mteb's results")
    cli.batch_size(args.batch_size, "--batch_size")


def chosen_tasks(args: argparse.Namespace) -> list:
    """The tasks to run: mteb's by name, or the datasets of an MMEB-format folder (the mini-MMEB test split by
    default, generated if absent)."""
    import mteb

    from coma_hf.data.mini_mmeb import mini_mmeb_split
    from coma_hf.integrations.mteb_tasks import mmeb_tasks

    if args.tasks:
        return list(mteb.get_tasks(tasks=args.tasks.split(",")))
    data = args.data if args.data is not None else mini_mmeb_split(DEFAULT_SYNTHETIC)
    return mmeb_tasks(data, args.datasets.split(",") if args.datasets else None)


def score_table(results, tasks: list) -> str:
    """One line per task and split: its name, its main score's name and value (%)."""
    main_score = {task.metadata.name: task.metadata.main_score for task in tasks}
    lines = ["| task | main score | value |", "| --- | --- | --- |"]
    for result in results.task_results:
        for split, scores in result.scores.items():
            for score in scores:
                value = 100 * score["main_score"]
                lines.append(f"| {result.task_name} ({split}) | {main_score[result.task_name]} | {value:.1f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_name_or_path", default=cli.DEFAULT_STAGE2)
    parser.add_argument("--data", default=None, help="MMEB-format folder (default: the mini-MMEB test split)")
    parser.add_argument("--datasets", default=None, help="comma-separated dataset names of --data")
    parser.add_argument("--tasks", default=None, help="comma-separated mteb task names (downloaded from the Hub)")
    parser.add_argument("--mock", action="store_true", help="run mteb's mock tasks for image and text (offline)")
    parser.add_argument("--output_dir", default="outputs/mteb")
    parser.add_argument("--batch_size", type=int, default=16)
    cli.add_debug_flag(parser)
    args = parser.parse_args(argv)
    check_arguments(args)
    cli.configure_logging(args.debug)

    import mteb

    from coma_hf.integrations.mteb import load

    model = load(args.model_name_or_path, batch_size=args.batch_size)
    if args.mock:
        report = mteb.mock_run(model)
        print(report.to_markdown())
        return report
    tasks = chosen_tasks(args)
    cache = mteb.ResultCache(cache_path=args.output_dir)
    encode_kwargs = {"batch_size": args.batch_size}
    results = mteb.evaluate(model, tasks, cache=cache, overwrite_strategy="always", encode_kwargs=encode_kwargs)
    print(score_table(results, tasks))
    print(f"mteb's results written under {args.output_dir}/results")
    return results


if __name__ == "__main__":
    cli.run(main)
