"""Run under `torch.distributed.run --nproc_per_node 2`: each process takes its half of a fixed batch, computes
CoMaContrastiveLoss with candidates gathered across processes, and saves its loss and parameter gradients."""

import sys

import torch
import torch.distributed as dist
from sentence_transformers import SentenceTransformer

from coma_hf.losses import CoMaContrastiveLoss


def batch():
    from PIL import Image

    images = [Image.new("RGB", (56 + 28 * (i % 2), 56), (40 * i, 255 - 30 * i, 90)) for i in range(8)]
    anchors = [{"image": image, "text": f"picture {i}"} if i % 3 else f"caption {i}" for i, image in enumerate(images)]
    positives = [f"label {i % 3}" for i in range(8)]  # repeated labels: the duplicate mask crosses processes
    negatives = [f"other {i}" for i in range(8)]
    return [anchors, positives, negatives]


def main(folder: str, output: str, cached: str) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    model = SentenceTransformer(folder, trust_remote_code=True, device="cpu")
    model.train()
    columns = [column[rank * 8 // world:(rank + 1) * 8 // world] for column in batch()]
    loss_fn = CoMaContrastiveLoss(model, gather_across_devices=True, cached=cached == "cached", mini_batch_size=2,
                                  symmetric=True)  # fmt: skip
    loss = loss_fn([model.preprocess(column) for column in columns], None)
    loss.backward()
    grads = {name: p.grad for name, p in model.named_parameters() if p.grad is not None}
    torch.save({"loss": loss.detach(), "grads": grads}, f"{output}.{rank}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:4])
