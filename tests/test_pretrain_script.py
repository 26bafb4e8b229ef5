"""examples/pretrain.py end to end at toy size: summary, checkpoint, bad-data handling."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import load_example, random_image

TOY = ["--num_train_scenes", "24", "--num_dev_scenes", "6", "--num_test_scenes", "2", "--scene_size", "56",
       "--max_steps", "2", "--per_device_train_batch_size", "4", "--logging_steps", "1", "--max_eval_samples", "6",
       "--tiny_hidden_size", "32", "--num_compression_tokens", "4", "--min_image_tokens", "4", "--max_image_tokens", "4",
       "--dataloader_num_workers", "0"]  # fmt: skip


def test_default_run_at_toy_size_writes_summary_and_checkpoint(tmp_path):
    from transformers import AutoModel

    import coma_hf  # noqa: F401

    output = tmp_path / "stage1"
    summary = load_example("pretrain").main(TOY + ["--output_dir", str(output), "--synthetic_dir", str(tmp_path / "synthetic")])
    saved = json.loads((output / "pretrain_summary.json").read_text())
    for key in ("train_loss_first", "train_loss_last", "heldout_answer_accuracy", "majority_baseline_accuracy",
                "control_answer_accuracy", "num_train_samples", "num_skipped_samples", "seconds"):  # fmt: skip
        assert key in saved, key
    assert saved == json.loads(json.dumps(summary))
    assert saved["num_train_samples"] == 24 and saved["num_skipped_samples"] == 0 and saved["global_steps"] == 2
    assert 0 <= saved["heldout_answer_accuracy"] <= 1
    model = AutoModel.from_pretrained(output)
    embeddings = model.encode([random_image(0, (56, 56)), "a red circle"])
    torch.testing.assert_close(embeddings.norm(dim=-1), torch.ones(2))


def _dataset_with_bad_rows(folder: Path) -> Path:
    folder.mkdir()
    random_image(0, (56, 56)).save(folder / "good.png")
    turns = [{"question": "What is it?", "answer": "noise"}]
    rows = [{"id": f"ok-{index}", "image": "good.png", "conversation": turns} for index in range(8)]
    rows += [{"id": "no-image", "image": "missing.png", "conversation": turns},
             {"id": "no-turns", "image": "good.png", "conversation": []}]  # fmt: skip
    (folder / "train.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    return folder


def test_skip_bad_samples_counts_and_reports_them(tmp_path):
    data = _dataset_with_bad_rows(tmp_path / "data")
    summary = load_example("pretrain").main(TOY + ["--dataset", str(data), "--output_dir", str(tmp_path / "out"), "--skip_bad_samples"])
    assert summary["num_skipped_samples"] == 2 and summary["num_train_samples"] == 8
    assert {sample["id"] for sample in summary["skipped_samples"]} == {"no-image", "no-turns"}
    assert "missing.png" in json.dumps(summary["skipped_samples"])


def test_validate_data_stops_naming_every_bad_row(tmp_path):
    data = _dataset_with_bad_rows(tmp_path / "data")
    with pytest.raises(SystemExit, match=r"2 bad rows(.|\n)*row 8: sample no-image, field 'image'(.|\n)*row 9"):
        load_example("pretrain").main(TOY + ["--dataset", str(data), "--output_dir", str(tmp_path / "out"), "--validate_data"])
