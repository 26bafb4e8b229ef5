"""The encode API: unit-norm `[N, dim]` tensors, input order kept, strings read as the API says."""

from __future__ import annotations

import pytest
import torch

from coma_hf import CoMaInputError
from conftest import random_image, tiny_coma


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


def test_query_and_document_use_the_configured_instructions():
    model, _ = tiny_coma()
    inputs = ["a red circle", random_image(0)]
    query = model.encode_query(inputs)
    torch.testing.assert_close(query, model.encode(inputs, instruction=model.config.query_instruction))
    document = model.encode_document(inputs)
    torch.testing.assert_close(document, model.encode(inputs, instruction=model.config.document_instruction))
    assert not torch.allclose(query, document)
    assert not torch.allclose(query, model.encode(inputs))


def test_empty_input_gives_empty_tensor():
    model, _ = tiny_coma()
    assert model.encode([]).shape == (0, model.config.embedding_size)


def test_pooling_and_embedding_dim_settings():
    model, processor = tiny_coma()
    batch = processor.process_for_embedding(["a red circle", random_image(0)])
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
