"""Everything about the authors' release (GitHub `Trustworthy-Information-Access/CoMa`) in one place, so that the rest
of the package asks for a setting and this package provides the release's value:

- `converter`: their checkpoints (a merged model or a DoRA adapter) converted into coma_hf checkpoints with exact
  vectors (`convert_released_checkpoint`);
- `evaluation`: how their evaluation renders MMEB-V2 rows, as processor-config data (`RELEASED_PROCESSOR_SETTINGS`);
- `recipe`: what their training scripts run where they differ from the paper (`RELEASED_RECIPE`,
  `RELEASED_CHUNK_SIZE`) and `processor_for_training` (a converted checkpoint rendering as CoMa trains).
"""

from .converter import (
    RELEASED_CONFIG,
    RELEASED_TOKEN_FORMAT,
    ReleasedCompressionTokens,
    convert_released_checkpoint,
    current_adapter_key,
    current_key,
    load_released_backbone,
    local_folder,
    merge_released_adapter,
    released_compression_tokens,
)
from .evaluation import RELEASED_EMBEDDING_LAYOUT, RELEASED_LAYOUTS, RELEASED_PROCESSOR_SETTINGS
from .recipe import (
    COMPATIBILITY,
    RELEASED_CHUNK_SIZE,
    RELEASED_RECIPE,
    TRAINING_DEFAULT_SETTINGS,
    TRAINING_RECIPE_SETTINGS,
    processor_for_training,
    rendering_settings,
    renders_release_evaluation,
)

__all__ = [
    "COMPATIBILITY",
    "RELEASED_CHUNK_SIZE",
    "RELEASED_CONFIG",
    "RELEASED_EMBEDDING_LAYOUT",
    "RELEASED_LAYOUTS",
    "RELEASED_PROCESSOR_SETTINGS",
    "RELEASED_RECIPE",
    "RELEASED_TOKEN_FORMAT",
    "TRAINING_DEFAULT_SETTINGS",
    "TRAINING_RECIPE_SETTINGS",
    "ReleasedCompressionTokens",
    "convert_released_checkpoint",
    "current_adapter_key",
    "current_key",
    "load_released_backbone",
    "local_folder",
    "merge_released_adapter",
    "processor_for_training",
    "released_compression_tokens",
    "renders_release_evaluation",
    "rendering_settings",
]
