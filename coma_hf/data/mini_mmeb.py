"""A synthetic mini-MMEB built from the synthetic scenes: the same four meta-tasks, the same file layout.

Evaluation datasets (dev and test, from the scenes of those splits; gold candidate first):

| meta-task | dataset | query → candidates |
| --- | --- | --- |
| Classification | Mini-Count, Mini-Digit, Mini-DominantColour | image → label texts |
| VQA | Mini-VQA | image + question → answers of that question type |
| Retrieval | Mini-Caption2Image, Mini-Image2Caption | caption → images; image → captions |
| Visual Grounding | Mini-Grounding | image + referring expression → crops of objects |

These seven are in-distribution (IND): their training-split recipes are stage 2's training pairs. Four more are
out-of-distribution (OOD, evaluation only, as MMEB keeps 16 of its 36 datasets out of training). Each asks, in a task
form no IND dataset trains, for attributes the shipped reader does read (`OOD_ATTRIBUTES` names them, so an
experiment can check the reader's accuracy on each before it counts a set):

| meta-task | dataset | query → candidates | hinges on |
| --- | --- | --- | --- |
| Classification | Mini-ColourSet | image → its shapes' colours (10 sets of as many colours) | colour |
| Classification | Mini-SizeCount | image → how many large and how many small shapes (9 labels) | count, size |
| Retrieval | Mini-SameScene | image → the same objects in the same cells, drawn again (100) | colour, position |
| Retrieval | Mini-SameColours | image → shapes of the same colours, other cells and kinds (16) | colour, count |

The earlier OOD sets (shape classification, above/below VQA, composed retrieval) hinged on what the reader cannot
read (shapes at 0.35, vertical relations never asked) or were a floor by design; `docs/premise.md` cites them.

Training pairs (from the train scenes) use MMEB's training layout: `qry`, `qry_image_path`, `pos_text`,
`pos_image_path`, `neg_text`, `neg_image_path`, plus `dataset` (to draw batches from one dataset at a time).
Image paths are relative to the synthetic-scene folder, which `mmeb_manifest.json` names as the image root.
Since the scenes' splits share no image and hold colour–shape combinations out of train, so does the mini-MMEB.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from PIL import Image

from ..inputs import MMEB_IMAGE_PLACEHOLDER
from .sources import read_jsonl_records
from .synthetic import (
    COLOURS,
    NUMBER_WORDS,
    SHAPES,
    SIZES,
    Scene,
    SceneObject,
    redraw_scene,
    render_scene,
    scene_box,
    write_synthetic_dataset,
)

IN_DISTRIBUTION = {
    "Mini-Count": "Classification",
    "Mini-Digit": "Classification",
    "Mini-DominantColour": "Classification",
    "Mini-VQA": "VQA",
    "Mini-Caption2Image": "Retrieval",
    "Mini-Image2Caption": "Retrieval",
    "Mini-Grounding": "Visual Grounding",
}
OUT_OF_DISTRIBUTION = {
    "Mini-ColourSet": "Classification",
    "Mini-SizeCount": "Classification",
    "Mini-SameScene": "Retrieval",
    "Mini-SameColours": "Retrieval",
}
# The scene attributes (question types of `coma_hf.data.synthetic`) each OOD set cannot be solved without reading.
OOD_ATTRIBUTES = {
    "Mini-ColourSet": ("colour",),
    "Mini-SizeCount": ("count", "size"),
    "Mini-SameScene": ("colour", "position"),
    "Mini-SameColours": ("colour", "count"),
}
META_TASKS = {**IN_DISTRIBUTION, **OUT_OF_DISTRIBUTION}
NUM_RETRIEVAL_CANDIDATES = 16
NUM_OOD_RETRIEVAL_CANDIDATES = 100  # Mini-SameScene
NUM_COLOUR_SET_CANDIDATES = 10
SIZE_COUNT_LABELS = tuple(
    f"{NUMBER_WORDS[large]} large and {NUMBER_WORDS[total - large]} small"
    for total in (1, 2, 3)
    for large in range(total, -1, -1)
)
NUM_GROUNDING_DISTRACTOR_SCENES = 2
IMAGE = MMEB_IMAGE_PLACEHOLDER  # where a row's image stands in its query, as in MMEB


def _shapes(record: dict) -> list[dict]:
    return [obj for obj in record["objects"] if obj["kind"] == "shape"]


def _digit(record: dict) -> str:
    return next((obj["text"] for obj in record["objects"] if obj["kind"] == "text"), "none")


def _size_count(record: dict) -> str:
    large = sum(obj["size"] == "large" for obj in _shapes(record))
    return f"{NUMBER_WORDS[large]} large and {NUMBER_WORDS[len(_shapes(record)) - large]} small"


def _colour_set(colours) -> str:
    """A set of colours as a label, in `COLOURS` order (so one set has one spelling)."""
    chosen = set(colours)
    names = [name for name in COLOURS if name in chosen]
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]


def _largest_shape(record: dict) -> dict:
    area = lambda obj: (obj["box"][2] - obj["box"][0]) * (obj["box"][3] - obj["box"][1])  # noqa: E731
    return max(_shapes(record), key=area)


CLASSIFICATION = {
    "Mini-Count": ("counting the shapes", lambda record: NUMBER_WORDS[len(_shapes(record))], NUMBER_WORDS[1:4]),
    "Mini-Digit": ("reading the digit", _digit, tuple(str(digit) for digit in range(10)) + ("none",)),
    "Mini-DominantColour": (
        "the colour of the largest shape",
        lambda record: _largest_shape(record)["colour"],
        tuple(COLOURS),
    ),
    "Mini-SizeCount": ("how many of its shapes are large and how many small", _size_count, SIZE_COUNT_LABELS),
}


def _row(query_text, query_image, texts, images) -> dict:
    return {"qry_text": query_text, "qry_img_path": query_image or "", "tgt_text": texts, "tgt_img_path": images}


def classification_rows(records: list[dict], name: str) -> list[dict]:
    aspect, label_of, labels = CLASSIFICATION[name]
    rows = []
    for record in records:
        gold = label_of(record)
        candidates = [gold] + [label for label in labels if label != gold]
        query = f"{IMAGE} Represent the given image for classification by {aspect}."
        rows.append(_row(query, record["image"], candidates, [""] * len(candidates)))
    return rows


def vqa_rows(records: list[dict]) -> list[dict]:
    answers_by_type: dict[str, list[str]] = {}
    for record in records:
        for turn in record["conversation"]:
            answers = answers_by_type.setdefault(turn["type"], [])
            if turn["answer"] not in answers:
                answers.append(turn["answer"])
    rows = []
    for record in records:
        turn = record["conversation"][0]
        candidates = [turn["answer"]] + [
            answer for answer in answers_by_type[turn["type"]] if answer != turn["answer"]
        ]
        query = f"{IMAGE} Represent the given image with the following question: {turn['question']}"
        rows.append(_row(query, record["image"], candidates, [""] * len(candidates)))
    return rows


def _distractors(records: list[dict], index: int, count: int, rng: random.Random) -> list[dict]:
    """Other scenes whose caption differs from scene `index`'s (identical captions would be unfair ties)."""
    caption = records[index]["caption"]
    pool = [record for position, record in enumerate(records) if position != index and record["caption"] != caption]
    return rng.sample(pool, min(count, len(pool)))


def retrieval_rows(records: list[dict], rng: random.Random) -> tuple[list[dict], list[dict]]:
    to_image, to_caption = [], []
    for index, record in enumerate(records):
        others = _distractors(records, index, NUM_RETRIEVAL_CANDIDATES - 1, rng)
        images = [record["image"]] + [other["image"] for other in others]
        captions = [record["caption"]] + [other["caption"] for other in others]
        to_image.append(
            _row(
                f"Find me an image that matches the given caption: {record['caption']}",
                None,
                [""] * len(images),
                images,
            )
        )
        to_caption.append(
            _row(
                f"{IMAGE} Find an image caption describing the given image.",
                record["image"],
                captions,
                [""] * len(captions),
            )
        )
    return to_image, to_caption


def _crop(record: dict, obj_index: int, root: Path, crops: Path) -> str:
    """Save (once) and return the path, relative to `root`, of one object's crop."""
    relative = crops.relative_to(root) / f"{record['id']}-{obj_index}.png"
    if not (root / relative).exists():
        with Image.open(root / record["image"]) as image:
            x0, y0, x1, y1 = record["objects"][obj_index]["box"]
            width, height = image.size
            box = (max(0, x0 - 2), max(0, y0 - 2), min(width, x1 + 2), min(height, y1 + 2))
            image.crop(box).save(root / relative)
    return str(relative)


def grounding_rows(records: list[dict], rng: random.Random, root: Path, crops: Path) -> list[dict]:
    rows = []
    for index, record in enumerate(records):
        shapes = [position for position, obj in enumerate(record["objects"]) if obj["kind"] == "shape"]
        target = rng.choice(shapes)
        obj = record["objects"][target]
        candidates = [_crop(record, target, root, crops)]
        candidates += [
            _crop(record, position, root, crops) for position in range(len(record["objects"])) if position != target
        ]
        for other in _distractors(records, index, NUM_GROUNDING_DISTRACTOR_SCENES, rng):
            candidates += [
                _crop(other, position, root, crops)
                for position in range(len(other["objects"]))
                if (other["objects"][position]["colour"], other["objects"][position]["shape"])
                != (obj["colour"], obj["shape"])
            ]
        label = f"{obj['colour']} {obj['shape']}"
        query = f'{IMAGE} Select the portion of the image that isolates the object labeled as "{label}".'
        rows.append(_row(query, record["image"], [""] * len(candidates), candidates))
    return rows


def _name(obj: dict) -> str:
    return SceneObject(**obj).name


def _redrawn(record: dict, root: Path, folder: Path, recolour: tuple[int, str] | None = None) -> str:
    """Draw (once) and return the path, relative to `root`, of `record`'s scene drawn again (see `redraw_scene`);
    placed by its own random stream, so the picture does not depend on what was drawn before."""
    suffix = "again" if recolour is None else f"{recolour[0]}-{recolour[1]}"
    relative = folder.relative_to(root) / f"{record['id']}-{suffix}.png"
    if not (root / relative).exists():
        with Image.open(root / record["image"]) as original:
            image_size = original.width
        rng = random.Random(f"mini-mmeb-redraw/{record['id']}/{suffix}")
        redraw_scene(record, image_size, rng, recolour).save(root / relative)
    return str(relative)


def same_scene_rows(records: list[dict], rng: random.Random, root: Path, folder: Path) -> list[dict]:
    """Image → the same scene drawn again, among other scenes drawn again."""
    rows = []
    for index, record in enumerate(records):
        others = _distractors(records, index, NUM_OOD_RETRIEVAL_CANDIDATES - 1, rng)
        images = [_redrawn(scene, root, folder) for scene in [record, *others]]
        query = f"{IMAGE} Find an image with the same objects in the same places."
        rows.append(_row(query, record["image"], [""] * len(images), images))
    return rows


def colour_set_rows(records: list[dict], rng: random.Random) -> list[dict]:
    """Image → the set of its shapes' colours, among other sets of as many colours (a form no IND set trains: the
    IND classification asks for one colour, of the largest shape)."""
    rows = []
    for record in records:
        colours = {obj["colour"] for obj in _shapes(record)}
        gold = _colour_set(colours)
        others = sorted({_colour_set(rng.sample(list(COLOURS), len(colours))) for _ in range(64)} - {gold})
        candidates = [gold] + rng.sample(others, min(NUM_COLOUR_SET_CANDIDATES - 1, len(others)))
        query = f"{IMAGE} Represent the given image for classification by the colours of its shapes."
        rows.append(_row(query, record["image"], candidates, [""] * len(candidates)))
    return rows


def _same_colours(record: dict, root: Path, folder: Path) -> str:
    """Draw (once) and return the path, relative to `root`, of a new picture with shapes of `record`'s colours and
    sizes, in other cells and of other kinds, and no digit; placed by its own random stream."""
    relative = folder.relative_to(root) / f"{record['id']}-colours.png"
    if not (root / relative).exists():
        with Image.open(root / record["image"]) as original:
            image_size = original.width
        rng = random.Random(f"mini-mmeb-colours/{record['id']}")
        shapes = _shapes(record)
        taken = {obj["cell"] for obj in record["objects"]}
        cells = rng.sample([cell for cell in range(9) if cell not in taken] or list(range(9)), len(shapes))
        scene = Scene(record["id"], record["split"], image_size)
        for obj, cell in zip(shapes, cells, strict=True):
            kind = rng.choice([shape for shape in SHAPES if shape != obj["shape"]])
            box = scene_box(cell, SIZES[obj["size"]], image_size, rng)
            scene.objects.append(SceneObject("shape", obj["colour"], cell, box, shape=kind, size=obj["size"]))
        render_scene(scene).save(root / relative)
    return str(relative)


def same_colours_rows(records: list[dict], rng: random.Random, root: Path, folder: Path) -> list[dict]:
    """Image → another picture with shapes of the same colours (in other cells, of other kinds), among pictures made
    the same way from scenes whose colour set differs."""
    colour_sets = [_colour_set(obj["colour"] for obj in _shapes(record)) for record in records]
    rows = []
    for index, record in enumerate(records):
        pool = [other for other, colours in zip(records, colour_sets, strict=True) if colours != colour_sets[index]]
        others = rng.sample(pool, min(NUM_RETRIEVAL_CANDIDATES - 1, len(pool)))
        images = [_same_colours(scene, root, folder) for scene in [record, *others]]
        query = f"{IMAGE} Find another picture whose shapes have exactly these colours."
        rows.append(_row(query, record["image"], [""] * len(images), images))
    return rows


def evaluation_datasets(records: list[dict], seed: int, root: Path, crops: Path) -> dict[str, list[dict]]:
    """The in-distribution mini-MMEB datasets of one split (the recipes of stage 2's training pairs)."""
    rng = random.Random(f"mini-mmeb/{seed}")
    datasets = {name: classification_rows(records, name) for name in CLASSIFICATION if name in IN_DISTRIBUTION}
    datasets["Mini-VQA"] = vqa_rows(records)
    datasets["Mini-Caption2Image"], datasets["Mini-Image2Caption"] = retrieval_rows(records, rng)
    datasets["Mini-Grounding"] = grounding_rows(records, rng, root, crops)
    return datasets


def out_of_distribution_datasets(records: list[dict], seed: int, root: Path, folder: Path) -> dict[str, list[dict]]:
    """The out-of-distribution datasets of one split (evaluation only); their own random stream, so adding them
    left the in-distribution datasets as they were."""
    rng = random.Random(f"mini-mmeb-ood/{seed}")
    return {
        "Mini-ColourSet": colour_set_rows(records, rng),
        "Mini-SizeCount": classification_rows(records, "Mini-SizeCount"),
        "Mini-SameScene": same_scene_rows(records, rng, root, folder),
        "Mini-SameColours": same_colours_rows(records, rng, root, folder),
    }


def training_pairs(records: list[dict], seed: int, root: Path, crops: Path) -> list[dict]:
    """MMEB-layout training pairs with one hard negative each, taken from every evaluation dataset's recipe."""
    pairs = []
    for name, rows in evaluation_datasets(records, seed, root, crops).items():
        for row in rows:
            texts, images = row["tgt_text"], row["tgt_img_path"]
            negative = 1 if len(texts) > 1 else None
            pairs.append(
                {
                    "dataset": name,
                    "qry": row["qry_text"],
                    "qry_image_path": row["qry_img_path"],
                    "pos_text": texts[0],
                    "pos_image_path": images[0],
                    "neg_text": texts[negative] if negative else "",
                    "neg_image_path": images[negative] if negative else "",
                }
            )
    return pairs


def write_mini_mmeb(synthetic_dir: str | Path, max_train_scenes: int | None = 2000, **scene_settings) -> Path:
    """Write the mini-MMEB under `synthetic_dir/mini_mmeb` (`{dev,test}/{dataset}.jsonl` with `mmeb_manifest.json`,
    and `train.jsonl` from the first `max_train_scenes` train scenes; 0 skips the training pairs) from the scenes
    there. Scenes already in `synthetic_dir` are reused unless `scene_settings` (`num_train`, `num_dev`,
    `num_test`, `seed`, `image_size`) ask for others; missing scenes are written."""
    root = Path(synthetic_dir)
    metadata = root / "metadata.json"
    settings = json.loads(metadata.read_text())["settings"] if metadata.exists() else {}
    settings.update(scene_settings)
    paths = write_synthetic_dataset(root, **settings)
    seed = settings.get("seed", 0)
    output = root / "mini_mmeb"
    crops, redrawn = output / "crops", output / "redrawn"
    crops.mkdir(parents=True, exist_ok=True)
    redrawn.mkdir(exist_ok=True)
    for split in ("dev", "test"):
        records = read_jsonl_records(paths[split])
        folder = output / split
        folder.mkdir(exist_ok=True)
        datasets = evaluation_datasets(records, seed, root, crops)
        datasets.update(out_of_distribution_datasets(records, seed, root, redrawn))
        for name, rows in datasets.items():
            if not rows:  # a tiny split may have no scene a dataset can ask about; an empty file would score 0
                continue
            (folder / f"{name}.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
        manifest = {
            "image_root": "../..",
            "meta_tasks": META_TASKS,
            "out_of_distribution": sorted(OUT_OF_DISTRIBUTION),
        }
        (folder / "mmeb_manifest.json").write_text(json.dumps(manifest, indent=2))
    if max_train_scenes != 0:
        records = read_jsonl_records(paths["train"])[:max_train_scenes]
        pairs = training_pairs(records, seed, root, crops)
        (output / "train.jsonl").write_text("".join(json.dumps(pair) + "\n" for pair in pairs))
    return output


def mini_mmeb_split(synthetic_dir: str | Path, split: str = "test") -> Path:
    """The folder of one mini-MMEB evaluation split under `synthetic_dir`, written first (without training pairs,
    which evaluation does not need) when absent."""
    folder = Path(synthetic_dir) / "mini_mmeb" / split
    if not folder.exists():
        write_mini_mmeb(synthetic_dir, max_train_scenes=0)
    return folder
