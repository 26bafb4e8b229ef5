"""Test helpers: tiny backbones built offline (seconds, CPU), deterministic images, the example scripts as modules."""

from __future__ import annotations

import functools

import numpy as np
import torch
from PIL import Image

from coma_hf.tiny import build_tiny_coma

FAMILIES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")
# The files `save_pretrained` copies into every checkpoint: what `trust_remote_code=True` runs.
REMOTE_CODE_FILES = frozenset(
    {
        "modeling_coma.py",
        "configuration_coma.py",
        "processing_coma.py",
        "inputs.py",
        "saving.py",
        "masking.py",
        "backbones.py",
        "sentence_transformers_files.py",
        "vision_attention.py",
    }
)


@functools.cache
def _tiny(family: str, attn_implementation: str, num_compression_tokens: int):
    torch.manual_seed(0)
    return build_tiny_coma(
        family, num_compression_tokens=num_compression_tokens, attn_implementation=attn_implementation
    )


def tiny_coma(family: str = "qwen2_5_vl", attn_implementation: str = "sdpa", num_compression_tokens: int = 4):
    """A cached (model, processor) pair in float32 eval mode; tests must not modify the model in place."""
    model, processor = _tiny(family, attn_implementation, num_compression_tokens)
    return model.eval(), processor


def random_image(seed: int = 0, size: tuple[int, int] = (84, 112)) -> Image.Image:
    """A deterministic RGB noise image of `size` (width, height)."""
    pixels = np.random.RandomState(seed).randint(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    return Image.fromarray(pixels, "RGB")


@functools.cache
def _tiny_sentence_transformer(family: str, num_compression_tokens: int, folder: str):
    from sentence_transformers import SentenceTransformer

    model, _ = _tiny(family, "sdpa", num_compression_tokens)
    model.save_pretrained(folder)
    return SentenceTransformer(folder, trust_remote_code=True, device="cpu")


def tiny_sentence_transformer(tmp_path_factory, family: str = "qwen2_5_vl", num_compression_tokens: int = 4):
    """A SentenceTransformer over a saved tiny CoMa checkpoint (cached per session; copy it before training)."""
    folder = tmp_path_factory.getbasetemp() / f"st-{family}-{num_compression_tokens}"
    return _tiny_sentence_transformer(family, num_compression_tokens, str(folder))


def load_example(name: str):
    """The module of `examples/{name}.py`, imported fresh."""
    import importlib.util
    import sys
    from pathlib import Path

    spec = importlib.util.spec_from_file_location(
        f"{name}_script", Path(__file__).parents[1] / "examples" / f"{name}.py"
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve their annotations through sys.modules
    spec.loader.exec_module(module)
    return module
