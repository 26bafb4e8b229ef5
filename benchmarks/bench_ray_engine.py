"""`examples/encode_corpus.py` on its two engines side by side: today's (one process here) and Ray Data
(`--engine ray`, an actor pool), over the first 10,000 and all 40,000 files of one folder of synthetic PNGs, the
tiny checkpoint.

    python benchmarks/bench_ray_engine.py                      # 10k and 40k, Ray with 2 actors (one per core)
    python benchmarks/bench_ray_engine.py --sizes 2000 --images_dir /tmp/few   # quick look

Each run is the script in a fresh process tree. Peak memory is the largest sum, sampled every 0.1 s, of the resident
memory of the script's process and every process under it (for Ray: its raylet, GCS, object store and worker
processes). Rows/s counts the whole run, Ray's start included. Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).parent))
from bench_encode import report  # noqa: E402
from bench_encode_corpus import EXAMPLE, script_arguments, tiny_checkpoint, write_images  # noqa: E402

ENGINES = ("accelerate", "ray")


def tree_rss_mb(process: psutil.Process) -> float:
    """Resident memory of `process` and all processes under it (those that vanish meanwhile count as none)."""
    total = 0
    for member in [process, *process.children(recursive=True)]:
        try:
            total += member.memory_info().rss
        except psutil.Error:
            continue
    return total / 2**20


def run(engine: str, model: Path, images: Path, rows: int, output: Path, args: argparse.Namespace) -> dict:
    command = [sys.executable, str(EXAMPLE), *script_arguments(model, images, rows, output, args)]
    if engine == "ray":
        command += ["--engine", "ray", "--num_actors", str(args.num_actors)]
    started = time.perf_counter()
    child = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    process, peak = psutil.Process(child.pid), 0.0
    while child.poll() is None:
        try:
            peak = max(peak, tree_rss_mb(process))
        except psutil.Error:
            pass
        time.sleep(0.1)
    seconds = time.perf_counter() - started
    if child.returncode:
        raise RuntimeError(f"{engine} on {rows} rows exited with {child.returncode}: {' '.join(command)}")
    return {
        "engine": engine,
        "corpus_rows": rows,
        "seconds": seconds,
        "rows_per_second": rows / seconds,
        "peak_mb": peak,
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="10000,40000")
    parser.add_argument("--images_dir", help="Where the synthetic images are written (default: a temporary folder).")
    parser.add_argument("--shard_size", type=int, default=2000)
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--num_actors", type=int, default=2)
    parser.add_argument("--output", default="benchmarks/results/bench_ray_engine.json")
    args = parser.parse_args(argv)
    sizes = [int(size) for size in args.sizes.split(",")]
    print(f"{2 * len(sizes)} runs of examples/encode_corpus.py (about a minute per 40k rows each on 2 CPU cores)")
    with tempfile.TemporaryDirectory() as scratch:
        images = Path(args.images_dir or Path(scratch) / "images")
        write_images(images, max(sizes))
        model = tiny_checkpoint(Path(scratch) / "model")
        results = [
            run(engine, model, images, size, Path(scratch) / f"{engine}-{size}", args)
            for size in sizes
            for engine in ENGINES
        ]
    table = ["| engine | rows | seconds | rows/s | peak MB (all processes) |", "| --- | --- | --- | --- | --- |"]
    for r in results:
        table.append(
            f"| {r['engine']} | {r['corpus_rows']:,} | {r['seconds']:.1f} | {r['rows_per_second']:.0f} | "
            f"{r['peak_mb']:.0f} |"
        )
    return report(results, "\n".join(table), args.output, gpu=False, num_actors=args.num_actors)


if __name__ == "__main__":
    main()
