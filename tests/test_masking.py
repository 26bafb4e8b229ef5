"""The attention rule, checked against hand-written matrices."""

from __future__ import annotations

import pytest
import torch

from coma_hf.masking import (
    attention_allowed,
    build_attention_mask,
    check_language_model_attention,
    compression_span,
)

# Sequence of 7: input 0-2, compression 3-4, after 5-6.
EXPECTED_BOTTLENECK = torch.tensor(
    [
        [1, 0, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0, 0],
        [1, 1, 1, 0, 0, 0, 0],
        [1, 1, 1, 1, 0, 0, 0],  # first compression token sees the input
        [1, 1, 1, 1, 1, 0, 0],
        [0, 0, 0, 1, 1, 1, 0],  # after: compression tokens and itself, never the input
        [0, 0, 0, 1, 1, 1, 1],
    ],
    dtype=torch.bool,
)


def test_bottleneck_rule_matches_hand_written_matrix():
    allowed = attention_allowed(torch.ones(1, 7), torch.tensor([3]), torch.tensor([5]))
    assert torch.equal(allowed[0], EXPECTED_BOTTLENECK)


def test_causal_and_blocked_rules():
    causal = attention_allowed(torch.ones(1, 7), torch.tensor([3]), torch.tensor([5]), rule="causal")[0]
    assert torch.equal(causal, torch.ones(7, 7, dtype=torch.bool).tril())
    blocked = attention_allowed(torch.ones(1, 7), torch.tensor([3]), torch.tensor([5]), rule="blocked")[0]
    assert not blocked[5:, :5].any()
    assert blocked[6, 5] and blocked[6, 6]
    with pytest.raises(ValueError, match="rule"):
        attention_allowed(torch.ones(1, 7), torch.tensor([3]), torch.tensor([5]), rule="nonsense")


def test_left_padding_is_never_attended_and_pad_rows_see_only_themselves():
    padding = torch.tensor([[0, 0, 1, 1, 1, 1, 1, 1, 1]])
    allowed = attention_allowed(padding, torch.tensor([5]), torch.tensor([7]))[0]
    assert not allowed[2:, :2].any()
    assert torch.equal(allowed[:2, :], torch.eye(9, dtype=torch.bool)[:2])
    # the real part is the unpadded rule shifted by two
    assert torch.equal(allowed[2:, 2:], EXPECTED_BOTTLENECK)


def test_row_without_compression_tokens_is_plain_causal():
    ids = torch.tensor([[5, 6, 7, 8]])
    start, end = compression_span(ids, [100, 101])
    assert start.item() == end.item() == 4
    allowed = attention_allowed(torch.ones(1, 4), start, end)[0]
    assert torch.equal(allowed, torch.ones(4, 4, dtype=torch.bool).tril())


def test_compression_span_finds_each_row_and_rejects_broken_spans():
    ids = torch.tensor([[0, 0, 9, 100, 101, 7], [9, 9, 9, 9, 100, 101]])
    start, end = compression_span(ids, [100, 101])
    assert start.tolist() == [3, 4] and end.tolist() == [5, 6]
    with pytest.raises(ValueError, match="sample 1"):
        compression_span(torch.tensor([[100, 101, 1], [100, 1, 101]]), [100, 101])
    with pytest.raises(ValueError, match="sample 0"):
        compression_span(torch.tensor([[101, 100, 1]]), [100, 101])


def test_float_mask_values():
    mask = build_attention_mask(torch.ones(1, 7), torch.tensor([3]), torch.tensor([5]), torch.float32)
    assert mask.shape == (1, 1, 7, 7)
    assert torch.equal(mask[0, 0] == 0, EXPECTED_BOTTLENECK)
    assert mask[0, 0, 5, 0].item() == torch.finfo(torch.float32).min


@pytest.mark.parametrize("implementation", ["flash_attention_2", "flash_attention_3", "kernels-community/flash-attn"])
def test_flash_backends_are_refused_for_the_language_model(implementation):
    with pytest.raises(ValueError, match="cannot apply CoMa's compression mask"):
        check_language_model_attention(implementation)
    check_language_model_attention("sdpa")
    check_language_model_attention("eager")
