"""The argument dataclasses the training scripts share: what a stage trains (`LoraArguments`), how a fresh CoMa
model is built (`BackboneArguments`) and the global batch a recipe states (`BatchArguments`)."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..cli import DEFAULT_SYNTHETIC
from ..released.recipe import COMPATIBILITY
from .peft import LANGUAGE_MODEL_ATTENTION, LORA_INITS

TINY_INITS = ("reader", "random")  # the embedded backbone's weights: the shipped pre-trained reader, or random


@dataclass
class LoraArguments:
    """Which weights a stage trains."""

    use_lora: bool = field(default=False, metadata={"help": "Train a peft LoRA instead of all weights."})
    lora_r: int = field(default=16, metadata={"help": "LoRA rank."})
    lora_alpha: int = field(default=64, metadata={"help": "LoRA alpha."})
    lora_dropout: float = field(default=0.1, metadata={"help": "LoRA dropout."})
    lora_target_modules: str = field(default=LANGUAGE_MODEL_ATTENTION, metadata={"help": "Regex of LoRA targets."})
    use_dora: bool = field(
        default=False,
        metadata={"help": f"DoRA (weight-decomposed LoRA): {COMPATIBILITY}; the method's value is false (LoRA)."},
    )
    lora_init: str = field(
        default="default",
        metadata={
            "help": "How LoRA's A matrices start: 'default' (peft's Kaiming-uniform) or 'gaussian'; B starts at "
            f"zero either way. 'gaussian': {COMPATIBILITY}; the method's value is 'default'.",
            "choices": tuple(LORA_INITS),
        },
    )
    train_compression_embeddings: bool = field(
        default=True, metadata={"help": "With LoRA, also train the K compression-token embedding rows."}
    )
    train_input_embeddings: bool = field(
        default=False,
        metadata={
            "help": "With LoRA, train the whole input embedding matrix (peft modules_to_save); a tied LM head stays "
            f"tied to it. {COMPATIBILITY}; the method's value is false (only the compression rows)."
        },
    )
    freeze_vision_tower: bool = field(default=False, metadata={"help": "Without LoRA, keep the vision tower fixed."})


@dataclass
class BackboneArguments:
    """How a fresh CoMa model is built: K, image and sequence bounds, and the embedded tiny backbone's weights and
    size."""

    num_compression_tokens: int = field(default=32, metadata={"help": "K, the number of compression tokens."})
    min_image_tokens: int | None = field(default=None, metadata={"help": "Fewest visual tokens per image."})
    max_image_tokens: int | None = field(default=None, metadata={"help": "Most visual tokens per image."})
    max_length: int | None = field(default=2048, metadata={"help": "Longest sequence in tokens."})
    family: str = field(default="qwen2_5_vl", metadata={"help": "Family of the embedded backbone."})
    tiny_init: str = field(
        default="reader",
        metadata={
            "help": "Weights of the embedded backbone: 'reader' (the shipped pre-trained reader, whose size it "
            "fixes; the tiny_* sizes do not apply) or 'random' (random weights of the tiny_* sizes).",
            "choices": TINY_INITS,
        },
    )
    tiny_hidden_size: int = field(default=64, metadata={"help": "Width of the embedded backbone's language model."})
    tiny_num_layers: int = field(default=2, metadata={"help": "Depth of the embedded backbone's language model."})
    tiny_vision_width: int = field(default=32, metadata={"help": "Width of the embedded backbone's vision tower."})
    tiny_vision_depth: int = field(default=1, metadata={"help": "Depth of the embedded backbone's vision tower."})


@dataclass
class BatchArguments:
    """The batch a recipe states: rows per optimizer step over all processes. `plan_batch`
    (`coma_hf.training.batching`) applies it, with the command line's batch flags, through `derive_batch_sizes`, which
    splits it into `per_device_train_batch_size` × `gradient_accumulation_steps` × the process count."""

    global_train_batch_size: int | None = field(
        default=None,
        metadata={
            "help": "Rows per optimizer step over all processes. The per-device batch and accumulation are derived "
            "from it and the process count; --per_device_train_batch_size / --gradient_accumulation_steps given on "
            "the command line win (each replaces its number of the derived split, and the global batch is what "
            "results, unless this flag is given as well: then the other one is derived from it)."
        },
    )
    max_micro_batch_size: int | None = field(
        default=None,
        metadata={
            "help": "When the per-device batch is derived: at most this many rows per forward/backward pass, "
            "accumulation making up the rest. None: each process's whole share in one pass (stage 2: accumulated "
            "micro-batches do not see each other's rows as negatives)."
        },
    )


@dataclass
class DataSourceArguments:
    """The data flags both training scripts share (their `DataArguments` extend it): where relative image paths start,
    where the synthetic scenes are written and read, and what a bad row does."""

    image_root: str | None = field(default=None, metadata={"help": "Folder that relative image paths start from."})
    synthetic_dir: str = field(
        default=DEFAULT_SYNTHETIC, metadata={"help": "Where the synthetic scenes are written and read."}
    )
    validate_data: bool = field(default=False, metadata={"help": "Check every row before training."})
    skip_bad_samples: bool = field(default=False, metadata={"help": "Skip (and count) rows that cannot be used."})
