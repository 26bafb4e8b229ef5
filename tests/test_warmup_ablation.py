"""benchmarks/warmup_ablation.py --quick: every arm runs, compute-matched, and the report agrees with its runs."""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).parents[1] / "benchmarks" / "warmup_ablation.py"


def _benchmark():
    spec = importlib.util.spec_from_file_location("warmup_ablation", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def _argument(arguments: list[str], name: str) -> str:
    return arguments[arguments.index(name) + 1]


def test_quick_run_is_compute_matched_and_reported(tmp_path):
    benchmark = _benchmark()
    report = benchmark.main(
        ["--quick", "--work_dir", str(tmp_path / "work"), "--output_dir", str(tmp_path / "report")]
    )
    budget = report["budget"]
    names = [(result["run"]["name"], result["run"]["seed"]) for result in report["results"]]
    arms = ["A", "B", "C", "A short"]
    assert names[:8] == [(arm, seed) for seed in (0, 1) for arm in arms]
    assert {name for name, _ in names[8:]} == {"B K=1", "B K=8", "B K=32", "B loss on all", "B single-turn"}

    for result in report["results"]:
        steps = int(_argument(result["stage2_arguments"], "--max_steps"))
        batch = {_argument(result["stage2_arguments"], "--per_device_train_batch_size")}
        if result["run"]["arm"].startswith("A"):  # contrastive only, from the same initialisation
            assert "--from_backbone" in result["stage2_arguments"] and "stage1_arguments" not in result
            total = budget["stage1_steps"] + budget["stage2_steps"]
            assert steps == (total if result["run"]["arm"] == "A" else budget["stage2_steps"])
        else:
            assert steps == budget["stage2_steps"]
            assert int(_argument(result["stage1_arguments"], "--max_steps")) == budget["stage1_steps"]
            batch.add(_argument(result["stage1_arguments"], "--per_device_train_batch_size"))
            rule = _argument(result["stage1_arguments"], "--attention_rule")
            assert rule == ("causal" if result["run"]["arm"] == "C" else "bottleneck")
        assert batch == {str(budget["batch_size"])}
        for split in ("dev", "test"):  # overall weighs the 7 datasets the same: 3 Classification, 2 Retrieval
            scores = result[split]
            weighted = (
                3 * scores["Classification"] + scores["VQA"] + 2 * scores["Retrieval"] + scores["Visual Grounding"]
            ) / 7
            assert scores["overall"] == pytest.approx(weighted)

    for arm in arms:  # the summary is the mean and spread of the arm's two seeds
        first, second = (result["test"]["overall"] for result in report["results"] if result["run"]["name"] == arm)
        assert report["summary"][arm]["test"]["overall"]["mean"] == pytest.approx((first + second) / 2)
        assert report["summary"][arm]["test"]["overall"]["std"] == pytest.approx(abs(first - second) / math.sqrt(2))

    markdown = (tmp_path / "report" / "results.md").read_text()
    assert "python benchmarks/warmup_ablation.py --quick" in markdown and "| A contrastive only | test |" in markdown
    assert (tmp_path / "report" / "warmup_ablation.png").read_bytes()[:4] == b"\x89PNG"
    assert (tmp_path / "report" / "warmup_ablation.json").is_file()


def _results(test_overall: dict[str, list[float]]) -> list[dict]:
    """Runs of every arm whose scores are all one number per run (dev a tenth below test)."""
    meta_tasks = ("Classification", "VQA", "Retrieval", "Visual Grounding")
    return [
        {
            "run": {"name": arm, "seed": seed},
            "dev": {metric: value - 0.1 for metric in ("overall", *meta_tasks)},
            "test": {metric: value for metric in ("overall", *meta_tasks)},
        }
        for arm, values in test_overall.items()
        for seed, value in enumerate(values)
    ]


def test_summary_and_verdict_on_fixed_numbers():
    benchmark = _benchmark()
    runs = _results({"A": [0.25, 0.75], "B": [0.5, 0.5, 0.8], "C": [0.125], "A short": [1.0, 0.0]})
    summary = benchmark.aggregate(runs)
    assert summary["A"]["test"]["overall"] == pytest.approx({"mean": 0.5, "std": math.sqrt(0.125)})
    assert summary["B"]["test"]["VQA"] == pytest.approx({"mean": 0.6, "std": math.sqrt(0.03)})
    assert summary["B"]["dev"]["overall"] == pytest.approx({"mean": 0.5, "std": math.sqrt(0.03)})
    assert summary["C"]["test"]["overall"] == {"mean": 0.125, "std": 0.0}  # one run: no spread

    def summary_of(**arms):  # arm → (mean, std) of test overall
        return {
            arm.replace("_", " "): {"test": {"overall": {"mean": mean, "std": std}}}
            for arm, (mean, std) in arms.items()
        }

    # B − A = 0.25 > 0.0625 + 0.0625; B − C = 0.125 = 0.0625 + 0.0625 (equal: not beyond);
    # A short − B = 0.25 > 0.125 + 0.0625
    arms = summary_of(A=(0.25, 0.0625), B=(0.5, 0.0625), C=(0.375, 0.0625), A_short=(0.75, 0.125))
    verdict = benchmark.verdict(arms)
    assert verdict == {
        "B_minus_A": 0.25,
        "B_beats_A_beyond_spread": True,
        "A_beats_B_beyond_spread": False,
        "B_minus_C": 0.125,
        "B_beats_C_beyond_spread": False,
        "C_beats_B_beyond_spread": False,
        "B_minus_A_short": -0.25,
        "B_beats_A_short_beyond_spread": False,
        "A_short_beats_B_beyond_spread": True,
    }
    line = benchmark._verdict_line(verdict, "A", "compute-matched")
    assert line.endswith("= +25.0 points: **B beats A beyond the seed spread**.")
    assert "= +12.5 points: **within the seed spread**" in benchmark._verdict_line(verdict, "C", "control")
    assert "= -25.0 points: **A short beats B beyond" in benchmark._verdict_line(verdict, "A short", "x")
