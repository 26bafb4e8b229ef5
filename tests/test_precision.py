"""bfloat16 and float16 vectors agree with float32 ones (the shipped reader-based tiny model, on the CPU).

The bound is per row: cosine ≥ 0.999 for images, texts and image + text, encoded in one padded batch. The vectors
come back unit-norm float32 in every dtype (`CoMaModel.pool` normalises in float32).
"""

from __future__ import annotations

import copy
import functools

import pytest
import torch
import torch.nn.functional as F

from coma_hf import CoMaModel
from coma_hf.tiny import build_tiny_coma

from utils import random_image

INSTRUCTION = "Find the matching image"
TEXTS = ("a red circle left of a blue square", "what colour is the triangle?", "a green star above two squares")
HALF_DTYPES = (torch.bfloat16, torch.float16)


@functools.cache
def _reader_model() -> CoMaModel:
    torch.manual_seed(0)
    return build_tiny_coma(reader=True)[0]


def _inputs() -> dict[str, list]:
    images = [random_image(seed, size) for seed, size in ((1, (84, 112)), (2, (112, 56)), (3, (140, 140)))]
    return {
        "image": [{"image": image} for image in images],
        "text": list(TEXTS),
        "image+text": [{"image": image, "text": text} for image, text in zip(images, TEXTS, strict=True)],
    }


def _encode_by_kind(model: CoMaModel) -> dict[str, torch.Tensor]:
    """Each kind's vectors, all nine inputs encoded in one left-padded batch."""
    inputs = _inputs()
    mixed = [item for kind in inputs.values() for item in kind]
    vectors = model.encode(mixed, instruction=INSTRUCTION, batch_size=len(mixed))
    return dict(zip(inputs, vectors.split([len(kind) for kind in inputs.values()]), strict=True))


@pytest.fixture(scope="module")
def float32_vectors() -> dict[str, torch.Tensor]:
    return _encode_by_kind(_reader_model())


@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=str)
def test_half_precision_vectors_agree_with_float32(dtype, float32_vectors):
    model = copy.deepcopy(_reader_model()).to(dtype)
    assert model.dtype == dtype
    for kind, vectors in _encode_by_kind(model).items():
        reference = float32_vectors[kind]
        assert vectors.dtype == torch.float32 and vectors.shape == reference.shape
        torch.testing.assert_close(vectors.norm(dim=-1), torch.ones(len(vectors)), atol=1e-5, rtol=0)
        cosines = F.cosine_similarity(vectors, reference, dim=-1)
        assert bool((cosines >= 0.999).all()), f"{dtype} {kind}: cosines {cosines.tolist()}"


def test_pooler_output_is_float32_and_unit_norm_in_bfloat16():
    model = copy.deepcopy(_reader_model()).to(torch.bfloat16)
    batch = model.processor.process_embedding_inputs(list(TEXTS), instruction=INSTRUCTION)
    with torch.no_grad():
        output = model(**batch)
    assert output.compression_states.dtype == torch.bfloat16  # the backbone ran in bfloat16
    assert output.pooler_output.dtype == torch.float32
    torch.testing.assert_close(output.pooler_output.norm(dim=-1), torch.ones(len(TEXTS)), atol=1e-6, rtol=0)


def test_checkpoint_loads_in_bfloat16_and_agrees(tmp_path, float32_vectors):
    """`from_pretrained(dtype=...)` reaches the backbone's text and vision models, although the saved backbone
    config records float32 for them (transformers passes the dtype one sub-config deep only)."""
    _reader_model().save_pretrained(tmp_path)
    model = CoMaModel.from_pretrained(tmp_path, dtype=torch.bfloat16).eval()
    assert {parameter.dtype for parameter in model.parameters()} == {torch.bfloat16}
    text = model.encode_text(list(TEXTS), instruction=INSTRUCTION)
    cosines = F.cosine_similarity(text, float32_vectors["text"], dim=-1)
    assert bool((cosines >= 0.999).all()), cosines.tolist()
