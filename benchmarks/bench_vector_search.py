"""Search backends side by side on one corpus folder: build time, query time, peak memory and recall@10 of LanceDB
flat and IVF, faiss flat and the matrix product (`coma_hf.inference.search`'s backends).

    python benchmarks/bench_vector_search.py                      # 40k unit vectors of 1,536 dims, 100 queries
    python benchmarks/bench_vector_search.py --rows 5000 --dim 64 # quick look

The corpus is written once as `encode_corpus` shards (10k rows each) of clustered unit vectors (a stand-in for
embeddings, which cluster). Each backend runs in a fresh process, so that its peak resident memory is its own:
"build" is what it does before the first query (load the shards and stack them; build `index.faiss`; sync the
LanceDB table, with the IVF index for `lancedb_ivf`), "query" the mean time of one query of `--queries`, searched one
at a time (a server's case). Recall@10 is against the matrix product's top 10. Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_encode import report  # noqa: E402

BACKENDS = ("matrix", "faiss", "lancedb_flat", "lancedb_ivf")
SHARD_SIZE = 10_000

# One backend in a child process: its own peak RSS (ru_maxrss), build and query times, and its top-10 ids.
CHILD = """
import json, resource, sys, time
import torch
from coma_hf import inference
from coma_hf.inference import lancedb_store
backend, corpus, db = sys.argv[1], sys.argv[2], sys.argv[3]
queries = torch.load(corpus + "/queries.pt")
started = time.perf_counter()
if backend == "matrix":
    ids, vectors = inference.load_embeddings(corpus)
    search = lambda query: inference.search_embeddings(ids, vectors, query, 10)
elif backend == "faiss":
    inference.build_faiss_index(corpus)
    index, ids = inference.load_faiss_index(corpus)
    search = lambda query: inference.search_loaded_index(index, ids, query, 10)
else:
    threshold = 0 if backend == "lancedb_ivf" else 10**12
    lancedb_store.sync_lancedb(corpus, db, index_min_rows=threshold)
    search = lambda query: lancedb_store.search_lancedb(db, query, 10, exact=backend == "lancedb_flat")
built = time.perf_counter()
hits = [search(queries[i : i + 1])[0] for i in range(len(queries))]
done = time.perf_counter()
print("RESULT", json.dumps({"build_s": built - started, "query_ms": 1000 * (done - built) / len(queries),
      "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
      "top10": [[identifier for identifier, _ in row] for row in hits]}))
"""


def write_corpus(folder: Path, rows: int, dim: int, num_queries: int) -> None:
    """Clustered unit vectors as shards of `SHARD_SIZE`, and `queries.pt` (perturbed corpus vectors); written once."""
    from coma_hf.inference import shard_name, write_shard

    if (folder / "queries.pt").exists():
        return
    folder.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(0)
    centres = torch.nn.functional.normalize(torch.randn(max(1, rows // 100), dim, generator=generator), dim=-1)
    for start in range(0, rows, SHARD_SIZE):
        end = min(start + SHARD_SIZE, rows)
        noise = 0.6 * torch.randn(end - start, dim, generator=generator) / dim**0.5
        vectors = torch.nn.functional.normalize(centres[torch.arange(start, end) % len(centres)] + noise, dim=-1)
        ids = [f"row{index}" for index in range(start, end)]
        write_shard(folder / shard_name(start, end), ids, vectors, {"start": start, "end": end, "skipped": []})
    picked = torch.randperm(rows, generator=generator)[:num_queries]
    from coma_hf.inference import load_embeddings

    _, vectors = load_embeddings(folder)
    noise = 0.2 * torch.randn(num_queries, dim, generator=generator) / dim**0.5
    torch.save(torch.nn.functional.normalize(vectors[picked] + noise, dim=-1), folder / "queries.pt")


def run(backend: str, corpus: Path) -> dict:
    """One backend in a fresh process, from no index: the faiss index and the LanceDB table are removed first."""
    (corpus / "index.faiss").unlink(missing_ok=True)
    db = corpus.parent / f"db-{backend}"
    shutil.rmtree(db, ignore_errors=True)
    done = subprocess.run(
        [sys.executable, "-c", CHILD, backend, str(corpus), str(db)], capture_output=True, text=True, check=True
    )
    return json.loads(done.stdout.split("RESULT ", 1)[1])


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=40_000)
    parser.add_argument("--dim", type=int, default=1536)
    parser.add_argument("--queries", type=int, default=100)
    parser.add_argument("--work_dir", default=None, help="where the corpus is written (default: a temporary folder)")
    parser.add_argument("--output", default="benchmarks/results/bench_vector_search.json")
    args = parser.parse_args(argv)
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="vector-search-"))
    corpus = work / f"corpus-{args.rows}-{args.dim}"
    print(f"Writing {args.rows:,} vectors of {args.dim} dims to {corpus} (once); then 4 backends, each a process")
    write_corpus(corpus, args.rows, args.dim, args.queries)
    results = {backend: run(backend, corpus) for backend in BACKENDS}
    exact = results["matrix"].pop("top10")
    rows = []
    for backend, result in results.items():
        found = result.pop("top10", exact)
        recall = sum(len(set(a) & set(e)) for a, e in zip(found, exact, strict=True)) / (10 * len(exact))
        rows.append({"backend": backend, "rows": args.rows, "dim": args.dim, **result, "recall_at_10": recall})
    table = ["| backend | build (s) | query (ms) | peak RSS (MB) | recall@10 |", "| --- | --- | --- | --- | --- |"]
    table += [
        f"| {row['backend']} | {row['build_s']:.2f} | {row['query_ms']:.2f} | {row['peak_rss_mb']:.0f} | "
        f"{row['recall_at_10']:.3f} |"
        for row in rows
    ]
    return report(rows, "\n".join(table), args.output, gpu=False)


if __name__ == "__main__":
    main()
