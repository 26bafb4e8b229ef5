"""What CoMa takes as input: the error that names a bad input, image decoding, and the parsing of embedding inputs.

`CoMaInputError` is raised wherever an input is rejected, with the sample and the field it came from. `load_image`
reads any image Pillow decodes (upright unless told otherwise, RGB, tiny images enlarged when asked);
`fit_aspect_ratio` makes images the backbones' image processors would refuse acceptable. `split_input` /
`message_input` turn the accepted input forms (a text, an image, a dict, a chat conversation) into one
`EmbeddingInput`.

Part of the remote code shipped with every checkpoint: imports only Pillow, numpy (a transformers dependency) and the
standard library.
"""

from __future__ import annotations

import io
import math
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

# Qwen2/2.5/3-VL image processors refuse images more elongated than this (`smart_resize`); see `fit_aspect_ratio`.
MAX_ASPECT_RATIO = 200
# The side a tiny image is resized to (`enlarge_tiny_image`): the release's evaluation makes images under 28 px 56².
ENLARGED_IMAGE_SIZE = 56
# MMEB's image placeholder: where a row's image stands in its text (rows of MMEB-train, MMEB-V2 instructions).
MMEB_IMAGE_PLACEHOLDER = "<|image_1|>"


class CoMaInputError(ValueError):
    """Bad input, reported with the sample and the field it came from."""

    def __init__(self, message: str, sample: Any = None, field: str | None = None):
        where = ", ".join(part for part in (_sample_name(sample), f"field {field!r}" if field else "") if part)
        super().__init__(f"{where}: {message}" if where else message)
        self.reason = message
        self.sample = sample
        self.field = field

    def position_in(self, batch: Sequence[Any]) -> int | None:
        """The index into `batch` this error names, if its sample is one (batch-level code names samples by
        position; callers that know the inputs better re-raise with a clearer name)."""
        if isinstance(self.sample, int) and 0 <= self.sample < len(batch):
            return self.sample
        return None


def _sample_name(sample: Any) -> str:
    return "" if sample is None else f"sample {sample}"


# --------------------------------------------------------------------------------------------------------------------
# Images
# --------------------------------------------------------------------------------------------------------------------
def load_image(
    image: Any,
    sample: Any = None,
    field: str = "image",
    upright: bool = True,
    enlarge_below: int | None = None,
    enlarged_size: int = ENLARGED_IMAGE_SIZE,
) -> Image.Image:
    """Return `image` as a decoded RGB PIL image.

    Accepts a PIL image (taken as it is), a local path (str or `os.PathLike`), raw bytes, or a
    `datasets.Image(decode=False)` dict with `bytes` and/or `path`; a file is read upright (its EXIF orientation
    applied — a PIL image keeps its EXIF after `transpose`, so doing it for those could turn them twice) unless
    `upright=False`. With `enlarge_below`, an image with a side shorter than that many pixels becomes
    `enlarged_size` × `enlarged_size` first (see `enlarge_tiny_image`). URLs are refused: this file is remote code
    and makes no network calls (download the image, or pass `transformers.image_utils.load_image(url)`). Images in
    modes L, LA, P, RGBA, CMYK, I;16, I, F and 1 are converted; transparency is composited onto white.
    Raises `CoMaInputError` naming the sample, the field and the path when the image is missing, unreadable, or
    larger than Pillow's decompression-bomb limit (`PIL.Image.MAX_IMAGE_PIXELS`).
    """
    if isinstance(image, Image.Image):
        return to_rgb(enlarge_tiny_image(image, enlarge_below, enlarged_size))
    opened = _decoded(image, sample, field, upright)
    return to_rgb(enlarge_tiny_image(opened, enlarge_below, enlarged_size))


def _decoded(image: Any, sample: Any, field: str, upright: bool) -> Image.Image:
    """The decoded image a path, bytes or `datasets.Image` dict holds, in its own mode (upright when asked)."""
    if isinstance(image, dict) and ("bytes" in image or "path" in image):
        image = image.get("bytes") or image.get("path")
    if isinstance(image, (bytes, bytearray)):
        return _open(io.BytesIO(image), "<bytes>", sample, field, upright)
    if isinstance(image, (str, os.PathLike)):
        path = os.fspath(image)
        if path.startswith(("http://", "https://")):
            raise CoMaInputError(
                f"image URLs are not fetched ({path}): CoMa's remote code makes no network calls; download the image "
                "or pass a PIL image (e.g. transformers.image_utils.load_image(url))",
                sample,
                field,
            )
        if not os.path.isfile(path):
            raise CoMaInputError(f"image file not found: {path}", sample, field)
        return _open(path, path, sample, field, upright)
    raise CoMaInputError(f"expected a PIL image, a path or bytes, got {type(image).__name__}", sample, field)


def _open(source: Any, name: str, sample: Any, field: str, upright: bool = True) -> Image.Image:
    try:
        with Image.open(source) as opened:
            opened.load()  # decode now, so a truncated file fails here and not inside a batch
            return _upright(opened, sample, field) if upright else opened.copy()
    except Image.DecompressionBombError as error:
        raise CoMaInputError(f"image {name} is too large to decode safely: {error}", sample, field) from error
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
        raise CoMaInputError(f"cannot read image {name}: {error}", sample, field) from error


def _upright(image: Image.Image, sample: Any, field: str) -> Image.Image:
    """The image turned as its EXIF orientation says (photos from phones are stored sideways)."""
    from PIL import ImageOps

    try:
        return ImageOps.exif_transpose(image)
    except Exception as error:  # a corrupt EXIF block: name it rather than fail inside Pillow
        raise CoMaInputError(f"cannot apply the image's EXIF orientation: {error}", sample, field) from error


def enlarge_tiny_image(image: Image.Image, below: int | None, size: int = ENLARGED_IMAGE_SIZE) -> Image.Image:
    """`image` resized to `size` × `size` when `below` is set and its width or height is shorter than `below` pixels,
    else `image` itself. Pillow's default filter for the image's own mode is used (bicubic; nearest for palette and
    1-bit images), so the result equals a plain `image.resize((size, size))` — how the release's evaluation treats
    images below one visual token (28 px); the aspect ratio is not kept."""
    if below is None or (image.width >= below and image.height >= below):
        return image
    return image.resize((size, size))


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert any PIL mode to 8-bit RGB (alpha composited onto white, 16-bit and float scaled to 0..255)."""
    mode = image.mode
    if mode == "RGB":
        return image
    if mode in ("RGBA", "LA", "PA", "RGBa", "La") or (mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if mode.startswith("I;16"):
        array = np.asarray(image, dtype=np.float32) / 257.0
        return Image.fromarray(np.clip(array, 0, 255).astype(np.uint8)).convert("RGB")
    if mode in ("I", "F"):
        array = np.asarray(image, dtype=np.float32)
        low, high = float(array.min()), float(array.max())
        scaled = (array - low) * (255.0 / (high - low)) if high > low else np.zeros_like(array)
        return Image.fromarray(scaled.astype(np.uint8)).convert("RGB")
    return image.convert("RGB")


def fit_aspect_ratio(image: Image.Image, limit: int = MAX_ASPECT_RATIO) -> Image.Image:
    """`image` as it is when its long side is at most `limit` times its short side; otherwise centred on a white
    canvas widened (on its short side) just enough to reach `limit`:1, so that every decodable image embeds.
    White is what transparency is composited onto (`to_rgb`)."""
    width, height = image.size
    if max(width, height) <= limit * min(width, height):
        return image
    short_side = math.ceil(max(width, height) / limit)
    size = (width, short_side) if width >= height else (short_side, height)
    canvas = Image.new("RGB", size, (255, 255, 255))
    canvas.paste(image, ((size[0] - width) // 2, (size[1] - height) // 2))
    return canvas


# --------------------------------------------------------------------------------------------------------------------
# Embedding inputs
# --------------------------------------------------------------------------------------------------------------------
def without_image_placeholders(text: str, placeholder: str | re.Pattern) -> str:
    """`text` with every match of `placeholder` (a regular expression) removed, and nothing else changed: how a text
    whose image has no place of its own loses its placeholders (the release's parsers: `.replace("<|image_1|>", "")`
    on instructions; `CoMaProcessor`'s prompt-mode layouts, on instruction and text)."""
    return re.sub(placeholder, "", text)


@dataclass(frozen=True)
class EmbeddingInput:
    """One query or candidate, whichever form it was given in: what the processor renders."""

    text: str | None = None
    image: Any = None  # a PIL image, a path, bytes or a `datasets.Image` dict (see `load_image`)
    instruction: str | None = None
    layout: str | None = None  # a named layout of the processor's config (`CoMaProcessor.layouts`); None: the default

    def describe(self) -> str:
        """A short description for error messages: the image (path or size) and the start of the text."""
        parts = []
        if isinstance(self.image, Image.Image):
            parts.append(f"<{self.image.mode} image {self.image.width}×{self.image.height}>")
        elif self.image is not None:
            named = isinstance(self.image, (str, os.PathLike))
            parts.append(f"image {os.fspath(self.image) if named else type(self.image).__name__}")
        if self.text is not None:
            parts.append(f"text {self.text[:40]!r}{'…' if len(self.text) > 40 else ''}")
        return " + ".join(parts) or "(empty input)"


INPUT_KEYS = ("text", "image", "instruction", "layout")  # the keys of a dict input (`EmbeddingInput`'s fields)


def split_input(item: Any, sample: Any = None) -> EmbeddingInput:
    """The `EmbeddingInput` of `item`: a `str` is text, a PIL image is an image, a dict has `text` / `image` /
    `instruction` / `layout` keys."""
    if isinstance(item, str):
        return EmbeddingInput(text=item)
    if isinstance(item, Image.Image):
        return EmbeddingInput(image=item)
    if isinstance(item, dict):
        unknown = set(item) - set(INPUT_KEYS)
        if unknown:
            raise CoMaInputError(
                f"unknown keys {sorted(unknown)}; use {', '.join(repr(key) for key in INPUT_KEYS)}", sample, "input"
            )
        return EmbeddingInput(**item)
    raise CoMaInputError(f"expected str, PIL image or dict, got {type(item).__name__}", sample, "input")


def message_input(messages: Sequence[dict], sample: Any) -> EmbeddingInput:
    """The `EmbeddingInput` of one chat conversation (see `CoMaProcessor.apply_chat_template`). A message may name
    the processor layout to render with (`"layout": name`, as `MMEBEvaluator` does for the release's rules)."""
    parts: dict[str, list] = {"system": [], "text": [], "image": []}
    layouts = {message["layout"] for message in messages if isinstance(message, dict) and message.get("layout")}
    if len(layouts) > 1:
        raise CoMaInputError(f"the messages name several layouts: {sorted(layouts)}", sample, "layout")
    for message in messages:
        role = message.get("role") if isinstance(message, dict) else None
        if role not in ("system", "user"):
            raise CoMaInputError(
                f"CoMa embeds one input at a time: expected 'system' and 'user' messages, got role {role!r}",
                sample,
                "message",
            )
        content = message.get("content")
        items = [{"type": "text", "text": content}] if isinstance(content, str) else content or []
        for item in items:
            kind = item.get("type", "text")
            if kind not in ("text", "image"):
                raise CoMaInputError(f"unsupported content type {kind!r}", sample, "message")
            value = item.get(kind)
            if kind == "text" and value is None:
                continue
            if value is None or (kind == "text" and not isinstance(value, str)):
                raise CoMaInputError(f"expected a {kind}, got {type(value).__name__}", sample, kind)
            parts["system" if role == "system" else kind].append(value)
    if len(parts["image"]) > 1:
        raise CoMaInputError(f"{len(parts['image'])} images in one input; CoMa takes at most one", sample, "image")
    return EmbeddingInput(
        text="\n".join(parts["text"]) or None,
        image=parts["image"][0] if parts["image"] else None,
        # an empty system message is an empty instruction, not none (a prompt layout writes its separators for it)
        instruction="\n".join(parts["system"]) if parts["system"] else None,
        layout=layouts.pop() if layouts else None,
    )
