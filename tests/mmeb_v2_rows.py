"""A small folder of MMEB-V2 instruct test rows (the field layout of `ziyjiang/MMEB_Test_Instruct` that the release's
evaluation reads): one dataset per parser and candidate variant, with images, for the rendering and parity tests.

The rows are made up but shaped like MMEB's: placeholders in the instructions, `" \\n"` where the clean-up acts,
captions with quotes (grounding), an image shorter than 28 px (enlarged), and candidates whose names repeat across
rows (deduplicated, the first kept).
"""

from __future__ import annotations

import json
from pathlib import Path

from utils import random_image

TINY_IMAGE = "cls/tiny.png"  # 20 × 24 px: under one visual token, enlarged to 56 × 56
IMAGES = {
    "cls/0.png": (84, 112),
    TINY_IMAGE: (20, 24),
    "qa/0.png": (112, 84),
    "i2t/0.png": (56, 84),
    "t2i/0.png": (84, 84),
    "t2i/1.png": (112, 56),
    "t2i/2.png": (56, 56),
    "vg/q.png": (84, 56),
    "vg/0.png": (56, 112),
    "vg/1.png": (84, 112),
}
CLASSIFY = "<|image_1|> Represent the given image for classification \n"
QUESTION = "<|image_1|> Represent the given image with the following question: "
ROWS: dict[str, list[dict]] = {
    "ImageNet-1K": [
        {
            "qry_inst": CLASSIFY,
            "qry_text": "",
            "qry_img_path": "cls/0.png",
            "tgt_text": ["tench", "goldfish", "shark"],
        },
        {
            "qry_inst": CLASSIFY,
            "qry_text": "",
            "qry_img_path": TINY_IMAGE,
            "tgt_text": ["goldfish", "a  b \n c", "tench"],
        },
    ],
    "OK-VQA": [
        {
            "qry_inst": QUESTION,
            "qry_text": "What is in the bowl? \n",
            "qry_img_path": "qa/0.png",
            "tgt_text": ["soup", "rice", "noodles"],
        },
    ],
    "MSCOCO_i2t": [
        {
            "qry_inst": "<|image_1|> Find an image caption describing the given everyday image.",
            "qry_text": "",
            "qry_img_path": "i2t/0.png",
            "tgt_text": ["A dog on a sofa.", "Two cats \n asleep.", "A red bus."],
        },
    ],
    "VisDial": [
        {
            "qry_inst": "Represent the given dialogue about an image, which is used for image retrieval:",
            "qry_text": "Q:what is it \n A:a dog",
            "tgt_inst": "<|image_1|> Represent the given image. \n",
            "tgt_text": ["", "", ""],
            "tgt_img_path": ["t2i/0.png", "t2i/1.png", "t2i/2.png"],
        },
    ],
    "WebQA": [
        {
            "qry_inst": "Find a Wikipedia image that answers this question:",
            "qry_text": "Which bird is red?",
            "tgt_inst": "<|image_1|> Represent the given Wikipedia image with related text information:",
            "tgt_text": ["A cardinal \n", "A crow", "A jay"],
            "tgt_img_path": ["t2i/0.png", "t2i/1.png", "t2i/2.png"],
        },
        {  # t2i/1.png again with another caption: named by its path, the first rendering is kept
            "qry_inst": "Find a Wikipedia image that answers this question:",
            "qry_text": "Which bird is black?",
            "tgt_inst": "<|image_1|> Represent the given Wikipedia image with related text information:",
            "tgt_text": ["A raven", "A cardinal \n"],
            "tgt_img_path": ["t2i/1.png", "t2i/0.png"],
        },
    ],
    "CIRR": [
        {
            "qry_inst": "<|image_1|> Given an image, find a similar everyday image with the described changes: ",
            "qry_text": "make it blue",
            "qry_img_path": "vg/q.png",
            "tgt_inst": "<|image_1|> Represent the given image. \n",
            "tgt_text": ["", ""],
            "tgt_img_path": ["vg/0.png", "vg/1.png"],
        },
    ],
    "RefCOCO-Matching": [
        {
            "qry_inst": "<|image_1|> Select the portion of the image that follows the language expressions: ",
            "qry_text": '"the red ball"',
            "qry_img_path": "vg/q.png",
            "tgt_inst": "<|image_1|> Select the portion of the image that follows the language expressions:",
            "tgt_text": ['"the red ball"', '"the cup"', '"the red ball"'],
            "tgt_img_path": ["vg/0.png", "vg/0.png", "vg/1.png"],
        },
    ],
}
PARSERS = {
    "ImageNet-1K": "image_cls",
    "OK-VQA": "image_qa",
    "MSCOCO_i2t": "image_i2t",
    "VisDial": "image_t2i",
    "WebQA": "image_t2i",
    "CIRR": "image_i2i_vg",
    "RefCOCO-Matching": "image_i2i_vg",
}


def write_instruct_folder(folder: Path) -> Path:
    """Write the rows (one `{name}.jsonl` each) and their images (under `folder/images`, the manifest's image root)."""
    folder.mkdir(parents=True, exist_ok=True)
    for seed, (path, size) in enumerate(IMAGES.items()):
        target = folder / "images" / path
        target.parent.mkdir(parents=True, exist_ok=True)
        random_image(seed, size).save(target)
    for name, rows in ROWS.items():
        (folder / f"{name}.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    (folder / "mmeb_manifest.json").write_text(json.dumps({"image_root": "images"}))
    return folder
