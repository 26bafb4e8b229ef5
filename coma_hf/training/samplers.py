"""Stage-2 batches as the released code builds them: single-dataset chunks, datasets mixed uniformly.

The authors' stage 2 interleaves the MMEB-train subsets in chunks of 64 consecutive rows from one subset, each chunk's
subset drawn with equal probability, and cuts the stream into batches (a global batch of 1,024 is 16 such chunks);
smaller subsets are drawn as often as large ones, so they are seen again before the large ones are used up.
`UniformChunkBatchSampler` does that as a sentence-transformers multi-dataset batch sampler: the trainer hands it the
training `DatasetDict`'s splits (one per dataset, see `coma_hf.data.stage2.split_by_dataset`), and `accelerate`
deals its batches out to the processes in turn, so the rows of one optimizer step are consecutive in the stream.
`chunked_batch_sampler` makes the callable that `SentenceTransformerTrainingArguments.multi_dataset_batch_sampler`
takes.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterator, Sequence

import torch
from sentence_transformers.base.sampler import MultiDatasetDefaultBatchSampler
from torch.utils.data import BatchSampler, ConcatDataset

from ..released.recipe import RELEASED_CHUNK_SIZE


class UniformChunkBatchSampler(MultiDatasetDefaultBatchSampler):
    """Batches of `batch_size` row indices (into the `ConcatDataset` of the datasets) cut from a stream of chunks: each
    chunk is `chunk_size` rows of one dataset, the dataset drawn uniformly at random.

    Within a dataset, rows come in the order of a random permutation; when fewer than `chunk_size` rows of it are left,
    the dataset is reshuffled and starts over (so a chunk never repeats a row, and small datasets are revisited, as
    the released code's "all exhausted" interleaving revisits them). An epoch is as many batches as the datasets
    have rows together (rounded up; down with `drop_last`), and every batch is full.

    Args:
        dataset: the datasets, concatenated (as sentence-transformers passes them).
        batch_samplers: one per dataset (sentence-transformers passes them); only their batch size and `drop_last`
            are used.
        generator: unused (the order is drawn from `seed` and the epoch, identically in every process).
        seed: seed of the chunk draws and permutations; epoch `e` uses `seed + e`.
        chunk_size: rows per chunk (the released code's 64).
        names: the datasets' names, for errors.
    """

    def __init__(
        self,
        dataset: ConcatDataset,
        batch_samplers: list[BatchSampler],
        generator: torch.Generator | None = None,
        seed: int = 0,
        chunk_size: int = RELEASED_CHUNK_SIZE,
        names: Sequence[str] | None = None,
    ) -> None:
        super().__init__(dataset, batch_samplers, generator, seed)
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be positive, got {chunk_size}")
        self.chunk_size = chunk_size
        self.sizes = [len(part) for part in dataset.datasets]
        names = list(names) if names is not None else [f"#{index}" for index in range(len(self.sizes))]
        small = [f"{name} ({size} rows)" for name, size in zip(names, self.sizes, strict=True) if size < chunk_size]
        if small:
            raise ValueError(f"Datasets smaller than one chunk of {chunk_size} rows: {', '.join(small)}")

    def __len__(self) -> int:
        rows = sum(self.sizes)
        return rows // self.batch_size if self.drop_last else math.ceil(rows / self.batch_size)

    def __iter__(self) -> Iterator[list[int]]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        offsets = [0, *torch.tensor(self.sizes).cumsum(0).tolist()[:-1]]
        orders: list[list[int]] = [[] for _ in self.sizes]  # the rows of each dataset still to come, in order
        pending: list[int] = []
        for _ in range(len(self)):
            while len(pending) < self.batch_size:
                index = int(torch.randint(len(self.sizes), (1,), generator=generator))
                if len(orders[index]) < self.chunk_size:
                    orders[index] = torch.randperm(self.sizes[index], generator=generator).tolist()
                chunk, orders[index] = orders[index][: self.chunk_size], orders[index][self.chunk_size :]
                pending += [offsets[index] + row for row in chunk]
            yield pending[: self.batch_size]
            pending = pending[self.batch_size :]


def chunked_batch_sampler(chunk_size: int = RELEASED_CHUNK_SIZE, names: Sequence[str] | None = None):
    """The `multi_dataset_batch_sampler` callable that builds a `UniformChunkBatchSampler` with `chunk_size` (and the
    datasets' `names`, for errors)."""
    return functools.partial(UniformChunkBatchSampler, chunk_size=chunk_size, names=names)


__all__ = ["RELEASED_CHUNK_SIZE", "UniformChunkBatchSampler", "chunked_batch_sampler"]
