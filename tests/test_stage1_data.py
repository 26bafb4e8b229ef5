"""Stage-1 readers and the synthetic scenes."""

from __future__ import annotations

import json
from collections import Counter

import pytest
import torch

from coma_hf import CoMaInputError
from coma_hf.data.stage1 import load_stage1_dataset, normalize_stage1_record, validate_stage1_dataset
from coma_hf.data.synthetic import (
    HELD_OUT_COMBINATIONS,
    NUMBER_WORDS,
    QUESTION_TYPES,
    generate_split,
    render_scene,
    write_synthetic_dataset,
)

from utils import random_image, tiny_coma

TURNS = [{"question": "What colour?", "answer": "red"}, {"question": "How many?", "answer": "two"}]


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def test_jsonl_with_relative_and_absolute_images(tmp_path):
    (tmp_path / "img").mkdir()
    random_image(0).save(tmp_path / "img" / "a.png")
    elsewhere = tmp_path / "elsewhere.png"
    random_image(1).save(elsewhere)
    path = _jsonl(
        tmp_path / "data.jsonl",
        [
            {"id": "r0", "image": "img/a.png", "text": "hello", "conversation": TURNS},
            {"id": "r1", "image": str(elsewhere), "conversation": TURNS[:1]},
        ],
    )
    dataset, root = load_stage1_dataset(path)
    records = [normalize_stage1_record(dataset[index], index, root) for index in range(len(dataset))]
    assert records[0]["image"] == str(tmp_path / "img" / "a.png") and records[0]["text"] == "hello"
    assert records[1]["image"] == str(elsewhere)
    assert records[1]["conversation"] == [{"question": "What colour?", "answer": "red"}]
    dataset, root = load_stage1_dataset(path, image_root=str(tmp_path / "img"))
    assert normalize_stage1_record(dataset[0], 0, root)["image"] == str(tmp_path / "img" / "img" / "a.png")


def test_llava_sharegpt_and_messages_formats():
    llava = {
        "id": "l",
        "image": "x.png",
        "conversations": [
            {"from": "human", "value": "<image>\nWhat is shown?"},
            {"from": "gpt", "value": "A dog."},
            {"from": "human", "value": "Where?"},
            {"from": "gpt", "value": "In a park."},
        ],
    }
    record = normalize_stage1_record(llava)
    assert record["conversation"] == [
        {"question": "What is shown?", "answer": "A dog."},
        {"question": "Where?", "answer": "In a park."},
    ]
    messages = {
        "id": "m",
        "images": ["y.png"],
        "messages": [
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Colour?"}]},
            {"role": "assistant", "content": "Blue."},
        ],
    }
    record = normalize_stage1_record(messages)
    assert record["image"] == "y.png" and record["conversation"] == [{"question": "Colour?", "answer": "Blue."}]


def test_datasets_image_column(tmp_path):
    datasets = pytest.importorskip("datasets")
    features = datasets.Features(
        {
            "image": datasets.Image(),
            "conversation": [{"question": datasets.Value("string"), "answer": datasets.Value("string")}],
        }
    )
    dataset = datasets.Dataset.from_dict({"image": [random_image(2)], "conversation": [TURNS]}, features=features)
    dataset.save_to_disk(str(tmp_path / "saved"))
    loaded, root = load_stage1_dataset(tmp_path / "saved")
    _, processor = tiny_coma()
    record = normalize_stage1_record(loaded[0], 0, root)
    rendered = processor.render_qa_sample(record["image"], record["text"], record["conversation"])
    original = processor.image_processor(images=[random_image(2)], return_tensors="pt")  # PNG: the same pixels back
    torch.testing.assert_close(rendered.pixel_values, original["pixel_values"], rtol=0, atol=0)
    assert rendered.image_grid_thw.tolist() == original["image_grid_thw"].tolist() and rendered.dropped_turns == 0


def test_bad_rows_are_errors_naming_row_and_field(tmp_path):
    with pytest.raises(CoMaInputError, match="sample r7, field 'conversation'"):
        normalize_stage1_record({"id": "r7", "image": "a.png", "conversation": []})
    with pytest.raises(CoMaInputError, match="sample 3, field 'conversation'"):
        normalize_stage1_record({"image": "a.png"}, index=3)
    with pytest.raises(CoMaInputError, match="field 'conversations'.*user turn then an assistant"):
        normalize_stage1_record({"conversations": [{"from": "gpt", "value": "a"}, {"from": "human", "value": "q"}]})
    with pytest.raises(CoMaInputError, match="field 'text'"):
        normalize_stage1_record({"text": 5, "conversation": TURNS})


def test_validation_lists_every_bad_row(tmp_path):
    random_image(0).save(tmp_path / "good.png")
    (tmp_path / "corrupt.png").write_bytes(b"garbage")
    path = _jsonl(
        tmp_path / "data.jsonl",
        [
            {"id": "ok", "image": "good.png", "conversation": TURNS},
            {"id": "missing", "image": "nowhere.png", "conversation": TURNS},
            {"id": "corrupt", "image": "corrupt.png", "conversation": TURNS},
            {"id": "empty", "image": "good.png", "conversation": []},
            {"id": "blank-answer", "image": "good.png", "conversation": [{"question": "q?", "answer": " "}]},
        ],
    )
    dataset, root = load_stage1_dataset(path)
    _, processor = tiny_coma()
    bad = validate_stage1_dataset(dataset, processor, root)
    assert [sample.id for sample in bad] == ["missing", "corrupt", "empty", "blank-answer"]
    assert "nowhere.png" in bad[0].error and "corrupt.png" in bad[1].error
    assert "field 'conversation'" in bad[2].error


def test_synthetic_scenes_are_deterministic_and_answers_match_the_scene():
    first, second = generate_split("train", 30, seed=3), generate_split("train", 30, seed=3)
    assert [record for _, record in first] == [record for _, record in second]
    assert render_scene(first[0][0]).tobytes() == render_scene(second[0][0]).tobytes()
    assert [record for _, record in generate_split("train", 5, seed=4)] != [record for _, record in first[:5]]
    types = Counter()
    for scene, record in first:
        assert 3 <= len(record["conversation"]) <= 5
        shapes = [obj for obj in record["objects"] if obj["kind"] == "shape"]
        for turn in record["conversation"]:
            types[turn["type"]] += 1
            if turn["type"] == "count":
                assert turn["answer"] == NUMBER_WORDS[len(shapes)]
            if turn["type"] == "colour":
                shape = turn["question"].removeprefix("What colour is the ").removesuffix("?")
                assert turn["answer"] == next(obj["colour"] for obj in shapes if obj["shape"] == shape)
            if turn["type"] == "text":
                digit = next((obj["text"] for obj in record["objects"] if obj["kind"] == "text"), "none")
                assert turn["answer"] == digit
        for obj in shapes:
            assert f"{obj['colour']} {obj['shape']}" in record["caption"]
            x0, y0, x1, y1 = obj["box"]
            assert 0 <= x0 < x1 <= scene.image_size and 0 <= y0 < y1 <= scene.image_size
    assert set(types) == set(QUESTION_TYPES)


def test_splits_share_no_image_and_hold_out_combinations(tmp_path):
    paths = write_synthetic_dataset(tmp_path, num_train=150, num_dev=60, num_test=60, seed=0, image_size=56)
    splits = {split: [json.loads(line) for line in path.read_text().splitlines()] for split, path in paths.items()}
    images = {split: {record["image"] for record in rows} for split, rows in splits.items()}
    assert not images["train"] & images["dev"] and not images["train"] & images["test"]
    assert not images["dev"] & images["test"]
    pixels = {split: {(tmp_path / record["image"]).read_bytes() for record in rows} for split, rows in splits.items()}
    assert not pixels["train"] & (pixels["dev"] | pixels["test"])
    combos = lambda record: {(o["colour"], o["shape"]) for o in record["objects"] if o["kind"] == "shape"}  # noqa: E731
    assert not any(combos(record) & set(HELD_OUT_COMBINATIONS) for record in splits["train"])
    for split in ("dev", "test"):
        flagged = [record for record in splits[split] if record["held_out"]]
        assert 0 < len(flagged) < len(splits[split])
        assert all(bool(combos(record) & set(HELD_OUT_COMBINATIONS)) == record["held_out"] for record in splits[split])
    # reused when the settings match
    before = paths["train"].stat().st_mtime_ns
    write_synthetic_dataset(tmp_path, num_train=150, num_dev=60, num_test=60, seed=0, image_size=56)
    assert paths["train"].stat().st_mtime_ns == before
