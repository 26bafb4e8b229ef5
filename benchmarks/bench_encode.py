"""Embedding speed: CoMa with the project's fast path, the same model on the stock transformers path, and a
VLM2Vec-style baseline (same backbone and inputs, no compression tokens, last-token pooling, stock path), side by side.

    python benchmarks/bench_encode.py                  # CPU, tiny configs: 256 visual + 16 text tokens per input
    python benchmarks/bench_encode.py --gpu            # Qwen2.5-VL-3B shape, random weights, bf16, batch 8 and 32

Prints a table and writes JSON (`--output`) with samples/s, tokens/s, peak memory (GPU: allocated; CPU: resident set
of a fresh process per configuration), model FLOP utilisation on GPU, `coma_over_baseline_time_ratio` (CoMa fast path
over the baseline as users run it today) and `fast_over_stock_speedup`. Timings interleave the configurations, so the
ratios come from one run on one machine.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from transformers import AutoConfig

from coma_hf.tiny import QWEN_SPECIAL_TOKEN_START, build_tiny_coma, build_tokenizer
from coma_hf.vision_attention import set_vision_attention, use_batched_vision_attention

CONFIGS = ("coma_fast", "coma_stock", "vlm2vec_stock")
TEXT = "a small red circle left of the two blue squares"  # with the instruction: 16 text tokens (tiny tokenizer)
INSTRUCTION = "Represent the given image"
H100_BF16_PEAK = 989e12
PUBLISHED_3B = Path(__file__).parents[1] / "tests" / "fixtures" / "qwen2_5_vl_3b_instruct.json"


def build(config_name: str, gpu: bool, num_compression_tokens: int = 32):
    """(model, processor) for one configuration, on the benchmark's device and dtype."""
    torch.manual_seed(0)
    if gpu:  # Qwen2.5-VL-3B's published config (random weights), special tokens at the published ids
        raw = json.loads(PUBLISHED_3B.read_text())
        backbone = AutoConfig.for_model(raw.pop("model_type"), **raw)
        model, processor = build_tiny_coma(
            "qwen2_5_vl",
            num_compression_tokens=num_compression_tokens,
            backbone_config=backbone,
            tokenizer=build_tokenizer(special_token_start=QWEN_SPECIAL_TOKEN_START),
            min_image_tokens=256,
            max_image_tokens=256,
        )
        model = model.to("cuda", torch.bfloat16)
    else:
        model, processor = build_tiny_coma(
            "qwen2_5_vl", num_compression_tokens=num_compression_tokens, min_image_tokens=256, max_image_tokens=256
        )
    if config_name == "coma_fast":
        use_batched_vision_attention(model.model.visual)
    else:
        set_vision_attention(model.model.visual, "sdpa")
    return model.eval(), processor


def inputs(batch_size: int) -> list[dict]:
    rng = np.random.RandomState(0)
    images = [Image.fromarray(rng.randint(0, 256, (448, 448, 3), dtype=np.uint8)) for _ in range(batch_size)]
    return [{"image": image, "text": TEXT, "instruction": INSTRUCTION} for image in images]


def vlm2vec_embedding(model, features) -> torch.Tensor:
    """The VLM2Vec-style embedding of CoMa-rendered `features`: the same input without the K compression tokens,
    the stock forward, the last token's final hidden state, L2-normalised."""
    k = model.config.num_compression_tokens
    plain = {key: features[key][:, :-k] for key in ("input_ids", "attention_mask", "mm_token_type_ids")}
    if "pixel_values" in features:
        plain.update(pixel_values=features["pixel_values"], image_grid_thw=features["image_grid_thw"])
    return torch.nn.functional.normalize(model.model(**plain).last_hidden_state[:, -1].float(), dim=-1)


def encoder(config_name: str, model, processor, batch: list[dict]):
    """A no-argument function that embeds `batch` once, and the number of real tokens it processes."""
    features = processor.process_embedding_inputs(batch).to(model.device)
    tokens = int(features["attention_mask"].sum())
    if config_name.startswith("coma"):
        return (lambda: model(**features).pooler_output), tokens
    return (lambda: vlm2vec_embedding(model, features)), tokens - model.config.num_compression_tokens * len(batch)


def synchronize(gpu: bool) -> None:
    if gpu:
        torch.cuda.synchronize()


def time_interleaved(runners: dict, repeats: int, gpu: bool, grad: bool = False) -> dict[str, list[float]]:
    """Seconds per call of each runner, the configurations taking turns so that drift hits them alike."""
    timings = {name: [] for name in runners}
    with torch.enable_grad() if grad else torch.inference_mode():
        for run in runners.values():  # warm-up
            run()
        synchronize(gpu)
        for _ in range(repeats):
            for name, run in runners.items():
                started = time.perf_counter()
                run()
                synchronize(gpu)
                timings[name].append(time.perf_counter() - started)
    return timings


def peak_memory_cpu(config_name: str, batch_size: int) -> int:
    """Peak resident set (bytes) of a fresh process that builds the configuration and embeds one batch."""
    code = (
        f"import resource, sys, torch; sys.path.insert(0, {str(Path(__file__).parent)!r}); import bench_encode as b; "
        f"m, p = b.build({config_name!r}, False); run, _ = b.encoder({config_name!r}, m, p, b.inputs({batch_size}));\n"
        "with torch.inference_mode(): run()\n"
        "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return int(result.stdout.strip().splitlines()[-1]) * 1024


def forward_flops(model, tokens: int) -> float:
    """2 × parameters × tokens (the matmul FLOPs of a forward pass; attention scores left out)."""
    return 2.0 * sum(parameter.numel() for parameter in model.parameters()) * tokens


def measure(batch_size: int, gpu: bool, repeats: int) -> dict:
    models = {name: build(name, gpu) for name in CONFIGS}
    batch = inputs(batch_size)
    runners, tokens = {}, {}
    for name, (model, processor) in models.items():
        runners[name], tokens[name] = encoder(name, model, processor, batch)
    if gpu:
        torch.cuda.reset_peak_memory_stats()
    timings = time_interleaved(runners, repeats, gpu)
    rows = {}
    for name in CONFIGS:
        seconds = statistics.median(timings[name])
        row = {
            "seconds_per_batch": seconds,
            "samples_per_s": batch_size / seconds,
            "tokens_per_s": tokens[name] / seconds,
            "tokens_per_sample": tokens[name] / batch_size,
        }
        if gpu:
            torch.cuda.reset_peak_memory_stats()
            with torch.inference_mode():
                runners[name]()
            row["peak_memory_bytes"] = torch.cuda.max_memory_allocated()
            row["mfu"] = forward_flops(models[name][0], tokens[name]) / seconds / H100_BF16_PEAK
        else:
            row["peak_memory_bytes"] = peak_memory_cpu(name, batch_size)
        rows[name] = row
    return {
        "batch_size": batch_size,
        "configurations": rows,
        "coma_over_baseline_time_ratio": rows["coma_fast"]["seconds_per_batch"]
        / rows["vlm2vec_stock"]["seconds_per_batch"],
        "coma_stock_over_baseline_time_ratio": rows["coma_stock"]["seconds_per_batch"]
        / rows["vlm2vec_stock"]["seconds_per_batch"],
        "fast_over_stock_speedup": rows["coma_stock"]["seconds_per_batch"] / rows["coma_fast"]["seconds_per_batch"],
    }


def table(results: list[dict]) -> str:
    lines = [
        "| batch | configuration | s / batch | samples/s | tokens/s | tokens/sample | peak memory | MFU |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for result in results:
        for name, row in result["configurations"].items():
            mfu = f"{100 * row['mfu']:.1f} %" if "mfu" in row else "n/a"
            lines.append(
                f"| {result['batch_size']} | {name} | {row['seconds_per_batch']:.4f} | {row['samples_per_s']:.1f} "
                f"| {row['tokens_per_s']:.0f} | {row['tokens_per_sample']:.0f} | "
                f"{row['peak_memory_bytes'] / 2**20:.0f} MiB | {mfu} |"
            )
        lines.append(
            f"| {result['batch_size']} | CoMa fast / VLM2Vec-style time "
            f"| {result['coma_over_baseline_time_ratio']:.3f} "
            f"| fast over stock speed-up | {result['fast_over_stock_speedup']:.2f}× | | | |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gpu", action="store_true", help="Qwen2.5-VL-3B shape on CUDA, bf16")
    parser.add_argument("--batch_sizes", default=None, help="comma-separated (default: 8 on CPU, 8,32 on GPU)")
    parser.add_argument("--repeats", type=int, default=None, help="timed calls per configuration")
    parser.add_argument("--output", default="benchmarks/results/bench_encode.json")
    args = parser.parse_args(argv)
    sizes = [int(size) for size in (args.batch_sizes or ("8,32" if args.gpu else "8")).split(",")]
    repeats = args.repeats or (20 if args.gpu else 10)
    results = [measure(size, args.gpu, repeats) for size in sizes]
    return report(
        results,
        table(results),
        args.output,
        args.gpu,
        coma_over_baseline_time_ratio=max(result["coma_over_baseline_time_ratio"] for result in results),
        fast_over_stock_speedup=min(result["fast_over_stock_speedup"] for result in results),
    )


def report(results: list[dict], table_text: str, output: str, gpu: bool, **headline) -> dict:
    """Print the table and write the JSON (machine, torch version, results, headline ratios)."""
    machine = torch.cuda.get_device_name() if gpu else f"{platform.machine()} CPU, {torch.get_num_threads()} threads"
    content = {"machine": machine, "torch": torch.__version__, "results": results, **headline}
    print(table_text)
    Path(output).parent.mkdir(parents=True, exist_ok=True)
    Path(output).write_text(json.dumps(content, indent=2))
    print(f"JSON written to {output}")
    return content


if __name__ == "__main__":
    main()
