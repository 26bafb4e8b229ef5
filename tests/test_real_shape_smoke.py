"""benchmarks/real_shape_smoke.py at reduced width (`--shrink`): the paper recipe's whole path, phase by phase in
fresh processes — bf16 build, a DoRA stage-1 step, merge, sharded save, the vectors through AutoModel and
SentenceTransformer where coma_hf cannot be imported, fp32 agreement, a GradCache stage-2 step — and the runner's
resuming. The full-size run is not for CI (see docs/performance.md)."""

from __future__ import annotations

import importlib.util
import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

SCRIPT = Path(__file__).parents[1] / "benchmarks" / "real_shape_smoke.py"
SHARD_LIMIT = "20MB"  # below the shrunk model's size, so a save must write several files


def _benchmark():
    spec = importlib.util.spec_from_file_location("real_shape_smoke", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve their annotations through sys.modules
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def benchmark():
    return _benchmark()


@pytest.fixture(scope="module")
def shrunk_run(benchmark, tmp_path_factory):
    """One `--shrink --use_dora` run through every phase, in a fresh work folder: (report, work folder)."""
    work = tmp_path_factory.mktemp("smoke") / "work"
    committed = benchmark.DEFAULT_OUTPUT.stat().st_mtime_ns if benchmark.DEFAULT_OUTPUT.exists() else None
    report = benchmark.main(["--shrink", "--use_dora", "--work_dir", str(work), "--max_shard_size", SHARD_LIMIT])
    after = benchmark.DEFAULT_OUTPUT.stat().st_mtime_ns if benchmark.DEFAULT_OUTPUT.exists() else None
    assert after == committed  # a shrunk run never writes the committed full-size record
    return report, work


@pytest.mark.slow
def test_every_phase_is_recorded_with_time_memory_and_counts(benchmark, shrunk_run):
    report, work = shrunk_run
    assert report["complete"] and list(report["phases"]) == list(benchmark.PHASES)
    assert json.loads((work / "report.json").read_text()) == report  # the shrunk report stays in the work folder
    for phase, record in report["phases"].items():
        assert record["process_seconds"] >= record["seconds"] > 0, phase
        assert record["peak_rss_bytes"] >= record["peak_anonymous_bytes"] > 0, phase
        assert record["parameters"] > 0 and "trainable_parameters" in record, phase
    projected = report["projection"]["projected_seconds"]
    assert set(projected) == set(benchmark.PHASES) and all(seconds > 0 for seconds in projected.values())
    # the shrunk config has one layer and one block, as the probe: nothing to scale
    assert all(ratio == pytest.approx(1.0) for ratio in report["projection"]["depth_ratios"].values())

    build = report["phases"]["build"]
    assert build["parameter_dtypes"] == ["torch.bfloat16"]
    assert build["vocabulary_rows"] == 151936 and build["tied_embeddings"] and build["num_compression_tokens"] == 32


@pytest.mark.slow
def test_saves_are_sharded_within_the_limit(benchmark, shrunk_run):
    from transformers.utils.hub import convert_file_size_to_int

    report, work = shrunk_run
    limit = convert_file_size_to_int(SHARD_LIMIT)
    for folder, phase in (("initial", "build"), ("stage1", "merge")):
        shards = sorted((work / folder).glob("model-*.safetensors"))
        assert len(shards) > 1, folder
        index = json.loads((work / folder / "model.safetensors.index.json").read_text())
        assert sorted(set(index["weight_map"].values())) == [shard.name for shard in shards]
        for shard in shards:  # within the limit, or a single tensor larger than it (transformers' rule)
            with safe_open(str(shard), "pt") as handle:
                alone = len(list(handle.keys())) == 1
            assert shard.stat().st_size <= limit or alone, shard.name
        assert report["phases"][phase]["saved"]["all_within_limit"]


@pytest.mark.slow
def test_stage1_trains_dora_and_the_compression_rows_only(shrunk_run):
    report, _ = shrunk_run
    stage1 = report["phases"]["stage1"]
    expected = stage1["expected_trainable_parameters"]
    assert stage1["trainable_parameters"] == expected["total"]
    assert expected["dora_magnitude"] > 0 and expected["compression_rows"] == 32 * 256  # K rows of the shrunk width
    assert stage1["vision_trainable_parameters"] == 0 and stage1["vision_unchanged"]
    # A starts random and B at zero, so one step moves B, DoRA's magnitudes and the rows, not yet A
    assert stage1["tensors"]["changed"] == ["lora_B", "lora_magnitude_vector", "trainable_tokens"]
    assert stage1["tensors"]["unchanged"] == ["lora_A"]
    assert stage1["bf16_autocast"] and stage1["activation_checkpointing"] and stage1["use_dora"]
    assert torch.isfinite(torch.tensor(stage1["loss"]))

    merge = report["phases"]["merge"]
    assert merge["compression_rows_as_trained"] and merge["vision_unchanged"] and merge["tied_embeddings"]
    assert merge["parameters"] == report["phases"]["build"]["parameters"]  # nothing of the adapter is left


@pytest.mark.slow
def test_fresh_processes_without_the_package_give_the_reference_vectors(benchmark, shrunk_run):
    report, work = shrunk_run
    reference = load_file(str(work / "reference_vectors.safetensors"))["vectors"]
    assert reference.shape == (3, 256)
    # normalised in bfloat16, then widened: unit norm to bf16's rounding
    torch.testing.assert_close(reference.norm(dim=-1), torch.ones(3), atol=1e-2, rtol=0)
    assert not torch.allclose(reference[0], reference[1])  # image and text differ: the comparison is not vacuous
    for phase in benchmark.WITHOUT_PACKAGE:
        record = report["phases"][phase]
        assert not record["coma_hf_importable"], phase
        assert record["model_class"].startswith("transformers_modules."), phase  # the checkpoint's own code
        assert record["dtype"] == "torch.bfloat16", phase
        assert record["equal"] and record["max_abs_difference"] <= 1e-5, phase

    fp32 = report["phases"]["fp32"]
    assert fp32["dtype"] == "torch.float32"
    assert fp32["min_cosine_to_bf16"] >= 0.999 and fp32["agrees"]


@pytest.mark.slow
def test_stage2_step_uses_gradcache_mini_batches_and_moves_the_lora(shrunk_run):
    report, _ = shrunk_run
    stage2 = report["phases"]["stage2"]
    assert stage2["trainable_parameters"] == stage2["expected_trainable_parameters"]["total"]
    calls = stage2["forward_calls"]
    assert all(call["rows"] == 2 for call in calls)  # mini-batches of 2 from a batch of 4
    # GradCache: anchors and positives once without a graph, then again with one, mini-batch by mini-batch
    assert [call["grad"] for call in calls] == [False] * 4 + [True] * 4
    assert "lora_B" in stage2["tensors"]["changed"] and "trainable_tokens" in stage2["tensors"]["changed"]
    assert torch.isfinite(torch.tensor(stage2["loss"]))


@pytest.mark.slow
def test_a_killed_run_resumes_at_the_first_phase_without_a_record(benchmark, shrunk_run, tmp_path, monkeypatch):
    _, work = shrunk_run
    resumed = tmp_path / "work"
    shutil.copytree(work / "records", resumed / "records")
    shutil.copy(work / "run.json", resumed / "run.json")
    for phase in ("fp32", "stage2"):  # as if killed during fp32
        (resumed / "records" / f"{phase}.json").unlink()
    spawned = []

    def spawn(phase, run, files):
        spawned.append(phase)
        record = json.loads((work / "records" / f"{phase}.json").read_text())
        files.record(phase).write_text(json.dumps(record))
        return record

    monkeypatch.setattr(benchmark, "spawn", spawn)
    arguments = ["--shrink", "--use_dora", "--work_dir", str(resumed), "--max_shard_size", SHARD_LIMIT]
    report = benchmark.main(arguments)
    assert spawned == ["fp32", "stage2"] and report["complete"]  # the projection was recorded: not run again

    with pytest.raises(SystemExit, match="other settings"):  # a work folder belongs to one run
        benchmark.main(["--shrink", "--work_dir", str(resumed), "--max_shard_size", SHARD_LIMIT])
    with pytest.raises(SystemExit, match="run 'stage1' first"):
        benchmark.main(["--shrink", "--work_dir", str(tmp_path / "empty"), "--phases", "merge", "--no_projection"])
    with pytest.raises(SystemExit, match="unknown phases"):
        benchmark.main(["--shrink", "--work_dir", str(tmp_path / "empty"), "--phases", "bulid"])


@pytest.mark.parametrize("use_dora", [False, True])
def test_the_recipe_targets_language_model_attention_and_the_compression_rows(benchmark, use_dora, tmp_path):
    """In process, on the shrunk published config: peft's trainable parameters are the LoRA of every language-model
    layer's q/k/v/o (DoRA's magnitudes with it) and the K compression rows, and nothing in the vision tower."""
    from coma_hf.training import apply_lora

    run = benchmark.Run(shrink=True, use_dora=use_dora)
    model = benchmark.build_model(benchmark.published_config(shrink=True), seed=0)
    lora = benchmark.lora_arguments("stage1", run)
    peft_model = apply_lora(model, lora)
    trainable = [name for name, p in peft_model.named_parameters() if p.requires_grad]
    expected = benchmark.expected_trainable(model.config.backbone_config, lora, 32)
    assert sum(p.numel() for p in peft_model.parameters() if p.requires_grad) == expected["total"]
    assert (expected["dora_magnitude"] > 0) == use_dora
    adapted = {name.split(".lora_")[0] for name in trainable if ".lora_" in name}
    layers = model.config.get_text_config().num_hidden_layers
    assert len(adapted) == 4 * layers
    assert all(
        ".language_model.layers." in name and name.endswith(("q_proj", "k_proj", "v_proj", "o_proj"))
        for name in adapted
    )
    assert not any("visual" in name for name in trainable)

    # the projection's depth scaling: a probe of this width against the full 3B depth (36 layers, 32 blocks)
    files = benchmark.Files(tmp_path)
    benchmark.write_images(files, run.seed)
    features = model.processor.process_embedding_inputs(benchmark.reference_inputs(files))
    full = benchmark.published_config(shrink=False)
    forward = benchmark.depth_ratio(model, full, features)
    step = benchmark.depth_ratio(model, full, features, language_passes=3)
    assert 1 < forward < step <= 36


def test_save_checkpoint_shards_at_the_package_limit_unless_told(tmp_path, monkeypatch):
    """Both trainers' merged saves go through `save_checkpoint`: by default it asks for shards of at most 2GB
    (transformers' own default, 50GB, writes a 3B model as one file); an explicit size wins."""
    from transformers.utils.hub import convert_file_size_to_int

    from coma_hf import CoMaModel, save_checkpoint
    from coma_hf.saving import MAX_SHARD_SIZE

    from utils import tiny_coma

    assert convert_file_size_to_int(MAX_SHARD_SIZE) == 2 * 10**9
    asked = []
    original = CoMaModel.save_pretrained

    def save_pretrained(self, folder, *args, **kwargs):
        asked.append(kwargs.get("max_shard_size"))
        return original(self, folder, *args, **kwargs)

    monkeypatch.setattr(CoMaModel, "save_pretrained", save_pretrained)
    model, _ = tiny_coma()
    save_checkpoint(model, tmp_path / "default")
    save_checkpoint(model, tmp_path / "small", max_shard_size="200KB")
    assert asked == [MAX_SHARD_SIZE, "200KB"]
    assert len(list((tmp_path / "default").glob("*.safetensors"))) == 1  # the tiny model fits in one
    assert len(list((tmp_path / "small").glob("model-*.safetensors"))) > 1
    reloaded = CoMaModel.from_pretrained(tmp_path / "small")
    for name, tensor in model.state_dict().items():
        torch.testing.assert_close(reloaded.state_dict()[name], tensor, rtol=0, atol=0, msg=name)
