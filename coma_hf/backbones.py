"""The per-family differences between supported backbone MLLMs, behind one small seam.

CoMa wraps the *base* model of a stock transformers MLLM (vision tower + language model, no LM head) and keeps an
LM head beside it, exactly as the stock `...ForConditionalGeneration` class does, so that a CoMa checkpoint's
backbone weights carry the stock key names (`model.visual.*`, `model.language_model.*`, `lm_head.weight`).

Everything the rest of the package needs to know about a family lives in one `BackboneFamily` record; adding a
family means adding one record here (and, for the embedded default, one tiny config in `tiny.py`).

This file is part of the remote code shipped with every checkpoint: it imports only torch and transformers.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
import transformers


@dataclass(frozen=True)
class BackboneFamily:
    """What differs between supported MLLM families.

    Attributes:
        model_type: `config.model_type` of the stock MLLM, e.g. `"qwen2_5_vl"`.
        base_model_class_name: the transformers class holding vision tower + language model (no LM head).
        generation_class_name: the stock class with an LM head, whose weight names CoMa checkpoints keep.
        patch_size: side in pixels of one vision-encoder patch.
        spatial_merge_size: patches merged per side into one language-model token.
    """

    model_type: str
    base_model_class_name: str
    generation_class_name: str
    patch_size: int
    spatial_merge_size: int = 2

    @property
    def pixels_per_token(self) -> int:
        """Side in pixels of one visual token seen by the language model (28 for Qwen2/2.5-VL, 32 for Qwen3-VL)."""
        return pixels_per_token(self.patch_size, self.spatial_merge_size)

    @property
    def base_model_class(self) -> type:
        return getattr(transformers, self.base_model_class_name)

    @property
    def generation_class(self) -> type:
        return getattr(transformers, self.generation_class_name)


def pixels_per_token(patch_size: int, merge_size: int) -> int:
    """Side in pixels of one visual token the language model sees: `merge_size` patches of `patch_size` per side."""
    return patch_size * merge_size


FAMILIES: dict[str, BackboneFamily] = {
    family.model_type: family
    for family in (
        BackboneFamily("qwen2_vl", "Qwen2VLModel", "Qwen2VLForConditionalGeneration", patch_size=14),
        BackboneFamily("qwen2_5_vl", "Qwen2_5_VLModel", "Qwen2_5_VLForConditionalGeneration", patch_size=14),
        BackboneFamily("qwen3_vl", "Qwen3VLModel", "Qwen3VLForConditionalGeneration", patch_size=16),
    )
}


def get_family(model_type: str) -> BackboneFamily:
    """The family record for a backbone `model_type`; an error listing the supported families otherwise."""
    try:
        return FAMILIES[model_type]
    except KeyError:
        raise ValueError(
            f"Unsupported backbone type {model_type!r}. CoMa supports these families: {', '.join(sorted(FAMILIES))}."
        ) from None


def language_model(base_model: torch.nn.Module) -> torch.nn.Module:
    """The text decoder inside a family's base model (same attribute name in every supported family)."""
    return base_model.language_model


def cache_argument_name(module: torch.nn.Module) -> str:
    """Name of the KV-cache argument of `module.forward`.

    transformers renamed `past_key_values` to `cache` in 5.2x; we support both so checkpoints run on either.
    """
    parameters = inspect.signature(module.forward).parameters
    return "cache" if "cache" in parameters else "past_key_values"


def output_cache(output) -> object:
    """The KV cache of a base-model output, under either name."""
    cache = getattr(output, "cache", None)
    return cache if cache is not None else getattr(output, "past_key_values", None)


def image_processor_class() -> type:
    """The Qwen2-VL image processor that needs no torchvision (all supported families share it)."""
    try:  # transformers ≥ 5.17 names the PIL implementation; the plain name may need torchvision
        return transformers.Qwen2VLImageProcessorPil
    except AttributeError:
        return transformers.Qwen2VLImageProcessor
