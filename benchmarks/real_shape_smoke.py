"""The paper recipe at the real Qwen2.5-VL-3B shape, on the CPU: build, train, merge, save, reload everywhere.

From the published Qwen2.5-VL-3B config in `tests/fixtures` (full size, random weights), phase by phase:

  build                 the stock backbone built from its config directly in bfloat16 (never an fp32 copy), CoMa
                        with K=32 through `CoMaModel.from_backbone`, saved (`save_checkpoint`, shards ≤ the limit)
  stage1                the paper's stage-1 recipe (`examples/configs/stage1_paper.json`: LoRA r16/α64 on q/k/v/o,
                        DoRA with --use_dora, the K compression rows trainable, vision frozen) and one optimizer
                        step of `CoMaCompressionTrainer` on two samples (a 448×448 image, three QA turns each);
                        the adapter is saved
  merge                 the adapter merged into the weights, saved with `save_checkpoint(max_shard_size=...)`
  reference             the merged checkpoint's vectors of an image, a text and both (coma_hf's `CoMaModel`)
  automodel             a fresh process in which `coma_hf` cannot be imported: `AutoModel.from_pretrained(...,
                        trust_remote_code=True)` and the same three vectors
  sentence_transformer  the same through `SentenceTransformer(..., trust_remote_code=True)`
  fp32                  the same checkpoint loaded in float32: per-row cosine to the bfloat16 vectors
  stage2                a fresh stage-2 LoRA and one step of `CoMaContrastiveLoss` with GradCache (batch 4,
                        mini-batches of 2)

Every phase runs in its own process (one model in memory at a time; its peak resident memory is that process's
`ru_maxrss`), writes its record into `--work_dir`, and the JSON report (`--output`) is rewritten after each one. A
killed run started again with the same `--work_dir` resumes at the first phase without a record. Before the first
phase the script prints a projected time per phase, from timing a one-layer model of the same width (`projection`).

    python benchmarks/real_shape_smoke.py --work_dir outputs/real_shape_smoke            # 3B shape, LoRA
    python benchmarks/real_shape_smoke.py --work_dir outputs/real_shape_smoke_dora --use_dora
    python benchmarks/real_shape_smoke.py --shrink --work_dir outputs/smoke_small        # reduced width (CI)
    python benchmarks/real_shape_smoke.py --work_dir outputs/real_shape_smoke --phases build  # one phase

`--shrink` runs the same path on `shrink_config` of the same published config (vocabulary 151,936, tied embeddings,
special ids, patch/merge sizes and rope sections kept; width and depth cut); its report goes under the work folder
unless `--output` says otherwise, so it never replaces the committed full-size record.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
PUBLISHED_CONFIG = ROOT / "tests" / "fixtures" / "qwen2_5_vl_3b_instruct.json"
PRESETS = ROOT / "examples" / "configs"
DEFAULT_OUTPUT = ROOT / "benchmarks" / "results" / "real_shape_smoke.json"

PHASES = ("build", "stage1", "merge", "reference", "automodel", "sentence_transformer", "fp32", "stage2")
NEEDS = {  # phase → the phase whose files it reads
    "stage1": "build",
    "merge": "stage1",
    "reference": "merge",
    "automodel": "reference",
    "sentence_transformer": "reference",
    "fp32": "reference",
    "stage2": "merge",
}
WITHOUT_PACKAGE = ("automodel", "sentence_transformer")  # phases run where `import coma_hf` fails
PROJECTION = "projection"

DTYPE = torch.bfloat16  # the recipe's precision, and the dtype every phase builds and loads in
IMAGE_SIDE = 448  # 16×16 visual tokens of 28×28 px: 256, the paper's lower bound
NUM_IMAGES = 4  # two for stage 1, four for stage 2
STAGE1_BATCH = 2
STAGE2_BATCH, STAGE2_MINI_BATCH = 4, 2
VECTOR_TOLERANCE = 1e-5  # fresh-process vectors against the reference (same dtype, same batch: equal in practice)
MIN_FP32_COSINE = 0.999  # bf16 against fp32, per row
CAPTION = "a red circle left of two blue squares on a wooden table"
TURNS = (
    {"question": "What colour is the circle?", "answer": "The circle is red."},
    {"question": "How many squares are there, and what colour are they?", "answer": "Two squares, both blue."},
    {"question": "Where is the circle relative to the squares?", "answer": "To the left of the squares."},
)


# ---- settings and files ---------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Run:
    """What a run is: the same settings must be given to resume it."""

    shrink: bool = False
    use_dora: bool = False
    max_shard_size: str | None = None  # the runner resolves None to the package's `coma_hf.saving.MAX_SHARD_SIZE`
    seed: int = 0


@dataclasses.dataclass(frozen=True)
class Files:
    """Where the phases of a run keep what they hand on, all inside the work folder."""

    work_dir: Path

    @property
    def records(self) -> Path:
        return self.work_dir / "records"

    @property
    def images(self) -> list[Path]:
        return [self.work_dir / "images" / f"image_{index}.png" for index in range(NUM_IMAGES)]

    @property
    def initial(self) -> Path:  # CoMa before any training
        return self.work_dir / "initial"

    @property
    def adapter(self) -> Path:  # the stage-1 LoRA (and trainable-token rows)
        return self.work_dir / "stage1_adapter"

    @property
    def trained_rows(self) -> Path:  # the K compression rows as the stage-1 step left them
        return self.work_dir / "stage1_rows.safetensors"

    @property
    def merged(self) -> Path:  # the stage-1 checkpoint, adapter merged
        return self.work_dir / "stage1"

    @property
    def reference(self) -> Path:
        return self.work_dir / "reference_vectors.safetensors"

    @property
    def hf_home(self) -> Path:  # the remote-code module cache of the fresh processes
        return self.work_dir / "hf_home"

    def record(self, phase: str) -> Path:
        return self.records / f"{phase}.json"


def published_config(shrink: bool, probe: bool = False):
    """The published Qwen2.5-VL-3B config (`shrink`: `coma_hf.tiny.shrink_config` of it); `probe`: one language-model
    layer and one vision block at the same width (what the projection times)."""
    from transformers import AutoConfig

    raw = json.loads(PUBLISHED_CONFIG.read_text())
    config = AutoConfig.for_model(raw.pop("model_type"), **raw)
    if shrink:
        from coma_hf.tiny import shrink_config

        config = shrink_config(config)
    if probe:
        text, vision = config.get_text_config(), config.vision_config
        text.num_hidden_layers = text.max_window_layers = 1
        if getattr(text, "layer_types", None) is not None:
            text.layer_types = list(text.layer_types)[:1]
        vision.depth, vision.fullatt_block_indexes = 1, [0]
    return config


def paper_preset(stage: str) -> dict:
    """The paper recipe's preset of `stage` (`examples/configs/{stage}_paper.json`), the one owner of its values."""
    from coma_hf.training import recipe_defaults

    return recipe_defaults("paper", stage, PRESETS)


def lora_arguments(stage: str, run: Run):
    """`LoraArguments` of the paper preset of `stage`, DoRA as `run` says."""
    from coma_hf.training import LoraArguments

    preset = paper_preset(stage)
    names = {field.name for field in dataclasses.fields(LoraArguments)}
    return LoraArguments(**{**{key: preset[key] for key in names if key in preset}, "use_dora": run.use_dora})


# ---- building -------------------------------------------------------------------------------------------------------
def build_model(config, seed: int):
    """CoMa (K from the stage-1 preset) over a random-weight stock backbone of `config`, built in `DTYPE`.

    `_from_config(..., dtype=)` creates and initialises every parameter in that dtype (transformers sets it as the
    default dtype during construction), so no float32 copy ever exists; `from_backbone` then moves the backbone's
    modules into a CoMa shell built on the meta device.
    """
    from coma_hf import CoMaModel
    from coma_hf.backbones import get_family
    from coma_hf.processing_coma import BackboneProcessorParts
    from coma_hf.tiny import QWEN_SPECIAL_TOKEN_START, build_image_processor, build_tokenizer

    preset = paper_preset("stage1")
    family = config.model_type
    tokenizer = build_tokenizer(special_token_start=QWEN_SPECIAL_TOKEN_START)  # special tokens at Qwen's ids
    torch.manual_seed(seed)
    backbone = get_family(family).generation_class._from_config(config, dtype=DTYPE, attn_implementation="sdpa")
    parts = BackboneProcessorParts(tokenizer, build_image_processor(family), tokenizer.chat_template)
    return CoMaModel.from_backbone(
        backbone,
        processor=parts,
        num_compression_tokens=preset["num_compression_tokens"],
        min_image_tokens=preset["min_image_tokens"],
        max_image_tokens=preset["max_image_tokens"],
        max_length=preset["max_length"],
        seed=seed,
    )


def write_images(files: Files, seed: int) -> None:
    """`NUM_IMAGES` deterministic 448×448 RGB noise images (PNG)."""
    import numpy as np
    from PIL import Image

    for index, path in enumerate(files.images):
        path.parent.mkdir(parents=True, exist_ok=True)
        pixels = np.random.RandomState(seed + index).randint(0, 256, (IMAGE_SIDE, IMAGE_SIDE, 3), dtype=np.uint8)
        Image.fromarray(pixels, "RGB").save(path)


def stage1_rows(files: Files) -> list[dict]:
    """The stage-1 batch: one row per image, the same caption and three QA turns."""
    return [
        {"id": f"sample-{index}", "image": str(path), "text": CAPTION, "conversation": list(TURNS)}
        for index, path in enumerate(files.images[:STAGE1_BATCH])
    ]


def reference_inputs(files: Files) -> list:
    """An image, a text, and both (the mixed-list form every path takes)."""
    return [{"image": str(files.images[0])}, CAPTION, {"image": str(files.images[1]), "text": CAPTION}]


# ---- counting -------------------------------------------------------------------------------------------------------
def parameter_counts(model) -> dict[str, int]:
    """Parameters (shared ones once) and those that require gradients."""
    parameters = list(model.parameters())  # `parameters()` yields a tied tensor once
    return {
        "parameters": sum(p.numel() for p in parameters),
        "trainable_parameters": sum(p.numel() for p in parameters if p.requires_grad),
    }


def expected_trainable(config, lora, num_compression_tokens: int) -> dict[str, int]:
    """What the recipe should train, from the config alone: LoRA (r × (in + out)) on each language-model layer's
    q/k/v/o, DoRA's magnitude vector (out) per projection, and the K compression rows (hidden each)."""
    text = config.get_text_config()
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    query, key_value = text.num_attention_heads * head_dim, text.num_key_value_heads * head_dim
    shapes = [(text.hidden_size, query), (text.hidden_size, key_value), (text.hidden_size, key_value)]
    shapes.append((query, text.hidden_size))  # o_proj
    layers = text.num_hidden_layers
    counts = {"lora": layers * sum(lora.lora_r * (inputs + outputs) for inputs, outputs in shapes)}
    counts["dora_magnitude"] = layers * sum(outputs for _, outputs in shapes) if lora.use_dora else 0
    counts["compression_rows"] = num_compression_tokens * text.hidden_size if lora.train_compression_embeddings else 0
    counts["total"] = sum(counts.values())
    return counts


def changed_tensors(before: dict[str, torch.Tensor], model) -> dict[str, list[str]]:
    """Trainable tensors grouped by kind (`lora_A`, `lora_B`, `lora_magnitude_vector`, `trainable_tokens`) into
    those a step changed and those it left equal."""
    result: dict[str, list[str]] = {"changed": [], "unchanged": []}
    for name, parameter in model.named_parameters():
        if name in before:
            key = "unchanged" if torch.equal(before[name], parameter.detach()) else "changed"
            result[key].append(name)
    return {key: sorted({_kind(name) for name in names}) for key, names in result.items()} | {
        "changed_count": len(result["changed"]),
        "unchanged_count": len(result["unchanged"]),
    }


def _kind(name: str) -> str:
    for kind in ("lora_A", "lora_B", "lora_magnitude_vector", "trainable_tokens"):
        if kind in name:
            return kind
    return name


def trainable_snapshot(model) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}


def shard_report(folder: Path, limit: str) -> dict[str, Any]:
    """The weight files of a saved checkpoint against the shard limit: a file is within it when it is no larger, or
    when it holds one tensor that alone exceeds it (transformers' rule)."""
    from safetensors import safe_open
    from transformers.utils.hub import convert_file_size_to_int  # the parser `save_pretrained` uses

    limit_bytes = convert_file_size_to_int(limit)
    shards = []
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(str(path), "pt") as handle:
            tensors = len(list(handle.keys()))
        size = path.stat().st_size
        shards.append({"file": path.name, "bytes": size, "tensors": tensors, "within_limit": size <= limit_bytes})
    return {
        "max_shard_size": limit,
        "limit_bytes": limit_bytes,
        "shards": shards,
        "all_within_limit": all(shard["within_limit"] or shard["tensors"] == 1 for shard in shards),
        "total_bytes": sum(shard["bytes"] for shard in shards),
    }


# ---- the phases -----------------------------------------------------------------------------------------------------
def phase_build(run: Run, files: Files) -> dict:
    """The images, CoMa over the published config in bf16, its parameters and peak memory, saved to `initial/`."""
    from coma_hf import save_checkpoint

    write_images(files, run.seed)
    config = published_config(run.shrink)
    rss_before = peak_rss()
    started = time.perf_counter()
    model = build_model(config, run.seed)
    built = time.perf_counter()
    dtypes = sorted({str(p.dtype) for p in model.parameters()})
    parameter_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    rss_built = peak_rss()
    save_checkpoint(model, files.initial, max_shard_size=run.max_shard_size)
    return {
        **parameter_counts(model),
        "parameter_dtypes": dtypes,
        "parameter_bytes": parameter_bytes,
        "num_compression_tokens": model.config.num_compression_tokens,
        "vocabulary_rows": model.get_input_embeddings().num_embeddings,
        "tied_embeddings": model.lm_head.weight.data_ptr() == model.get_input_embeddings().weight.data_ptr(),
        "build_seconds": built - started,
        "save_seconds": time.perf_counter() - built,
        "peak_rss_before_build_bytes": rss_before,
        "peak_rss_after_build_bytes": rss_built,
        # an fp32 copy would need 2 × parameter_bytes on top of the libraries; the build stays near 1 ×
        "build_rss_over_parameter_bytes": (rss_built - rss_before) / parameter_bytes,
        "saved": shard_report(files.initial, run.max_shard_size),
    }


def stage1_trainer(model, run: Run, files: Files, output_dir: Path, steps: int = 1):
    """The paper's stage-1 recipe on `model` (LoRA, trainable compression rows, vision frozen) and a
    `CoMaCompressionTrainer` for `steps` optimizer steps on the two samples: returns `(trainer, lora arguments,
    step timer)`."""
    from transformers import TrainerCallback, TrainingArguments

    class StepTimer(TrainerCallback):
        """Seconds of each optimizer step, Trainer's set-up left out."""

        def __init__(self):
            self.seconds: list[float] = []

        def on_step_begin(self, args, state, control, **kwargs):
            self.started = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            self.seconds.append(time.perf_counter() - self.started)

    from coma_hf.training import CoMaCompressionTrainer, apply_lora
    from coma_hf.training.presets import training_argument_name

    preset = paper_preset("stage1")
    lora = lora_arguments("stage1", run)
    peft_model = apply_lora(model, lora)
    args = TrainingArguments(
        output_dir=str(output_dir),
        per_device_train_batch_size=STAGE1_BATCH,
        gradient_accumulation_steps=1,
        max_steps=steps,
        learning_rate=preset["learning_rate"],
        lr_scheduler_type="constant",  # the preset's cosine with 5 % warm-up gives a single step a learning rate of 0
        bf16=preset["bf16"],
        use_cpu=not torch.cuda.is_available(),  # bf16 autocast on the CPU, as `check_precision` allows
        **{training_argument_name("activation_checkpointing"): preset["activation_checkpointing"]},
        save_strategy="no",
        logging_steps=1,
        report_to=[],
        disable_tqdm=True,
        dataloader_num_workers=0,
        seed=run.seed,
    )
    timer = StepTimer()
    trainer = CoMaCompressionTrainer(
        model=peft_model,
        args=args,
        train_dataset=stage1_rows(files),
        processing_class=model.processor,
        callbacks=[timer],
    )
    return trainer, lora, timer


def phase_stage1(run: Run, files: Files) -> dict:
    """One stage-1 step from `initial/`: the adapter and the trained compression rows saved, what moved recorded."""
    from safetensors.torch import save_file

    from coma_hf import CoMaModel
    from coma_hf.training import weights_fingerprint
    from coma_hf.training.presets import training_argument_name

    model = CoMaModel.from_pretrained(files.initial, dtype=DTYPE)
    vision_before = weights_fingerprint(model.model.visual)
    trainer, lora, timer = stage1_trainer(model, run, files, files.work_dir / "stage1_trainer")
    peft_model = trainer.model
    before = trainable_snapshot(peft_model)
    train_seconds = timed(trainer.train)
    ids = torch.tensor(model.config.compression_token_ids)
    with torch.no_grad():
        rows = peft_model.get_input_embeddings()(ids).float().contiguous()  # base rows + trained delta
    save_file({"rows": rows}, str(files.trained_rows))
    trainer.save_model(str(files.adapter))
    return {
        **parameter_counts(peft_model),
        "expected_trainable_parameters": expected_trainable(
            model.config.backbone_config, lora, model.config.num_compression_tokens
        ),
        "vision_trainable_parameters": sum(p.numel() for p in model.model.visual.parameters() if p.requires_grad),
        "vision_unchanged": weights_fingerprint(model.model.visual) == vision_before,
        "tensors": changed_tensors(before, peft_model),
        "loss": trainer.first_step_loss,
        "step_seconds": timer.seconds[0],
        "train_seconds": train_seconds,  # the step and Trainer's set-up
        "tokens": trainer.state.num_input_tokens_seen,
        "use_dora": lora.use_dora,
        "activation_checkpointing": getattr(trainer.args, training_argument_name("activation_checkpointing")),
        "bf16_autocast": trainer.args.bf16,
        "parameter_dtypes": sorted({str(p.dtype) for p in peft_model.parameters()}),
    }


def phase_merge(run: Run, files: Files) -> dict:
    """`initial/` + the stage-1 adapter, merged, saved to `stage1/` in shards."""
    from peft import PeftModel
    from safetensors.torch import load_file

    from coma_hf import CoMaModel, save_checkpoint
    from coma_hf.training import merge_lora, weights_fingerprint

    model = CoMaModel.from_pretrained(files.initial, dtype=DTYPE)
    processor = model.processor
    vision_before = weights_fingerprint(model.model.visual)
    started = time.perf_counter()
    merged = merge_lora(PeftModel.from_pretrained(model, str(files.adapter)))
    merge_seconds = time.perf_counter() - started
    merged.processor = processor
    ids = torch.tensor(merged.config.compression_token_ids)
    rows = merged.get_input_embeddings().weight[ids].detach().float()
    trained = load_file(str(files.trained_rows))["rows"]
    started = time.perf_counter()
    save_checkpoint(merged, files.merged, max_shard_size=run.max_shard_size)
    largest = max(p.numel() * p.element_size() for p in merged.parameters())
    return {
        **parameter_counts(merged),
        "merge_seconds": merge_seconds,
        "save_seconds": time.perf_counter() - started,
        "compression_rows_as_trained": bool(torch.equal(rows, trained)),
        "vision_unchanged": weights_fingerprint(merged.model.visual) == vision_before,
        "tied_embeddings": merged.lm_head.weight.data_ptr() == merged.get_input_embeddings().weight.data_ptr(),
        "largest_tensor_bytes": largest,
        "saved": shard_report(files.merged, run.max_shard_size),
    }


def phase_reference(run: Run, files: Files) -> dict:
    """The merged checkpoint's `[3, hidden]` vectors of an image, a text and both, through coma_hf's `CoMaModel`."""
    from safetensors.torch import save_file

    from coma_hf import CoMaModel

    model = CoMaModel.from_pretrained(files.merged, dtype=DTYPE).eval()
    vectors = model.encode(reference_inputs(files), batch_size=len(reference_inputs(files)))
    save_file({"vectors": vectors.contiguous()}, str(files.reference))
    return {**parameter_counts(model), "dtype": str(model.dtype), "vectors": list(vectors.shape)}


def phase_automodel(run: Run, files: Files) -> dict:
    """The same vectors through `AutoModel` and the checkpoint's remote code (coma_hf blocked)."""
    from transformers import AutoModel

    model = AutoModel.from_pretrained(str(files.merged), trust_remote_code=True).eval()  # the checkpoint's dtype
    inputs = reference_inputs(files)
    return {
        **parameter_counts(model),
        **compare_to_reference(model.encode(inputs, batch_size=len(inputs)), files),
        "dtype": str(model.dtype),
        "model_class": f"{type(model).__module__}.{type(model).__name__}",
        "coma_hf_importable": package_importable(),
    }


def phase_sentence_transformer(run: Run, files: Files) -> dict:
    """The same vectors through `SentenceTransformer` and the checkpoint's remote code (coma_hf blocked)."""
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(files.merged), trust_remote_code=True, device="cpu")
    inputs = reference_inputs(files)
    vectors = model.encode(inputs, batch_size=len(inputs), convert_to_tensor=True).float()
    backbone = model[0].model
    return {
        **parameter_counts(model),
        **compare_to_reference(vectors, files),
        "dtype": str(backbone.dtype),
        "model_class": f"{type(backbone).__module__}.{type(backbone).__name__}",
        "coma_hf_importable": package_importable(),
    }


def phase_fp32(run: Run, files: Files) -> dict:
    """The same vectors from the checkpoint loaded in float32, and their cosine to the bf16 ones, row by row."""
    from safetensors.torch import load_file

    from coma_hf import CoMaModel

    model = CoMaModel.from_pretrained(files.merged, dtype=torch.float32).eval()
    inputs = reference_inputs(files)
    vectors = model.encode(inputs, batch_size=len(inputs))
    reference = load_file(str(files.reference))["vectors"]
    cosine = torch.nn.functional.cosine_similarity(vectors, reference, dim=-1)
    return {
        **parameter_counts(model),
        "dtype": str(model.dtype),
        "cosine_to_bf16": cosine.tolist(),
        "min_cosine_to_bf16": float(cosine.min()),
        "agrees": bool(cosine.min() >= MIN_FP32_COSINE),
        "min_cosine_required": MIN_FP32_COSINE,
    }


def stage2_columns(files: Files) -> tuple[list, list]:
    """The stage-2 batch: image queries (with a question) and their captions."""
    anchors = [{"image": str(path), "text": f"What is in picture {index}?"} for index, path in enumerate(files.images)]
    positives = [f"picture {index}: {CAPTION}" for index in range(STAGE2_BATCH)]
    return anchors[:STAGE2_BATCH], positives


def stage2_step(model, run: Run, files: Files, steps: int = 1) -> dict:
    """A fresh stage-2 LoRA on `model` (a `SentenceTransformer` over a merged stage-1 checkpoint) and `steps` AdamW
    steps of `CoMaContrastiveLoss` with GradCache. Records the trainable counts, the loss and seconds of each step,
    each forward of the CoMa model (rows, with or without a graph) and the trainable tensors the steps changed."""
    from coma_hf.training import CoMaContrastiveLoss, apply_lora

    transformer = model[0]
    coma = transformer.model
    lora = lora_arguments("stage2", run)
    transformer.model = apply_lora(coma, lora)  # a fresh LoRA on the merged stage-1 weights, as stage 2 starts
    model.train()
    calls: list[dict] = []
    hook = coma.register_forward_pre_hook(
        lambda module, args, kwargs: calls.append({"rows": len(kwargs["input_ids"]), "grad": torch.is_grad_enabled()}),
        with_kwargs=True,
    )
    loss_fn = CoMaContrastiveLoss(model, mini_batch_size=STAGE2_MINI_BATCH, cached=True)
    before = trainable_snapshot(model)
    # no weight decay: a tensor the step changes is one its gradient reached
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-5, weight_decay=0.0)
    losses, seconds = [], []
    for _ in range(steps):
        started = time.perf_counter()
        optimizer.zero_grad()
        loss = loss_fn([model.preprocess(column) for column in stage2_columns(files)], None)
        loss.backward()  # GradCache: the cached embedding gradients run back through each mini-batch
        optimizer.step()
        seconds.append(time.perf_counter() - started)
        losses.append(float(loss.detach()))
    hook.remove()
    return {
        **parameter_counts(model),
        "expected_trainable_parameters": expected_trainable(
            coma.config.backbone_config, lora, coma.config.num_compression_tokens
        ),
        "loss": losses[0],
        "step_seconds": seconds[0],
        "steps_seconds": seconds,
        "batch_size": STAGE2_BATCH,
        "mini_batch_size": STAGE2_MINI_BATCH,
        "forward_calls": calls,
        "tensors": changed_tensors(before, model),
        "use_dora": lora.use_dora,
        "dtype": str(coma.dtype),
    }


def phase_stage2(run: Run, files: Files) -> dict:
    """One GradCache stage-2 step on the merged checkpoint as a `SentenceTransformer`."""
    from coma_hf.sentence_transformer import load_sentence_transformer

    return stage2_step(load_sentence_transformer(str(files.merged), device="cpu", dtype=DTYPE), run, files)


def compare_to_reference(vectors: torch.Tensor, files: Files) -> dict:
    """`vectors` `[3, hidden]` against the reference phase's: the largest absolute difference, within tolerance?"""
    from safetensors.torch import load_file

    reference = load_file(str(files.reference))["vectors"]
    difference = float((vectors.float() - reference).abs().max())
    return {"max_abs_difference": difference, "tolerance": VECTOR_TOLERANCE, "equal": difference <= VECTOR_TOLERANCE}


def package_importable() -> bool:
    """Whether `import coma_hf` works in this process (it must not in the phases of `WITHOUT_PACKAGE`)."""
    try:
        import coma_hf  # noqa: F401
    except ImportError:
        return False
    return True


# ---- the projection -------------------------------------------------------------------------------------------------
# Kept long: one measured projection after another, in the order the report lists them.
def phase_projection(run: Run, files: Files) -> dict:
    """Seconds per phase projected from a probe: a model of the run's width with one language-model layer and one
    vision block goes through the same steps (build, save, load, embed, the stage-1 and stage-2 steps), each timed;
    compute scales with the depth by the matmul FLOPs of the same inputs (`depth_ratio`), I/O with the bytes."""
    from coma_hf import CoMaModel, save_checkpoint
    from coma_hf.sentence_transformer import load_sentence_transformer
    from coma_hf.training import CoMaCompressionCollator

    write_images(files, run.seed)
    full = published_config(run.shrink)
    with torch.device("meta"):
        full_parameters = sum(p.numel() for p in build_meta_backbone(full).parameters())
    full_bytes = full_parameters * DTYPE.itemsize
    folder = files.work_dir / "probe"
    started = time.perf_counter()
    model = build_model(published_config(run.shrink, probe=True), run.seed)
    init_rate = parameter_counts(model)["parameters"] / (time.perf_counter() - started)
    probe_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    write_rate = probe_bytes / timed(lambda: save_checkpoint(model, folder, max_shard_size=run.max_shard_size))
    read_rate = probe_bytes / timed(lambda: CoMaModel.from_pretrained(folder, dtype=DTYPE))

    # Each probe step runs twice: the first also pays one-off costs (oneDNN builds its bf16 kernels per shape, Trainer
    # its set-up), which the full run pays once too; only the second scales with the depth.
    features = model.processor.process_embedding_inputs(reference_inputs(files))
    with torch.no_grad():
        embed = [timed(lambda: model.eval()(**features)) for _ in range(2)]
        model.float()
        embed_fp32 = [timed(lambda: model(**features)) for _ in range(2)]
    stage1_batch = CoMaCompressionCollator(model.processor)(stage1_rows(files))
    start = CoMaModel.from_pretrained(folder, dtype=DTYPE)
    trainer, _, timer = stage1_trainer(start, run, files, folder / "trainer", steps=2)
    stage1 = [timed(trainer.train) - sum(timer.seconds), *timer.seconds]  # set-up, first step, second step
    stage2 = stage2_step(load_sentence_transformer(str(folder), device="cpu", dtype=DTYPE), run, files, steps=2)
    stage2 = stage2["steps_seconds"]
    shutil.rmtree(folder)

    anchors = model.processor.process_embedding_inputs(stage2_columns(files)[0])
    ratios = {
        "embed": depth_ratio(model, full, features),
        "stage1": depth_ratio(model, full, stage1_batch, language_passes=3),
        "stage2": depth_ratio(model, full, anchors, language_passes=3, vision_passes=2),
    }
    load = full_bytes / read_rate
    embedding_phase = load + scaled(embed, ratios["embed"])
    seconds = {
        "build": full_parameters / init_rate + full_bytes / write_rate,
        "stage1": load + stage1[0] + scaled(stage1[1:], ratios["stage1"]),
        "merge": load + full_bytes / write_rate,
        "reference": embedding_phase,
        "automodel": embedding_phase,
        "sentence_transformer": embedding_phase,
        "fp32": 2 * load + scaled(embed_fp32, ratios["embed"]),
        "stage2": load + scaled(stage2, ratios["stage2"]),
    }
    return {
        "method": "a probe of one language-model layer and one vision block at the run's width; compute × FLOP ratio",
        "full_parameters": full_parameters,
        "probe_rates": {
            "init_parameters_per_s": init_rate,
            "write_bytes_per_s": write_rate,
            "read_bytes_per_s": read_rate,
        },
        # [first, second] call; stage 1: [Trainer's set-up, first step, second step]
        "probe_seconds": {"embed": embed, "embed_fp32": embed_fp32, "stage1": stage1, "stage2": stage2},
        "depth_ratios": ratios,
        "projected_seconds": seconds,
        "projected_total_seconds": sum(seconds.values()),
    }


def scaled(first_and_second: list[float], ratio: float) -> float:
    """A step of the full depth from two probe runs of it: the first's one-off part, and the second × `ratio`."""
    first, second = first_and_second
    return max(first - second, 0.0) + second * ratio


def build_meta_backbone(config):
    """The stock backbone of `config` (build it under `torch.device("meta")` to count its parameters for free)."""
    from coma_hf.backbones import get_family

    return get_family(config.model_type).generation_class._from_config(config, dtype=DTYPE)


def timed(function) -> float:
    started = time.perf_counter()
    function()
    return time.perf_counter() - started


def depth_ratio(model, full_config, batch: dict, language_passes: int = 1, vision_passes: int = 1) -> float:
    """Matmul FLOPs of `batch` through the full depth over those through `model` (the probe's one layer and block).

    Every language-model layer sees every token, every vision block every patch, the merger every fourth patch, the
    LM head only label positions. A pass over frozen weights costs about the same forward or backward (input
    gradients only), so a training step counts passes: stage 1 runs the language model 3 times (forward, gradient
    checkpointing's recomputation, backward) and the frozen vision tower once; stage 2's GradCache runs the language
    model 3 times (a pass without a graph, one with, the backward) and the vision tower twice.
    """
    from coma_hf.processing_coma import IGNORE_INDEX

    text = model.model.language_model
    tokens = int(batch["attention_mask"].sum())
    patches = int(batch["pixel_values"].shape[0]) if batch.get("pixel_values") is not None else 0
    labels = int((batch["labels"] != IGNORE_INDEX).sum()) if "labels" in batch else 0
    layer = linear_parameters(text.layers[0]) * tokens * language_passes
    block = linear_parameters(model.model.visual.blocks[0]) * patches * vision_passes
    fixed = linear_parameters(model.model.visual.merger) * patches / 4 + model.lm_head.weight.numel() * labels
    full = full_config.get_text_config().num_hidden_layers * layer + full_config.vision_config.depth * block + fixed
    return full / (layer + block + fixed)


def linear_parameters(module: torch.nn.Module) -> int:
    return sum(m.weight.numel() for m in module.modules() if isinstance(m, torch.nn.Linear))


PHASE_FUNCTIONS = {
    "build": phase_build,
    "stage1": phase_stage1,
    "merge": phase_merge,
    "reference": phase_reference,
    "automodel": phase_automodel,
    "sentence_transformer": phase_sentence_transformer,
    "fp32": phase_fp32,
    "stage2": phase_stage2,
    PROJECTION: phase_projection,
}


# ---- one phase in this process --------------------------------------------------------------------------------------
def peak_rss() -> int:
    """This process's peak resident set so far, in bytes (Linux reports kilobytes)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class AnonymousMemoryPeak:
    """The largest anonymous resident memory (`RssAnon` in /proc/self/status) seen while in use, sampled by a thread.

    `ru_maxrss` also counts the pages of mapped files (transformers reads safetensors through mmap and keeps every
    shard mapped until a load ends), which the kernel can drop under pressure; anonymous memory is what a phase
    cannot give back. `peak` stays None where /proc is not there.
    """

    def __init__(self, interval: float = 0.05):
        self.interval, self.peak = interval, None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def __enter__(self) -> AnonymousMemoryPeak:
        self._thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self._stop.set()
        self._thread.join()

    def _sample(self) -> None:
        while True:
            current = anonymous_rss()
            if current is not None:
                self.peak = max(self.peak or 0, current)
            if self._stop.wait(self.interval):
                return


def anonymous_rss() -> int | None:
    """This process's anonymous resident memory now, in bytes (None without /proc)."""
    try:
        status = Path("/proc/self/status").read_text()
    except OSError:
        return None
    for line in status.splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024
    return None


def run_phase(phase: str, run: Run, files: Files) -> None:
    """Run `phase` here and write its record: the phase's own fields, its seconds, this process's peak resident set
    (`ru_maxrss`) and its peak anonymous memory."""
    if phase in WITHOUT_PACKAGE:
        sys.modules["coma_hf"] = None  # `import coma_hf` now fails: only the checkpoint's own code can run
    torch.manual_seed(run.seed)
    started = time.perf_counter()
    with AnonymousMemoryPeak() as memory:
        record = PHASE_FUNCTIONS[phase](run, files)
    record.update(seconds=time.perf_counter() - started, peak_rss_bytes=peak_rss(), peak_anonymous_bytes=memory.peak)
    files.records.mkdir(parents=True, exist_ok=True)
    temporary = files.record(phase).with_suffix(".tmp")
    temporary.write_text(json.dumps(record, indent=2))
    temporary.replace(files.record(phase))  # a record exists only for a finished phase


# ---- the runner -----------------------------------------------------------------------------------------------------
def child_environment(files: Files) -> dict[str, str]:
    """Offline, the remote-code cache inside the work folder, the caller's thread settings kept."""
    environment = dict(os.environ)
    environment.update(
        HF_HOME=str(files.hf_home), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false"
    )
    return environment


def settings_arguments(run: Run) -> list[str]:
    arguments = ["--max_shard_size", run.max_shard_size, "--seed", str(run.seed)]
    return arguments + ["--shrink"] * run.shrink + ["--use_dora"] * run.use_dora


def spawn(phase: str, run: Run, files: Files) -> dict:
    """Run `phase` in a fresh interpreter; its record, with the wall time of the whole process added."""
    command = [sys.executable, str(Path(__file__).resolve()), "--run_phase", phase, "--work_dir", str(files.work_dir)]
    started = time.perf_counter()
    result = subprocess.run(command + settings_arguments(run), env=child_environment(files))
    if result.returncode != 0:
        raise SystemExit(f"phase {phase!r} failed (exit {result.returncode}); its output is above")
    record = json.loads(files.record(phase).read_text())
    record["process_seconds"] = time.perf_counter() - started  # interpreter start and imports included
    files.record(phase).write_text(json.dumps(record, indent=2))
    return record


def start_work_dir(run: Run, files: Files, restart: bool) -> None:
    """Create the work folder, or check that it belongs to this run (`restart`: forget its records)."""
    settings = files.work_dir / "run.json"
    if restart and files.records.exists():
        shutil.rmtree(files.records)
    if settings.exists() and json.loads(settings.read_text()) != dataclasses.asdict(run) and not restart:
        raise SystemExit(
            f"{files.work_dir} holds a run with other settings ({settings.read_text().strip()}): "
            "use another --work_dir, or --restart to start over there"
        )
    files.work_dir.mkdir(parents=True, exist_ok=True)
    settings.write_text(json.dumps(dataclasses.asdict(run)))


def recorded(files: Files, phase: str) -> dict | None:
    path = files.record(phase)
    return json.loads(path.read_text()) if path.is_file() else None


def environment() -> dict:
    import transformers

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "cpu_cores": os.cpu_count(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "memory_bytes": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"),
    }


def report(run: Run, files: Files) -> dict:
    """The report of every recorded phase so far."""
    phases = {phase: record for phase in PHASES if (record := recorded(files, phase)) is not None}
    return {
        "benchmark": "real_shape_smoke",
        "settings": dataclasses.asdict(run) | {"dtype": str(DTYPE), "shape": "shrunk" if run.shrink else "full"},
        "environment": environment(),
        "projection": recorded(files, PROJECTION),
        "phases": phases,
        "complete": len(phases) == len(PHASES),
        "total_seconds": sum(record["process_seconds"] for record in phases.values()),
        "peak_rss_bytes": max((record["peak_rss_bytes"] for record in phases.values()), default=None),
        "peak_anonymous_bytes": max((record["peak_anonymous_bytes"] or 0 for record in phases.values()), default=None),
    }


def write_report(data: dict, output: Path) -> None:
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(data, indent=2) + "\n")


def print_projection(projection: dict, phases: list[str]) -> None:
    """The projected minutes of `phases`, each with the start-up (interpreter and imports) the probe's process took."""
    startup = projection["process_seconds"] - projection["seconds"]
    seconds = {phase: projection["projected_seconds"][phase] + startup for phase in phases}
    for phase in phases:
        print(f"  projected {phase:<22} {seconds[phase] / 60:6.1f} min", flush=True)
    print(f"  projected {'total':<22} {sum(seconds.values()) / 60:6.1f} min", flush=True)


def gib(size: int | None) -> str:
    return "n/a" if size is None else f"{size / 2**30:.2f} GiB"


def summary_line(phase: str, record: dict) -> str:
    return (
        f"{phase:<22} {record['process_seconds']:8.1f} s  peak RSS {gib(record['peak_rss_bytes'])} "
        f"(anonymous {gib(record['peak_anonymous_bytes'])})  {record.get('parameters', 0):,} parameters, "
        f"{record.get('trainable_parameters', 0):,} trainable"
    )


def default_output(run: Run, files: Files) -> Path:
    """The committed record of a full-size run (`..._dora.json` with DoRA); a shrunk run's stays in its work folder."""
    if run.shrink:
        return files.work_dir / "report.json"
    return DEFAULT_OUTPUT.with_name("real_shape_smoke_dora.json") if run.use_dora else DEFAULT_OUTPUT


def parse_arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work_dir", required=True, help="Checkpoints and phase records; a rerun resumes here.")
    parser.add_argument(
        "--output",
        default=None,
        help=f"Report JSON (default {DEFAULT_OUTPUT.relative_to(ROOT)}, or real_shape_smoke_dora.json with "
        "--use_dora; with --shrink, report.json in the work folder).",
    )
    parser.add_argument("--shrink", action="store_true", help="The reduced-width variant of the same config.")
    parser.add_argument("--use_dora", action="store_true", help="DoRA, as the authors' released code.")
    parser.add_argument(
        "--max_shard_size", default=None, help="Largest weight file a save writes (default: save_checkpoint's, 2GB)."
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--phases", default=",".join(PHASES), help="Comma-separated phases to run, in order.")
    parser.add_argument("--no_projection", action="store_true", help="Skip the projected-time probe.")
    parser.add_argument("--restart", action="store_true", help="Forget the work folder's records and start over.")
    parser.add_argument("--run_phase", default=None, help=argparse.SUPPRESS)  # a child process runs one phase
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_arguments(argv)
    run = Run(shrink=args.shrink, use_dora=args.use_dora, max_shard_size=args.max_shard_size, seed=args.seed)
    files = Files(Path(args.work_dir).resolve())
    if args.run_phase:  # a child: the runner spells every setting out
        run_phase(args.run_phase, run, files)
        return {}
    if run.max_shard_size is None:
        from coma_hf.saving import MAX_SHARD_SIZE

        run = dataclasses.replace(run, max_shard_size=MAX_SHARD_SIZE)
    phases = [phase.strip() for phase in args.phases.split(",") if phase.strip()]
    unknown = sorted(set(phases) - set(PHASES))
    if unknown:
        raise SystemExit(f"unknown phases {unknown}; choose from {', '.join(PHASES)}")
    output = Path(args.output) if args.output else default_output(run, files)
    start_work_dir(run, files, args.restart)
    todo = [phase for phase in phases if recorded(files, phase) is None]
    if todo and not args.no_projection:
        projection = recorded(files, PROJECTION) or spawn(PROJECTION, run, files)
        print_projection(projection, todo)
    for phase in PHASES:
        if phase not in phases:
            continue
        if phase not in todo:
            print(f"{phase:<22} recorded earlier", flush=True)
            continue
        need = NEEDS.get(phase)
        if need and recorded(files, need) is None:
            raise SystemExit(f"phase {phase!r} reads what {need!r} writes: run {need!r} first (--phases)")
        record = spawn(phase, run, files)
        print(summary_line(phase, record), flush=True)
        write_report(report(run, files), output)
    data = report(run, files)
    write_report(data, output)
    return data


if __name__ == "__main__":
    main()
