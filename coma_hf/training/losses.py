"""Stage-1 loss normalisation and the stage-2 loss.

Stage 1 (`LOSS_NORMALIZATIONS`): `"tokens"`, the default, is the model's own loss — the token cross-entropy summed
over the global batch's label tokens, divided by their count (DESIGN.md). `"per_sample_mean"` is the released code's:
each sample's mean token cross-entropy, averaged over the samples of the global batch (their micro-batch of 1, the
loss divided by the accumulation and averaged over processes), so a long conversation weighs as much as a short one.
`per_sample_token_means` gives the per-sample means; `CoMaCompressionTrainer` divides their sum by the global count of
`labelled_rows`.

Stage 2: InfoNCE over in-batch candidates, read off CoMa's compression tokens (sentence-transformers).

`CoMaContrastiveLoss` is sentence-transformers' `CachedMultipleNegativesRankingLoss` (GradCache) with three CoMa
needs added: the scale comes from the checkpoint's `contrastive_temperature` (0.03, the paper); rows whose
positives are the same input are not each other's negatives (image→label data repeats its labels, and without the
mask the loss pushes an image away from its own class name); and a batch in which only some rows have a hard
negative keeps the negatives that exist (MMEB-train leaves most empty; the collator fills the others with a
placeholder marked absent, see `BatchKey.PRESENT`). Everything else — mini-batches, gradient caching, gathering across
processes, `MatryoshkaLoss` compatibility — is inherited.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from typing import Any

import torch
import torch.nn.functional as F
from sentence_transformers.sentence_transformer.losses import CachedMultipleNegativesRankingLoss
from sentence_transformers.util import all_gather, all_gather_with_grad, cos_sim, get_rank
from torch import Tensor, nn

from ..configuration_coma import DEFAULT_CONTRASTIVE_TEMPERATURE
from ..constants_coma import IGNORE_INDEX, BatchKey
from ..processing_coma import sample_contents

# Stage-1 loss normalisations: over the global batch's label tokens (the default), or the mean over its samples of
# each sample's mean token loss (the released code).
LOSS_NORMALIZATIONS = ("tokens", "per_sample_mean")


def check_loss_normalization(value: str) -> str:
    """`value` if it is one of `LOSS_NORMALIZATIONS`, else a `ValueError` naming the choices."""
    if value not in LOSS_NORMALIZATIONS:
        raise ValueError(f"loss_normalization must be one of {LOSS_NORMALIZATIONS}, got {value!r}")
    return value


def labelled_rows(labels: Tensor) -> Tensor:
    """`[batch]` bool: the rows of `labels` (`[batch, length]`) with at least one next-token target (position 0
    predicts nothing, so it does not count)."""
    return (labels[:, 1:] != IGNORE_INDEX).any(dim=1)


def per_sample_token_means(hidden: Tensor, labels: Tensor, output_embeddings: nn.Module) -> Tensor:
    """`[batch]` float32: each row's mean next-token cross-entropy over its label tokens (0 for a row without any).

    `hidden` `[batch, length, dim]` are the final states, `labels` `[batch, length]` the targets (`IGNORE_INDEX` where
    no loss), `output_embeddings` the LM head (called as a module, so peft wrappers apply). As the model's own loss,
    logits are computed at label positions only.
    """
    targets = labels[:, 1:]
    positions = targets != IGNORE_INDEX
    logits = output_embeddings(hidden[:, :-1][positions]).float()
    token_losses = F.cross_entropy(logits, targets[positions], reduction="none")
    rows = positions.nonzero()[:, 0]  # the row of each selected position, in the same (row-major) order
    sums = token_losses.new_zeros(len(labels)).index_add(0, rows, token_losses)
    return sums / positions.sum(dim=1).clamp(min=1)


class CoMaContrastiveLoss(CachedMultipleNegativesRankingLoss):
    r"""InfoNCE with in-batch negatives, optional hard negatives and an optional symmetric term.

    For anchors :math:`q_i` and positives :math:`d_i` of a batch of :math:`B` rows (all processes together when
    `gather_across_devices`), with hard negatives :math:`n_{i,1..m}` from further columns::

        loss = mean_i  -log  exp(s(q_i, d_i) / τ) / Σ_{c ∈ C_i} exp(s(q_i, c) / τ)

    where `s` is cosine similarity, τ the temperature and :math:`C_i` every positive and hard negative of the
    batch except the positives :math:`d_j` (j ≠ i) that are the *same input* as :math:`d_i` (same tokens and
    pixels), which are masked out, and the hard negatives absent from their rows (see `BatchKey.PRESENT`).
    `symmetric=True` averages this with the document→query term (each positive against every anchor, the same
    duplicate mask applied), as in CLIP.

    Args:
        model: a SentenceTransformer loaded from a CoMa checkpoint.
        temperature: τ; defaults to the checkpoint's `config.contrastive_temperature` (0.03).
        mini_batch_size: rows embedded at once (GradCache); the paper used 8 for 3B, 4 for 7B.
        cached: `False` embeds the whole batch with gradients in one pass (plain InfoNCE; same loss and gradients,
            more activation memory).
        symmetric: add the document→query term.
        mask_duplicate_positives: exclude same-input positives from each other's denominators.
        gather_across_devices: gather anchors and candidates from all processes, gradients kept.
        show_progress_bar: show GradCache mini-batch progress.

    Inputs: (anchor, positive) pairs or (anchor, positive, negative_1, …, negative_m) tuples; no labels. A negative
    column may carry a `BatchKey.PRESENT` mask for rows without a negative of their own.

    Reference: Compressing then Matching (CoMa), arXiv 2511.08480, stage 2; GradCache, arXiv 2101.06983.
    """

    def __init__(
        self,
        model,
        temperature: float | None = None,
        mini_batch_size: int = 8,
        cached: bool = True,
        symmetric: bool = False,
        mask_duplicate_positives: bool = True,
        gather_across_devices: bool = False,
        show_progress_bar: bool = False,
    ) -> None:
        temperature = temperature if temperature is not None else _config_temperature(model)
        super().__init__(
            model,
            scale=1.0 / temperature,
            similarity_fct=cos_sim,
            mini_batch_size=mini_batch_size,
            gather_across_devices=gather_across_devices,
            directions=("query_to_doc", "doc_to_query") if symmetric else ("query_to_doc",),
            partition_mode="per_direction",
            show_progress_bar=show_progress_bar,
        )
        self.uses_gradient_cache = cached  # read by MatryoshkaLoss, see sentence-transformers' gradcache
        self.symmetric = symmetric
        self.mask_duplicate_positives = mask_duplicate_positives
        self._positive_keys: Tensor | None = None
        self._present: Tensor | None = None  # [candidate columns, batch]: which candidates are real inputs

    def forward(self, sentence_features: Iterable[dict[str, Tensor]], labels: Tensor | None = None) -> Tensor:
        sentence_features = list(sentence_features)
        if len(sentence_features) < 2:
            raise ValueError(f"Expected (anchor, positive[, negatives…]) columns, got {len(sentence_features)}")
        sentence_features, self._present = _split_present(sentence_features)
        self._positive_keys = input_keys(sentence_features[1]) if self.mask_duplicate_positives else None
        if self.uses_gradient_cache:
            return self.forward_cached(sentence_features, labels)
        reps = [[self.model(features)["sentence_embedding"]] for features in sentence_features]
        return self.calculate_loss(reps, labels)

    def calculate_loss(
        self, reps: list[list[Tensor]], labels: Tensor | None = None, *, with_backward: bool = False
    ) -> Tensor:
        """The loss from per-mini-batch embeddings, chunked over `mini_batch_size` anchors.

        Restated from the parent (whose score loop has no hook for excluding pairs) with the duplicate mask and the
        absent candidates added.
        """
        queries = torch.cat(reps[0])
        docs = [torch.cat(columns) for columns in reps[1:]]
        batch_size = len(queries)
        keys = self._positive_keys
        present = self._present.to(queries.device)  # NCCL gathers device tensors
        offset = 0
        if self.gather_across_devices:
            docs, present = _pad_to_the_most_columns(docs, present)
            queries = all_gather_with_grad(queries)
            docs = [all_gather_with_grad(column) for column in docs]
            keys = all_gather(keys.to(queries.device)) if keys is not None else None
            # gathered on every process, whether or not its batch lacks a negative, so that the collectives pair up
            present = all_gather(present.T.contiguous().long()).T.bool()
            offset = get_rank() * batch_size
        world_batch = len(queries)
        candidates = torch.cat(docs)  # [world * (1 + m), dim]: positives first, then each negative column
        absent = ~present.reshape(-1)  # in the order of `candidates`
        same_positive = _same_key(keys, world_batch, queries.device)

        total = queries.new_zeros(())
        for begin in range(0, batch_size, self.mini_batch_size):
            rows = torch.arange(
                offset + begin, offset + min(begin + self.mini_batch_size, batch_size), device=queries.device
            )
            local = torch.arange(len(rows), device=queries.device)
            excluded = _exclusions(same_positive, absent, rows, world_batch)
            scores = self.similarity_fct(queries[rows], candidates) * self.scale
            terms = [_info_nce(scores, local, rows, excluded)]
            if self.symmetric:
                reverse = self.similarity_fct(docs[0][rows], queries) * self.scale
                terms.append(_info_nce(reverse, local, rows, excluded[:, :world_batch]))
            chunk = torch.stack(terms).mean() * len(rows) / batch_size
            if with_backward:
                chunk.backward()
                chunk = chunk.detach()
            total = total + chunk
        return total

    def get_config_dict(self) -> dict[str, Any]:
        return {
            "temperature": self.temperature,
            "mini_batch_size": self.mini_batch_size,
            "cached": self.uses_gradient_cache,
            "symmetric": self.symmetric,
            "mask_duplicate_positives": self.mask_duplicate_positives,
            "gather_across_devices": self.gather_across_devices,
        }

    @property
    def citation(self) -> str:
        return """
@inproceedings{li2026coma,
    title={Compressing then Matching: An Efficient Pre-training Paradigm for Multimodal Embedding},
    author={Li and Luo and Bi and Guo and Yuan and Yang and Wang and Yang and Gao and Zhou},
    booktitle={ACL},
    year={2026},
    eprint={2511.08480},
    archivePrefix={arXiv}
}
"""


def _info_nce(scores: Tensor, local: Tensor, rows: Tensor, excluded: Tensor) -> Tensor:
    """Mean of `-log softmax` at each row's own positive (column `rows[i]`), excluded columns removed."""
    positive = scores[local, rows]
    scores = scores.masked_fill(excluded, float("-inf"))
    return (torch.logsumexp(scores, dim=1) - positive).mean()


def _same_key(keys: Tensor | None, size: int, device: torch.device) -> Tensor | None:
    """`[size, size]` True where two different rows have the same positive."""
    if keys is None:
        return None
    keys = keys.to(device)
    same = keys[:, None] == keys[None, :]
    return same & ~torch.eye(size, dtype=torch.bool, device=device)


def _exclusions(same_positive: Tensor | None, absent: Tensor, rows: Tensor, world_batch: int) -> Tensor:
    """`[len(rows), len(absent)]` mask of candidates left out of each row's denominator: absent candidates for every
    row, and the positives that duplicate the row's own."""
    excluded = absent.expand(len(rows), -1).clone()
    if same_positive is not None:
        excluded[:, :world_batch] |= same_positive[rows]
    return excluded


def _pad_to_the_most_columns(docs: list[Tensor], present: Tensor) -> tuple[list[Tensor], Tensor]:
    """`docs` and `present` with absent zero columns added up to the most candidate columns any process has.

    Processes can be on batches with different hard-negative columns at one step (accelerate shards the batches,
    and a batch has a negative column only when some row has a negative); gathering needs the same columns on all.
    """
    counts = all_gather(torch.tensor([len(docs)], device=present.device))
    missing = int(counts.max()) - len(docs)
    if missing <= 0:
        return docs, present
    # requiring grad as the real columns do, so that the gathers' backward collectives pair up as well
    docs = docs + [torch.zeros_like(docs[0]).requires_grad_(docs[0].requires_grad) for _ in range(missing)]
    return docs, torch.cat([present, present.new_zeros(missing, present.shape[1])])


def _split_present(features: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], Tensor]:
    """The features without their `BatchKey.PRESENT` masks (copies: `MatryoshkaLoss` passes the same features once per
    dimension), and `[len(features) - 1, batch]` bool: which candidates (positives, then each negative column) are
    real inputs. Anchors and positives always are."""
    if any(BatchKey.PRESENT in column for column in features[:2]):
        raise ValueError(
            f"Only hard-negative columns may mark rows absent ({BatchKey.PRESENT!r}); anchors and positives cannot"
        )
    batch_size = len(features[0][BatchKey.INPUT_IDS])
    present = [torch.ones(batch_size, dtype=torch.bool)]
    for column in features[2:]:
        mask = column.get(BatchKey.PRESENT)
        present.append(torch.ones(batch_size, dtype=torch.bool) if mask is None else mask.bool().cpu())
    stripped = [{key: value for key, value in column.items() if key != BatchKey.PRESENT} for column in features]
    return stripped, torch.stack(present)


def input_keys(features: dict[str, Any]) -> Tensor:
    """One int64 per row identifying the row's input (its tokens and its image's pixels).

    A digest, not Python's `hash`, so that keys agree across processes when gathered.
    """
    keys = []
    for tokens, pixels in sample_contents(features):
        digest = hashlib.blake2b(tokens.cpu().numpy().tobytes(), digest_size=8)
        if pixels is not None:
            digest.update(pixels.cpu().numpy().tobytes())
        keys.append(int.from_bytes(digest.digest(), "little", signed=True))
    return torch.tensor(keys, dtype=torch.long)


def _config_temperature(model) -> float:
    for module in model.modules():
        config = getattr(module, "config", None)
        if getattr(config, "model_type", None) == "coma":
            return float(config.contrastive_temperature)
    return DEFAULT_CONTRASTIVE_TEMPERATURE  # a model that is not CoMa: the paper's value


__all__ = [
    "LOSS_NORMALIZATIONS",
    "CoMaContrastiveLoss",
    "check_loss_normalization",
    "input_keys",
    "labelled_rows",
    "per_sample_token_means",
]
