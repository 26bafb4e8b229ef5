"""Answers generated from the compression states alone equal a greedy decode of the whole masked sequence."""

from __future__ import annotations

import copy
import functools

import pytest
import torch

from utils import FAMILIES, random_image, tiny_coma

INPUTS = ["a red circle", random_image(1), {"image": random_image(2, (140, 56)), "text": "hello there"}]
QUESTIONS = ["what?", "which colour is the big circle?", "how many?"]
STEPS = 8


@functools.cache
def _spread_model(family: str):
    """The tiny model with larger random weights, so greedy decoding does not collapse onto one token."""
    model, processor = tiny_coma(family)
    model = copy.deepcopy(model)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for weight in model.parameters():
            if weight.dim() >= 2:
                weight.copy_(torch.randn(weight.shape, generator=generator) * 0.3)
    return model, processor


def _greedy_full_sequence(model, processor, item, question, steps):
    """Re-run the whole sequence (input, compression tokens, question, answer so far) under the CoMa mask."""
    base = processor.process_embedding_inputs([item])
    prompt = torch.tensor([processor.render_question(question)])
    generated = []
    for _ in range(steps):
        ids = torch.cat([base["input_ids"], prompt, torch.tensor([generated], dtype=torch.long)], dim=1)
        batch = {**base, "input_ids": ids, "attention_mask": torch.ones_like(ids)}
        batch["mm_token_type_ids"] = (ids == model.config.backbone_config.image_token_id).int()
        hidden = model.backbone_hidden_states(**batch)
        generated.append(int(model.lm_head(hidden[0, -1]).argmax()))
    return generated


@pytest.mark.parametrize("family", FAMILIES)
def test_generate_from_compression_equals_full_sequence_decode(family):
    model, processor = _spread_model(family)
    with torch.no_grad():
        compression = model.compress(**processor.process_embedding_inputs(INPUTS))
        cached = model.generate_from_compression(
            compression, QUESTIONS, max_new_tokens=STEPS, processor=processor, return_token_ids=True
        )
        for index, (item, question) in enumerate(zip(INPUTS, QUESTIONS, strict=False)):
            expected = _greedy_full_sequence(model, processor, item, question, STEPS)
            end_id = processor.tokenizer.convert_tokens_to_ids("<|im_end|>")
            produced = cached[index].tolist()
            if end_id in expected:  # generation stops there; the cached decode pads with <|im_end|>
                expected = expected[: expected.index(end_id) + 1]
                produced = produced[: len(expected)]
            assert produced == expected
    assert len({tuple(row.tolist()) for row in cached}) == 3  # the inputs really lead to different answers


def test_compression_exposes_states_cache_and_offset():
    model, processor = tiny_coma()
    batch = processor.process_embedding_inputs(INPUTS)
    with torch.no_grad():
        compression = model.compress(**batch)
        output = model(**batch)
    k = model.config.num_compression_tokens
    assert compression.compression_states.shape == (3, k, model.config.hidden_size)
    torch.testing.assert_close(compression.compression_states, output.compression_states)
    torch.testing.assert_close(compression.pooler_output, output.pooler_output)
    assert len(compression.key_values) == model.config.get_text_config().num_hidden_layers
    assert compression.key_values[0][0].shape[2] == k
    # text-only input: positions are 0..length-1, so the offset after the compression tokens is its token count
    assert compression.position_offset[0].item() == int(batch["attention_mask"][0].sum())
    # an image takes fewer rope positions than tokens (3D positions), so its offset is smaller than its length
    assert compression.position_offset[1].item() < int(batch["attention_mask"][1].sum())


def test_answers_are_strings_that_stop_at_end_of_turn():
    model, processor = _spread_model("qwen2_5_vl")
    with torch.no_grad():
        compression = model.compress(**processor.process_embedding_inputs(INPUTS))
        answers = model.generate_from_compression(compression, QUESTIONS, max_new_tokens=4, processor=processor)
    assert len(answers) == 3 and all(isinstance(answer, str) for answer in answers)
    with pytest.raises(ValueError, match="questions"):
        model.generate_from_compression(compression, QUESTIONS[:2], processor=processor)
