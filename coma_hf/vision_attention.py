"""Batched vision attention: all windows and images of a vision layer in one scaled-dot-product call.

Without flash-attn, the Qwen2-VL / Qwen2.5-VL / Qwen3-VL vision towers of transformers call attention once per window
per image per layer (3,652 calls for a batch of eight 448×448 images on Qwen2.5-VL-3B), and the GPU waits on Python.
The towers hand the packed sequence with its `cu_seqlens` to attention functions whose name contains "flash"; this one,
registered under such a name, pads the windows into one batch, masks the padding keys and makes a single SDPA call.
The language model never uses it (CoMa's mask rules flash-style attention out there).

Part of the remote code shipped with every checkpoint: imports only torch and transformers.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from transformers import AttentionInterface

# "flash" in the name is what makes the vision towers pass `cu_seq_lens_q` instead of splitting the batch themselves.
BATCHED_VISION_ATTENTION = "coma_flash_batched_sdpa"


def batched_vision_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    scaling: float | None = None,
    dropout: float = 0.0,
    cu_seq_lens_q: torch.Tensor | None = None,
    max_length_q: int | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """Bidirectional attention within each segment of a packed sequence.

    Args:
        query / key / value: `[1, heads, total_tokens, head_dim]`, the segments (windows or images) back to back.
        cu_seq_lens_q: `[segments + 1]` cumulative segment lengths (the same for keys).
        max_length_q: the longest segment (computed when absent).

    Returns:
        `([1, total_tokens, heads, head_dim], None)`, as transformers' attention functions do.
    """
    if cu_seq_lens_q is None:  # a single sequence: nothing to batch
        cu_seq_lens_q = torch.tensor([0, query.shape[2]], device=query.device)
    lengths = cu_seq_lens_q[1:] - cu_seq_lens_q[:-1]
    longest = int(max_length_q) if max_length_q is not None else int(lengths.max())
    segment = torch.repeat_interleave(torch.arange(len(lengths), device=query.device), lengths)
    position = torch.arange(query.shape[2], device=query.device) - cu_seq_lens_q[:-1].repeat_interleave(lengths)

    def pad(states: torch.Tensor) -> torch.Tensor:  # [1, heads, total, dim] -> [segments, heads, longest, dim]
        tokens = states[0].transpose(0, 1)
        padded = tokens.new_zeros(len(lengths), longest, *tokens.shape[1:])
        padded[segment, position] = tokens
        return padded.transpose(1, 2)

    key_is_real = torch.arange(longest, device=query.device)[None, :] < lengths[:, None]
    output = F.scaled_dot_product_attention(
        pad(query),
        pad(key),
        pad(value),
        attn_mask=key_is_real[:, None, None, :],
        dropout_p=dropout if module.training else 0.0,
        scale=scaling,
    )
    return output.transpose(1, 2)[segment, position].unsqueeze(0), None


AttentionInterface.register(BATCHED_VISION_ATTENTION, batched_vision_attention)


def _attention_layers(vision_tower: torch.nn.Module) -> list[torch.nn.Module]:
    return [
        module
        for module in vision_tower.modules()
        if type(module).__name__.endswith("Attention") and hasattr(module, "config")
    ]


def set_vision_attention(vision_tower: torch.nn.Module, implementation: str) -> None:
    """Make the attention layers of `vision_tower` use `implementation`.

    The layers get a private copy of the vision config, so the model's own config keeps an implementation
    transformers knows (it refuses to build models from a config naming an unknown "flash" function).
    """
    layers = _attention_layers(vision_tower)
    if not layers:
        return
    private = copy.copy(layers[0].config)
    private._attn_implementation = implementation
    for module in layers:
        module.config = private


def vision_attention_implementation(vision_tower: torch.nn.Module) -> str | None:
    """The implementation the attention layers of `vision_tower` use."""
    layers = _attention_layers(vision_tower)
    return layers[0].config._attn_implementation if layers else None


def use_batched_vision_attention(vision_tower: torch.nn.Module) -> str:
    """flash-attn on the vision tower when it is installed, else the batched function; returns the choice."""
    from transformers.utils import is_flash_attn_2_available

    choice = "flash_attention_2" if is_flash_attn_2_available() else BATCHED_VISION_ATTENTION
    set_vision_attention(vision_tower, choice)
    return choice
