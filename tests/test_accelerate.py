"""`accelerate launch --num_processes 2` (CPU, gloo): both example scripts run unchanged, and two processes give
what one process gives on the same global batch.

One launch does these things (tests/distributed/under_accelerate.py): the gathered contrastive loss and its
gradients on a fixed batch, then stage 1 (`examples/pretrain.py`) and stage 2 (`examples/train_contrastive.py`)
with per-device batch halved, the corpus encoder, and both stages under `--recipe released --bf16 false` with no
per-device flag, so that the scripts split the global batch themselves; the references run here, in one process,
with the whole batch.

A second launch takes the shipped FSDP config (examples/configs/accelerate_fsdp.yaml, FSDP2) with command-line
overrides for two CPU processes (tests/distributed/fsdp_on_cpu.py): stage 1 with all weights trained, which must equal
one process on the same global batch and save a checkpoint that loads everywhere, then stage 2 and a LoRA stage 1,
which must refuse before training.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from coma_hf.data.mini_mmeb import write_mini_mmeb
from coma_hf.training import CoMaContrastiveLoss

from utils import (
    FAMILIES,
    REMOTE_CODE_FILES,
    TINY_MODEL_ARGS,
    command_line,
    load_example,
    random_image,
    run_without_coma,
    tiny_coma,
)

DISTRIBUTED = Path(__file__).parent / "distributed"
sys.path.insert(0, str(DISTRIBUTED))
from under_accelerate import batch  # noqa: E402

# Dataset size = global batch, so every step sees the same rows whatever the sampler's order; SGD so that equal
# gradients mean equal weights (Adam's first step divides by |g| and magnifies rounding in near-zero gradients).
STAGE1 = TINY_MODEL_ARGS + command_line(
    "--num_train_scenes 4 --num_dev_scenes 2 --num_test_scenes 1 --scene_size 56 --max_steps 3"
    " --max_eval_samples 1 --dataloader_num_workers 0 --seed 3 --optim sgd --learning_rate 0.05"
    " --lr_scheduler_type constant --warmup_steps 0 --logging_steps 1"
)
STAGE2 = (
    "--recipe tiny --max_steps 2 --max_train_pairs 8 --by_dataset false --eval_datasets"
    " Mini-Digit --dataloader_num_workers 0 --optim sgd --learning_rate 0.05 --lr_scheduler_type"
    " constant --warmup_steps 0 --symmetric true --logging_steps 1 --seed 3"
).split()  # gathering across processes is the script's default
# The released recipe (DoRA, the embedding matrix, per-sample-mean loss, chunked stage-2 batches) with a global batch
# small enough for CPUs; no per-device flag, so the scripts derive the split: stage 1's micro-batch of 1 × 4
# accumulation × 2 processes, stage 2's 4 rows (one chunk) × 2 processes. LoRA dropout off: processes draw different
# masks; gradient clipping off: it would hide a wrongly scaled loss. Eight scenes, so every stage-1 step sees the same
# rows in any order.
RELEASED_GLOBAL_BATCH = 8
RELEASED = (
    f"--recipe released --bf16 false --global_train_batch_size {RELEASED_GLOBAL_BATCH} --lora_dropout 0"
    " --max_grad_norm 0"
)
STAGE1_RELEASED = TINY_MODEL_ARGS + command_line(
    RELEASED + " --num_train_scenes 8 --num_dev_scenes 2 --num_test_scenes 1 --scene_size 56 --max_steps 2"
    " --max_eval_samples 1 --dataloader_num_workers 0 --optim sgd --learning_rate 0.05 --lr_scheduler_type constant"
    " --warmup_steps 0 --logging_steps 1 --save_strategy no --seed 3"
)
STAGE2_RELEASED = command_line(
    RELEASED + " --dataset_chunk_size 4 --mini_batch_size 2 --max_steps 2 --eval_datasets Mini-Digit"
    " --dataloader_num_workers 0 --optim sgd --learning_rate 0.05 --lr_scheduler_type constant --warmup_steps 0"
    " --logging_steps 1 --save_strategy no --seed 3"
)
# Two processes pad their halves separately and sum in another order: float32 rounding, nothing more.
WEIGHT_TOLERANCE = dict(rtol=1e-4, atol=1e-5)


def _corpus_images(root: Path) -> Path:
    from PIL import Image

    folder = root / "corpus-images"
    folder.mkdir(exist_ok=True)
    for index in range(10):
        Image.new("RGB", (28, 28 + 28 * (index % 2)), (25 * index, 90, 200 - 15 * index)).save(folder / f"{index}.png")
    return folder


def _corpus_args(root: Path, images: Path, output_dir: Path) -> list[str]:
    """examples/encode_corpus.py's command line: the tiny checkpoint under `root` over `images`, shards of 3."""
    return command_line(model=root / "checkpoint", images=images, shard_size=3, output_dir=output_dir)


def _launch_on_cpu(options: list[str], script: str, *arguments: object) -> str:
    """`accelerate launch OPTIONS tests/distributed/SCRIPT ARGUMENTS` on CPU processes (gloo, one thread each, this
    folder and tests/distributed importable); asserts that it exits 0 and returns its output (stdout, then stderr)."""
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "ACCELERATE_USE_CPU": "true",
        "PYTHONPATH": os.pathsep.join([str(DISTRIBUTED), str(Path(__file__).parent), *sys.path]),
    }
    accelerate = shutil.which("accelerate", path=str(Path(sys.executable).parent)) or "accelerate"
    command = [accelerate, "launch", *options, str(DISTRIBUTED / script), *map(str, arguments)]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    return result.stdout + result.stderr


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory):
    """Launch once; returns (folder, synthetic data, tiny checkpoint, launch output)."""
    root = tmp_path_factory.mktemp("accelerate")
    synthetic = root / "synthetic"
    write_mini_mmeb(synthetic, num_train=4, num_dev=2, num_test=1, image_size=56)
    model, _ = tiny_coma()
    model.save_pretrained(root / "checkpoint")
    (root / "out").mkdir()
    log = _launch_on_cpu(
        (
            "--multi_gpu --num_processes 2 --num_machines 1 --mixed_precision no --dynamo_backend no"
            " --main_process_port 29533"
        ).split(),
        "under_accelerate.py",
        str(root / "out"),
        str(root / "checkpoint"),
        "--",
        "pretrain",
        *STAGE1,
        *command_line("--per_device_train_batch_size 2", synthetic_dir=synthetic, output_dir=root / "stage1-two"),
        "--",
        "train_contrastive",
        *STAGE2,
        *command_line(
            "--per_device_train_batch_size 4",
            synthetic_dir=synthetic,
            model_name_or_path=root / "checkpoint",
            output_dir=root / "stage2-two",
        ),
        "--",
        "encode_corpus",
        *_corpus_args(root, _corpus_images(root), root / "corpus-two"),
        "--",
        "pretrain",
        *STAGE1_RELEASED,
        *command_line(synthetic_dir=root / "released-scenes", output_dir=root / "stage1-released-two"),
        "--",
        "train_contrastive",
        *STAGE2_RELEASED,
        *command_line(
            synthetic_dir=synthetic, model_name_or_path=root / "checkpoint", output_dir=root / "stage2-released-two"
        ),
    )
    return root, synthetic, log


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["plain", "cached"])
def test_gathered_loss_and_gradients_equal_one_process_on_the_whole_batch(two_processes, mode):
    from sentence_transformers import SentenceTransformer

    root, _, _ = two_processes
    ranks = [torch.load(root / "out" / f"{mode}.{rank}.pt") for rank in range(2)]
    st = SentenceTransformer(str(root / "checkpoint"), trust_remote_code=True, device="cpu")
    st.train()
    loss = CoMaContrastiveLoss(st, cached=False, symmetric=True)([st.preprocess(column) for column in batch()], None)
    loss.backward()
    # each process averages over its own anchors; DDP averages the processes' gradients
    torch.testing.assert_close((ranks[0]["loss"] + ranks[1]["loss"]) / 2, loss.detach(), rtol=1e-5, atol=1e-6)
    compared = 0
    for name, parameter in st.named_parameters():
        if parameter.grad is None:
            continue
        averaged = (ranks[0]["grads"][name] + ranks[1]["grads"][name]) / 2
        torch.testing.assert_close(averaged, parameter.grad, rtol=1e-4, atol=1e-6, msg=name)
        compared += 1
    assert compared > 10


def _assert_same_weights(first: Path, second: Path, start: Path | None = None) -> None:
    one, two = load_file(str(first / "model.safetensors")), load_file(str(second / "model.safetensors"))
    assert one.keys() == two.keys()
    for name in one:
        torch.testing.assert_close(two[name], one[name], **WEIGHT_TOLERANCE, msg=name)
    if start is not None:  # not vacuous: training moved the weights
        initial = load_file(str(start / "model.safetensors"))
        assert any(not torch.allclose(initial[name], one[name], **WEIGHT_TOLERANCE) for name in one if name in initial)


@pytest.mark.slow
def test_stage_one_on_two_processes_matches_one_process_with_the_same_global_batch(two_processes, tmp_path):
    root, synthetic, log = two_processes
    assert "Stage 1: per-device batch 2 × accumulation 1 × 2 processes = global batch 4" in log
    load_example("pretrain").main(
        STAGE1
        + command_line("--per_device_train_batch_size 4", synthetic_dir=synthetic, output_dir=tmp_path / "stage1-one")
    )
    _assert_same_weights(tmp_path / "stage1-one", root / "stage1-two")


@pytest.mark.slow
def test_stage_two_on_two_processes_with_gathering_matches_one_process(two_processes, tmp_path):
    root, synthetic, log = two_processes
    assert "Stage 2: per-device batch 4 × accumulation 1 × 2 processes = global batch 8" in log
    load_example("train_contrastive").main(
        STAGE2
        + command_line(
            "--per_device_train_batch_size 8",
            synthetic_dir=synthetic,
            model_name_or_path=root / "checkpoint",
            output_dir=tmp_path / "stage2-one",
        )
    )
    _assert_same_weights(tmp_path / "stage2-one", root / "stage2-two", start=root / "checkpoint")


@pytest.mark.slow
@pytest.mark.parametrize(
    ("stage", "script", "summary", "split"),
    [
        ("stage1", "pretrain", "pretrain_summary.json", (1, 4)),
        ("stage2", "train_contrastive", "contrastive_summary.json", (4, 1)),
    ],
)
def test_the_released_recipe_on_two_processes_trains_on_the_global_batch_it_states(
    two_processes, tmp_path, stage, script, summary, split
):
    """No per-device flag: the script splits the stated global batch over the two processes, logs the split, and the
    first optimizer step trains on exactly that many rows; one process on the same global batch gives the same
    weights (the per-sample-mean loss and the chunked batches hold across processes and accumulation)."""
    root, synthetic, log = two_processes
    two = root / f"{stage}-released-two"
    recorded = json.loads((two / summary).read_text())
    assert recorded["recipe"] == "released"
    assert recorded["batch"]["global_train_batch_size"] == RELEASED_GLOBAL_BATCH == recorded["first_step_rows"]
    assert (recorded["batch"]["per_device"], recorded["batch"]["accumulation"], recorded["batch"]["processes"]) == (
        *split,
        2,
    )
    per_device, accumulation = split
    assert (
        f"Batch: global batch {RELEASED_GLOBAL_BATCH} = per-device batch {per_device} × accumulation {accumulation}"
        " × 2 processes (derived from the global batch)"
    ) in log
    if stage == "stage1":
        arguments = STAGE1_RELEASED + command_line(synthetic_dir=root / "released-scenes", output_dir=tmp_path / "one")
    else:
        assert recorded["pooling"] == {"training": "mean", "evaluation": "last"}
        assert json.loads((two / "config.json").read_text())["pooling"] == "last"
        arguments = STAGE2_RELEASED + command_line(
            synthetic_dir=synthetic, model_name_or_path=root / "checkpoint", output_dir=tmp_path / "one"
        )
    one = load_example(script).main(arguments)
    assert one["batch"]["processes"] == 1 and one["first_step_rows"] == RELEASED_GLOBAL_BATCH
    _assert_same_weights(tmp_path / "one", two, start=None if stage == "stage1" else root / "checkpoint")


def test_the_launched_helpers_split_their_arguments_into_script_segments():
    from utils import script_segments

    arguments = ["OUTPUT", "--", "pretrain", "--seed", "3", "--", "encode_corpus", "--", "pretrain", "--x", "--y"]
    assert script_segments(arguments) == [
        ("pretrain", ["--seed", "3"]),
        ("encode_corpus", []),
        ("pretrain", ["--x", "--y"]),
    ]
    assert script_segments(["OUTPUT"]) == []


@pytest.mark.parametrize("config", ["ddp", "fsdp", "deepspeed_zero2", "deepspeed_zero3"])
def test_accelerate_configs_load_and_name_their_deepspeed_files(config):
    from accelerate.commands.config.config_args import load_config_from_file

    root = Path(__file__).parents[1]
    loaded = load_config_from_file(str(root / "examples" / "configs" / f"accelerate_{config}.yaml"))
    expected = {"ddp": "MULTI_GPU", "fsdp": "FSDP"}.get(config, "DEEPSPEED")
    assert loaded.distributed_type.value == expected and loaded.num_processes == 8
    if expected == "DEEPSPEED":
        settings = json.loads((root / loaded.deepspeed_config["deepspeed_config_file"]).read_text())
        assert settings["zero_optimization"]["stage"] == int(config[-1])
        assert settings["train_micro_batch_size_per_gpu"] == "auto"  # Trainer fills it from the command line


@pytest.mark.slow
def test_lora_with_sharded_parameters_stops_before_training(monkeypatch, tmp_path):
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    with pytest.raises(SystemExit, match="LoRA runs are merged before saving"):
        load_example("pretrain").main(["--use_lora", "true", "--output_dir", str(tmp_path / "never")])
    with pytest.raises(SystemExit, match="Stage 2 does not support parameter sharding"):
        load_example("train_contrastive").main(["--output_dir", str(tmp_path / "never")])
    assert not (tmp_path / "never").exists()


@pytest.mark.slow
def test_encode_corpus_on_two_processes_writes_the_shards_of_one_process(two_processes):
    from coma_hf import inference

    root, _, log = two_processes
    assert (
        "process 0: {'rows': 10, 'embedded': 6" in log and "process 1: {'rows': 10, 'embedded': 4" in log
    )  # 2 shards each
    load_example("encode_corpus").main(_corpus_args(root, root / "corpus-images", root / "corpus-one"))
    two, one = inference.finished_shards(root / "corpus-two"), inference.finished_shards(root / "corpus-one")
    assert [path.name for path in two] == [path.name for path in one] and len(one) == 4
    for first, second in zip(one, two, strict=False):
        ids, vectors, _ = inference.read_shard(first)
        ids2, vectors2, _ = inference.read_shard(second)
        assert ids == ids2
        torch.testing.assert_close(vectors2, vectors, rtol=1e-5, atol=1e-6)
    manifest = json.loads((root / "corpus-two" / "manifest.json").read_text())
    assert manifest["rows"] == manifest["embedded"] == 10


# ---- FSDP2: the shipped config on two CPU processes -----------------------------------------------------------------
FSDP_CONFIG = Path(__file__).parents[1] / "examples" / "configs" / "accelerate_fsdp.yaml"
# SGD with momentum: linear in the gradients (equal gradients, equal weights), and it keeps a tensor per parameter,
# without which resuming fails in torch 2.13 (`set_optimizer_state_dict` of a full state dict finds its device from
# the optimizer's own tensors: "AssertionError: Expected device to be set"; see docs/distributed.md).
FSDP_STAGE1 = STAGE1 + ["--use_lora", "false", "--optim_args", "momentum=0.9"]


@pytest.fixture(scope="module")
def fsdp_processes(tmp_path_factory):
    """One `accelerate launch --config_file accelerate_fsdp.yaml --num_processes 2 --mixed_precision no` on CPU
    (`ACCELERATE_USE_CPU`; `--cpu` would drop FSDP and launch one process): stage 1 with per-device batch 2 and a
    checkpoint at step 2, stage 1 again resumed from that checkpoint, then stage 2 and a LoRA stage 1, which must stop.
    Returns (folder, launch output, per-segment record of rank 0)."""
    root = tmp_path_factory.mktemp("fsdp")
    log = _launch_on_cpu(
        [
            "--config_file",
            str(FSDP_CONFIG),
            *"--num_processes 2 --mixed_precision no --main_process_port 29534".split(),
        ],
        "fsdp_on_cpu.py",
        str(root / "record"),
        "--",
        "pretrain",
        *FSDP_STAGE1,
        *command_line(
            "--per_device_train_batch_size 2 --save_strategy steps --save_steps 2",
            synthetic_dir=root / "scenes",
            output_dir=root / "stage1",
        ),
        "--",
        "pretrain",
        *FSDP_STAGE1,
        *command_line(
            "--per_device_train_batch_size 2",
            synthetic_dir=root / "scenes",
            output_dir=root / "stage1-resumed",
            resume_from_checkpoint=root / "stage1" / "checkpoint-2",
        ),
        "--",
        "train_contrastive",
        *command_line(output_dir=root / "stage2"),
        "--",
        "pretrain",
        *command_line("--use_lora true", output_dir=root / "stage1-lora"),
    )
    records = [json.loads(Path(f"{root / 'record'}.{rank}").read_text()) for rank in range(2)]
    assert records[0] == records[1]
    return root, log, records[0]


@pytest.mark.parametrize("family", FAMILIES)
def test_the_model_names_only_its_own_blocks_for_fsdp_wrapping(family):
    """accelerate's FSDP wrap policy (TRANSFORMER_BASED_WRAP) wraps the classes `_no_split_modules` names and stops
    on any the model lacks: a list of every family's blocks made the shipped FSDP config fail on every backbone."""
    model, _ = tiny_coma(family)
    present = {type(module).__name__ for module in model.modules()}
    assert model._no_split_modules and set(model._no_split_modules) <= present
    assert {type(layer).__name__ for layer in model.model.language_model.layers} <= set(model._no_split_modules)
    assert {type(block).__name__ for block in model.model.visual.blocks} <= set(model._no_split_modules)


@pytest.mark.slow
def test_fsdp_stage_one_on_two_processes_matches_one_process_with_the_same_global_batch(fsdp_processes, tmp_path):
    root, log, record = fsdp_processes
    trained = record[0]
    assert trained["script"] == "pretrain" and trained["exit"] is None
    assert (trained["distributed_type"], trained["fsdp_version"]) == ("FSDP", 2)
    # the shipped config's policy wrapped the backbone's own decoder and vision blocks
    assert trained["wrapped_layers"] == ["Qwen2_5_VLDecoderLayer", "Qwen2_5_VLVisionBlock"]
    # and FSDP2 sharded them: those blocks (and the root) are FSDPModules, every parameter a DTensor, and on each rank
    # the local shard of every parameter that can be split is smaller than the whole (what DDP would never do)
    sharding = trained["sharding"]
    assert {"Qwen2_5_VLDecoderLayer", "Qwen2_5_VLVisionBlock"} <= {
        name.removeprefix("FSDP") for name in sharding["fsdp_modules"]
    }
    assert sharding["dtensors_sharded_on_dim0"] == sharding["parameters"] > 0
    assert sharding["smaller_here"] == sharding["splittable"] > 0.9 * sharding["parameters"]
    assert "Stage 1: per-device batch 2 × accumulation 1 × 2 processes = global batch 4" in log
    one = load_example("pretrain").main(
        FSDP_STAGE1
        + command_line("--per_device_train_batch_size 4", synthetic_dir=root / "scenes", output_dir=tmp_path / "one")
    )
    two = json.loads((root / "stage1" / "pretrain_summary.json").read_text())
    assert two["initial_weights"] == one["initial_weights"]  # the same start
    assert two["train_loss_last"] < two["train_loss_first"]
    _assert_same_weights(tmp_path / "one", root / "stage1")


# A fresh interpreter in which `import coma_hf` fails (`run_without_coma`): the checkpoint's own remote code, through
# AutoModel and SentenceTransformer (the vectors of both, then each loader's, in one file).
WITHOUT_PACKAGE = textwrap.dedent(
    """
    import sys
    from safetensors.torch import save_file
    from sentence_transformers import SentenceTransformer
    from transformers import AutoModel

    folder, first, second, output = sys.argv[1:5]
    inputs = [{"image": first}, "a circle", {"image": second, "text": "what?"}]
    model = AutoModel.from_pretrained(folder, trust_remote_code=True).eval()
    st = SentenceTransformer(folder, trust_remote_code=True, device="cpu")
    save_file({
        "auto": model.encode(inputs), "st": st.encode(inputs, convert_to_tensor=True).float().contiguous()
    }, output)
    """
)


@pytest.mark.slow
def test_the_fsdp_checkpoint_loads_everywhere_with_the_same_vectors(fsdp_processes, tmp_path):
    """Saved from FSDP2's in-place subclass (`FSDPCoMaModel`), the checkpoint still names CoMa's own class and carries
    the remote code, not torch's FSDP files; AutoModel and SentenceTransformer where coma_hf is not installed, and the
    package's CoMaModel, give the same vectors."""
    from coma_hf import CoMaModel

    root, _, _ = fsdp_processes
    folder = root / "stage1"
    assert json.loads((folder / "config.json").read_text())["auto_map"]["AutoModel"] == "modeling_coma.CoMaModel"
    assert {path.name for path in folder.glob("*.py")} == REMOTE_CODE_FILES
    assert (folder / "README.md").is_file() and (folder / "processor_config.json").is_file()
    images = [tmp_path / "first.png", tmp_path / "second.png"]
    for seed, (path, size) in enumerate(zip(images, [(56, 56), (56, 84)], strict=True)):
        random_image(seed, size).save(path)
    output = tmp_path / "vectors.safetensors"
    run_without_coma(WITHOUT_PACKAGE, [folder, *images, output], tmp_path / "home", tmp_path)
    remote = load_file(str(output))
    inputs = [{"image": str(images[0])}, "a circle", {"image": str(images[1]), "text": "what?"}]
    vectors = CoMaModel.from_pretrained(folder).eval().encode(inputs)
    torch.testing.assert_close(remote["auto"], vectors, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(remote["st"], vectors, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_fsdp_stage_one_resumed_from_its_checkpoint_ends_where_the_uninterrupted_run_ends(fsdp_processes):
    """Trainer's `checkpoint-N` of a sharded run (model, optimizer and RNG states from accelerate's FSDP2 save) names
    CoMa's class like the final save, and resuming from it under FSDP gives the uninterrupted run's weights."""
    root, _, record = fsdp_processes
    assert record[1]["exit"] is None and record[1]["distributed_type"] == "FSDP"
    checkpoint = root / "stage1" / "checkpoint-2"
    assert json.loads((checkpoint / "config.json").read_text())["auto_map"]["AutoModel"] == "modeling_coma.CoMaModel"
    assert {path.name for path in checkpoint.glob("*.py")} == REMOTE_CODE_FILES
    resumed = json.loads((root / "stage1-resumed" / "pretrain_summary.json").read_text())
    assert resumed["train_loss_steps"] == [3, 3]  # it trained step 3 only
    _assert_same_weights(root / "stage1", root / "stage1-resumed")


@pytest.mark.slow
def test_the_fsdp_launch_refuses_stage_two_and_lora_before_training(fsdp_processes):
    from coma_hf.training.peft import NO_SHARDED_STAGE2

    root, _, record = fsdp_processes
    stage2, lora = record[2:]
    assert (stage2["script"], stage2["exit"]) == ("train_contrastive", NO_SHARDED_STAGE2)
    assert lora["script"] == "pretrain" and lora["exit"].startswith("LoRA runs are merged before saving")
    assert not (root / "stage2").exists() and not (root / "stage1-lora").exists()


def test_a_model_swapped_to_fsdp2s_subclass_saves_as_its_own_class(tmp_path):
    """What `fully_shard` does to the model's class (swapped in place for `type("FSDP" + name, (FSDPModule, class),
    ...)`, which lives in the module that made it), undone for the save by `restored_class`: the checkpoint names
    CoMa's class and carries its files (saved as the subclass it names the subclass and copies the wrong module)."""
    import copy

    from torch.distributed.fsdp import FSDPModule

    from coma_hf.training.trainers import restored_class, unsharded_class

    model = copy.deepcopy(tiny_coma()[0])
    own = type(model)
    model.__class__ = type(f"FSDP{own.__name__}", (FSDPModule, own), {})
    assert unsharded_class(model) is own
    with restored_class(model):
        model.save_pretrained(tmp_path / "saved")
    assert type(model).__name__ == "FSDPCoMaModel"  # swapped back after the block
    assert json.loads((tmp_path / "saved" / "config.json").read_text())["auto_map"]["AutoModel"] == (
        "modeling_coma.CoMaModel"
    )
    assert {path.name for path in (tmp_path / "saved").glob("*.py")} == REMOTE_CODE_FILES


def test_tied_weights_of_a_gathered_state_dict_are_shared_again():
    import copy

    from coma_hf.training.trainers import share_tied_weights

    model = tiny_coma()[0]
    tied, source = next(iter(model.all_tied_weights_keys.items()))
    gathered = {name: tensor.clone() for name, tensor in model.state_dict().items()}  # one copy per name
    assert share_tied_weights(gathered, model)[tied] is gathered[source]
    untied = copy.deepcopy(model)
    untied.lm_head.weight = torch.nn.Parameter(untied.lm_head.weight.detach().clone())
    gathered = {name: tensor.clone() for name, tensor in untied.state_dict().items()}
    assert share_tied_weights(gathered, untied)[tied] is not gathered[source]
