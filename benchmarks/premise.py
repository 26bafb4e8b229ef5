"""The paper's premise, decided: from a pre-trained reader, does compression pre-training make a better embedder than
contrastive training alone?

Every run starts from the shipped reader (`coma_hf.reader`, the embedded tiny Qwen2.5-VL trained as an ordinary VLM):

- **A** contrastive only: the reader with fresh compression rows (seeded), stage 2 only;
- **B{n}** CoMa: stage 1 of n steps (bottleneck mask, loss on the answers), then the same stage 2. B600 (= B1 of the
  protocol) is one epoch of the 20,000 stage-1 scenes at batch 32.

Stage 2 has two named settings. `lora` (the primary, the paper's): a fresh LoRA (r 16, alpha 64, dropout 0.1 on the
language model's attention) with the compression rows trainable and the vision tower frozen, merged at the end.
`full` (the first premise run's): every weight trained. Either way every budget runs the same number of steps at the
same batch, each batch from one dataset; dev is scored every `eval_steps`, and the checkpoint with the best dev IND is
kept beside the final one. Each seed draws its own contrastive pairs (`--pair_seed`), the same for every arm.

Test is read once per checkpoint, per query (`MMEBEvaluator(per_query=True)`), on the mini-MMEB test split
(`eval_queries` queries per dataset). Arms are compared by `coma_hf.evaluation.compare` (hierarchical paired bootstrap
over seeds and queries, Holm over the endpoints, sign test over seeds) under the protocol's decision rules.

The steps, in order (the first three write `benchmarks/results/premise_protocol.json`, committed before any arm runs):

    python benchmarks/premise.py --tune                # stage-2 learning-rate grid for A (seed 0, dev IND)
    python benchmarks/premise.py --select              # zero-shot dev scores of the starts; the OOD endpoints
    python benchmarks/premise.py --plan --workers 2    # projected wall time of --experiments
    python benchmarks/premise.py --workers 2 --experiments primary,data_efficiency,matched,dose
    python benchmarks/premise.py --quick --workers 2   # toy sizes, for the test

Each run writes one JSON record under `--work_dir/results`; a killed benchmark resumes where it stopped.
"""

from __future__ import annotations

import argparse
import gzip
import importlib.util
import json
import math
import os
import platform
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from coma_hf.data.mini_mmeb import OOD_ATTRIBUTES, write_mini_mmeb
from coma_hf.data.synthetic import write_synthetic_dataset
from coma_hf.evaluation.compare import compare_arms, crossing_interval, endpoint_intervals
from coma_hf.evaluation.mmeb import IND, OOD, MMEBDataset, MMEBEvaluator, chance_baselines, load_mmeb_datasets
from coma_hf.storage import load_record, write_record

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
PROTOCOL_FILE = "premise_protocol.json"
EXPERIMENTS = ("primary", "data_efficiency", "matched", "dose")
STAGE2_SETTINGS = {
    "lora": ["--use_lora", "true"],  # r 16, alpha 64, dropout 0.1, compression rows trained (LoraArguments defaults)
    "full": ["--use_lora", "false"],
}
BEST_METRIC = "dev_IND_precision@1"  # the evaluator's name is "dev"


@dataclass(frozen=True)
class Budget:
    """The data, compute and seeds every arm shares."""

    primary_stage1_steps: int = 600  # B1: one epoch of `num_train_scenes` at `batch_size`
    stage2_steps: int = 200
    batch_size: int = 32
    eval_steps: int = 50  # dev scored this often during stage 2; the best dev-IND checkpoint is kept
    primary_seeds: tuple[int, ...] = (0, 1, 2, 3, 4, 5)
    primary_pairs: int = 500
    secondary_seeds: tuple[int, ...] = (0, 1, 2)
    efficiency_pairs: tuple[int, ...] = (250, 500, 2000, 8000)
    dose_steps: tuple[int, ...] = (150, 300, 1200)  # besides 0 (= A) and the primary's 600
    num_train_scenes: int = 20000  # stage-1 QA scenes
    pair_scenes: int = 1200  # train scenes whose mini-MMEB pairs (7 each) hold the largest budget
    num_dev_scenes: int = 200
    num_test_scenes: int = 1000
    scene_size: int = 112
    eval_queries: int = 1000  # per test dataset
    num_compression_tokens: int = 8
    stage2_setting: str = "lora"
    # down to the paper's scale (5e-5); 1e-2 added because the first five peaked at their top, 3e-3
    learning_rate_grid: tuple[float, ...] = (5e-5, 1e-4, 3e-4, 1e-3, 3e-3, 1e-2)
    tune_seed: int = 0
    stage1_eval_samples: int = 100


QUICK = Budget(
    primary_stage1_steps=2,
    stage2_steps=4,
    batch_size=4,
    eval_steps=2,
    primary_seeds=(0, 1),
    primary_pairs=8,
    secondary_seeds=(0, 1),
    efficiency_pairs=(8, 16),
    dose_steps=(1,),
    num_train_scenes=16,
    pair_scenes=4,
    num_dev_scenes=6,
    num_test_scenes=6,
    scene_size=56,
    eval_queries=5,
    num_compression_tokens=4,
    learning_rate_grid=(1e-3, 3e-3),
    stage1_eval_samples=4,
)
QUICK_ARGS = (
    "--min_image_tokens 4 --max_image_tokens 4 --dataloader_num_workers 0 --per_device_eval_batch_size 8"
).split()


@dataclass(frozen=True)
class Stage1Run:
    """Stage 1 of one seed for `steps` steps; its checkpoint is the start of every B run of that seed and length."""

    seed: int
    steps: int

    @property
    def name(self) -> str:
        return f"stage1-seed{self.seed}-steps{self.steps}"


@dataclass(frozen=True)
class Stage2Run:
    """Stage 2 of arm A (`stage1_steps` 0) or B{stage1_steps}, one seed, `pairs` contrastive pairs, `steps` steps."""

    seed: int
    stage1_steps: int
    pairs: int
    steps: int

    @property
    def arm(self) -> str:
        return arm_name(self.stage1_steps)

    @property
    def name(self) -> str:
        return f"stage2-{self.arm}-seed{self.seed}-pairs{self.pairs}-steps{self.steps}"

    @property
    def stage1(self) -> Stage1Run | None:
        return Stage1Run(self.seed, self.stage1_steps) if self.stage1_steps else None

    @property
    def start(self) -> str:
        """The start checkpoint's name (zero-shot scores are computed once per start)."""
        return f"start-{self.arm}-seed{self.seed}"


def arm_name(stage1_steps: int) -> str:
    return f"B{stage1_steps}" if stage1_steps else "A"


def plan(budget: Budget, experiments: tuple[str, ...]) -> tuple[list[Stage1Run], list[Stage2Run]]:
    """Every run of `experiments`, in order (the primary first, each seed's arms together); a run that two
    experiments share runs once."""
    b1, steps, pairs = budget.primary_stage1_steps, budget.stage2_steps, budget.primary_pairs
    runs: list[Stage2Run] = []
    if "primary" in experiments:
        runs += [Stage2Run(seed, s1, pairs, steps) for seed in budget.primary_seeds for s1 in (0, b1)]
    seeds = budget.secondary_seeds
    if "data_efficiency" in experiments:
        runs += [Stage2Run(seed, s1, n, steps) for n in budget.efficiency_pairs for seed in seeds for s1 in (0, b1)]
    if "matched" in experiments:  # A given B1's stage-1 steps as contrastive steps
        runs += [Stage2Run(seed, 0, pairs, steps + b1) for seed in seeds]
        runs += [Stage2Run(seed, s1, pairs, steps) for seed in seeds for s1 in (0, b1)]
    if "dose" in experiments:
        runs += [Stage2Run(seed, s1, pairs, steps) for s1 in (0, *budget.dose_steps, b1) for seed in seeds]
    runs = list(dict.fromkeys(runs))
    stage1 = list(dict.fromkeys(run.stage1 for run in runs if run.stage1 is not None))
    return stage1, runs


# --------------------------------------------------------------------------------------------------------------------
# Running
# --------------------------------------------------------------------------------------------------------------------
def _example(name: str):
    spec = importlib.util.spec_from_file_location(f"{name}_example", ROOT / "examples" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve their annotations through sys.modules
    spec.loader.exec_module(module)
    return module


@dataclass(frozen=True)
class Context:
    """What every run of one benchmark call shares."""

    budget: Budget
    work: Path
    reader: str
    extra: tuple[str, ...] = ()
    learning_rate: float | None = None
    image_tokens: int = 64  # the tiny recipe's (QUICK_ARGS: 4), for starts built here rather than by the scripts

    @property
    def synthetic(self) -> Path:
        return self.work / "synthetic"

    def record_path(self, name: str) -> Path:
        return self.work / "results" / f"{name}.json"

    def checkpoint(self, name: str) -> Path:
        return self.work / "checkpoints" / name


def stage1_arguments(run: Stage1Run, context: Context, output: Path) -> list[str]:
    budget = context.budget
    return [
        *("--model_name_or_path", context.reader, "--output_dir", str(output)),
        *("--synthetic_dir", str(context.synthetic)),
        *(
            f"--recipe tiny --seed {run.seed} --max_steps {run.steps} --per_device_train_batch_size "
            f"{budget.batch_size} --logging_steps {max(1, run.steps // 10)} --num_train_scenes "
            f"{budget.num_train_scenes} --num_dev_scenes {budget.num_dev_scenes} --num_test_scenes "
            f"{budget.num_test_scenes} --scene_size {budget.scene_size} --num_compression_tokens "
            f"{budget.num_compression_tokens} --attention_rule bottleneck --loss_on answers --objective ce "
            f"--max_eval_samples {budget.stage1_eval_samples} --disable_tqdm true"
        ).split(),
        *context.extra,
    ]


def stage2_arguments(
    run: Stage2Run, context: Context, output: Path, learning_rate: float, keep_best: bool = True
) -> list[str]:
    """`examples/train_contrastive.py`'s arguments for `run`; A starts from the reader with fresh compression rows
    seeded by the run's seed, as stage 1 starts."""
    budget = context.budget
    arguments = [
        *("--output_dir", str(output), "--synthetic_dir", str(context.synthetic)),
        *(
            f"--recipe tiny --seed {run.seed} --pair_seed {run.seed} --max_steps {run.steps} "
            f"--per_device_train_batch_size {budget.batch_size} --logging_steps {max(1, run.steps // 10)} "
            f"--max_train_scenes {budget.pair_scenes} --max_train_pairs {run.pairs} --learning_rate {learning_rate} "
            "--disable_tqdm true"
        ).split(),
        *STAGE2_SETTINGS[budget.stage2_setting],
    ]
    if keep_best:
        arguments += f"--eval_strategy steps --eval_steps {budget.eval_steps} --keep_best_by {BEST_METRIC}".split()
    if run.stage1 is None:
        start = ["--from_backbone", "--backbone", context.reader]
        start += ["--num_compression_tokens", str(budget.num_compression_tokens)]
    else:
        start = ["--model_name_or_path", str(context.checkpoint(run.stage1.name))]
    return arguments + start + list(context.extra)


def _git(*arguments: str) -> str:
    """`git` in this script's tree; empty when git or the repository is missing."""
    try:
        return subprocess.run(["git", "-C", str(ROOT), *arguments], capture_output=True, text=True).stdout.strip()
    except OSError:
        return ""


def provenance() -> dict:
    """Which code ran: the `coma_hf` that was imported and the commit of the tree this script lives in."""
    import coma_hf

    package = Path(coma_hf.__file__).resolve()
    inside = package.is_relative_to(ROOT)
    return {
        "coma_hf_file": str(package.relative_to(ROOT)) if inside else "outside the benchmark's tree",
        "commit": _git("rev-parse", "HEAD") or "unknown",
        "dirty": bool(_git("status", "--porcelain", "--untracked-files=no")),
    }


def run_stage1(run: Stage1Run, context: Context) -> dict:
    """Stage 1 of one seed and length (its checkpoint kept for the stage-2 runs); the record is written at the end."""
    record_path, output = context.record_path(run.name), context.checkpoint(run.name)
    if (record := load_record(record_path)) is not None and output.is_dir():
        return record
    arguments = stage1_arguments(run, context, output)
    summary = _example("pretrain").main(arguments)
    keys = ("train_loss_first", "train_loss_last", "heldout_answer_accuracy", "majority_baseline_accuracy")
    record = {
        "run": asdict(run),
        "arguments": arguments,
        **{key: summary.get(key) for key in (*keys, "control_answer_accuracy", "per_type", "initial_weights")},
        "seconds": summary["seconds"],
        "provenance": provenance(),
    }
    write_record(record_path, record)
    return record


def run_stage2(run: Stage2Run, context: Context) -> dict:
    """Stage 2 of one run; test read once per kept checkpoint (final, best dev), per query; zero-shot of its start."""
    record_path = context.record_path(run.name)
    if (record := load_record(record_path)) is not None:
        return record
    started = time.time()
    output = context.checkpoint(run.name)
    shutil.rmtree(output, ignore_errors=True)  # a run killed halfway starts again
    arguments = stage2_arguments(run, context, output, context.learning_rate)
    summary = _example("train_contrastive").main(arguments)
    start_folder = output / "initial" if run.stage1 is None else context.checkpoint(run.stage1.name)
    zero_shot(run.start, start_folder, context)
    test = test_datasets(context)
    best = summary["best_dev"]
    final = evaluate_folder(output, test)
    best_is_final = best is None or best["step"] == summary["global_steps"]
    record = {
        "run": {**asdict(run), "arm": run.arm, "name": run.name},
        "arguments": arguments,
        "start_weights": summary["start_weights"],
        "num_train_pairs": summary["num_train_pairs"],
        "stage2_loss": [summary["train_loss_first"], summary["train_loss_last"]],
        "dev": _dev_scores(summary),
        "best_dev": best,
        "final": final,
        "best": final if best_is_final else evaluate_folder(Path(best["path"]), test),
        "seconds": round(time.time() - started, 1),
        "provenance": provenance(),
    }
    write_record(record_path, record)
    shutil.rmtree(output, ignore_errors=True)  # reproducible from the arguments
    return record


def zero_shot(start: str, folder: Path, context: Context) -> dict:
    """Dev and test scores of a start checkpoint, computed once per start (the first run from it writes them)."""
    path = context.record_path(start)
    if (record := load_record(path)) is not None:
        return record
    record = {
        "start": start,
        "dev": evaluate_folder(folder, load_mmeb_datasets(context.synthetic / "mini_mmeb" / "dev"))["precision"],
        "test": evaluate_folder(folder, test_datasets(context)),
    }
    write_record(path, record)
    return record


def test_datasets(context: Context) -> list[MMEBDataset]:
    """The test datasets with their first `eval_queries` rows each (candidates are encoded once per dataset)."""
    folder = context.synthetic / "mini_mmeb" / "test"
    return [
        replace(dataset, rows=dataset.rows[: context.budget.eval_queries]) for dataset in load_mmeb_datasets(folder)
    ]


def evaluate_folder(folder: Path, datasets: list[MMEBDataset]) -> dict:
    """P@1 summary and per-query gold ranks and top-1 positions (`{dataset: [...]}`, query id = index)."""
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(folder), trust_remote_code=True, device="cpu")
    results = MMEBEvaluator(datasets, show_progress_bar=False, batch_size=64, per_query=True)(model)
    ranks: dict[str, list[int]] = {}
    top1: dict[str, list[int]] = {}
    for query in results["per_query"]:
        ranks.setdefault(query["dataset"], []).append(query["gold_rank"])
        top1.setdefault(query["dataset"], []).append(query["top1_position"])
    return {"precision": _precision(results), "gold_ranks": ranks, "top1_positions": top1, "split": results["split"]}


def _precision(results: dict) -> dict:
    return {
        "overall": results["overall"]["precision@1"],
        **{name: values["precision@1"] for name, values in results["distributions"].items()},
        "datasets": {name: values["precision@1"] for name, values in results["datasets"].items()},
    }


def _dev_scores(summary: dict) -> dict:
    return {
        "overall": summary["eval_precision_at_1"],
        **summary["eval_per_distribution"],
        "datasets": summary["eval_per_dataset"],
    }


def prepare_data(budget: Budget, work: Path) -> Path:
    synthetic = work / "synthetic"
    write_synthetic_dataset(
        synthetic, budget.num_train_scenes, budget.num_dev_scenes, budget.num_test_scenes, image_size=budget.scene_size
    )
    write_mini_mmeb(synthetic, max_train_scenes=budget.pair_scenes)
    return synthetic


# --------------------------------------------------------------------------------------------------------------------
# Before the run: the learning rate and the endpoints (the protocol)
# --------------------------------------------------------------------------------------------------------------------
def tune(context: Context, workers: int) -> dict:
    """Dev IND P@1 of arm A (seed `tune_seed`, the primary's pairs and steps, no best-checkpoint copy) at every rate
    of the grid, and the best rate. A rate's run is reused when its summary exists."""
    budget = context.budget
    grid = list(budget.learning_rate_grid)
    with _pool(workers) as pool:
        scores = list(pool.map(_tune_one, grid, [context] * len(grid)))
    by_rate = {str(rate): score for rate, score in zip(grid, scores, strict=True)}
    chosen = max(grid, key=lambda rate: by_rate[str(rate)])
    return {"seed": budget.tune_seed, "pairs": budget.primary_pairs, "dev_ind": by_rate, "chosen": chosen}


def _tune_one(rate: float, context: Context) -> float:
    output = context.work / "tune" / f"lr{rate:g}"
    summary_path = output / "contrastive_summary.json"
    if (summary := load_record(summary_path)) is None:
        run = Stage2Run(context.budget.tune_seed, 0, context.budget.primary_pairs, context.budget.stage2_steps)
        summary = _example("train_contrastive").main(stage2_arguments(run, context, output, rate, keep_best=False))
    return summary["eval_per_distribution"][IND]


def select_endpoints(context: Context, zero_shot_dev: dict[str, dict], reader_types: dict) -> dict:
    """The pre-registered endpoint rule, on dev. An OOD set enters the OOD endpoint when (1) the reader's full-input
    accuracy on each attribute the set hinges on is at least that attribute's majority answer + 0.25, and (2) the
    zero-shot dev P@1 of A's start (mean over the primary seeds) or of V's start is at least the set's chance level
    + 10 points. `zero_shot_dev` maps "A" and "V" to `{dataset: P@1}`; `reader_types` is the reader record's
    `evaluation.per_type`."""
    dev = load_mmeb_datasets(context.synthetic / "mini_mmeb" / "dev")
    chance = {name: values["best"] for name, values in chance_baselines(dev)["datasets"].items()}
    return endpoint_rule(OOD_ATTRIBUTES, reader_types, zero_shot_dev, chance)


READER_MARGIN = 0.25  # over the attribute's majority answer
ZERO_SHOT_MARGIN = 0.10  # over the set's chance level


def endpoint_rule(
    attributes: dict[str, tuple[str, ...]], reader_types: dict, zero_shot_dev: dict[str, dict], chance: dict
) -> dict:
    """`endpoint_rule` applied set by set: `{"sets": {name: {...why...}}, "passing": [names]}` (see
    `select_endpoints`)."""
    sets = {}
    for name, needs in attributes.items():
        margins = {attr: reader_types[attr]["reader"] - reader_types[attr]["majority"] for attr in needs}
        weakest = min(margins, key=margins.get)
        best_start = max(zero_shot_dev["A"][name], zero_shot_dev["V"][name])
        reads = margins[weakest] >= READER_MARGIN
        moves = best_start >= chance[name] + ZERO_SHOT_MARGIN
        sets[name] = {
            "attributes": list(needs),
            "weakest": weakest,
            "reader": reader_types[weakest]["reader"],
            "majority": reader_types[weakest]["majority"],
            "zero_shot_A": zero_shot_dev["A"][name],
            "zero_shot_V": zero_shot_dev["V"][name],
            "chance": chance[name],
            "passes": reads and moves,
        }
    return {"sets": sets, "passing": sorted(name for name, values in sets.items() if values["passes"])}


def start_scores_on_dev(context: Context) -> dict[str, dict]:
    """Zero-shot dev P@1 per dataset of V's start (the reader, K = 0, last token) and of A's start (the reader with
    fresh compression rows) for each primary seed, and their mean: `{"V": {...}, "A": {...}, "A-seed{s}": {...}}`."""
    from coma_hf import CoMaModel
    from coma_hf.hub import save_checkpoint

    dev = load_mmeb_datasets(context.synthetic / "mini_mmeb" / "dev")
    budget = context.budget
    tokens = {"min_image_tokens": context.image_tokens, "max_image_tokens": context.image_tokens}
    scores = {}
    for label, k, seed in [("V", 0, 0)] + [
        (f"A-seed{s}", budget.num_compression_tokens, s) for s in budget.primary_seeds
    ]:
        folder = context.work / "starts" / label
        if not folder.is_dir():
            model = CoMaModel.from_backbone(context.reader, num_compression_tokens=k, seed=seed, **tokens)
            save_checkpoint(model, folder)
        scores[label] = evaluate_folder(folder, dev)["precision"]["datasets"]
    names = scores["V"]
    scores["A"] = {name: statistics.mean(scores[f"A-seed{s}"][name] for s in budget.primary_seeds) for name in names}
    return scores


# --------------------------------------------------------------------------------------------------------------------
# After the run: comparisons, the decision rules, the report
# --------------------------------------------------------------------------------------------------------------------
CONFIRM_IND = 0.03  # B1 − A on IND at least this (P@1 as a fraction), with its interval above 0
REFUTE_IND = 0.02  # the IND interval's upper bound below this refutes
MIN_POSITIVE_SEEDS = 5  # of 6
MIN_OOD_SETS = 2  # fewer passing sets: the verdict rests on IND alone
TOLERANCE = 1e-9  # so that exactly +3 points counts as +3 despite float rounding


def endpoints_of(protocol: dict, ind: list[str]) -> dict[str, list[str]]:
    """The endpoints: the IND mean, the OOD endpoint mean (the sets that passed the rule) and each such set."""
    passing = protocol["endpoints"]["passing"]
    endpoints = {IND: ind}
    if passing:
        endpoints[OOD] = passing
        endpoints.update({f"{OOD}:{name}": [name] for name in passing})
    return endpoints


def hits(records: list[dict], checkpoint: str) -> dict[int, dict[str, list[int]]]:
    """`{seed: {dataset: [0/1 per query]}}` of one arm's records (`checkpoint`: "final" or "best")."""
    return {
        record["run"]["seed"]: {
            name: [int(rank == 1) for rank in ranks] for name, ranks in record[checkpoint]["gold_ranks"].items()
        }
        for record in records
    }


def decide(comparison: dict, ood_endpoint: bool) -> dict:
    """The protocol's decision rules on a B1 − A comparison (Holm-adjusted 95 % intervals)."""
    ind = comparison[IND]
    ind_low, ind_high = ind["holm"]["low"], ind["holm"]["high"]
    positive = ind["sign_test"]["positive"]
    ood = comparison.get(OOD) if ood_endpoint else None
    ood_low, ood_high = (ood["holm"]["low"], ood["holm"]["high"]) if ood else (None, None)
    confirmed = (
        ind["difference"] >= CONFIRM_IND - TOLERANCE
        and ind_low > 0
        and positive >= MIN_POSITIVE_SEEDS
        and (ood is None or ood_high >= 0)
    )
    refuted = ind_high < REFUTE_IND or (ood is not None and ood_high < 0)
    rule = "confirmed" if confirmed else "refuted" if refuted else "inconclusive"
    return {
        "rule": rule,
        "ind": {"difference": ind["difference"], "low": ind_low, "high": ind_high, "positive_seeds": positive},
        "ood": None if ood is None else {"difference": ood["difference"], "low": ood_low, "high": ood_high},
        "rests_on": "IND and OOD" if ood is not None else "IND alone",
    }


def _records(stage2: list[dict], arm: str, pairs: int, steps: int, seeds) -> list[dict]:
    return [
        r
        for r in stage2
        if r["run"]["arm"] == arm
        and r["run"]["pairs"] == pairs
        and r["run"]["steps"] == steps
        and r["run"]["seed"] in seeds
    ]


def analyse(stage2: list[dict], budget: Budget, protocol: dict, resamples: int) -> dict:
    """Every comparison the records allow: the primary (final and best-dev checkpoints), the data-efficiency
    crossing, compute-matched A and the dose-response, each with bootstrap intervals."""
    ind = sorted(
        name for name, value in stage2[0]["final"]["precision"]["datasets"].items() if name not in _ood(stage2)
    )
    endpoints = endpoints_of(protocol, ind)
    b1, steps, pairs = arm_name(budget.primary_stage1_steps), budget.stage2_steps, budget.primary_pairs
    analysis: dict = {"endpoints": endpoints, "ood_sets": sorted(_ood(stage2))}
    diagnostics = {f"{OOD}:{name}": [name] for name in analysis["ood_sets"] if f"{OOD}:{name}" not in endpoints}
    check_same_queries(stage2)
    seeds = budget.primary_seeds
    a, b = _records(stage2, "A", pairs, steps, seeds), _records(stage2, b1, pairs, steps, seeds)
    if len(a) == len(b) == len(seeds):  # a verdict needs every primary seed of both arms
        for checkpoint in ("final", "best"):
            comparison = compare_arms(hits(a, checkpoint), hits(b, checkpoint), endpoints, resamples=resamples)
            analysis[f"primary_{checkpoint}"] = {
                "comparison": comparison,
                "decision": decide(comparison, len(protocol["endpoints"]["passing"]) >= MIN_OOD_SETS),
                "seed_t_intervals": {name: seed_t_interval(values["per_seed"]) for name, values in comparison.items()},
                "diagnostics": compare_arms(hits(a, checkpoint), hits(b, checkpoint), diagnostics, resamples=resamples)
                if diagnostics
                else {},
                "seeds": sorted(set(hits(a, checkpoint)) & set(hits(b, checkpoint))),
            }
    every = {**endpoints, **diagnostics}
    secondary = budget.secondary_seeds
    analysis["arms"] = [
        {
            "arm": arm,
            "pairs": n,
            "steps": s,
            "final": endpoint_intervals(hits(group, "final"), every, resamples=resamples),
            "best": endpoint_intervals(hits(group, "best"), every, resamples=resamples),
        }
        for (arm, n, s), group in _groups(stage2).items()
    ]
    # the budgets whose A runs are complete on every secondary seed (a stopped benchmark reports what it has)
    curve = {n: hits(_records(stage2, "A", n, steps, secondary), "final") for n in budget.efficiency_pairs}
    curve = {n: arm for n, arm in curve.items() if len(arm) == len(secondary)}
    target = hits(_records(stage2, b1, pairs, steps, secondary), "final")
    if len(curve) >= 2 and len(target) == len(secondary):
        analysis["data_efficiency"] = crossing_interval(curve, target, ind, resamples=resamples)
    matched = hits(_records(stage2, "A", pairs, steps + budget.primary_stage1_steps, secondary), "final")
    if len(matched) == len(secondary) and len(target) == len(secondary):
        analysis["matched"] = compare_arms(matched, target, endpoints, resamples=resamples)
    return analysis


def check_same_queries(stage2: list[dict]) -> None:
    """Pairing by query index needs every run scored on the same test files and queries: stop otherwise."""
    splits = {
        json.dumps(record[checkpoint]["split"], sort_keys=True)
        for record in stage2
        for checkpoint in ("final", "best")
    }
    if len(splits) > 1:
        raise SystemExit(f"The records were scored on {len(splits)} different test splits; they cannot be paired.")


def seed_t_interval(per_seed: dict, confidence: float = 0.95) -> dict:
    """A sensitivity check beside the bootstrap: the t interval of the mean of the per-seed differences (seeds as
    the only source of noise; with few seeds the percentile bootstrap runs narrow)."""
    from scipy import stats

    values = list(per_seed.values())
    mean, error = statistics.mean(values), statistics.stdev(values) / math.sqrt(len(values))
    half = stats.t.ppf(0.5 + confidence / 2, len(values) - 1) * error
    return {"mean": mean, "low": mean - half, "high": mean + half}


def _ood(stage2: list[dict]) -> set[str]:
    from coma_hf.data.mini_mmeb import OUT_OF_DISTRIBUTION

    return set(OUT_OF_DISTRIBUTION) & set(stage2[0]["final"]["precision"]["datasets"])


def _groups(stage2: list[dict]) -> dict[tuple, list[dict]]:
    groups: dict[tuple, list[dict]] = {}
    for record in sorted(stage2, key=lambda r: (int(r["run"]["stage1_steps"]), r["run"]["pairs"], r["run"]["steps"])):
        groups.setdefault((record["run"]["arm"], record["run"]["pairs"], record["run"]["steps"]), []).append(record)
    return groups


HEADLINES = {
    "confirmed": "**Confirmed:** by the protocol's rule, compression pre-training (B1) beats contrastive-only (A)",
    "refuted": "**Refuted:** by the protocol's rule, compression pre-training (B1) does not beat contrastive-only (A)",
    "inconclusive": "**Inconclusive:** neither the protocol's confirming nor its refuting rule holds for B1 against A",
}


def headline(analysis: dict) -> str:
    primary = analysis.get("primary_final")
    if primary is None:
        return "**No verdict yet:** the primary comparison has not run."
    decision = primary["decision"]
    ind = decision["ind"]
    text = (
        f"{HEADLINES[decision['rule']]} (final checkpoints, {len(primary['seeds'])} paired seeds): IND "
        f"{_points(ind['difference'])} [{_points(ind['low'])}, {_points(ind['high'])}], "
        f"{ind['positive_seeds']} of {len(primary['seeds'])} seeds positive"
    )
    if decision["ood"] is not None:
        ood = decision["ood"]
        text += f"; OOD endpoint {_points(ood['difference'])} [{_points(ood['low'])}, {_points(ood['high'])}]"
    return text + f" (Holm-adjusted 95 % intervals; the verdict rests on {decision['rests_on']})."


def _points(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:+.1f}"


def _interval(values: dict) -> str:
    return f"{100 * values['mean']:.1f} [{100 * values['low']:.1f}, {100 * values['high']:.1f}]"


def _comparison_lines(comparison: dict, t_intervals: dict | None = None) -> list[str]:
    """One row per endpoint: the difference, its bootstrap and Holm-adjusted intervals, the seeds' sign test, the
    per-seed differences and (when given) the seeds-only t interval."""
    lines = [
        "| endpoint | B − A (points) | 95 % interval | Holm-adjusted interval | Holm p | seeds positive (sign-test p) "
        "| per seed | t interval over seeds |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for endpoint, values in comparison.items():
        holm, sign = values["holm"], values["sign_test"]
        per_seed = ", ".join(_points(value) for value in values["per_seed"].values())
        t = (t_intervals or {}).get(endpoint)
        lines.append(
            f"| {endpoint} | {_points(values['difference'])} | [{_points(values['low'])}, {_points(values['high'])}] "
            f"| [{_points(holm['low'])}, {_points(holm['high'])}] | {holm['p_adjusted']:.3f} | "
            f"{sign['positive']} of {values['seeds']} ({sign['p_value']:.3f}) | {per_seed} | "
            + (f"[{_points(t['low'])}, {_points(t['high'])}] |" if t else "n/a |")
        )
    return lines


def render_markdown(report: dict) -> str:
    """The report as `docs/premise.md`'s results: the header, the primary comparisons, the secondaries, the arms, the
    starts' zero-shot scores and stage 1."""
    sections = (
        _header_lines(report),
        _primary_lines(report),
        _secondary_lines(report),
        _arm_table(report),
        _zero_shot_table(report),
        _stage1_table(report),
    )
    body = "\n".join(line for section in sections for line in section)
    return body + "\n\n![Data efficiency and dose-response](premise.png)\n"


def _header_lines(report: dict) -> list[str]:
    analysis, budget, protocol = report["analysis"], report["budget"], report["protocol"]
    endpoints = analysis["endpoints"]
    primary = analysis.get("primary_final")
    return [
        f"# The premise: {primary['decision']['rule'] if primary else 'no verdict yet'} — does compression "
        "pre-training make a better embedder than contrastive training alone?",
        "",
        report["headline"],
        "",
        f"Protocol: commit `{report['protocol_commit']}` (`benchmarks/results/{PROTOCOL_FILE}` and the Protocol "
        f"section below), written before any arm ran. Command: `{report['command']}`; machine: {report['machine']}; "
        f"wall time {report['seconds'] / 60:.0f} min. The runs' code: {_run_commits(report['results'])}; the "
        f"analysis: commit `{report['provenance']['commit']}`"
        f"{' (with uncommitted changes)' if report['provenance']['dirty'] else ''}.",
        f"Stage 2: setting `{budget['stage2_setting']}`, learning rate {protocol['learning_rate']['chosen']:g}, "
        f"{budget['stage2_steps']} steps of batch {budget['batch_size']} at every budget; B1 = "
        f"{budget['primary_stage1_steps']} stage-1 steps of batch {budget['batch_size']}; test "
        f"{budget['eval_queries']} queries per dataset; experiments run: {', '.join(report['experiments'])}.",
        f"Endpoints: IND = mean of {len(endpoints[IND])} datasets; OOD = "
        + (f"mean of {', '.join(endpoints[OOD])}" if OOD in endpoints else "none (fewer than two sets passed)")
        + ".",
        "",
    ]


def _primary_lines(report: dict) -> list[str]:
    analysis, budget = report["analysis"], report["budget"]
    lines = []
    for checkpoint, title in (
        ("final", "final checkpoints (primary)"),
        ("best", "best dev-IND checkpoints (secondary)"),
    ):
        if (primary := analysis.get(f"primary_{checkpoint}")) is None:
            continue
        lines += [f"## B1 − A at {budget['primary_pairs']} pairs, {title}: rule **{primary['decision']['rule']}**", ""]
        lines += _comparison_lines(primary["comparison"], primary["seed_t_intervals"])
        if primary["diagnostics"]:
            lines += ["", "Diagnostics (OOD sets that failed the endpoint rule, outside the endpoint mean):", ""]
            lines += _comparison_lines(primary["diagnostics"])
        lines.append("")
    return lines


def _secondary_lines(report: dict) -> list[str]:
    analysis, budget = report["analysis"], report["budget"]
    lines = []
    if "data_efficiency" in analysis:
        crossing = analysis["data_efficiency"]
        smallest = crossing["budgets"][0]

        def bound(value: float | None) -> str:  # the curve is not extrapolated beyond its budgets
            if value is None:
                return "more than the largest budget"
            return f"at most {smallest}" if value == smallest else f"{value:.0f}"

        lines += [
            "## Data efficiency",
            "",
            f"Pairs A needs to match B1 at {budget['primary_pairs']} on IND (log-linear interpolation over "
            f"{crossing['budgets']}): {bound(crossing['crossing'])}, 95 % interval [{bound(crossing['low'])}, "
            f"{bound(crossing['high'])}] ({100 * crossing['never_reached_share']:.0f} % of resamples never reach it).",
            "",
        ]
    if "matched" in analysis:
        lines += ["## B1 − compute-matched A (A given B1's stage-1 steps as contrastive steps)", ""]
        lines += _comparison_lines(analysis["matched"]) + [""]
    return lines


def _arm_table(report: dict) -> list[str]:
    analysis = report["analysis"]
    names = list(analysis["arms"][0]["final"]) if analysis["arms"] else []
    lines = [
        "## Test Precision@1 (%) per arm, mean over seeds [95 % bootstrap interval]",
        "",
        "| arm | pairs | stage-2 steps | checkpoint | seeds | " + " | ".join(names) + " |",
        "| --- | --- | --- | --- | --- | " + " | ".join("---" for _ in names) + " |",
    ]
    for row in analysis["arms"]:
        for checkpoint in ("final", "best"):
            cells = " | ".join(_interval(row[checkpoint][name]) for name in names)
            seeds = row[checkpoint][names[0]]["seeds"]
            lines.append(f"| {row['arm']} | {row['pairs']} | {row['steps']} | {checkpoint} | {seeds} | {cells} |")
    return lines


def _zero_shot_table(report: dict) -> list[str]:
    lines = ["", "## Zero-shot test P@1 (%) of each start, before stage 2", ""]
    datasets = sorted(next(iter(report["zero_shot"].values()))["test"]["datasets"]) if report["zero_shot"] else []
    lines += [
        "| start | IND | OOD | " + " | ".join(datasets) + " |",
        "| --- | --- | --- | " + "--- | " * len(datasets),
    ]
    for start, record in sorted(report["zero_shot"].items()):
        test = record["test"]
        cells = " | ".join(f"{100 * test['datasets'][name]:.1f}" for name in datasets)
        lines.append(f"| {start} | {100 * test[IND]:.1f} | {100 * test[OOD]:.1f} | {cells} |")
    return lines


def _stage1_table(report: dict) -> list[str]:
    lines = [
        "",
        "## Stage 1 (answers to held-out dev questions through the bottleneck)",
        "",
        "| run | loss first → last | answer accuracy | majority | seconds |",
        "| --- | --- | --- | --- | --- |",
    ]
    for record in report["stage1"]:
        lines.append(
            f"| {record['run']['steps']} steps, seed {record['run']['seed']} | {record['train_loss_first']:.2f} → "
            f"{record['train_loss_last']:.2f} | {record['heldout_answer_accuracy']:.3f} | "
            f"{record['majority_baseline_accuracy']:.3f} | {record['seconds']:.0f} |"
        )
    return lines


def _run_commits(records: list[dict]) -> str:
    """The commits (and `coma_hf` files) the runs' records say they ran, e.g. "`coma_hf/__init__.py` at `abc…`"."""
    seen = {
        (record["provenance"]["coma_hf_file"], record["provenance"]["commit"], record["provenance"]["dirty"])
        for record in records
    }
    dirty_note = " (with uncommitted changes)"
    return ", ".join(f"`{file}` at `{commit}`{dirty_note if dirty else ''}" for file, commit, dirty in sorted(seen))


def plot(report: dict, path: Path) -> None:
    """Left: IND and OOD-endpoint P@1 against contrastive pairs for A and B1; right: against stage-1 steps at the
    primary budget (the dose-response; 0 = A)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    budget, rows = report["budget"], report["analysis"]["arms"]
    endpoints = [name for name in (IND, OOD) if rows and name in rows[0]["final"]]
    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for endpoint, style in zip(endpoints, ("-", "--"), strict=False):
        for arm in ("A", arm_name(budget["primary_stage1_steps"])):
            points = sorted(
                (row["pairs"], row["final"][endpoint])
                for row in rows
                if row["arm"] == arm and row["steps"] == budget["stage2_steps"]
            )
            if points:
                _errorbar(left, points, f"{arm} {endpoint}", style)
        dose = sorted(
            (int(row["arm"][1:]) if row["arm"] != "A" else 0, row["final"][endpoint])
            for row in rows
            if row["pairs"] == budget["primary_pairs"] and row["steps"] == budget["stage2_steps"]
        )
        if dose:
            _errorbar(right, dose, endpoint, style)
    left.set_xscale("log")
    left.set_xlabel("in-distribution contrastive pairs")
    right.set_xlabel(f"stage-1 steps (batch {budget['batch_size']}; 0 = A)")
    for axis in (left, right):
        axis.set_ylabel("test Precision@1 (%)")
        axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def _errorbar(axis, points: list[tuple[int, dict]], label: str, style: str) -> None:
    x = [point for point, _ in points]
    means = [100 * values["mean"] for _, values in points]
    below = [100 * (values["mean"] - values["low"]) for _, values in points]
    above = [100 * (values["high"] - values["mean"]) for _, values in points]
    axis.errorbar(x, means, yerr=[below, above], marker="o", capsize=3, linestyle=style, label=label)


HAND_WRITTEN = "<!-- Hand-written below this line: kept when the benchmark rewrites the file. -->"


def write_report(report: dict, json_path: Path, docs: Path) -> None:
    """The summary JSON, the per-query results beside it (`*_per_query.json.gz`), `premise.md` (generated, then the
    hand-written reading the previous file had, if any) and `premise.png`."""
    per_query = {
        record["run"]["name"]: {key: record[key] for key in ("final", "best")} for record in report["results"]
    }
    per_query["zero_shot"] = report.pop("zero_shot_test")
    with gzip.open(json_path.with_name(json_path.stem + "_per_query.json.gz"), "wt") as handle:
        handle.write(_portable(json.dumps(per_query)))
    summary = {**report, "results": [_without_per_query(record) for record in report["results"]]}
    write_record(json_path, json.loads(_portable(json.dumps(summary))))
    docs.mkdir(parents=True, exist_ok=True)
    markdown = docs / "premise.md"
    previous = markdown.read_text() if markdown.is_file() else ""
    tail = previous[previous.index(HAND_WRITTEN) :] if HAND_WRITTEN in previous else HAND_WRITTEN + "\n"
    markdown.write_text(render_markdown(report) + "\n" + tail)
    plot(report, docs / "premise.png")


SHIPPED_READER = "coma_hf/resources/reader"


def _portable(text: str) -> str:
    """`text` with the shipped reader's absolute path (in every run's arguments) written as its place in the tree, so
    that a committed report names no folder of the machine it ran on."""
    return re.sub(rf'/[^"\s]*/{SHIPPED_READER}', SHIPPED_READER, text)


def _without_per_query(record: dict) -> dict:
    return {
        **record,
        **{key: {k: v for k, v in record[key].items() if k in ("precision", "split")} for key in ("final", "best")},
    }


# --------------------------------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------------------------------
PLAN_STEPS = (4, 20)  # the timing runs' lengths: far enough apart that a run's fixed costs do not swamp a step


def project(context: Context, experiments: tuple[str, ...], workers: int) -> dict:
    """Seconds per step and per run of each kind, from runs of `PLAN_STEPS` steps (`workers` at a time, so the
    figures include their contention), one test evaluation, and the projected wall time of `experiments`."""
    with _pool(workers) as pool:
        copies = list(pool.map(_time_runs, range(workers), [context] * workers))
    timings = {key: statistics.mean(copy[key] for copy in copies) for key in copies[0]}
    short, long = PLAN_STEPS
    per_step = {
        kind: (timings[(kind, long)] - timings[(kind, short)]) / (long - short) for kind in ("stage1", "stage2")
    }
    overhead = {kind: max(0.0, timings[(kind, short)] - short * per_step[kind]) for kind in ("stage1", "stage2")}
    evaluation = timings["test"]
    stage1_runs, stage2_runs = plan(context.budget, experiments)
    budget = context.budget
    total = sum(overhead["stage1"] + run.steps * per_step["stage1"] for run in stage1_runs)
    starts = {run.start for run in stage2_runs}
    dev_evaluations = sum(run.steps // budget.eval_steps for run in stage2_runs)
    total += sum(overhead["stage2"] + run.steps * per_step["stage2"] for run in stage2_runs)
    # per run: test of the final and (at most) the best checkpoint; per start: zero-shot test and dev
    total += evaluation * (2 * len(stage2_runs) + len(starts)) + timings["dev"] * (dev_evaluations + len(starts))
    return {
        "per_step": per_step,
        "overhead": overhead,
        "test_evaluation": evaluation,
        "dev_evaluation": timings["dev"],
        "runs": len(stage1_runs) + len(stage2_runs),
        "seconds": total,
        "wall_seconds": total / workers,
    }


def _time_runs(copy: int, context: Context) -> dict:
    """Seconds of a stage-1 and a stage-2 run (no evaluation during it) of each of `PLAN_STEPS` lengths, and of one
    test and one dev evaluation, in this copy's own folders."""
    timings = {}
    plan_work = context.work / f"plan-{copy}"
    shutil.rmtree(plan_work, ignore_errors=True)
    local = replace(context, work=plan_work)
    (plan_work / "synthetic").parent.mkdir(parents=True, exist_ok=True)
    (plan_work / "synthetic").symlink_to(context.synthetic.resolve())
    for steps in PLAN_STEPS:
        started = time.time()
        run_stage1(Stage1Run(0, steps), local)
        timings[("stage1", steps)] = time.time() - started
        started = time.time()
        run = Stage2Run(0, 0, context.budget.primary_pairs, steps)
        output = local.checkpoint(f"stage2-{steps}")
        _example("train_contrastive").main(stage2_arguments(run, local, output, 1e-3, keep_best=False))
        timings[("stage2", steps)] = time.time() - started
    started = time.time()
    evaluate_folder(output, test_datasets(context))
    timings["test"] = time.time() - started
    started = time.time()
    evaluate_folder(output, load_mmeb_datasets(context.synthetic / "mini_mmeb" / "dev"))
    timings["dev"] = time.time() - started
    shutil.rmtree(plan_work, ignore_errors=True)
    return timings


def parse_arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="toy sizes, two seeds (for the test)")
    step = parser.add_mutually_exclusive_group()
    step.add_argument("--tune", action="store_true", help="the stage-2 learning-rate grid (writes the protocol)")
    step.add_argument("--select", action="store_true", help="the endpoint selection on dev (writes the protocol)")
    step.add_argument("--plan", action="store_true", help="time a few steps of each kind, print the projection")
    parser.add_argument("--experiments", default="primary", help=f"comma-separated, of {', '.join(EXPERIMENTS)}")
    parser.add_argument("--reader", default=None, help="reader folder (default: the shipped reader)")
    parser.add_argument("--work_dir", default="outputs/premise", help="scenes, checkpoints and per-run records")
    parser.add_argument("--protocol", default=None, help=f"default: benchmarks/results/{PROTOCOL_FILE}")
    parser.add_argument("--output_json", default=None, help="default: benchmarks/results/premise.json")
    parser.add_argument("--docs_dir", default=None, help="where premise.md and .png go (default: docs)")
    parser.add_argument("--resamples", type=int, default=10_000, help="bootstrap resamples")
    parser.add_argument("--report_only", action="store_true", help="report the finished runs; train nothing")
    parser.add_argument("--force", action="store_true", help="let --tune / --select replace the protocol's result")
    parser.add_argument("--workers", type=int, default=1, help="runs at once, each in its own process")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_arguments(argv)
    command = shlex.join(["python", "benchmarks/premise.py", *(argv if argv is not None else sys.argv[1:])])
    budget, extra = (QUICK, tuple(QUICK_ARGS)) if args.quick else (Budget(), ())
    experiments = tuple(name.strip() for name in args.experiments.split(","))
    if unknown := set(experiments) - set(EXPERIMENTS):
        raise SystemExit(f"unknown experiments {sorted(unknown)}; choose from {EXPERIMENTS}")
    work = Path(args.work_dir) / ("quick" if args.quick else "full")
    protocol_path = Path(args.protocol or (work / PROTOCOL_FILE if args.quick else RESULTS / PROTOCOL_FILE))
    reader = args.reader or _shipped_reader()
    prepare_data(budget, work)
    context = Context(budget, work, reader, extra, image_tokens=4 if args.quick else 64)
    if args.tune or args.select:
        return protocol_step(args, context, protocol_path, command)
    protocol = load_record(protocol_path)
    if protocol is None or "learning_rate" not in protocol or "endpoints" not in protocol:
        raise SystemExit(f"No protocol at {protocol_path}: run --tune and --select first (then commit it).")
    context = replace(context, learning_rate=protocol["learning_rate"]["chosen"])
    if args.plan:
        return print_projection(context, experiments, args.workers)
    started = time.time()
    stage1, records, starts = run_experiments(context, experiments, args.workers, args.report_only)
    report = {
        "headline": "",
        "budget": asdict(budget),
        "protocol": protocol,
        "experiments": list(experiments),
        "command": command,
        "machine": f"{platform.machine()} CPU, {os.cpu_count()} cores, torch {torch.__version__}"
        + (f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ", no GPU"),
        "provenance": provenance(),
        "protocol_commit": _git("log", "-n", "1", "--format=%H", "--", str(protocol_path.resolve())) or "uncommitted",
        "reader": _reader_record(reader).get("evaluation", {}).get("overall"),
        "analysis": analyse(records, budget, protocol, args.resamples),
        "stage1": stage1,
        **zero_shot_sections(context, starts),
        "results": records,
        "seconds": _add_wall_time(work, time.time() - started),
    }
    report["headline"] = headline(report["analysis"])
    json_path = Path(args.output_json or (work / "premise.json" if args.quick else RESULTS / "premise.json"))
    write_report(report, json_path, Path(args.docs_dir or (work / "report" if args.quick else ROOT / "docs")))
    print(report["headline"])
    return report


def protocol_step(args: argparse.Namespace, context: Context, protocol_path: Path, command: str) -> dict:
    """`--tune` (the learning-rate grid) or `--select` (the endpoints, on dev) written into the protocol."""
    protocol = load_record(protocol_path) or {"budget": asdict(context.budget)}
    if ("learning_rate" if args.tune else "endpoints") in protocol and not args.force:
        raise SystemExit(f"{protocol_path} already holds this step's result (pass --force to redo it).")
    if args.tune:
        protocol["learning_rate"] = tune(context, args.workers)
    else:
        scores = start_scores_on_dev(context)
        reader_types = _reader_record(context.reader)["evaluation"]["per_type"]
        protocol["zero_shot_dev"] = scores
        protocol["endpoints"] = select_endpoints(context, scores, reader_types)
    protocol["commands"] = {**protocol.get("commands", {}), "tune" if args.tune else "select": command}
    write_record(protocol_path, protocol)
    print(json.dumps({key: protocol[key] for key in ("learning_rate", "endpoints") if key in protocol}, indent=1))
    return protocol


def print_projection(context: Context, experiments: tuple[str, ...], workers: int) -> dict:
    """`--plan`: a few steps of each kind timed, the whole benchmark's time projected and printed."""
    projection = project(context, experiments, workers)
    print(
        f"Projected: {projection['runs']} runs, {projection['wall_seconds'] / 60:.0f} min wall with "
        f"{workers} worker(s) ({projection['seconds'] / 60:.0f} min of run time): "
        + ", ".join(
            f"{kind} {projection['per_step'][kind]:.2f} s/step + {projection['overhead'][kind]:.0f} s a run"
            for kind in ("stage1", "stage2")
        )
        + f", test evaluation {projection['test_evaluation']:.0f} s, dev {projection['dev_evaluation']:.0f} s"
    )
    return projection


def run_experiments(context: Context, experiments: tuple[str, ...], workers: int, report_only: bool):
    """`(stage-1 records, stage-2 records, the starts stage 2 began from)` of the planned runs (finished ones are read
    back); with `report_only`, only the runs a stopped benchmark finished."""
    stage1_runs, stage2_runs = plan(context.budget, experiments)
    if report_only:  # what a stopped benchmark finished, and nothing more
        stage2_runs = [run for run in stage2_runs if context.record_path(run.name).is_file()]
        needed = {run.stage1 for run in stage2_runs}
        stage1_runs = [run for run in stage1_runs if run in needed]
    print(f"{len(stage1_runs)} stage-1 and {len(stage2_runs)} stage-2 runs; records under {context.work / 'results'}")
    with _pool(workers) as pool:
        stage1 = list(pool.map(_run_stage1_logged, stage1_runs, [context] * len(stage1_runs)))
        total = len(stage2_runs)
        positions = [f"{index + 1}/{total}" for index in range(total)]
        records = list(pool.map(_run_stage2_logged, stage2_runs, positions, [context] * total))
    return stage1, records, list(dict.fromkeys(run.start for run in stage2_runs))


def zero_shot_sections(context: Context, starts: list[str]) -> dict:
    """The report's zero-shot scores of every start the stage-2 runs began from (dev, and test per query)."""
    zero_shots = {start: load_record(context.record_path(start)) for start in starts}
    return {
        "zero_shot": {start: {"dev": z["dev"], "test": z["test"]["precision"]} for start, z in zero_shots.items()},
        "zero_shot_test": {start: z["test"] for start, z in zero_shots.items()},
    }


def _add_wall_time(work: Path, seconds: float) -> float:
    """The benchmark's wall time over every call that worked on `work` (a resumed benchmark adds up its calls)."""
    path = work / "wall_seconds.json"
    total = (load_record(path) or {"seconds": 0.0})["seconds"] + seconds
    write_record(path, {"seconds": round(total, 1)})
    return round(total, 1)


def _pool(workers: int):
    """Runs execute in `workers` processes of `cpu_count // workers` torch threads each (inline for 1): every run
    is its own training script call, so they only share the files they read."""
    if workers <= 1:
        return _Inline()
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    threads = max(1, (os.cpu_count() or 1) // workers)
    context = multiprocessing.get_context("spawn")
    return ProcessPoolExecutor(workers, mp_context=context, initializer=torch.set_num_threads, initargs=(threads,))


class _Inline:
    """The `ProcessPoolExecutor` interface, run in this process."""

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        return False

    def map(self, function, *iterables):
        return map(function, *iterables)


def _run_stage1_logged(run: Stage1Run, context: Context) -> dict:
    print(f"\n=== {run.name} ===", flush=True)
    return run_stage1(run, context)


def _run_stage2_logged(run: Stage2Run, position: str, context: Context) -> dict:
    print(f"\n=== run {position}: {run.name} ===", flush=True)
    record = run_stage2(run, context)
    final = record["final"]["precision"]
    print(f"=== {run.name}: test IND {final[IND]:.3f} OOD {final[OOD]:.3f} ===", flush=True)
    return record


def _shipped_reader() -> str:
    from coma_hf.reader import reader_path

    return str(reader_path())


def _reader_record(reader: str) -> dict:
    from coma_hf.reader import RECORD_FILE, reader_record

    return reader_record(reader) if (Path(reader) / RECORD_FILE).is_file() else {}


if __name__ == "__main__":
    main()
