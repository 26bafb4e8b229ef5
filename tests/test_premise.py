"""benchmarks/premise.py at toy sizes: the arms share their start, the budgets are what the JSON says, the verdicts
are the recorded numbers, and a killed benchmark resumes."""

from __future__ import annotations

import importlib.util
import json
import statistics
import sys
from pathlib import Path

import pytest
import torch

from coma_hf.configuration_coma import is_embedded_backbone
from coma_hf.tiny import build_tiny_backbone, tiny_backbone_config

ROOT = Path(__file__).parents[1]


def _premise():
    # importable by name, as the benchmark's worker processes (spawned, given this sys.path) unpickle its functions
    if str(ROOT / "benchmarks") not in sys.path:
        sys.path.insert(0, str(ROOT / "benchmarks"))
    spec = importlib.util.spec_from_file_location("premise", ROOT / "benchmarks" / "premise.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def _toy_reader(folder: Path) -> str:
    """A stock tiny backbone saved as a reader would be (random weights: the benchmark's plumbing is under test)."""
    config = tiny_backbone_config(hidden_size=32, vision_width=16, vision_depth=1)
    backbone, parts = build_tiny_backbone(config=config)
    backbone.config.embedded_backbone = True  # what recipes read to pick the tiny recipe
    backbone.save_pretrained(folder)
    parts.tokenizer.save_pretrained(folder)
    parts.image_processor.save_pretrained(folder)
    assert is_embedded_backbone(json.loads((folder / "config.json").read_text()))
    return str(folder)


def test_cka_and_cosine_are_one_for_the_same_representation_and_cka_ignores_rotation():
    premise = _premise()
    x = torch.randn(50, 8, generator=torch.Generator().manual_seed(0))
    rotation, _ = torch.linalg.qr(torch.randn(8, 8, generator=torch.Generator().manual_seed(1)))
    assert premise.linear_cka(x, x) == pytest.approx(1.0) and premise.mean_cosine(x, x) == pytest.approx(1.0)
    assert premise.linear_cka(x, 3 * x @ rotation) == pytest.approx(1.0, abs=1e-5)
    assert premise.linear_cka(x, torch.randn(50, 8, generator=torch.Generator().manual_seed(2))) < 0.6


def test_state_redundancy_is_one_and_rank_one_for_copies_zero_and_rank_k_for_orthogonal_states():
    premise = _premise()
    row = torch.randn(1, 1, 6, generator=torch.Generator().manual_seed(0))
    cosines, ranks = premise.state_redundancy(row.expand(2, 4, 6))
    assert cosines.tolist() == pytest.approx([1.0, 1.0]) and ranks.tolist() == pytest.approx([1.0, 1.0], abs=1e-3)
    orthogonal = torch.eye(6)[:4].unsqueeze(0) * torch.tensor([1.0, 2.0, 3.0, 4.0]).view(1, 4, 1)  # scale ignored
    cosines, ranks = premise.state_redundancy(orthogonal)
    assert cosines.tolist() == pytest.approx([0.0]) and ranks.tolist() == pytest.approx([4.0])


@pytest.mark.slow
def test_quick_premise_shares_starts_keeps_its_budgets_and_reports_the_recorded_numbers(tmp_path):
    premise = _premise()
    reader = _toy_reader(tmp_path / "reader")
    work, docs, output = tmp_path / "work", tmp_path / "docs", tmp_path / "premise.json"
    argv = f"--quick --reader {reader} --work_dir {work} --docs_dir {docs} --output_json {output}".split()
    report = premise.main(argv + ["--workers", "2"])  # every run in one of two worker processes
    budget = premise.QUICK
    results = report["results"]
    stage1_runs, stage2_runs = premise.plan(budget)
    assert len(results) == len(stage2_runs) and {record["run"]["arm"] for record in results} == set(premise.ARMS)

    # the same seed and K start from the same weights in every arm: B and C's stage 1 and A's stage 2
    starts = {}
    for record in report["stage1"]:
        starts.setdefault((record["run"]["seed"], record["run"]["k"]), set()).add(record["initial_weights"])
    for record in results:
        if record["run"]["arm"] in ("V", "A"):
            starts.setdefault((record["run"]["seed"], record["run"]["k"]), set()).add(record["start_weights"])
    assert all(len(fingerprints) == 1 for fingerprints in starts.values())
    assert len({next(iter(starts[(seed, budget.num_compression_tokens)])) for seed in budget.seeds}) == 2  # per seed

    # the budgets are what the JSON says
    saved = json.loads(output.read_text())
    assert saved["budget"]["pair_budgets"] == list(budget.pair_budgets)
    for record in results:
        run = record["run"]
        assert record["num_train_pairs"] == run["pairs"]
        assert f"--max_steps {run['steps']}" in " ".join(record["arguments"])
        assert run["steps"] == (budget.matched_steps if run["variant"] == "matched" else budget.stage2_steps)
    for record in report["stage1"]:
        assert f"--max_steps {budget.stage1_steps}" in " ".join(record["arguments"])

    # verdict lines are the recorded per-seed numbers
    for line in report["verdicts"]:
        other = line["comparison"].split(" - ")[1]
        by_seed = {
            (record["run"]["arm"], record["run"]["seed"]): record["test"][line["metric"]]
            for record in results
            if record["run"]["variant"] == "main" and record["run"]["pairs"] == line["pairs"]
        }
        b = [by_seed[("B", seed)] for seed in line["seeds"]]
        o = [by_seed[(other, seed)] for seed in line["seeds"]]
        assert line["difference"] == pytest.approx(statistics.mean(b) - statistics.mean(o))
        assert line["paired"]["mean"] == pytest.approx(statistics.mean(x - y for x, y in zip(b, o, strict=True)))
    markdown = (docs / "premise.md").read_text()
    assert report["headline"] in markdown and (docs / "premise.png").is_file()
    for record in report["stage1"]:  # K-state redundancy of every stage-1 checkpoint, in the table
        assert (
            record["k_states"]["k"] == record["run"]["k"]
            and 1 - 1e-4 <= record["k_states"]["effective_rank"] <= record["run"]["k"] + 1e-4
        )
    assert saved["verdicts"] == report["verdicts"]
    reading = "\nOur reading, written by hand.\n"
    (docs / "premise.md").write_text(markdown + reading)

    # a second call (in this process) finds every run's record and trains nothing; it keeps the hand-written reading
    again = premise.main(argv)
    assert [record["seconds"] for record in again["results"]] == [record["seconds"] for record in results]
    rewritten = (docs / "premise.md").read_text()
    assert rewritten.endswith(premise.HAND_WRITTEN + "\n" + reading) and rewritten.count(premise.HAND_WRITTEN) == 1


@pytest.mark.slow
def test_plan_times_both_kinds_of_run_and_projects_every_run_without_leaving_checkpoints(tmp_path):
    premise = _premise()
    reader = _toy_reader(tmp_path / "reader")
    projection = premise.main(f"--quick --plan --reader {reader} --work_dir {tmp_path / 'work'}".split())
    stage1_runs, stage2_runs = premise.plan(premise.QUICK)
    assert projection["runs"] == len(stage1_runs) + len(stage2_runs)
    assert all(projection["overhead"][kind] >= 0 for kind in ("stage1", "stage2"))
    expected = sum(projection["overhead"]["stage1"] + 2 * projection["per_step"]["stage1"] for _ in stage1_runs)
    expected += sum(
        projection["overhead"]["stage2"] + run.steps * projection["per_step"]["stage2"] for run in stage2_runs
    )
    assert projection["seconds"] == pytest.approx(expected) and projection["wall_seconds"] == projection["seconds"]
    assert (
        not list((tmp_path / "work" / "quick").glob("plan-*"))
        and not (tmp_path / "work" / "quick" / "results").exists()
    )


def test_a_follow_up_budget_plans_only_its_arms_once_each():
    premise = _premise()
    budget = premise.Budget(arms=("B",), seeds=(0,), pair_budgets=(500,), k_sweep=(1, 8), stage1_steps=900)
    stage1_runs, stage2_runs = premise.plan(budget)
    assert stage1_runs == [premise.Stage1Run("B", 0, 8), premise.Stage1Run("B", 0, 1)]
    assert [(run.k, run.pairs, run.variant) for run in stage2_runs] == [(8, 500, "main"), (1, 500, "k-sweep")]
    everything = premise.plan(premise.Budget())[1]
    # four arms on three seeds at two budgets, V and A compute-matched, two K-sweep runs, and arm D (KL) on seed 0 only
    assert len({run.name for run in everything}) == len(everything) == 3 * (4 * 2 + 2) + 2 + 2
    assert {run.seed for run in everything if run.arm == "D"} == {0}
    assert premise.plan(premise.Budget(kl_seeds=(0, 1)))[0].count(premise.Stage1Run("D", 1, 8)) == 1
    fewer_matched = premise.plan(premise.Budget(matched_seeds=(0, 1)))[1]
    assert [run for run in everything if run.variant != "matched" or run.seed != 2] == fewer_matched
