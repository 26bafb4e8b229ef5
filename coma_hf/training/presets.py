"""The training scripts' parsing: a script's flags over the defaults of the preset its run takes
(`coma_hf.training.recipes`), with the per-device batch and accumulation derived from the preset's global batch
(`coma_hf.training.batching`), and the one-line stop of a bf16 recipe on a machine without a bf16 GPU.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from ..cli import batch_sizes
from .arguments import BatchArguments
from .batching import GLOBAL_BATCH_KEY, PER_DEVICE_KEYS, BatchPlan, explicit_batch_flags, plan_batch
from .recipes import choose_recipe

HELP_FLAGS = ("-h", "--help")
# `TrainingArguments` names transformers 5.x renamed: the presets use the current one, an older transformers the old
RENAMED_TRAINING_ARGUMENTS = {"activation_checkpointing": "gradient_checkpointing"}


def training_argument_name(name: str) -> str:
    """`name` as the installed transformers' `TrainingArguments` calls it (the old name of a renamed one where the
    new one does not exist yet)."""
    if name not in RENAMED_TRAINING_ARGUMENTS:
        return name
    from transformers import TrainingArguments

    fields = {field.name for field in dataclasses.fields(TrainingArguments)}
    return name if name in fields else RENAMED_TRAINING_ARGUMENTS[name]


def recipe_defaults(recipe: str, stage: str, configs: Path) -> dict:
    """Parser defaults of the preset `recipe` (`tiny`, `paper`, `released` or a JSON file) for `stage` ("stage1" or
    "stage2"), with the recipe's name as the `recipe` default, so the parsed arguments (and run summaries) record it.
    A preset that states the global batch cannot also state the per-device numbers derived from it."""
    path = Path(recipe) if recipe.endswith(".json") else configs / f"{stage}_{recipe}.json"
    if not path.is_file():
        raise SystemExit(f"Unknown recipe {recipe!r}: no file {path}")
    preset = json.loads(path.read_text())
    stated = [key for key in PER_DEVICE_KEYS if key in preset]
    if GLOBAL_BATCH_KEY in preset and stated:
        raise SystemExit(
            f"{path} states {GLOBAL_BATCH_KEY} and {', '.join(stated)}: a preset states the global batch, and the "
            "per-device batch and accumulation are derived from it (bound the micro-batch with max_micro_batch_size)"
        )
    return {**{training_argument_name(key): value for key, value in preset.items()}, "recipe": recipe}


class ParsedRun(NamedTuple):
    """What `parse_with_recipe` returns: the parsed dataclasses, why this recipe, and the batch plan (`None` when the
    dataclasses hold no `BatchArguments`)."""

    arguments: tuple
    reason: str
    batch: BatchPlan | None


def parse_with_recipe(
    dataclass_types: tuple, argv: list[str], stage: str, configs: Path, start_of, check_start=None, **defaults
) -> ParsedRun:
    """Parse `argv` into `dataclass_types` over the defaults of the recipe the run calls for.

    The first dataclass holds `recipe`; without `--recipe`, `start_of(its parsed values)` names the checkpoint the
    run starts from (`None` for the embedded backbone) and `recipe_of_start` picks from it. A bf16 recipe on a
    machine without a bf16-capable GPU stops here (`check_precision`). `--help` shows the `tiny` defaults unless a
    recipe is named. `check_start(its parsed values)`, when given, stops a run whose start a person named wrongly
    (`coma_hf.cli.UsageError`) before anything reads it; every `*batch_size` argument is checked too
    (`coma_hf.cli.batch_sizes`). With `BatchArguments` and `TrainingArguments` among the dataclasses, the per-device
    batch and the accumulation follow `plan_batch` (the global batch split over the process count); the arguments
    are then parsed once more with them as defaults, so that everything `TrainingArguments` derives at construction
    (a DeepSpeed config's "auto" batch sizes) sees the final numbers. Returns `ParsedRun(arguments, reason, batch)`.
    """
    from transformers import HfArgumentParser

    first = HfArgumentParser(dataclass_types[0], add_help=False)  # --help belongs to the full parser below
    early = first.parse_args_into_dataclasses(args=argv, return_remaining_strings=True)[0]
    asks_for_help = any(argument in HELP_FLAGS for argument in argv)
    if check_start is not None and not asks_for_help:
        check_start(early)
    if asks_for_help:
        recipe, reason = early.recipe or "tiny", "help"
    else:
        recipe, reason = choose_recipe(early.recipe, start_of, early)
    preset = recipe_defaults(recipe, stage, configs)
    if not asks_for_help:
        check_precision(recipe, preset, argv)
    parser = HfArgumentParser(dataclass_types)
    parser.set_defaults(**defaults, **preset)
    parsed = parser.parse_args_into_dataclasses(args=argv)
    batch_sizes(*parsed)
    batch_args = next((value for value in parsed if isinstance(value, BatchArguments)), None)
    training_args = next((value for value in parsed if hasattr(value, "gradient_accumulation_steps")), None)
    if batch_args is None or training_args is None:
        return ParsedRun(parsed, reason, None)
    plan = plan_batch(batch_args, training_args.world_size, explicit_batch_flags(argv), training_args)
    if (plan.per_device, plan.accumulation) != (
        training_args.per_device_train_batch_size,
        training_args.gradient_accumulation_steps,
    ):
        parser.set_defaults(per_device_train_batch_size=plan.per_device, gradient_accumulation_steps=plan.accumulation)
        parsed = parser.parse_args_into_dataclasses(args=argv)
    return ParsedRun(parsed, reason, plan)


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
        raise SystemExit(
            f"The {recipe!r} recipe uses bf16, for which this machine has no GPU: pass --bf16 false "
            "to train in float32, or --use_cpu true to run bf16 on the CPU."
        )
