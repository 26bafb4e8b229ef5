"""Checkpoint I/O of `CoMaModel.save_pretrained`: what a save writes (`save_model_files`), atomically
(`save_atomically`), and the files a checkpoint carries along from the folder it was loaded from.

Part of the remote code shipped with every checkpoint: imports only sibling files and the standard library.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from typing import Any

from .constants_coma import DEFAULT_DOCUMENT_INSTRUCTION, DEFAULT_QUERY_INSTRUCTION
from .sentence_transformers_files import write_sentence_transformers_files

logger = logging.getLogger(__name__)

# Largest weight file a save writes (transformers' own default, 50GB, writes a 3B model as one 7 GB file, which
# uploads, downloads and memory-maps badly). A single tensor larger than this still gets a shard of its own.
MAX_SHARD_SIZE = "2GB"

# Run summaries and card that travel with a checkpoint from the folder it was loaded from.
PRETRAIN_SUMMARY = "pretrain_summary.json"  # what examples/pretrain.py records beside its checkpoint
CONTRASTIVE_SUMMARY = "contrastive_summary.json"  # and examples/train_contrastive.py
MMEB_RESULTS = "mmeb_results.json"  # and examples/evaluate.py
CONVERSION_SUMMARY = "conversion_summary.json"  # and the converter of the authors' release
MTEB_RESULTS = "mteb_results.json"  # the main scores of an mteb results folder, for the card's model-index
SUMMARY_FILES = (PRETRAIN_SUMMARY, CONTRASTIVE_SUMMARY, MMEB_RESULTS, CONVERSION_SUMMARY, MTEB_RESULTS)
CARRIED_FILES = ("README.md", *SUMMARY_FILES)


def save_model_files(model: Any, save_directory: str, save_weights: Callable[..., None], *args, **kwargs) -> None:
    """Everything a `CoMaModel` save writes into `save_directory`: `save_weights(save_directory, *args, **kwargs)`
    (transformers' own save: weights, config, remote code), the run summaries and card of the folder the model came
    from, its processor (loaded from there first if it was never used), and the sentence-transformers files."""
    save_weights(save_directory, *args, **kwargs)
    carry_files(model.name_or_path, save_directory)
    if model._processor is None and model.name_or_path:
        try:
            model.processor  # noqa: B018 - loads the processor the model came with
        except (OSError, ValueError) as error:
            logger.warning("Saved without a processor: none could be loaded from %s (%s)", model.name_or_path, error)
    if model._processor is not None:
        model._processor.save_pretrained(save_directory)
        query, document = model._processor.query_instruction, model._processor.document_instruction
    else:  # the instructions an old config holds, or the defaults
        legacy = model.config.legacy_processor_settings()
        query = legacy.get("query_instruction", DEFAULT_QUERY_INSTRUCTION)
        document = legacy.get("document_instruction", DEFAULT_DOCUMENT_INSTRUCTION)
    write_sentence_transformers_files(save_directory, query, document)


def save_atomically(save_directory: str | os.PathLike, write: Callable[[str], None]) -> None:
    """Let `write(folder)` write a checkpoint into a temporary folder beside `save_directory`, then move it into place.

    A new folder is then one rename; an existing one (a Trainer output folder with checkpoints, an older save) first
    loses its `config.json`, then receives the new files with `config.json` last — so a save cut short at any point
    leaves either the previous model, or a folder without `config.json` that refuses to load, never a mix.
    """
    target = os.path.abspath(os.fspath(save_directory))
    os.makedirs(os.path.dirname(target), exist_ok=True)
    staging = tempfile.mkdtemp(prefix=f".{os.path.basename(target)}.saving-", dir=os.path.dirname(target))
    try:
        write(staging)
        _move_into_place(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _move_into_place(staging: str, target: str) -> None:
    """Move a finished save from `staging` to `target` (see `save_atomically`): one rename for a new folder;
    for an existing one, `config.json` out first and in last, and weight files of an earlier save removed."""
    if not os.path.exists(target):
        os.replace(staging, target)
        return
    names = sorted(os.listdir(staging), key=lambda name: name == "config.json")  # config.json last
    if os.path.exists(os.path.join(target, "config.json")):
        os.remove(os.path.join(target, "config.json"))  # from here until the end the folder does not load
    for name in os.listdir(target):  # weights of an earlier save that this one does not overwrite (other sharding)
        if (
            name.startswith("model")
            and name.endswith((".safetensors", ".safetensors.index.json"))
            and name not in names
        ):
            os.remove(os.path.join(target, name))
    for name in names:
        destination = os.path.join(target, name)
        if os.path.isdir(destination) and not os.path.islink(destination):
            shutil.rmtree(destination)
        os.replace(os.path.join(staging, name), destination)


def carry_files(source: str | None, save_directory: str, names: tuple[str, ...] = CARRIED_FILES) -> None:
    """Copy the run summaries and card of the folder a model was loaded from (`source`, also when saving over it)
    into `save_directory`, where the save did not write them itself."""
    if not source or not os.path.isdir(source):
        return
    for name in names:
        if os.path.isfile(os.path.join(source, name)) and not os.path.exists(os.path.join(save_directory, name)):
            shutil.copyfile(os.path.join(source, name), os.path.join(save_directory, name))
