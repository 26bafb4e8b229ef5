"""Property-based tests of the public rendering and encoding API (issue 27 §1): `render_embedding_input`,
`render_qa_sample`, `process_embedding_inputs`, `process_qa_samples` and `encode` / `encode_text` /
`encode_images`, on generated inputs — arbitrary Unicode with special-token strings, placeholders and compression-token
names mixed in, empty and whitespace-only texts, images of 1..1024 px at any aspect ratio in modes RGB, RGBA, L, P,
CMYK and I;16, any `max_length` from K + 1 up, K in {0, 1, 8, 64}.

The oracles read only the documented layout (DESIGN.md, `InputLayout`'s table) and the tokenizer itself, never the
renderer's helpers, so that they hold the processor to its contract while it is reshaped. Every test states its example
count; the Hypothesis profile (derandomized, no example database) is registered in `conftest.py`. The contrastive
loss has its own file, `test_properties_loss.py`.
"""

from __future__ import annotations

import functools
import re

import pytest
import torch
from hypothesis import event, given, note, settings
from hypothesis import strategies as st
from PIL import Image

from coma_hf import CoMaInputError
from coma_hf.processing_coma import IGNORE_INDEX, CoMaProcessor

from utils import tiny_coma

KS = (0, 1, 8, 64)  # 0: VLM2Vec-style, the last input token pooled
# Strings that are special tokens (or image placeholders) of the layout; inside user text they must stay text.
SPECIAL_STRINGS = (
    "<|im_start|>",
    "<|im_end|>",
    "<|image_pad|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|endoftext|>",
    "<|image_1|>",
    "<image>",
    "<cmp_0>",  # a compression-token name whatever K (with K = 0 it is no token of the tokenizer)
)
WHITESPACE = ("", " ", "  ", "\n", "\t", " \n ", "\r\n", "\u3000")
IMAGE_MODES = ("RGB", "RGBA", "L", "P", "CMYK", "I;16")
PALETTE = [(index * 37 + channel * 91) % 256 for index in range(256) for channel in range(3)]
SAMPLE = 5  # the sample id handed to the renderer: every error must name it


# --------------------------------------------------------------------------------------------------------------------
# Models and processors, built once per K (and per setting)
# --------------------------------------------------------------------------------------------------------------------
def _model(k: int):
    return tiny_coma(num_compression_tokens=k)[0]


@functools.cache
def _processor(k: int, max_length: int | None, loss_on: str = "answers") -> CoMaProcessor:
    """The tiny model's processor for K = `k` with `max_length` and `loss_on` (a copy: the cached one is shared)."""
    return tiny_coma(num_compression_tokens=k)[1].with_settings(max_length=max_length, loss_on=loss_on)


# --------------------------------------------------------------------------------------------------------------------
# Strategies
# --------------------------------------------------------------------------------------------------------------------
def texts(processor: CoMaProcessor, max_pieces: int = 6, max_piece: int = 12) -> st.SearchStrategy[str]:
    """Unicode text with special-token strings, the processor's compression-token names and whitespace mixed in;
    empty and whitespace-only texts among them."""
    specials = st.sampled_from(SPECIAL_STRINGS + tuple(processor.compression_tokens))
    piece = st.one_of(st.text(max_size=max_piece), specials, st.sampled_from(WHITESPACE))
    return st.lists(piece, max_size=max_pieces).map("".join)


def nonblank_texts(processor: CoMaProcessor, **sizes) -> st.SearchStrategy[str]:
    """`texts` with a visible character added (a valid question, answer or text)."""
    visible = st.characters(categories=["L", "N", "P", "S"], exclude_characters="<>")  # never part of a placeholder
    return st.tuples(texts(processor, **sizes), visible, texts(processor, **sizes)).map("".join)


def long_texts(processor: CoMaProcessor) -> st.SearchStrategy[str]:
    """`nonblank_texts` repeated up to 40 times: texts that `max_length` cuts."""
    return st.tuples(nonblank_texts(processor), st.integers(2, 40)).map(lambda repeated: repeated[0] * repeated[1])


def placeholder_texts(processor: CoMaProcessor) -> st.SearchStrategy[str]:
    """Texts with an image placeholder (`<|image_1|>` as in MMEB, `<image>` as in LLaVA) somewhere, some long."""
    placeholder = st.sampled_from(["<|image_1|>", "<image>"])
    around = st.one_of(texts(processor), long_texts(processor))
    return st.tuples(around, placeholder, around).map("".join)


def mostly(common: st.SearchStrategy, rare: st.SearchStrategy) -> st.SearchStrategy:
    """`rare` about one time in ten (Hypothesis favours the ends of an integer range, so a sampled list it is)."""
    return st.sampled_from([False] * 9 + [True]).flatmap(lambda use_rare: rare if use_rare else common)


def _colours(mode: str) -> st.SearchStrategy:
    channel = st.integers(0, 255)
    if mode in ("L", "P"):
        return channel
    if mode == "I;16":
        return st.integers(0, 65535)
    return st.tuples(*[channel] * len(mode))  # RGB, RGBA, CMYK


# Small sides first, so that the largest images stay rare (one of 1024 × 1024 px still renders in tens of ms).
SIDES = st.one_of(st.integers(1, 64), st.integers(1, 1024))


@st.composite
def images(draw, sides: st.SearchStrategy[int] = SIDES) -> Image.Image:
    """A two-colour image (cheap pixels) of any size and aspect ratio in one of `IMAGE_MODES`."""
    mode = draw(st.sampled_from(IMAGE_MODES))
    width, height = draw(sides), draw(sides)
    image = Image.new(mode, (width, height), draw(_colours(mode)))
    if mode == "P":
        image.putpalette(PALETTE)
    image.paste(draw(_colours(mode)), (0, 0, max(1, width // 2), height))
    return image


def turns(processor: CoMaProcessor, valid: bool = False) -> st.SearchStrategy[dict]:
    """A stage-1 QA turn; unless `valid`, one in ten may have a blank question or answer."""
    part = nonblank_texts(processor, max_pieces=3)
    if not valid:
        part = mostly(part, texts(processor, max_pieces=2))
    return st.fixed_dictionaries({"question": part, "answer": part})


# --------------------------------------------------------------------------------------------------------------------
# Oracles: the documented layout, and the tokenizer used directly
# --------------------------------------------------------------------------------------------------------------------
def _tokens(processor: CoMaProcessor, text: str) -> list[int]:
    """`text` as user text: tokenized on its own, special-token strings split (never special ids)."""
    if not text:
        return []
    return processor.tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]


def _id(processor: CoMaProcessor, token: str) -> int:
    return processor.tokenizer.convert_tokens_to_ids(token)


def _image_tokens(processor: CoMaProcessor, rendered) -> int:
    """The number of `<|image_pad|>` tokens of a rendered sample's image (0 without one), from its grid."""
    if rendered.image_grid_thw is None:
        return 0
    return int(rendered.image_grid_thw.prod()) // processor.image_processor.merge_size**2


def _without_placeholders(processor: CoMaProcessor, text: str | None) -> str:
    return re.sub(processor.image_placeholder, "", text or "")


def _vision(image_tokens: int) -> str:
    return f"<|vision_start|>{'<|image_pad|>' * image_tokens}<|vision_end|>" if image_tokens else ""


def _turn_text(turn: dict) -> str:
    return f"<|im_start|>user\n{turn['question']}<|im_end|>\n<|im_start|>assistant\n{turn['answer']}<|im_end|>\n"


def _expected_embedding_text(processor, text, image_tokens, instruction) -> str:
    """The stage-2 rendering as a string (DESIGN.md; `InputLayout`'s parts mode): `[V]{instruction}\\n{text}<cmp…>`,
    a separator only between two present parts; a text with a placeholder and an image gets the image at its first
    placeholder and no instruction; without an image the placeholders are removed."""
    compression = "".join(processor.compression_tokens)
    match = re.search(processor.image_placeholder, text or "")
    if match and image_tokens:
        return text[: match.start()] + _vision(image_tokens) + text[match.end() :] + compression
    text = _without_placeholders(processor, text)
    separator = "\n" if instruction and text else ""
    return _vision(image_tokens) + (instruction or "") + separator + text + compression


def _expected_compression_text(processor, text, image_tokens, conversation) -> str:
    """The stage-1 rendering as a string (DESIGN.md): `[V]{text}\\n{compress_instruction}<cmp…>` then the turns."""
    text = _without_placeholders(processor, text).strip()
    prefix = _vision(image_tokens) + text + ("\n" if text else "") + processor.compress_instruction
    return prefix + "".join(processor.compression_tokens) + "".join(_turn_text(turn) for turn in conversation)


def _special_counts(processor: CoMaProcessor, image_tokens: int, turns_kept: int = 0) -> dict[int, int]:
    """How often the layout writes each special token (every added token of the tokenizer; absent ones 0)."""
    counts = dict.fromkeys(processor.tokenizer.get_added_vocab().values(), 0)
    counts.update(dict.fromkeys(processor.compression_token_ids, 1))
    if image_tokens:
        counts[_id(processor, "<|vision_start|>")] = counts[_id(processor, "<|vision_end|>")] = 1
        counts[_id(processor, "<|image_pad|>")] = image_tokens
    counts[_id(processor, "<|im_start|>")] = counts[_id(processor, "<|im_end|>")] = 2 * turns_kept
    return counts


def _check_layout(processor: CoMaProcessor, ids: list[int], image_tokens: int, turns_kept: int = 0) -> None:
    """Special tokens exactly as often as the layout writes them (a text never injects one); the K compression tokens
    once, contiguous and in order; the image block whole."""
    expected = _special_counts(processor, image_tokens, turns_kept)
    found = {token: ids.count(token) for token in expected}
    names = processor.tokenizer.convert_ids_to_tokens
    assert found == expected, {names(token): (found[token], count) for token, count in expected.items()}
    compression = processor.compression_token_ids
    if compression:
        start = ids.index(compression[0])
        assert ids[start : start + len(compression)] == compression
    if image_tokens:
        start = ids.index(_id(processor, "<|vision_start|>"))
        block = ids[start : start + image_tokens + 2]
        assert block == [_id(processor, "<|vision_start|>")] + [_id(processor, "<|image_pad|>")] * image_tokens + [
            _id(processor, "<|vision_end|>")
        ]


def _is_cut_before(short: list[int], full: list[int], tail: int) -> bool:
    """`short` is `full` with tokens cut right before its last `tail` tokens (a text losing its end)."""
    kept = len(short) - tail
    return len(short) <= len(full) and short[:kept] == full[:kept] and short[kept:] == full[len(full) - tail :]


def _is_subsequence(short: list[int], full: list[int]) -> bool:
    remaining = iter(full)
    return all(token in remaining for token in short)


def _check_error(error: CoMaInputError, allowed: set[str]) -> None:
    """The documented error: it names the sample and one of the fields at fault."""
    assert error.field in allowed, (error.field, allowed, str(error))
    assert error.sample == SAMPLE and str(error).startswith(f"sample {SAMPLE}, field '{error.field}': ")


def _max_lengths(k: int, *highest: int) -> st.SearchStrategy[int | None]:
    """Any `max_length` from K + 1 (the compression tokens and one token) up to K + each of `highest`, or (one time
    in ten) no limit."""
    return mostly(st.one_of(*[st.integers(k + 1, k + high) for high in highest or (24, 96, 400)]), st.none())


# --------------------------------------------------------------------------------------------------------------------
# Stage 2: render_embedding_input
# --------------------------------------------------------------------------------------------------------------------
def _draw_max_lengths(data, k: int, *edges: int) -> list[int | None]:
    """No limit, and one `max_length` in each range `[edges[i], edges[i + 1] - 1]` from K + 1 up that is not empty
    (the edges mark where the outcome changes: no room, text cut, turns dropped, rendered whole; the last range is 8
    wide): every example is checked in every outcome."""
    bounds = [max(k + 1, low) for low in edges] + [max(k + 1, edges[-1]) + 9]
    ranges = [(low, high - 1) for low, high in zip(bounds, bounds[1:], strict=False) if low < high]
    return [None] + [data.draw(st.integers(*bounds), label=f"max_length in {bounds}") for bounds in ranges]


@settings(max_examples=100)
@given(data=st.data())
def test_embedding_input_renders_as_documented_or_names_the_field(data):
    """100 examples, each at no `max_length` and one in each outcome's range. Either the input renders or it raises
    `CoMaInputError` naming the sample and the field at fault; rendered: the documented layout, special tokens only
    where the layout puts them, the K compression tokens last, and under `max_length` only the text gives way, just
    enough (never a compression token or the image block)."""
    k = data.draw(st.sampled_from(KS), label="K")
    base = _processor(k, None)
    text = data.draw(st.one_of(texts(base), long_texts(base), placeholder_texts(base)), label="text")
    image = data.draw(st.none() | images(), label="image")
    instruction = data.draw(st.none() | texts(base), label="instruction")

    def render(max_length):
        return _processor(k, max_length).render_embedding_input(text, image, instruction, sample=SAMPLE)

    # empty text is allowed only together with an image; without one the placeholders are removed first
    if image is None and not _without_placeholders(base, text).strip():
        event("stage 2: empty text")
        for max_length in (None, data.draw(st.integers(k + 1, k + 200), label="max_length")):
            with pytest.raises(CoMaInputError) as caught:
                render(max_length)
            _check_error(caught.value, {"text"} if max_length is None else {"text", "instruction"})
        return

    full = render(None)
    image_tokens = _image_tokens(base, full)
    assert (image_tokens > 0) == (image is not None) and image_tokens <= base.max_image_tokens  # bounds in tokens
    assert base.decode(full.input_ids) == _expected_embedding_text(base, text, image_tokens, instruction)
    _check_layout(base, full.input_ids, image_tokens)
    compression = base.compression_token_ids
    assert full.input_ids[len(full.input_ids) - k :] == compression and full.labels is None

    placeholder_path = image is not None and re.search(base.image_placeholder, text) is not None
    if placeholder_path:  # the text around the image gives way; the block and the compression tokens are fixed
        fixed = image_tokens + 2 + k
    else:  # the text is tokenized alone; everything else is fixed
        fixed = len(full.input_ids) - len(_tokens(base, _without_placeholders(base, text)))
    note(f"fixed tokens: {fixed}, full length: {len(full.input_ids)}")
    for max_length in _draw_max_lengths(data, k, k + 1, fixed, len(full.input_ids)):
        if max_length is not None and fixed > max_length:
            event("stage 2: no room")
            with pytest.raises(CoMaInputError) as caught:
                render(max_length)
            _check_error(caught.value, {"image" if image is not None else "instruction"})
            continue
        rendered = render(max_length)
        ids = rendered.input_ids
        assert _image_tokens(base, rendered) == image_tokens
        _check_layout(base, ids, image_tokens)
        assert ids[len(ids) - k :] == compression
        if max_length is None or len(full.input_ids) <= max_length:
            event("stage 2: rendered whole")
            assert ids == full.input_ids
            continue
        event("stage 2: text cut" + (" around the image" if placeholder_path else ""))
        assert len(ids) == max_length  # the text gives way, and only as much as needed
        if placeholder_path:  # the text after the image, then the text before it, lose their ends
            assert _is_subsequence(ids, full.input_ids)
        else:  # the text, last before the compression tokens, loses its end
            assert _is_cut_before(ids, full.input_ids, k)


# --------------------------------------------------------------------------------------------------------------------
# Stage 1: render_qa_sample
# --------------------------------------------------------------------------------------------------------------------
def _turn_spans(processor: CoMaProcessor, ids: list[int]) -> tuple[list[int], list[list[int]]]:
    """A stage-1 rendering split into its input (up to the first `<|im_start|>`) and its QA turns (two
    `<|im_start|>` each; user text cannot write one)."""
    starts = [index for index, token in enumerate(ids) if token == _id(processor, "<|im_start|>")][::2]
    ends = starts[1:] + [len(ids)]
    return ids[: starts[0]], [ids[begin:end] for begin, end in zip(starts, ends, strict=True)]


@settings(max_examples=100)
@given(data=st.data())
def test_compression_sample_renders_and_labels_as_documented_or_names_the_field(data):
    """100 examples, each at no `max_length` and one in each outcome's range. Either the sample renders or it raises
    `CoMaInputError` naming the sample and the field at fault. Rendered: the documented layout, the K compression
    tokens once and right before the first turn; under `max_length` the text gives way for the first turn (never
    cut), later turns that do not fit are dropped whole and counted; labels are `IGNORE_INDEX` but on the kept answers
    and their `<|im_end|>` (tokenized directly), or on everything after the compression tokens with
    `loss_on="all_after_compression"`."""
    k = data.draw(st.sampled_from(KS), label="K")
    base = _processor(k, None)
    text = data.draw(mostly(st.one_of(nonblank_texts(base), long_texts(base)), st.none() | texts(base)), label="text")
    image = data.draw(st.none() | images(), label="image")
    conversation = data.draw(mostly(st.lists(turns(base), min_size=1, max_size=3), st.just([])), label="turns")
    loss_on = data.draw(st.sampled_from(["answers", "all_after_compression"]), label="loss_on")

    def render(max_length):
        return _processor(k, max_length, loss_on).render_qa_sample(image, text, conversation, sample=SAMPLE)

    allowed = set()
    if image is None and not _without_placeholders(base, text).strip():
        allowed.add("text")
    if not conversation or any(not turn[part].strip() for turn in conversation for part in ("question", "answer")):
        allowed.add("conversation")
    if allowed:
        event(f"stage 1: bad {' and '.join(sorted(allowed))}")
        for max_length in (None, data.draw(st.integers(k + 1, k + 400), label="max_length")):
            with pytest.raises(CoMaInputError) as caught:
                render(max_length)
            _check_error(caught.value, allowed)
        return

    full = render(None)
    image_tokens = _image_tokens(base, full)
    assert (image_tokens > 0) == (image is not None)
    assert base.decode(full.input_ids) == _expected_compression_text(base, text, image_tokens, conversation)
    _check_layout(base, full.input_ids, image_tokens, len(conversation))
    prefix, spans = _turn_spans(base, full.input_ids)
    assert len(spans) == len(conversation) and full.dropped_turns == 0
    compression = base.compression_token_ids
    assert prefix[len(prefix) - k :] == compression  # the compression tokens end the input; the turns follow

    # what max_length leaves: the text gives way for the first turn; later turns are kept while they fit
    first = len(prefix) - len(_tokens(base, _without_placeholders(base, text).strip())) + len(spans[0])
    whole = len(prefix) + len(spans[0])  # the text whole and the first turn
    note(f"least room: {first}, input and first turn: {whole}, full length: {len(full.input_ids)}")
    for max_length in _draw_max_lengths(data, k, k + 1, first, whole, len(full.input_ids)):
        if max_length is not None and first > max_length:
            event("stage 1: no room for the first turn")
            with pytest.raises(CoMaInputError) as caught:
                render(max_length)
            _check_error(caught.value, {"conversation"})
            continue
        limit = max_length if max_length is not None else len(full.input_ids)
        length, kept = min(whole, limit), 1
        while kept < len(spans) and length + len(spans[kept]) <= limit:
            length, kept = length + len(spans[kept]), kept + 1
        event(f"stage 1: text cut: {whole > limit}, turns dropped: {kept < len(spans)}")

        rendered = render(max_length)
        ids, labels = rendered.input_ids, rendered.labels
        assert len(ids) == length <= limit and rendered.dropped_turns == len(conversation) - kept
        _check_layout(base, ids, image_tokens, kept)
        cut_prefix, kept_spans = _turn_spans(base, ids)
        assert kept_spans == spans[:kept]  # turns whole, the first one always
        # the text loses its end; "\n{compress_instruction}" and the compression tokens follow it whole
        assert _is_cut_before(cut_prefix, prefix, len(_tokens(base, "\n" + base.compress_instruction)) + k)
        assert len(labels) == len(ids)
        if loss_on == "answers":
            im_end = _id(base, "<|im_end|>")
            # each kept answer, tokenized on its own, and its <|im_end|>
            expected = [token for turn in conversation[:kept] for token in _tokens(base, turn["answer"]) + [im_end]]
            labelled = [(token, label) for token, label in zip(ids, labels, strict=True) if label != IGNORE_INDEX]
            assert [label for _, label in labelled] == [token for token, _ in labelled] == expected
        else:
            assert labels == [IGNORE_INDEX] * len(cut_prefix) + ids[len(cut_prefix) :]


# --------------------------------------------------------------------------------------------------------------------
# Batches: process_embedding_inputs / process_qa_samples
# --------------------------------------------------------------------------------------------------------------------
def _embedding_inputs(processor: CoMaProcessor) -> st.SearchStrategy:
    """The documented input forms: a text, a PIL image, a dict with image / text / instruction."""
    short = texts(processor, max_pieces=3)
    small = images(st.integers(1, 200))
    entry = st.fixed_dictionaries({}, optional={"image": small, "text": short, "instruction": short})
    return st.one_of(short, small, entry)


def _rows(batch, key: str) -> list[list[int]]:
    """Each row of a left-padded `[batch, length]` entry without its padding."""
    mask = batch["attention_mask"].bool()
    return [row[keep].tolist() for row, keep in zip(batch[key], mask, strict=True)]


def _check_batch(processor: CoMaProcessor, batch, rendered: list) -> None:
    """`batch` is the rendered samples left-padded: their tokens (and labels) after padding, images in row order."""
    mask = batch["attention_mask"]
    length = mask.shape[1]
    assert length == max(len(sample.input_ids) for sample in rendered)
    for row, sample in enumerate(rendered):
        padding = length - len(sample.input_ids)
        assert mask[row].tolist() == [0] * padding + [1] * len(sample.input_ids)
    assert _rows(batch, "input_ids") == [sample.input_ids for sample in rendered]
    if rendered[0].labels is not None:
        assert _rows(batch, "labels") == [sample.labels for sample in rendered]
        assert bool((batch["labels"][mask == 0] == IGNORE_INDEX).all())
    image_pad = batch["input_ids"] == _id(processor, "<|image_pad|>")
    assert torch.equal(batch["mm_token_type_ids"].bool(), image_pad & mask.bool())
    with_images = [sample for sample in rendered if sample.pixel_values is not None]
    assert ("pixel_values" in batch) == bool(with_images)
    if with_images:
        assert torch.equal(batch["pixel_values"], torch.cat([sample.pixel_values for sample in with_images]))
        assert torch.equal(batch["image_grid_thw"], torch.cat([sample.image_grid_thw for sample in with_images]))


def _first_error(render, items) -> tuple[int, CoMaInputError] | None:
    for index, item in enumerate(items):
        try:
            render(item, index)
        except CoMaInputError as error:
            return index, error
    return None


@settings(max_examples=30)
@given(data=st.data())
def test_process_for_embedding_pads_the_rendered_inputs_or_names_the_first_bad_one(data):
    """30 examples. A batch of 1–4 inputs is each input rendered alone, left-padded, images in row order; a bad
    input is named by its position plus `offset`."""
    k = data.draw(st.sampled_from(KS), label="K")
    roomy = st.none() | st.integers(k + 70, k + 400)  # room for any image and some text
    processor = _processor(k, data.draw(mostly(roomy, _max_lengths(k)), label="max_length"))
    item = mostly(_valid_inputs(processor), _embedding_inputs(processor))
    items = data.draw(st.lists(item, min_size=1, max_size=4), label="inputs")
    instruction = data.draw(st.none() | texts(processor, max_pieces=2), label="instruction")
    offset = data.draw(st.integers(0, 100), label="offset")

    def render(item, index):
        if isinstance(item, str):
            item = {"text": item}
        elif isinstance(item, Image.Image):
            item = {"image": item}
        own = item.get("instruction", instruction)
        return processor.render_embedding_input(item.get("text"), item.get("image"), own, sample=offset + index)

    failure = _first_error(render, items)
    event(f"stage 2 batch: {f'bad {failure[1].field}' if failure else 'rendered'}")
    if failure is not None:
        index, expected = failure
        with pytest.raises(CoMaInputError) as caught:
            processor.process_embedding_inputs(items, instruction, offset=offset)
        assert (caught.value.sample, caught.value.field) == (offset + index, expected.field)
        return
    rendered = [render(item, index) for index, item in enumerate(items)]
    _check_batch(processor, processor.process_embedding_inputs(items, instruction, offset=offset), rendered)


@settings(max_examples=25)
@given(data=st.data())
def test_process_for_compression_pads_the_rendered_samples_or_names_the_first_bad_one(data):
    """25 examples. A batch of 1–3 stage-1 samples is each rendered alone, left-padded with `IGNORE_INDEX` labels; a
    bad sample is named by its position plus `offset`."""
    k = data.draw(st.sampled_from(KS), label="K")
    roomy = st.none() | st.integers(k + 200, k + 600)  # room for any image, a short text and a turn
    max_length = data.draw(mostly(roomy, _max_lengths(k)), label="max_length")
    processor = _processor(k, max_length, data.draw(st.sampled_from(["answers", "all_after_compression"])))
    image = images(st.integers(1, 200))
    valid = st.fixed_dictionaries(
        {
            "conversation": st.lists(turns(processor, valid=True), min_size=1, max_size=2),
            "text": nonblank_texts(processor, max_pieces=3),
        },
        optional={"image": image},
    )
    any_sample = st.fixed_dictionaries(
        {"conversation": st.lists(turns(processor), max_size=2)},
        optional={"image": image, "text": texts(processor, max_pieces=3)},
    )
    samples = data.draw(st.lists(mostly(valid, any_sample), min_size=1, max_size=3), label="samples")
    offset = data.draw(st.integers(0, 100), label="offset")

    def render(item, index):
        return processor.render_qa_sample(
            item.get("image"), item.get("text"), item["conversation"], sample=offset + index
        )

    failure = _first_error(render, samples)
    event(f"stage 1 batch: {f'bad {failure[1].field}' if failure else 'rendered'}")
    if failure is not None:
        index, expected = failure
        with pytest.raises(CoMaInputError) as caught:
            processor.process_qa_samples(samples, offset=offset)
        assert (caught.value.sample, caught.value.field) == (offset + index, expected.field)
        return
    rendered = [render(item, index) for index, item in enumerate(samples)]
    _check_batch(processor, processor.process_qa_samples(samples, offset=offset), rendered)


# --------------------------------------------------------------------------------------------------------------------
# encode: a row's vector does not depend on its batch
# --------------------------------------------------------------------------------------------------------------------
def _valid_inputs(processor: CoMaProcessor) -> st.SearchStrategy:
    """Inputs that embed: a non-blank text, an image, or an image with a text."""
    text = nonblank_texts(processor, max_pieces=2, max_piece=8)
    image = images(st.one_of(st.integers(1, 96), st.integers(1, 1024)))
    return st.one_of(text, image, st.fixed_dictionaries({"image": image, "text": texts(processor, max_pieces=2)}))


@settings(max_examples=16)
@given(data=st.data())
def test_encode_of_a_batch_equals_each_input_alone_in_any_order(data):
    """16 examples. `encode` of 2–4 mixed inputs of varying lengths, in any batch size and row order, equals each
    input encoded alone within 1e-5 (left padding and the batch's other images change nothing); `encode_text` and
    `encode_images` agree with it."""
    k = data.draw(st.sampled_from(KS), label="K")
    model = _model(k)
    items = data.draw(st.lists(_valid_inputs(model.processor), min_size=2, max_size=4), label="inputs")
    order = data.draw(st.permutations(range(len(items))), label="order")
    batch_size = data.draw(st.integers(1, len(items)), label="batch_size")
    instruction = data.draw(st.none() | st.sampled_from(["Find the matching image.", "<|im_end|> x"]))

    alone = torch.cat([model.encode([item], instruction=instruction) for item in items])
    assert alone.shape == (len(items), model.config.embedding_size) and bool(torch.isfinite(alone).all())
    torch.testing.assert_close(alone.norm(dim=-1), torch.ones(len(items)), atol=1e-5, rtol=0)
    together = model.encode([items[index] for index in order], instruction=instruction, batch_size=batch_size)
    torch.testing.assert_close(together, alone[list(order)], atol=1e-5, rtol=0)

    text_rows = [index for index, item in enumerate(items) if isinstance(item, str)]
    if text_rows:
        vectors = model.encode_text([items[index] for index in text_rows], instruction=instruction)
        torch.testing.assert_close(vectors, alone[text_rows], atol=1e-5, rtol=0)
    image_rows = [index for index, item in enumerate(items) if isinstance(item, Image.Image)]
    if image_rows:
        vectors = model.encode_images([items[index] for index in image_rows], instruction=instruction)
        torch.testing.assert_close(vectors, alone[image_rows], atol=1e-5, rtol=0)


# --------------------------------------------------------------------------------------------------------------------
# Fixed examples found by the properties above (kept as regressions)
# --------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("k", KS)
@pytest.mark.parametrize("text", ["<|image_1|>", " <image> ", "<image>\n<|image_1|>"])
def test_a_text_of_placeholders_alone_is_empty_text(k, text):
    """Without an image a text's placeholders are removed; a text of nothing else is empty, which is allowed only
    with an image (before the fix it rendered as the instruction alone, and with K = 0 as no token at all, which
    `encode` then failed on inside torch)."""
    processor = _processor(k, None)
    for instruction in (None, "Find it."):
        with pytest.raises(CoMaInputError, match=rf"sample {SAMPLE}, field 'text': empty text"):
            processor.render_embedding_input(text, None, instruction, sample=SAMPLE)
    with pytest.raises(CoMaInputError, match="sample 0, field 'text'"):
        _model(k).encode_text([text])
