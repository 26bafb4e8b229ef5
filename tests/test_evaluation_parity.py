"""One rendering for every path: a checkpoint scores the same through AutoModel and SentenceTransformer."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModel

from coma_hf.evaluation.mmeb import MMEBEvaluator, as_encoder, load_mmeb_datasets
from coma_hf.sentence_transformer import load_sentence_transformer
from coma_hf.training import CoMaContrastiveCollator

from utils import random_image, tiny_coma


def _trained_checkpoint(folder):
    """The tiny model after a few optimizer steps on its own embeddings, so vectors depend on every token."""
    model, processor = tiny_coma()
    model = type(model).from_pretrained(_save(model, folder / "initial")).train()
    model.processor = processor
    batch = processor.process_embedding_inputs(["a red circle", {"image": random_image(1), "text": "a square"}])
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    for _ in range(3):
        embeddings = model(**batch).pooler_output
        (embeddings[0] @ embeddings[1]).backward()  # push the two apart
        optimizer.step()
        optimizer.zero_grad()
    return _save(model.eval(), folder / "trained")


def _save(model, folder):
    model.save_pretrained(folder)
    return folder


def _mmeb_folder(tmp_path):
    """Two MMEB-layout datasets: image rows with the `<|image_1|>` placeholder, text rows, image+text candidates."""
    for index in range(3):
        random_image(10 + index).save(tmp_path / f"scene{index}.png")
    images = [f"scene{index}.png" for index in range(3)]
    classification = [
        {
            "qry_text": f"<|image_1|> Represent the given image for classification by count. {index}",
            "qry_img_path": image,
            "tgt_text": ["one", "two", "three"],
            "tgt_img_path": ["", "", ""],
        }
        for index, image in enumerate(images)
    ]
    retrieval = [
        {
            "qry_text": f"Find me an image that matches the given caption: scene {index}",
            "qry_img_path": "",
            "tgt_text": ["<|image_1|>\nRepresent the given image.", "<|image_1|> a scene", "plain text candidate"],
            "tgt_img_path": [image, images[(index + 1) % 3], ""],
        }
        for index, image in enumerate(images)
    ]
    data = tmp_path / "mmeb"
    data.mkdir()
    for name, rows in (("ImageNet-1K", classification), ("MSCOCO_t2i", retrieval)):
        (data / f"{name}.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    (data / "mmeb_manifest.json").write_text(json.dumps({"image_root": ".."}))
    return data


def test_automodel_and_sentence_transformer_give_the_same_vectors_and_scores(tmp_path):
    folder = _trained_checkpoint(tmp_path)
    automodel = AutoModel.from_pretrained(folder, trust_remote_code=True).eval()
    sentence_transformer = load_sentence_transformer(str(folder), device="cpu")
    image = str(tmp_path / "scene0.png")
    random_image(10).save(image)
    items = [
        ("<|image_1|> Represent the given image for classification by count.", image),  # image row
        ("<|image_1|>\nWhat colour is the circle?", image),  # image + text row
        ("Find me an image that matches the given caption: a red circle", None),  # text row
        ("", image),  # image alone
    ]
    # stage-2 training renders an image row exactly as `encode` does: the image where the placeholder stands
    collated = CoMaContrastiveCollator(preprocess_fn=sentence_transformer.preprocess)(
        [{"anchor_text": items[0][0], "anchor_image": image, "positive_text": items[2][0], "positive_image": ""}]
    )
    rendered = automodel.processor.process_embedding_inputs([{"text": items[0][0], "image": image}])
    assert torch.equal(collated["anchor_input_ids"], rendered["input_ids"])

    through_auto = as_encoder(automodel, show_progress_bar=False)(items)
    through_st = as_encoder(sentence_transformer, show_progress_bar=False)(items)
    assert (through_auto - through_st).abs().max() < 1e-5
    assert (through_auto[0] - through_auto[1]).abs().max() > 1e-3  # the rows really differ

    datasets = load_mmeb_datasets(_mmeb_folder(tmp_path))
    auto_scores = MMEBEvaluator(datasets, show_progress_bar=False)(automodel)["datasets"]
    st_scores = MMEBEvaluator(datasets, show_progress_bar=False)(sentence_transformer)["datasets"]
    for name in ("ImageNet-1K", "MSCOCO_t2i"):
        for metric in ("precision@1", "mrr", "recall@5"):
            assert auto_scores[name][metric] == pytest.approx(st_scores[name][metric], abs=1e-9), (name, metric)
