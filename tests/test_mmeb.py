"""The MMEB-format evaluator and the synthetic mini-MMEB."""

from __future__ import annotations

import json
import math
import re

import pytest
import torch
from PIL import Image

from coma_hf.data.mini_mmeb import (
    IN_DISTRIBUTION,
    META_TASKS,
    NUM_COLOUR_SET_CANDIDATES,
    NUM_OOD_RETRIEVAL_CANDIDATES,
    OUT_OF_DISTRIBUTION,
    SIZE_COUNT_LABELS,
    write_mini_mmeb,
)
from coma_hf.data.synthetic import COLOURS, HELD_OUT_COMBINATIONS, NUMBER_WORDS
from coma_hf.evaluation.mmeb import (
    MMEB_META_TASKS,
    MMEB_OUT_OF_DISTRIBUTION,
    MMEBDataset,
    MMEBEvaluator,
    chance_baselines,
    distribution,
    gold_ranks,
    load_mmeb_datasets,
    markdown_table,
    meta_task,
    ranking_metrics,
)

from utils import tiny_coma


def test_metrics_equal_hand_computation():
    scores = [torch.tensor([0.9, 0.1, 0.2]), torch.tensor([0.1, 0.5, 0.3]), torch.tensor([0.3, 0.2, 0.4, 0.1])]
    ranks = gold_ranks(scores)
    assert ranks == [1, 3, 2]
    metrics = ranking_metrics(ranks, recall_at=(1, 2, 5))
    assert metrics["precision@1"] == pytest.approx(1 / 3)
    assert metrics["recall@2"] == pytest.approx(2 / 3) and metrics["recall@5"] == 1.0
    assert metrics["mrr"] == pytest.approx((1 + 1 / 3 + 1 / 2) / 3)


def _lookup_encoder(table):
    """An encoder that maps each (text, image) item to a fixed vector."""
    calls = []

    def encode(items):
        calls.extend(items)
        return torch.stack([torch.tensor(table[text], dtype=torch.float32) for text, _ in items])

    return encode, calls


def test_evaluator_on_hand_made_datasets_with_known_answers(tmp_path):
    table = {"q1": [1, 0], "q2": [0, 1], "q3": [1, 1], "a": [1, 0], "b": [0, 1], "c": [-1, 0]}
    rows = [
        {"qry_text": "q1", "qry_img_path": "", "tgt_text": ["a", "b", "c"], "tgt_img_path": ["", "", ""]},  # rank 1
        {"qry_text": "q2", "qry_img_path": "", "tgt_text": ["c", "a", "b"], "tgt_img_path": ["", "", ""]},  # rank 3
        {"qry_text": "q3", "qry_img_path": "", "tgt_text": ["b", "c"], "tgt_img_path": ["", ""]},  # rank 1
    ]
    (tmp_path / "ImageNet-1K.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    (tmp_path / "MSCOCO_t2i.jsonl").write_text(json.dumps(rows[1]) + "\n")
    encode, calls = _lookup_encoder(table)
    results = MMEBEvaluator(load_mmeb_datasets(tmp_path), show_progress_bar=False)(encode, output_dir=tmp_path / "out")
    imagenet = results["datasets"]["ImageNet-1K"]
    assert imagenet["precision@1"] == pytest.approx(2 / 3) and imagenet["mrr"] == pytest.approx((1 + 1 / 3 + 1) / 3)
    assert imagenet["meta_task"] == "Classification" and imagenet["num_queries"] == 3
    assert results["datasets"]["MSCOCO_t2i"]["precision@1"] == 0.0
    assert results["meta_tasks"]["Retrieval"]["precision@1"] == 0.0
    assert results["overall"]["precision@1"] == pytest.approx((2 / 3 + 0) / 2)  # datasets weigh the same
    # every distinct candidate and query is encoded once per dataset
    assert len(calls) == len(set(calls[:6])) + len(set(calls[6:]))
    saved = json.loads((tmp_path / "out" / "mmeb_results.json").read_text())
    assert saved["overall"]["precision@1"] == pytest.approx(1 / 3)
    assert "| Classification | ImageNet-1K | 66.7 |" in (tmp_path / "out" / "mmeb_results.md").read_text()


def test_in_and_out_of_distribution_means_are_reported_as_mmeb_does(tmp_path):
    table = {"q1": [1, 0], "q2": [0, 1], "a": [1, 0], "b": [0, 1]}
    right = {"qry_text": "q1", "qry_img_path": "", "tgt_text": ["a", "b"], "tgt_img_path": ["", ""]}
    wrong = {"qry_text": "q2", "qry_img_path": "", "tgt_text": ["a", "b"], "tgt_img_path": ["", ""]}
    for name, rows in {"ImageNet-1K": [right, wrong], "ImageNet-A": [right], "Mini-Shape": [wrong]}.items():
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    (tmp_path / "mmeb_manifest.json").write_text(json.dumps({"out_of_distribution": ["Mini-Shape"]}))
    datasets = load_mmeb_datasets(tmp_path)
    assert {dataset.name: dataset.distribution for dataset in datasets} == {
        "ImageNet-1K": "IND",
        "ImageNet-A": "OOD",  # MMEB's own assignment
        "Mini-Shape": "OOD",  # the manifest's
    }
    encode, _ = _lookup_encoder(table)
    results = MMEBEvaluator(datasets, show_progress_bar=False)(encode)
    assert results["distributions"]["IND"]["precision@1"] == pytest.approx(0.5)
    assert results["distributions"]["OOD"]["precision@1"] == pytest.approx(0.5)  # mean of 1.0 and 0.0
    assert results["distributions"]["OOD"]["num_datasets"] == 2
    assert results["overall"]["precision@1"] == pytest.approx((0.5 + 1 + 0) / 3)
    table_text = markdown_table(results)
    assert "| **IND** | mean of 1 | 50.0 |" in table_text and "| **OOD** | mean of 2 | 50.0 |" in table_text
    baselines = chance_baselines(datasets)
    assert set(baselines["distributions"]) == {"IND", "OOD"}


def test_mmeb_out_of_distribution_half_is_the_16_datasets_mmeb_train_leaves_out():
    counts = {task: len(set(names) & MMEB_OUT_OF_DISTRIBUTION) for task, names in MMEB_META_TASKS.items()}
    assert counts == {"Classification": 5, "VQA": 4, "Retrieval": 4, "Visual Grounding": 3}
    assert distribution("GQA") == "OOD" and distribution("MSCOCO") == "IND" and distribution("Mini-Count") == "IND"


def _dataset(count=5, candidates=4):
    rows = [
        {
            "qry_text": f"q{i}",
            "qry_img_path": "",
            "tgt_text": [f"t{i}-{j}" for j in range(candidates)],
            "tgt_img_path": [""] * candidates,
        }
        for i in range(count)
    ]
    return MMEBDataset("VOC2007", rows, None, "Classification")


@pytest.mark.parametrize("value", [1.0, math.nan])
def test_collapsed_or_nan_encoders_score_zero(value):
    def constant(items):
        return torch.full((len(items), 3), value)

    results = MMEBEvaluator([_dataset()], show_progress_bar=False)(constant)
    metrics = results["datasets"]["VOC2007"]
    assert metrics["precision@1"] == 0.0 and metrics["recall@1"] == 0.0
    assert metrics["mrr"] == pytest.approx(1 / 4)  # the gold ranks last, never first


def test_meta_task_grouping_matches_mmeb():
    assert {task: len(names) for task, names in MMEB_META_TASKS.items()} == {
        "Classification": 10,
        "VQA": 10,
        "Retrieval": 12,
        "Visual Grounding": 4,
    }
    names = [name for group in MMEB_META_TASKS.values() for name in group]
    assert len(names) == len(set(names)) == 36
    expected = {
        "ImageNet-1K": "Classification",
        "N24News": "Classification",
        "Country211": "Classification",
        "OK-VQA": "VQA",
        "InfographicsVQA": "VQA",
        "TextVQA": "VQA",
        "VisDial": "Retrieval",
        "CIRR": "Retrieval",
        "Wiki-SS-NQ": "Retrieval",
        "EDIS": "Retrieval",
        "MSCOCO": "Visual Grounding",
        "RefCOCO-Matching": "Visual Grounding",
        "Visual7W-Pointing": "Visual Grounding",
        "Visual7W": "VQA",
        "MSCOCO_i2t": "Retrieval",
    }
    for name, task in expected.items():
        assert meta_task(name) == task
    assert meta_task("Mini-Count", META_TASKS) == "Classification" and meta_task("unknown") == "Other"


@pytest.fixture(scope="module")
def mini(tmp_path_factory):
    root = tmp_path_factory.mktemp("synthetic")
    return root, write_mini_mmeb(root, num_train=60, num_dev=30, num_test=30, image_size=56)


def test_mini_mmeb_has_all_four_meta_tasks_in_mmeb_layout(mini):
    root, output = mini
    for split in ("dev", "test"):
        datasets = load_mmeb_datasets(output / split)
        assert {dataset.meta_task for dataset in datasets} == {
            "Classification",
            "VQA",
            "Retrieval",
            "Visual Grounding",
        }
        for dataset in datasets:
            assert len(dataset.rows) == 30  # one row per scene
            for row in dataset.rows:
                candidates = max(len(row["tgt_text"]), len(row["tgt_img_path"]))
                assert candidates >= 2 and len(row["tgt_text"]) == len(row["tgt_img_path"])
                for path in [row["qry_img_path"], *row["tgt_img_path"]]:
                    assert not path or (root / path).exists()
    pairs = [json.loads(line) for line in (output / "train.jsonl").read_text().splitlines()]
    assert {pair["dataset"] for pair in pairs} == set(IN_DISTRIBUTION)  # the OOD half is never trained on
    assert all(
        {"qry", "qry_image_path", "pos_text", "pos_image_path", "neg_text", "neg_image_path"} <= set(pair)
        for pair in pairs
    )


def _rows(output, split, name):
    return next(dataset for dataset in load_mmeb_datasets(output / split) if dataset.name == name).rows


def _record_of(root, split, image):
    scene = re.search(r"(dev|test)-\d{6}", image).group(0)
    return next(json.loads(line) for line in (root / f"{split}.jsonl").read_text().splitlines() if scene in line)


def test_the_out_of_distribution_half_is_marked_and_its_golds_are_right(mini):
    root, output = mini
    datasets = load_mmeb_datasets(output / "test")
    assert {dataset.name for dataset in datasets if dataset.distribution == "OOD"} == set(OUT_OF_DISTRIBUTION)
    assert set(IN_DISTRIBUTION).isdisjoint(OUT_OF_DISTRIBUTION)
    for row in _rows(output, "test", "Mini-ColourSet"):
        colours = {obj["colour"] for obj in _shapes_of(root, row)}
        assert set(re.split(r", | and ", row["tgt_text"][0])) == colours
        assert all(len(re.split(r", | and ", label)) == len(colours) for label in row["tgt_text"])  # as many colours
        assert (
            len(set(row["tgt_text"]))
            == len(row["tgt_text"])
            == min(NUM_COLOUR_SET_CANDIDATES, 8 if len(colours) == 1 else 99)
        )
    for row in _rows(output, "test", "Mini-SizeCount"):
        shapes = _shapes_of(root, row)
        large = sum(obj["size"] == "large" for obj in shapes)
        assert row["tgt_text"][0] == f"{NUMBER_WORDS[large]} large and {NUMBER_WORDS[len(shapes) - large]} small"
        assert sorted(row["tgt_text"]) == sorted(SIZE_COUNT_LABELS)
    captions = [json.loads(line)["caption"] for line in (root / "test.jsonl").read_text().splitlines()]
    for row in _rows(output, "test", "Mini-SameScene"):
        scene = _scene_ids([row], ["qry_img_path"])
        candidates = row["tgt_img_path"]
        assert _scene_ids([{"image": candidates[0]}], ["image"]) == scene  # the gold is the query's scene
        caption = _record_of(root, "test", row["qry_img_path"])["caption"]
        others = sum(other != caption for other in captions)  # distractor scenes: every other caption
        assert len(candidates) == len(set(candidates)) == min(NUM_OOD_RETRIEVAL_CANDIDATES, 1 + others)
        assert all((root / path).exists() for path in candidates)
    for row in _rows(output, "test", "Mini-SameColours"):
        query_colours = sorted(obj["colour"] for obj in _shapes_of(root, row))
        gold, *others = row["tgt_img_path"]
        assert _scene_ids([{"image": gold}], ["image"]) == _scene_ids([row], ["qry_img_path"])
        assert gold.endswith("-colours.png") and all((root / path).exists() for path in row["tgt_img_path"])
        for other in others:  # every distractor was made from a scene with another set of colours
            record = _record_of(root, "test", other)
            assert sorted({obj["colour"] for obj in record["objects"] if obj["kind"] == "shape"}) != sorted(
                set(query_colours)
            )


def _shapes_of(root, row) -> list[dict]:
    record = _record_of(root, "test", row["qry_img_path"])
    return [obj for obj in record["objects"] if obj["kind"] == "shape"]


def test_the_same_colours_picture_draws_the_query_shapes_colours_and_no_other(mini):
    root, output = mini
    for row in _rows(output, "test", "Mini-SameColours")[:10]:
        shapes = _shapes_of(root, row)
        with Image.open(root / row["tgt_img_path"][0]) as picture:
            drawn = {
                colour for colour, rgb in COLOURS.items() if rgb in {pixel for _, pixel in picture.getcolors(1 << 16)}
            }
        assert drawn == {obj["colour"] for obj in shapes}  # the shapes' colours, and no digit of another colour


def _scene_ids(rows, keys):
    """The scenes whose images (whole, or cropped) the rows use; files are named after their scene id."""
    ids = set()
    for row in rows:
        for key in keys:
            values = row[key] if isinstance(row[key], list) else [row[key]]
            ids |= {re.search(r"(train|dev|test)-\d{6}", value).group(0) for value in values if value}
    return ids


def test_mini_mmeb_splits_share_no_image_and_hold_out_combinations(mini):
    root, output = mini
    pairs = [json.loads(line) for line in (output / "train.jsonl").read_text().splitlines()]
    train_scenes = _scene_ids(pairs, ["qry_image_path", "pos_image_path", "neg_image_path"])
    split_scenes = {}
    for split in ("dev", "test"):
        rows = [row for dataset in load_mmeb_datasets(output / split) for row in dataset.rows]
        split_scenes[split] = _scene_ids(rows, ["qry_img_path", "tgt_img_path"])
    assert all(scene.startswith("train-") for scene in train_scenes)
    assert all(scene.startswith("dev-") for scene in split_scenes["dev"])
    assert all(scene.startswith("test-") for scene in split_scenes["test"])
    records = {
        split: [json.loads(line) for line in (root / f"{split}.jsonl").read_text().splitlines()]
        for split in ("train", "dev", "test")
    }
    combos = lambda record: {(o["colour"], o["shape"]) for o in record["objects"] if o["kind"] == "shape"}  # noqa: E731
    assert not any(combos(record) & set(HELD_OUT_COMBINATIONS) for record in records["train"])
    assert not any(
        phrase in pair["qry"] for pair in pairs for phrase in (f'"{c} {s}"' for c, s in HELD_OUT_COMBINATIONS)
    )
    for split in ("dev", "test"):
        assert any(record["held_out"] for record in records[split])


def test_coma_model_is_scored_through_its_encode_api(mini):
    root, output = mini
    model, _ = tiny_coma()
    datasets = [
        dataset
        for dataset in load_mmeb_datasets(output / "dev")
        if dataset.name in ("Mini-Count", "Mini-Caption2Image")
    ]
    results = MMEBEvaluator(datasets, show_progress_bar=False)(model)

    def item(text, image):  # the MMEB text as it is (placeholder and instruction kept), images under the scenes' root
        return {"text": text, "image": str(root / image)} if image else {"text": text}

    for dataset in datasets:  # by hand: one row at a time through `encode`, the gold (first) candidate must win
        ranks = []
        for row in dataset.rows:
            candidates = [item(text, image) for text, image in zip(row["tgt_text"], row["tgt_img_path"], strict=False)]
            vectors = model.encode([item(row["qry_text"], row["qry_img_path"]), *candidates])
            scores = vectors[1:] @ vectors[0]
            ranks.append(1 + int((scores[1:] >= scores[0]).sum()))
        metrics = results["datasets"][dataset.name]
        assert metrics["num_queries"] == len(ranks) == 30
        assert metrics["precision@1"] == pytest.approx(sum(rank == 1 for rank in ranks) / 30)
        assert metrics["mrr"] == pytest.approx(sum(1 / rank for rank in ranks) / 30)
    assert "Overall" in markdown_table(results)


def test_sentence_transformers_evaluator_reports_prefixed_metrics():
    from coma_hf.evaluation.sentence_evaluator import MMEBSentenceEvaluator

    def encode_ones_and_gold(items):
        return torch.stack(
            [
                torch.tensor([1.0, 0.0]) if text.endswith("-0") or text.startswith("q") else torch.tensor([0.0, 1.0])
                for text, _ in items
            ]
        )

    evaluator = MMEBSentenceEvaluator([_dataset()], name="mini")
    metrics = evaluator(encode_ones_and_gold)
    assert evaluator.primary_metric == "mini_overall_precision@1"
    assert metrics["mini_overall_precision@1"] == 1.0 and metrics["mini_VOC2007_precision@1"] == 1.0
    assert metrics["mini_classification_precision@1"] == 1.0


@pytest.mark.slow
def test_evaluate_script_prints_and_writes_the_table(mini, tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    _, output = mini
    model, _ = tiny_coma()
    model.save_pretrained(tmp_path / "model")
    script = Path(__file__).parents[1] / "examples" / "evaluate.py"
    result = subprocess.run(
        [
            sys.executable,
            str(script),
            "--model_name_or_path",
            str(tmp_path / "model"),
            "--data",
            str(output / "test"),
            "--output_dir",
            str(tmp_path / "eval"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"| **Overall** | {len(META_TASKS)} datasets |" in result.stdout
    assert f"| **IND** | mean of {len(IN_DISTRIBUTION)} |" in result.stdout
    assert f"| **OOD** | mean of {len(OUT_OF_DISTRIBUTION)} |" in result.stdout
    saved = json.loads((tmp_path / "eval" / "mmeb_results.json").read_text())
    assert set(saved["meta_tasks"]) == {"Classification", "VQA", "Retrieval", "Visual Grounding"}
    assert set(saved["distributions"]) == {"IND", "OOD"}


def test_sentence_transformer_is_scored_like_a_hand_computation(tmp_path):
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Pooling, Transformer
    from transformers import BertConfig, BertModel

    from coma_hf.tiny import build_tokenizer

    tokenizer = build_tokenizer()
    tokenizer.padding_side = "right"
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        pad_token_id=tokenizer.pad_token_id,
    )
    BertModel(config).save_pretrained(tmp_path / "bert")
    tokenizer.save_pretrained(tmp_path / "bert")
    model = SentenceTransformer(modules=[Transformer(str(tmp_path / "bert")), Pooling(32, "mean")], device="cpu")

    rows = [
        {
            "qry_text": f"<|image_1|> query {i} about shapes",
            "qry_img_path": "",
            "tgt_text": [f"answer {j} for {i}" for j in range(5)],
            "tgt_img_path": [""] * 5,
        }
        for i in range(6)
    ]
    results = MMEBEvaluator([MMEBDataset("GQA", rows, None, "VQA")], show_progress_bar=False)(model)

    expected_ranks = []
    for row in rows:
        query = model.encode([row["qry_text"]], convert_to_tensor=True)[0]  # the text as it is (see as_encoder)
        candidates = model.encode(row["tgt_text"], convert_to_tensor=True)
        expected_ranks.append(gold_ranks([candidates @ query])[0])
    expected = ranking_metrics(expected_ranks)
    for key in ("precision@1", "recall@5", "mrr"):
        assert results["datasets"]["GQA"][key] == pytest.approx(expected[key], abs=1e-6)
