"""Batched vision attention gives the stock per-window results, in one call per layer, for every family."""

from __future__ import annotations

import pytest
import torch
from transformers import AttentionInterface

from coma_hf.tiny import build_tiny_coma
from coma_hf.vision_attention import (
    BATCHED_VISION_ATTENTION,
    batched_vision_attention,
    set_vision_attention,
    use_batched_vision_attention,
    vision_attention_implementation,
)

from utils import FAMILIES, random_image


@pytest.mark.parametrize("family", FAMILIES)
def test_batched_vision_attention_matches_the_stock_path(family):
    torch.manual_seed(0)
    model, processor = build_tiny_coma(family, num_compression_tokens=4, min_image_tokens=4, max_image_tokens=64)
    model.eval()
    sizes = [(84, 112), (224, 140), (56, 56), (112, 84)]  # several image sizes in one batch, and a text-only row
    inputs = [{"image": random_image(index, size), "text": "a caption"} for index, size in enumerate(sizes)] + ["text"]
    batch = processor.process_embedding_inputs(inputs)
    visual = model.model.visual
    assert vision_attention_implementation(visual) == BATCHED_VISION_ATTENTION  # the default without flash-attn
    set_vision_attention(visual, "sdpa")
    with torch.no_grad():
        stock_vision = model.model.get_image_features(batch["pixel_values"], batch["image_grid_thw"]).pooler_output
        stock = model(**batch).pooler_output

    calls = []

    def counted(*args, **kwargs):
        calls.append(len(kwargs["cu_seq_lens_q"]) - 1)
        return batched_vision_attention(*args, **kwargs)

    AttentionInterface.register(BATCHED_VISION_ATTENTION, counted)
    try:
        assert use_batched_vision_attention(visual) == BATCHED_VISION_ATTENTION
        with torch.no_grad():
            fast_vision = model.model.get_image_features(batch["pixel_values"], batch["image_grid_thw"]).pooler_output
            fast = model(**batch).pooler_output
    finally:
        AttentionInterface.register(BATCHED_VISION_ATTENTION, batched_vision_attention)

    assert model.config.backbone_config.get_text_config()._attn_implementation == "sdpa"  # the LM keeps its own
    assert model.config.backbone_config.vision_config._attn_implementation == "sdpa"  # the config stays buildable
    depth = len(model.model.visual.blocks)
    assert len(calls) == 2 * depth and max(calls) >= len(sizes)  # one call per layer, each over several segments
    for stock_part, fast_part in zip(_as_list(stock_vision), _as_list(fast_vision), strict=False):
        torch.testing.assert_close(fast_part, stock_part, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(fast, stock, atol=1e-5, rtol=1e-5)


def _as_list(features):
    return list(features) if isinstance(features, (list, tuple)) else [features]


def test_segments_do_not_see_each_other():
    """Changing one segment's keys leaves every other segment's output unchanged, exactly."""
    torch.manual_seed(0)
    module = torch.nn.Module().eval()
    query, key, value = (torch.randn(1, 2, 9, 4) for _ in range(3))
    cu = torch.tensor([0, 3, 7, 9])
    output, _ = batched_vision_attention(module, query, key, value, cu_seq_lens_q=cu, scaling=0.5)
    key2 = key.clone()
    key2[:, :, 3:7] += 1.0
    output2, _ = batched_vision_attention(module, query, key2, value, cu_seq_lens_q=cu, scaling=0.5)
    assert torch.equal(output[:, :3], output2[:, :3]) and torch.equal(output[:, 7:], output2[:, 7:])
    assert not torch.equal(output[:, 3:7], output2[:, 3:7])
    # each segment equals plain attention over that segment
    for start, end in ((0, 3), (3, 7), (7, 9)):
        expected = torch.nn.functional.scaled_dot_product_attention(
            query[:, :, start:end], key[:, :, start:end], value[:, :, start:end], scale=0.5
        ).transpose(1, 2)
        torch.testing.assert_close(output[:, start:end], expected, atol=1e-6, rtol=1e-6)
