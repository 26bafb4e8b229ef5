"""The demo (examples/app.py) under concurrent users: 16 `gradio_client` clients at once, 8 requests each, searches
and asks mixed, text and image queries mixed, on 127.0.0.1 only. Each run starts the app afresh with an empty cache,
so the clients' first searches all find the folder unembedded.

    pip install -e ".[demo]"
    python benchmarks/demo_load.py          # the shipped reader as a K = 8 CoMa model, app concurrency 1 and 4
    python benchmarks/demo_load.py --concurrency 1 --clients 4 --requests 2      # quick look

Per run: requests that errored, responses that differ from the same request served alone afterwards (ids, order,
scores within 1e-5, answers identical), how many times the folder was embedded, p50 and p95 latency and requests per
second. Prints a table and writes JSON (`--output`). tests/test_app.py runs the same load for correctness; the
figures belong here, and in docs/performance.md.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parents[1] / "tests"))
from app_helpers import RunningApp  # noqa: E402  (the demo started as its tests start it)

SCORE_TOLERANCE = 1e-5
TEXTS = ("a red circle", "a blue square on the left", "two shapes", "green", "a small yellow triangle")
QUESTIONS = ("What colour is the circle?", "How many shapes are there?", "Where is the square?")
EMBEDDING_LOG_LINE = "Embedding "  # what the app logs each time it embeds the folder


@dataclass(frozen=True)
class Request:
    """One call of the demo's API: `/search` (text, query image, top k) or `/ask` (upload, pick, question)."""

    api: str
    arguments: tuple

    def send(self, client) -> tuple:
        from gradio_client import handle_file

        if self.api == "/search":
            text, image, top_k = self.arguments
            return client.predict(text, handle_file(image) if image else None, top_k, api_name=self.api)
        upload, pick, question = self.arguments
        return client.predict(handle_file(upload) if upload else None, pick, question, api_name=self.api)


def request_pool(scenes: list[Path], seed: int = 0) -> list[Request]:
    """Distinct requests: text, image and text+image searches, and asks about an uploaded or a picked image."""
    rng = random.Random(seed)
    pool = []
    for index, text in enumerate(TEXTS):
        image = str(scenes[index % len(scenes)])
        pool += [
            Request("/search", (text, None, rng.randint(3, 8))),
            Request("/search", ("", image, rng.randint(3, 8))),
            Request("/search", (text, image, rng.randint(3, 8))),
        ]
    for index, question in enumerate(QUESTIONS):
        scene = scenes[(2 * index + 1) % len(scenes)]
        pool += [Request("/ask", (str(scene), None, question)), Request("/ask", (None, scene.name, question))]
    return pool


def request_plan(pool: list[Request], clients: int, per_client: int, seed: int = 0) -> list[list[Request]]:
    """Each client's requests, drawn from `pool` so that several clients send the same request at once."""
    rng = random.Random(seed)
    return [[rng.choice(pool) for _ in range(per_client)] for _ in range(clients)]


def comparable(request: Request, response: tuple) -> dict:
    """What must match between two responses to one request: ids in order and scores, or the answers."""
    if request.api == "/search":
        _gallery, table, status = response
        rows = table["data"]
        return {"ids": [row[1] for row in rows], "scores": [row[2] for row in rows], "status": status}
    return {"answers": list(response)}


def difference(got: dict, alone: dict) -> str | None:
    """Why `got` is not the response served alone, or `None` when it is."""
    if "answers" in alone:
        return None if got["answers"] == alone["answers"] else f"answers {got['answers']} != {alone['answers']}"
    if got["ids"] != alone["ids"] or got["status"] != alone["status"]:
        return f"ranking {got['ids']} != {alone['ids']}"
    worst = max((abs(a - b) for a, b in zip(got["scores"], alone["scores"], strict=True)), default=0.0)
    return None if worst <= SCORE_TOLERANCE else f"scores differ by {worst:.2e}"


def run_clients(url: str, plan: list[list[Request]]) -> tuple[list[dict], float]:
    """Every client of `plan` in its own thread with its own `Client`, all started together; one record per request
    (`client`, `request`, `seconds`, `response` or `error`) and the wall time."""
    from gradio_client import Client

    records: list[dict] = []
    start = threading.Barrier(len(plan) + 1)

    def client_thread(number: int, requests: list[Request]) -> None:
        client = Client(url, verbose=False)
        start.wait()
        for request in requests:
            began = time.perf_counter()
            try:
                outcome = {"response": comparable(request, request.send(client))}
            except Exception as error:  # noqa: BLE001 (a failed request is a result of the load test)
                outcome = {"error": f"{type(error).__name__}: {error}"}
            records.append({"client": number, "request": request, "seconds": time.perf_counter() - began, **outcome})

    threads = [threading.Thread(target=client_thread, args=item) for item in enumerate(plan)]
    for thread in threads:
        thread.start()
    start.wait()
    began = time.perf_counter()
    for thread in threads:
        thread.join()
    return records, time.perf_counter() - began


def served_alone(url: str, requests: set[Request]) -> dict[Request, dict]:
    """Each request sent by one client with nothing else running: what every concurrent response must equal."""
    from gradio_client import Client

    client = Client(url, verbose=False)
    return {request: comparable(request, request.send(client)) for request in sorted(requests, key=repr)}


def check_load(url: str, plan: list[list[Request]]) -> dict:
    """Run `plan` against the demo at `url`, then each of its requests alone; what went wrong and how fast it was."""
    records, wall = run_clients(url, plan)
    alone = served_alone(url, {record["request"] for record in records})
    with urllib.request.urlopen(url, timeout=30) as page:  # still serving its page
        healthy = page.status == 200
    errors = [f"client {r['client']} {r['request']}: {r['error']}" for r in records if "error" in r]
    mismatches = [
        f"client {r['client']} {r['request']}: {why}"
        for r in records
        if "response" in r and (why := difference(r["response"], alone[r["request"]]))
    ]
    latencies = sorted(record["seconds"] for record in records)
    return {
        "requests": len(records),
        "distinct_requests": len(alone),
        "errors": errors,
        "mismatches": mismatches,
        "healthy_after": healthy,
        "p50_seconds": statistics.median(latencies),
        "p95_seconds": latencies[min(len(latencies) - 1, round(0.95 * (len(latencies) - 1)))],
        "requests_per_second": len(records) / wall,
        "wall_seconds": wall,
    }


def embed_count(log: Path) -> int:
    """How many times the app embedded its folder, from its log."""
    return sum(EMBEDDING_LOG_LINE in line for line in log.read_text(errors="replace").splitlines())


# --------------------------------------------------------------------------------------------------------------------
# The benchmark
# --------------------------------------------------------------------------------------------------------------------
def prepare(root: Path, num_scenes: int) -> tuple[Path, Path]:
    """A K = 8 CoMa checkpoint over the shipped reader (answers mean something), and a folder of synthetic scenes."""
    import shutil

    from coma_hf.data.synthetic import write_synthetic_dataset
    from coma_hf.hub import save_checkpoint
    from coma_hf.tiny import build_tiny_coma

    checkpoint, scenes = root / "checkpoint", root / "scenes"
    model, _ = build_tiny_coma(num_compression_tokens=8, seed=0, reader=True)
    save_checkpoint(model, checkpoint)
    synthetic = write_synthetic_dataset(root / "synthetic", num_train=1, num_dev=1, num_test=num_scenes)["test"].parent
    scenes.mkdir()
    for image in sorted((synthetic / "images").glob("test-*.png")):
        shutil.copy(image, scenes / image.name)
    return checkpoint, scenes


def run(checkpoint: Path, scenes: Path, root: Path, concurrency: int, clients: int, per_client: int) -> dict:
    """One app with `--concurrency concurrency` and an empty cache, under the load; its figures."""
    cache, log = root / f"cache-{concurrency}", root / f"app-{concurrency}.log"
    arguments = ["--model_name_or_path", str(checkpoint), "--images", str(scenes), "--cache_dir", str(cache)]
    app = RunningApp([*arguments, "--concurrency", str(concurrency), "--batch_size", "8"], root, log).wait()
    try:
        plan = request_plan(request_pool(sorted(scenes.glob("*.png"))), clients, per_client)
        result = check_load(app.url, plan)
    finally:
        app.stop()
    embeds = embed_count(log)
    return {"concurrency": concurrency, "clients": clients, "per_client": per_client, **result, "embeds": embeds}


def table(results: list[dict]) -> str:
    lines = [
        "| concurrency | requests | errors | differ from alone | folder embedded | p50 (s) | p95 (s) | requests/s |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for row in results:
        lines.append(
            f"| {row['concurrency']} | {row['requests']} | {len(row['errors'])} | {len(row['mismatches'])} | "
            f"{row['embeds']} | {row['p50_seconds']:.2f} | {row['p95_seconds']:.2f} | "
            f"{row['requests_per_second']:.1f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--concurrency", default="1,4", help="Comma-separated --concurrency values of the app.")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--requests", type=int, default=8, help="Requests per client.")
    parser.add_argument("--scenes", type=int, default=24, help="Images in the searched folder.")
    parser.add_argument("--output", default="benchmarks/results/demo_load.json")
    args = parser.parse_args(argv)
    results = []
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        checkpoint, scenes = prepare(root, args.scenes)
        for concurrency in (int(value) for value in args.concurrency.split(",")):
            print(f"concurrency {concurrency}: {args.clients} clients × {args.requests} requests …", flush=True)
            results.append(run(checkpoint, scenes, root, concurrency, args.clients, args.requests))
    print(table(results))
    for row in results:
        for problem in row["errors"][:5] + row["mismatches"][:5]:
            print(f"  concurrency {row['concurrency']}: {problem}")
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(results, indent=2) + "\n")
    return results


if __name__ == "__main__":
    main()
