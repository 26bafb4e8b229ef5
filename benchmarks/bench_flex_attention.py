"""The bottleneck mask at long sequences: peak memory and time of an encode forward under the dense mask (sdpa) and
under flex attention's `BlockMask`, side by side, at L = 1,024 … 8,192 (batch 2, the tiny model, CPU).

    python benchmarks/bench_flex_attention.py                     # L = 1024, 2048, 4096, 8192
    python benchmarks/bench_flex_attention.py --lengths 512,1024  # quick look

Each (attention, L) runs in a fresh process: a warm-up forward (flex attention compiles there, once per shape),
then three timed forwards. Memory is the forward's peak resident memory above what the process held before it,
sampled every 2 ms, so it counts the mask and the activations, not the model or the compiler. On this CPU memory is
the figure that matters: the dense mask is `[batch, 1, L, L]` float32 plus the boolean masks it is built from,
while the block mask holds one boolean per block pair. Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from bench_encode import report  # noqa: E402

CHILD = """
import json, statistics, sys, threading, time
import torch
from coma_hf.tiny import build_tiny_coma

attention, length, batch = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
torch.manual_seed(0)
model, processor = build_tiny_coma(num_compression_tokens=32, max_length=None)
model.eval()
if attention == "flex_attention":
    model.set_attn_implementation("flex_attention")
ids = torch.randint(100, 600, (batch, length))  # plain text tokens of the tiny vocabulary
ids[:, -32:] = torch.tensor(model.config.compression_token_ids)
mask = torch.ones(batch, length, dtype=torch.long)
mask[1:, : length // 4] = 0  # left padding in every row but the first
ids[1:, : length // 4] = processor.tokenizer.pad_token_id

def rss_mb():
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * 4096 / 2**20

def forward():
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).pooler_output

forward()  # warm-up: flex attention compiles here
seconds, peaks = [], []
for _ in range(3):
    before, peak, running = rss_mb(), [0.0], [True]
    def sample():
        while running[0]:
            peak[0] = max(peak[0], rss_mb())
            time.sleep(0.002)
    sampler = threading.Thread(target=sample)
    sampler.start()
    started = time.perf_counter()
    forward()
    seconds.append(time.perf_counter() - started)
    running[0] = False
    sampler.join()
    peaks.append(max(peak[0], rss_mb()) - before)
print("RESULT", json.dumps({"seconds": statistics.median(seconds), "peak_mb": max(peaks)}))
"""


def run(attention: str, length: int, batch: int) -> dict:
    done = subprocess.run(
        [sys.executable, "-c", CHILD, attention, str(length), str(batch)], capture_output=True, text=True, check=True
    )
    return json.loads(done.stdout.split("RESULT ", 1)[1])


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", default="1024,2048,4096,8192")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--output", default="benchmarks/results/bench_flex_attention.json")
    args = parser.parse_args(argv)
    lengths = [int(value) for value in args.lengths.split(",")]
    print(f"{2 * len(lengths)} runs, each a process with a warm-up (flex compiles per shape: ~20-60 s a run on CPU)")
    rows = []
    for length in lengths:
        dense, flex = run("sdpa", length, args.batch), run("flex_attention", length, args.batch)
        rows.append(
            {
                "length": length,
                "batch": args.batch,
                "dense_seconds": dense["seconds"],
                "flex_seconds": flex["seconds"],
                "dense_peak_mb": dense["peak_mb"],
                "flex_peak_mb": flex["peak_mb"],
                "memory_ratio": flex["peak_mb"] / dense["peak_mb"],
                "time_ratio": flex["seconds"] / dense["seconds"],
            }
        )
        print(f"L={length}: {rows[-1]}")
    table = [
        "| L | dense mask: s | flex: s | flex / dense time | dense: peak MB | flex: peak MB | flex / dense memory |"
    ]
    table.append("| --- | --- | --- | --- | --- | --- | --- |")
    table += [
        f"| {row['length']:,} | {row['dense_seconds']:.2f} | {row['flex_seconds']:.2f} | {row['time_ratio']:.2f} | "
        f"{row['dense_peak_mb']:.0f} | {row['flex_peak_mb']:.0f} | {row['memory_ratio']:.2f} |"
        for row in rows
    ]
    return report(rows, "\n".join(table), args.output, gpu=False)


if __name__ == "__main__":
    main()
