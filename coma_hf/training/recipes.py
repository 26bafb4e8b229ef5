"""Which recipe a run takes: the named presets of `examples/configs/` (`tiny`: all weights; `paper`: LoRA on the
language model as the paper's text says, see `coma_hf.training.peft`; `released`: what the authors' released scripts
run), chosen by `--recipe` or by the checkpoint a run starts from (its run summary, its config, or the Hub).
`coma_hf.training.presets` parses a script's flags over the chosen preset.
"""

from __future__ import annotations

import logging
from pathlib import Path

from ..configuration_coma import is_embedded_backbone
from ..hub.card import CONTRASTIVE_SUMMARY, CONVERSION_SUMMARY, PRETRAIN_SUMMARY, read_json_file
from ..moved import moved_names
from ..released.recipe import RELEASED_RECIPE

logger = logging.getLogger(__name__)

RECIPES = ("tiny", "paper", RELEASED_RECIPE)


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


# Names that moved in 0.2.0 → their new module: importing them from here still works, with a warning (`coma_hf.moved`).
_MOVED = {
    "build_coma": "coma_hf.training.building",
    "weights_fingerprint": "coma_hf.training.building",
    "parse_with_recipe": "coma_hf.training.presets",
    "recipe_defaults": "coma_hf.training.presets",
    "ParsedRun": "coma_hf.training.presets",
    "check_precision": "coma_hf.training.presets",
    "HELP_FLAGS": "coma_hf.training.presets",
    "BatchPlan": "coma_hf.training.batching",
    "plan_batch": "coma_hf.training.batching",
    "derive_batch_sizes": "coma_hf.training.batching",
    "explicit_batch_flags": "coma_hf.training.batching",
    "GLOBAL_BATCH_KEY": "coma_hf.training.batching",
    "PER_DEVICE_KEYS": "coma_hf.training.batching",
}


__getattr__ = moved_names(__name__, _MOVED)
