"""Stage-2 training pairs in the MMEB layout."""

from __future__ import annotations

import json

import pytest

from coma_hf import CoMaInputError
from coma_hf.data.mini_mmeb import IN_DISTRIBUTION, write_mini_mmeb
from coma_hf.data.stage2 import embedding_input, load_mmeb_train, normalize_pair

from utils import random_image, tiny_coma


def test_pairs_resolve_images_keep_placeholders_and_negatives(tmp_path):
    random_image(0).save(tmp_path / "a.png")
    rows = [
        {
            "qry": "<|image_1|> Represent the given image.",
            "qry_image_path": "a.png",
            "pos_text": "a cat",
            "pos_image_path": "",
            "neg_text": "a dog",
            "neg_image_path": "",
            "dataset": "ImageNet-1K",
        },
        {
            "qry": "Find the image of a cat",
            "qry_image_path": "",
            "pos_text": "",
            "pos_image_path": "a.png",
            "neg_text": "",
            "neg_image_path": "a.png",
            "dataset": "MSCOCO_t2i",
        },
    ]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    pairs = load_mmeb_train(tmp_path / "train.jsonl")
    assert pairs[0]["anchor_text"] == rows[0]["qry"] and pairs[0]["anchor_image"] == str(tmp_path / "a.png")
    assert pairs[0]["negative_text"] == "a dog" and pairs[1]["positive_image"] == str(tmp_path / "a.png")
    assert embedding_input(pairs[0]["positive_text"], pairs[0]["positive_image"]) == {"text": "a cat"}

    # the anchor renders with the image tokens where the placeholder stood
    _, processor = tiny_coma()
    anchor = embedding_input(pairs[0]["anchor_text"], pairs[0]["anchor_image"])
    text = processor.tokenizer.decode(processor.render_embedding_input(anchor["text"], anchor["image"]).input_ids)
    assert text.startswith("<|vision_start|>") and "<|image_1|>" not in text

    by_dataset = load_mmeb_train(tmp_path / "train.jsonl", by_dataset=True)
    assert sorted(by_dataset) == ["ImageNet-1K", "MSCOCO_t2i"] and len(by_dataset["MSCOCO_t2i"]) == 1


def test_bad_rows_name_the_row_and_column():
    with pytest.raises(CoMaInputError, match=r"sample 4, field 'pos_text'.*missing column"):
        normalize_pair({"qry": "q", "qry_image_path": "", "pos_image_path": ""}, index=4)
    with pytest.raises(
        CoMaInputError, match=r"sample 2, field 'pos_text'.*both pos_text and pos_image_path are empty"
    ):
        normalize_pair({"qry": "q", "qry_image_path": "", "pos_text": " ", "pos_image_path": ""}, index=2)
    no_negative = {"qry": "q", "qry_image_path": "", "pos_text": "p", "pos_image_path": "", "neg_text": ""}
    assert normalize_pair(no_negative, with_negative=True)["negative_text"] == ""


def test_mini_mmeb_training_pairs_load_by_dataset(tmp_path):
    output = write_mini_mmeb(tmp_path, num_train=20, num_dev=4, num_test=4, image_size=56)
    by_dataset = load_mmeb_train(output / "train.jsonl", image_root=str(tmp_path), by_dataset=True)
    assert set(by_dataset) == set(IN_DISTRIBUTION)  # the OOD half trains nothing
    for name, pairs in by_dataset.items():
        assert len(pairs) == 20 and set(pairs["dataset"]) == {name}
        assert {"negative_text", "negative_image"} <= set(pairs.column_names)


def test_collator_builds_one_input_per_side_and_marks_missing_negatives(tmp_path_factory):
    from coma_hf.training import CoMaContrastiveCollator

    from utils import tiny_sentence_transformer

    st = tiny_sentence_transformer(tmp_path_factory)
    seen = []

    def preprocess(inputs, prompt=None, task=None):
        seen.append(inputs)
        return st.preprocess(inputs, prompt=prompt)

    collator = CoMaContrastiveCollator(preprocess_fn=preprocess)
    image = str(tmp_path_factory.mktemp("images") / "a.png")
    random_image(0).save(image)
    row = {
        "anchor_text": "<|image_1|> Classify",
        "anchor_image": image,
        "positive_text": "cat",
        "positive_image": "",
        "negative_text": "dog",
        "negative_image": "",
        "dataset": "ImageNet-1K",
    }
    batch = collator([row, {**row, "positive_text": "", "positive_image": image}])
    assert seen == [
        [{"text": "<|image_1|> Classify", "image": image}] * 2,
        [{"text": "cat"}, {"text": "", "image": image}],
        [{"text": "dog"}, {"text": "dog"}],
    ]
    assert {key.split("_")[0] for key in batch} == {"anchor", "positive", "negative"}
    assert batch["positive_num_images_per_sample"].tolist() == [0, 1]
    assert "negative_present" not in batch  # every row has its negative: the batch is as it always was

    seen.clear()
    batch = collator([row, {**row, "negative_text": ""}])  # one row lacks a negative: a placeholder, marked absent
    assert seen[2] == [{"text": "dog"}, CoMaContrastiveCollator.MISSING_NEGATIVE]
    assert batch["negative_present"].tolist() == [True, False]

    seen.clear()
    batch = collator([{**row, "negative_text": ""}] * 2)  # no row has one: the column sits this batch out
    assert len(seen) == 2 and not any(key.startswith("negative") for key in batch)


def test_chance_baselines_by_hand():
    from coma_hf.evaluation.mmeb import MMEBDataset, chance_baselines

    labels = ["one", "two", "three"]
    classification = MMEBDataset(
        "Count",
        [
            {"qry_text": "q", "tgt_text": [gold] + [label for label in labels if label != gold]}
            for gold in ["two", "two", "one", "two"]
        ],
        meta_task="Classification",
    )
    retrieval = MMEBDataset(
        "Find", [{"qry_text": f"q{i}", "tgt_text": [f"d{i}", "x", "y", "z"]} for i in range(4)], meta_task="Retrieval"
    )
    result = chance_baselines([classification, retrieval])
    assert result["datasets"]["Count"]["constant"] == 0.75 and result["datasets"]["Count"]["random"] == pytest.approx(
        1 / 3
    )
    assert result["datasets"]["Find"]["best"] == 0.25  # every gold differs: random 1/4 beats constant 1/4 (equal)
    assert result["overall"]["best"] == pytest.approx((0.75 + 0.25) / 2)
