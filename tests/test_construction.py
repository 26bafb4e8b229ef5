"""Building CoMa models: families, compression tokens, configuration."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import AutoConfig

from coma_hf import CoMaConfig, CoMaModel, CoMaProcessor
from coma_hf.backbones import FAMILIES, get_family
from coma_hf.configuration_coma import LEGACY_PROCESSOR_SETTINGS
from coma_hf.tiny import build_tiny_backbone, build_tiny_coma, tiny_backbone_config

from utils import random_image, tiny_coma


def test_unknown_backbone_is_an_error_listing_supported_families():
    with pytest.raises(ValueError, match=r"'llava'.*qwen2_5_vl, qwen2_vl, qwen3_vl"):
        get_family("llava")
    with pytest.raises(ValueError, match="supports these families"):
        CoMaConfig(backbone_config=AutoConfig.for_model("llama"))
    assert set(FAMILIES) == {"qwen2_vl", "qwen2_5_vl", "qwen3_vl"}


def test_config_rejects_unknown_choices_and_documents_defaults():
    for field, value in (("pooling", "max"), ("attention_rule", "full")):
        with pytest.raises(ValueError, match=field):
            CoMaConfig(**{field: value})
    config = CoMaConfig()
    assert (config.num_compression_tokens, config.pooling) == (32, "mean")
    assert config.contrastive_temperature == 0.03
    for knob in ("num_compression_tokens", "pooling", "attention_rule", "contrastive_temperature", "embedding_dim"):
        assert knob in CoMaConfig.__doc__
    # the token layout is the processor's: a new config neither holds nor writes it
    for setting in LEGACY_PROCESSOR_SETTINGS:
        assert not hasattr(config, setting) and setting not in config.to_dict()


def test_processor_owns_the_token_layout_and_checks_loss_on():
    _, processor = tiny_coma()
    assert processor.loss_on == "answers"
    assert processor.compress_instruction == "Summarize above image and text in a few words."
    assert (processor.query_instruction, processor.document_instruction) == (
        "Find the matching image or text.",
        "Represent the given image or text.",
    )
    for knob in ("loss_on", "compress_instruction", "query_instruction", "document_instruction"):
        assert knob in CoMaProcessor.__doc__
    with pytest.raises(ValueError, match="loss_on"):
        CoMaProcessor(processor.image_processor, processor.tokenizer, num_compression_tokens=4, loss_on="questions")
    with pytest.raises(ValueError, match="loss_on"):
        processor.loss_on = "questions"
    assert processor.loss_on == "answers"


def test_from_backbone_hands_the_layout_settings_to_the_processor():
    model, processor = build_tiny_coma(
        num_compression_tokens=2, loss_on="all_after_compression", query_instruction="Q:", document_instruction="D:"
    )
    assert (processor.loss_on, processor.query_instruction, processor.document_instruction) == (
        "all_after_compression",
        "Q:",
        "D:",
    )
    assert model.config.legacy_processor_settings() == {}


def test_compression_rows_grow_the_embedding_and_are_initialised_explicitly():
    model, processor = tiny_coma()
    vocabulary = len(processor.tokenizer) - model.config.num_compression_tokens
    embeddings = model.get_input_embeddings().weight.detach()
    assert embeddings.shape[0] == len(processor.tokenizer)  # grown by exactly K rows
    rows = embeddings[model.config.compression_token_ids]
    reference = embeddings[:vocabulary]
    assert torch.linalg.matrix_rank(rows) == model.config.num_compression_tokens  # all K rows differ
    typical = reference.norm(dim=-1).mean()
    assert 0.5 * typical < rows.norm(dim=-1).mean() < 2 * typical
    torch.testing.assert_close(rows.mean(dim=0), reference.mean(dim=0), atol=3 * float(reference.std()), rtol=0)


def test_spare_rows_are_never_cut_and_untied_output_rows_get_the_mean():
    """A backbone with more rows than tokens keeps them all; untied output rows of new tokens are the mean row."""
    config = tiny_backbone_config(tie_word_embeddings=False)
    spare = 64
    config.get_text_config().vocab_size += spare
    backbone, parts = build_tiny_backbone(config=config)
    rows = backbone.model.get_input_embeddings().weight.shape[0]
    before = backbone.model.get_input_embeddings().weight.clone()
    vocabulary = len(parts.tokenizer)
    model = CoMaModel.from_backbone(backbone, processor=parts, num_compression_tokens=8)
    assert model.get_input_embeddings().weight.shape[0] == rows  # 8 new ids fit the 64 spare rows
    assert model.config.compression_token_ids == list(range(vocabulary, vocabulary + 8))
    untouched = [index for index in range(rows) if index not in model.config.compression_token_ids]
    assert torch.equal(model.get_input_embeddings().weight[untouched], before[untouched])
    head = model.lm_head.weight
    assert head.data_ptr() != model.get_input_embeddings().weight.data_ptr()
    expected = head[:vocabulary].mean(dim=0)
    for token_id in model.config.compression_token_ids:
        torch.testing.assert_close(head[token_id], expected)


def test_from_backbone_accepts_a_folder(tmp_path):
    """The Hub-id / folder path: a stock checkpoint saved with its processor parts."""
    backbone, parts = build_tiny_backbone(family="qwen2_vl")
    backbone.save_pretrained(tmp_path)
    parts.tokenizer.save_pretrained(tmp_path)
    parts.image_processor.save_pretrained(tmp_path)
    model = CoMaModel.from_backbone(str(tmp_path), num_compression_tokens=4, dtype=torch.float32)
    assert model.config.backbone_config.model_type == "qwen2_vl"
    assert model.processor.compression_token_ids == model.config.compression_token_ids
    embeddings = model.encode_text(["hello"])
    assert embeddings.shape == (1, model.config.hidden_size)


def test_flash_language_model_is_refused():
    model, processor = build_tiny_coma(num_compression_tokens=2)
    model.config.get_text_config()._attn_implementation = "flash_attention_2"
    with pytest.raises(ValueError, match="cannot apply CoMa's compression mask"):
        model(**processor.process_embedding_inputs(["text"]))


def test_forward_without_compression_tokens_is_an_error_naming_the_sample():
    model, processor = tiny_coma()
    batch = processor.process_embedding_inputs(["some text", "more text"])
    ids = batch["input_ids"].clone()
    ids[1, -model.config.num_compression_tokens :] = ids[1, 0]
    ids[1, 0] = processor.tokenizer.pad_token_id
    with pytest.raises(ValueError, match="sample 1"):
        model(**{**batch, "input_ids": ids})


def test_without_compression_tokens_the_embedding_is_the_stock_models_last_token_state():
    """K = 0 is the VLM2Vec-style embedder: causal attention over the input alone, last-token pooling."""
    backbone, parts = build_tiny_backbone(seed=3)
    reference, vocabulary = copy.deepcopy(backbone), len(parts.tokenizer)
    model = CoMaModel.from_backbone(backbone, processor=parts, num_compression_tokens=0).eval()
    assert model.processor.compression_token_ids == [] and len(model.processor.tokenizer) == vocabulary
    inputs = [{"image": random_image(1), "text": "a red circle"}, "just some text", {"image": random_image(2)}]
    batch = model.processor.process_embedding_inputs(inputs)
    with torch.no_grad():
        stock = reference.model(**batch).last_hidden_state[:, -1]  # left padding: every row's last input token
        vectors = model.encode(inputs)
    torch.testing.assert_close(vectors, torch.nn.functional.normalize(stock, dim=-1), atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="K = 0"):
        model.compress(**batch)
