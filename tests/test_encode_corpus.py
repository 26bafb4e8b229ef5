"""examples/encode_corpus.py and coma_hf.inference: sources, shards, bad rows, resume after SIGKILL with another
process count, parquet, datasets (streaming), the faiss index and search."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from coma_hf import inference

from utils import load_example, tiny_coma

EXAMPLE = Path(__file__).parents[1] / "examples" / "encode_corpus.py"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    folder = tmp_path_factory.mktemp("corpus") / "model"
    model, _ = tiny_coma()
    model.save_pretrained(folder)
    return folder


def _write_images(folder: Path, count: int, start: int = 0) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for index in range(start, start + count):
        pixels = np.random.RandomState(index).randint(0, 256, (28 + 28 * (index % 2), 28, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"{index:05d}.png")
    return folder


def _shards(folder: Path) -> list[tuple[str, list[str], torch.Tensor, dict]]:
    return [(path.name, *inference.read_shard(path)) for path in inference.finished_shards(folder)]


def _assert_same_shards(first: Path, second: Path) -> None:
    one, two = _shards(first), _shards(second)
    assert [entry[0] for entry in one] == [entry[0] for entry in two]
    for (name, ids, vectors, metadata), (_, ids2, vectors2, metadata2) in zip(one, two, strict=False):
        assert ids == ids2 and metadata == metadata2, name
        assert torch.equal(vectors, vectors2), name


@pytest.mark.slow
def test_images_and_jsonl_with_bad_rows_are_embedded_skipped_and_reported(checkpoint, tmp_path):
    from transformers import AutoModel

    images = _write_images(tmp_path / "images", 5)
    (images / "broken.png").write_text("not an image")
    lines = [
        json.dumps({"id": "a", "text": "a red circle"}),
        json.dumps({"id": "b", "image": "images/00001.png"}),
        "{not json",
        json.dumps({"id": "d", "text": "   "}),
        json.dumps({"id": "e", "image": "images/missing.png"}),
        json.dumps({"id": "f", "text": "two squares", "image": "images/00002.png"}),
    ]
    jsonl = tmp_path / "corpus.jsonl"
    jsonl.write_bytes(("\n".join(lines) + "\n").encode() + b"\xff\xfe bad utf-8\n")

    result = load_example("encode_corpus").main(
        [
            "--model",
            str(checkpoint),
            "--jsonl",
            str(jsonl),
            "--output_dir",
            str(tmp_path / "out"),
            "--shard_size",
            "4",
            "--batch_size",
            "3",
        ]
    )
    manifest = result["manifest"]
    assert (manifest["rows"], manifest["embedded"], manifest["skipped"]) == (7, 3, 4)
    reasons = {entry["id"]: entry["error"] for entry in manifest["skipped_rows"]}
    assert "line 3" in reasons["2"] and "line 7" in reasons["6"]  # no JSON / no UTF-8: named by line
    assert "'text'" in reasons["d"] and "whitespace" in reasons["d"]
    assert "field 'image'" in reasons["e"] and "missing.png" in reasons["e"]
    ids, vectors = inference.load_embeddings(tmp_path / "out")
    assert ids == ["a", "b", "f"]
    # the vectors are encode_document's for the same rows: nothing shifted by the skipped ones
    model = AutoModel.from_pretrained(checkpoint, trust_remote_code=True).eval()
    expected = model.encode_document(
        [
            {"text": "a red circle"},
            {"image": str(images / "00001.png")},
            {"text": "two squares", "image": str(images / "00002.png")},
        ]
    )
    torch.testing.assert_close(vectors, expected, rtol=1e-5, atol=1e-5)

    folder = load_example("encode_corpus").main(
        ["--model", str(checkpoint), "--images", str(images), "--output_dir", str(tmp_path / "folder")]
    )["manifest"]
    assert (folder["rows"], folder["embedded"]) == (6, 5)
    assert (
        folder["skipped_rows"][0]["id"] == "broken.png" and "cannot read image" in folder["skipped_rows"][0]["error"]
    )


@pytest.mark.slow
def test_a_killed_run_resumes_with_another_process_count_and_equals_an_uninterrupted_run(checkpoint, tmp_path):
    images = _write_images(tmp_path / "images", 1200)
    common = ["--model", str(checkpoint), "--images", str(images), "--shard_size", "50", "--batch_size", "16"]
    load_example("encode_corpus").main(common + ["--output_dir", str(tmp_path / "whole")])

    killed = tmp_path / "killed"
    process = subprocess.Popen(
        [sys.executable, str(EXAMPLE), *common, "--output_dir", str(killed)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 120
    while len(inference.finished_shards(killed)) < 2 and process.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    done = len(inference.finished_shards(killed))
    assert 2 <= done < 24, f"the kill came too late to test resuming ({done} of 24 shards)"

    # resume as two processes (each one's shards; they are independent, so run here one after the other)
    from transformers import AutoModel

    coma = AutoModel.from_pretrained(checkpoint, trust_remote_code=True).eval()
    counts = [
        inference.encode_corpus(
            coma,
            inference.image_folder_rows(images),
            killed,
            shard_size=50,
            batch_size=16,
            instruction=coma.processor.document_instruction,
            process_index=rank,
            num_processes=2,
        )
        for rank in range(2)
    ]
    assert sum(count["shards_already_done"] for count in counts) == done
    assert sum(count["shards_written"] for count in counts) == 24 - done
    inference.write_manifest(killed)
    assert not list(killed.glob(".*.tmp"))  # a half-written shard of the killed run is cleaned up, never listed
    _assert_same_shards(tmp_path / "whole", killed)


@pytest.mark.slow
def test_parquet_and_datasets_sources_give_the_same_vectors(checkpoint, tmp_path):
    import datasets

    images = _write_images(tmp_path / "images", 12)
    common = ["--model", str(checkpoint), "--shard_size", "5", "--batch_size", "4"]
    load_example("encode_corpus").main(common + ["--images", str(images), "--output_dir", str(tmp_path / "st")])
    load_example("encode_corpus").main(
        common + ["--images", str(images), "--output_dir", str(tmp_path / "pq"), "--format", "parquet"]
    )
    reference_ids, reference = inference.load_embeddings(tmp_path / "st")
    ids, vectors = inference.load_embeddings(tmp_path / "pq")
    assert ids == reference_ids and torch.equal(vectors, reference)
    assert [path.suffix for path in inference.finished_shards(tmp_path / "pq")] == [".parquet"] * 3

    files = sorted(images.iterdir())
    table = datasets.Dataset.from_dict({"id": [path.name for path in files], "image": [str(path) for path in files]})
    table = table.cast_column("image", datasets.Image())
    table.save_to_disk(str(tmp_path / "saved"))
    load_example("encode_corpus").main(
        common + ["--dataset", str(tmp_path / "saved"), "--output_dir", str(tmp_path / "ds")]
    )
    streamed = tmp_path / "streamed"
    from transformers import AutoModel

    coma = AutoModel.from_pretrained(checkpoint, trust_remote_code=True).eval()
    inference.encode_corpus(
        coma,
        inference.dataset_rows(table.to_iterable_dataset()),
        streamed,
        shard_size=5,
        batch_size=4,
        instruction=coma.processor.document_instruction,
    )
    for folder in ("ds", "streamed"):
        ids, vectors = inference.load_embeddings(tmp_path / folder)
        assert ids == reference_ids, folder
        torch.testing.assert_close(vectors, reference, rtol=1e-5, atol=1e-6, msg=folder)


@pytest.mark.slow
def test_faiss_index_finds_each_image_first(checkpoint, tmp_path):
    pytest.importorskip("faiss")
    images = _write_images(tmp_path / "images", 20)
    load_example("encode_corpus").main(
        [
            "--model",
            str(checkpoint),
            "--images",
            str(images),
            "--output_dir",
            str(tmp_path / "out"),
            "--shard_size",
            "8",
            "--faiss_index",
            "--role",
            "none",
        ]
    )
    ids, vectors = inference.load_embeddings(tmp_path / "out")
    hits = inference.search_index(tmp_path / "out", vectors[:5], top_k=3)
    assert [row[0][0] for row in hits] == ids[:5]
    assert all(row[0][1] == pytest.approx(1.0, abs=1e-4) and row[0][1] >= row[1][1] for row in hits)

    found = load_example("search_corpus").main(
        ["--model", str(checkpoint), "--index_dir", str(tmp_path / "out"), "--query", "a photo", "--top_k", "4"]
    )
    assert len(found) == 1 and len(found[0]) == 4 and {hit[0] for hit in found[0]} <= set(ids)
    scores = [hit[1] for hit in found[0]]
    assert scores == sorted(scores, reverse=True)


@pytest.mark.slow
def test_a_grown_corpus_redoes_only_its_last_short_shard_and_another_shard_size_is_refused(checkpoint, tmp_path):
    images = _write_images(tmp_path / "images", 7)
    common = [
        "--model",
        str(checkpoint),
        "--images",
        str(images),
        "--shard_size",
        "3",
        "--output_dir",
        str(tmp_path / "out"),
    ]
    load_example("encode_corpus").main(common)
    first = {path.name: path.stat().st_mtime_ns for path in inference.finished_shards(tmp_path / "out")}
    assert sorted(first) == [inference.shard_name(0, 3), inference.shard_name(3, 6), inference.shard_name(6, 7)]
    _write_images(images, 2, start=7)
    result = load_example("encode_corpus").main(common)
    assert result["process"]["shards_already_done"] == 2 and result["process"]["shards_written"] == 1
    now = {path.name: path.stat().st_mtime_ns for path in inference.finished_shards(tmp_path / "out")}
    assert sorted(now) == [inference.shard_name(0, 3), inference.shard_name(3, 6), inference.shard_name(6, 9)]
    assert all(now[name] == first[name] for name in sorted(now)[:2])  # the full shards were not rewritten
    load_example("encode_corpus").main(common[:-2] + ["--output_dir", str(tmp_path / "fresh")])
    _assert_same_shards(tmp_path / "fresh", tmp_path / "out")
    with pytest.raises(ValueError, match="another shard size"):
        load_example("encode_corpus").main(common[:4] + ["--shard_size", "4", "--output_dir", str(tmp_path / "out")])
