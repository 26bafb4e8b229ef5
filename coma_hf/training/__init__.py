"""Training CoMa: stage 1 (compression pre-training, a transformers `Trainer`) and stage 2 (contrastive matching,
sentence-transformers).

- `arguments`: `LoraArguments` (what a stage trains), `BackboneArguments` (how a fresh model is built),
  `BatchArguments` (the global batch a recipe states), `DataSourceArguments` (the data flags both scripts share);
- `peft`: `apply_lora`, `merge_lora` (the paper's LoRA, the released DoRA with the embedding matrix, or all weights),
  `input_embeddings_tied`, `shards_parameters`, `check_sharding`;
- `building`: `build_coma` (a fresh model: the embedded tiny backbone or a named one), `weights_fingerprint`;
- `recipes`: which preset of `examples/configs/` a run takes (`RECIPES`, `recipe_of_start`, `choose_recipe`);
- `presets`: the scripts' parsing over it (`recipe_defaults`, `parse_with_recipe`, `check_precision`);
- `batching`: the global batch's split over processes (`derive_batch_sizes`, `plan_batch`, `BatchPlan`,
  `explicit_batch_flags`);
- `collators`: `CoMaCompressionCollator` (stage 1), `CoMaContrastiveCollator` (stage 2);
- `samplers`: `UniformChunkBatchSampler`, `chunked_batch_sampler` (stage 2's released batching);
- `trainers`: `CoMaCompressionTrainer`, `CoMaContrastiveTrainer` (both end with `save_merged`), `NonFiniteLossError`,
  `last_complete_checkpoint`, `describe_batch_sizes`, `pooling_as`; saving under FSDP2 (`unsharded_class`,
  `restored_class`, `share_tied_weights`) and the dtype a sharded run's checkpoint is loaded back in (`reload_dtype`);
- `losses`: stage 1's `LOSS_NORMALIZATIONS` (`per_sample_token_means`, `labelled_rows`), `CoMaContrastiveLoss`
  (stage 2);
- `distillation`: stage 1's `OBJECTIVES` (ce, kl, ce+kl), `frozen_teacher`, `teacher_inputs`, `align_answer_states`,
  `forward_kl` (trl's chunked divergence, imported only when a KL objective runs).

The package exports what the scripts and users call; the helpers are imported from their modules.
"""

from .arguments import BackboneArguments, BatchArguments, DataSourceArguments, LoraArguments
from .batching import derive_batch_sizes, explicit_batch_flags, plan_batch
from .building import build_coma, weights_fingerprint
from .collators import CoMaCompressionCollator, CoMaContrastiveCollator
from .distillation import (
    OBJECTIVES,
    frozen_teacher,
    uses_teacher,
)
from .losses import (
    LOSS_NORMALIZATIONS,
    CoMaContrastiveLoss,
    per_sample_token_means,
)
from .peft import (
    apply_lora,
    check_sharding,
    merge_lora,
)
from .presets import parse_with_recipe, recipe_defaults
from .recipes import RECIPES, recipe_of_start
from .samplers import UniformChunkBatchSampler, chunked_batch_sampler
from .trainers import (
    CoMaCompressionTrainer,
    CoMaContrastiveTrainer,
    KeepBestCheckpoint,
    NonFiniteLossError,
    last_complete_checkpoint,
    pooling_as,
)

__all__ = [
    "LOSS_NORMALIZATIONS",
    "OBJECTIVES",
    "RECIPES",
    "BackboneArguments",
    "BatchArguments",
    "DataSourceArguments",
    "UniformChunkBatchSampler",
    "chunked_batch_sampler",
    "derive_batch_sizes",
    "explicit_batch_flags",
    "per_sample_token_means",
    "plan_batch",
    "pooling_as",
    "CoMaCompressionCollator",
    "CoMaCompressionTrainer",
    "CoMaContrastiveCollator",
    "CoMaContrastiveLoss",
    "CoMaContrastiveTrainer",
    "KeepBestCheckpoint",
    "LoraArguments",
    "NonFiniteLossError",
    "apply_lora",
    "build_coma",
    "weights_fingerprint",
    "check_sharding",
    "last_complete_checkpoint",
    "merge_lora",
    "parse_with_recipe",
    "recipe_defaults",
    "recipe_of_start",
    "frozen_teacher",
    "uses_teacher",
]
