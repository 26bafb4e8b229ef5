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
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image
from transformers import BatchFeature
from transformers.processing_utils import ProcessorMixin

from .backbones import image_processor_class, pixels_per_token
from .constants_coma import (
    COMPRESSION_LAYOUT,
    COMPRESSION_TOKEN_FORMAT,
    DEFAULT_COMPRESS_INSTRUCTION,
    DEFAULT_DOCUMENT_INSTRUCTION,
    DEFAULT_QUERY_INSTRUCTION,
    EMBEDDING_LAYOUT,
    IGNORE_INDEX,
    IMAGE_PLACEHOLDER,
    LOSS_ON_MODES,
    MODEL_INPUT_NAMES,
    BatchKey,
    compression_token_names,
)
from .inputs import (
    ENLARGED_IMAGE_SIZE,
    CoMaInputError,
    fit_aspect_ratio,
    load_image,
    split_input,
)
from .layout_coma import InputLayout, RenderedSample
from .rendering_coma import CoMaRenderingMixin

logger = logging.getLogger(__name__)

_NOT_SETTINGS = ("self", "image_processor", "tokenizer", "kwargs")  # `__init__` arguments that are not settings


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


# Kept at about 330 lines: 48 are the docstring of its 20 settings; the renderers are rendering_coma's.
class CoMaProcessor(CoMaRenderingMixin, ProcessorMixin):
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
            `<|im_end|>`) or `"all_after_compression"` (every token after the compression tokens: compatibility with
            the authors' release). The method's value is `"answers"`.
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
            `enlarged_image_size` × `enlarged_image_size` first. 28 (→ 56): compatibility with the authors'
            release (their evaluation); the method's value is `None` (never).
        enlarged_image_size (`int`, defaults to 56): see `enlarge_images_below`.
        apply_exif_orientation (`bool`, defaults to `True`): read image files upright (their EXIF orientation
            applied). `False`: compatibility with the authors' release (their evaluation read files as stored);
            the method's value is `True`.
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

    def prepare_image(self, image: Any, sample: Any = None) -> Image.Image:
        """The picture the backbone's image processor is given for `image` (a PIL image, a path, bytes…): decoded,
        upright and enlarged when tiny as the image settings say, its aspect ratio bounded. What a server that runs
        the stock image processor (vLLM's `multi_modal_data`) must be sent."""
        picture = load_image(
            image,
            sample=sample,
            upright=self.apply_exif_orientation,
            enlarge_below=self.enlarge_images_below,
            enlarged_size=self.enlarged_image_size,
        )
        return fit_aspect_ratio(picture)

    def _image_block(self, image: Any, sample: Any) -> tuple[list[int], torch.Tensor, torch.Tensor]:
        """Vision tokens for one image, with its pixel patches and grid."""
        picture = self.prepare_image(image, sample)
        try:
            features = self.image_processor(images=[picture], return_tensors="pt")
        except ValueError as error:  # an image the backbone's processor refuses for another reason
            raise CoMaInputError(f"cannot process image: {error}", sample, "image") from error
        grid = features["image_grid_thw"]
        num_tokens = int(grid.prod()) // self.image_processor.merge_size**2
        ids = [self._special["vision_start"]] + [self._special["image"]] * num_tokens + [self._special["vision_end"]]
        return ids, features["pixel_values"], grid

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

    def process_embedding_inputs(
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

    def process_qa_samples(self, samples: Sequence[dict], offset: int = 0) -> BatchFeature:
        """Render and pad stage-1 samples (`{"image", "text", "conversation"}` dicts); dropped turns are logged."""
        rendered = [
            self.render_qa_sample(
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
        return self.process_embedding_inputs(
            [{"image": image, "text": item} for image, item in zip(images, text, strict=False)],
            instruction=instruction,
        )

    # ---- the names before 0.2.0, kept for one release ------------------------------------------------------------
    def process_for_embedding(self, *args, **kwargs) -> BatchFeature:
        """Deprecated alias of `process_embedding_inputs`; removed in 0.3.0."""
        _renamed("process_for_embedding", "process_embedding_inputs")
        return self.process_embedding_inputs(*args, **kwargs)

    def process_for_compression(self, *args, **kwargs) -> BatchFeature:
        """Deprecated alias of `process_qa_samples`; removed in 0.3.0."""
        _renamed("process_for_compression", "process_qa_samples")
        return self.process_qa_samples(*args, **kwargs)

    def render_compression_sample(self, *args, **kwargs) -> RenderedSample:
        """Deprecated alias of `render_qa_sample`; removed in 0.3.0."""
        _renamed("render_compression_sample", "render_qa_sample")
        return self.render_qa_sample(*args, **kwargs)

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


def _as_list(value) -> list:
    if value is None:
        return []
    if isinstance(value, (list, tuple)):
        return list(value)
    return [value]


# Processor methods renamed in 0.2.0 → their old names: a checkpoint saved before then loads its processor through its
# own remote code, which has only the old ones.
PREVIOUS_NAMES = {
    "process_embedding_inputs": "process_for_embedding",
    "process_qa_samples": "process_for_compression",
    "render_qa_sample": "render_compression_sample",
}


def processor_method(processor: Any, name: str) -> Any:
    """`processor.<name>`, or its name before 0.2.0 on a processor whose remote code predates the rename."""
    method = getattr(processor, name, None)
    return method if method is not None else getattr(processor, PREVIOUS_NAMES[name])


def _renamed(old: str, new: str) -> None:
    message = f"CoMaProcessor.{old} is renamed {new}; the old name goes in 0.3.0"
    warnings.warn(message, DeprecationWarning, stacklevel=3)
