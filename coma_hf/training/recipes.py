"""Recipes: how a fresh model is built (`build_coma`: the embedded tiny backbone or a named one) and the named presets
of `examples/configs/` (`tiny`: all weights; `paper`: LoRA on the language model as the paper's text says, see
`coma_hf.training.peft`; `released`: what the authors' released scripts run), with which preset a run takes and the
scripts' parsing over it.

A preset states the **global** batch (`global_train_batch_size`: rows per optimizer step over all processes); the
per-device batch and the accumulation are derived from it and the process count (`derive_batch_sizes`), so a recipe
means the same on one GPU and on eight.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch

from ..cli import batch_sizes
from ..configuration_coma import is_embedded_backbone
from ..hub.card import CONTRASTIVE_SUMMARY, CONVERSION_SUMMARY, PRETRAIN_SUMMARY, read_json_file
from ..released import RELEASED_RECIPE
from .arguments import BackboneArguments, BatchArguments

logger = logging.getLogger(__name__)


def build_coma(arguments: BackboneArguments, backbone: str | None = None, seed: int = 0, **config_kwargs):
    """`(model, processor)`: CoMa over `backbone` (Hub id or folder), or over the embedded tiny backbone if `None`
    (the shipped reader, or random weights of the `tiny_*` sizes, as `arguments.tiny_init` says).
    Keyword arguments go to `CoMaModel.from_backbone`: the processor's (`loss_on`, instructions) and the config's."""
    from ..modeling_coma import CoMaModel
    from ..tiny import build_tiny_coma, tiny_backbone_config

    common = dict(
        num_compression_tokens=arguments.num_compression_tokens,
        min_image_tokens=arguments.min_image_tokens,
        max_image_tokens=arguments.max_image_tokens,
        max_length=arguments.max_length,
        **config_kwargs,
    )
    if backbone is None and arguments.tiny_init == "reader":
        return build_tiny_coma(arguments.family, seed=seed, reader=True, **common)
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


def weights_fingerprint(model) -> str:
    """SHA-256 of a model's parameters (names, dtypes, shapes and values, in name order): equal fingerprints mean
    runs started from the same weights."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


RECIPES = ("tiny", "paper", RELEASED_RECIPE)
HELP_FLAGS = ("-h", "--help")
GLOBAL_BATCH_KEY = "global_train_batch_size"  # the preset key (a `BatchArguments` field) that states the batch
PER_DEVICE_KEYS = ("per_device_train_batch_size", "gradient_accumulation_steps")  # derived from it, not stated


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
    for name in (CONTRASTIVE_SUMMARY, PRETRAIN_SUMMARY, CONVERSION_SUMMARY):  # the newest stage first
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
    return {**preset, "recipe": recipe}


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


# ---- the global batch -----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class BatchPlan:
    """How one optimizer step's rows are laid out: `per_device` rows per forward/backward pass, `accumulation` passes
    per step, on `processes` processes. `asked` is the global batch the recipe or `--global_train_batch_size` asked for
    (`None`: none was), `source` says where the per-device numbers came from."""

    per_device: int
    accumulation: int
    processes: int
    asked: int | None
    source: str

    @property
    def global_batch(self) -> int:
        """Rows per optimizer step over all processes."""
        return self.per_device * self.accumulation * self.processes

    def describe(self) -> str:
        """One line for the log: the split, the global batch, and where the numbers came from."""
        line = (
            f"global batch {self.global_batch} = per-device batch {self.per_device} × accumulation "
            f"{self.accumulation} × {self.processes} processes ({self.source})"
        )
        if self.asked is not None and self.asked != self.global_batch:
            line += f"; the recipe's global batch is {self.asked}"
        return line

    def as_dict(self) -> dict[str, Any]:
        """For run summaries: the fields and `global_train_batch_size`."""
        return {**asdict(self), GLOBAL_BATCH_KEY: self.global_batch}


@dataclass
class _BatchFlags:
    """The batch flags as given on a command line (`None`: not given), parsed ahead of the scripts' parser."""

    global_train_batch_size: int | None = None
    per_device_train_batch_size: int | None = None
    gradient_accumulation_steps: int | None = None


def explicit_batch_flags(argv: list[str]) -> dict[str, int]:
    """The batch flags `argv` gives explicitly (global batch, per-device batch, accumulation), by name."""
    from transformers import HfArgumentParser

    parser = HfArgumentParser(_BatchFlags, add_help=False)  # --help belongs to the script's own parser
    flags, _ = parser.parse_known_args(argv)
    return {name: value for name, value in vars(flags).items() if value is not None}


def derive_batch_sizes(
    global_batch: int,
    processes: int,
    per_device: int | None = None,
    accumulation: int | None = None,
    max_micro_batch: int | None = None,
) -> tuple[int, int]:
    """`(per-device batch, accumulation)` whose product with `processes` is `global_batch`.

    A given `per_device` or `accumulation` is kept and the other derived; with neither, the per-device batch is the
    largest divisor of the per-process share (`global_batch / processes`) that is at most `max_micro_batch` (the
    whole share when `None`), and accumulation makes up the rest. A global batch that cannot be split so is a
    `ValueError` naming the numbers.
    """
    for name, value in (("global batch", global_batch), ("process count", processes)):
        if value < 1:
            raise ValueError(f"The {name} must be positive, got {value}")
    if per_device is not None and accumulation is not None:
        if per_device * accumulation * processes != global_batch:
            raise ValueError(
                f"per-device batch {per_device} × accumulation {accumulation} × {processes} processes = "
                f"{per_device * accumulation * processes}, not the global batch {global_batch}"
            )
        return per_device, accumulation
    share, left = divmod(global_batch, processes)
    if left:
        raise ValueError(f"The global batch {global_batch} does not divide among {processes} processes")
    if per_device is not None or accumulation is not None:
        given, name = (per_device, "per-device batch") if per_device is not None else (accumulation, "accumulation")
        if share % given:
            raise ValueError(
                f"The global batch {global_batch} on {processes} processes is {share} rows per process, not a "
                f"multiple of the {name} {given}"
            )
        return (given, share // given) if per_device is not None else (share // given, given)
    ceiling = share if max_micro_batch is None else max(1, min(max_micro_batch, share))
    micro = max(size for size in range(1, ceiling + 1) if share % size == 0)
    return micro, share // micro


def plan_batch(batch_args: BatchArguments, processes: int, given: dict[str, int], training_args) -> BatchPlan:
    """The batch plan of a run: `batch_args` (the recipe's global batch and micro-batch bound), the process count,
    the batch flags the command line `given` explicitly (`explicit_batch_flags`), and `training_args` for the
    per-device numbers when no global batch is stated.

    The rule: without per-device flags on the command line, the global batch (the recipe's, or
    `--global_train_batch_size`) is split by `derive_batch_sizes`. Per-device flags on the command line win: with
    `--global_train_batch_size` as well, the missing one is derived from it; without, they replace the recipe's split
    number for number (a flag not given keeps the recipe's number) and the global batch is what results — the log
    says which, and what the recipe asked for. Without any global batch the per-device settings stand. A split that
    does not come out whole stops the run with a message naming the numbers.
    """
    asked = batch_args.global_train_batch_size
    per_device = given.get("per_device_train_batch_size")
    accumulation = given.get("gradient_accumulation_steps")
    flags_given = per_device is not None or accumulation is not None
    if asked is None:
        source = "per-device flags on the command line" if flags_given else "per-device settings"
        sizes = training_args.per_device_train_batch_size, training_args.gradient_accumulation_steps
        return BatchPlan(*sizes, processes, asked, source)
    try:
        if flags_given and GLOBAL_BATCH_KEY not in given:
            sizes = (per_device, accumulation)
            if None in sizes:  # the flag not given keeps the recipe's number
                recipe_split = derive_batch_sizes(asked, processes, max_micro_batch=batch_args.max_micro_batch_size)
                sizes = tuple(flag or derived for flag, derived in zip(sizes, recipe_split, strict=True))
            return BatchPlan(*sizes, processes, asked, "per-device flags on the command line")
        sizes = derive_batch_sizes(asked, processes, per_device, accumulation, batch_args.max_micro_batch_size)
    except ValueError as error:
        raise SystemExit(f"Cannot split the global batch: {error}") from None
    return BatchPlan(*sizes, processes, asked, "derived from the global batch")


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
