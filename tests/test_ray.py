"""Corpus encoding on Ray Data (`coma_hf.inference.ray_engine`, `examples/encode_corpus.py --engine ray`) on a local
Ray instance: the same shards as `encode_corpus`, every id once, bad files skipped and counted, a killed worker."""

from __future__ import annotations

import os
import sys

import numpy as np
import pytest
import torch
from PIL import Image

ray = pytest.importorskip("ray")  # the [ray] extra; the dev extra installs it

from coma_hf import inference  # noqa: E402
from coma_hf.inference.ray_engine import ShardEncoder, encode_corpus_ray  # noqa: E402

from utils import load_example, tiny_coma  # noqa: E402

pytestmark = pytest.mark.slow  # a local Ray instance and its worker processes


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, ignore_reinit_error=True)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A saved tiny checkpoint, 11 images (one a cut PNG, one EXIF-rotated JPEG) and the accelerate path's output."""
    root = tmp_path_factory.mktemp("ray-corpus")
    model, _ = tiny_coma()
    model.save_pretrained(root / "model")
    images = root / "images"
    images.mkdir()
    for index in range(9):
        pixels = np.random.RandomState(index).randint(0, 256, (28 + 28 * (index % 2), 28, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(images / f"{index:03d}.png")
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(np.random.RandomState(9).randint(0, 256, (28, 56, 3), dtype=np.uint8)).save(
        images / "009.jpg", exif=exif
    )
    (images / "010.png").write_bytes((images / "000.png").read_bytes()[:40])  # cut: not decodable
    reference = root / "reference"
    instruction = model.processor.document_instruction  # both engines' default role
    rows = inference.image_folder_rows(images)
    inference.encode_corpus(model, rows, reference, shard_size=4, batch_size=3, instruction=instruction)
    return root, images, reference


def _shards(folder) -> dict[str, tuple[list[str], torch.Tensor, dict]]:
    return {path.name: inference.read_shard(path) for path in inference.finished_shards(folder)}


def test_ray_writes_the_shards_encode_corpus_writes(local_ray, corpus, tmp_path):
    root, images, reference = corpus
    counts = encode_corpus_ray(
        root / "model", inference.image_folder_rows(images), tmp_path, shard_size=4, batch_size=3, num_actors=2
    )
    assert counts["rows"] == 11 and counts["embedded"] == 10 and counts["skipped"] == 1
    assert counts["shards_written"] == 3
    ours, expected = _shards(tmp_path), _shards(reference)
    assert sorted(ours) == sorted(expected)
    ids = [identifier for shard_ids, _, _ in ours.values() for identifier in shard_ids]
    assert len(ids) == len(set(ids)) == 10  # every id once
    for name, (shard_ids, vectors, metadata) in expected.items():
        assert ours[name][0] == shard_ids and ours[name][2]["skipped"] == metadata["skipped"]
        torch.testing.assert_close(ours[name][1], vectors, atol=1e-5, rtol=0)
    assert [row["id"] for row in ours[inference.shard_name(8, 11)][2]["skipped"]] == ["010.png"]
    manifest = inference.write_manifest(tmp_path)
    assert manifest["embedded"] == 10 and manifest["skipped"] == 1
    # a second run finds every shard done
    again = encode_corpus_ray(root / "model", inference.image_folder_rows(images), tmp_path, shard_size=4)
    assert again["shards_already_done"] == 2 and again["shards_written"] == 1  # the short last shard is redone


class DyingOnce(ShardEncoder):
    """The first call of any worker that finds `marker` removes it and kills its process: Ray must restart the actor
    and retry the shard."""

    marker = ""

    def __call__(self, batch):
        if os.path.exists(self.marker):
            os.remove(self.marker)
            os._exit(1)
        return super().__call__(batch)


def test_a_worker_that_dies_is_retried_and_the_output_is_complete(local_ray, corpus, tmp_path):
    from ray import cloudpickle

    root, images, reference = corpus
    marker = tmp_path / "die-once"
    marker.write_text("")
    DyingOnce.marker = str(marker)
    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the workers cannot import this test module
    try:
        counts = encode_corpus_ray(
            root / "model",
            inference.image_folder_rows(images),
            tmp_path / "out",
            shard_size=4,
            batch_size=3,
            num_actors=1,
            encoder_class=DyingOnce,
        )
    finally:
        cloudpickle.unregister_pickle_by_value(sys.modules[__name__])
    assert not marker.exists()  # a worker died
    assert counts["shards_written"] == 3 and counts["embedded"] == 10
    assert sorted(_shards(tmp_path / "out")) == sorted(_shards(reference))


def test_encode_corpus_script_runs_on_ray(local_ray, corpus, tmp_path):
    root, images, reference = corpus
    result = load_example("encode_corpus").main(
        ["--model", str(root / "model"), "--images", str(images), "--output_dir", str(tmp_path), "--engine", "ray"]
        + ["--shard_size", "4", "--batch_size", "3", "--num_actors", "2"]
    )
    assert result["manifest"]["embedded"] == 10 and result["manifest"]["skipped"] == 1
    for name, (ids, vectors, _) in _shards(reference).items():
        torch.testing.assert_close(_shards(tmp_path)[name][1], vectors, atol=1e-5, rtol=0)
        assert _shards(tmp_path)[name][0] == ids


def test_jsonl_rows_of_text_images_and_bad_lines(local_ray, corpus, tmp_path):
    """Text rows, image rows, a row with both and a line that is not JSON, through Ray and through encode_corpus."""
    import json

    root, images, _ = corpus
    lines = [
        json.dumps({"id": "t1", "text": "a red circle"}),
        json.dumps({"id": "i1", "image": str(images / "001.png")}),
        "{not json",
        json.dumps({"id": "b1", "text": "what colour?", "image": str(images / "002.png")}),
        json.dumps({"id": "t2", "text": "two blue squares"}),
    ]
    corpus_file = tmp_path / "corpus.jsonl"
    corpus_file.write_text("\n".join(lines) + "\n")
    model, _ = tiny_coma()
    instruction = model.processor.document_instruction
    inference.encode_corpus(
        model, inference.jsonl_rows(corpus_file), tmp_path / "ref", shard_size=2, instruction=instruction
    )
    counts = encode_corpus_ray(root / "model", inference.jsonl_rows(corpus_file), tmp_path / "ray", shard_size=2)
    assert counts["embedded"] == 4 and counts["skipped"] == 1
    expected, ours = _shards(tmp_path / "ref"), _shards(tmp_path / "ray")
    assert sorted(ours) == sorted(expected)
    for name, (ids, vectors, metadata) in expected.items():
        assert ours[name][0] == ids and ours[name][2]["skipped"] == metadata["skipped"]
        torch.testing.assert_close(ours[name][1], vectors, atol=1e-5, rtol=0)
