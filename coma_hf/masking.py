"""CoMa's attention rule, stated once, and the masks derived from it.

For one sample whose compression tokens occupy positions `[start, end)`:

* input tokens (`< start`): causal among themselves;
* compression tokens (`start ≤ i < end`): causal — they see the whole input and earlier compression tokens;
* every token after them (`≥ end`): sees the compression tokens and earlier post-compression tokens (causal),
  and **never anything before `start`**.

So whatever the answers know about the input passed through the K compression states. Padding keys are never seen.
A sample without compression tokens has `start = end = length`: plain causal attention.

`may_attend` is the rule, a pure predicate. Two masks are derived from it: the dense float mask `[batch, 1, L, L]`
that sdpa and eager attention take (`build_attention_mask`), and flex attention's block-sparse `BlockMask`
(`block_mask`), whose `mask_mod` is the same predicate over each row's span and padding.

Part of the remote code shipped with every checkpoint: imports only torch.
"""

from __future__ import annotations

import math

import torch

RULES = ("bottleneck", "causal", "blocked")
FLEX_ATTENTION = "flex_attention"
FLEX_BLOCK_SIZE = 128  # flex attention's default block: a block of keys is skipped, scanned whole or masked


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


def block_mask(
    padding_mask: torch.Tensor,
    start: torch.Tensor,
    end: torch.Tensor,
    rule: str = "bottleneck",
    block_size: int = FLEX_BLOCK_SIZE,
):
    """Flex attention's `BlockMask` of the same rule as `attention_allowed` (`[batch, 1, length, length]`).

    Its `mask_mod` is `may_attend` closed over each row's `start`, `end` and padding (a padding query attends to
    itself). Which key blocks each query block skips, scans whole, or masks is found one query block at a time
    (`[batch, block_size, length]` booleans), so no `[length, length]` tensor exists, and nothing is compiled: torch's
    `create_block_mask` materialises the dense mask unless compiled, which costs an inductor compile per shape on CPU.
    The blocks are the ones `create_block_mask` finds (positions past the end count as masked).
    """
    from torch.nn.attention.flex_attention import BlockMask

    batch, length = padding_mask.shape
    device = padding_mask.device
    num_blocks = math.ceil(length / block_size)
    # padded to whole blocks: flex may call mask_mod at positions past the end of the last block
    real = torch.nn.functional.pad(padding_mask.bool(), (0, num_blocks * block_size - length))

    def mask_mod(b, h, q, k):
        allowed = may_attend(q, k, start[b], end[b], rule) & real[b, k]
        return allowed | ((q == k) & ~real[b, q])

    rows = torch.arange(batch, device=device).view(batch, 1, 1)
    partial = torch.zeros(batch, num_blocks, num_blocks, dtype=torch.bool, device=device)
    full = torch.zeros_like(partial)
    padded_keys = torch.arange(num_blocks * block_size, device=device)
    for index in range(num_blocks):
        queries = padded_keys[index * block_size : (index + 1) * block_size]
        # queries and keys past the end count as masked, as torch's `create_block_mask` pads them
        allowed = mask_mod(rows, 0, queries.view(1, -1, 1), padded_keys.view(1, 1, -1))
        allowed &= (queries < length).view(1, -1, 1) & (padded_keys < length).view(1, 1, -1)
        by_block = allowed.view(batch, block_size, num_blocks, block_size)
        any_allowed, all_allowed = by_block.any(dim=(1, 3)), by_block.all(dim=(1, 3))
        full[:, index] = all_allowed
        partial[:, index] = any_allowed & ~all_allowed
    return BlockMask.from_kv_blocks(
        *_kv_blocks(partial),
        *_kv_blocks(full),
        BLOCK_SIZE=block_size,
        mask_mod=mask_mod,
        seq_lengths=(length, length),
    )


def _kv_blocks(chosen: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`(counts [batch, 1, q_blocks], indices [batch, 1, q_blocks, kv_blocks])` of the chosen key blocks of each
    query block, the chosen ones first (the layout `BlockMask.from_kv_blocks` takes), int32."""
    counts = chosen.sum(dim=-1, dtype=torch.int32)
    indices = torch.argsort(~chosen, dim=-1, stable=True).to(torch.int32)
    return counts[:, None], indices[:, None]


def check_language_model_attention(implementation: str | None) -> None:
    """The compression rule needs a mask: a dense one (sdpa, eager) or a mask function (flex attention); flash
    attention kernels take neither."""
    if implementation and "flash" in implementation:
        raise ValueError(
            f"The language model is set to {implementation!r}, which cannot apply CoMa's compression mask. Use "
            "'sdpa', 'eager' or 'flex_attention' for the language model (flash attention is fine for the vision "
            "tower)."
        )


def check_trainable_attention(implementation: str | None, device: torch.device) -> None:
    """Flex attention has no backward on CPU (torch raises `NotImplementedError` mid-step): refuse before training."""
    if implementation == FLEX_ATTENTION and torch.device(device).type == "cpu":
        raise ValueError(
            "flex_attention has no backward pass on CPU, so this model cannot train here: train with "
            "attn_implementation='sdpa' on CPU, or with flex_attention on a GPU (flex serves inference on CPU)."
        )
