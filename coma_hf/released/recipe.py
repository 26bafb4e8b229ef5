"""What the authors' released training scripts run where they differ from the paper, as values the rest of the package
asks for: the recipe's name (its presets are `examples/configs/*_released.json`), stage 2's batching chunk, and how a
checkpoint converted from the release (which renders as their evaluation) is made to render as CoMa trains.
"""

from __future__ import annotations

import inspect
from typing import Any

from ..processing_coma import CoMaProcessor
from .evaluation import RELEASED_PROCESSOR_SETTINGS

# How an option's declaration says it is there for the release, not for the method (with the method's value after it).
COMPATIBILITY = "compatibility with the authors' release"
RELEASED_RECIPE = "released"  # the name of their recipe among `coma_hf.training.recipes.RECIPES`
RELEASED_CHUNK_SIZE = 64  # the released stage-2 script's `--interleave_batch_size 64`: rows per single-dataset chunk
# The processor settings training takes from `CoMaProcessor`'s defaults rather than from a converted release (which
# records their evaluation's), and those it takes from the recipe; `rendering_settings` reports all of them.
TRAINING_DEFAULT_SETTINGS = (
    "embedding_layout",
    "enlarge_images_below",
    "enlarged_image_size",
    "apply_exif_orientation",
)
TRAINING_RECIPE_SETTINGS = ("min_image_tokens", "max_image_tokens", "max_length")


def renders_release_evaluation(processor: CoMaProcessor) -> bool:
    """Whether `processor` renders its plain inputs as the release's evaluation (a converted checkpoint's)."""
    return processor.embedding_layout == RELEASED_PROCESSOR_SETTINGS["embedding_layout"]


def processor_for_training(
    processor: CoMaProcessor,
    min_image_tokens: int | None = None,
    max_image_tokens: int | None = None,
    max_length: int | None = None,
) -> CoMaProcessor | None:
    """The processor to train with when `processor` renders as the release's evaluation (else `None`: train with it as
    it is): a copy with `TRAINING_DEFAULT_SETTINGS` at `CoMaProcessor`'s defaults (the parts-mode `embedding_layout`,
    so an MMEB-train row renders as in any CoMa run; no tiny-image enlargement; files read upright) and the recipe's
    `min_image_tokens` / `max_image_tokens` (`None`: the image processor's current bounds, i.e. the evaluation's) and
    `max_length`. The named `layouts` are kept: only inputs that name one use them."""
    if not renders_release_evaluation(processor):
        return None
    parameters = inspect.signature(CoMaProcessor.__init__).parameters
    defaults = {name: parameters[name].default for name in TRAINING_DEFAULT_SETTINGS}
    recipe = {"min_image_tokens": min_image_tokens, "max_image_tokens": max_image_tokens, "max_length": max_length}
    return processor.with_settings(**defaults, **recipe)


def rendering_settings(processor: CoMaProcessor) -> dict[str, Any]:
    """The settings `processor_for_training` decides, as `processor` has them (for a run's summary and log)."""
    return {name: getattr(processor, name) for name in (*TRAINING_DEFAULT_SETTINGS, *TRAINING_RECIPE_SETTINGS)}
