"""Does compression pre-training make contrastive learning better? The paper's central claim, in miniature.

From one backbone initialisation (the embedded tiny Qwen2.5-VL with random weights, per seed: `RANDOM_BACKBONE`) and
one data budget (the synthetic scenes and their mini-MMEB pairs), with the same number of optimizer steps and samples
for every arm:

- **A** contrastive only: stage 2 for S1 + S2 steps;
- **B** CoMa: S1 steps of compression pre-training (bottleneck mask), then S2 contrastive steps;
- **C** control: the same S1 steps on the same QA data with the plain causal mask (answers may read the input
  directly), then the same S2 contrastive steps. B − C is what compression adds; B − A mixes it with the extra QA
  supervision.
- **A short** (not compute-matched, a diagnostic): contrastive only for S2 steps, B's contrastive budget without its
  stage 1. B − A short is what stage 1 adds to the same contrastive training.

A, B and C run for every seed; the paper's ablations run once (seed 0, all else as B): K ∈ {1, 8, 32}, `loss_on`
answers vs all tokens after the compression tokens, single- vs multi-turn QA. Every run is the two example scripts
(`examples/pretrain.py`, `examples/train_contrastive.py`) with the arguments printed in the JSON; hyper-parameters are
the `tiny` recipes' and were not tuned on test: each final checkpoint is scored on dev (by the training script) and
read once on test.

    python benchmarks/warmup_ablation.py            # ≈ 60 min on 2 CPU cores; writes docs/results.md, .json, .png
    python benchmarks/warmup_ablation.py --quick    # a smoke run of every arm in about a minute

Each run writes one JSON record (atomically) under `--work_dir`'s `quick/records` or `full/records`, and a killed
benchmark resumes where it stopped: a record is reused when a run with the same arguments wrote it; one that storage
damaged (cut mid-line) is treated as missing and its run redone, with a warning (`coma_hf.storage.load_record`).
Delete the records folder to run everything again.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import shlex
import shutil
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from functools import partial
from pathlib import Path

import torch

from coma_hf.data.mini_mmeb import IN_DISTRIBUTION, write_mini_mmeb
from coma_hf.data.synthetic import write_synthetic_dataset
from coma_hf.evaluation.mmeb import MMEBEvaluator, chance_baselines, load_mmeb_datasets
from coma_hf.storage import load_record, write_record

ROOT = Path(__file__).resolve().parents[1]
META_TASKS = ("Classification", "VQA", "Retrieval", "Visual Grounding")
ARMS = ("A", "B", "C", "A short")
ARM_LABELS = {
    "A": "A contrastive only",
    "B": "B CoMa (bottleneck)",
    "C": "C causal control",
    "A short": "A short (S2 steps only)",
}


@dataclass(frozen=True)
class Budget:
    """One data and compute budget, shared by every arm."""

    stage1_steps: int = 400
    stage2_steps: int = 200
    batch_size: int = 32
    seeds: tuple[int, ...] = (0, 1, 2)
    num_train_scenes: int = 20000
    num_dev_scenes: int = 200
    num_test_scenes: int = 200
    scene_size: int = 112
    pair_scenes: int = 2000  # train scenes that make the mini-MMEB contrastive pairs
    num_compression_tokens: int = 8
    answer_eval_samples: int = 100


QUICK = Budget(
    stage1_steps=2,
    stage2_steps=2,
    batch_size=4,
    seeds=(0, 1),
    num_train_scenes=16,
    num_dev_scenes=4,
    num_test_scenes=4,
    scene_size=56,
    pair_scenes=8,
    num_compression_tokens=4,
    answer_eval_samples=4,
)
QUICK_MODEL = "--tiny_hidden_size 32 --min_image_tokens 4 --max_image_tokens 4".split()
# The setting docs/results.md was measured in, pinned against later changes to the `tiny` recipes: the random-weight
# embedded backbone at 16 visual tokens, and the learning rates the recipes had then.
RANDOM_BACKBONE = "--tiny_init random --min_image_tokens 16 --max_image_tokens 16".split()
STAGE1_PINNED = RANDOM_BACKBONE + "--learning_rate 1e-3".split()
STAGE2_PINNED = RANDOM_BACKBONE + "--learning_rate 3e-4".split()


@dataclass(frozen=True)
class Run:
    """One configuration: an arm, a seed and what differs from B."""

    name: str
    arm: str  # "A", "B", "C" or "A short"
    seed: int
    num_compression_tokens: int | None = None
    loss_on: str = "answers"
    max_qa_turns: int | None = None


def plan(budget: Budget) -> list[Run]:
    runs = [Run(arm, arm, seed) for seed in budget.seeds for arm in ARMS]
    k = budget.num_compression_tokens
    for other in sorted({1, 8, 32} - {k}):
        runs.append(Run(f"B K={other}", "B", 0, num_compression_tokens=other))
    runs.append(Run("B loss on all", "B", 0, loss_on="all_after_compression"))
    runs.append(Run("B single-turn", "B", 0, max_qa_turns=1))
    return runs


def _example(name: str):
    spec = importlib.util.spec_from_file_location(f"{name}_example", ROOT / "examples" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve their annotations through sys.modules
    spec.loader.exec_module(module)
    return module


def stage1_arguments(run: Run, budget: Budget, synthetic: Path, output: Path, extra: list[str]) -> list[str]:
    arguments = [
        "--recipe",
        "tiny",
        "--output_dir",
        str(output),
        "--seed",
        str(run.seed),
        "--max_steps",
        str(budget.stage1_steps),
        "--per_device_train_batch_size",
        str(budget.batch_size),
        "--synthetic_dir",
        str(synthetic),
        "--num_train_scenes",
        str(budget.num_train_scenes),
        "--num_dev_scenes",
        str(budget.num_dev_scenes),
        "--num_test_scenes",
        str(budget.num_test_scenes),
        "--scene_size",
        str(budget.scene_size),
        "--max_eval_samples",
        str(budget.answer_eval_samples),
        "--num_compression_tokens",
        str(run.num_compression_tokens or budget.num_compression_tokens),
        "--attention_rule",
        "causal" if run.arm == "C" else "bottleneck",
        "--loss_on",
        run.loss_on,
        "--logging_steps",
        str(max(1, budget.stage1_steps // 10)),
    ]
    if run.max_qa_turns is not None:
        arguments += ["--max_qa_turns", str(run.max_qa_turns)]
    return arguments + extra


def stage2_arguments(run: Run, budget: Budget, synthetic: Path, output: Path, start: Path | None, extra: list[str]):
    steps = budget.stage1_steps + budget.stage2_steps if run.arm == "A" else budget.stage2_steps
    arguments = [
        "--recipe",
        "tiny",
        "--output_dir",
        str(output),
        "--seed",
        str(run.seed),
        "--max_steps",
        str(steps),
        "--per_device_train_batch_size",
        str(budget.batch_size),
        "--synthetic_dir",
        str(synthetic),
        "--logging_steps",
        str(max(1, steps // 10)),
        "--eval_datasets",  # the datasets this experiment was run on, before the mini-MMEB had an OOD half
        ",".join(IN_DISTRIBUTION),
    ]
    if start is None:  # arms A: the same initialisation stage 1 would have started from
        arguments += ["--from_backbone", "--num_compression_tokens", str(budget.num_compression_tokens)]
    else:
        arguments += ["--model_name_or_path", str(start)]
    return arguments + extra


def planned_arguments(
    run: Run, budget: Budget, synthetic: Path, folder: Path, extra1: list[str], extra2: list[str]
) -> dict[str, list[str]]:
    """The command lines of one configuration's training scripts (`stage1_arguments` for B and C, then
    `stage2_arguments`): what the run executes, and what its record must match to be reused."""
    arguments, start = {}, None
    if run.arm in ("B", "C"):
        arguments["stage1_arguments"] = stage1_arguments(run, budget, synthetic, folder / "stage1", extra1)
        start = folder / "stage1"
    arguments["stage2_arguments"] = stage2_arguments(run, budget, synthetic, folder / "stage2", start, extra2)
    return arguments


def recorded_run(path: Path, run: Run, arguments: dict[str, list[str]], execute_run: Callable[[], dict]) -> dict:
    """The result of one configuration: its record at `path` when a run with the same `arguments` wrote it whole,
    else `execute_run()`, whose record is then written (atomically). A damaged record (cut mid-line by a full disk or
    an interrupted copy) is treated as missing: `load_record` warns, naming it, and the run is redone."""
    record = load_record(path)
    if record is not None and record.get("run") == asdict(run) and _same_arguments(record, arguments):
        print(f"=== {run.name} seed {run.seed}: recorded in {path} ===", flush=True)
        return record
    record = execute_run()
    write_record(path, record)
    return record


def _same_arguments(record: dict, arguments: dict[str, list[str]]) -> bool:
    """Whether `record` was made by these command lines (a record of another budget is not reused)."""
    return {key: record[key] for key in ("stage1_arguments", "stage2_arguments") if key in record} == arguments


def execute(run: Run, arguments: dict[str, list[str]], folder: Path, test) -> dict:
    """Train one configuration with its `planned_arguments`; dev scores from the training script, test scores read
    once here."""
    started = time.time()
    result = {"run": asdict(run)}
    if "stage1_arguments" in arguments:
        stage1 = _example("pretrain").main(arguments["stage1_arguments"])
        result["stage1_arguments"] = arguments["stage1_arguments"]
        result["stage1"] = {
            key: stage1.get(key)
            for key in (
                "train_loss_first",
                "train_loss_last",
                "heldout_answer_accuracy",
                "majority_baseline_accuracy",
                "control_answer_accuracy",
                "seconds",
            )
        }
    stage2 = _example("train_contrastive").main(arguments["stage2_arguments"])
    result["stage2_arguments"] = arguments["stage2_arguments"]
    result["dev"] = {"overall": stage2["eval_precision_at_1"], **stage2["eval_per_meta_task"]}
    result["stage2_loss"] = [stage2["train_loss_first"], stage2["train_loss_last"]]
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(folder / "stage2"), trust_remote_code=True, device="cpu")
    scores = MMEBEvaluator(test, show_progress_bar=False)(model)
    result["test"] = {
        "overall": scores["overall"]["precision@1"],
        **{task: values["precision@1"] for task, values in scores["meta_tasks"].items()},
    }
    result["seconds"] = round(time.time() - started, 1)
    shutil.rmtree(folder, ignore_errors=True)  # checkpoints are reproducible from the arguments
    return result


def aggregate(results: list[dict]) -> dict:
    """Mean and standard deviation over seeds of each arm, per split and metric."""
    summary = {}
    for arm in ARMS:
        rows = [result for result in results if result["run"]["name"] == arm]
        summary[arm] = {
            split: {
                metric: {
                    "mean": statistics.mean(row[split][metric] for row in rows),
                    "std": statistics.stdev(row[split][metric] for row in rows) if len(rows) > 1 else 0.0,
                }
                for metric in ("overall", *META_TASKS)
            }
            for split in ("dev", "test")
        }
    return summary


def verdict(summary: dict, split: str = "test") -> dict:
    """Whether B beats A and C by more than the seed spread (difference of means > sum of standard deviations)."""
    b = summary["B"][split]["overall"]
    out = {}
    for other in ("A", "C", "A short"):
        o = summary[other][split]["overall"]
        difference = b["mean"] - o["mean"]
        key = other.replace(" ", "_")
        out[f"B_minus_{key}"] = difference
        out[f"B_beats_{key}_beyond_spread"] = difference > b["std"] + o["std"]
        out[f"{key}_beats_B_beyond_spread"] = -difference > b["std"] + o["std"]
    return out


def write_report(report: dict, output: Path, command: str) -> None:
    output.mkdir(parents=True, exist_ok=True)
    (output / "warmup_ablation.json").write_text(json.dumps(report, indent=2))
    plot(report, output / "warmup_ablation.png")
    (output / "results.md").write_text(markdown(report, command))


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary, figure = report["summary"], plt.figure(figsize=(11, 4))
    left = figure.add_subplot(1, 2, 1)
    for offset, split in ((-0.2, "dev"), (0.2, "test")):
        means = [100 * summary[arm][split]["overall"]["mean"] for arm in ARMS]
        stds = [100 * summary[arm][split]["overall"]["std"] for arm in ARMS]
        left.bar([i + offset for i in range(len(ARMS))], means, 0.4, yerr=stds, capsize=4, label=split)
    left.axhline(100 * report["baseline"]["test"], color="grey", linestyle="--", label="chance/constant (test)")
    left.set_xticks(
        range(len(ARMS)), ["A\ncontrastive only", "B\nCoMa", "C\ncausal control", "A short\nS2 steps only"]
    )
    left.set_ylabel("Precision@1 (%)")
    left.set_title(f"mean ± std over {len(report['budget']['seeds'])} seeds")
    left.legend()
    right = figure.add_subplot(1, 2, 2)
    reference = _reference(report)
    rows = [reference, *report["ablations"]]
    names = [f"B (K={report['budget']['num_compression_tokens']})"] + [
        result["run"]["name"] for result in report["ablations"]
    ]
    right.barh(names, [100 * result["dev"]["overall"] for result in rows], color="tab:green")
    right.set_xlabel("dev Precision@1 (%), seed 0")
    right.set_title("ablations of B")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def _reference(report: dict) -> dict:
    return next(result for result in report["results"] if result["run"]["name"] == "B" and result["run"]["seed"] == 0)


def _cell(values: dict) -> str:
    return f"{100 * values['mean']:.1f} ± {100 * values['std']:.1f}"


def _verdict_line(verdict: dict, other: str, meaning: str) -> str:
    key = other.replace(" ", "_")
    if verdict[f"B_beats_{key}_beyond_spread"]:
        outcome = f"B beats {other} beyond the seed spread"
    elif verdict[f"{key}_beats_B_beyond_spread"]:
        outcome = f"{other} beats B beyond the seed spread"
    else:
        outcome = "within the seed spread"
    return f"- B − {other} ({meaning}) = {100 * verdict[f'B_minus_{key}']:+.1f} points: **{outcome}**."


def markdown(report: dict, command: str) -> str:
    """The report as `results.md`: the header, the arms, stage 1, the ablations, the follow-ups and the verdict."""
    sections = (
        _header(report, command),
        _arms_table(report),
        _stage1_table(report),
        _ablation_table(report),
        _followup_table(report),
        _verdict_section(report),
    )
    return "\n".join(line for section in sections for line in section)


def _header(report: dict, command: str) -> list[str]:
    budget = report["budget"]
    return [
        "# Does compression pre-training help? (issue 6)",
        "",
        f"Command: `{command}`  ",
        f"Machine: {report['machine']}  ",
        f"Wall time: {report['seconds'] / 60:.1f} min",
        "",
        f"Budget per arm: {budget['stage1_steps'] + budget['stage2_steps']} optimizer steps of batch "
        f"{budget['batch_size']} (B and C: {budget['stage1_steps']} stage-1 + {budget['stage2_steps']} stage-2; "
        f"A: all contrastive), K={budget['num_compression_tokens']}, seeds {budget['seeds']}; stage-1 QA from "
        f"{budget['num_train_scenes']} synthetic scenes, contrastive pairs from the first {budget['pair_scenes']}; "
        f"{budget['num_dev_scenes']} dev and {budget['num_test_scenes']} test scenes per mini-MMEB dataset.",
        "",
    ]


def _arms_table(report: dict) -> list[str]:
    lines = [
        "## A, B, C — Precision@1 (%), mean ± std over seeds",
        "",
        "| arm | split | overall | " + " | ".join(META_TASKS) + " |",
        "| --- | --- | --- | " + " | ".join("---" for _ in META_TASKS) + " |",
    ]
    for arm, label in ARM_LABELS.items():
        for split in ("dev", "test"):
            row = report["summary"][arm][split]
            lines.append(
                f"| {label} | {split} | **{_cell(row['overall'])}** | "
                + " | ".join(_cell(row[task]) for task in META_TASKS)
                + " |"
            )
    lines.append(
        f"| chance/constant baseline | test | {100 * report['baseline']['test']:.1f} | "
        + " | ".join(f"{100 * report['baseline']['test_meta_tasks'][task]:.1f}" for task in META_TASKS)
        + " |"
    )
    return lines


def _stage1_table(report: dict) -> list[str]:
    lines = [
        "",
        "## Stage 1 of B and C (answers decoded from the K states; dev scenes)",
        "",
        "| run | stage-1 loss | answer accuracy | majority | control (other scene) |",
        "| --- | --- | --- | --- | --- |",
    ]
    for result in report["results"]:
        stage1 = result.get("stage1")
        if stage1:
            lines.append(
                f"| {result['run']['name']} seed {result['run']['seed']} | {stage1['train_loss_first']:.2f} → "
                f"{stage1['train_loss_last']:.2f} | {stage1['heldout_answer_accuracy']:.3f} | "
                f"{stage1['majority_baseline_accuracy']:.3f} | {stage1['control_answer_accuracy']:.3f} |"
            )
    return lines


def _ablation_table(report: dict) -> list[str]:
    lines = [
        "",
        "## Ablations of B (seed 0) — Precision@1 (%)",
        "",
        "| configuration | dev | test |",
        "| --- | --- | --- |",
    ]
    reference = _reference(report)
    for result in [reference, *report["ablations"]]:
        name = (
            f"B (K={report['budget']['num_compression_tokens']}, answers, multi-turn)"
            if result is reference
            else result["run"]["name"]
        )
        lines.append(f"| {name} | {100 * result['dev']['overall']:.1f} | {100 * result['test']['overall']:.1f} |")
    return lines


def _followup_table(report: dict) -> list[str]:
    if not report.get("followups"):
        return []
    lines = [
        "",
        "## Follow-ups (seed 0, B unless named; each its own command)",
        "",
        "| what changed | dev | test | stage-1 answers | command |",
        "| --- | --- | --- | --- | --- |",
    ]
    for followup in report["followups"]:
        for result in followup["results"]:
            answers = result.get("stage1", {}).get("heldout_answer_accuracy")
            lines.append(
                f"| {followup['label']} | {100 * result['dev']['overall']:.1f} | "
                f"{100 * result['test']['overall']:.1f} | {'' if answers is None else f'{answers:.3f}'} | "
                f"`{followup['command']}` |"
            )
    return lines


def _verdict_section(report: dict) -> list[str]:
    return [
        "",
        "![A, B, C and the ablations](warmup_ablation.png)",
        "",
        "## Verdict (test, overall)",
        "",
        _verdict_line(report["verdict"], "A", "compute-matched, contrastive only"),
        _verdict_line(report["verdict"], "C", "the same stage 1 with the causal mask: what compression adds"),
        _verdict_line(report["verdict"], "A short", "the same contrastive steps without stage 1"),
        "",
        "(Beyond the spread = the difference of means exceeds the sum of the two standard deviations.)",
        "",
    ]


def parse_arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smoke run: toy sizes, two seeds")
    parser.add_argument(
        "--output_dir", default=None, help="report folder (default: docs, or outputs/... with --quick)"
    )
    parser.add_argument("--work_dir", default="outputs/warmup_ablation", help="scenes and per-run checkpoints")
    parser.add_argument("--stage1_steps", type=int, default=None)
    parser.add_argument("--stage2_steps", type=int, default=None)
    parser.add_argument("--seeds", default=None, help="comma-separated seeds")
    parser.add_argument(
        "--only", default=None, help="comma-separated run names to run (e.g. 'B,A short'), for follow-ups"
    )
    parser.add_argument("--stage1_args", default="", help="extra arguments for examples/pretrain.py")
    parser.add_argument("--stage2_args", default="", help="extra arguments for examples/train_contrastive.py")
    parser.add_argument("--render", default=None, help="re-render the report from this JSON (no training)")
    parser.add_argument("--followups", default=None, help="with --render: folder of follow-up runs to add")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_arguments(argv)
    if args.render:
        return render_again(args)
    command = shlex.join(["python", "benchmarks/warmup_ablation.py", *(argv if argv is not None else sys.argv[1:])])
    budget, extra1, extra2 = run_settings(args)
    work = Path(args.work_dir) / ("quick" if args.quick else "full")
    output = Path(args.output_dir or (work / "report" if args.quick else ROOT / "docs"))
    started = time.time()
    synthetic = work / "synthetic"
    write_synthetic_dataset(
        synthetic, budget.num_train_scenes, budget.num_dev_scenes, budget.num_test_scenes, image_size=budget.scene_size
    )
    write_mini_mmeb(synthetic, max_train_scenes=budget.pair_scenes)
    test = load_mmeb_datasets(synthetic / "mini_mmeb" / "test", names=list(IN_DISTRIBUTION))
    runs = plan(budget)
    if args.only:
        runs = [run for run in runs if run.name in args.only.split(",")]
    results = [
        run_one(run, f"{index + 1}/{len(runs)}", budget, work, synthetic, test, extra1, extra2)
        for index, run in enumerate(runs)
    ]
    seconds = round(time.time() - started, 1)
    if args.only:  # a follow-up: the runs alone, no comparison of arms
        followup = {"command": command, "budget": asdict(budget), "results": results, "seconds": seconds}
        output.mkdir(parents=True, exist_ok=True)
        (output / "followup.json").write_text(json.dumps(followup, indent=2))
        return followup
    report = comparison_report(results, budget, test, command, seconds)
    write_report(report, output, command)
    print((output / "results.md").read_text())
    return report


def render_again(args: argparse.Namespace) -> dict:
    """`--render`: the report rendered again from its JSON, with the follow-ups of `--followups`; no training."""
    report = json.loads(Path(args.render).read_text())
    report["verdict"] = verdict(report["summary"])
    if args.followups:
        report["followups"] = [
            {"label": path.parent.name.replace("_", " "), **json.loads(path.read_text())}
            for path in sorted(Path(args.followups).glob("*/followup.json"))
        ]
    write_report(report, Path(args.output_dir or Path(args.render).parent), report["command"])
    return report


def run_settings(args: argparse.Namespace) -> tuple[Budget, list[str], list[str]]:
    """`(budget, stage-1 extra arguments, stage-2 extra arguments)` of this call."""
    budget, extra = (QUICK, QUICK_MODEL) if args.quick else (Budget(), [])
    overrides = {key: getattr(args, key) for key in ("stage1_steps", "stage2_steps") if getattr(args, key) is not None}
    if args.seeds:
        overrides["seeds"] = tuple(int(seed) for seed in args.seeds.split(","))
    if args.quick:
        extra = extra + ["--dataloader_num_workers", "0", "--per_device_eval_batch_size", "8"]
    extra1 = STAGE1_PINNED + extra + args.stage1_args.split()
    extra2 = STAGE2_PINNED + extra + args.stage2_args.split()
    return replace(budget, **overrides), extra1, extra2


def run_one(run, position: str, budget: Budget, work: Path, synthetic: Path, test, extra1, extra2) -> dict:
    """One planned run, or its record when a finished earlier call wrote it whole."""
    print(f"\n=== run {position}: {run.name}, seed {run.seed} ===", flush=True)
    folder = work / "runs" / f"{run.name}-{run.seed}".replace(" ", "_")
    arguments = planned_arguments(run, budget, synthetic, folder, extra1, extra2)
    record = work / "records" / f"{folder.name}.json"
    result = recorded_run(record, run, arguments, partial(execute, run, arguments, folder, test))
    print(
        f"=== {run.name} seed {run.seed}: dev {result['dev']['overall']:.3f} test "
        f"{result['test']['overall']:.3f} ({result['seconds']} s) ===",
        flush=True,
    )
    return result


def comparison_report(results: list[dict], budget: Budget, test, command: str, seconds: float) -> dict:
    """The report of a full call: every run, the ablations, the arms' summary, the chance baseline and the
    verdict."""
    baseline = chance_baselines(test)
    summary = aggregate(results)
    return {
        "budget": asdict(budget),
        "machine": f"{platform.machine()} CPU, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads, "
        f"torch {torch.__version__}, no GPU"
        if not torch.cuda.is_available()
        else torch.cuda.get_device_name(),
        "results": results,
        "ablations": [result for result in results if result["run"]["name"] not in ARMS],
        "summary": summary,
        "baseline": {
            "test": baseline["overall"]["best"],
            "test_meta_tasks": {task: values["best"] for task, values in baseline["meta_tasks"].items()},
        },
        "verdict": verdict(summary),
        "seconds": seconds,
        "command": command,
    }


if __name__ == "__main__":
    main()
