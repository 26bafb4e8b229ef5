"""The global batch: a preset states rows per optimizer step over all processes (`global_train_batch_size`); the
per-device batch and the accumulation are derived from it and the process count (`derive_batch_sizes`,
`plan_batch`), so a recipe means the same on one GPU and on eight.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from .arguments import BatchArguments

GLOBAL_BATCH_KEY = "global_train_batch_size"  # the preset key (a `BatchArguments` field) that states the batch
PER_DEVICE_KEYS = ("per_device_train_batch_size", "gradient_accumulation_steps")  # derived from it, not stated


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
