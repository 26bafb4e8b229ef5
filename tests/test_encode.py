"""The encode API: unit-norm `[N, dim]` tensors, input order kept, strings read as the API says."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from coma_hf import CoMaInputError

from utils import random_image, tiny_coma


def test_encode_text_and_images_return_unit_norm_rows():
    model, _ = tiny_coma()
    texts = model.encode_text(["a red circle", "two blue squares", "a green star"])
    images = model.encode_images([random_image(0), random_image(1, (56, 140))])
    assert texts.shape == (3, model.config.embedding_size) and images.shape == (2, model.config.embedding_size)
    assert texts.dtype == torch.float32 and texts.device.type == "cpu"
    torch.testing.assert_close(torch.cat([texts, images]).norm(dim=-1), torch.ones(5))
    assert not torch.allclose(texts[0], texts[1])


def test_encode_keeps_order_of_mixed_lists_across_batches():
    model, _ = tiny_coma()
    image_a, image_b = random_image(0), random_image(1, (140, 56))
    mixed = ["first text", image_a, {"image": image_b, "text": "with caption"}, "second text", image_b]
    together = model.encode(mixed, batch_size=2)
    one_by_one = torch.cat([model.encode([item]) for item in mixed])
    torch.testing.assert_close(together, one_by_one, atol=1e-5, rtol=1e-5)
    reversed_order = model.encode(mixed[::-1], batch_size=3)
    torch.testing.assert_close(reversed_order, together.flip(0), atol=1e-5, rtol=1e-5)


def test_strings_are_text_except_in_image_apis(tmp_path):
    model, _ = tiny_coma()
    path = tmp_path / "picture.png"
    random_image(3).save(path)
    as_image = model.encode_images([str(path)])
    torch.testing.assert_close(as_image, model.encode_images([random_image(3)]))
    torch.testing.assert_close(as_image, model.encode([{"image": str(path)}]))
    as_text = model.encode([str(path)])
    assert not torch.allclose(as_image, as_text)
    with pytest.raises(CoMaInputError, match="image file not found"):
        model.encode_images([str(tmp_path / "missing.png")])
    with pytest.raises(CoMaInputError, match="sample 1, field 'text'"):
        model.encode_text(["fine", random_image(0)])


def _hand_embedding(model, processor, ids, image=None):
    """Mean of the final states at the last K positions of hand-built `ids`, L2-normalised (CoMa's mean pooling)."""
    inputs = {"input_ids": torch.tensor([ids])}
    if image is not None:
        features = processor.image_processor(images=[image], return_tensors="pt")
        inputs.update(pixel_values=features["pixel_values"], image_grid_thw=features["image_grid_thw"])
    with torch.no_grad():
        hidden = model.backbone_hidden_states(**inputs)
    return F.normalize(hidden[0, -model.config.num_compression_tokens :].mean(0), dim=-1)


def test_query_and_document_use_the_configured_instructions():
    """The expected token sequences are built by hand: `{instruction}\\n{text}<cmp_0>…` for a text,
    `<|vision_start|><|image_pad|>…<|vision_end|>{instruction}<cmp_0>…` for an image alone."""
    model, processor = tiny_coma()
    tokenizer, image = processor.tokenizer, random_image(0)

    def tokens(text):
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    compression = tokenizer.convert_tokens_to_ids([f"<cmp_{i}>" for i in range(model.config.num_compression_tokens)])
    grid = processor.image_processor(images=[image], return_tensors="pt")["image_grid_thw"]
    vision = tokenizer.convert_tokens_to_ids(
        ["<|vision_start|>"]
        + ["<|image_pad|>"] * (int(grid.prod()) // processor.image_processor.merge_size**2)
        + ["<|vision_end|>"]
    )

    def expected(instruction):
        return torch.stack(
            [
                _hand_embedding(model, processor, tokens(f"{instruction}\na red circle") + compression),
                _hand_embedding(model, processor, vision + tokens(instruction) + compression, image),
            ]
        )

    inputs = ["a red circle", image]
    saved = processor.query_instruction, processor.document_instruction
    try:  # instructions of our own: a hard-coded default would not pass
        processor.query_instruction, processor.document_instruction = "Search for this:", "Index this:"
        query, document = model.encode_query(inputs), model.encode_document(inputs)
    finally:
        processor.query_instruction, processor.document_instruction = saved
    torch.testing.assert_close(query, expected("Search for this:"), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(document, expected("Index this:"), atol=1e-5, rtol=1e-5)
    plain = torch.stack(
        [
            _hand_embedding(model, processor, tokens("a red circle") + compression),
            _hand_embedding(model, processor, vision + compression, image),
        ]
    )
    torch.testing.assert_close(model.encode(inputs), plain, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(query, document, atol=1e-3) and not torch.allclose(query, plain, atol=1e-3)


def test_empty_input_gives_empty_tensor():
    model, _ = tiny_coma()
    assert model.encode([]).shape == (0, model.config.embedding_size)


def test_pooling_and_embedding_dim_settings():
    model, processor = tiny_coma()
    batch = processor.process_embedding_inputs(["a red circle", random_image(0)])
    with torch.no_grad():
        states = model(**batch).compression_states
    try:
        model.config.pooling = "last"
        model.config.embedding_dim = 16
        with torch.no_grad():
            pooled = model(**batch).pooler_output
    finally:
        model.config.pooling, model.config.embedding_dim = "mean", None
    torch.testing.assert_close(pooled, torch.nn.functional.normalize(states[:, -1, :16], dim=-1))
