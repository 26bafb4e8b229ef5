"""coma_hf.data.sources: the reading rules every reader shares (image roots, image files, JSONL lines, the bad-row
column and record), and that stage 1, stage 2, QA generation and the corpus sources use the same ones."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from coma_hf import CoMaInputError
from coma_hf.data.qa_generation import iter_images
from coma_hf.data.sources import (
    ERROR_COLUMN,
    IMAGE_EXTENSIONS,
    BadRow,
    image_files,
    load_jsonl_dataset,
    read_jsonl_records,
    resolve_image_path,
)
from coma_hf.data.stage1 import normalize_stage1_record
from coma_hf.data.stage2 import load_mmeb_train, normalize_pair
from coma_hf.inference import csv_rows, image_folder_rows, jsonl_rows


def test_a_relative_image_path_starts_at_the_root_and_nothing_else_moves(tmp_path):
    root = str(tmp_path)
    assert resolve_image_path("img/a.png", root) == os.path.join(root, "img/a.png")
    assert resolve_image_path(Path("img/a.png"), root) == os.path.join(root, "img/a.png")
    for unchanged in ("/abs/a.png", "https://example.com/a.png", "", None, {"bytes": b"x", "path": None}):
        assert resolve_image_path(unchanged, root) == unchanged
    assert resolve_image_path("img/a.png", None) == "img/a.png"


def test_image_files_by_extension_recursive_and_sorted(tmp_path):
    for name in ("b/z.PNG", "a.jpg", "b/c.webp", "notes.txt", "a-b/x.tiff"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"")
    assert image_files(tmp_path) == ["a-b/x.tiff", "a.jpg", "b/c.webp", "b/z.PNG"]
    assert all(extension.startswith(".") and extension == extension.lower() for extension in IMAGE_EXTENSIONS)
    # QA generation and the corpus list a folder the same way
    assert [image_id for image_id, _ in iter_images(tmp_path)] == image_files(tmp_path)
    assert [row.id for row in image_folder_rows(tmp_path)] == image_files(tmp_path)
    with pytest.raises(FileNotFoundError):
        image_files(tmp_path / "missing")


def test_one_bad_row_column_for_both_stages_and_reading_names_the_line(tmp_path):
    path = tmp_path / "rows.jsonl"
    good = {
        "id": "r0",
        "qry": "q",
        "qry_image_path": "",
        "pos_text": "p",
        "pos_image_path": "",
        "conversation": [{"question": "q", "answer": "a"}],
    }
    path.write_bytes(json.dumps(good).encode() + b"\n{not json\n")
    with pytest.raises(CoMaInputError, match="line 2 of .* is not JSON"):
        read_jsonl_records(path)
    rows = load_jsonl_dataset(path)
    assert rows[0][ERROR_COLUMN] is None and "line 2" in rows[1][ERROR_COLUMN]
    for normalize in (normalize_stage1_record, normalize_pair):
        normalize(rows[0], 0)
        with pytest.raises(CoMaInputError, match=r"sample 1, field 'line': line 2 of"):
            normalize(rows[1], 1)
    pairs = load_mmeb_train(path)
    assert pairs[0][ERROR_COLUMN] == "" and "line 2" in pairs[1][ERROR_COLUMN]
    assert list(BadRow.__dataclass_fields__) == ["index", "id", "error"]  # the keys of every skipped-row summary


def test_corpus_rows_resolve_images_like_the_stages(tmp_path):
    (tmp_path / "corpus.csv").write_text("id,text,image\na,a red circle,\nb,,pics/b.png\nc,,https://x/c.png\n")
    rows = list(csv_rows(tmp_path / "corpus.csv"))
    assert rows[0].input == {"text": "a red circle"}  # an empty image cell is no image
    assert rows[1].input == {"text": "", "image": os.path.join(str(tmp_path), "pics/b.png")}
    assert rows[2].input == {"text": "", "image": "https://x/c.png"}  # refused later, by name, not joined to a root
    (tmp_path / "corpus.jsonl").write_text(json.dumps({"id": "b", "image": "pics/b.png"}) + "\n")
    assert [row.input for row in jsonl_rows(tmp_path / "corpus.jsonl")] == [rows[1].input]
