"""Test helper (not a test): examples/pretrain.py that stops dead at a chosen point, for a parent to SIGKILL it there.

    python tests/pausing_pretrain.py PHASE STEP MARKER [pretrain.py arguments...]

PHASE is `after_step` (step STEP has run; its checkpoint, if any, is not written yet) or `saving` (checkpoint-STEP has
its weights on disk but not yet its optimizer, RNG or trainer state). There the run writes the file MARKER and
sleeps until killed, so the kill lands at exactly that point instead of after a guessed delay.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from transformers import TrainerCallback

import coma_hf.training.trainers

from utils import load_example

PHASES = ("after_step", "saving")


def halt(marker: Path) -> None:
    """Tell the parent where the run stands, then wait for its SIGKILL."""
    marker.write_text("paused\n")
    while True:
        time.sleep(60)


class PauseAfterStep(TrainerCallback):
    """Halts when step `step` has ended, before Trainer logs, evaluates or saves for it."""

    def __init__(self, step: int, marker: Path):
        self.step, self.marker = step, marker

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            halt(self.marker)


def pausing_trainer(phase: str, step: int, marker: Path) -> type:
    """`CoMaCompressionTrainer` with the pause; a subclass because no callback runs inside a checkpoint save."""

    class PausingTrainer(coma_hf.training.trainers.CoMaCompressionTrainer):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            if phase == "after_step":
                self.add_callback(PauseAfterStep(step, marker))

        def save_model(self, output_dir: str | None = None, *args, **kwargs):
            super().save_model(output_dir, *args, **kwargs)
            if phase == "saving" and output_dir and Path(output_dir).name == f"checkpoint-{step}":
                halt(marker)  # weights written; optimizer, RNG and trainer_state.json not

    return PausingTrainer


def main(argv: list[str]) -> None:
    phase, step, marker, pretrain_args = argv[0], int(argv[1]), Path(argv[2]), argv[3:]
    if phase not in PHASES:
        raise SystemExit(f"PHASE must be one of {PHASES}, got {phase!r}")
    # examples/pretrain.py imports the trainer class inside main(), so it picks up this one
    coma_hf.training.trainers.CoMaCompressionTrainer = pausing_trainer(phase, step, marker)
    load_example("pretrain").main(pretrain_args)
    raise SystemExit(f"the run finished without reaching {phase} {step}")


if __name__ == "__main__":
    main(sys.argv[1:])
