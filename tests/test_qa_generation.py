"""Automatic QA: plumbing, schema and resume, with the tiny random backbone (its text is gibberish)."""

from __future__ import annotations

import json

import pytest
from transformers import Qwen2_5_VLProcessor
from transformers.processing_utils import ProcessorMixin

from coma_hf.data.qa_generation import QUESTION_KINDS, finished_ids, generate_qa, iter_images, repair_cut_last_line
from coma_hf.data.stage1 import normalize_stage1_record
from coma_hf.tiny import build_tiny_backbone

from utils import random_image


class ImageOnlyQwenProcessor(Qwen2_5_VLProcessor):
    """The stock Qwen2.5-VL processor without its video half (which needs torchvision, absent here)."""

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        self.image_token, self.video_token = "<|image_pad|>", "<|video_pad|>"
        self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
        self.video_token_id = tokenizer.convert_tokens_to_ids(self.video_token)
        ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template)


@pytest.fixture(scope="module")
def vlm():
    backbone, parts = build_tiny_backbone(seed=1)
    return backbone, ImageOnlyQwenProcessor(parts.image_processor, parts.tokenizer, chat_template=parts.chat_template)


def _write_images(folder, count):
    folder.mkdir()
    for index in range(count):
        random_image(index, (56, 56)).save(folder / f"img_{index}.png")


def _generate(vlm, images, output, batch_size: int) -> dict:
    """The counts of one `generate_qa` run over the images in `images` into `output` (3 questions, 4 new tokens)."""
    model, processor = vlm
    return generate_qa(
        model,
        processor,
        iter_images(images),
        output,
        num_questions=3,
        batch_size=batch_size,
        max_new_tokens=4,
        image_root=str(images),
    )


def test_generates_stage1_records_and_resumes(vlm, tmp_path):
    images = tmp_path / "images"
    _write_images(images, 3)
    (images / "broken.png").write_bytes(b"not an image")
    output = tmp_path / "qa.jsonl"

    counts = _generate(vlm, images, output, batch_size=2)
    assert counts == {"written": 3, "skipped_done": 0, "skipped_unreadable": 1}
    rows = [json.loads(line) for line in output.read_text().splitlines()]
    assert sorted(row["id"] for row in rows) == ["img_0.png", "img_1.png", "img_2.png"]
    for row in rows:
        assert [turn["type"] for turn in row["conversation"]] == [kind for kind, _ in QUESTION_KINDS[:3]]
        record = normalize_stage1_record(row, image_root=str(images))  # readable by the stage-1 reader
        assert record["image"].endswith(row["id"]) and len(record["conversation"]) == 3

    _write_images(tmp_path / "more", 2)
    for index in range(2):
        (tmp_path / "more" / f"img_{index}.png").rename(images / f"new_{index}.png")
    resumed = _generate(vlm, images, output, batch_size=2)
    assert resumed == {"written": 2, "skipped_done": 3, "skipped_unreadable": 1}
    assert len(finished_ids(output)) == 5
    assert len(output.read_text().splitlines()) == 5  # nothing written twice


def test_question_count_is_the_papers_range(vlm, tmp_path):
    model, processor = vlm
    with pytest.raises(ValueError, match="between 3 and 5"):
        generate_qa(model, processor, [("a", random_image(0))], tmp_path / "x.jsonl", num_questions=6)


def test_a_cut_line_from_an_interruption_is_redone(tmp_path):
    output = tmp_path / "qa.jsonl"
    output.write_text(json.dumps({"id": "done", "conversation": []}) + "\n" + '{"id": "cut", "conv')
    assert finished_ids(output) == {"done"}


def test_images_listed_in_jsonl_resolve_against_its_folder(tmp_path):
    (tmp_path / "pics").mkdir()
    random_image(0).save(tmp_path / "pics" / "a.png")
    listing = tmp_path / "list.jsonl"
    listing.write_text(json.dumps({"id": "first", "image": "pics/a.png"}) + "\n")
    assert list(iter_images(listing)) == [("first", str(tmp_path / "pics" / "a.png"))]


def test_resume_after_a_cut_last_line_keeps_every_record_once(vlm, tmp_path):
    images = tmp_path / "images"
    _write_images(images, 3)
    output = tmp_path / "qa.jsonl"
    _generate(vlm, images, output, batch_size=1)
    complete = output.read_text().splitlines(keepends=True)
    output.write_text("".join(complete[:2]) + complete[2][: len(complete[2]) // 2])  # a kill mid-write

    resumed = _generate(vlm, images, output, batch_size=1)
    assert resumed == {"written": 1, "skipped_done": 2, "skipped_unreadable": 0}
    rows = [json.loads(line) for line in output.read_text().splitlines()]  # every line reads back
    assert sorted(row["id"] for row in rows) == ["img_0.png", "img_1.png", "img_2.png"]


@pytest.mark.parametrize(
    ("written", "repaired"),
    [
        ('{"id": "a"}\n{"id": "b"}', '{"id": "a"}\n{"id": "b"}\n'),  # only the newline was lost: kept, done
        ('{"id": "a"}\n{"id": "b', '{"id": "a"}\n'),  # a fragment: cut, redone
        ('{"id": "b', ""),  # a fragment as the only line
        ('{"id": "a"}\n', '{"id": "a"}\n'),  # a clean file is left alone
    ],
)
def test_a_resumed_file_ends_on_a_complete_line(tmp_path, written, repaired):
    output = tmp_path / "qa.jsonl"
    output.write_text(written)
    repair_cut_last_line(output)
    assert output.read_text() == repaired
