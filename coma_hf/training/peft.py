"""What a stage updates: peft LoRA (the paper's recipe) or all weights, and which runs shard their parameters.

The paper (stage 1): LoRA r=16, alpha=64, dropout 0.1 on the language model's q/k/v/o projections (DoRA in the
released code), the compression-token embedding rows trained, the vision tower frozen; after the stage the LoRA is
merged into the weights. `apply_lora` builds exactly that with peft; `merge_lora` folds it back into a plain
`CoMaModel`. The released code differs: DoRA with Gaussian-initialised A matrices and the whole input embedding matrix
trained (`modules_to_save`), which a tied LM head shares; peft's `ensure_weight_tying` keeps that tie through training
and merging.
"""

from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .arguments import LoraArguments

logger = logging.getLogger(__name__)

# A regex, not a name list: on Qwen2.5-VL the names q/k/v/o-like also occur in the vision tower's MLP.
LANGUAGE_MODEL_ATTENTION = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj)"
# How LoRA's A matrices start (B starts at zero either way), as peft's `init_lora_weights` takes it: peft's default
# (Kaiming-uniform) or a Gaussian of std 1/r (the released code's).
LORA_INITS = {"default": True, "gaussian": "gaussian"}
# Stage 2 saves through sentence-transformers, which does not gather sharded weights.
NO_SHARDED_STAGE2 = (
    "Stage 2 does not support parameter sharding (FSDP, ZeRO-3) yet: use the DDP or DeepSpeed ZeRO-2 config "
    "(examples/configs)."
)


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
        init_lora_weights=LORA_INITS[arguments.lora_init],
        **_embedding_training(model, arguments),
    )
    peft_model = get_peft_model(model, config)
    trainable, total = peft_model.get_nb_trainable_parameters()
    logger.info("LoRA: %d of %d parameters trainable (%.3f%%)", trainable, total, 100 * trainable / total)
    return peft_model


def input_embeddings_tied(model) -> bool:
    """Whether the LM head shares the input embedding matrix (Qwen2.5-VL-3B and the embedded backbone do; 7B does
    not)."""
    output = model.get_output_embeddings()
    return output is not None and output.weight is model.get_input_embeddings().weight


def _embedding_training(model, arguments: LoraArguments) -> dict:
    """The `LoraConfig` entries that make embedding rows trainable: the whole input matrix (`modules_to_save`, with
    `ensure_weight_tying` so that a tied LM head follows the trained copy instead of keeping the frozen one), or only
    the K compression rows (`trainable_token_indices`), or none."""
    if arguments.train_input_embeddings:
        return {"modules_to_save": ["embed_tokens"], "ensure_weight_tying": input_embeddings_tied(model)}
    if arguments.train_compression_embeddings:
        return {"trainable_token_indices": {"embed_tokens": list(model.config.compression_token_ids)}}
    return {}


def merge_lora(model):
    """A plain `CoMaModel` with any LoRA merged into its weights, and trained embedding rows or a trained embedding
    matrix (with a tied LM head, still tied) put in place."""
    if hasattr(model, "merge_and_unload"):
        return model.merge_and_unload()
    return model


def shards_parameters(training_args) -> bool:
    """Whether this run shards the parameters across processes (FSDP, DeepSpeed ZeRO-3), from the arguments or from
    what `accelerate launch` put in the environment. Such a run has no full weights in any one process until
    Trainer gathers them for saving."""
    from transformers.integrations import is_deepspeed_zero3_enabled

    fsdp_from_launcher = os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true"
    return bool(training_args.fsdp) or fsdp_from_launcher or is_deepspeed_zero3_enabled()


def check_sharding(training_args, lora: LoraArguments, stage: str) -> None:
    """Stop before training what could not be saved: a LoRA cannot be merged into sharded weights, and stage 2
    saves through sentence-transformers, which does not gather sharded weights. DDP and ZeRO-2 keep full weights."""
    if not shards_parameters(training_args):
        return
    if lora.use_lora:
        raise SystemExit(
            "LoRA runs are merged before saving, which needs full weights in one process: use the DDP "
            "or DeepSpeed ZeRO-2 config (examples/configs), or --use_lora false with FSDP / ZeRO-3."
        )
    if stage == "stage2":
        raise SystemExit(NO_SHARDED_STAGE2)
