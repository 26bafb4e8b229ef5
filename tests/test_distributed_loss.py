"""Gathering across processes: two gloo processes give the loss and gradients of one process on the whole batch."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from coma_hf.losses import CoMaContrastiveLoss
from conftest import tiny_coma

SCRIPT = Path(__file__).parent / "distributed" / "contrastive_gather.py"
sys.path.insert(0, str(SCRIPT.parent))
from contrastive_gather import batch  # noqa: E402


@pytest.mark.parametrize("mode", ["plain", "cached"])
def test_two_processes_with_gathering_equal_one_process_on_the_whole_batch(tmp_path, mode):
    from sentence_transformers import SentenceTransformer

    model, _ = tiny_coma()
    model.save_pretrained(tmp_path / "model")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(29500 + (mode == "cached")),
         str(SCRIPT), str(tmp_path / "model"), str(tmp_path / "out"), mode],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-4000:]
    ranks = [torch.load(f"{tmp_path / 'out'}.{rank}") for rank in range(2)]

    st = SentenceTransformer(str(tmp_path / "model"), trust_remote_code=True, device="cpu")
    st.train()
    loss = CoMaContrastiveLoss(st, cached=False, symmetric=True)([st.preprocess(column) for column in batch()], None)
    loss.backward()
    # each process averages its own rows; DDP would average the processes' gradients
    torch.testing.assert_close((ranks[0]["loss"] + ranks[1]["loss"]) / 2, loss.detach(), rtol=1e-5, atol=1e-6)
    for name, parameter in st.named_parameters():
        if parameter.grad is None:
            continue
        averaged = (ranks[0]["grads"][name] + ranks[1]["grads"][name]) / 2
        torch.testing.assert_close(averaged, parameter.grad, rtol=1e-4, atol=1e-6, msg=name)
