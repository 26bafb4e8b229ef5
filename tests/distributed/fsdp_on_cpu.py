"""Run example scripts under `accelerate launch --config_file examples/configs/accelerate_fsdp.yaml` on CPU processes
(gloo; see tests/test_accelerate.py):

    ACCELERATE_USE_CPU=true accelerate launch --config_file .../accelerate_fsdp.yaml --num_processes 2 \\
        --mixed_precision no fsdp_on_cpu.py RECORD -- pretrain ARGS -- train_contrastive ARGS ...

accelerate 1.15 takes FSDP only on accelerator devices: its `AcceleratorState` turns `ACCELERATE_USE_FSDP` into
`DistributedType.FSDP` for MULTI_GPU-like process groups, and a CPU one (MULTI_CPU, gloo) silently trains with DDP
instead (`accelerate launch --cpu` is worse: one process). FSDP2 itself runs on CPU with gloo, so each segment here
first sets accelerate's state up as FSDP over the CPU process group (`configure_fsdp_on_cpu`) and the script's
`TrainingArguments` keep it (`--accelerator_config '{"use_configured_state": true}'`, Trainer's switch for a state
configured beforehand). Everything else — the config's FSDP settings as the launcher exported them, Trainer,
accelerate's FSDP2 preparation, gathering and saving — runs unchanged.

Each segment's outcome goes to RECORD (JSON, one entry per segment, written by every process as RECORD.RANK): the
distributed type and FSDP version accelerate trained with, the layer classes its wrap policy wrapped, how the trained
model was sharded (`sharding`: which modules are FSDP2's `FSDPModule`s, how many parameters are DTensors and how many
of those hold less than the full tensor on this rank), or the `SystemExit` message of a script that refused to start.
"""

from __future__ import annotations

import json
import sys

from accelerate import Accelerator
from accelerate.state import AcceleratorState, PartialState
from accelerate.utils import DistributedType

from utils import load_example, script_segments

USE_CONFIGURED_STATE = ["--accelerator_config", json.dumps({"use_configured_state": True})]


def configure_fsdp_on_cpu() -> Accelerator:
    """accelerate's state as FSDP (plugin from the launcher's environment) over the CPU process group.

    `AcceleratorState` reads the process group's type from `PartialState` and takes FSDP only for MULTI_GPU-like
    types; presented as MULTI_GPU once, it builds the FSDP state and writes `DistributedType.FSDP` back into
    `PartialState`, exactly as it does on GPUs. Device (CPU) and backend (gloo) stay as `PartialState` set them."""
    AcceleratorState._reset_state(reset_partial_state=True)  # a script's TrainingArguments may have reset it
    state = PartialState(cpu=True)
    assert state.distributed_type == DistributedType.MULTI_CPU and state.backend == "gloo", state
    PartialState._shared_state["distributed_type"] = DistributedType.MULTI_GPU
    accelerator = Accelerator(cpu=True)
    assert accelerator.distributed_type == DistributedType.FSDP and accelerator.device.type == "cpu", accelerator.state
    return accelerator


def wrapped_layers(state: AcceleratorState) -> list[str] | None:
    """The layer classes accelerate's transformer wrap policy was resolved to (when a model was prepared)."""
    policy = state.fsdp_plugin.auto_wrap_policy
    classes = getattr(policy, "keywords", {}).get("transformer_layer_cls")
    return None if classes is None else sorted(klass.__name__ for klass in classes)


def sharding(model) -> dict:
    """How FSDP2 left `model` on this rank (the same on every rank when it sharded): the classes of its `FSDPModule`s,
    how many parameters are DTensors sharded on dimension 0 over all processes, and of those long enough to split
    (dimension 0 at least the process count) how many hold fewer elements here than the whole tensor."""
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor, Shard

    distributed = [parameter for parameter in model.parameters() if isinstance(parameter, DTensor)]
    splittable = [parameter for parameter in distributed if parameter.shape[0] >= parameter.device_mesh.size()]
    return {
        "fsdp_modules": sorted(
            {type(module).__name__ for module in model.modules() if isinstance(module, FSDPModule)}
        ),
        "parameters": sum(1 for _ in model.parameters()),
        "dtensors_sharded_on_dim0": sum(parameter.placements == (Shard(0),) for parameter in distributed),
        "splittable": len(splittable),
        "smaller_here": sum(parameter.to_local().numel() < parameter.numel() for parameter in splittable),
    }


def run(script: str, arguments: list[str]) -> dict:
    """`examples/{script}.py` under FSDP on CPU; what accelerate trained with and how the model was sharded, or the
    message it stopped with."""
    from coma_hf.training import trainers as trainer_module

    configure_fsdp_on_cpu()
    module, trainers = load_example(script), []
    originals = {name: getattr(trainer_module, name) for name in ("CoMaCompressionTrainer", "CoMaContrastiveTrainer")}
    for name, trainer_class in originals.items():  # a script imports its trainer at the top or inside main
        recording = _recording(trainer_class, trainers)
        setattr(trainer_module, name, recording)
        if hasattr(module, name):
            setattr(module, name, recording)
    try:
        module.main(arguments + USE_CONFIGURED_STATE)
    except SystemExit as stop:
        return {"script": script, "exit": str(stop)}
    finally:
        for name, trainer_class in originals.items():
            setattr(trainer_module, name, trainer_class)
    state = AcceleratorState()
    return {
        "script": script,
        "exit": None,
        "distributed_type": str(state.distributed_type.value),
        "fsdp_version": state.fsdp_plugin.fsdp_version,
        "wrapped_layers": wrapped_layers(state),
        "sharding": trainers[0].sharding if trainers else None,
    }


def _recording(trainer_class: type, trainers: list) -> type:
    """`trainer_class`, keeping each instance in `trainers` with the `sharding` of the model its first training step
    ran (the prepared model, as FSDP2 sharded it)."""

    class Recording(trainer_class):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.sharding = None
            trainers.append(self)

        def training_step(self, model, *args, **kwargs):
            if self.sharding is None:
                self.sharding = sharding(model)
            return super().training_step(model, *args, **kwargs)

    return Recording


def main(record: str, *rest: str) -> None:
    outcomes = [run(script, arguments) for script, arguments in script_segments(rest)]
    rank = PartialState().process_index
    with open(f"{record}.{rank}", "w") as handle:
        json.dump(outcomes, handle, indent=1)


if __name__ == "__main__":
    main(*sys.argv[1:])
