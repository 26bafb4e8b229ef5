"""examples/train_contrastive.py end to end at toy size: stage 1 → stage 2, summary, checkpoint, bad data."""

from __future__ import annotations

import json
import statistics
from collections import Counter

import pytest
import torch

from coma_hf.data.mini_mmeb import META_TASKS, write_mini_mmeb
from coma_hf.evaluation.mmeb import MMEBEvaluator, load_mmeb_datasets

from utils import TINY_MODEL_ARGS, command_line, load_example

TOY = (
    "--recipe tiny --max_steps 3 --per_device_train_batch_size 8 --logging_steps 1"
    " --per_device_eval_batch_size 16 --dataloader_num_workers 0 --cached true --mini_batch_size"
    " 4 --symmetric true"
).split()


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    folder = tmp_path_factory.mktemp("synthetic")
    write_mini_mmeb(folder, num_train=12, num_dev=6, num_test=2, image_size=56)
    return folder


def _hand_chance_baseline(folder) -> float:
    """Per dataset file, the better of a random ranking (mean of 1 / candidates) and always ranking the most
    frequent gold (the first candidate) first; the datasets weigh the same."""
    per_dataset = []
    for path in sorted(folder.glob("*.jsonl")):
        rows = [json.loads(line) for line in path.read_text().splitlines()]
        random_guess = sum(1 / len(row["tgt_img_path"]) for row in rows) / len(rows)
        golds = Counter((row["tgt_text"][0], row["tgt_img_path"][0]) for row in rows)
        per_dataset.append(max(random_guess, max(golds.values()) / len(rows)))
    assert len(per_dataset) == len(META_TASKS)
    return sum(per_dataset) / len(per_dataset)


@pytest.mark.slow
def test_stage_two_continues_stage_one_and_saves_a_sentence_transformer(tmp_path, synthetic):
    from sentence_transformers import SentenceTransformer
    from transformers import AutoModel

    stage1 = tmp_path / "stage1"
    load_example("pretrain").main(
        TINY_MODEL_ARGS
        + command_line(
            "--num_train_scenes 12 --num_dev_scenes 6 --num_test_scenes 2 --scene_size 56 --max_steps 1"
            " --per_device_train_batch_size 4 --max_eval_samples 2 --dataloader_num_workers 0",
            output_dir=stage1,
            synthetic_dir=synthetic,
        )
    )
    output = tmp_path / "stage2"
    script, trainers = load_example("train_contrastive"), []

    class RecordingTrainer(script.CoMaContrastiveTrainer):  # keeps the trainer, for its log history
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            trainers.append(self)

    script.CoMaContrastiveTrainer = RecordingTrainer
    script.main(TOY + command_line(model_name_or_path=stage1, synthetic_dir=synthetic, output_dir=output))
    saved = json.loads((output / "contrastive_summary.json").read_text())
    # what was asked for and what the trainer logged, not the dict that wrote the file
    assert saved["global_steps"] == 3 and saved["started_from"] == str(stage1) and saved["recipe"] == "tiny"
    assert saved["train_dataset"] == "synthetic mini-MMEB" and saved["num_skipped_samples"] == 0
    assert saved["num_train_pairs"] == len((synthetic / "mini_mmeb" / "train.jsonl").read_text().splitlines())
    losses = [entry["loss"] for entry in trainers[0].state.log_history if "loss" in entry]
    assert len(losses) == 3  # --logging_steps 1 over --max_steps 3
    assert (saved["train_loss_first"], saved["train_loss_last"]) == (losses[0], losses[-1])
    assert set(saved["eval_per_meta_task"]) == {"Classification", "VQA", "Retrieval", "Visual Grounding"}
    assert saved["eval_precision_at_1"] == pytest.approx(statistics.mean(saved["eval_per_dataset"].values()))

    # the checkpoint carries both stages' summaries and CoMa's card (not sentence-transformers' generated one)
    assert json.loads((output / "pretrain_summary.json").read_text())["global_steps"] == 1
    card = (output / "README.md").read_text()
    assert (
        "CoMa" in card and "| stage 1 (compression) | 1 steps" in card and "| stage 2 (contrastive) | 3 steps" in card
    )
    assert "recipe tiny" in card

    dev = load_mmeb_datasets(synthetic / "mini_mmeb" / "dev")
    assert saved["baseline_precision_at_1"] == pytest.approx(_hand_chance_baseline(synthetic / "mini_mmeb" / "dev"))
    model = AutoModel.from_pretrained(output, trust_remote_code=True).eval()
    st = SentenceTransformer(str(output), trust_remote_code=True, device="cpu")
    # the summary's score is the saved checkpoint's score (through the same path: a toy model's near-ties flip
    # under the 1e-6 differences of another batching)
    rescored = MMEBEvaluator(dev, show_progress_bar=False)(st)
    assert rescored["overall"]["precision@1"] == pytest.approx(saved["eval_precision_at_1"])
    inputs = [
        "a red circle",
        {"image": str(synthetic / json.loads((synthetic / "dev.jsonl").open().readline())["image"])},
    ]
    torch.testing.assert_close(st.encode(inputs, convert_to_tensor=True), model.encode(inputs), atol=1e-5, rtol=0)
    # training moved the weights away from stage 1
    start = AutoModel.from_pretrained(stage1, trust_remote_code=True).eval()
    assert (start.config.training_stage, model.config.training_stage) == (1, 2)  # each stage's trainer records itself
    assert (start.encode(inputs) - model.encode(inputs)).abs().max() > 1e-4


@pytest.mark.slow
def test_missing_stage_one_checkpoint_says_how_to_make_it(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit, match=r"python examples/pretrain.py.*--from_backbone"):
        load_example("train_contrastive").main(["--max_steps", "1"])


@pytest.mark.slow
def test_bad_rows_stop_the_run_or_are_skipped_and_counted(tmp_path, synthetic):
    train = (synthetic / "mini_mmeb" / "train.jsonl").read_text().splitlines()[:24]
    rows = [json.loads(line) for line in train]
    (tmp_path / "broken.png").write_bytes(b"not an image")
    rows[5]["qry_image_path"] = str(tmp_path / "broken.png")
    rows[9]["pos_image_path"] = str(tmp_path / "missing.png")
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    common = (
        TOY
        + ["--from_backbone"]
        + TINY_MODEL_ARGS
        + command_line(
            "--eval_datasets Mini-Count --max_steps 1",
            dataset=tmp_path / "train.jsonl",
            image_root=synthetic,
            eval_data=synthetic / "mini_mmeb" / "dev",
        )
    )
    with pytest.raises(SystemExit, match=r"2 bad training rows[\s\S]*row 5: anchor: .*broken.png"):
        load_example("train_contrastive").main(
            common + command_line("--validate_data true", output_dir=tmp_path / "a")
        )
    summary = load_example("train_contrastive").main(
        common + command_line("--skip_bad_samples true", output_dir=tmp_path / "b")
    )
    assert summary["num_skipped_samples"] == 2 and summary["num_train_pairs"] == 22
    assert [sample["index"] for sample in summary["skipped_samples"]] == [5, 9]
    assert "missing.png" in summary["skipped_samples"][1]["error"]


@pytest.mark.slow
def test_a_start_rendering_as_the_release_evaluation_trains_and_saves_with_the_training_rendering(tmp_path, synthetic):
    """A converted release's processor renders as their evaluation (prompt layout, eval image bounds, no max_length):
    stage 2 from it renders as CoMa trains, with the recipe's bounds, logs it, and the output records it."""
    from coma_hf.processing_coma import EMBEDDING_LAYOUT, CoMaProcessor
    from coma_hf.released import RELEASED_LAYOUTS, RELEASED_PROCESSOR_SETTINGS

    from utils import tiny_coma

    model, processor = tiny_coma()
    start = tmp_path / "converted"
    model.save_pretrained(start)
    processor.with_settings(**RELEASED_PROCESSOR_SETTINGS).save_pretrained(start)  # as the converter records it
    output = tmp_path / "stage2"
    summary = load_example("train_contrastive").main(
        TOY
        + command_line(
            "--eval_datasets Mini-Count --max_steps 1",
            model_name_or_path=start,
            synthetic_dir=synthetic,
            output_dir=output,
        )
    )
    trained_with = {
        "embedding_layout": EMBEDDING_LAYOUT,
        "enlarge_images_below": None,
        "apply_exif_orientation": True,
        "min_image_tokens": 64,  # the tiny recipe's
        "max_image_tokens": 64,
        "max_length": 512,
    }
    assert {key: summary["rendering"][key] for key in trained_with} == trained_with
    saved = CoMaProcessor.from_pretrained(output)
    assert {key: getattr(saved, key) for key in trained_with} == trained_with
    assert saved.layouts == RELEASED_LAYOUTS  # kept for inputs that name one


@pytest.mark.slow
def test_keep_best_by_saves_the_best_dev_checkpoint_and_pair_seed_draws_another_subset(tmp_path, synthetic):
    script, trainers = load_example("train_contrastive"), []

    class RecordingTrainer(script.CoMaContrastiveTrainer):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            trainers.append(self)

    script.CoMaContrastiveTrainer = RecordingTrainer
    output = tmp_path / "stage2"
    arguments = TINY_MODEL_ARGS + TOY[:-4] + ["--max_steps", "4", "--max_train_pairs", "10"]
    arguments += "--from_backbone --use_lora true --learning_rate 3e-3 --eval_strategy steps --eval_steps 1".split()
    saved = script.main(
        arguments
        + ["--keep_best_by", "dev_IND_precision@1", "--pair_seed", "1"]
        + command_line(synthetic_dir=synthetic, output_dir=output)
    )
    history = [entry for entry in trainers[0].state.log_history if "eval_dev_IND_precision@1" in entry]
    assert [entry["step"] for entry in history] == [1, 2, 3, 4]
    values = [entry["eval_dev_IND_precision@1"] for entry in history]
    best = saved["best_dev"]
    assert best["value"] == max(values) and best["step"] == history[values.index(max(values))]["step"]
    assert best["path"] == str(output / script.BEST_DEV)
    # the kept copy is a merged CoMa checkpoint, and scores on dev what the evaluation at its step said
    dev = load_mmeb_datasets(synthetic / "mini_mmeb" / "dev")
    from sentence_transformers import SentenceTransformer

    kept = SentenceTransformer(best["path"], trust_remote_code=True, device="cpu")
    assert not any("lora" in name for name, _ in kept[0].model.named_parameters())
    assert MMEBEvaluator(dev, show_progress_bar=False)(kept)["distributions"]["IND"]["precision@1"] == pytest.approx(
        best["value"]
    )

    pairs = {}
    for seed in (0, 1):
        data = script.DataArguments(synthetic_dir=str(synthetic), max_train_pairs=10, pair_seed=seed, by_dataset=False)
        pairs[seed] = script.load_training_pairs(data, None)[0]["id"]  # the source rows they were drawn from
    assert len(pairs[0]) == len(pairs[1]) == 10 and pairs[0] != pairs[1]
