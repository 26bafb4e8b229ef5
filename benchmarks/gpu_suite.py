"""One GPU suite, about 5 minutes on one H100: the figures `docs/performance.md` leaves pending until a GPU run fills
them, in `benchmarks/results/gpu_suite.json`.

    python benchmarks/gpu_suite.py                 # CUDA: Qwen2.5-VL-3B shape, random weights, bf16
    python benchmarks/gpu_suite.py --cpu_smoke     # the same steps at the tiny shape on the CPU, seconds (a check)

In order, each section written to the JSON as soon as it is done (a later failure keeps the earlier figures):

1. **flex gradients**: the stage-1 loss and its gradients under flex attention against sdpa's dense mask, on the
   same batch; every later section is skipped unless they agree within bf16's tolerance (`FLEX_TOLERANCE`);
2. **encode**: `bench_encode.measure` at batch 8 and 32 (CoMa fast path against the VLM2Vec-style baseline, side by
   side), plus CoMa with flex attention in the language model;
3. **stage 1**: step time, peak memory and MFU of a forward + backward at L ≈ 400 (448 px image, three QA turns) and
   at a long L (a text of about 4,096 tokens): CoMa under the dense mask (sdpa), CoMa under flex, and the stock
   causal model (`Qwen2_5_VLForConditionalGeneration` on the same ids, no bottleneck);
4. **stage 2**: one GradCache step (stage 2's InfoNCE, mini-batch 8) over a batch of 32 image→text pairs.

It installs nothing and runs offline on an older stack (Python 3.12, torch 2.11, transformers 5.17, peft,
accelerate, sentence-transformers; no trl, no datasets) with only this repository's files beside it: it imports
`coma_hf` from the checkout (`PYTHONPATH=.`), builds the 3B shape from `tests/fixtures/qwen2_5_vl_3b_instruct.json`
and the offline tokenizer, and touches no module that imports trl or datasets — not even sentence-transformers, which
imports datasets, so the stage-2 step is written out here (`--cpu_smoke` runs with both blocked,
`tests/test_gpu_suite.py`).
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import bench_encode  # noqa: E402

FLEX_TOLERANCE = {"loss_relative": 2e-2, "gradient_cosine": 0.99}  # bf16 keeps ~3 significant digits
LONG_LENGTH = 4096
STAGE2_BATCH, STAGE2_MINI_BATCH = 32, 8
TARGETS = {"stage1_mfu": 0.35, "embeddings_per_s_batch_32": 150}


def build(gpu: bool, attention: str = "sdpa"):
    """The benchmark's CoMa model (3B shape on the GPU, tiny on the CPU) with `attention` in its language model."""
    model, processor = bench_encode.build("coma_fast", gpu)
    if attention != "sdpa":
        model.set_attn_implementation(attention)
    return model, processor


def long_text(processor, length: int) -> str:
    """A text of about `length` tokens."""
    words, text = "a red circle left of two blue squares and a green star".split(), ""
    while len(processor.tokenizer(text)["input_ids"]) < length:
        text += " " + " ".join(words)
    return text


def stage1_batch(processor, batch_size: int, long: int | None, device) -> dict:
    turns = [{"question": "What colour is the circle?", "answer": "red"}]
    if long:
        samples = [{"text": long_text(processor, long), "conversation": turns} for _ in range(batch_size)]
        processor = processor.with_settings(max_length=None)
    else:
        samples = [{**item, "conversation": turns * 3} for item in bench_encode.inputs(batch_size)]
        samples = [{key: value for key, value in sample.items() if key != "instruction"} for sample in samples]
    return processor.process_qa_samples(samples).to(device)


def flex_gradients(gpu: bool) -> dict:
    """Stage-1 loss and gradients under flex attention against sdpa (same weights, same batch). On the CPU, where
    torch has no flex backward, the losses only."""
    model, processor = build(gpu)
    model.train()
    batch = stage1_batch(processor, 2, None, model.device)
    results = {}
    for attention in ("sdpa", "flex_attention"):
        model.set_attn_implementation(attention)
        model.zero_grad(set_to_none=True)
        with torch.set_grad_enabled(gpu):
            loss = model(**batch).loss
        if gpu:
            loss.backward()
        gradient = [p.grad.float().flatten() for p in model.parameters() if p.grad is not None]
        results[attention] = (float(loss), torch.cat(gradient) if gradient else None)
    (dense_loss, dense), (flex_loss, flex) = results["sdpa"], results["flex_attention"]
    loss_relative = abs(flex_loss - dense_loss) / abs(dense_loss)
    cosine = float(torch.nn.functional.cosine_similarity(dense, flex, dim=0)) if gpu else None
    return {
        "loss_sdpa": dense_loss,
        "loss_flex": flex_loss,
        "loss_relative": loss_relative,
        "gradient_cosine": cosine,  # None on the CPU
        "tolerance": FLEX_TOLERANCE,
        "agree": loss_relative <= FLEX_TOLERANCE["loss_relative"]
        and (cosine is None or cosine >= FLEX_TOLERANCE["gradient_cosine"]),
    }


def peak_bytes(run, gpu: bool) -> int | None:
    """The memory one call of `run` allocates above what was allocated before it (GPU only)."""
    if not gpu:
        return None
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    run()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - before


def encode(gpu: bool, repeats: int) -> dict:
    """`bench_encode.measure` side by side, and CoMa with flex attention in the language model at the same sizes."""
    sizes = (8, 32) if gpu else (2,)
    rows = {f"batch {size}": bench_encode.measure(size, gpu, repeats) for size in sizes}
    model, processor = build(gpu, "flex_attention")
    for size in sizes:
        run, tokens = bench_encode.encoder("coma_flex", model, processor, bench_encode.inputs(size))
        seconds = _median_seconds(run, repeats, gpu, grad=False)
        rows[f"batch {size}"]["configurations"]["coma_flex"] = {
            "seconds_per_batch": seconds,
            "samples_per_s": size / seconds,
            "tokens_per_s": tokens / seconds,
            "peak_memory_bytes": peak_bytes(lambda run=run: _no_grad(run), gpu),
        }
    return rows


def stage1(gpu: bool, repeats: int) -> dict:
    """Forward + backward of stage 1 at L ≈ 400 and at a long L: dense mask, flex, and the stock causal model (one
    model per configuration, built once and freed before the next)."""
    rows = {}
    lengths = (("L~400", None), (f"L~{LONG_LENGTH}", LONG_LENGTH if gpu else 256))
    for attention in ("sdpa", "flex_attention", "stock causal") if gpu else ("sdpa", "stock causal"):
        model, processor = build(gpu, "sdpa" if attention == "stock causal" else attention)
        model.train()
        stock = _stock_causal(model) if attention == "stock causal" else None
        for label, long in lengths:
            batch = stage1_batch(processor, 2 if long else 8, long, model.device)
            step, parameters = _stage1_step(stock or model, batch, stock is not None)
            seconds = _median_seconds(step, repeats, gpu, grad=True)
            rows[f"{label} {attention}"] = {
                "length": int(batch["input_ids"].shape[1]),
                "seconds_per_step": seconds,
                "peak_memory_bytes": peak_bytes(step, gpu),
                "mfu": 6.0 * parameters * int(batch["attention_mask"].sum()) / seconds / bench_encode.H100_BF16_PEAK
                if gpu
                else None,
            }
        del model, stock
        if gpu:
            torch.cuda.empty_cache()
    return rows


def _stock_causal(model):
    """The family's stock class with `model`'s weights: the same ids through plain causal attention."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    stock = Qwen2_5_VLForConditionalGeneration(model.config.backbone_config).to(model.device, model.dtype)
    stock.model.load_state_dict(model.model.state_dict())
    return stock.train()


def _stage1_step(model, batch: dict, stock: bool):
    """A no-argument forward + backward of `batch`, and the parameter count for MFU."""
    inputs = {key: value for key, value in batch.items() if key != "labels"} if stock else batch

    def step():
        model.zero_grad(set_to_none=True)
        output = model(**inputs, labels=batch["labels"]) if stock else model(**batch)
        output.loss.backward()

    return step, sum(parameter.numel() for parameter in model.parameters())


def stage2(gpu: bool, repeats: int) -> dict:
    """One GradCache step of stage 2's InfoNCE over image→text pairs: every mini-batch embedded without gradients, the
    loss on the cached embeddings, then each mini-batch again with gradients, backpropagating its cached embeddings'
    gradients. Written out here, as `CoMaContrastiveLoss` computes it, because sentence-transformers imports datasets,
    which the GPU machine's stack lacks."""
    model, processor = build(gpu)
    model.train()
    size, mini = (STAGE2_BATCH, STAGE2_MINI_BATCH) if gpu else (4, 2)
    pairs = bench_encode.inputs(size)
    sides = [
        [processor.process_embedding_inputs(part).to(model.device) for part in _chunks(inputs, mini)]
        for inputs in ([{"image": pair["image"]} for pair in pairs], [pair["text"] for pair in pairs])
    ]
    targets = torch.arange(size, device=model.device)

    def step():
        model.zero_grad(set_to_none=True)
        with torch.no_grad():
            cached = [torch.cat([model(**batch).pooler_output for batch in side]).requires_grad_() for side in sides]
        loss = torch.nn.functional.cross_entropy(
            cached[0] @ cached[1].T / model.config.contrastive_temperature, targets
        )
        loss.backward()
        for side, embeddings in zip(sides, cached, strict=True):
            for index, batch in enumerate(side):
                model(**batch).pooler_output.backward(embeddings.grad[index * mini : (index + 1) * mini])

    seconds = _median_seconds(step, repeats, gpu, grad=True)
    return {"batch": size, "mini_batch": mini, "seconds_per_step": seconds, "peak_memory_bytes": peak_bytes(step, gpu)}


def _chunks(items: list, size: int) -> list[list]:
    return [items[start : start + size] for start in range(0, len(items), size)]


def _no_grad(run):
    with torch.inference_mode():
        return run()


def _median_seconds(run, repeats: int, gpu: bool, grad: bool) -> float:
    return sorted(bench_encode.time_interleaved({"run": run}, repeats, gpu, grad=grad)["run"])[repeats // 2]


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cpu_smoke", action="store_true", help="the tiny shape on the CPU: checks the steps run")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--output", default="benchmarks/results/gpu_suite.json")
    args = parser.parse_args(argv)
    gpu = not args.cpu_smoke
    if gpu and not torch.cuda.is_available():
        raise SystemExit("No CUDA device: run on a GPU machine, or pass --cpu_smoke to check the steps here")
    repeats = args.repeats or (10 if gpu else 1)
    output = Path(args.output)
    record = {
        "machine": torch.cuda.get_device_name() if gpu else f"{platform.machine()} CPU (smoke run: tiny shape)",
        "versions": {"python": platform.python_version(), "torch": torch.__version__, **_versions()},
        "targets": TARGETS,
    }
    started = time.perf_counter()
    for name, section in (
        ("flex_gradients", flex_gradients),
        ("encode", encode),
        ("stage1", stage1),
        ("stage2", stage2),
    ):
        print(f"[{time.perf_counter() - started:6.0f} s] {name} …", flush=True)
        record[name] = section(gpu) if name == "flex_gradients" else section(gpu, repeats)
        _write(record, output)
        if name == "flex_gradients" and not record[name]["agree"]:
            print(f"flex and sdpa disagree beyond {FLEX_TOLERANCE}: nothing timed", flush=True)
            break
    record["seconds"] = time.perf_counter() - started
    _write(record, output)
    print(json.dumps({key: record[key] for key in ("machine", "seconds")}, indent=1))
    return record


def _versions() -> dict:
    import transformers

    return {"transformers": transformers.__version__}


def _write(record: dict, output: Path) -> None:
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(
        json.dumps(
            record,
            indent=2,
            default=lambda value: None if isinstance(value, float) and math.isnan(value) else str(value),
        )
    )


if __name__ == "__main__":
    main()
