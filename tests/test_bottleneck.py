"""The bottleneck is real: after the compression tokens, the input is visible only through them."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from coma_hf.backbones import language_model

from utils import FAMILIES, random_image, tiny_coma

CONVERSATION = [
    {"question": "What colour is the circle?", "answer": "The circle is red."},
    {"question": "How many shapes?", "answer": "three"},
]


def _stage1_batch(processor, image, text="a red circle left of a blue square"):
    return processor.process_qa_samples([{"image": image, "text": text, "conversation": CONVERSATION}])


def _post_compression(model, batch, rule):
    hidden = model.backbone_hidden_states(rule=rule, **batch)
    end = model.config.compression_token_ids[-1]
    after = int((batch["input_ids"][0] == end).nonzero()) + 1
    return hidden[:, after:]


def _answer_loss(model, batch, rule):
    hidden = model.backbone_hidden_states(rule=rule, **batch)
    targets = batch["labels"][:, 1:]
    keep = targets != -100
    return F.cross_entropy(model.lm_head(hidden[:, :-1][keep]), targets[keep])


def _perturbed_text(batch, model):
    """The same batch with one input-text token replaced (same token length)."""
    ids = batch["input_ids"].clone()
    text_positions = (ids[0] != model.config.backbone_config.image_token_id) & (batch["mm_token_type_ids"][0] == 0)
    first_cmp = int((ids[0] == model.config.compression_token_ids[0]).nonzero())
    vision_end = int((ids[0] == model.config.backbone_config.vision_end_token_id).nonzero())
    position = vision_end + 2
    assert text_positions[position] and position < first_cmp
    ids[0, position] = (ids[0, position] + 1) % 200
    return {**batch, "input_ids": ids}


def _language_model_attention(model) -> set[str]:
    """The implementations the language model's attention layers read at forward time."""
    layers = [
        module for module in language_model(model.model).modules() if type(module).__name__.endswith("Attention")
    ]
    assert layers
    return {layer.config._attn_implementation for layer in layers}


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("family", FAMILIES)
def test_input_reaches_answers_only_through_compression_tokens(family, attn):
    model, processor = tiny_coma(family, attn)
    assert _language_model_attention(model) == {attn}  # the case runs the implementation it names
    batch = _stage1_batch(processor, random_image(1))
    other_pixels = {**batch, "pixel_values": batch["pixel_values"] + 0.5}
    other_text = _perturbed_text(batch, model)

    with torch.no_grad():
        for perturbed in (other_pixels, other_text):
            open_change = _post_compression(model, perturbed, "bottleneck") - _post_compression(
                model, batch, "bottleneck"
            )
            assert open_change.abs().max() > 1e-4  # the compression tokens carry the change
            blocked_change = _post_compression(model, perturbed, "blocked") - _post_compression(
                model, batch, "blocked"
            )
            assert torch.count_nonzero(blocked_change) == 0  # exactly zero without them

    pixels = batch["pixel_values"].clone().requires_grad_(True)
    _answer_loss(model, {**batch, "pixel_values": pixels}, "blocked").backward()
    assert pixels.grad is not None and torch.count_nonzero(pixels.grad) == 0

    pixels = batch["pixel_values"].clone().requires_grad_(True)
    _answer_loss(model, {**batch, "pixel_values": pixels}, "bottleneck").backward()
    assert torch.count_nonzero(pixels.grad) > 0


def test_causal_control_lets_answers_see_the_input_directly():
    """The control rule differs from CoMa's exactly where answers look at the input."""
    model, processor = tiny_coma()
    batch = _stage1_batch(processor, random_image(2))
    with torch.no_grad():
        causal = _post_compression(model, batch, "causal")
        bottleneck = _post_compression(model, batch, "bottleneck")
    assert (causal - bottleneck).abs().max() > 1e-4
