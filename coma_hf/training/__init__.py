"""Training CoMa: stage 1 (compression pre-training, a transformers `Trainer`) and stage 2 (contrastive matching,
sentence-transformers).

- `arguments`: `LoraArguments` (what a stage trains), `BackboneArguments` (how a fresh model is built);
- `peft`: `apply_lora`, `merge_lora` (the paper's LoRA, or all weights), `shards_parameters`, `check_sharding`;
- `recipes`: `build_coma` and the presets of `examples/configs/` (`recipe_of_start`, `choose_recipe`,
  `recipe_defaults`, `parse_with_recipe`, `check_precision`);
- `collators`: `CoMaCompressionCollator` (stage 1), `CoMaContrastiveCollator` (stage 2);
- `trainers`: `CoMaCompressionTrainer`, `CoMaContrastiveTrainer` (both end with `save_merged`), `NonFiniteLossError`,
  `last_complete_checkpoint`, `describe_batch_sizes`;
- `losses`: `CoMaContrastiveLoss` (stage 2);
- `distillation`: stage 1's `OBJECTIVES` (ce, kl, ce+kl), `frozen_teacher`, `teacher_inputs`, `align_answer_states`,
  `forward_kl` (trl's chunked divergence, imported only when a KL objective runs).
"""

from .arguments import BackboneArguments, LoraArguments
from .collators import CoMaCompressionCollator, CoMaContrastiveCollator
from .distillation import (
    OBJECTIVES,
    align_answer_states,
    answer_kl_sum,
    check_objective,
    forward_kl,
    frozen_teacher,
    teacher_inputs,
    uses_teacher,
)
from .losses import CoMaContrastiveLoss
from .peft import LANGUAGE_MODEL_ATTENTION, apply_lora, check_sharding, merge_lora, shards_parameters
from .recipes import (
    RECIPES,
    build_coma,
    check_precision,
    choose_recipe,
    parse_with_recipe,
    recipe_defaults,
    recipe_of_start,
    weights_fingerprint,
)
from .trainers import (
    CoMaCompressionTrainer,
    CoMaContrastiveTrainer,
    NonFiniteLossError,
    describe_batch_sizes,
    last_complete_checkpoint,
)

__all__ = [
    "LANGUAGE_MODEL_ATTENTION",
    "OBJECTIVES",
    "RECIPES",
    "BackboneArguments",
    "CoMaCompressionCollator",
    "CoMaCompressionTrainer",
    "CoMaContrastiveCollator",
    "CoMaContrastiveLoss",
    "CoMaContrastiveTrainer",
    "LoraArguments",
    "NonFiniteLossError",
    "align_answer_states",
    "answer_kl_sum",
    "apply_lora",
    "build_coma",
    "weights_fingerprint",
    "check_precision",
    "check_sharding",
    "choose_recipe",
    "describe_batch_sizes",
    "last_complete_checkpoint",
    "merge_lora",
    "parse_with_recipe",
    "recipe_defaults",
    "recipe_of_start",
    "shards_parameters",
    "check_objective",
    "forward_kl",
    "frozen_teacher",
    "teacher_inputs",
    "uses_teacher",
]
