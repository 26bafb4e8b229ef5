"""benchmarks/warmup_ablation.py --quick: every arm runs, compute-matched, and the report agrees with its runs."""

from __future__ import annotations

import importlib.util
import statistics
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
    report = benchmark.main(["--quick", "--work_dir", str(tmp_path / "work"), "--output_dir", str(tmp_path / "report")])
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
        for split in ("dev", "test"):
            assert 0.0 <= result[split]["overall"] <= 1.0

    for arm in arms:  # the summary is the mean and spread of its runs
        values = [result["test"]["overall"] for result in report["results"] if result["run"]["name"] == arm]
        assert report["summary"][arm]["test"]["overall"]["mean"] == pytest.approx(statistics.mean(values))
        assert report["summary"][arm]["test"]["overall"]["std"] == pytest.approx(statistics.stdev(values))
    b, a = report["summary"]["B"]["test"]["overall"], report["summary"]["A"]["test"]["overall"]
    assert report["verdict"]["B_minus_A"] == pytest.approx(b["mean"] - a["mean"])
    assert report["verdict"]["B_beats_A_beyond_spread"] == (b["mean"] - a["mean"] > b["std"] + a["std"])

    markdown = (tmp_path / "report" / "results.md").read_text()
    assert "python benchmarks/warmup_ablation.py --quick" in markdown and "| A contrastive only | test |" in markdown
    assert (tmp_path / "report" / "warmup_ablation.png").read_bytes()[:4] == b"\x89PNG"
    assert (tmp_path / "report" / "warmup_ablation.json").is_file()
