"""Recipes: how a fresh model is built (`build_coma`: the embedded tiny backbone or a named one) and the named presets
of `examples/configs/` (`tiny`: all weights; `paper`: LoRA on the language model, see `coma_hf.training.peft`), with
which preset a run takes and the scripts' parsing over it.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from ..configuration_coma import is_embedded_backbone
from ..hub.card import CONTRASTIVE_SUMMARY, CONVERSION_SUMMARY, PRETRAIN_SUMMARY, read_json_file
from .arguments import BackboneArguments

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
        raise SystemExit(
            f"The {recipe!r} recipe uses bf16, for which this machine has no GPU: pass --bf16 false "
            "to train in float32, or --use_cpu true to run bf16 on the CPU."
        )
