"""CoMaProcessor: the one renderer of CoMa's token layout, for both stages.

The order of an input's parts and the separators between them are data of the processor's saved config
(`compression_layout`, `embedding_layout`), so a checkpoint can carry another layout. The defaults:

Stage 1 (compression pre-training), one sample, no system prompt (`compression_layout`, then the QA turns)::

    <|vision_start|><|image_pad|>…<|vision_end|>{text}\\n{compress_instruction}<cmp_0>…<cmp_{K-1}>
    <|im_start|>user\\n{Q1}<|im_end|>\\n<|im_start|>assistant\\n{A1}<|im_end|>\\n …

Stage 2 (a query or a candidate), nothing after the compression tokens (`embedding_layout`)::

    <|vision_start|><|image_pad|>…<|vision_end|>{instruction}\\n{text}<cmp_0>…<cmp_{K-1}>

Missing parts are simply absent, and so is a separator next to a missing part. A text that carries an image
placeholder (`<|image_1|>` as in MMEB, or `<image>` as in LLaVA) gets the image tokens where the placeholder stands,
and no instruction is added. A layout may instead be a prompt (`InputLayout`'s prompt mode, with its options), and the
config may name more layouts that an input chooses: a checkpoint converted from the authors' release renders so, as
their evaluation did.
User text is tokenized with special tokens split, so a text cannot inject `<|im_end|>` or a compression token.

Part of the remote code shipped with every checkpoint: imports only torch, transformers, Pillow, sibling files and
the standard library.
"""

from __future__ import annotations

import copy
import inspect
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from transformers import BatchFeature
from transformers.processing_utils import ProcessorMixin

from .backbones import image_processor_class, pixels_per_token
from .inputs import (
    ENLARGED_IMAGE_SIZE,
    CoMaInputError,
    EmbeddingInput,
    fit_aspect_ratio,
    load_image,
    message_input,
    split_input,
    without_image_placeholders,
)

logger = logging.getLogger(__name__)

# The defaults of what the processor saves in its config (`processor_config.json`).
IMAGE_PLACEHOLDER = r"<\|image_\d+\|>|<image>"  # MMEB's `<|image_1|>`, LLaVA's `<image>`: where an image goes
COMPRESSION_TOKEN_FORMAT = "<cmp_{index}>"  # the name of compression token `index`
DEFAULT_COMPRESS_INSTRUCTION = "Summarize above image and text in a few words."  # the paper's
DEFAULT_QUERY_INSTRUCTION = "Find the matching image or text."
DEFAULT_DOCUMENT_INSTRUCTION = "Represent the given image or text."
# The order and separators of an input's parts (see `InputLayout`): stage 1's input, and a stage-2 query or candidate.
COMPRESSION_LAYOUT = "{image}{text}\n{instruction}{compression}"
EMBEDDING_LAYOUT = "{image}{instruction}\n{text}{compression}"
LOSS_ON_MODES = ("answers", "all_after_compression")  # stage-1 label positions (the paper's, the released code's)
IGNORE_INDEX = -100
_NOT_SETTINGS = ("self", "image_processor", "tokenizer", "kwargs")  # `__init__` arguments that are not settings


class BatchKey:
    """The names of a batch's entries: one owner for the processor, the model, the collators, the trainers and the
    loss. `collate` writes the model inputs (shapes there); the rest are added on the way to training."""

    INPUT_IDS = "input_ids"
    ATTENTION_MASK = "attention_mask"
    IMAGE_TOKENS = "mm_token_type_ids"  # 1 at image placeholder tokens
    PIXEL_VALUES = "pixel_values"
    IMAGE_GRID = "image_grid_thw"
    LABELS = "labels"  # stage 1
    IMAGES_PER_SAMPLE = "num_images_per_sample"  # sentence-transformers' GradCache cuts image rows by it
    SAMPLE_IDS = "sample_ids"  # the rows' ids, named when the loss is not finite
    DROPPED_TURNS = "dropped_turns"  # stage-1 QA turns that did not fit, summed by the trainer
    # A candidate column's optional `[batch]` bool: False where the row has no input of its own there (a hard
    # negative it lacks, a placeholder keeping the column rectangular); the loss drops those from every denominator.
    PRESENT = "present"


MODEL_INPUT_NAMES = (
    BatchKey.INPUT_IDS,
    BatchKey.ATTENTION_MASK,
    BatchKey.IMAGE_TOKENS,
    BatchKey.PIXEL_VALUES,
    BatchKey.IMAGE_GRID,
)


@dataclass
class BackboneProcessorParts:
    """The two parts of a backbone's processor that CoMa builds its processor from (the stock processor also wants
    video support, which CoMa does not use)."""

    tokenizer: Any
    image_processor: Any
    chat_template: str | None = None

    @classmethod
    def from_pretrained(cls, source: str) -> BackboneProcessorParts:
        """The backbone's tokenizer and image processor from a Hub id or folder."""
        from transformers import AutoImageProcessor, AutoTokenizer

        try:
            image_processor = AutoImageProcessor.from_pretrained(source)
        except ImportError:  # transformers < 5.2x maps it to a torchvision-only class
            image_processor = image_processor_class().from_pretrained(source)
        return cls(AutoTokenizer.from_pretrained(source), image_processor)


class InputLayout:
    """The order of an input's parts and the separators between them, parsed from a template such as
    `"{image}{instruction}\\n{text}{compression}"`, and how the parts become tokens.

    The slots are `{image}` (the vision block), `{instruction}`, `{text}` (the only part truncated to fit
    `max_length`) and `{compression}` (the K compression tokens, last: the answers or the pooling follow them); each
    at most once, `{compression}` required. Text between two slots is a separator, written only when both of its
    slots are present.

    A layout is saved as its template (the defaults below) or as a dict `{"template": …, option: value, …}`
    (`from_spec`, `spec`). Every rule of the two modes and the options, in one place (examples: `V` = the vision block,
    `<cmp>` = the K compression tokens, `\\n` = a newline; `\\n` and spaces in a template are its separators):

    ========================  =========================================================================================
    rule                      what it does, then an example (layout; input → rendered)
    ========================  =========================================================================================
    `mode: "parts"`           the default, how CoMa checkpoints are trained. A separator is tokenized with the
                              instruction it touches, the text alone; an absent or empty part writes nothing, nor do
                              its separators. A text holding an image placeholder (`image_placeholder`) and given an
                              image is that text with `V` at the first placeholder, nothing else added; without an
                              image, the placeholders are removed.
                              `{image}{instruction}\\n{text}{compression}`; image, "Find it.", "a cat" →
                              `VFind it.\\na cat<cmp>`; image, "<|image_1|> a cat" → `V a cat<cmp>`;
                              "a cat" alone → `a cat<cmp>`.
    `mode: "prompt"`          the parts are joined into one prompt string, as a stock processor is handed one, and
                              each stretch of it between `V` and `<cmp>` is tokenized at once; the instruction, where
                              a prompt starts, is present whenever given, even empty; image placeholders are removed
                              from instruction and text (a prompt has no place for them).
                              `{image} {instruction} {text}{compression}`; image, "<|image_1|> Find it.", "a cat" →
                              `V  Find it. a cat<cmp>`; image, instruction "" → `V <cmp>`.
    `clean_space_newline`     prompt mode: every " \\n" of a complete stretch becomes "\\n" (the release's evaluation
                              cleans its image prompts so). Instruction "Find \\n", text "a cat" →
                              `V Find\\n a cat<cmp>`.
    `trailing_newline`        prompt mode: "\\n" at the end of the prompt text, after the clean-up, whatever is
                              present (with K = 0 too, where nothing follows it); a text cut for `max_length` is cut
                              before it. The prompt layout above; image, "Find it.", "a cat" →
                              `V Find it. a cat\\n<cmp>`; with K = 0 → `V Find it. a cat\\n`.
    `text_as_instruction`     an input given without an instruction has its text (or, without one, "") in the
                              instruction slot (the release's classification queries, and the plain API of a converted
                              checkpoint). The released `embedding_layout` (prompt, both options above and this one);
                              image, "a cat" → `V a cat\\n<cmp>`; image alone → `V \\n<cmp>`.
    ========================  =========================================================================================
    """

    SLOTS = ("image", "instruction", "text", "compression")
    MODES = ("parts", "prompt")
    OPTIONS = ("mode", "clean_space_newline", "trailing_newline", "text_as_instruction")

    def __init__(
        self,
        template: str,
        mode: str = "parts",
        clean_space_newline: bool = False,
        trailing_newline: bool = False,
        text_as_instruction: bool = False,
    ):
        self.template = template
        self.parts = [part for part in re.split(r"(\{\w+\})", template) if part]
        slots = [part[1:-1] for part in self.parts if _is_slot(part)]
        unknown = sorted(set(slots) - set(self.SLOTS))
        valid = slots and _is_slot(self.parts[0]) and slots[-1] == "compression" and len(slots) == len(set(slots))
        if unknown or not valid:
            raise ValueError(
                f"invalid input layout {template!r}: start with a slot, use each of {{image}}, {{instruction}}, "
                f"{{text}} at most once and end with {{compression}}"
                + (f" (unknown slots {unknown})" if unknown else "")
            )
        if mode not in self.MODES:
            raise ValueError(f"invalid input layout {template!r}: mode must be one of {self.MODES}, got {mode!r}")
        if mode != "prompt" and (clean_space_newline or trailing_newline):
            raise ValueError(
                f"invalid input layout {template!r}: clean_space_newline and trailing_newline need mode "
                "'prompt' (they act on the joined prompt)"
            )
        if text_as_instruction and "instruction" not in slots:
            raise ValueError(f"invalid input layout {template!r}: text_as_instruction needs an {{instruction}} slot")
        self.mode = mode
        self.clean_space_newline = clean_space_newline
        self.trailing_newline = trailing_newline
        self.text_as_instruction = text_as_instruction

    @classmethod
    def from_spec(cls, spec: str | dict | InputLayout) -> InputLayout:
        """A layout from its saved form: a template string, or `{"template": …, **options}`."""
        if isinstance(spec, InputLayout):
            return spec
        if isinstance(spec, str):
            return cls(spec)
        if not isinstance(spec, dict) or "template" not in spec:
            raise ValueError(f"invalid input layout {spec!r}: expected a template string or a dict with 'template'")
        unknown = sorted(set(spec) - {"template", *cls.OPTIONS})
        if unknown:
            raise ValueError(f"invalid input layout {spec!r}: unknown options {unknown} (known: {cls.OPTIONS})")
        return cls(**spec)

    @property
    def spec(self) -> str | dict:
        """The saved form: the template alone when every option has its default, else a dict."""
        defaults = inspect.signature(type(self).__init__).parameters
        options = {name: getattr(self, name) for name in self.OPTIONS if getattr(self, name) != defaults[name].default}
        return {"template": self.template, **options} if options else self.template

    def slot_values(self, image: Any, instruction: str | None, text: str | None, compression: Any) -> dict[str, Any]:
        """The value of each slot for an input's parts (`text_as_instruction` applied)."""
        if self.text_as_instruction and instruction is None:
            instruction, text = text or "", None
        return {"image": image, "instruction": instruction, "text": text, "compression": compression}

    def pieces(self, values: dict[str, Any]) -> list[tuple[str, Any]]:
        """`(slot or "separator", value)` in order, for the slots present (non-empty `values`; in prompt mode an
        instruction is present whenever it is not `None`) and the separators between two present slots."""
        pieces: list[tuple[str, Any]] = []
        for position, part in enumerate(self.parts):
            if _is_slot(part):
                if self._present(part[1:-1], values):
                    pieces.append((part[1:-1], values[part[1:-1]]))
            elif self._present_on_both_sides(position, values):
                pieces.append(("separator", part))
        return pieces

    def _present(self, slot: str, values: dict[str, Any]) -> bool:
        value = values.get(slot)
        if slot == "instruction" and self.mode == "prompt":
            return value is not None  # a prompt starts from its instruction, empty or not
        return bool(value)

    def _present_on_both_sides(self, position: int, values: dict[str, Any]) -> bool:
        before, after = self.parts[position - 1 : position], self.parts[position + 1 : position + 2]
        return bool(
            before and after and self._present(before[0][1:-1], values) and self._present(after[0][1:-1], values)
        )


def _is_slot(part: str) -> bool:
    return part.startswith("{") and part.endswith("}")


def compression_token_names(count: int, token_format: str = COMPRESSION_TOKEN_FORMAT) -> list[str]:
    """The names of the `count` compression tokens, in order."""
    return [token_format.format(index=index) for index in range(count)]


# --------------------------------------------------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------------------------------------------------
@dataclass
class RenderedSample:
    """One sample as token ids, before padding.

    Attributes:
        input_ids: the whole sequence.
        labels: per-token targets (`-100` = no loss), or `None` for embedding inputs.
        pixel_values: `[num_patches, patch_dim]` of the sample's image, or `None`.
        image_grid_thw: `[1, 3]` grid of the sample's image, or `None`.
        dropped_turns: stage-1 QA turns left out because they did not fit in `max_length`.
        truncated_text_tokens: input-text tokens cut to fit in `max_length`.
    """

    input_ids: list[int]
    labels: list[int] | None = None
    pixel_values: torch.Tensor | None = None
    image_grid_thw: torch.Tensor | None = None
    dropped_turns: int = 0
    truncated_text_tokens: int = 0


class CoMaProcessor(ProcessorMixin):
    r"""Renders CoMa inputs (image, text, instruction, conversation) into model inputs; left padding.

    Args:
        image_processor: the backbone's image processor (Qwen2-VL's, shared by all supported families).
        tokenizer: the backbone's tokenizer, carrying the K compression tokens `<cmp_0>` … `<cmp_{K-1}>`.
        chat_template (`str`, *optional*): the backbone's chat template, kept for `apply_chat_template` users.
        num_compression_tokens (`int`, defaults to 32): K.
        compress_instruction (`str`): instruction between the stage-1 input and the compression tokens.
        query_instruction (`str`): the instruction of `encode_query` (and the sentence-transformers prompt `query`).
        document_instruction (`str`): the instruction of `encode_document` (and the sentence-transformers prompt
            `document`).
        loss_on (`str`, defaults to `"answers"`): stage-1 label positions: `"answers"` (answer tokens and their
            `<|im_end|>`, the paper) or `"all_after_compression"` (every token after the compression tokens, the
            released code).
        min_image_tokens / max_image_tokens (`int`, *optional*): bounds on visual tokens per image, given in tokens
            (one token covers `patch_size * merge_size` pixels per side: 28 for Qwen2/2.5-VL, 32 for Qwen3-VL).
            The paper uses 256–1024. `None` keeps the image processor's own bounds.
        compression_token_format (`str`, defaults to `"<cmp_{index}>"`): the name of compression token `index` (a
            checkpoint may carry other names, e.g. the released code's `<|ctoken_pad_{index}|>`).
        image_placeholder (`str`): regular expression of the image placeholders that mark where a text's image goes.
        compression_layout (`str`, defaults to `"{image}{text}\\n{instruction}{compression}"`): stage 1's input (the
            instruction is `compress_instruction`); see `InputLayout`.
        embedding_layout (`str` or `dict`, defaults to `"{image}{instruction}\\n{text}{compression}"`): a query's or
            a candidate's input; see `InputLayout` (a dict carries a layout's options).
        layouts (`dict`, *optional*): named layouts (name → template or dict) for inputs that name one
            (`{"layout": name}`): a checkpoint converted from the authors' release carries the rules their evaluation
            renders each MMEB dataset family and side with. An input that names none uses `embedding_layout`.
        enlarge_images_below (`int`, *optional*): an image with a side shorter than this many pixels is resized to
            `enlarged_image_size` × `enlarged_image_size` first (the release's evaluation: 28 → 56). `None`: never.
        enlarged_image_size (`int`, defaults to 56): see `enlarge_images_below`.
        apply_exif_orientation (`bool`, defaults to `True`): read image files upright (their EXIF orientation
            applied); the release's evaluation read them as stored.
        max_length (`int`, *optional*): longest sequence in tokens. The compression tokens are never cut: input
            text is truncated first; in stage 1, trailing QA turns that do not fit are dropped and counted, and a
            sample whose first answer cannot fit is an error naming the sample.
    """

    attributes = ["image_processor", "tokenizer"]
    # What `collate` puts in a batch for the model (stage 1 adds `labels`); the model and the trainers read these keys.
    model_input_names = list(MODEL_INPUT_NAMES)

    def __init__(
        self,
        image_processor=None,
        tokenizer=None,
        chat_template: str | None = None,
        num_compression_tokens: int = 32,
        compress_instruction: str = DEFAULT_COMPRESS_INSTRUCTION,
        query_instruction: str = DEFAULT_QUERY_INSTRUCTION,
        document_instruction: str = DEFAULT_DOCUMENT_INSTRUCTION,
        loss_on: str = "answers",
        min_image_tokens: int | None = None,
        max_image_tokens: int | None = None,
        max_length: int | None = None,
        compression_token_format: str = COMPRESSION_TOKEN_FORMAT,
        image_placeholder: str = IMAGE_PLACEHOLDER,
        compression_layout: str | dict = COMPRESSION_LAYOUT,
        embedding_layout: str | dict = EMBEDDING_LAYOUT,
        layouts: dict[str, str | dict] | None = None,
        enlarge_images_below: int | None = None,
        enlarged_image_size: int = ENLARGED_IMAGE_SIZE,
        apply_exif_orientation: bool = True,
        **kwargs,
    ):
        self.num_compression_tokens = num_compression_tokens
        self.compression_token_format = compression_token_format
        self.image_placeholder = image_placeholder
        self._placeholder = re.compile(image_placeholder)
        self.compression_layout = copy.deepcopy(compression_layout)  # saved as given; a dict must not be shared
        self.embedding_layout = copy.deepcopy(embedding_layout)
        self._compression_layout = InputLayout.from_spec(compression_layout)
        self._embedding_layout = InputLayout.from_spec(embedding_layout)
        self.layouts = copy.deepcopy(dict(layouts or {}))
        self._layouts = {name: InputLayout.from_spec(spec) for name, spec in self.layouts.items()}
        self.enlarge_images_below = enlarge_images_below
        self.enlarged_image_size = enlarged_image_size
        self.apply_exif_orientation = apply_exif_orientation
        self.compress_instruction = compress_instruction
        self.query_instruction = query_instruction
        self.document_instruction = document_instruction
        self.loss_on = loss_on
        self.min_image_tokens = min_image_tokens
        self.max_image_tokens = max_image_tokens
        self.max_length = max_length
        self._token_cache: dict[str, tuple[int, ...]] = {}  # see `_encode`
        super().__init__(image_processor, tokenizer, chat_template=chat_template, **kwargs)
        self._apply_image_token_bounds()
        self._special = self._special_token_ids()

    # ---- setup ------------------------------------------------------------------------------------------------------
    @property
    def loss_on(self) -> str:
        """Stage-1 label positions (one of `LOSS_ON_MODES`); checked whenever it is set."""
        return self.__dict__["loss_on"]

    @loss_on.setter
    def loss_on(self, value: str) -> None:
        if value not in LOSS_ON_MODES:
            raise ValueError(f"loss_on must be one of {LOSS_ON_MODES}, got {value!r}")
        self.__dict__["loss_on"] = value  # in the instance's dict, so `processor_config.json` saves it

    @property
    def pixels_per_token(self) -> int:
        return pixels_per_token(self.image_processor.patch_size, self.image_processor.merge_size)

    @property
    def compression_tokens(self) -> list[str]:
        return compression_token_names(self.num_compression_tokens, self.compression_token_format)

    @property
    def compression_token_ids(self) -> list[int]:
        return list(self._special["compression"])

    def with_settings(self, **settings) -> CoMaProcessor:
        """A new processor with the same tokenizer and image processor and this one's settings, `settings` replacing
        some of them (any `__init__` argument but the two parts), e.g. the layouts a converted release renders with."""
        names = [name for name in inspect.signature(type(self).__init__).parameters if name not in _NOT_SETTINGS]
        unknown = sorted(set(settings) - set(names))
        if unknown:
            raise TypeError(f"unknown processor settings {unknown}")
        current = {name: getattr(self, name) for name in names if hasattr(self, name)}
        return type(self)(self.image_processor, self.tokenizer, **{**current, **settings})

    def layout_named(self, name: str | None, sample: Any = None) -> InputLayout:
        """The layout an input names (`None`: `embedding_layout`); an unknown name is an error naming the sample."""
        if name is None:
            return self._embedding_layout
        try:
            return self._layouts[name]
        except KeyError:
            known = ", ".join(sorted(self._layouts)) or "none"
            raise CoMaInputError(
                f"the processor's config has no layout named {name!r} (it has: {known}); only a checkpoint converted "
                "from the authors' release carries their evaluation's layouts",
                sample,
                "layout",
            ) from None

    def _apply_image_token_bounds(self) -> None:
        """Translate token bounds into the pixel bounds the image processor understands.

        The bounds go on a copy: the image processor passed in may be shared (by another processor, or the caller).
        """
        if self.min_image_tokens is None and self.max_image_tokens is None:
            return
        self.image_processor = copy.deepcopy(self.image_processor)
        size = dict(self.image_processor.size or {})
        if self.min_image_tokens is not None:
            size["shortest_edge"] = self.min_image_tokens * self.pixels_per_token**2
        if self.max_image_tokens is not None:
            size["longest_edge"] = self.max_image_tokens * self.pixels_per_token**2
        self.image_processor.size = size
        for name, key in (("min_pixels", "shortest_edge"), ("max_pixels", "longest_edge")):
            if hasattr(self.image_processor, name) and key in size:
                setattr(self.image_processor, name, size[key])

    def _special_token_ids(self) -> dict:
        tokenizer = self.tokenizer
        names = {
            "im_start": "<|im_start|>",
            "im_end": "<|im_end|>",
            "vision_start": "<|vision_start|>",
            "vision_end": "<|vision_end|>",
            "image": "<|image_pad|>",
        }
        ids = {key: tokenizer.convert_tokens_to_ids(token) for key, token in names.items()}
        ids["compression"] = tokenizer.convert_tokens_to_ids(self.compression_tokens)
        unknown = tokenizer.unk_token_id
        missing = [
            names.get(key, key) for key, value in ids.items() if key != "compression" and value in (None, unknown)
        ]
        missing += [
            token
            for token, value in zip(self.compression_tokens, ids["compression"], strict=False)
            if value in (None, unknown)
        ]
        if missing:
            raise ValueError(
                f"The tokenizer lacks these CoMa tokens: {missing}. Build models with CoMaModel.from_backbone."
            )
        ids["pad"] = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else ids["im_end"]
        return ids

    # ---- pieces -----------------------------------------------------------------------------------------------------
    def _encode(self, text: str) -> list[int]:
        """Tokenize user text; special-token strings inside it stay plain text.

        Memoised: templates, instructions and many questions repeat, and tokenizer calls dominated rendering time.
        """
        if not text:
            return []
        ids = self._token_cache.get(text)
        if ids is None:
            if len(self._token_cache) >= 65536:
                self._token_cache.clear()
            ids = tuple(self.tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"])
            self._token_cache[text] = ids
        return list(ids)

    def _image_block(self, image: Any, sample: Any) -> tuple[list[int], torch.Tensor, torch.Tensor]:
        """Vision tokens for one image, with its pixel patches and grid."""
        picture = fit_aspect_ratio(
            load_image(
                image,
                sample=sample,
                upright=self.apply_exif_orientation,
                enlarge_below=self.enlarge_images_below,
                enlarged_size=self.enlarged_image_size,
            )
        )
        try:
            features = self.image_processor(images=[picture], return_tensors="pt")
        except ValueError as error:  # an image the backbone's processor refuses for another reason
            raise CoMaInputError(f"cannot process image: {error}", sample, "image") from error
        grid = features["image_grid_thw"]
        num_tokens = int(grid.prod()) // self.image_processor.merge_size**2
        ids = [self._special["vision_start"]] + [self._special["image"]] * num_tokens + [self._special["vision_end"]]
        return ids, features["pixel_values"], grid

    def _turn(self, question: str, answer: str | None) -> tuple[list[int], list[bool]]:
        """`<|im_start|>user\\n{Q}<|im_end|>\\n<|im_start|>assistant\\n{A}<|im_end|>\\n` and a per-token answer
        flag."""
        special = self._special
        prompt = (
            [special["im_start"]]
            + self._encode("user\n")
            + self._encode(question)
            + [special["im_end"]]
            + self._encode("\n")
            + [special["im_start"]]
            + self._encode("assistant\n")
        )
        if answer is None:
            return prompt, [False] * len(prompt)
        reply = self._encode(answer) + [special["im_end"]]
        tail = self._encode("\n")
        return prompt + reply + tail, [False] * len(prompt) + [True] * len(reply) + [False] * len(tail)

    def _text_room(self, fixed: int, reserve: int, sample: Any, field_name: str) -> int | None:
        """Tokens left for the text beside `fixed` tokens and `reserve` after them (`None`: no `max_length`); an
        error naming the sample and `field_name` when even no text leaves too little room."""
        if self.max_length is None:
            return None
        if fixed + reserve > self.max_length:
            raise CoMaInputError(self._no_room(fixed, reserve), sample, field_name)
        return self.max_length - fixed - reserve

    def _render_layout(
        self, layout: InputLayout, values: dict[str, Any], sample: Any, reserve: int = 0
    ) -> tuple[list[int], int]:
        """Token ids of `values` in `layout` and the text tokens cut so that they, and `reserve` tokens after them
        (stage 1's first QA turn), fit in `max_length`. Only the text gives way; if even no text leaves too little
        room, it is an error naming the sample."""
        if layout.mode == "prompt":
            return self._render_prompt(layout, values, sample, reserve)
        segments: list[list[int]] = []  # token ids per piece; the text's is the one at `text_index`
        text_index, words = None, ""
        for slot, value in layout.pieces(values):
            if slot in ("instruction", "separator"):
                words += value  # tokenized as one piece, as the instruction and its separators always were
                continue
            if words:
                segments.append(self._encode(words))
                words = ""
            if slot == "text":
                text_index = len(segments)
            segments.append(self._encode(value) if slot == "text" else list(value))
        if words:
            segments.append(self._encode(words))
        return self._fit_text(segments, text_index, values, sample, reserve)

    def _render_prompt(
        self, layout: InputLayout, values: dict[str, Any], sample: Any, reserve: int = 0
    ) -> tuple[list[int], int]:
        """`_render_layout` for a prompt-mode layout: the text between the vision block and the compression tokens is
        joined into stretches of prompt text, each cleaned as the layout says once it is complete, the last one then
        given the trailing newline (with K = 0 too, where nothing follows it), and each tokenized at once as a stock
        processor tokenizes a prompt. To fit `max_length`, the stretch holding the text loses its last tokens, before
        the trailing newline is added (which is then tokenized on its own)."""
        segments: list[list[int] | str] = []  # token ids (the vision block) or stretches of prompt text
        text_index = None
        for slot, value in layout.pieces(values):
            if slot == "compression":  # always the last slot
                break
            if slot == "image":
                _finish_stretch(segments, layout)
                segments.append(list(value))
                continue
            _append_text(segments, value)
            if slot == "text":
                text_index = len(segments) - 1
        _finish_stretch(segments, layout)
        newline = "\n" if layout.trailing_newline else ""  # after the clean-up, as the release writes it
        ends_in_text = bool(segments) and isinstance(segments[-1], str)
        compression = list(values["compression"])
        if ends_in_text:
            segments[-1] += newline
        elif newline:
            segments.append(newline)
        pieces = [self._encode(piece) if isinstance(piece, str) else piece for piece in segments]
        ids, cut = self._fit_text([*pieces, compression], text_index, values, sample, reserve)
        if not cut or not newline or not ends_in_text or text_index != len(segments) - 1:
            return ids, cut
        # the text's stretch was cut: cut it without the newline, which then follows it as its own tokens
        pieces[text_index] = self._encode(segments[text_index][: -len(newline)])
        return self._fit_text([*pieces, self._encode(newline), compression], text_index, values, sample, reserve)

    def _fit_text(
        self, pieces: list[list[int]], text_index: int | None, values: dict[str, Any], sample: Any, reserve: int
    ) -> tuple[list[int], int]:
        """`pieces` joined, the one at `text_index` (the text, or the prompt stretch holding it) cut from its end so
        that all of them and `reserve` tokens after them fit in `max_length`; returns the ids and the tokens cut. An
        error naming the sample when the other pieces alone leave too little room."""
        fixed = sum(len(piece) for index, piece in enumerate(pieces) if index != text_index)
        room = self._text_room(fixed, reserve, sample, _blamed_field(values, reserve))
        cut = 0
        if text_index is not None:
            pieces = list(pieces)
            pieces[text_index], cut = _truncate_tail([pieces[text_index]], room)
        return [token for piece in pieces for token in piece], cut

    def _no_room(self, fixed: int, reserve: int) -> str:
        if reserve:
            return (
                f"the first question and answer cannot fit: image, instruction and compression tokens take {fixed} "
                f"tokens and the first turn {reserve}, more than max_length={self.max_length}"
            )
        return (
            f"the image, instruction and compression tokens take {fixed} tokens, "
            f"more than max_length={self.max_length}"
        )

    # ---- stage 2 ----------------------------------------------------------------------------------------------------
    def render_embedding_input(
        self,
        text: str | None = None,
        image: Any = None,
        instruction: str | None = None,
        sample: Any = None,
        layout: str | None = None,
    ) -> RenderedSample:
        """Render one query or candidate in `embedding_layout` (by default `[image]{instruction}\\n{text}<cmp_0>…`)
        or in the named `layout` of the processor's config, or — in a parts-mode layout — when `text` carries an
        image placeholder, as the text with the image at the placeholder, then `<cmp_0>…`. A prompt-mode layout drops
        the placeholders from the instruction and the text (see `InputLayout`).
        """
        chosen = self.layout_named(layout, sample)
        text = text or ""
        if chosen.mode == "prompt":  # a prompt has no place for a placeholder: dropped, as the release's parsers do
            text = without_image_placeholders(text, self._placeholder)
            if instruction is not None:
                instruction = without_image_placeholders(instruction, self._placeholder)
        # without an image the placeholders are removed: a text of nothing else is empty
        if image is None and not self._placeholder.sub("", text).strip():
            raise CoMaInputError("empty text is allowed only together with an image", sample, "text")
        pixel_values = grid = None
        vision: list[int] = []
        if image is not None:
            vision, pixel_values, grid = self._image_block(image, sample)
        compression = self.compression_token_ids
        if chosen.mode == "prompt":  # instruction and text joined as given, as a stock processor's prompt
            values = chosen.slot_values(vision, instruction, text, compression)
            ids, cut = self._render_layout(chosen, values, sample)
            return RenderedSample(ids, None, pixel_values, grid, truncated_text_tokens=cut)

        match = self._placeholder.search(text)
        if match and image is not None:  # MMEB rows carry their instruction and the image's place
            before, after = self._encode(text[: match.start()]), self._encode(text[match.end() :])
            room = self._text_room(len(vision) + len(compression), 0, sample, "image")
            before, after, cut = _truncate_tail([before, after], room)
            ids = before + vision + after + compression
        else:
            text = self._placeholder.sub("", text) if match else text
            values = chosen.slot_values(vision, instruction, text, compression)
            ids, cut = self._render_layout(chosen, values, sample)
        return RenderedSample(ids, None, pixel_values, grid, truncated_text_tokens=cut)

    # ---- stage 1 ----------------------------------------------------------------------------------------------------
    def render_compression_sample(
        self,
        image: Any = None,
        text: str | None = None,
        conversation: Sequence[dict] = (),
        sample: Any = None,
    ) -> RenderedSample:
        """Render one stage-1 sample; `conversation` is a list of `{"question": …, "answer": …}` turns (≥ 1).

        Labels cover the answers and their `<|im_end|>` (`self.loss_on == "answers"`), or every token after the
        compression tokens (`"all_after_compression"`).
        """
        if not (text or "").strip() and image is None:
            raise CoMaInputError("empty text is allowed only together with an image", sample, "text")
        turns = [self._checked_turn(turn, index, sample) for index, turn in enumerate(conversation or ())]
        if not turns:
            raise CoMaInputError("the conversation has no question/answer turn", sample, "conversation")

        prefix = self.render_compression_input(image, text, sample=sample, reserve=len(turns[0][0]))
        ids, answer_flags = list(prefix.input_ids), [False] * len(prefix.input_ids)
        kept = 0
        for turn_ids, flags in turns:
            if self.max_length is not None and len(ids) + len(turn_ids) > self.max_length:
                break
            ids += turn_ids
            answer_flags += flags
            kept += 1
        if self.loss_on == "answers":
            labels = [token if flag else IGNORE_INDEX for token, flag in zip(ids, answer_flags, strict=False)]
        else:
            labels = [IGNORE_INDEX] * len(prefix.input_ids) + ids[len(prefix.input_ids) :]
        prefix.input_ids, prefix.labels, prefix.dropped_turns = ids, labels, len(turns) - kept
        return prefix

    def render_compression_input(
        self, image: Any = None, text: str | None = None, sample: Any = None, reserve: int = 0
    ) -> RenderedSample:
        """The stage-1 input alone, in `compression_layout` (by default `[image]{text}\n{compress_instruction}<cmp…`):
        what `compress` takes to answer questions as in stage 1. `reserve` keeps that many tokens free after it (the
        first QA turn): the text is truncated for them, and if even the empty text leaves too little room it is an
        error."""
        text = self._placeholder.sub("", text or "").strip()
        if not text and image is None:
            raise CoMaInputError("empty text is allowed only together with an image", sample, "text")
        pixel_values = grid = None
        vision: list[int] = []
        if image is not None:
            vision, pixel_values, grid = self._image_block(image, sample)
        values = {
            "image": vision,
            "instruction": self.compress_instruction,
            "text": text,
            "compression": self.compression_token_ids,
        }
        ids, cut = self._render_layout(self._compression_layout, values, sample, reserve)
        return RenderedSample(ids, None, pixel_values, grid, truncated_text_tokens=cut)

    def _checked_turn(self, turn: Any, index: int, sample: Any) -> tuple[list[int], list[bool]]:
        if isinstance(turn, dict):
            question, answer = turn.get("question"), turn.get("answer")
        elif isinstance(turn, (tuple, list)) and len(turn) == 2:
            question, answer = turn
        else:
            raise CoMaInputError(f"turn {index} must be a {{'question', 'answer'}} dict", sample, "conversation")
        for name, value in (("question", question), ("answer", answer)):
            if not isinstance(value, str) or not value.strip():
                raise CoMaInputError(f"turn {index} has an empty or missing {name}", sample, "conversation")
        return self._turn(question, answer)

    def render_question(self, question: str) -> list[int]:
        """`<|im_start|>user\\n{Q}<|im_end|>\\n<|im_start|>assistant\\n`: what follows the compression tokens
        when asking."""
        return self._turn(question, None)[0]

    # ---- batching ---------------------------------------------------------------------------------------------------
    def collate(self, samples: Sequence[RenderedSample]) -> BatchFeature:
        """Left-pad rendered samples into a batch.

        Returns a `BatchFeature` with `input_ids`, `attention_mask`, `mm_token_type_ids` `[batch, length]`,
        `labels` when the samples have them, and `pixel_values` `[patches, patch_dim]` / `image_grid_thw`
        `[images, 3]` (images in sample order) when any sample has an image.
        """
        length = max(len(sample.input_ids) for sample in samples)
        pad = self._special["pad"]
        input_ids = torch.full((len(samples), length), pad, dtype=torch.long)
        attention_mask = torch.zeros((len(samples), length), dtype=torch.long)
        with_labels = all(sample.labels is not None for sample in samples)
        labels = torch.full((len(samples), length), IGNORE_INDEX, dtype=torch.long) if with_labels else None
        for row, sample in enumerate(samples):
            start = length - len(sample.input_ids)
            input_ids[row, start:] = torch.tensor(sample.input_ids, dtype=torch.long)
            attention_mask[row, start:] = 1
            if labels is not None:
                labels[row, start:] = torch.tensor(sample.labels, dtype=torch.long)
        batch = {
            BatchKey.INPUT_IDS: input_ids,
            BatchKey.ATTENTION_MASK: attention_mask,
            BatchKey.IMAGE_TOKENS: (input_ids == self._special["image"]).to(torch.int32),
        }
        if labels is not None:
            batch[BatchKey.LABELS] = labels
        images = [sample for sample in samples if sample.pixel_values is not None]
        if images:
            batch[BatchKey.PIXEL_VALUES] = torch.cat([sample.pixel_values for sample in images])
            batch[BatchKey.IMAGE_GRID] = torch.cat([sample.image_grid_thw for sample in images])
        return BatchFeature(batch)

    def process_for_embedding(
        self, inputs: Sequence[Any], instruction: str | None = None, offset: int = 0
    ) -> BatchFeature:
        """Render and pad a list of embedding inputs.

        Each input is a text (`str`), an image (a PIL image), or a dict `{"image": …, "text": …, "instruction": …}`
        whose `image` may be a PIL image or a path. A bare string is always text here; only the dict form
        makes a string an image. `offset` numbers samples in error messages.
        """
        rendered = [
            self._render(split_input(item, sample=offset + index), instruction, sample=offset + index)
            for index, item in enumerate(inputs)
        ]
        return self.collate(rendered)

    def _render(self, item: EmbeddingInput, instruction: str | None, sample: Any) -> RenderedSample:
        """`item` rendered, with `instruction` when it carries none of its own."""
        own = item.instruction if item.instruction is not None else instruction
        return self.render_embedding_input(item.text, item.image, own, sample=sample, layout=item.layout)

    def process_for_compression(self, samples: Sequence[dict], offset: int = 0) -> BatchFeature:
        """Render and pad stage-1 samples (`{"image", "text", "conversation"}` dicts); dropped turns are logged."""
        rendered = [
            self.render_compression_sample(
                sample.get("image"), sample.get("text"), sample.get("conversation", ()), sample=offset + index
            )
            for index, sample in enumerate(samples)
        ]
        dropped = sum(sample.dropped_turns for sample in rendered)
        if dropped:
            logger.warning("Dropped %d QA turns that did not fit in max_length=%s", dropped, self.max_length)
        return self.collate(rendered)

    def process_compression_inputs(self, samples: Sequence[dict], offset: int = 0) -> BatchFeature:
        """Render and pad stage-1 inputs without their conversations (`{"image", "text"}` dicts), for `compress`."""
        return self.collate(
            [
                self.render_compression_input(sample.get("image"), sample.get("text"), sample=offset + index)
                for index, sample in enumerate(samples)
            ]
        )

    def process_questions(self, questions: Sequence[str]) -> BatchFeature:
        """Left-padded question prompts (`input_ids`, `attention_mask`) for `generate_from_compression`."""
        rendered = [RenderedSample(self.render_question(question)) for question in questions]
        batch = self.collate(rendered)
        return BatchFeature({key: batch[key] for key in (BatchKey.INPUT_IDS, BatchKey.ATTENTION_MASK)})

    def __call__(self, images=None, text=None, instruction: str | None = None, **kwargs) -> BatchFeature:
        """Embedding inputs from parallel lists of `images` and/or `text` (either may be `None` or hold `None`s)."""
        images = _as_list(images)
        text = _as_list(text)
        count = max(len(images), len(text))
        images = images or [None] * count
        text = text or [None] * count
        if len(images) != len(text):
            raise ValueError(f"got {len(images)} images and {len(text)} texts; pass lists of equal length")
        return self.process_for_embedding(
            [{"image": image, "text": item} for image, item in zip(images, text, strict=False)],
            instruction=instruction,
        )

    def apply_chat_template(
        self,
        conversation: list[dict] | list[list[dict]],
        chat_template: str | None = None,
        tokenize: bool = False,
        return_dict: bool = False,
        **kwargs,
    ) -> BatchFeature | list[str] | str:
        """Render chat messages as embedding inputs: how sentence-transformers' `Transformer` module feeds CoMa.

        One conversation is `[{"role": "system", "content": instruction}, {"role": "user", "content": …}]`, the
        system message optional; content is a string or a list of `{"type": "text", "text": …}` and
        `{"type": "image", "image": …}` items (at most one image). The system message goes to CoMa's instruction
        slot (that is where sentence-transformers puts a prompt such as `prompt_name="query"`), so rendering
        matches `process_for_embedding` exactly; `chat_template` and sentence-transformers' tokenizer and
        truncation keywords are ignored (`max_length` is the processor's own).

        Returns the padded `BatchFeature` when `tokenize=True`, else the rendered text of each conversation.
        """
        batched = bool(conversation) and isinstance(conversation[0], (list, tuple))
        conversations = conversation if batched else [conversation]
        inputs = [message_input(messages, index) for index, messages in enumerate(conversations)]
        try:
            rendered = [self._render(item, None, sample=index) for index, item in enumerate(inputs)]
        except CoMaInputError as error:  # sentence-transformers reorders inputs: name it by content, not position
            position = error.position_in(inputs)
            if position is None:
                raise
            raise CoMaInputError(error.reason, inputs[position].describe(), error.field) from error
        if not tokenize:
            texts = [self.tokenizer.decode(sample.input_ids) for sample in rendered]
            return texts if batched else texts[0]
        batch = self.collate(rendered)
        if BatchKey.PIXEL_VALUES in batch:  # sentence-transformers' GradCache cuts image rows per sample by it
            batch[BatchKey.IMAGES_PER_SAMPLE] = torch.tensor([int(item.image is not None) for item in inputs])
        return batch

    def batch_decode(self, *args, **kwargs):
        return self.tokenizer.batch_decode(*args, **kwargs)

    def decode(self, *args, **kwargs):
        return self.tokenizer.decode(*args, **kwargs)


def sample_contents(batch: Any) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
    """Each row's own content in a batch `collate` made: its tokens without padding `[length]` and its image's pixel
    patches `[patches, patch_dim]` (`None` for a row without an image)."""
    input_ids, attention_mask = batch[BatchKey.INPUT_IDS], batch.get(BatchKey.ATTENTION_MASK)
    tokens = (
        list(input_ids)
        if attention_mask is None
        else [ids[mask.bool()] for ids, mask in zip(input_ids, attention_mask, strict=True)]
    )
    pixels: list[torch.Tensor | None] = [None] * len(tokens)
    if BatchKey.PIXEL_VALUES in batch:
        counts = batch.get(BatchKey.IMAGES_PER_SAMPLE)
        if counts is None:
            counts = batch[BatchKey.IMAGE_TOKENS].any(dim=1).long()
        patches = torch.split(batch[BatchKey.PIXEL_VALUES], batch[BatchKey.IMAGE_GRID].prod(dim=1).tolist())
        rows = [row for row, count in enumerate(counts.tolist()) if count]  # images are in row order
        for row, image in zip(rows, patches, strict=True):
            pixels[row] = image
    return list(zip(tokens, pixels, strict=True))


def _finish_stretch(segments: list, layout: InputLayout) -> None:
    """Clean the stretch of prompt text that ends `segments`, now complete, as `layout` asks (" \\n" → "\\n")."""
    if segments and isinstance(segments[-1], str) and layout.clean_space_newline:
        segments[-1] = segments[-1].replace(" \n", "\n")


def _append_text(segments: list, text: str) -> None:
    """Add `text` to the prompt text at the end of `segments`, or start a new stretch after token ids."""
    if segments and isinstance(segments[-1], str):
        segments[-1] += text
    else:
        segments.append(text)


def _as_list(value) -> list:
    if value is None:
        return []
    if isinstance(value, (list, tuple)):
        return list(value)
    return [value]


def _blamed_field(values: dict[str, Any], reserve: int) -> str:
    """The field named when an input's fixed parts leave no room: the first QA turn, else the image (the largest
    fixed part), else the instruction."""
    return "conversation" if reserve else "image" if values.get("image") else "instruction"


def _truncate_tail(pieces: list[list[int]], budget: int | None) -> tuple[list[int], ...]:
    """Cut tokens from the end of the last pieces first so their total fits `budget`; returns pieces and the cut."""
    pieces = [list(piece) for piece in pieces]
    total = sum(len(piece) for piece in pieces)
    cut = 0 if budget is None else max(0, total - budget)
    remaining = cut
    for piece in reversed(pieces):
        take = min(remaining, len(piece))
        if take:
            del piece[len(piece) - take :]
        remaining -= take
    return (*pieces, cut)
