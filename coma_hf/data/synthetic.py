"""Synthetic scenes: the embedded default's stage-1 data and the raw material of the mini-MMEB.

Each scene is a small image on a 3×3 grid with one to three coloured shapes (circle, square, triangle, diamond;
small or large) and, in most scenes, one painted digit. Every object's box is recorded. For each scene we generate a
one-line caption, a longer description and a multi-turn conversation of 3–5 retrieval-oriented questions of the
paper's kinds — objects and attributes (colour, shape, size), counts, visible text, spatial relations (position,
left/right) — answered from the scene's ground truth.

Splits: `train`, `dev` and `test` are drawn from disjoint random streams (no image is shared) and some
colour–shape combinations (`HELD_OUT_COMBINATIONS`) never appear in `train`, while a quarter of the dev/test scenes
(`HELD_OUT_SHARE`) show one of them; a record's `held_out` says whether it does. Everything is deterministic from
`seed`.
"""

from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (214, 39, 40),
    "green": (44, 160, 44),
    "blue": (31, 119, 180),
    "yellow": (235, 200, 30),
    "purple": (148, 103, 189),
    "orange": (255, 127, 14),
    "pink": (240, 120, 200),
    "black": (25, 25, 25),
}
SHAPES = ("circle", "square", "triangle", "diamond")
SIZES = {"small": 0.28, "large": 0.45}  # half-extent as a fraction of a grid cell
DIGIT_HALF_EXTENT = 0.4  # the painted digit's, likewise
HELD_OUT_COMBINATIONS = (("red", "triangle"), ("blue", "circle"), ("green", "diamond"), ("yellow", "square"))
HELD_OUT_SHARE = 0.25  # of dev/test scenes that show a held-out combination (the rest are in-distribution)
CELL_NAMES = ("top left", "top", "top right", "left", "center", "right", "bottom left", "bottom", "bottom right")
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five")
QUESTION_TYPES = ("colour", "shape", "size", "count", "text", "position", "relation")
QUESTION_WEIGHTS = {"colour": 3, "position": 3, "count": 2, "size": 2, "shape": 1, "text": 1, "relation": 1}
SPLITS = ("train", "dev", "test")
BACKGROUND = (248, 248, 248)


@dataclass
class SceneObject:
    """One object: a shape (`shape`, `colour`, `size`) or a painted digit (`text`); `box` is (x0, y0, x1, y1)."""

    kind: str
    colour: str
    cell: int
    box: tuple[int, int, int, int]
    shape: str | None = None
    size: str | None = None
    text: str | None = None

    @property
    def name(self) -> str:
        return f"{self.colour} {self.shape}" if self.kind == "shape" else f"{self.colour} digit {self.text}"

    @property
    def position(self) -> str:
        return CELL_NAMES[self.cell]


@dataclass
class Scene:
    """A scene and everything known about it."""

    id: str
    split: str
    image_size: int
    objects: list[SceneObject] = field(default_factory=list)

    @property
    def shapes(self) -> list[SceneObject]:
        return [obj for obj in self.objects if obj.kind == "shape"]

    @property
    def digit(self) -> SceneObject | None:
        return next((obj for obj in self.objects if obj.kind == "text"), None)

    def caption(self) -> str:
        parts = [f"a {obj.size} {obj.name}" for obj in self.shapes]
        if self.digit:
            parts.append(f"the number {self.digit.text}")
        return _join(parts)

    def description(self) -> str:
        count = len(self.shapes)
        sentences = [f"The image shows {NUMBER_WORDS[count]} shape{'s' if count > 1 else ''} on a light background."]
        sentences += [f"A {obj.size} {obj.name} is at the {obj.position}." for obj in self.shapes]
        if self.digit:
            sentences.append(
                f"The number {self.digit.text} is written in {self.digit.colour} at the {self.digit.position}."
            )
        else:
            sentences.append("There is no text in the image.")
        return " ".join(sentences)


def _join(parts: list[str]) -> str:
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


# --------------------------------------------------------------------------------------------------------------------
# Sampling and drawing
# --------------------------------------------------------------------------------------------------------------------
def sample_scene(scene_id: str, split: str, rng: random.Random, image_size: int = 112) -> Scene:
    """Draw a scene: 1–3 shapes in distinct grid cells, a digit in 70 % of scenes; respects the split's holdout."""
    cells = rng.sample(range(9), 4)
    scene = Scene(scene_id, split, image_size)
    count = rng.randint(1, 3)
    allowed = [(c, s) for c in COLOURS for s in SHAPES if (c, s) not in HELD_OUT_COMBINATIONS]
    pairs = rng.sample(allowed, count)  # distinct colour–shape pairs, so every shape can be named
    if split != "train" and rng.random() < HELD_OUT_SHARE:  # a combination never seen in training
        pairs[rng.randrange(count)] = rng.choice(HELD_OUT_COMBINATIONS)
    for (colour, shape), cell in zip(pairs, cells, strict=False):
        size = rng.choice(tuple(SIZES))
        scene.objects.append(
            SceneObject("shape", colour, cell, scene_box(cell, SIZES[size], image_size, rng), shape=shape, size=size)
        )
    if rng.random() < 0.7:
        colour = rng.choice(tuple(COLOURS))
        scene.objects.append(
            SceneObject(
                "text",
                colour,
                cells[3],
                scene_box(cells[3], DIGIT_HALF_EXTENT, image_size, rng),
                text=str(rng.randint(0, 9)),
            )
        )
    return scene


def scene_box(cell: int, half_extent: float, image_size: int, rng: random.Random) -> tuple[int, int, int, int]:
    cell_size = image_size / 3
    half = half_extent * cell_size
    slack = cell_size / 2 - half - 1
    cx = (cell % 3 + 0.5) * cell_size + rng.uniform(-slack, slack)
    cy = (cell // 3 + 0.5) * cell_size + rng.uniform(-slack, slack)
    return (round(cx - half), round(cy - half), round(cx + half), round(cy + half))


def render_scene(scene: Scene) -> Image.Image:
    """Draw the scene as an RGB image."""
    image = Image.new("RGB", (scene.image_size, scene.image_size), BACKGROUND)
    draw = ImageDraw.Draw(image)
    for obj in scene.objects:
        fill = COLOURS[obj.colour]
        x0, y0, x1, y1 = obj.box
        if obj.kind == "text":
            font = _font(int((y1 - y0) * 1.2))
            draw.text(((x0 + x1) / 2, (y0 + y1) / 2), obj.text, fill=fill, font=font, anchor="mm")
        elif obj.shape == "circle":
            draw.ellipse(obj.box, fill=fill)
        elif obj.shape == "square":
            draw.rectangle(obj.box, fill=fill)
        elif obj.shape == "triangle":
            draw.polygon([((x0 + x1) / 2, y0), (x1, y1), (x0, y1)], fill=fill)
        elif obj.shape == "diamond":
            draw.polygon(
                [((x0 + x1) / 2, y0), (x1, (y0 + y1) / 2), ((x0 + x1) / 2, y1), (x0, (y0 + y1) / 2)], fill=fill
            )
    return image


def redraw_scene(
    record: dict, image_size: int, rng: random.Random, recolour: tuple[int, str] | None = None
) -> Image.Image:
    """The scene of `record` drawn again: the same objects in the same cells, each placed anew within its cell.

    `recolour=(object index, colour)` paints that object another colour (the target of a composed query).
    """
    scene = Scene(record["id"], record["split"], image_size)
    for index, fields in enumerate(record["objects"]):
        obj = SceneObject(**fields)
        half = SIZES[obj.size] if obj.kind == "shape" else DIGIT_HALF_EXTENT
        obj.box = scene_box(obj.cell, half, scene.image_size, rng)
        if recolour is not None and recolour[0] == index:
            obj.colour = recolour[1]
        scene.objects.append(obj)
    return render_scene(scene)


def _font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError):  # Pillow without FreeType: the fixed bitmap font
        return ImageFont.load_default()


# --------------------------------------------------------------------------------------------------------------------
# Questions and answers
# --------------------------------------------------------------------------------------------------------------------
def scene_questions(scene: Scene, rng: random.Random) -> list[dict]:
    """3–5 question/answer turns of distinct types, in random order; each turn records its `type`.

    Types are drawn without replacement with `QUESTION_WEIGHTS`, so most conversations ask for an object's colour
    and position (as retrieval-oriented questions mostly do) and every type occurs.
    """
    candidates = {kind: builder(scene, rng) for kind, builder in _QUESTION_BUILDERS.items()}
    available = [kind for kind, turn in candidates.items() if turn is not None]
    chosen = []
    for _ in range(min(len(available), rng.randint(3, 5))):
        kind = rng.choices(available, weights=[QUESTION_WEIGHTS[kind] for kind in available])[0]
        available.remove(kind)
        chosen.append(kind)
    return [{**candidates[kind], "type": kind} for kind in chosen]


def every_question(scene: Scene, rng: random.Random) -> list[dict]:
    """One question/answer turn of every type the scene allows (up to all of `QUESTION_TYPES`), in random order;
    each turn records its `type`. More practice per scene than `scene_questions`, e.g. to train a reader."""
    turns = [{**turn, "type": kind} for kind, builder in _QUESTION_BUILDERS.items() if (turn := builder(scene, rng))]
    rng.shuffle(turns)
    return turns


def _unique(scene: Scene, predicate) -> list[SceneObject]:
    return [obj for obj in scene.shapes if sum(predicate(other, obj) for other in scene.shapes) == 1]


def _about_one(scene: Scene, rng: random.Random, same, question, answer) -> dict | None:
    """Ask about one shape that `same` singles out in the scene (None when no shape is unambiguous)."""
    targets = _unique(scene, same)
    if not targets:
        return None
    target = rng.choice(targets)
    return {"question": question(target), "answer": answer(target)}


def _colour_question(scene: Scene, rng: random.Random) -> dict | None:
    return _about_one(
        scene, rng, lambda a, b: a.shape == b.shape, lambda t: f"What colour is the {t.shape}?", lambda t: t.colour
    )


def _shape_question(scene: Scene, rng: random.Random) -> dict | None:
    return _about_one(
        scene,
        rng,
        lambda a, b: a.colour == b.colour,
        lambda t: f"What shape is the {t.colour} object?",
        lambda t: t.shape,
    )


def _size_question(scene: Scene, rng: random.Random) -> dict | None:
    return _about_one(
        scene, rng, lambda a, b: a.name == b.name, lambda t: f"Is the {t.name} small or large?", lambda t: t.size
    )


def _count_question(scene: Scene, rng: random.Random) -> dict:
    return {"question": "How many shapes are there?", "answer": NUMBER_WORDS[len(scene.shapes)]}


def _text_question(scene: Scene, rng: random.Random) -> dict:
    return {"question": "What number is written in the image?", "answer": scene.digit.text if scene.digit else "none"}


def _position_question(scene: Scene, rng: random.Random) -> dict | None:
    return _about_one(
        scene, rng, lambda a, b: a.name == b.name, lambda t: f"Where is the {t.name}?", lambda t: t.position
    )


def _relation_question(scene: Scene, rng: random.Random) -> dict | None:
    named = _unique(scene, lambda a, b: a.name == b.name)
    pairs = [(a, b) for a in named for b in named if a is not b and a.cell % 3 != b.cell % 3]
    if not pairs:
        return None
    first, second = rng.choice(pairs)
    side = "left" if first.cell % 3 < second.cell % 3 else "right"
    return {"question": f"Is the {first.name} left or right of the {second.name}?", "answer": side}


_QUESTION_BUILDERS = {
    "colour": _colour_question,
    "shape": _shape_question,
    "size": _size_question,
    "count": _count_question,
    "text": _text_question,
    "position": _position_question,
    "relation": _relation_question,
}


# --------------------------------------------------------------------------------------------------------------------
# Datasets on disk
# --------------------------------------------------------------------------------------------------------------------
def scene_record(scene: Scene, image_path: str, rng: random.Random) -> dict:
    """A stage-1 record (`id`, `image`, `text`, `conversation`) plus the scene's metadata for evaluation tasks."""
    return {
        "id": scene.id,
        "image": image_path,
        "text": None,
        "conversation": scene_questions(scene, rng),
        "caption": scene.caption(),
        "description": scene.description(),
        "objects": [asdict(obj) for obj in scene.objects],
        "held_out": any((obj.colour, obj.shape) in HELD_OUT_COMBINATIONS for obj in scene.shapes),
        "split": scene.split,
    }


def generate_split(split: str, count: int, seed: int = 0, image_size: int = 112) -> list[tuple[Scene, dict]]:
    """`count` scenes of `split` with their records (image paths relative: `images/{id}.png`)."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    rows = []
    for index in range(count):
        scene_id = f"{split}-{index:06d}"
        rng = random.Random(f"coma-synthetic/{seed}/{scene_id}")
        scene = sample_scene(scene_id, split, rng, image_size)
        rows.append((scene, scene_record(scene, f"images/{scene_id}.png", rng)))
    return rows


def write_synthetic_dataset(
    output_dir: str | Path,
    num_train: int = 2000,
    num_dev: int = 200,
    num_test: int = 200,
    seed: int = 0,
    image_size: int = 112,
) -> dict[str, Path]:
    """Render the three splits to `output_dir` (`{split}.jsonl`, `images/`, `metadata.json`); returns the JSONL paths.

    An existing dataset written with the same settings is reused as it is.
    """
    output_dir = Path(output_dir)
    settings = {
        "num_train": num_train,
        "num_dev": num_dev,
        "num_test": num_test,
        "seed": seed,
        "image_size": image_size,
    }
    paths = {split: output_dir / f"{split}.jsonl" for split in SPLITS}
    metadata_path = output_dir / "metadata.json"
    if metadata_path.exists() and all(path.exists() for path in paths.values()):
        if json.loads(metadata_path.read_text()).get("settings") == settings:
            return paths
    (output_dir / "images").mkdir(parents=True, exist_ok=True)
    for split, count in (("train", num_train), ("dev", num_dev), ("test", num_test)):
        with paths[split].open("w", encoding="utf-8") as handle:
            for scene, record in generate_split(split, count, seed, image_size):
                render_scene(scene).save(output_dir / record["image"])
                handle.write(json.dumps(record) + "\n")
    metadata = {
        "settings": settings,
        "held_out_combinations": [list(pair) for pair in HELD_OUT_COMBINATIONS],
        "colours": list(COLOURS),
        "shapes": list(SHAPES),
        "question_types": list(QUESTION_TYPES),
    }
    metadata_path.write_text(json.dumps(metadata, indent=2))
    return paths
