"""benchmarks/premise.py: the plan of each experiment, the endpoint rule and the decision rules on fixed numbers, and
at toy sizes on two worker processes the whole protocol (tune, select, run) whose per-query files, comparison and
verdict line agree with one another, and which resumes without training again."""

from __future__ import annotations

import gzip
import importlib.util
import json
import sys
from pathlib import Path

import pytest

from coma_hf.configuration_coma import is_embedded_backbone
from coma_hf.evaluation.compare import compare_arms
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


READER_TYPES = {  # what a reader record's `evaluation.per_type` holds: accuracy with the input in view, majority
    "colour": {"reader": 0.73, "majority": 0.09},
    "size": {"reader": 0.93, "majority": 0.49},
    "count": {"reader": 0.96, "majority": 0.36},
    "position": {"reader": 0.39, "majority": 0.12},
    "shape": {"reader": 0.35, "majority": 0.125},
}


def _toy_reader(folder: Path) -> str:
    """A stock tiny backbone saved as a reader would be, with a reader record (random weights: the benchmark's
    plumbing is under test)."""
    config = tiny_backbone_config(hidden_size=32, vision_width=16, vision_depth=1)
    backbone, parts = build_tiny_backbone(config=config)
    backbone.config.embedded_backbone = True  # what recipes read to pick the tiny recipe
    backbone.save_pretrained(folder)
    parts.tokenizer.save_pretrained(folder)
    parts.image_processor.save_pretrained(folder)
    (folder / "record.json").write_text(json.dumps({"evaluation": {"per_type": READER_TYPES}}))
    assert is_embedded_backbone(json.loads((folder / "config.json").read_text()))
    return str(folder)


def test_each_experiment_plans_its_runs_once_with_the_primary_first():
    premise = _premise()
    budget = premise.Budget()
    stage1, runs = premise.plan(budget, ("primary",))
    assert [run.steps for run in stage1] == [600] * 6 and len({run.seed for run in stage1}) == 6
    assert [(run.arm, run.seed) for run in runs] == [(arm, seed) for seed in range(6) for arm in ("A", "B600")]
    assert {(run.pairs, run.steps) for run in runs} == {(500, 200)}
    _, everything = premise.plan(budget, premise.EXPERIMENTS)
    assert everything[: len(runs)] == runs and len(set(everything)) == len(everything)
    # data efficiency adds three budgets × 2 arms × 3 seeds; compute-matched A 3 runs; dose 3 lengths × 3 seeds
    assert len(everything) == 12 + 3 * 2 * 3 + 3 + 3 * 3
    assert {run.steps for run in everything if run.arm == "A" and run.steps != 200} == {800}
    assert {run.arm for run in everything} == {"A", "B150", "B300", "B600", "B1200"}


def test_stage2_arguments_draw_pairs_by_seed_and_keep_the_best_dev_checkpoint(tmp_path):
    premise = _premise()
    context = premise.Context(premise.Budget(), tmp_path, "reader", learning_rate=3e-4)
    a, b = premise.Stage2Run(3, 0, 500, 200), premise.Stage2Run(3, 600, 500, 200)
    arguments = [" ".join(premise.stage2_arguments(run, context, tmp_path / "out", 3e-4)) for run in (a, b)]
    for text in arguments:
        assert "--seed 3 --pair_seed 3" in text and "--max_train_pairs 500" in text and "--use_lora true" in text
        assert "--eval_steps 50 --keep_best_by dev_IND_precision@1" in text and "--learning_rate 0.0003" in text
    assert "--from_backbone --backbone reader --num_compression_tokens 8" in arguments[0]
    assert f"--model_name_or_path {tmp_path / 'checkpoints' / 'stage1-seed3-steps600'}" in arguments[1]


def test_endpoint_rule_on_fixed_numbers():
    premise = _premise()
    attributes = {"Set-Colour": ("colour",), "Set-Position": ("position",), "Set-Shape": ("colour", "shape")}
    chance = {"Set-Colour": 0.10, "Set-Position": 0.10, "Set-Shape": 0.10}
    zero_shot = {  # A's start (mean over seeds) and V's start
        "A": {"Set-Colour": 0.19, "Set-Position": 0.50, "Set-Shape": 0.90},
        "V": {"Set-Colour": 0.21, "Set-Position": 0.19, "Set-Shape": 0.90},
    }
    result = premise.endpoint_rule(attributes, READER_TYPES, zero_shot, chance)
    # colour reads (0.73 ≥ 0.09 + 0.25) and V's start clears chance + 10 points (0.21 ≥ 0.20) → in
    assert result["sets"]["Set-Colour"]["passes"]
    # position: 0.39 ≥ 0.12 + 0.25 and A's start 0.50 → in
    assert result["sets"]["Set-Position"]["passes"]
    # the weakest attribute decides: shape 0.35 < 0.125 + 0.25 → out, however well the starts score
    assert result["sets"]["Set-Shape"]["weakest"] == "shape" and not result["sets"]["Set-Shape"]["passes"]
    assert result["passing"] == ["Set-Colour", "Set-Position"]
    below = premise.endpoint_rule(
        attributes,
        READER_TYPES,
        {"A": {**zero_shot["A"], "Set-Colour": 0.1}, "V": {**zero_shot["V"], "Set-Colour": 0.19}},
        chance,
    )
    assert not below["sets"]["Set-Colour"]["passes"]  # neither start reaches chance + 10 points


def _arm(shift: float, seeds: int = 6, queries: int = 400, per_seed: list[float] | None = None) -> dict:
    """Float per-query scores: a fixed pattern plus a shift (per seed when given)."""
    pattern = [((index * 37) % 100) / 100 for index in range(queries)]
    return {
        seed: {name: [value + (per_seed[seed] if per_seed else shift) for value in pattern] for name in ("I", "O")}
        for seed in range(seeds)
    }


@pytest.mark.parametrize(
    ("shift", "ood_shift", "expected"),
    [(0.05, 0.0, "confirmed"), (0.01, 0.0, "refuted"), (0.05, -0.05, "refuted"), (0.025, 0.0, "inconclusive")],
)
def test_decision_rules_on_fixed_numbers(shift, ood_shift, expected):
    premise = _premise()
    endpoints = {premise.IND: ["I"], premise.OOD: ["O"]}
    a = _arm(0.0)
    b = {seed: {"I": [v + shift for v in run["I"]], "O": [v + ood_shift for v in run["O"]]} for seed, run in a.items()}
    comparison = compare_arms(a, b, endpoints, resamples=200)
    assert premise.decide(comparison, ood_endpoint=True)["rule"] == expected


def test_confirmation_needs_five_positive_seeds_and_an_ood_endpoint_can_be_left_out():
    premise = _premise()
    endpoints = {premise.IND: ["I"], premise.OOD: ["O"]}
    a = _arm(0.0)
    b = _arm(0.0, per_seed=[0.1, 0.1, 0.1, 0.1, -0.01, -0.01])  # mean +6.3 points, 4 of 6 seeds positive
    comparison = compare_arms(a, b, endpoints, resamples=200)
    decision = premise.decide(comparison, ood_endpoint=True)
    assert decision["ind"]["positive_seeds"] == 4 and decision["rule"] != "confirmed"
    worse_ood = {seed: {"I": run["I"], "O": [v - 0.2 for v in run["O"]]} for seed, run in _arm(0.05).items()}
    comparison = compare_arms(a, worse_ood, endpoints, resamples=200)
    assert premise.decide(comparison, ood_endpoint=True)["rule"] == "refuted"
    alone = premise.decide(comparison, ood_endpoint=False)  # fewer than two OOD sets passed: IND alone
    assert alone["rule"] == "confirmed" and alone["ood"] is None and alone["rests_on"] == "IND alone"


@pytest.mark.slow
def test_quick_protocol_on_two_workers_writes_agreeing_per_query_files_comparison_and_verdict(tmp_path):
    premise = _premise()
    reader = _toy_reader(tmp_path / "reader")
    work, docs, output = tmp_path / "work", tmp_path / "docs", tmp_path / "premise.json"
    argv = f"--quick --reader {reader} --work_dir {work} --docs_dir {docs} --output_json {output} --workers 2".split()
    with pytest.raises(SystemExit, match="run --tune and --select first"):
        premise.main(argv)
    protocol = premise.main(argv + ["--tune"])
    assert protocol["learning_rate"]["chosen"] in premise.QUICK.learning_rate_grid
    protocol = premise.main(argv + ["--select"])
    assert set(protocol["endpoints"]["sets"]) == set(premise.OOD_ATTRIBUTES)
    report = premise.main(argv + ["--resamples", "200"])

    budget = premise.QUICK
    _, runs = premise.plan(budget, ("primary",))
    saved = json.loads(output.read_text())
    assert len(saved["results"]) == len(runs) and saved["headline"] == report["headline"]
    with gzip.open(tmp_path / "premise_per_query.json.gz", "rt") as handle:
        per_query = json.load(handle)
    # per-query ranks agree with each run's P@1, and the same test queries (split hash, counts) in every run
    for record in saved["results"]:
        name = record["run"]["name"]
        assert record["provenance"]["commit"] and record["provenance"]["coma_hf_file"]
        for checkpoint in ("final", "best"):
            ranks = per_query[name][checkpoint]["gold_ranks"]
            positions = per_query[name][checkpoint]["top1_positions"]
            for dataset, values in ranks.items():
                assert len(values) == min(budget.eval_queries, len(values)) > 0
                hits = [rank == 1 for rank in values]
                assert record[checkpoint]["precision"]["datasets"][dataset] == pytest.approx(sum(hits) / len(hits))
                assert [position == 0 for position in positions[dataset]] == hits
        assert record["final"]["split"] == saved["results"][0]["final"]["split"]
        assert record["num_train_pairs"] == budget.primary_pairs
    # the comparison is the per-query files' comparison, and the verdict line is its decision
    arms = {arm: {} for arm in ("A", premise.arm_name(budget.primary_stage1_steps))}
    for record in saved["results"]:
        ranks = per_query[record["run"]["name"]]["final"]["gold_ranks"]
        arms[record["run"]["arm"]][record["run"]["seed"]] = {d: [int(r == 1) for r in v] for d, v in ranks.items()}
    endpoints = saved["analysis"]["endpoints"]
    again = compare_arms(arms["A"], arms[premise.arm_name(budget.primary_stage1_steps)], endpoints, resamples=200)
    primary = saved["analysis"]["primary_final"]
    for endpoint in endpoints:
        assert primary["comparison"][endpoint]["difference"] == pytest.approx(again[endpoint]["difference"])
        assert primary["comparison"][endpoint]["holm"]["low"] == pytest.approx(again[endpoint]["holm"]["low"])
    rule = primary["decision"]["rule"]
    passing = protocol["endpoints"]["passing"]
    assert premise.decide(again, len(passing) >= premise.MIN_OOD_SETS) == primary["decision"]
    with pytest.raises(SystemExit, match="already holds"):  # the committed protocol is not overwritten by accident
        premise.main(argv + ["--select"])
    markdown = (docs / "premise.md").read_text()
    assert markdown.splitlines()[2] == report["headline"] and premise.HEADLINES[rule] in report["headline"]
    assert markdown.startswith(f"# The premise: {rule} ")  # the first line names the rule that holds
    assert (docs / "premise.png").is_file()

    # a second call finds every record and trains nothing; the hand-written reading stays
    reading = "\nOur reading, written by hand.\n"
    (docs / "premise.md").write_text(markdown + reading)
    again_report = premise.main(argv + ["--resamples", "200"])
    assert [r["seconds"] for r in again_report["results"]] == [r["seconds"] for r in saved["results"]]
    assert (docs / "premise.md").read_text().endswith(premise.HAND_WRITTEN + "\n" + reading)


def test_a_run_record_cut_mid_line_is_redone_with_a_warning(tmp_path, monkeypatch, caplog):
    premise = _premise()
    calls = []

    class FakePretrain:  # stage 1 stands in: what matters is whether it runs again
        @staticmethod
        def main(arguments):
            calls.append(arguments)
            summary = {"train_loss_first": 1.0, "train_loss_last": 0.5, "heldout_answer_accuracy": 0.6}
            return {**summary, "majority_baseline_accuracy": 0.25, "seconds": 1.0}

    monkeypatch.setattr(premise, "_example", lambda name: FakePretrain)
    context = premise.Context(premise.QUICK, tmp_path, "reader")
    run = premise.Stage1Run(0, 2)
    first = premise.run_stage1(run, context)
    context.checkpoint(run.name).mkdir(parents=True)
    path = context.record_path(run.name)
    assert premise.run_stage1(run, context) == first and len(calls) == 1  # a whole record is trusted
    path.write_text(path.read_text()[: len(path.read_text()) // 2])  # storage cut it mid-line
    with caplog.at_level("WARNING"):
        again = premise.run_stage1(run, context)
    assert len(calls) == 2 and again["run"] == first["run"] and json.loads(path.read_text()) == again
    assert any("damaged" in message and run.name in message for message in caplog.messages)
