"""Crashes: a training run killed with SIGKILL resumes from its last complete checkpoint and finishes with the weights
of an uninterrupted run; a save cut short at any point never leaves a folder that loads half-written; a NaN/inf
loss is named (step, sample ids) and stops the run or skips the batch."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from coma_hf.data.synthetic import write_synthetic_dataset
from coma_hf.tiny import build_tiny_coma
from coma_hf.training import CoMaCompressionTrainer, NonFiniteLossError, last_complete_checkpoint

from utils import TINY_MODEL_ARGS, command_line, load_example, training_args

PAUSING_PRETRAIN = Path(__file__).parent / "pausing_pretrain.py"  # examples/pretrain.py, halting on cue
STAGE1 = TINY_MODEL_ARGS + command_line(
    "--num_train_scenes 24 --num_dev_scenes 2 --num_test_scenes 1 --scene_size 56 --max_steps 40"
    " --per_device_train_batch_size 4 --max_eval_samples 1 --dataloader_num_workers 0 --save_strategy steps"
    " --save_steps 4 --logging_steps 1 --seed 5"
)


def _killed_at(phase: str, step: int, args: list[str], log: Path) -> None:
    """Run examples/pretrain.py in a child that halts at `phase` of `step` (tests/pausing_pretrain.py) and SIGKILL
    it there: the child says when it got there, so the kill point does not depend on timing."""
    marker = log.with_suffix(".paused")
    with log.open("wb") as output:
        process = subprocess.Popen(
            [sys.executable, str(PAUSING_PRETRAIN), phase, str(step), str(marker), *args],
            stdout=output,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 600
        while not marker.exists() and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        process.kill()  # SIGKILL; no error if the child already ended
        process.wait()
    assert marker.exists(), f"the child never reached {phase} {step}:\n{log.read_text()[-3000:]}"


def _checkpoint_step(output_dir: Path) -> int | None:
    checkpoint = last_complete_checkpoint(output_dir)
    return int(Path(checkpoint).name.split("-")[1]) if checkpoint else None


@pytest.mark.slow
def test_a_run_killed_mid_training_resumes_from_its_last_complete_checkpoint(tmp_path):
    synthetic = tmp_path / "synthetic"
    write_synthetic_dataset(synthetic, num_train=24, num_dev=2, num_test=1, image_size=56)
    common = STAGE1 + command_line(synthetic_dir=synthetic)
    load_example("pretrain").main(common + command_line(output_dir=tmp_path / "whole"))

    killed = tmp_path / "killed"
    args = common + command_line(output_dir=killed)
    # mid-training: checkpoint-8 written, steps 9 and 10 run, then the kill
    _killed_at("after_step", 10, args, tmp_path / "first.log")
    assert _checkpoint_step(killed) == 8
    # the resumed run killed in the middle of writing checkpoint-16 (weights on disk, trainer state not yet)
    _killed_at("saving", 16, args + ["--resume_from_checkpoint", "last"], tmp_path / "second.log")
    assert (killed / "checkpoint-16" / "model.safetensors").exists()
    assert _checkpoint_step(killed) == 12
    assert not (killed / "model.safetensors").exists()  # neither run got to the end
    # a later checkpoint cut short in its save, with garbage for weights, is passed over too
    (killed / "checkpoint-36").mkdir()
    (killed / "checkpoint-36" / "model.safetensors").write_bytes(b"half")

    summary = load_example("pretrain").main(args + ["--resume_from_checkpoint", "last"])
    assert summary["global_steps"] == 40
    whole, resumed = (
        load_file(str(tmp_path / "whole" / "model.safetensors")),
        load_file(str(killed / "model.safetensors")),
    )
    assert whole.keys() == resumed.keys()
    for name in whole:
        assert torch.equal(whole[name], resumed[name]), name


@pytest.mark.slow
def test_stage_two_resumes_from_the_checkpoint_a_crash_left_with_the_weights_of_an_uninterrupted_run(tmp_path):
    import shutil

    from coma_hf.data.mini_mmeb import write_mini_mmeb

    from utils import tiny_coma

    write_mini_mmeb(tmp_path / "synthetic", num_train=12, num_dev=2, num_test=1, image_size=56)
    tiny_coma()[0].save_pretrained(tmp_path / "start")
    common = command_line(
        "--recipe tiny --max_steps 6 --per_device_train_batch_size 8 --eval_datasets Mini-Digit"
        " --dataloader_num_workers 0 --save_strategy steps --save_steps 2 --seed 3",
        model_name_or_path=tmp_path / "start",
        synthetic_dir=tmp_path / "synthetic",
    )
    load_example("train_contrastive").main(common + command_line(output_dir=tmp_path / "whole"))
    # what a crash after step 2 leaves: that checkpoint (the multi-dataset sampler's position included), nothing else
    shutil.copytree(tmp_path / "whole" / "checkpoint-2", tmp_path / "crashed" / "checkpoint-2")
    summary = load_example("train_contrastive").main(
        common + command_line("--resume_from_checkpoint last", output_dir=tmp_path / "crashed")
    )
    assert summary["global_steps"] == 6
    whole, resumed = _weights(tmp_path / "whole"), _weights(tmp_path / "crashed")
    assert all(torch.equal(whole[name], resumed[name]) for name in whole)
    assert not all(torch.equal(whole[name], value) for name, value in _weights(tmp_path / "start").items())


def _save(model, folder: Path) -> None:
    model.save_pretrained(folder)


def _weights(folder: Path) -> dict:
    return load_file(str(folder / "model.safetensors"))


@pytest.mark.parametrize("existing", [False, True])
def test_a_save_cut_short_at_any_move_never_leaves_a_folder_that_loads_half_written(tmp_path, existing, monkeypatch):
    """Interrupt the k-th rename of the final move, for every k until a save gets through."""
    from transformers import AutoModel

    import coma_hf.saving as saving

    old, _ = build_tiny_coma(num_compression_tokens=4, seed=1, max_image_tokens=4)
    new, _ = build_tiny_coma(num_compression_tokens=4, seed=2, max_image_tokens=4)
    _save(new, tmp_path / "reference")
    replace, interrupted_saves = os.replace, 0
    for failing_move in range(1, 100):
        target = tmp_path / f"target-{failing_move}"
        if existing:
            _save(old, target)
            (target / "checkpoint-3").mkdir()  # a Trainer output folder also holds checkpoints
        calls = []

        def cut_short(source, destination, calls=calls, failing_move=failing_move):
            calls.append(destination)
            if len(calls) == failing_move:
                raise KeyboardInterrupt("killed here")
            return replace(source, destination)

        monkeypatch.setattr(saving.os, "replace", cut_short)
        try:
            _save(new, target)
        except KeyboardInterrupt:
            interrupted_saves += 1
        else:
            break
        finally:
            monkeypatch.setattr(saving.os, "replace", replace)
        assert not list(tmp_path.glob(".target-*.saving-*"))  # the temporary folder is removed
        if not existing:
            assert not target.exists()  # a new folder appears whole or not at all
            continue
        assert not (target / "config.json").exists()  # the marker goes first and comes back last
        with pytest.raises((OSError, ValueError), match="config"):
            AutoModel.from_pretrained(target, trust_remote_code=True)
    assert interrupted_saves == len(calls) >= 1  # every rename of the move was cut once; the next save went through
    saved = _weights(target)
    assert all(torch.equal(saved[name], value) for name, value in _weights(tmp_path / "reference").items())
    loaded = AutoModel.from_pretrained(target, trust_remote_code=True)
    torch.testing.assert_close(
        loaded.encode_text(["a red circle"]), new.encode_text(["a red circle"])
    )  # the new model
    if existing:
        assert (target / "checkpoint-3").is_dir()  # the rest of the folder is left alone


def test_an_interrupted_save_before_the_move_keeps_the_previous_model(tmp_path, monkeypatch):
    import coma_hf.saving as saving

    old, _ = build_tiny_coma(num_compression_tokens=4, seed=1, max_image_tokens=4)
    new, _ = build_tiny_coma(num_compression_tokens=4, seed=2, max_image_tokens=4)
    _save(old, tmp_path / "model")
    before = _weights(tmp_path / "model")

    def killed(*args, **kwargs):
        raise KeyboardInterrupt("killed while writing the sentence-transformers files")

    monkeypatch.setattr(saving, "write_sentence_transformers_files", killed)
    with pytest.raises(KeyboardInterrupt):
        _save(new, tmp_path / "model")
    with pytest.raises(KeyboardInterrupt):
        _save(new, tmp_path / "fresh")
    assert not (tmp_path / "fresh").exists()  # a new folder appears only whole
    after = _weights(tmp_path / "model")
    assert all(torch.equal(before[name], after[name]) for name in before)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["model"]


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    from coma_hf.data.stage1 import load_stage1_dataset

    folder = tmp_path_factory.mktemp("scenes")
    paths = write_synthetic_dataset(folder, num_train=8, num_dev=2, num_test=1, seed=0, image_size=56)
    dataset, root = load_stage1_dataset(paths["train"])
    return dataset.map(lambda row, index: {"id": f"scene-{index}"}, with_indices=True), root


def _poison(trainer, sample: str):
    """A function `(loss, input_ids) → loss` that turns the loss into NaN for the batches holding `sample`: the
    collator remembers those batches' token tensors (Trainer collates ahead, so a flag would be a batch late)."""
    poisoned = set()

    class Remembering:  # the trainer's collator, with its attributes
        def __init__(self, collate):
            self.collate = collate

        def __getattr__(self, name):
            return getattr(self.collate, name)

        def __call__(self, rows):
            batch = self.collate(rows)
            if sample in batch["sample_ids"]:
                poisoned.update(value.data_ptr() for key, value in batch.items() if key.endswith("input_ids"))
            return batch

    trainer.data_collator = Remembering(trainer.data_collator)
    return lambda loss, input_ids: loss * float("nan") if input_ids.data_ptr() in poisoned else loss


def _poisoned_stage1(sample: str, scenes, tmp_path, mode: str) -> CoMaCompressionTrainer:
    dataset, root = scenes
    model, processor = build_tiny_coma(num_compression_tokens=4, seed=0, max_image_tokens=4)
    args = training_args(tmp_path, per_device_train_batch_size=2, max_steps=4)
    trainer = CoMaCompressionTrainer(
        model=model,
        args=args,
        train_dataset=dataset,
        processing_class=processor,
        image_root=root,
        on_nonfinite_loss=mode,
    )
    spoil, forward = _poison(trainer, sample), model.forward

    def poisoned(*args, **kwargs):
        output = forward(*args, **kwargs)
        output.loss = spoil(output.loss, kwargs["input_ids"])
        return output

    model.forward = poisoned
    return trainer


def test_nonfinite_loss_stops_naming_step_and_samples(scenes, tmp_path):
    trainer = _poisoned_stage1("scene-5", scenes, tmp_path, "stop")
    with pytest.raises(NonFiniteLossError, match=r"Stage 1: the loss is nan at step \d, samples \[.*'scene-5'.*\]"):
        trainer.train()


def test_nonfinite_loss_skips_the_batch_and_counts_it(scenes, tmp_path):
    trainer = _poisoned_stage1("scene-5", scenes, tmp_path, "skip")
    before = {name: value.detach().clone() for name, value in trainer.model.named_parameters()}
    trainer.train()
    assert len(trainer.skipped_batches) == 1 and "scene-5" in trainer.skipped_batches[0]["samples"]
    assert trainer.state.global_step == 4
    for name, value in trainer.model.named_parameters():
        assert torch.isfinite(value).all(), name  # the NaN batch reached no weight
    assert any(not torch.equal(before[name], value) for name, value in trainer.model.named_parameters())


def test_stage_two_nonfinite_loss_names_the_pairs(tmp_path, tmp_path_factory):
    import datasets
    from sentence_transformers import SentenceTransformer, SentenceTransformerTrainingArguments

    from coma_hf.training import CoMaContrastiveLoss, CoMaContrastiveTrainer

    from utils import tiny_coma

    model, _ = tiny_coma()
    model.save_pretrained(tmp_path / "start")
    st = SentenceTransformer(str(tmp_path / "start"), trust_remote_code=True, device="cpu")
    pairs = datasets.Dataset.from_dict(
        {
            "anchor_text": [f"query {i}" for i in range(4)],
            "anchor_image": [""] * 4,
            "positive_text": [f"label {i}" for i in range(4)],
            "positive_image": [""] * 4,
            "id": [f"pair-{i}" for i in range(4)],
            "error": [""] * 4,
        }
    )
    loss = CoMaContrastiveLoss(st, cached=False)
    args = SentenceTransformerTrainingArguments(
        output_dir=str(tmp_path / "out"),
        per_device_train_batch_size=4,
        max_steps=1,
        report_to=[],
        use_cpu=True,
        save_strategy="no",
    )
    trainer = CoMaContrastiveTrainer(model=st, args=args, train_dataset=pairs, loss=loss)
    spoil, compute = _poison(trainer, "pair-2"), loss.forward
    loss.forward = lambda features, labels: spoil(compute(features, labels), features[1]["input_ids"])
    with pytest.raises(NonFiniteLossError, match=r"Stage 2: the loss is nan at step 1, samples \[.*'pair-2'.*\]"):
        trainer.train()
