"""Stage 1 on a user's own data: a held-out slice split by image, answers scored from the K states, and the loss of
the first and last optimizer step in runs of any length."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from datasets import Dataset
from transformers import AutoTokenizer

from coma_hf.data.stage1 import hold_out_by_image
from coma_hf.evaluation.compression import token_f1

from utils import TINY_MODEL_ARGS, command_line, load_example, random_image

TOY = TINY_MODEL_ARGS + "--per_device_train_batch_size 4 --dataloader_num_workers 0".split()
ANSWERS = ("a red circle on the left", "two", "the digit seven in the lower right corner of the picture")


def _llava_rows(folder, images: int = 12, rows_per_image: int = 2) -> list[dict]:
    """LLaVA-format rows, several per image (different questions about the same picture)."""
    rows = []
    for image in range(images):
        random_image(image, (56, 56)).save(folder / f"picture{image}.png")
        for turn in range(rows_per_image):
            answer = ANSWERS[(image + turn) % len(ANSWERS)]
            rows.append(
                {
                    "id": f"p{image}-{turn}",
                    "image": f"picture{image}.png",
                    "conversations": [
                        {"from": "human", "value": f"<image>\nQuestion {turn}?"},
                        {"from": "gpt", "value": answer},
                    ],
                }
            )
    return rows


def _pretrain_on(data: Path, output: Path, options: str) -> dict:
    """The summary of examples/pretrain.py at toy size on `data`/my.jsonl, with `options`, saved to `output`."""
    return load_example("pretrain").main(TOY + command_line(options, dataset=data / "my.jsonl", output_dir=output))


def test_hold_out_by_image_keeps_every_image_on_one_side(tmp_path):
    rows = _llava_rows(tmp_path, images=20, rows_per_image=3)
    rows += [{"id": f"text-{index}", "text": "the same text", "conversation": []} for index in range(2)]
    dataset = Dataset.from_list([{**row, "text": row.get("text")} for row in rows])
    train, heldout = hold_out_by_image(dataset, percentage=10, max_rows=100, seed=0)
    assert len(heldout) == 9 and len(train) + len(heldout) == len(dataset)  # 10 % of 62 → 7 rows → 3 whole images
    train_keys = {row["image"] or row["text"] for row in train}
    assert not train_keys & {row["image"] or row["text"] for row in heldout}
    assert {row["id"] for row in train} | {row["id"] for row in heldout} == {row["id"] for row in rows}
    # the cap is never overshot, the same seed draws the same images, and 0 % holds nothing out
    assert len(hold_out_by_image(dataset, percentage=50, max_rows=4, seed=0)[1]) == 3
    assert hold_out_by_image(dataset, 10, 100, seed=0)[1]["id"] == heldout["id"]
    assert hold_out_by_image(dataset, 10, 100, seed=1)[1]["id"] != heldout["id"]
    assert hold_out_by_image(dataset, 0, 100)[1] is None


def test_token_f1_against_hand_counts():
    assert token_f1("The red circle.", "a red circle") == 1.0  # articles and punctuation do not count
    assert token_f1("red square", "red circle") == pytest.approx(0.5)  # P = R = 1/2
    assert token_f1("red", "a red circle on the left") == pytest.approx(2 * 1 * 0.25 / 1.25)  # P = 1, R = 1/4
    assert token_f1("blue", "red") == 0.0


@pytest.mark.slow
def test_short_run_on_own_data_reports_losses_and_held_out_answers(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    rows = _llava_rows(data)
    (data / "my.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    summary = _pretrain_on(
        data, tmp_path / "out", "--max_steps 3 --logging_steps 100 --validation_split_percentage 25"
    )
    # a run shorter than one logging window still has the loss of its first and its last optimizer step
    assert isinstance(summary["train_loss_first"], float) and isinstance(summary["train_loss_last"], float)
    assert summary["train_loss_first"] != summary["train_loss_last"]
    # 25 % of 24 rows is 6 rows: three whole images, never trained on
    assert summary["num_eval_samples"] == 6 and summary["num_train_samples"] == 18
    assert summary["num_eval_questions"] == 6 and summary["global_steps"] == 3
    for key in ("heldout_answer", "majority_baseline", "control_answer"):
        assert f"{key}_accuracy" in summary and f"{key}_f1" in summary
    # answers are generated up to the longest reference answer (+ <|im_end|>), not a fixed 8 tokens
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "out")
    longest = max(len(tokenizer(answer, add_special_tokens=False)["input_ids"]) for answer in ANSWERS)
    assert summary["answer_max_new_tokens"] == longest + 1 > 8
    # the rows the run held out, as it lists them: whole images, none of them trained on
    heldout_ids = set(summary["eval_sample_ids"])
    heldout = [row for row in rows if row["id"] in heldout_ids]
    train = [row for row in rows if row["id"] not in heldout_ids]
    assert len(heldout) == 6 and not {row["image"] for row in heldout} & {row["image"] for row in train}
    # the majority baseline by hand: the most frequent training answer, exact match on the held-out turns
    answers = [row["conversations"][1]["value"] for row in train]
    majority = max(set(answers), key=answers.count)
    expected = sum(row["conversations"][1]["value"] == majority for row in heldout) / len(heldout)
    assert summary["majority_baseline_accuracy"] == pytest.approx(expected)
    assert summary["answer_token_cap"] == 128 and summary["answers_cut_at_cap"] is False
    assert "exact match" in summary["answer_scoring"] and "F1" in summary["answer_scoring"]
    saved = json.loads((tmp_path / "out" / "pretrain_summary.json").read_text())
    assert saved["eval_source"].startswith("6 rows held out of --dataset by image")


@pytest.mark.slow
def test_first_and_last_step_losses_match_trainers_own_per_step_logs(tmp_path):
    """With accumulation, a step's loss is the sum of its scaled micro-batch losses: what Trainer logs when it logs
    every step."""
    from coma_hf.training import trainers as trainer_module

    data = tmp_path / "data"
    data.mkdir()
    (data / "my.jsonl").write_text("".join(json.dumps(row) + "\n" for row in _llava_rows(data)))
    trainers = []

    class RecordingTrainer(trainer_module.CoMaCompressionTrainer):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            trainers.append(self)

    original, trainer_module.CoMaCompressionTrainer = trainer_module.CoMaCompressionTrainer, RecordingTrainer
    try:
        summary = _pretrain_on(
            data,
            tmp_path / "out",
            "--max_steps 3 --logging_steps 1 --gradient_accumulation_steps 2 --validation_split_percentage 0",
        )
    finally:
        trainer_module.CoMaCompressionTrainer = original
    logged = [entry["loss"] for entry in trainers[0].state.log_history if "loss" in entry]
    assert len(logged) == 3
    assert summary["train_loss_first"] == pytest.approx(logged[0], rel=1e-6)
    assert summary["train_loss_last"] == pytest.approx(logged[-1], rel=1e-6)
    assert "heldout_answer_accuracy" not in summary  # --validation_split_percentage 0: nothing held out


def test_hold_out_reads_stored_images_by_their_bytes_and_checks_the_percentage():
    import io

    import datasets

    def png(seed):
        buffer = io.BytesIO()
        random_image(seed, (8, 8)).save(buffer, "PNG")
        return buffer.getvalue()

    # ten different pictures stored under one bare file name, two rows each: ten groups, not one
    rows = [
        {"image": {"bytes": png(index), "path": "image.png"}, "text": None} for index in range(10) for _ in range(2)
    ]
    dataset = Dataset.from_list(rows).cast_column("image", datasets.Image())
    train, heldout = hold_out_by_image(dataset, percentage=20, max_rows=100)
    assert len(heldout) == 4 and len(train) == 16
    with pytest.raises(ValueError, match="percentage"):
        hold_out_by_image(dataset, percentage=100, max_rows=100)


def test_hold_out_by_image_keeps_rows_sharing_any_image_together_even_at_two_paths(tmp_path):
    for index in range(6):
        random_image(index, (28, 28)).save(tmp_path / f"{index}.png")
    (tmp_path / "copy").mkdir()
    shutil.copy(tmp_path / "0.png", tmp_path / "copy" / "same-as-0.png")  # one picture at two paths
    rows = [
        {"id": "a", "images": ["0.png", "1.png"]},  # a multi-image row: 0 and 1
        {"id": "b", "images": ["1.png"]},  # shares 1 with a
        {"id": "c", "images": ["copy/same-as-0.png"]},  # shares 0's bytes with a, at another path
        {"id": "d", "images": ["2.png", "3.png"]},
        {"id": "e", "images": ["3.png"]},  # shares 3 with d
        {"id": "f", "images": ["4.png"]},
        {"id": "g", "images": ["5.png"]},
    ]
    dataset = Dataset.from_list([{**row, "conversation": []} for row in rows])
    together = [{"a", "b", "c"}, {"d", "e"}, {"f"}, {"g"}]
    for seed in range(8):
        train, heldout = hold_out_by_image(dataset, 40, 100, seed=seed, image_root=str(tmp_path))
        held = set(heldout["id"])
        assert held and set(train["id"]).isdisjoint(held)
        assert all(group <= held or group.isdisjoint(held) for group in together), (seed, held)
    # without the files to read, rows are known by their paths: a and c then come apart for some seed
    apart = [set(hold_out_by_image(dataset, 40, 100, seed=seed)[1]["id"]) for seed in range(8)]
    assert any(("a" in held) != ("c" in held) for held in apart)
