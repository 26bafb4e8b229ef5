"""Run under `accelerate launch --num_processes 2` (CPU, gloo; see tests/test_accelerate.py):

1. `loss`: each process takes its half of a fixed batch, computes CoMaContrastiveLoss with candidates gathered
   across processes (plain and cached) and saves its loss and parameter gradients;
2. then each `-- SCRIPT ARGS` segment in turn: `examples/SCRIPT.py` with those arguments (`pretrain`,
   `train_contrastive`, `encode_corpus`, any number of times).

    accelerate launch ... under_accelerate.py OUTPUT CHECKPOINT -- pretrain ARGS -- train_contrastive ARGS ...
"""

import sys

import torch
from accelerate import PartialState
from sentence_transformers import SentenceTransformer

from coma_hf.training import CoMaContrastiveLoss

from utils import load_example, script_segments


def batch() -> list[list]:
    """Eight (anchor, positive, negative) rows; anchors mix image+text and text, positives repeat (so the duplicate
    mask crosses processes)."""
    from PIL import Image

    images = [Image.new("RGB", (56 + 28 * (i % 2), 56), (40 * i, 255 - 30 * i, 90)) for i in range(8)]
    anchors = [{"image": image, "text": f"picture {i}"} if i % 3 else f"caption {i}" for i, image in enumerate(images)]
    positives = [f"label {i % 3}" for i in range(8)]
    negatives = [f"other {i}" for i in range(8)]
    return [anchors, positives, negatives]


def gathered_loss_and_gradients(checkpoint: str, output: str, state: PartialState) -> None:
    rank, world = state.process_index, state.num_processes
    for mode in ("plain", "cached"):
        model = SentenceTransformer(checkpoint, trust_remote_code=True, device="cpu")
        model.train()
        columns = [column[rank * 8 // world : (rank + 1) * 8 // world] for column in batch()]
        loss_fn = CoMaContrastiveLoss(
            model, gather_across_devices=True, cached=mode == "cached", mini_batch_size=2, symmetric=True
        )
        loss = loss_fn([model.preprocess(column) for column in columns], None)
        loss.backward()
        grads = {name: p.grad for name, p in model.named_parameters() if p.grad is not None}
        torch.save({"loss": loss.detach(), "grads": grads}, f"{output}/{mode}.{rank}.pt")


def main(output: str, checkpoint: str, *rest: str) -> None:
    state = PartialState(cpu=True)
    assert state.num_processes == 2, f"expected two processes, got {state.num_processes} ({state.distributed_type})"
    gathered_loss_and_gradients(checkpoint, output, state)
    for script, arguments in script_segments(rest):
        load_example(script).main(arguments)


if __name__ == "__main__":
    main(*sys.argv[1:])
