"""Choosing stage-1 images from MMEB-train: unique, capped per subset, deterministic; and what the selection
feeds (`generate_qa --images`, then the stage-1 reader)."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import datasets
import pytest

from coma_hf.data.image_selection import PAPER_SUBSETS, read_subset_images, select_images, write_image_list
from coma_hf.data.qa_generation import QUESTION_PROMPT, Reply, Sampling, generate_qa, iter_images
from coma_hf.data.stage1 import load_stage1_dataset, normalize_stage1_record
from coma_hf.inputs import CoMaInputError

from utils import load_example, random_image

SHARD = "train-00000-of-00001.parquet"


def _row(query: str | None, positive: str | None, negative: str | None = None) -> dict:
    return {
        "qry": "<|image_1|> Represent the given image." if query else "a caption",
        "qry_image_path": query or "",
        "pos_text": "<|image_1|>" if positive else "a caption",
        "pos_image_path": positive or "",
        "neg_text": "",
        "neg_image_path": negative,
    }


def _subsets() -> dict[str, list[dict]]:
    """Three subsets: A names 6 images (repeats within rows and across them, a negative), B 12 (one shared with A),
    C has text-only queries and 20 images."""
    a = [_row(f"images/A/{i}.jpg", f"images/A/{i + 1}.jpg", "images/A/5.jpg" if i == 0 else None) for i in range(4)]
    a.append(_row("images/A/./0.jpg", "images/A/0.jpg"))  # the same image, spelt twice
    b = [_row(f"images/B/{i}.jpg", None) for i in range(11)] + [_row("images/A/1.jpg", None)]
    c = [_row(None, f"images/C/{i}.jpg") for i in range(20)]
    return {"A": a, "B": b, "C": c}


def _clone(root: Path, images: bool = False) -> Path:
    """MMEB-train as a clone of the Hub dataset lays it out: `{subset}/train-*.parquet`, images beside them."""
    for subset, rows in _subsets().items():
        (root / subset).mkdir(parents=True)
        datasets.Dataset.from_list(rows).to_parquet(root / subset / SHARD)
        for row in rows if images else ():
            for name in (row["qry_image_path"], row["pos_image_path"], row["neg_image_path"]):
                if name:
                    (root / name).parent.mkdir(parents=True, exist_ok=True)
                    random_image(len(name), (32, 32)).save(root / name, format="PNG")
    return root


def test_selection_is_unique_capped_and_per_subset(tmp_path):
    mmeb = _clone(tmp_path / "MMEB-train")
    records, selections = select_images(mmeb, subsets=["A", "B", "C"], per_subset=10, seed=0)

    by_subset = {selection.subset: selection for selection in selections}
    assert {name: (s.rows, s.unique_images, s.chosen_earlier, s.selected) for name, s in by_subset.items()} == {
        "A": (5, 6, 0, 6),  # 0..5: the repeats and the two spellings of 0 count once; the negative counts
        "B": (12, 12, 1, 10),  # A/1 was chosen for A; 11 left, capped at 10
        "C": (20, 20, 0, 10),
    }
    assert len({record["image"] for record in records}) == len(records) == 26  # unique
    assert Counter(record["subset"] for record in records) == {"A": 6, "B": 10, "C": 10}
    for record in records:
        assert record["image"] == str(mmeb / record["id"]) and record["id"].startswith(f"images/{record['subset']}/")
    assert [record["subset"] for record in records] == sorted(record["subset"] for record in records)


def test_selection_is_deterministic_and_a_larger_cap_extends_a_smaller_one(tmp_path):
    mmeb = _clone(tmp_path / "MMEB-train")

    def chosen(per_subset, seed=0, subsets=("C",)):
        return [record["id"] for record in select_images(mmeb, subsets, per_subset, seed=seed)[0]]

    assert chosen(5) == chosen(5)
    assert chosen(5) != chosen(5, seed=1)
    assert chosen(8)[:5] == chosen(5)
    assert sorted(chosen(50)) == sorted(f"images/C/{i}.jpg" for i in range(20))  # a cap above the subset: all of it
    # over several subsets it holds for the first one and for one that shares no image with those before it (C);
    # B shares A/1 with A, so its candidates depend on A's cap
    small, large = (
        {(r["subset"], r["id"]) for r in select_images(mmeb, ("A", "B", "C"), cap, seed=0)[0]} for cap in (3, 8)
    )
    assert {pair for pair in small if pair[0] != "B"} <= large


def test_sources_in_every_layout_give_the_same_images(tmp_path):
    clone = _clone(tmp_path / "clone")
    flat = tmp_path / "flat"  # one file per subset, named by it (as the stage-2 reader reads a folder)
    flat.mkdir()
    combined = tmp_path / "combined.jsonl"  # one file whose rows name their subset
    with combined.open("w") as handle:
        for subset, rows in _subsets().items():
            with (flat / f"{subset}.jsonl").open("w") as part:
                for row in rows:
                    part.write(json.dumps(row) + "\n")
                    handle.write(json.dumps({**row, "dataset": subset}) + "\n")
    shards = [clone / subset / SHARD for subset in ("A", "B", "C")]  # single shard files: the subset is the folder

    def ids(source, **options):
        return [(record["subset"], record["id"]) for record in select_images(source, ["A", "B", "C"], 4, **options)[0]]

    expected = ids(clone)
    assert ids(flat) == ids(combined) == expected
    assert ids(shards, image_root=clone) == expected


def test_the_papers_subsets_are_the_default_and_missing_ones_are_named(tmp_path):
    mmeb = _clone(tmp_path / "MMEB-train")
    assert len(PAPER_SUBSETS) == 12 and "MSCOCO_t2i" in PAPER_SUBSETS
    with pytest.raises(ValueError, match=r"subsets \['N24News'.*found \['A', 'B', 'C'\]"):
        select_images(mmeb)
    assert [selection.subset for selection in select_images(mmeb, subsets=None)[1]] == ["A", "B", "C"]


def test_bad_rows_are_counted_and_a_bad_image_value_is_named(tmp_path):
    path = tmp_path / "A.jsonl"
    path.write_text(json.dumps(_row("images/A/0.jpg", "images/A/1.jpg")) + "\nnot json\n")
    (subset,) = read_subset_images(path).values()
    assert (subset.rows, subset.bad_rows, len(subset.images)) == (2, 1, 2)

    path.write_text(
        json.dumps(_row("images/A/0.jpg", None)) + "\n" + json.dumps({**_row(None, None), "qry_image_path": 3})
    )
    with pytest.raises(CoMaInputError, match="sample A row 1, field 'qry_image_path': expected an image path"):
        read_subset_images(path)
    with pytest.raises(ValueError, match="needs image_root"):
        select_images("org/not-a-local-path", subsets=["A"])


class _AnsweringTeacher:
    """Lists three questions for any image and answers each with one word."""

    sampling = Sampling()

    def reply(self, chats, max_new_tokens):
        prompt = chats[0][-1]["content"][-1]["text"]
        text = "1. Colour?\n2. Place?\n3. Count?" if prompt == QUESTION_PROMPT else "red"
        return [Reply(text, 3, False) for _ in chats]


def test_the_script_writes_a_list_that_generation_and_the_stage1_reader_follow(tmp_path):
    mmeb = _clone(tmp_path / "MMEB-train", images=True)
    listing = tmp_path / "lists" / "images.jsonl"
    selections = load_example("select_images").main(
        ["--mmeb_train", str(mmeb), "--subsets", "A", "B", "--per_subset", "3", "--output", str(listing)]
    )
    assert [(selection.subset, selection.selected) for selection in selections] == [("A", 3), ("B", 3)]
    rows = [json.loads(line) for line in listing.read_text().splitlines()]
    assert all(row["image"].startswith("../MMEB-train/images/") for row in rows)  # relative to the list's folder

    output = tmp_path / "stage1" / "qa.jsonl"
    counts = generate_qa(_AnsweringTeacher(), iter_images(listing), output, batch_size=4)
    assert counts.written == 6 and counts.answers == 18
    dataset, root = load_stage1_dataset(output)
    records = [normalize_stage1_record(row, index, root) for index, row in enumerate(dataset)]
    assert sorted(record["id"] for record in records) == sorted(row["id"] for row in rows)
    assert all(Path(record["image"]).resolve() == (mmeb / record["id"]).resolve() for record in records)


def test_a_written_list_reads_back_where_it_was_written(tmp_path):
    records = [{"id": "images/A/0.jpg", "image": str(tmp_path / "data" / "images" / "A" / "0.jpg"), "subset": "A"}]
    write_image_list(records, tmp_path / "out" / "list.jsonl")
    assert list(iter_images(tmp_path / "out" / "list.jsonl")) == [
        ("images/A/0.jpg", str(tmp_path / "out" / "../data/images/A/0.jpg"))
    ]
