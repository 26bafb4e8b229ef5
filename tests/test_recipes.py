"""A recipe follows the checkpoint a run starts from; a bf16 recipe without a GPU stops with one line."""

from __future__ import annotations

import json

import pytest
from transformers.utils import is_torch_bf16_gpu_available

from coma_hf.training.recipes import choose_recipe, recipe_of_start

from utils import TINY_MODEL_ARGS, command_line, load_example, tiny_coma

STAGE1_TOY = TINY_MODEL_ARGS + command_line(
    "--num_train_scenes 12 --num_dev_scenes 4 --num_test_scenes 2 --scene_size 56 --max_steps 1"
    " --per_device_train_batch_size 4 --max_eval_samples 2 --dataloader_num_workers 0"
)
STAGE2_TOY = (
    "--max_steps 1 --per_device_train_batch_size 4 --per_device_eval_batch_size 8"
    " --dataloader_num_workers 0 --mini_batch_size 4 --max_train_scenes 12"
).split()
needs_no_gpu = pytest.mark.skipif(is_torch_bf16_gpu_available(), reason="checks the machine without a GPU")


def _folder(tmp_path, name, config=None, summaries=None):
    folder = tmp_path / name
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "coma", **(config or {})}))
    for file_name, summary in (summaries or {}).items():
        (folder / file_name).write_text(json.dumps(summary))
    return str(folder)


def test_the_recipe_follows_the_start_checkpoint(tmp_path, monkeypatch):
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)  # tests never touch the network
    # the embedded backbone's own config carries the marker; a real backbone's does not
    model, _ = tiny_coma()
    model.save_pretrained(tmp_path / "embedded")
    assert recipe_of_start(str(tmp_path / "embedded"))[0] == "tiny"
    real = {"backbone_name_or_path": "Qwen/Qwen2.5-VL-3B-Instruct", "embedded_backbone": False}
    assert recipe_of_start(_folder(tmp_path, "real", real))[0] == "paper"
    assert recipe_of_start(None)[0] == "tiny"
    assert recipe_of_start("org/unreachable-coma")[0] == "paper"  # a Hub id that cannot be read (offline here)
    # the recipe a run summary records wins over the marker; the newest stage's summary first
    recorded = _folder(
        tmp_path, "recorded", {"embedded_backbone": True}, {"pretrain_summary.json": {"recipe": "paper"}}
    )
    assert recipe_of_start(recorded)[0] == "paper"
    both = _folder(
        tmp_path,
        "both",
        {},
        {"pretrain_summary.json": {"recipe": "paper"}, "contrastive_summary.json": {"recipe": "tiny"}},
    )
    assert recipe_of_start(both)[0] == "tiny"
    # a custom preset file records no stage-neutral name: the marker decides
    custom = _folder(tmp_path, "custom", {"embedded_backbone": True}, {"pretrain_summary.json": {"recipe": "my.json"}})
    assert recipe_of_start(custom)[0] == "tiny"
    assert choose_recipe("paper", lambda args: 1 / 0, None) == ("paper", "named with --recipe")  # start not asked
    # checkpoints saved before the marker: a CoMa config without a backbone source is the embedded backbone
    legacy = tmp_path / "legacy-coma"
    legacy.mkdir()
    (legacy / "config.json").write_text(json.dumps({"model_type": "coma", "backbone_name_or_path": None}))
    assert recipe_of_start(str(legacy))[0] == "tiny"
    stock = _folder(tmp_path, "stock", {"model_type": "qwen2_5_vl"})  # a stock backbone names no source either
    assert recipe_of_start(stock)[0] == "paper"


@pytest.mark.slow
@needs_no_gpu
@pytest.mark.parametrize("script", ["pretrain", "train_contrastive"])
def test_the_paper_recipe_without_a_gpu_stops_with_one_line_saying_what_to_pass(tmp_path, script):
    with pytest.raises(SystemExit) as stopped:
        load_example(script).main(
            command_line("--recipe paper", output_dir=tmp_path / "out")
            + ["--from_backbone" if script == "train_contrastive" else "--max_steps=1"]
        )
    message = str(stopped.value)
    assert "\n" not in message and "bf16" in message
    assert "--bf16 false" in message and "--use_cpu true" in message


@pytest.mark.slow
def test_stage_two_from_ones_own_stage_one_folder_runs_on_cpu(tmp_path, caplog, capsys):
    """`pretrain.py --output_dir X` then `train_contrastive.py --model_name_or_path X`, no recipe named."""
    synthetic, stage1 = tmp_path / "synthetic", tmp_path / "stage1"
    load_example("pretrain").main(STAGE1_TOY + command_line(output_dir=stage1, synthetic_dir=synthetic))
    caplog.set_level("INFO", logger="train_contrastive")
    summary = load_example("train_contrastive").main(
        STAGE2_TOY + command_line(model_name_or_path=stage1, synthetic_dir=synthetic, output_dir=tmp_path / "stage2")
    )
    assert summary["recipe"] == "tiny" and summary["global_steps"] == 1
    # one step, shorter than any logging window: its loss is both the first and the last, recorded and printed
    assert isinstance(summary["train_loss_first"], float) and summary["train_loss_first"] == summary["train_loss_last"]
    printed = capsys.readouterr().out
    loss = f"{summary['train_loss_first']:.4f}"
    assert f"train loss          {loss} -> {loss} (first -> last optimizer step)" in printed
    assert any("Recipe 'tiny'" in line and "pretrain_summary.json" in line for line in caplog.messages)


@pytest.mark.parametrize("script", ["pretrain", "train_contrastive"])
def test_help_lists_the_options_without_a_checkpoint_or_a_gpu(tmp_path, monkeypatch, capsys, script):
    monkeypatch.chdir(tmp_path)  # no outputs/stage1 here
    with pytest.raises(SystemExit) as stopped:
        load_example(script).main(["--help"])
    assert stopped.value.code == 0
    printed = capsys.readouterr().out
    assert "--recipe" in printed and "--output_dir" in printed
