"""No damaged file is trusted (issue 27 §3): storage that cuts or garbles a file after it was written whole — a full
disk, an interrupted copy, a bad sector — is noticed by the resumed run, which redoes that part, says so in the log,
and ends with what an uninterrupted run ends with. One test per file kind: a corpus shard cut mid-tensor, a manifest
cut mid-record, a zero-length or unreadable faiss index, the demo's cache, a QA-generation record cut mid-line or
garbled mid-file, a benchmark run's JSON record cut mid-line, a Trainer checkpoint's safetensors file cut
mid-tensor."""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import sys
from dataclasses import asdict
from pathlib import Path

import pytest
import torch

from coma_hf import inference
from coma_hf.data.qa_generation import Reply, Sampling, generate_qa, iter_images
from coma_hf.storage import DamagedFileError, load_record, safetensors_damage

from utils import load_example, random_image, tiny_coma, training_args

MANIFEST = "manifest.json"
SHARD_SIZE = 3
NUM_IMAGES = 7  # shards [0, 3), [3, 6) and the short [6, 7)


# --------------------------------------------------------------------------------------------------------------------
# Damage, as storage does it
# --------------------------------------------------------------------------------------------------------------------
def _damage(path: Path, data: bytes) -> None:
    """Replace the bytes of `path` and keep its modification time, as a bad sector or a truncation by the file system
    does (no writer touched it)."""
    status = path.stat()
    path.write_bytes(data)
    os.utime(path, ns=(status.st_atime_ns, status.st_mtime_ns))


def _tensor_data_middle(data: bytes) -> int:
    """The offset halfway through a safetensors file's tensor bytes (after its header)."""
    header_end = 8 + int.from_bytes(data[:8], "little")
    return header_end + (len(data) - header_end) // 2


def _cut_mid_data(path: Path) -> None:
    """Cut a safetensors file halfway through its tensor bytes (its header stays whole)."""
    data = path.read_bytes()
    _damage(path, data[: _tensor_data_middle(data)])


def _flip_a_bit_mid_data(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[_tensor_data_middle(data)] ^= 0x10
    _damage(path, bytes(data))


def _cut_in_half(path: Path) -> None:
    data = path.read_bytes()
    _damage(path, data[: len(data) // 2])


def _warnings(caplog) -> str:
    return "\n".join(record.getMessage() for record in caplog.records if record.levelno >= logging.WARNING)


# --------------------------------------------------------------------------------------------------------------------
# Corpus shards, their manifest, the faiss index
# --------------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("images")
    for index in range(NUM_IMAGES):
        random_image(index, (28, 28 + 28 * (index % 2))).save(folder / f"{index:05d}.png")
    return folder


def _encode(folder: Path, images: Path, file_format: str = "safetensors") -> dict:
    model, _ = tiny_coma()
    rows = inference.image_folder_rows(images)
    return inference.encode_corpus(model, rows, folder, shard_size=SHARD_SIZE, batch_size=4, file_format=file_format)


@pytest.fixture(scope="module")
def whole(tmp_path_factory, images) -> dict[str, Path]:
    """An uninterrupted run with its manifest, per shard format."""
    folders = {}
    for file_format in inference.FORMATS:
        folders[file_format] = tmp_path_factory.mktemp(f"whole-{file_format}")
        _encode(folders[file_format], images, file_format)
        inference.write_manifest(folders[file_format])
    return folders


def _assert_same_corpus(first: Path, second: Path) -> None:
    one, two = inference.finished_shards(first), inference.finished_shards(second)
    assert [path.name for path in one] == [path.name for path in two]
    for left, right in zip(one, two, strict=True):
        ids, vectors, metadata = inference.read_shard(left)
        assert (ids, metadata) == inference.read_shard(right)[::2], left.name
        assert torch.equal(vectors, inference.read_shard(right)[1]), left.name
    # safetensors writes its metadata in hash-map order, so equal shards need not have equal bytes: the digests differ
    assert _without_digests(load_record(first / MANIFEST)) == _without_digests(load_record(second / MANIFEST))
    assert inference.verified_manifest(second) is not None  # its digests are the files'


def _without_digests(manifest: dict) -> dict:
    return {**manifest, "shards": [{**entry, "sha256": None} for entry in manifest["shards"]]}


@pytest.mark.parametrize(
    ("file_format", "with_manifest", "damage", "found"),
    [
        ("safetensors", True, _cut_mid_data, "bytes where the manifest recorded"),  # its size and SHA-256 recorded
        ("safetensors", True, _flip_a_bit_mid_data, "its SHA-256 is not the one the manifest recorded"),
        ("safetensors", False, _cut_mid_data, "cut inside tensor 'embeddings'"),  # no manifest yet: opened, counted
        ("parquet", False, _cut_in_half, "cannot be read"),
    ],
    ids=["cut-manifest", "bit-flip-manifest", "cut-no-manifest", "parquet-cut-no-manifest"],
)
def test_a_shard_cut_mid_tensor_is_redone_and_the_corpus_equals_an_uninterrupted_run(
    whole, images, tmp_path, caplog, file_format, with_manifest, damage, found
):
    damaged = tmp_path / "damaged"
    shutil.copytree(whole[file_format], damaged)  # modification times kept: the manifest vouches for its shards
    if not with_manifest:
        (damaged / "manifest.json").unlink()
    shard = damaged / inference.shard_name(3, 6, file_format)
    damage(shard)

    with caplog.at_level(logging.WARNING):
        counts = _encode(damaged, images, file_format)
    assert f"Redoing the damaged shard {shard}: " in _warnings(caplog) and found in _warnings(caplog)
    assert counts["damaged_shards_redone"] == 1 and counts["shards_already_done"] == 1
    assert counts["shards_written"] == 2  # the damaged shard and the short last one (always redone)
    inference.write_manifest(damaged)
    _assert_same_corpus(whole[file_format], damaged)


def test_a_damaged_shard_is_named_by_every_reader_not_met_with_safetensors_own_error(whole, tmp_path):
    """The bug: a shard cut after a run was trusted by the resume, then `write_manifest` died with a raw
    `SafetensorError` naming no file. Readers now raise `DamagedFileError` naming it."""
    damaged = tmp_path / "damaged"
    shutil.copytree(whole["safetensors"], damaged)
    shard = damaged / inference.shard_name(0, 3)
    _cut_mid_data(shard)
    for read in (inference.write_manifest, inference.load_embeddings, lambda _: inference.read_shard(shard)):
        with pytest.raises(DamagedFileError, match=rf"{shard.name} is damaged: cut inside tensor 'embeddings'"):
            read(damaged)


def test_a_shard_whose_counts_disagree_with_its_ids_is_damaged(whole, tmp_path):
    ids, vectors, metadata = inference.read_shard(whole["safetensors"] / inference.shard_name(0, 3))
    shard = tmp_path / inference.shard_name(0, 3)
    inference.write_shard(shard, ids, vectors[:2], metadata)  # one vector lost
    assert inference.shard_damage(shard) == "3 ids and 2 vectors, but its range less its skipped rows holds 3"
    inference.write_shard(shard, ids, vectors, {**metadata, "end": 4})  # another range than its name says
    assert "holds 4" in inference.shard_damage(shard)


def test_a_manifest_cut_mid_record_is_ignored_with_a_warning_and_written_again(whole, images, tmp_path, caplog):
    damaged = tmp_path / "damaged"
    shutil.copytree(whole["safetensors"], damaged)
    _cut_in_half(damaged / "manifest.json")
    with caplog.at_level(logging.WARNING):
        counts = _encode(damaged, images)
    assert f"Ignoring the damaged file {damaged / 'manifest.json'} (not whole JSON" in _warnings(caplog)
    assert counts["damaged_shards_redone"] == 0 and counts["shards_already_done"] == 2  # opened and counted instead
    inference.write_manifest(damaged)
    _assert_same_corpus(whole["safetensors"], damaged)


@pytest.mark.parametrize(("damage", "found"), [("zero-length", "zero-length"), ("cut", "faiss cannot read it")])
def test_a_zero_length_or_unreadable_faiss_index_is_rebuilt_with_a_warning(whole, tmp_path, caplog, damage, found):
    pytest.importorskip("faiss")
    corpus = tmp_path / "corpus"
    shutil.copytree(whole["safetensors"], corpus)
    inference.build_faiss_index(corpus)
    _, vectors = inference.load_embeddings(corpus)
    expected = inference.search_index(corpus, vectors[:3], top_k=4)
    index = corpus / "index.faiss"
    index.write_bytes(b"") if damage == "zero-length" else _cut_in_half(index)
    with caplog.at_level(logging.WARNING):
        assert inference.search_index(corpus, vectors[:3], top_k=4) == expected
    assert f"Rebuilding the damaged index {index} from the shards: {found}" in _warnings(caplog)
    caplog.clear()
    assert inference.search_index(corpus, vectors[:3], top_k=4) == expected and not _warnings(caplog)


def test_the_demo_cache_redoes_a_damaged_shard_and_index(images, tmp_path, caplog):
    app = load_example("app")
    model, _ = tiny_coma()
    index = "faiss" if importlib.util.find_spec("faiss") else "matrix"

    def search() -> tuple[list, dict]:
        folder_search = app.FolderSearch(model, images, tmp_path / "cache", index, batch_size=4, shard_size=SHARD_SIZE)
        hits, manifest = folder_search.search("a red circle", None, 5)
        return hits, _without_digests(manifest)

    expected = search()
    (entry,) = (tmp_path / "cache").iterdir()
    shard = entry / inference.shard_name(3, 6)
    _cut_mid_data(shard)
    with caplog.at_level(logging.WARNING):
        assert search() == expected
    assert f"Redoing the damaged shard {shard}: " in _warnings(caplog)
    if index == "faiss":
        (entry / "index.faiss").write_bytes(b"")
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            assert search() == expected
        rebuilt = f"Rebuilding the damaged index {entry / 'index.faiss'} from the shards: zero-length"
        assert rebuilt in _warnings(caplog)


# --------------------------------------------------------------------------------------------------------------------
# QA-generation output
# --------------------------------------------------------------------------------------------------------------------
class CaptionTeacher:
    """A greedy teacher whose caption names the image's size: the same image always gets the same record."""

    sampling = Sampling(temperature=0)

    def reply(self, chats, max_new_tokens):
        sizes = [chat[0]["content"][0]["image"].size for chat in chats]
        return [Reply(f"a {width} by {height} picture", 5, False) for width, height in sizes]


def _caption(images: Path, output: Path):
    return generate_qa(CaptionTeacher(), iter_images(images), output, task="caption", batch_size=2)


@pytest.mark.parametrize("damage", ["last line cut mid-record", "middle line garbled"])
def test_qa_records_cut_or_garbled_are_dropped_named_and_redone(images, tmp_path, caplog, damage):
    whole, damaged = tmp_path / "whole.jsonl", tmp_path / "damaged.jsonl"
    _caption(images, whole)
    lines = whole.read_bytes().splitlines(keepends=True)
    if damage == "last line cut mid-record":
        lines[-1], line, what = lines[-1][: len(lines[-1]) // 2], len(lines), "cut short"
    else:  # a bad sector: a block of zeros where a record was
        lines[2], line, what = b"\0" * (len(lines[2]) - 1) + b"\n", 3, "not a JSON record"
    damaged.write_bytes(b"".join(lines))

    with caplog.at_level(logging.WARNING):
        counts = _caption(images, damaged)
    assert f"Dropping line {line} of {damaged} ({what}); its image is redone" in _warnings(caplog)
    assert (counts.written, counts.skipped_done) == (1, NUM_IMAGES - 1)
    assert sorted(damaged.read_text().splitlines()) == sorted(whole.read_text().splitlines())  # each record once
    if damage == "last line cut mid-record":
        assert damaged.read_bytes() == whole.read_bytes()


# --------------------------------------------------------------------------------------------------------------------
# A benchmark run's JSON record
# --------------------------------------------------------------------------------------------------------------------
def _warmup_ablation():
    spec = importlib.util.spec_from_file_location(
        "warmup_ablation", Path(__file__).parents[1] / "benchmarks" / "warmup_ablation.py"
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_a_benchmark_record_cut_mid_line_is_treated_as_missing_and_its_run_redone(tmp_path, caplog):
    benchmark = _warmup_ablation()
    run, arguments = benchmark.Run("B", "B", 0), {"stage1_arguments": ["--seed", "0"], "stage2_arguments": ["-x"]}
    runs = []

    def execute() -> dict:  # what `execute` returns, without the training
        runs.append(run)
        return {"run": asdict(run), **arguments, "dev": {"overall": 0.5}, "test": {"overall": 0.25}}

    path = tmp_path / "records" / "B-0.json"
    result = benchmark.recorded_run(path, run, arguments, execute)
    assert benchmark.recorded_run(path, run, arguments, execute) == result and len(runs) == 1  # reused
    _cut_in_half(path)
    with caplog.at_level(logging.WARNING):
        assert benchmark.recorded_run(path, run, arguments, execute) == result
    assert len(runs) == 2 and f"Ignoring the damaged file {path} (not whole JSON" in _warnings(caplog)
    assert load_record(path) == result
    other = {**arguments, "stage2_arguments": ["-y"]}  # another budget's record is not reused either
    benchmark.recorded_run(path, run, other, execute)
    assert len(runs) == 3


# --------------------------------------------------------------------------------------------------------------------
# Trainer checkpoints
# --------------------------------------------------------------------------------------------------------------------
def _stage1_trainer(output_dir: Path, scenes: Path):
    """A seeded stage-1 trainer of 4 steps (batch 2), saving a checkpoint every 2 steps."""
    from coma_hf.data.stage1 import load_stage1_dataset
    from coma_hf.tiny import build_tiny_coma
    from coma_hf.training import CoMaCompressionTrainer

    dataset, root = load_stage1_dataset(scenes)
    model, processor = build_tiny_coma(num_compression_tokens=4, seed=0, max_image_tokens=4)
    args = training_args(
        output_dir, per_device_train_batch_size=2, max_steps=4, save_strategy="steps", save_steps=2, logging_steps=4
    )
    return CoMaCompressionTrainer(
        model=model, args=args, train_dataset=dataset, processing_class=processor, image_root=root
    )


def test_a_checkpoint_cut_mid_tensor_is_skipped_and_the_resumed_run_ends_with_the_uninterrupted_weights(
    tmp_path, caplog
):
    from coma_hf.data.synthetic import write_synthetic_dataset
    from coma_hf.training import last_complete_checkpoint

    scenes = write_synthetic_dataset(tmp_path / "scenes", num_train=8, num_dev=2, num_test=1, seed=0, image_size=56)
    uninterrupted = _stage1_trainer(tmp_path / "whole", scenes["train"])
    uninterrupted.train()
    crashed = tmp_path / "crashed"
    for step in (2, 4):
        shutil.copytree(tmp_path / "whole" / f"checkpoint-{step}", crashed / f"checkpoint-{step}")
    weights = crashed / "checkpoint-4" / "model.safetensors"
    _cut_mid_data(weights)
    assert safetensors_damage(weights).startswith("cut inside tensor")

    resumed = _stage1_trainer(crashed, scenes["train"])
    with caplog.at_level(logging.WARNING):
        assert last_complete_checkpoint(crashed) == str(crashed / "checkpoint-2")
        resumed.train(resume_from_checkpoint=True)
    assert f"Skipping {crashed / 'checkpoint-4'}: model.safetensors is damaged (cut inside tensor" in _warnings(caplog)
    assert resumed.state.global_step == 4
    expected = uninterrupted.model.state_dict()
    for name, value in resumed.model.state_dict().items():
        assert torch.equal(value, expected[name]), name
    assert json.loads((crashed / "checkpoint-4" / "trainer_state.json").read_text())["global_step"] == 4
    assert safetensors_damage(weights) is None  # the resumed run wrote checkpoint-4 anew
