"""The same seed gives the same weights and the same vectors on CPU, for both stages."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from coma_hf.data.mini_mmeb import write_mini_mmeb

from utils import TINY_MODEL_ARGS, command_line, load_example

STAGE1 = TINY_MODEL_ARGS + command_line(
    "--num_train_scenes 12 --num_dev_scenes 4 --num_test_scenes 2 --scene_size 56 --max_steps 3"
    " --per_device_train_batch_size 4 --max_eval_samples 2 --dataloader_num_workers 0 --seed 7"
)
STAGE2 = (
    "--recipe tiny --max_steps 3 --per_device_train_batch_size 8 --dataloader_num_workers 0"
    " --per_device_eval_batch_size 16 --seed 7"
).split()


def _weights(folder):
    return load_file(str(folder / "model.safetensors"))


@pytest.mark.slow
def test_both_stages_are_deterministic(tmp_path):
    synthetic = tmp_path / "synthetic"
    write_mini_mmeb(synthetic, num_train=12, num_dev=4, num_test=2, image_size=56)
    for run in ("a", "b"):
        stage1 = tmp_path / run / "stage1"
        load_example("pretrain").main(STAGE1 + command_line(synthetic_dir=synthetic, output_dir=stage1))
        load_example("train_contrastive").main(
            STAGE2
            + command_line(model_name_or_path=stage1, synthetic_dir=synthetic, output_dir=tmp_path / run / "stage2")
        )
    for stage in ("stage1", "stage2"):
        first, second = _weights(tmp_path / "a" / stage), _weights(tmp_path / "b" / stage)
        assert first.keys() == second.keys()
        for name in first:
            assert torch.equal(first[name], second[name]), (stage, name)
    from transformers import AutoModel

    inputs = ["a red circle", "two blue squares"]
    vectors = [
        AutoModel.from_pretrained(tmp_path / run / "stage2", trust_remote_code=True).eval().encode(inputs)
        for run in ("a", "b")
    ]
    assert torch.equal(vectors[0], vectors[1])
    # not vacuous: training moved the weights (stage 2 differs from stage 1)
    assert any(
        not torch.equal(_weights(tmp_path / "a" / "stage1")[name], weight)
        for name, weight in _weights(tmp_path / "a" / "stage2").items()
    )
