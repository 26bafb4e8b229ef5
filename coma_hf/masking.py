"""CoMa's attention rule, stated once, and the masks derived from it.

For one sample whose compression tokens occupy positions `[start, end)`:

* input tokens (`< start`): causal among themselves;
* compression tokens (`start ≤ i < end`): causal — they see the whole input and earlier compression tokens;
* every token after them (`≥ end`): sees the compression tokens and earlier post-compression tokens (causal),
  and **never anything before `start`**.

So whatever the answers know about the input passed through the K compression states. Padding keys are never seen.
A sample without compression tokens has `start = end = length`: plain causal attention.

Part of the remote code shipped with every checkpoint: imports only torch.
"""

from __future__ import annotations

import torch

RULES = ("bottleneck", "causal", "blocked")


def may_attend(
    query: torch.Tensor, key: torch.Tensor, start: torch.Tensor, end: torch.Tensor, rule: str = "bottleneck"
) -> torch.Tensor:
    """Whether position `query` may attend to position `key` (broadcasting tensors of positions).

    Args:
        query, key: positions in the sequence.
        start, end: first compression position and the position just after the last one, per sample.
        rule: `"bottleneck"` (CoMa), `"causal"` (the control: plain causal attention), or `"blocked"` (a test
            device: post-compression tokens see neither the input nor the compression tokens).
    """
    causal = key <= query
    if rule == "causal":
        return causal
    after = query >= end
    if rule == "bottleneck":
        return causal & ~(after & (key < start))
    if rule == "blocked":
        return causal & ~(after & (key < end))
    raise ValueError(f"rule must be one of {RULES}, got {rule!r}")


def compression_span(input_ids: torch.Tensor, compression_token_ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """`(start, end)` `[batch]` of each row's compression tokens; `start = end = length` for a row without them.

    Raises `ValueError` naming the row when its compression tokens are not the K tokens, contiguous and in order.
    """
    batch, length = input_ids.shape
    expected = torch.tensor(compression_token_ids, device=input_ids.device)
    is_compression = torch.isin(input_ids, expected)
    counts = is_compression.sum(dim=1)
    positions = torch.arange(length, device=input_ids.device).expand(batch, length)
    start = torch.where(is_compression, positions, length).min(dim=1).values
    end = start + counts
    for row in torch.nonzero(counts > 0).flatten().tolist():
        span = input_ids[row, start[row] : end[row]]
        if counts[row] != len(compression_token_ids) or not torch.equal(span, expected):
            raise ValueError(
                f"sample {row}, field 'input_ids': expected the {len(compression_token_ids)} compression tokens "
                f"once, contiguous and in order; found {int(counts[row])} compression tokens"
            )
    return start, end


def attention_allowed(
    padding_mask: torch.Tensor, start: torch.Tensor, end: torch.Tensor, rule: str = "bottleneck"
) -> torch.Tensor:
    """Boolean `[batch, length, length]` (query, key): True where attention is allowed.

    Padding keys are never attended; a padding query attends to itself only, so no row is empty.
    """
    batch, length = padding_mask.shape
    positions = torch.arange(length, device=padding_mask.device)
    query = positions.view(1, length, 1)
    key = positions.view(1, 1, length)
    allowed = may_attend(query, key, start.view(batch, 1, 1), end.view(batch, 1, 1), rule)
    real = padding_mask.bool()
    allowed = allowed & real[:, None, :]
    diagonal = torch.eye(length, dtype=torch.bool, device=padding_mask.device)
    return allowed | (diagonal & ~real[:, :, None])


def additive_mask(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Float `[batch, 1, q, k]` mask: 0 where allowed, the dtype's minimum elsewhere.

    Float, not bool: transformers' eager attention adds the mask to the scores, and silently mis-handles bool masks.
    """
    mask = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
    mask.masked_fill_(~allowed, torch.finfo(dtype).min)
    return mask[:, None]


def build_attention_mask(
    padding_mask: torch.Tensor, start: torch.Tensor, end: torch.Tensor, dtype: torch.dtype, rule: str = "bottleneck"
) -> torch.Tensor:
    """The 4D float mask `[batch, 1, length, length]` for a whole sequence under `rule`."""
    return additive_mask(attention_allowed(padding_mask, start, end, rule), dtype)


def check_language_model_attention(implementation: str | None) -> None:
    """The compression rule needs an explicit mask, which flash-attention kernels cannot take."""
    if implementation and "flash" in implementation:
        raise ValueError(
            f"The language model is set to {implementation!r}, which cannot apply CoMa's compression mask. Use "
            "'sdpa' or 'eager' for the language model (flash attention is fine for the vision tower)."
        )
