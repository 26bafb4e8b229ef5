"""Recipes: which model a stage builds, what it updates (peft LoRA, the paper's recipe, or all weights, the `tiny`
recipe), and the named presets of `examples/configs/`.

The paper (stage 1): LoRA r=16, alpha=64, dropout 0.1 on the language model's q/k/v/o projections (DoRA in the
released code), the compression-token embedding rows trained, the vision tower frozen; after the stage the LoRA is
merged into the weights. `apply_lora` builds exactly that with peft; `merge_lora` folds it back into a plain
`CoMaModel`.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

from .configuration_coma import is_embedded_backbone
from .model_card import CONTRASTIVE_SUMMARY, PRETRAIN_SUMMARY, read_json_file

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
        raise SystemExit("LoRA runs are merged before saving, which needs full weights in one process: use the DDP "
                         "or DeepSpeed ZeRO-2 config (examples/configs), or --use_lora false with FSDP / ZeRO-3.")
    if stage == "stage2":
        raise SystemExit("Stage 2 does not support parameter sharding (FSDP, ZeRO-3) yet: use the DDP or DeepSpeed "
                         "ZeRO-2 config (examples/configs).")


@dataclass
class BackboneArguments:
    """How a fresh CoMa model is built: K, image and sequence bounds, and the embedded tiny backbone's size."""

    num_compression_tokens: int = field(default=32, metadata={"help": "K, the number of compression tokens."})
    min_image_tokens: int | None = field(default=None, metadata={"help": "Fewest visual tokens per image."})
    max_image_tokens: int | None = field(default=None, metadata={"help": "Most visual tokens per image."})
    max_length: int | None = field(default=2048, metadata={"help": "Longest sequence in tokens."})
    family: str = field(default="qwen2_5_vl", metadata={"help": "Family of the embedded backbone."})
    tiny_hidden_size: int = field(default=64, metadata={"help": "Width of the embedded backbone's language model."})
    tiny_num_layers: int = field(default=2, metadata={"help": "Depth of the embedded backbone's language model."})
    tiny_vision_width: int = field(default=32, metadata={"help": "Width of the embedded backbone's vision tower."})
    tiny_vision_depth: int = field(default=1, metadata={"help": "Depth of the embedded backbone's vision tower."})


def build_coma(arguments: BackboneArguments, backbone: str | None = None, seed: int = 0, **config_kwargs):
    """`(model, processor)`: CoMa over `backbone` (Hub id or folder), or over the embedded tiny backbone if `None`."""
    from .modeling_coma import CoMaModel
    from .tiny import build_tiny_coma, tiny_backbone_config

    common = dict(
        num_compression_tokens=arguments.num_compression_tokens,
        min_image_tokens=arguments.min_image_tokens,
        max_image_tokens=arguments.max_image_tokens,
        max_length=arguments.max_length,
        **config_kwargs,
    )
    if backbone is None:
        backbone_config = tiny_backbone_config(
            arguments.family,
            hidden_size=arguments.tiny_hidden_size,
            num_layers=arguments.tiny_num_layers,
            vision_width=arguments.tiny_vision_width,
            vision_depth=arguments.tiny_vision_depth,
        )
        return build_tiny_coma(arguments.family, seed=seed, backbone_config=backbone_config, **common)
    model = CoMaModel.from_backbone(backbone, seed=seed, **common)
    return model, model.processor


RECIPES = ("tiny", "paper")
HELP_FLAGS = ("-h", "--help")


def recipe_of_start(start: str | None) -> tuple[str, str]:
    """`(recipe, reason)` for a run that starts from `start` (a folder or Hub id; `None` for the embedded backbone).

    The recipe follows the checkpoint: the one its run summary records, else `tiny` when its config marks the
    package's embedded backbone (`is_embedded_backbone`), else `paper`. A Hub id is read from the Hub (the user named
    it); when that fails, `paper`, the recipe of real backbones."""
    if start is None:
        return "tiny", "no model named: the embedded tiny backbone"
    read = _local_reader(start) if Path(start).is_dir() else _hub_reader(start)
    if read is None:
        return "paper", f"{start} is neither a local folder nor a readable Hub repository (taken for a real backbone)"
    for name in (CONTRASTIVE_SUMMARY, PRETRAIN_SUMMARY):  # the newest stage first
        recorded = (read(name) or {}).get("recipe")
        if recorded in RECIPES:
            return recorded, f"{start} was trained with the {recorded!r} recipe ({name})"
    if is_embedded_backbone(read("config.json") or {}):
        return "tiny", f"{start} holds the package's embedded backbone (its config says so)"
    return "paper", f"{start} holds a real backbone (its config does not mark the embedded one)"


def _local_reader(folder: str):
    return lambda name: read_json_file(Path(folder) / name)


def _hub_reader(repo_id: str):
    """A reader of the repository's small JSON files, or `None` when the repository cannot be reached."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError

    def read(name: str) -> dict | None:
        try:
            return read_json_file(Path(hf_hub_download(repo_id, name)))
        except EntryNotFoundError:
            return None

    try:
        read("config.json")
    except Exception as error:  # offline, no such repository, no access: decide without it
        logger.info("Could not read %s from the Hub (%s)", repo_id, error)
        return None
    return read


def choose_recipe(explicit: str | None, start_of, model_args) -> tuple[str, str]:
    """`(recipe, reason)`: `explicit` (a `--recipe` value) when given, else what the start checkpoint calls for
    (`start_of(model_args)`, asked only then)."""
    if explicit is not None:
        return explicit, "named with --recipe"
    return recipe_of_start(start_of(model_args))


def recipe_defaults(recipe: str, stage: str, configs: Path) -> dict:
    """Parser defaults of the preset `recipe` (`tiny`, `paper` or a JSON file) for `stage` ("stage1" or "stage2"),
    with the recipe's name as the `recipe` default, so the parsed arguments (and run summaries) record it."""
    path = Path(recipe) if recipe.endswith(".json") else configs / f"{stage}_{recipe}.json"
    if not path.is_file():
        raise SystemExit(f"Unknown recipe {recipe!r}: no file {path}")
    return {**json.loads(path.read_text()), "recipe": recipe}


def parse_with_recipe(dataclass_types: tuple, argv: list[str], stage: str, configs: Path, start_of, **defaults):
    """Parse `argv` into `dataclass_types` over the defaults of the recipe the run calls for.

    The first dataclass holds `recipe`; without `--recipe`, `start_of(its parsed values)` names the checkpoint the
    run starts from (`None` for the embedded backbone) and `recipe_of_start` picks from it. A bf16 recipe on a
    machine without a bf16-capable GPU stops here (`check_precision`). `--help` shows the `tiny` defaults unless a
    recipe is named. Returns `(parsed dataclasses, why this recipe)`.
    """
    from transformers import HfArgumentParser

    first = HfArgumentParser(dataclass_types[0], add_help=False)  # --help belongs to the full parser below
    early = first.parse_args_into_dataclasses(args=argv, return_remaining_strings=True)[0]
    asks_for_help = any(argument in HELP_FLAGS for argument in argv)
    if asks_for_help:
        recipe, reason = early.recipe or "tiny", "help"
    else:
        recipe, reason = choose_recipe(early.recipe, start_of, early)
    preset = recipe_defaults(recipe, stage, configs)
    if not asks_for_help:
        check_precision(recipe, preset, argv)
    parser = HfArgumentParser(dataclass_types)
    parser.set_defaults(**defaults, **preset)
    return parser.parse_args_into_dataclasses(args=argv), reason


@dataclass
class _Precision:
    """The precision flags of `TrainingArguments`, parsed ahead of it by `check_precision`."""

    bf16: bool = False
    bf16_full_eval: bool = False
    use_cpu: bool = False


def check_precision(recipe: str, defaults: dict, argv: list[str]) -> None:
    """Stop with one line when the run would use bf16 on a machine without a bf16-capable GPU (transformers would
    refuse later with an error that does not say what to change)."""
    from transformers import HfArgumentParser
    from transformers.utils import is_torch_bf16_gpu_available, is_torch_xla_available

    parser = HfArgumentParser(_Precision, add_help=False)  # --help belongs to the script's own parser
    parser.set_defaults(**{key: defaults.get(key, False) for key in ("bf16", "bf16_full_eval", "use_cpu")})
    precision, _ = parser.parse_known_args(argv)
    wants_bf16 = precision.bf16 or precision.bf16_full_eval
    if wants_bf16 and not precision.use_cpu and not (is_torch_bf16_gpu_available() or is_torch_xla_available()):
        raise SystemExit(f"The {recipe!r} recipe uses bf16, for which this machine has no GPU: pass --bf16 false "
                         "to train in float32, or --use_cpu true to run bf16 on the CPU.")  # fmt: skip
