"""What a training stage updates: peft LoRA (the paper's recipe) or all weights (the `tiny` recipe).

The paper (stage 1): LoRA r=16, alpha=64, dropout 0.1 on the language model's q/k/v/o projections (DoRA in the
released code), the compression-token embedding rows trained, the vision tower frozen; after the stage the LoRA is
merged into the weights. `apply_lora` builds exactly that with peft; `merge_lora` folds it back into a plain
`CoMaModel`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

logger = logging.getLogger(__name__)

# A regex, not a name list: on Qwen2.5-VL the names q/k/v/o-like also occur in the vision tower's MLP.
LANGUAGE_MODEL_ATTENTION = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj)"


@dataclass
class LoraArguments:
    """Which weights a stage trains."""

    use_lora: bool = field(default=False, metadata={"help": "Train a peft LoRA instead of all weights."})
    lora_r: int = field(default=16, metadata={"help": "LoRA rank."})
    lora_alpha: int = field(default=64, metadata={"help": "LoRA alpha."})
    lora_dropout: float = field(default=0.1, metadata={"help": "LoRA dropout."})
    lora_target_modules: str = field(default=LANGUAGE_MODEL_ATTENTION, metadata={"help": "Regex of LoRA targets."})
    use_dora: bool = field(default=False, metadata={"help": "DoRA (weight-decomposed LoRA), as the released code."})
    train_compression_embeddings: bool = field(
        default=True, metadata={"help": "With LoRA, also train the K compression-token embedding rows."}
    )
    freeze_vision_tower: bool = field(default=False, metadata={"help": "Without LoRA, keep the vision tower fixed."})


def apply_lora(model, arguments: LoraArguments):
    """Wrap `model` for training as `arguments` say; returns the model to train (a `PeftModel` with LoRA)."""
    if not arguments.use_lora:
        if arguments.freeze_vision_tower:
            model.model.visual.requires_grad_(False)
        return model
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=arguments.lora_r,
        lora_alpha=arguments.lora_alpha,
        lora_dropout=arguments.lora_dropout,
        target_modules=arguments.lora_target_modules,
        use_dora=arguments.use_dora,
        trainable_token_indices=(
            {"embed_tokens": list(model.config.compression_token_ids)} if arguments.train_compression_embeddings else None
        ),
    )
    peft_model = get_peft_model(model, config)
    trainable, total = peft_model.get_nb_trainable_parameters()
    logger.info("LoRA: %d of %d parameters trainable (%.3f%%)", trainable, total, 100 * trainable / total)
    return peft_model


def merge_lora(model):
    """A plain `CoMaModel` with any LoRA (and trainable-token rows) merged into its weights."""
    if hasattr(model, "merge_and_unload"):
        return model.merge_and_unload()
    return model
