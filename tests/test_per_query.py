"""`MMEBEvaluator`'s per-query results and the hash of the split files it scored."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch

from coma_hf.evaluation.mmeb import MMEBDataset, MMEBEvaluator, gold_ranks, load_mmeb_datasets, top1_positions

# each text a fixed 2-d vector (the queries and candidates of the rows below)
TABLE = {
    "q1": [1, 0],
    "q2": [0, 1],
    "q3": [1, 1],
    "a": [1, 0],
    "b": [0, 1],
    "c": [-1, 0],
    "d": [0.6, 0.8],
}


def _lookup(items):
    """A fake encoder: each `(text, image)` item's vector from `TABLE`."""
    return torch.stack([torch.tensor(TABLE[text], dtype=torch.float32) for text, _ in items])


def _row(query, candidates):
    return {"qry_text": query, "qry_img_path": "", "tgt_text": candidates, "tgt_img_path": [""] * len(candidates)}


ROWS = [
    _row("q1", ["a", "b", "c"]),  # gold wins: rank 1, top-1 position 0
    _row("q2", ["c", "a", "b", "d"]),  # "b" (position 2) wins; "a" ties the gold: rank 4
    _row("q3", ["a", "b", "c"]),  # gold ties "b": a miss, the tied "b" (position 1) is top-1
    _row("q1", ["c", "b", "a"]),  # "a" (position 2) wins
]


def _write(folder, rows_by_name, manifest=None):
    folder.mkdir(parents=True, exist_ok=True)
    for name, rows in rows_by_name.items():
        (folder / f"{name}.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    if manifest is not None:
        (folder / "mmeb_manifest.json").write_text(json.dumps(manifest))
    return folder


def _evaluate(datasets, output_dir=None, per_query=True):
    return MMEBEvaluator(datasets, show_progress_bar=False, per_query=per_query)(_lookup, output_dir=output_dir)


def test_per_query_ranks_and_top1_positions(tmp_path):
    folder = _write(tmp_path / "split", {"ImageNet-1K": ROWS, "MSCOCO_t2i": ROWS[:2]})
    results = _evaluate(load_mmeb_datasets(folder))
    queries = results["per_query"]
    assert [(query["dataset"], query["query_id"]) for query in queries] == [
        *(("ImageNet-1K", index) for index in range(4)),
        ("MSCOCO_t2i", 0),
        ("MSCOCO_t2i", 1),
    ]
    imagenet = [query for query in queries if query["dataset"] == "ImageNet-1K"]
    assert [query["gold_rank"] for query in imagenet] == [1, 4, 2, 3]
    assert [query["top1_position"] for query in imagenet] == [0, 2, 1, 2]
    for name, metrics in results["datasets"].items():  # the per-query ranks are the summary's
        ranks = [query["gold_rank"] for query in queries if query["dataset"] == name]
        assert len(ranks) == metrics["num_queries"]
        assert sum(rank == 1 for rank in ranks) / len(ranks) == pytest.approx(metrics["precision@1"])
    assert all((query["top1_position"] == 0) == (query["gold_rank"] == 1) for query in queries)


NAN = float("nan")


@pytest.mark.parametrize(
    ("row", "rank", "position"),
    [
        ([0.2, 0.1, 0.9, 0.15], 2, 2),  # the distractor that wins
        ([0.5, 0.2, 0.5, 0.5], 3, 2),  # a tie with the gold is a miss: the first tied distractor is top-1
        ([1.0, 1.0, 1.0, 1.0], 4, 1),  # one vector for everything
        ([NAN, 0.1, 0.3], 3, 2),  # a NaN gold ranks last
        ([NAN, NAN, NAN], 3, 1),
        ([0.1, NAN, 0.0], 1, 0),  # NaN distractors rank last
        ([NAN], 1, 0),  # a lone candidate is top-1
    ],
)
def test_top1_position_follows_the_tie_rule(row, rank, position):
    scores = [torch.tensor(row)]
    assert gold_ranks(scores) == [rank] and top1_positions(scores, [rank]) == [position]


def test_per_query_jsonl_beside_the_summary(tmp_path):
    folder = _write(tmp_path / "split", {"ImageNet-1K": ROWS})
    results = _evaluate(load_mmeb_datasets(folder), output_dir=tmp_path / "out")
    lines = (tmp_path / "out" / "per_query.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    assert len(records) == len(ROWS) and records == results["per_query"]
    assert all(set(record) == {"dataset", "query_id", "gold_rank", "top1_position"} for record in records)
    saved = json.loads((tmp_path / "out" / "mmeb_results.json").read_text())
    assert "per_query" not in saved and saved["split"] == results["split"]
    assert (tmp_path / "out" / "mmeb_results.md").exists()


def test_summary_without_per_query_keeps_its_keys(tmp_path):
    folder = _write(tmp_path / "split", {"ImageNet-1K": ROWS})
    plain = _evaluate(load_mmeb_datasets(folder), output_dir=tmp_path / "out", per_query=False)
    assert set(plain) == {"datasets", "meta_tasks", "distributions", "overall", "split"}
    assert set(plain["datasets"]["ImageNet-1K"]) == {
        "precision@1",
        "recall@1",
        "recall@5",
        "recall@10",
        "mrr",
        "num_queries",
        "meta_task",
        "distribution",
    }
    assert not (tmp_path / "out" / "per_query.jsonl").exists()
    with_queries = _evaluate(load_mmeb_datasets(folder))
    assert {key: value for key, value in with_queries.items() if key != "per_query"} == plain


def test_split_hash_names_the_files(tmp_path):
    folder = _write(tmp_path / "split", {"ImageNet-1K": ROWS, "MSCOCO_t2i": ROWS[:2]})
    first = load_mmeb_datasets(folder)
    sha256 = first[0].split_sha256
    assert len(sha256) == 64 and {dataset.split_sha256 for dataset in first} == {sha256}
    assert load_mmeb_datasets(folder)[0].split_sha256 == sha256  # stable
    copy = _write(tmp_path / "copy", {"ImageNet-1K": ROWS, "MSCOCO_t2i": ROWS[:2]})
    assert load_mmeb_datasets(copy)[0].split_sha256 == sha256  # the bytes, not where they lie

    # one byte of one file changed
    path = folder / "MSCOCO_t2i.jsonl"
    data = bytearray(path.read_bytes())
    data[data.index(b"q2")] = ord("Q")
    path.write_bytes(bytes(data))
    changed = load_mmeb_datasets(folder)[0].split_sha256
    assert changed != sha256
    # only the files read: the names asked for, and the manifest
    assert load_mmeb_datasets(folder, names=["ImageNet-1K"])[0].split_sha256 not in (sha256, changed)
    (folder / "mmeb_manifest.json").write_text(json.dumps({"out_of_distribution": []}))
    assert load_mmeb_datasets(folder)[0].split_sha256 not in (sha256, changed)


def test_results_carry_the_hash_and_counts_of_subsets(tmp_path):
    folder = _write(tmp_path / "split", {"ImageNet-1K": ROWS, "MSCOCO_t2i": ROWS[:2]})
    datasets = load_mmeb_datasets(folder)
    subsets = [replace(dataset, rows=dataset.rows[:1]) for dataset in datasets]
    results = _evaluate(subsets)
    assert results["split"] == {"sha256": datasets[0].split_sha256, "num_queries": {"ImageNet-1K": 1, "MSCOCO_t2i": 1}}
    assert [query["query_id"] for query in results["per_query"]] == [0, 0]

    built = MMEBDataset("VOC2007", ROWS, None, "Classification")  # built in code: no files to name
    assert built.split_sha256 is None and _evaluate([built])["split"]["sha256"] is None
    other = _write(tmp_path / "other", {"VOC2007": ROWS})
    mixed = _evaluate([*datasets, *load_mmeb_datasets(other)])["split"]["sha256"]
    assert len(mixed) == 64 and mixed not in (datasets[0].split_sha256, load_mmeb_datasets(other)[0].split_sha256)
