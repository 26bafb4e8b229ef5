"""Memory of `examples/encode_corpus.py` as the corpus grows: peak resident memory for the first 10k vs all 40k of
one folder of synthetic images, each run in a fresh process; the target is a ratio within 1.10.

    python benchmarks/bench_encode_corpus.py                 # 40k 28×28-56×56 PNGs, the tiny checkpoint, CPU
    python benchmarks/bench_encode_corpus.py --sizes 1000,4000 --images_dir /tmp/few   # quick look

Prints a table and writes JSON (`--output`) with rows/s, peak RSS and shard counts per size, and
`peak_memory_ratio` (largest over smallest corpus).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

sys.path.insert(0, str(Path(__file__).parent))
from bench_encode import report  # noqa: E402

EXAMPLE = Path(__file__).parents[1] / "examples" / "encode_corpus.py"

# Runs in a child process so that its peak RSS is its own (ru_maxrss of the child, read by the parent).
CHILD = """
import resource, sys, time, json
sys.argv = [sys.argv[0], *json.loads(sys.argv[1])]
sys.path.insert(0, {examples!r})
import encode_corpus
started = time.time()
result = encode_corpus.main()
print("RESULT", json.dumps({{"seconds": time.time() - started, "rows": result["manifest"]["rows"],
      "shards": len(result["manifest"]["shards"]),
      "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}}))
"""


def write_images(folder: Path, count: int) -> None:
    """`count` small noise PNGs (28 or 56 pixels tall), written once and reused."""
    folder.mkdir(parents=True, exist_ok=True)
    existing = sum(1 for _ in folder.glob("*.png"))
    rng = np.random.RandomState(0)
    for index in tqdm(range(existing, count), desc="writing images", unit="image", disable=existing >= count):
        pixels = rng.randint(0, 256, (28 + 28 * (index % 2), 28, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"{index:07d}.png")


def tiny_checkpoint(folder: Path) -> Path:
    from coma_hf.hub import save_checkpoint
    from coma_hf.tiny import build_tiny_coma

    if not (folder / "config.json").exists():
        model, _ = build_tiny_coma(num_compression_tokens=8, seed=0, max_image_tokens=4)
        save_checkpoint(model, folder)
    return folder


def script_arguments(model: Path, images: Path, rows: int, output: Path, args: argparse.Namespace) -> list[str]:
    """`examples/encode_corpus.py`'s arguments for the first `rows` images (the benchmarks' shard and batch size)."""
    options = {"model": model, "images": images, "max_rows": rows, "output_dir": output}
    options.update(shard_size=args.shard_size, batch_size=args.batch_size)
    return [token for name, value in options.items() for token in (f"--{name}", str(value))]


def run(model: Path, images: Path, rows: int, output: Path, args: argparse.Namespace) -> dict:
    argv = script_arguments(model, images, rows, output, args)
    code = CHILD.format(examples=str(EXAMPLE.parent))
    done = subprocess.run([sys.executable, "-c", code, json.dumps(argv)], capture_output=True, text=True, check=True)
    result = json.loads(done.stdout.split("RESULT ", 1)[1])
    return {"corpus_rows": rows, **result, "rows_per_second": rows / result["seconds"]}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="10000,40000", help="Corpus sizes (first rows of one folder).")
    parser.add_argument("--images_dir", help="Where the synthetic images are written (default: a temporary folder).")
    parser.add_argument("--shard_size", type=int, default=2000)
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--output", default="benchmarks/results/bench_encode_corpus.json")
    args = parser.parse_args(argv)
    sizes = [int(size) for size in args.sizes.split(",")]

    with tempfile.TemporaryDirectory() as scratch:
        images = Path(args.images_dir or Path(scratch) / "images")
        write_images(images, max(sizes))
        model = tiny_checkpoint(Path(scratch) / "model")
        results = [run(model, images, size, Path(scratch) / f"out-{size}", args) for size in sizes]

    ratio = results[-1]["peak_rss_mb"] / results[0]["peak_rss_mb"]
    lines = [f"{'rows':>8} {'shards':>7} {'seconds':>8} {'rows/s':>8} {'peak RSS MB':>12}"]
    lines += [
        f"{r['corpus_rows']:>8} {r['shards']:>7} {r['seconds']:>8.1f} {r['rows_per_second']:>8.0f} "
        f"{r['peak_rss_mb']:>12.0f}"
        for r in results
    ]
    lines.append(f"peak memory {sizes[-1]} / {sizes[0]} rows: {ratio:.3f} (target ≤ 1.10)")
    return report(
        results,
        "\n".join(lines),
        args.output,
        gpu=False,
        peak_memory_ratio=ratio,
        shard_size=args.shard_size,
        batch_size=args.batch_size,
    )


if __name__ == "__main__":
    main()
