"""Does the embedded default find what was asked? Open-corpus search over the synthetic scenes of one split, as the
demo searches them: every scene image embedded with the document instruction, every query with the query instruction,
the whole split as the corpus (not MMEB's 16 candidates).

    python benchmarks/default_search.py                                  # outputs/stage1 and outputs/stage2, test
    python benchmarks/default_search.py --checkpoints outputs/stage2 --split dev

Reported per checkpoint and per rendering: `demo` (queries with the processor's query instruction, images with its
document instruction, as `encode_query` / `encode_document` and the demo do) and `as_trained` (a query as the
mini-MMEB's caption→image rows put it, "Find me an image that matches the given caption: …", images without an
instruction, as stage 2's pairs render them):
- **caption → image**: each scene's caption as the query; P@1 and R@5 that the scene itself (or a scene with the
  same caption) is found among all scenes of the split;
- **"a {colour} {shape}"**: for every colour–shape pair some scene holds, precision@8 (top-8 scenes that hold such a
  shape) against its base rate (the share of scenes that do), averaged over the pairs;
- **"{count} shapes"** and **"the number {d}"**: the same for a single attribute.
Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_encode import report  # noqa: E402

from coma_hf.data.sources import read_jsonl_records  # noqa: E402
from coma_hf.data.synthetic import NUMBER_WORDS  # noqa: E402

TOP = 8  # the demo's default number of results
TRAINED_QUERY = "Find me an image that matches the given caption: {}"  # the mini-MMEB's caption→image query text
RENDERINGS = ("demo", "as_trained")


def scene_facts(record: dict) -> dict:
    """What a query can ask of a scene: its colour–shape pairs, its shape count, its digit."""
    shapes = [obj for obj in record["objects"] if obj["kind"] == "shape"]
    digits = [obj["text"] for obj in record["objects"] if obj["kind"] == "text"]
    return {
        "pairs": {f"{obj['colour']} {obj['shape']}" for obj in shapes},
        "count": len(shapes),
        "digit": digits[0] if digits else None,
    }


def attribute_queries(facts: list[dict]) -> dict[str, dict[str, list[bool]]]:
    """`{kind: {query text: [does scene i answer it]}}` for every query some scene answers."""
    pairs = sorted({pair for fact in facts for pair in fact["pairs"]})
    counts = sorted({fact["count"] for fact in facts})
    digits = sorted({fact["digit"] for fact in facts if fact["digit"] is not None})
    return {
        "colour shape": {f"a {pair}": [pair in fact["pairs"] for fact in facts] for pair in pairs},
        "count": {
            f"{NUMBER_WORDS[count]} shape{'s' if count > 1 else ''}": [fact["count"] == count for fact in facts]
            for count in counts
        },
        "digit": {f"the number {digit}": [fact["digit"] == digit for fact in facts] for digit in digits},
    }


def precision_at(scores: torch.Tensor, relevant: list[bool], k: int = TOP) -> float:
    """The share of the `k` best-scoring scenes that answer the query (ties broken by corpus order)."""
    order = torch.sort(scores, descending=True, stable=True).indices[:k]
    return sum(relevant[index] for index in order.tolist()) / k


def evaluate(checkpoint: str, records: list[dict], root: Path) -> list[dict]:
    """The search metrics of one checkpoint over `records` (scene images under `root`), one result per rendering."""
    from transformers import AutoModel

    model = AutoModel.from_pretrained(checkpoint, trust_remote_code=True).eval()
    scenes = [{"image": str(root / record["image"])} for record in records]
    results = []
    for rendering in RENDERINGS:
        if rendering == "demo":
            images = model.encode_document(scenes, batch_size=32)
            embed = lambda texts: model.encode_query(texts, batch_size=32)  # noqa: E731
        else:
            images = model.encode(scenes, batch_size=32)
            embed = lambda texts: model.encode([TRAINED_QUERY.format(t) for t in texts], batch_size=32)  # noqa: E731
        results.append({"checkpoint": checkpoint, "rendering": rendering, **_metrics(records, images, embed)})
    return results


def _metrics(records: list[dict], images: torch.Tensor, embed) -> dict:
    """Caption→image P@1 / R@5 and the attribute queries' precision@8, with `embed` turning query texts into
    vectors."""
    captions = [record["caption"] for record in records]
    caption_scores = embed(captions) @ images.T
    hits_at_1 = hits_at_5 = 0
    for row, caption in enumerate(captions):
        same = {index for index, other in enumerate(captions) if other == caption}
        order = torch.sort(caption_scores[row], descending=True, stable=True).indices.tolist()
        hits_at_1 += order[0] in same
        hits_at_5 += bool(same & set(order[:5]))
    result = {
        "scenes": len(records),
        "caption_p_at_1": hits_at_1 / len(records),
        "caption_r_at_5": hits_at_5 / len(records),
        "chance_p_at_1": 1 / len(records),
    }
    for kind, queries in attribute_queries([scene_facts(record) for record in records]).items():
        texts = list(queries)
        scores = embed(texts) @ images.T
        precisions = [precision_at(scores[row], queries[text]) for row, text in enumerate(texts)]
        base_rates = [sum(queries[text]) / len(records) for text in texts]
        result[kind] = {
            "queries": len(texts),
            f"precision_at_{TOP}": sum(precisions) / len(texts),
            "base_rate": sum(base_rates) / len(texts),
            "per_query": {text: round(value, 3) for text, value in zip(texts, precisions, strict=True)},
        }
    return result


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoints", default="outputs/stage1,outputs/stage2", help="comma-separated")
    parser.add_argument("--synthetic_dir", default="outputs/synthetic")
    parser.add_argument("--split", default="test", choices=("dev", "test"))
    parser.add_argument("--output", default="benchmarks/results/default_search.json")
    args = parser.parse_args(argv)
    root = Path(args.synthetic_dir)
    records = read_jsonl_records(root / f"{args.split}.jsonl")
    results = [result for checkpoint in args.checkpoints.split(",") for result in evaluate(checkpoint, records, root)]
    table = [
        f"| checkpoint | rendering | caption P@1 | caption R@5 | colour shape P@{TOP} (base) | count P@{TOP} (base) "
        f"| digit P@{TOP} (base) |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in results:
        cells = [
            f"{r[kind][f'precision_at_{TOP}']:.2f} ({r[kind]['base_rate']:.2f})"
            for kind in ("colour shape", "count", "digit")
        ]
        table.append(
            f"| {r['checkpoint']} | {r['rendering']} | {r['caption_p_at_1']:.2f} | {r['caption_r_at_5']:.2f} | "
            + " | ".join(cells)
            + " |"
        )
    return report(results, "\n".join(table), args.output, gpu=False, split=args.split, scenes=len(records))


if __name__ == "__main__":
    main()
