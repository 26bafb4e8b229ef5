"""Published backbone configs, shrunk in width and depth, build CoMa models that train and embed."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig

from coma_hf.tiny import QWEN_SPECIAL_TOKEN_START, build_tiny_coma, build_tokenizer, shrink_config

from utils import random_image

FIXTURES = Path(__file__).parent / "fixtures"
PUBLISHED = {
    "qwen2_5_vl_3b_instruct": {"vocab": 151936, "tied": True, "patch": 14},
    "qwen2_5_vl_7b_instruct": {"vocab": 152064, "tied": False, "patch": 14},
    "qwen2_vl_2b_instruct": {"vocab": 151936, "tied": True, "patch": 14},
    "qwen3_vl_2b_instruct": {"vocab": 151936, "tied": True, "patch": 16},
}


def published_config(name: str):
    raw = json.loads((FIXTURES / f"{name}.json").read_text())
    return AutoConfig.for_model(raw.pop("model_type"), **raw)


@functools.lru_cache(maxsize=1)
def qwen_layout_tokenizer():
    """A tokenizer whose special tokens sit at the published Qwen ids (151643 …)."""
    return build_tokenizer(special_token_start=QWEN_SPECIAL_TOKEN_START)


def test_qwen_layout_tokenizer_has_published_special_ids():
    tokenizer = qwen_layout_tokenizer()
    assert tokenizer.convert_tokens_to_ids(["<|endoftext|>", "<|im_end|>", "<|vision_start|>", "<|image_pad|>"]) == [
        151643,
        151645,
        151652,
        151655,
    ]
    assert len(tokenizer) == 151665
    assert tokenizer.decode(tokenizer("a red circle")["input_ids"]) == "a red circle"


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_shrunk_published_config_trains_one_step_and_embeds(name):
    expected = PUBLISHED[name]
    original = published_config(name)
    config = shrink_config(original)
    text, original_text = config.get_text_config(), original.get_text_config()
    # shrinking keeps what matters for correctness
    assert text.vocab_size == expected["vocab"] and config.tie_word_embeddings == expected["tied"]
    assert config.vision_config.patch_size == expected["patch"]
    assert config.vision_config.spatial_merge_size == original.vision_config.spatial_merge_size
    assert text.rope_parameters["mrope_section"] == original_text.rope_parameters["mrope_section"]
    assert sum(text.rope_parameters["mrope_section"]) * 2 == text.head_dim
    for key in ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id"):
        assert getattr(config, key) == getattr(original, key)

    tokenizer = qwen_layout_tokenizer()
    model, processor = build_tiny_coma(
        config.model_type, num_compression_tokens=32, backbone_config=config, tokenizer=_fresh(tokenizer)
    )
    # K new ids fit the published spare rows: the embedding matrix is neither grown nor shrunk
    assert model.config.compression_token_ids == list(range(151665, 151665 + 32))
    assert model.get_input_embeddings().weight.shape[0] == expected["vocab"]
    assert model.lm_head.weight.shape[0] == expected["vocab"]
    assert (model.lm_head.weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()) == expected["tied"]

    batch = processor.process_qa_samples(
        [{"image": random_image(0, (64, 64)), "text": "a caption", "conversation": [("What is it?", "noise")]}]
    )
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    before = model.get_input_embeddings().weight[model.config.compression_token_ids].clone()
    loss = model(**batch).loss
    assert torch.isfinite(loss)
    loss.backward()
    optimizer.step()
    assert not torch.equal(before, model.get_input_embeddings().weight[model.config.compression_token_ids])

    model.eval()
    with torch.no_grad():
        embeddings = model(**processor.process_embedding_inputs(["text", random_image(1, (64, 64))])).pooler_output
    assert embeddings.shape == (2, text.hidden_size)
    torch.testing.assert_close(embeddings.norm(dim=-1), torch.ones(2))


def _fresh(tokenizer):
    """A copy of the cached tokenizer, since `from_backbone` adds the compression tokens to it."""
    import copy

    return copy.deepcopy(tokenizer)
