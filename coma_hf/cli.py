"""What the example scripts share to answer a person's bad input: one line that names the flag and its value, says
what is wrong and what to pass instead, and no traceback, unless `--debug` is given or logging is at DEBUG
(`--log_level debug` in the training scripts).

Each script ends with `run(main)`. Its checks raise `UsageError` before any model is loaded:

    folder = cli.image_folder(args.images, "--images")
    cli.coma_checkpoint(args.model, "--model")
    cli.batch_size(args.batch_size, "--batch_size")
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import logging
import os
import sys
import traceback
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from .configuration_coma import CoMaConfig

MAX_BATCH_SIZE = 65_536  # beyond this a batch size is a typo: no accelerator holds that many inputs at once
HUB_ID_PARTS = 2  # "owner/name"
FILE_SUFFIXES = (".json", ".jsonl", ".csv", ".parquet", ".arrow", ".txt", ".safetensors")  # a local file, not a Hub id
DEBUG_FLAG = "--debug"
DEFAULT_STAGE2 = "outputs/stage2"  # where examples/train_contrastive.py saves by default
DEFAULT_SYNTHETIC = "outputs/synthetic"  # where the scripts write and read the synthetic scenes and the mini-MMEB
DEFAULT_RUNS = "python examples/pretrain.py && python examples/train_contrastive.py"  # the runs that make it
MAKE_A_COMA_CHECKPOINT = (
    "pass a folder written by examples/pretrain.py or examples/train_contrastive.py, or convert the authors' release "
    "with examples/convert_released.py"
)


class UsageError(SystemExit):
    """Bad input from a person: `flag` and `value`, what is wrong, and what to pass instead.

    A `SystemExit`: a script stops with the message and status 2, whoever calls `main` can catch it, and no handler
    meant for the library's own errors (`except Exception`) swallows it.
    """

    def __init__(self, flag: str, value: object, problem: str, remedy: str):
        self.flag, self.value, self.problem, self.remedy = flag, value, problem, remedy
        super().__init__(f"{flag} {value}: {problem}; {remedy}")

    @property
    def message(self) -> str:
        return str(self.code)


def run(main: Callable[[list[str]], Any], argv: list[str] | None = None) -> Any:
    """Call `main(argv)` as a script's entry point: a `UsageError` prints one line (`error: …`) and exits with status
    2; with `--debug`, `--log_level debug` or a root logger at DEBUG it prints the traceback first."""
    argv = sys.argv[1:] if argv is None else argv
    try:
        return main(argv)
    except UsageError as error:
        if wants_traceback(argv):
            traceback.print_exc()
        print(f"{Path(sys.argv[0]).name}: error: {error.message}", file=sys.stderr)
        sys.exit(2)


def wants_traceback(argv: list[str]) -> bool:
    """Whether the person asked for tracebacks: `--debug`, a `--log_level debug`, or a root logger at DEBUG."""
    arguments = [argument.lower() for argument in argv]
    log_level = any(
        argument == "--log_level=debug" or (argument == "--log_level" and following == "debug")
        for argument, following in itertools.pairwise([*arguments, ""])
    )
    flag = any(argument == DEBUG_FLAG or argument.startswith(f"{DEBUG_FLAG}=") for argument in arguments)
    return flag or log_level or logging.getLogger().isEnabledFor(logging.DEBUG)


def configure_logging(debug: bool = False) -> None:
    """The scripts' console log: INFO, or DEBUG with `--debug`."""
    logging.basicConfig(level=logging.DEBUG if debug else logging.INFO, format="%(asctime)s %(name)s: %(message)s")


def add_debug_flag(parser) -> None:
    """`--debug` on an argparse parser: tracebacks for bad input, and DEBUG logging."""
    parser.add_argument(DEBUG_FLAG, action="store_true", help="Show tracebacks, and log at DEBUG level.")


# ---- paths ----------------------------------------------------------------------------------------------------------
def existing_file(value: str | os.PathLike, flag: str, what: str = "file") -> Path:
    """`value` as a path to a file that exists."""
    path = Path(value)
    if path.is_dir():
        raise UsageError(flag, value, f"is a folder, not a {what}", f"pass the {what} itself")
    if not path.is_file():
        raise UsageError(flag, value, "no such file", f"pass the path of an existing {what}")
    return path


def existing_folder(value: str | os.PathLike, flag: str, what: str = "folder") -> Path:
    """`value` as a path to a folder that exists."""
    path = Path(value)
    if path.is_file():
        raise UsageError(flag, value, f"is a file, not a {what}", f"pass a {what}")
    if not path.is_dir():
        raise UsageError(flag, value, "no such folder", f"pass the path of an existing {what}")
    return path


def output_folder(value: str | os.PathLike, flag: str, remedy: str) -> Path:
    """`value` as a folder to write into: it need not exist yet, but it must not be a file (`remedy`: what to pass)."""
    if Path(value).is_file():
        raise UsageError(flag, value, "is a file", remedy)
    return Path(value)


def output_file(value: str | os.PathLike, flag: str, remedy: str) -> Path:
    """`value` as a file to write: it need not exist yet, but it must not be a folder (`remedy`: what to pass)."""
    if Path(value).is_dir():
        raise UsageError(flag, value, "is a folder", remedy)
    return Path(value)


def image_folder(value: str | os.PathLike, flag: str, extensions: Iterable[str] | None = None) -> Path:
    """`value` as a folder holding at least one image file (searched recursively)."""
    from .data.sources import IMAGE_EXTENSIONS

    folder = existing_folder(value, flag, "folder of images")
    extensions = tuple(extensions or IMAGE_EXTENSIONS)
    if not any(path.suffix.lower() in extensions for path in folder.rglob("*") if path.is_file()):
        raise UsageError(
            flag, value, f"holds no images (looked for {', '.join(extensions)})", "pass a folder of images"
        )
    return folder


def file_or_folder(value: str | os.PathLike, flag: str, what: str) -> Path:
    """`value` as a file or a folder that exists."""
    if not Path(value).exists():
        raise UsageError(flag, value, "no such file or folder", f"pass the path of {what}")
    return Path(value)


def local_or_hub(value: str, flag: str, what: str) -> Path | None:
    """A local path that exists, or `None` for what can only be a Hub id (`owner/name`, and no folder `owner` here).
    Anything else is a missing local path."""
    path = Path(value)
    if path.exists():
        return path
    if looks_like_hub_id(value):
        return None
    raise UsageError(flag, value, "no such folder here (nor a Hub id)", f"pass the path of {what}, or a Hub id")


def looks_like_hub_id(value: str) -> bool:
    """`owner/name` whose `owner` is not a folder here: transformers would ask the Hub for it."""
    from .hub.card import HUB_ID

    parts = value.split("/")
    local_file = Path(value).suffix.lower() in FILE_SUFFIXES
    return bool(HUB_ID.match(value)) and len(parts) == HUB_ID_PARTS and not Path(parts[0]).is_dir() and not local_file


# ---- checkpoints ----------------------------------------------------------------------------------------------------
def checkpoint_config(value: str, flag: str) -> dict | None:
    """The `config.json` of the checkpoint `value` names (a folder, or a Hub id in the local cache); `None` for a Hub
    id that only the Hub can answer for."""
    path = local_or_hub(value, flag, "a checkpoint folder")
    if path is None:
        return _cached_hub_config(value)
    if not path.is_dir():
        raise UsageError(flag, value, "is a file, not a checkpoint folder", "pass the folder that holds config.json")
    config = path / "config.json"
    if not config.is_file():
        raise UsageError(flag, value, "holds no config.json: not a model checkpoint", "pass a checkpoint folder")
    try:
        return json.loads(config.read_text())
    except (OSError, ValueError) as error:
        raise UsageError(flag, value, f"its config.json cannot be read ({error})", "pass a whole checkpoint") from None


def _cached_hub_config(repo_id: str) -> dict | None:
    from huggingface_hub import try_to_load_from_cache

    cached = try_to_load_from_cache(repo_id, "config.json")
    return json.loads(Path(cached).read_text()) if isinstance(cached, str) else None


def default_checkpoint_missing(value: str, flag: str) -> None:
    """Stop with the commands that make it when `value` is the default stage-2 checkpoint and it is not there yet."""
    if value == DEFAULT_STAGE2 and not Path(value).is_dir():
        raise SystemExit(
            f"No checkpoint at {value}: make the default runs with `{DEFAULT_RUNS}`, or name one with {flag}"
        )


def coma_checkpoint(value: str, flag: str) -> dict | None:
    """`value` names a CoMa checkpoint (a folder, or a Hub id); its config (`None`: only the Hub knows it)."""
    config = checkpoint_config(value, flag)
    if config is not None and config.get("model_type") != CoMaConfig.model_type:
        found = config.get("model_type") or "none"
        raise UsageError(flag, value, f"not a CoMa checkpoint (its model_type is {found!r})", MAKE_A_COMA_CHECKPOINT)
    return config


def backbone_checkpoint(value: str, flag: str) -> dict | None:
    """`value` names a model CoMa can be built on: a Qwen2-VL, Qwen2.5-VL or Qwen3-VL checkpoint (or a CoMa one)."""
    from .backbones import FAMILIES

    config = checkpoint_config(value, flag)
    supported = (*FAMILIES, CoMaConfig.model_type)
    if config is not None and config.get("model_type") not in supported:
        found = config.get("model_type") or "none"
        raise UsageError(
            flag,
            value,
            f"not a supported backbone (its model_type is {found!r})",
            f"pass a {', '.join(FAMILIES)} or CoMa checkpoint",
        )
    return config


def answering_warning(value: str | os.PathLike, config: dict | None) -> str | None:
    """A warning when the checkpoint at `value` (its `config`) is a stage-2 one, asked to answer from its
    compression: it was never trained to. Checkpoints saved before `training_stage` existed are known by their run
    records: a stage-2 one, or a conversion of the authors' (stage-2) release."""
    from .hub.card import CONTRASTIVE_SUMMARY, CONVERSION_SUMMARY, PRETRAIN_SUMMARY

    stage = (config or {}).get("training_stage")
    folder = Path(value)
    if stage is None and folder.is_dir():
        stage_two = any((folder / name).is_file() for name in (CONTRASTIVE_SUMMARY, CONVERSION_SUMMARY))
        stage = 2 if stage_two else 1 if (folder / PRETRAIN_SUMMARY).is_file() else None
    if stage != 2:
        return None
    return (
        f"{value} is a stage-2 (contrastive) checkpoint: it was never trained to answer from its compression, so its "
        "answers show what stage 2 left of stage 1; pass the stage-1 checkpoint it was trained from"
    )


# ---- numbers --------------------------------------------------------------------------------------------------------
def count(value: int | None, flag: str, minimum: int = 1, maximum: int | None = None, what: str = "count") -> int:
    """`value` as a whole number in `[minimum, maximum]` (`None` passes through)."""
    if value is None:
        return value
    if value < minimum or (maximum is not None and value > maximum):
        bounds = f"from {minimum} to {maximum:,}" if maximum is not None else f"of {minimum} or more"
        raise UsageError(flag, value, f"is not a {what} {bounds}", f"pass a {what} {bounds}")
    return value


def batch_size(value: int | None, flag: str) -> int:
    """`value` as a batch size: at least 1, at most `MAX_BATCH_SIZE`."""
    return count(value, flag, 1, MAX_BATCH_SIZE, "batch size")


def batch_sizes(*arguments: object) -> None:
    """Every `*batch_size` field of the argument dataclasses `arguments` (TrainingArguments' among them)."""
    for instance in arguments:
        if not dataclasses.is_dataclass(instance):
            continue
        for field in dataclasses.fields(instance):
            value = getattr(instance, field.name, None)
            if field.name.endswith("batch_size") and isinstance(value, int) and not isinstance(value, bool):
                batch_size(value, f"--{field.name}")
