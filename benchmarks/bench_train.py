"""Training-step speed, side by side: a stage-1 step (compression loss, forward + backward) and a stage-2 step
(InfoNCE over a batch of image→text pairs, forward + backward) for CoMa on the project's fast path, CoMa on the stock
transformers path, and — for stage 2 — a VLM2Vec-style baseline (same backbone and inputs, no compression tokens,
last-token pooling, stock path).

    python benchmarks/bench_train.py            # CPU, tiny configs: 256 visual + 16 text tokens per input
    python benchmarks/bench_train.py --gpu      # Qwen2.5-VL-3B shape, random weights, bf16, batch 8

Prints a table and writes JSON (`--output`) with samples/s, tokens/s, peak memory (GPU), MFU (GPU),
`coma_over_baseline_time_ratio` (stage 2) and `fast_over_stock_speedup` (stage 1 and stage 2).
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
from bench_encode import H100_BF16_PEAK, build, inputs, report, time_interleaved, vlm2vec_embedding  # noqa: E402

QUESTIONS = [
    {"question": "What colour is the circle?", "answer": "red"},
    {"question": "How many squares are there?", "answer": "two"},
    {"question": "Where is the circle?", "answer": "left of the squares"},
]


def stage1_step(model, processor, batch):
    samples = [{"image": item["image"], "text": item["text"], "conversation": QUESTIONS} for item in batch]
    features = processor.process_qa_samples(samples).to(model.device)
    tokens = int(features["attention_mask"].sum())

    def run():
        model.zero_grad(set_to_none=True)
        model(**features).loss.backward()

    return run, tokens


def stage2_step(name: str, model, processor, batch, temperature: float = 0.03):
    queries = processor.process_embedding_inputs(batch).to(model.device)
    documents = processor.process_embedding_inputs(
        [f"caption {index}: {item['text']}" for index, item in enumerate(batch)]
    )
    documents = documents.to(model.device)

    def embed(features):
        return model(**features).pooler_output if name.startswith("coma") else vlm2vec_embedding(model, features)

    tokens = int(queries["attention_mask"].sum() + documents["attention_mask"].sum())
    if not name.startswith("coma"):
        tokens -= 2 * model.config.num_compression_tokens * len(batch)

    def run():
        model.zero_grad(set_to_none=True)
        scores = embed(queries).float() @ embed(documents).float().T / temperature
        F.cross_entropy(scores, torch.arange(len(batch), device=scores.device)).backward()

    return run, tokens


def measure(batch_size: int, gpu: bool, repeats: int) -> dict:
    batch = inputs(batch_size)
    models = {name: build(name, gpu) for name in ("coma_fast", "coma_stock", "vlm2vec_stock")}
    for model, _ in models.values():
        model.train()
    runners, tokens = {}, {}
    for name in ("coma_fast", "coma_stock"):
        runners[f"stage1 {name}"], tokens[f"stage1 {name}"] = stage1_step(*models[name], batch)
    for name in models:
        runners[f"stage2 {name}"], tokens[f"stage2 {name}"] = stage2_step(name, *models[name], batch)
    timings = time_interleaved(runners, repeats, gpu, grad=True)
    rows = {}
    for name, run in runners.items():
        seconds = statistics.median(timings[name])
        row = {
            "seconds_per_step": seconds,
            "samples_per_s": batch_size / seconds,
            "tokens_per_s": tokens[name] / seconds,
        }
        if gpu:
            torch.cuda.reset_peak_memory_stats()
            run()
            row["peak_memory_bytes"] = torch.cuda.max_memory_allocated()
            parameters = sum(p.numel() for p in models[name.split(" ", 1)[1]][0].parameters())
            row["mfu"] = 6.0 * parameters * tokens[name] / seconds / H100_BF16_PEAK  # forward + backward
        rows[name] = row
    step = {name: row["seconds_per_step"] for name, row in rows.items()}
    return {
        "batch_size": batch_size,
        "steps": rows,
        "coma_over_baseline_time_ratio": step["stage2 coma_fast"] / step["stage2 vlm2vec_stock"],
        "fast_over_stock_speedup": {
            "stage1": step["stage1 coma_stock"] / step["stage1 coma_fast"],
            "stage2": step["stage2 coma_stock"] / step["stage2 coma_fast"],
        },
    }


def table(results: list[dict]) -> str:
    lines = [
        "| batch | step | s / step | samples/s | tokens/s | peak memory | MFU |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for result in results:
        for name, row in result["steps"].items():
            memory = f"{row['peak_memory_bytes'] / 2**30:.1f} GiB" if "peak_memory_bytes" in row else "n/a"
            mfu = f"{100 * row['mfu']:.1f} %" if "mfu" in row else "n/a"
            lines.append(
                f"| {result['batch_size']} | {name} | {row['seconds_per_step']:.4f} | {row['samples_per_s']:.1f} "
                f"| {row['tokens_per_s']:.0f} | {memory} | {mfu} |"
            )
        speedup = result["fast_over_stock_speedup"]
        lines.append(
            f"| {result['batch_size']} | fast over stock | stage 1 {speedup['stage1']:.2f}×, stage 2 "
            f"{speedup['stage2']:.2f}× | CoMa / VLM2Vec-style (stage 2) | "
            f"{result['coma_over_baseline_time_ratio']:.3f} | | |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gpu", action="store_true")
    parser.add_argument("--batch_sizes", default="8")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--output", default="benchmarks/results/bench_train.json")
    args = parser.parse_args(argv)
    repeats = args.repeats or (10 if args.gpu else 5)
    results = [measure(int(size), args.gpu, repeats) for size in args.batch_sizes.split(",")]
    return report(results, table(results), args.output, args.gpu)


if __name__ == "__main__":
    main()
