"""examples/pretrain.py end to end at toy size: summary, checkpoint, bad-data handling."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from utils import TINY_MODEL_ARGS, command_line, load_example, random_image

TOY = TINY_MODEL_ARGS + command_line(
    "--num_train_scenes 24 --num_dev_scenes 6 --num_test_scenes 2 --scene_size 56 --max_steps 2"
    " --per_device_train_batch_size 4 --logging_steps 1 --max_eval_samples 4 --dataloader_num_workers 0"
)


@pytest.mark.slow
def test_default_run_at_toy_size_writes_summary_and_checkpoint(tmp_path):
    from transformers import AutoModel

    import coma_hf  # noqa: F401

    output = tmp_path / "stage1"
    load_example("pretrain").main(TOY + ["--output_dir", str(output), "--synthetic_dir", str(tmp_path / "synthetic")])
    saved = json.loads((output / "pretrain_summary.json").read_text())
    for key in (
        "train_loss_first",
        "train_loss_last",
        "heldout_answer_accuracy",
        "majority_baseline_accuracy",
        "control_answer_accuracy",
        "num_train_samples",
        "num_skipped_samples",
        "seconds",
    ):
        assert key in saved, key
    # what was asked for, and baselines counted by hand from the scenes (not the dict that wrote the file)
    train, dev = (_rows(tmp_path / "synthetic" / f"{split}.jsonl") for split in ("train", "dev"))
    assert len(train) == saved["num_train_samples"] == 24 and saved["num_skipped_samples"] == 0
    assert saved["global_steps"] == 2 and saved["skipped_samples"] == []  # --max_steps 2
    assert saved["train_dataset"] == "synthetic scenes"
    asked = dev[:4]  # --max_eval_samples 4 of the 6 dev scenes
    assert saved["num_eval_questions"] == sum(len(row["conversation"]) for row in asked)
    assert saved["majority_baseline_accuracy"] == pytest.approx(_majority_accuracy(train, asked))
    model = AutoModel.from_pretrained(output)
    assert model.config.num_compression_tokens == 4 and model.config.get_text_config().hidden_size == 32  # as asked
    embeddings = model.encode([random_image(0, (56, 56)), "a red circle"])
    assert embeddings.shape == (2, 32)
    torch.testing.assert_close(embeddings.norm(dim=-1), torch.ones(2))


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _majority_accuracy(train: list[dict], asked: list[dict]) -> float:
    """Exact match (case, outer space and a final full stop ignored) of each question type's most frequent
    training answer, over every question asked."""
    answers = {}
    for row in train:
        for turn in row["conversation"]:
            counts = answers.setdefault(turn["type"], {})
            answer = turn["answer"].strip().lower().rstrip(".").strip()
            counts[answer] = counts.get(answer, 0) + 1
    majority = {kind: max(counts, key=counts.get) for kind, counts in answers.items()}
    turns = [turn for row in asked for turn in row["conversation"]]
    hits = [majority.get(turn["type"]) == turn["answer"].strip().lower().rstrip(".").strip() for turn in turns]
    return sum(hits) / len(hits)


def _dataset_with_bad_rows(folder: Path) -> Path:
    folder.mkdir()
    random_image(0, (56, 56)).save(folder / "good.png")
    turns = [{"question": "What is it?", "answer": "noise"}]
    rows = [{"id": f"ok-{index}", "image": "good.png", "conversation": turns} for index in range(8)]
    rows += [
        {"id": "no-image", "image": "missing.png", "conversation": turns},
        {"id": "no-turns", "image": "good.png", "conversation": []},
    ]
    (folder / "train.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    return folder


@pytest.mark.slow
def test_skip_bad_samples_counts_and_reports_them(tmp_path):
    data = _dataset_with_bad_rows(tmp_path / "data")
    summary = load_example("pretrain").main(
        TOY + ["--dataset", str(data), "--output_dir", str(tmp_path / "out"), "--skip_bad_samples"]
    )
    assert summary["num_skipped_samples"] == 2 and summary["num_train_samples"] == 8
    assert {sample["id"] for sample in summary["skipped_samples"]} == {"no-image", "no-turns"}
    assert "missing.png" in json.dumps(summary["skipped_samples"])


@pytest.mark.slow
def test_validate_data_stops_naming_every_bad_row(tmp_path):
    data = _dataset_with_bad_rows(tmp_path / "data")
    with pytest.raises(SystemExit, match=r"2 bad rows(.|\n)*row 8: sample no-image, field 'image'(.|\n)*row 9"):
        load_example("pretrain").main(
            TOY + ["--dataset", str(data), "--output_dir", str(tmp_path / "out"), "--validate_data"]
        )
