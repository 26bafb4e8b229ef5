"""The demo's core pieces without Gradio: the corpus cache key follows every file's bytes and time, the model and
the settings; matrix search ranks as the faiss index does."""

from __future__ import annotations

import os

import pytest
import torch

from coma_hf import inference

from utils import random_image, tiny_coma


@pytest.fixture
def folder(tmp_path):
    for index in range(4):
        random_image(index, (32, 32)).save(tmp_path / f"scene-{index}.png")
    return tmp_path


def _key(folder, fingerprint: str = "weights", **settings) -> str:
    return inference.corpus_cache_key(fingerprint, inference.folder_listing(folder), **settings)


def test_the_cache_key_changes_with_any_file_the_model_or_the_settings(folder):
    key = _key(folder, instruction="find")
    assert _key(folder, instruction="find") == key  # stable
    assert _key(folder, "other weights", instruction="find") != key
    assert _key(folder, instruction="other") != key
    assert _key(folder, instruction="find", dtype="bfloat16") != key

    first = folder / "scene-0.png"
    status = first.stat()
    with first.open("ab") as handle:  # rewritten under the same name and time, one byte longer
        handle.write(b"\0")
    os.utime(first, ns=(status.st_atime_ns, status.st_mtime_ns))
    longer = _key(folder, instruction="find")
    assert longer != key
    os.utime(first, ns=(status.st_atime_ns, status.st_mtime_ns + 1))  # the same bytes, touched
    touched = _key(folder, instruction="find")
    assert touched not in (key, longer)
    (folder / "scene-4.png").write_bytes(first.read_bytes())  # a new file
    assert _key(folder, instruction="find") not in (key, longer, touched)


def test_the_listing_is_in_the_order_the_corpus_is_read(folder):
    (folder / "notes.txt").write_text("not an image")
    listed = [relative for relative, _, _ in inference.folder_listing(folder)]
    assert listed == [row.id for row in inference.image_folder_rows(folder)]
    assert "notes.txt" not in listed


def test_matrix_search_ranks_as_the_faiss_index(folder, tmp_path_factory):
    pytest.importorskip("faiss")
    model, _ = tiny_coma()
    output = tmp_path_factory.mktemp("corpus")
    inference.encode_corpus(model, inference.image_folder_rows(folder), output, shard_size=3, batch_size=2)
    inference.write_manifest(output)
    inference.build_faiss_index(output)
    queries = model.encode_query(["a red circle", random_image(7, (32, 32))])
    ids, vectors = inference.load_embeddings(output)
    for got, expected in zip(
        inference.search_embeddings(ids, vectors, queries, top_k=3),
        inference.search_index(output, queries, top_k=3),
        strict=True,
    ):
        assert [name for name, _ in got] == [name for name, _ in expected]
        torch.testing.assert_close(torch.tensor([s for _, s in got]), torch.tensor([s for _, s in expected]))


def test_equal_scores_keep_corpus_order():
    vectors = torch.eye(3)[[0, 1, 1, 2]]
    hits = inference.search_embeddings(["a", "b", "c", "d"], vectors, torch.eye(3)[[1]], top_k=3)
    assert [name for name, _ in hits[0]] == ["b", "c", "a"] and hits[0][0][1] == hits[0][1][1] == 1.0
