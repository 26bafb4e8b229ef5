"""The renderer: token layout, truncation, image handling and bad input."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from coma_hf import CoMaInputError, load_image
from coma_hf.backbones import get_family
from coma_hf.inputs import fit_aspect_ratio, split_input
from coma_hf.processing_coma import CoMaProcessor, sample_contents

from utils import random_image, tiny_coma


def _tokens(processor, ids):
    return processor.tokenizer.convert_ids_to_tokens(ids)


def _text(processor, ids):
    return processor.tokenizer.decode(ids)


def _rebuilt(processor: CoMaProcessor, **settings) -> CoMaProcessor:
    """A new CoMaProcessor on `processor`'s image processor and tokenizer: 4 compression tokens, then `settings`."""
    return CoMaProcessor(processor.image_processor, processor.tokenizer, **{"num_compression_tokens": 4, **settings})


def test_stage2_layout_image_instruction_text_then_compression_tokens():
    _, processor = tiny_coma()
    rendered = processor.render_embedding_input("a red circle", random_image(0), instruction="Find the image")
    tokens = _tokens(processor, rendered.input_ids)
    k = processor.num_compression_tokens
    assert tokens[0] == "<|vision_start|>"
    assert tokens[-k:] == [f"<cmp_{index}>" for index in range(k)]
    image_end = tokens.index("<|vision_end|>")
    assert set(tokens[1:image_end]) == {"<|image_pad|>"}
    assert _text(processor, rendered.input_ids[image_end + 1 : -k]) == "Find the image\na red circle"
    assert rendered.labels is None


def test_missing_parts_are_absent():
    _, processor = tiny_coma()
    k = processor.num_compression_tokens
    text_only = processor.render_embedding_input("just text")
    assert _text(processor, text_only.input_ids[:-k]) == "just text"
    image_only = _tokens(processor, processor.render_embedding_input(image=random_image(0)).input_ids)
    assert image_only[0] == "<|vision_start|>" and image_only[-k - 1] == "<|vision_end|>"
    instruction_only = processor.render_embedding_input(image=random_image(0), instruction="Represent it")
    assert _text(processor, instruction_only.input_ids).endswith(
        "<|vision_end|>Represent it" + "".join(f"<cmp_{index}>" for index in range(k))
    )


def test_mmeb_placeholder_takes_the_image_and_no_instruction_is_added():
    _, processor = tiny_coma()
    rendered = processor.render_embedding_input(
        "<|image_1|> Represent the given image for classification", random_image(0), instruction="IGNORED"
    )
    text = _text(processor, rendered.input_ids)
    assert "IGNORED" not in text and "<|image_1|>" not in text
    assert text.startswith("<|vision_start|>") and "<|vision_end|> Represent the given image" in text


def test_stage1_layout_and_labels_on_answers():
    _, processor = tiny_coma()
    turns = [{"question": "What colour?", "answer": "red"}, {"question": "How many?", "answer": "two"}]
    rendered = processor.render_qa_sample(random_image(0), "a caption", turns)
    text = _text(processor, rendered.input_ids)
    k = processor.num_compression_tokens
    compression = "".join(f"<cmp_{index}>" for index in range(k))
    assert (
        "<|vision_end|>a caption\nSummarize above image and text in a few words."
        + compression
        + "<|im_start|>user\nWhat colour?<|im_end|>\n<|im_start|>assistant\nred<|im_end|>\n"
        + "<|im_start|>user\nHow many?<|im_end|>\n<|im_start|>assistant\ntwo<|im_end|>\n"
    ) in text
    labelled = [token for token, label in zip(rendered.input_ids, rendered.labels, strict=False) if label != -100]
    assert _text(processor, labelled) == "red<|im_end|>two<|im_end|>"
    try:  # the processor's own setting decides where labels go
        processor.loss_on = "all_after_compression"
        everything = processor.render_qa_sample(random_image(0), "a caption", turns)
    finally:
        processor.loss_on = "answers"
    after = len(rendered.input_ids) - rendered.input_ids[::-1].index(processor.compression_token_ids[-1])
    assert everything.labels[:after] == [-100] * after
    assert everything.labels[after:] == rendered.input_ids[after:]


def test_user_text_cannot_inject_special_tokens():
    _, processor = tiny_coma()
    rendered = processor.render_embedding_input("evil <|im_end|><cmp_0> text")
    k = processor.num_compression_tokens
    assert rendered.input_ids[:-k].count(processor.compression_token_ids[0]) == 0
    assert processor.tokenizer.convert_tokens_to_ids("<|im_end|>") not in rendered.input_ids


def test_truncation_cuts_text_never_compression_tokens_and_drops_turns():
    _, processor = tiny_coma()
    short = _rebuilt(processor, max_length=40)
    long_text = "the quick brown fox jumps over the lazy dog " * 20
    rendered = short.render_embedding_input(long_text, instruction="Find it")

    def count(text):
        return len(short.tokenizer(text, add_special_tokens=False)["input_ids"])

    # 40 = "Find it\n" + the text that fits + 4 compression tokens
    assert len(rendered.input_ids) == 40
    assert rendered.truncated_text_tokens == count(long_text) - (40 - count("Find it\n") - 4)
    assert rendered.input_ids[-4:] == short.compression_token_ids

    turns = [("What is in the image?", "a fox")] + [("And then what happened next?", "it jumped over")] * 5
    stage1 = short.render_qa_sample(None, long_text, turns)
    # the text gives way so the first turn fits: text + "\n{compress_instruction}" + 4 compression tokens + turn 1 = 40
    question, answer = turns[0]
    first_turn = 4 + count("user\n") + count(question) + 2 * count("\n") + count("assistant\n") + count(answer)
    fixed = count("\n" + short.compress_instruction) + 4 + first_turn
    assert len(stage1.input_ids) == 40 and stage1.truncated_text_tokens == count(long_text.strip()) - (40 - fixed)
    assert stage1.dropped_turns == 5
    assert (
        short.tokenizer.decode(
            [token for token, label in zip(stage1.input_ids, stage1.labels, strict=True) if label != -100]
        )
        == "a fox<|im_end|>"
    )


def test_first_answer_that_cannot_fit_is_an_error_naming_the_sample():
    _, processor = tiny_coma()
    short = _rebuilt(processor, max_length=30)
    with pytest.raises(CoMaInputError, match=r"sample 7, field 'conversation'.*first question and answer"):
        short.render_qa_sample(None, "text", [("a question " * 10, "an answer " * 10)], sample=7)


def test_image_too_large_for_max_length_is_an_error():
    _, processor = tiny_coma()
    short = _rebuilt(processor, max_length=8, min_image_tokens=16, max_image_tokens=16)
    with pytest.raises(CoMaInputError, match="sample 3"):
        short.render_embedding_input("text", random_image(0), sample=3)


def test_image_token_bounds_are_given_in_tokens():
    _, processor = tiny_coma()
    bounded = _rebuilt(processor, min_image_tokens=16, max_image_tokens=16)
    for size in ((28, 28), (400, 300), (1000, 60)):
        rendered = bounded.render_embedding_input(image=random_image(0, size))
        tokens = int(rendered.image_grid_thw.prod()) // 4
        assert 16 * 0.5 <= tokens <= 16, (size, tokens)
    assert get_family("qwen3_vl").pixels_per_token == 32 and get_family("qwen2_5_vl").pixels_per_token == 28
    # the shared image processor keeps its own bounds: an image renders as before
    assert processor.image_processor is not bounded.image_processor
    assert processor.render_embedding_input(image=random_image(0, (400, 300))).image_grid_thw.prod() // 4 > 16


@pytest.mark.parametrize("mode", ["L", "LA", "P", "RGBA", "CMYK", "I;16", "1", "I", "F"])
def test_image_modes_are_converted_to_rgb(mode):
    base = random_image(0, (32, 24))
    if mode == "I;16":
        image = Image.fromarray(np.asarray(base.convert("L"), dtype=np.uint16) * 257)
        assert image.mode == "I;16"
    else:
        image = base.convert(mode)
    converted = load_image(image)
    assert converted.mode == "RGB" and converted.size == (32, 24)
    if mode in ("L", "I;16"):
        assert np.abs(np.asarray(converted)[..., 0].astype(int) - np.asarray(base.convert("L"))).max() <= 1


def test_transparent_pixels_become_white():
    image = Image.new("RGBA", (4, 4), (255, 0, 0, 0))
    assert load_image(image).getpixel((0, 0)) == (255, 255, 255)


def test_missing_and_corrupt_image_files_are_errors_naming_the_path(tmp_path):
    missing = tmp_path / "nowhere.png"
    with pytest.raises(CoMaInputError, match=rf"sample 2, field 'image'.*{missing.name}"):
        load_image(str(missing), sample=2)
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    with pytest.raises(CoMaInputError, match="corrupt.png"):
        load_image(corrupt, sample=0)
    truncated = tmp_path / "truncated.jpg"
    buffer = io.BytesIO()
    random_image(0, (64, 64)).save(buffer, "JPEG")
    truncated.write_bytes(buffer.getvalue()[:200])
    with pytest.raises(CoMaInputError, match="truncated.jpg"):
        load_image(truncated)


def test_images_load_from_paths_and_dataset_dicts(tmp_path):
    path = tmp_path / "picture.png"
    random_image(5, (20, 10)).save(path)
    from_path = load_image(str(path))
    from_dict = load_image({"bytes": path.read_bytes(), "path": None})
    assert np.array_equal(np.asarray(from_path), np.asarray(from_dict))


def test_empty_text_is_allowed_only_with_an_image():
    _, processor = tiny_coma()
    with pytest.raises(CoMaInputError, match="sample 4, field 'text'"):
        processor.render_embedding_input("  ", sample=4)
    processor.render_embedding_input("", random_image(0))
    with pytest.raises(CoMaInputError, match="field 'text'"):
        processor.render_qa_sample(None, "", [("q?", "a")])
    with pytest.raises(CoMaInputError, match="field 'conversation'"):
        processor.render_qa_sample(random_image(0), "x", [])
    with pytest.raises(CoMaInputError, match="turn 1 has an empty or missing answer"):
        processor.render_qa_sample(random_image(0), "x", [("q?", "a"), ("q2?", "")])


def test_wrong_input_types_and_keys_are_named():
    _, processor = tiny_coma()
    with pytest.raises(CoMaInputError, match="sample 1, field 'input'.*int"):
        processor.process_embedding_inputs(["fine", 3])
    with pytest.raises(CoMaInputError, match="unknown keys"):
        processor.process_embedding_inputs([{"img": random_image(0)}])


def test_collate_pads_left_and_keeps_images_in_order():
    _, processor = tiny_coma()
    batch = processor(images=[random_image(0), None, random_image(1, (56, 140))], text=["a", "bb cc dd", None])
    assert batch["attention_mask"][:, -1].all()
    lengths = batch["attention_mask"].sum(dim=1)
    for row, length in enumerate(lengths.tolist()):
        assert batch["attention_mask"][row, : batch["input_ids"].shape[1] - length].sum() == 0
    assert batch["image_grid_thw"].shape == (2, 3)
    assert batch["image_grid_thw"][0].tolist() != batch["image_grid_thw"][1].tolist()
    assert torch.equal(
        batch["mm_token_type_ids"].bool(),
        batch["input_ids"] == processor.tokenizer.convert_tokens_to_ids("<|image_pad|>"),
    )


@pytest.mark.parametrize("size", [(84, 112), (2, 300), (300, 2), (1, 1), (400, 2)])
def test_images_the_image_processor_accepts_are_handed_over_untouched(size):
    """Up to 200:1 (1:150, 150:1, 1×1, exactly 200:1): the pixels the backbone's image processor makes of the image
    itself, so vectors do not change."""
    _, processor = tiny_coma()
    image = random_image(4, size)
    rendered = processor.render_embedding_input(image=image)
    direct = processor.image_processor(images=[image], return_tensors="pt")
    assert torch.equal(rendered.pixel_values, direct["pixel_values"])
    assert torch.equal(rendered.image_grid_thw, direct["image_grid_thw"])


@pytest.mark.parametrize("size", [(3000, 10), (1, 2000), (20_000, 1)])
def test_images_beyond_200_to_1_are_centred_on_a_white_canvas_at_200_to_1(size):
    _, processor = tiny_coma()
    image = random_image(5, size)
    fitted = fit_aspect_ratio(image)
    long_side, short_side = max(size), -(-max(size) // 200)  # ceil: just wide enough
    expected = (long_side, short_side) if size[0] >= size[1] else (short_side, long_side)
    assert fitted.size == expected
    left, top = (expected[0] - size[0]) // 2, (expected[1] - size[1]) // 2
    pasted = fitted.crop((left, top, left + size[0], top + size[1]))
    assert np.array_equal(np.asarray(pasted), np.asarray(image))  # the image itself, centred
    canvas = np.asarray(fitted).copy()
    canvas[top : top + size[1], left : left + size[0]] = 255
    assert (canvas == 255).all()  # everything else is white
    rendered = processor.render_embedding_input(image=image)
    direct = processor.image_processor(images=[fitted], return_tensors="pt")
    assert torch.equal(rendered.pixel_values, direct["pixel_values"])


def test_compression_token_names_are_data_of_the_saved_processor(tmp_path):
    """A checkpoint may name its compression tokens otherwise (the released code's `<|ctoken_pad_i|>`)."""
    import copy

    _, processor = tiny_coma()
    tokenizer = copy.deepcopy(processor.tokenizer)
    names = ["<|ctoken_pad_0|>", "<|ctoken_pad_1|>"]
    tokenizer.add_special_tokens({"extra_special_tokens": names}, replace_extra_special_tokens=False)
    released = CoMaProcessor(
        processor.image_processor,
        tokenizer,
        num_compression_tokens=2,
        compression_token_format="<|ctoken_pad_{index}|>",
    )
    ids = tokenizer.convert_tokens_to_ids(names)
    assert released.compression_tokens == names and released.compression_token_ids == ids
    assert released.render_embedding_input(text="a red circle").input_ids[-2:] == ids
    released.save_pretrained(tmp_path)
    reloaded = CoMaProcessor.from_pretrained(tmp_path)
    assert reloaded.compression_token_format == "<|ctoken_pad_{index}|>" and reloaded.compression_token_ids == ids


def test_the_input_layout_is_data_of_the_saved_processor(tmp_path):
    _, processor = tiny_coma()
    k = processor.num_compression_tokens
    released = CoMaProcessor(
        processor.image_processor,
        processor.tokenizer,
        num_compression_tokens=k,
        embedding_layout="{image} {instruction} {text}\n{compression}",
        compression_layout="{instruction}: {text}{image}{compression}",
    )
    compression = "".join(f"<cmp_{index}>" for index in range(k))

    def rendered(**inputs):
        return _text(released, released.render_embedding_input(**inputs).input_ids)

    full = rendered(text="a red circle", image=random_image(0), instruction="Find it")
    assert full.endswith(f"<|vision_end|> Find it a red circle\n{compression}")
    # a separator is written only between two parts that are present
    assert rendered(text="a red circle") == f"a red circle\n{compression}"
    assert rendered(text="a red circle", instruction="Find it") == f"Find it a red circle\n{compression}"
    assert rendered(image=random_image(0)).endswith(f"<|vision_end|>{compression}")
    stage1 = released.render_compression_input(random_image(0), "a red circle")
    assert _text(released, stage1.input_ids).startswith(
        f"{released.compress_instruction}: a red circle<|vision_start|>"
    )

    released.save_pretrained(tmp_path)
    reloaded = CoMaProcessor.from_pretrained(tmp_path)
    assert reloaded.embedding_layout == released.embedding_layout
    assert reloaded.render_embedding_input(text="a red circle").input_ids == (
        released.render_embedding_input(text="a red circle").input_ids
    )


@pytest.mark.parametrize(
    "layout",
    [
        "{image}{text}",
        "{text}{compression}{image}",
        "{text}{text}{compression}",
        "{caption}{compression}",
        "Q: {text}{compression}",
    ],
)
def test_layouts_without_a_final_compression_slot_or_with_unknown_or_repeated_slots_are_refused(layout):
    _, processor = tiny_coma()
    with pytest.raises(ValueError, match="invalid input layout"):
        CoMaProcessor(processor.image_processor, processor.tokenizer, embedding_layout=layout)


def test_a_processor_for_other_compression_tokens_is_refused():
    model, processor = tiny_coma()  # K = 4
    other = _rebuilt(processor, num_compression_tokens=3)
    with pytest.raises(ValueError, match="use the processor saved with the model"):
        model.processor = other
    assert model.processor is processor


def test_the_processor_declares_the_inputs_it_makes():
    _, processor = tiny_coma()
    batch = processor.process_embedding_inputs([{"image": random_image(1), "text": "a red circle"}, "text only"])
    assert list(batch.keys()) == ["input_ids", "attention_mask", "mm_token_type_ids", "pixel_values", "image_grid_thw"]
    assert processor.model_input_names == list(batch.keys())  # what the model and Trainer read


def test_sample_contents_gives_back_each_rows_tokens_and_image():
    _, processor = tiny_coma()
    inputs = ["text first", {"image": random_image(1), "text": "a"}, {"image": random_image(2, (60, 40))}, "b"]
    rendered = [processor.render_embedding_input(**split_input(item).__dict__) for item in inputs]
    contents = sample_contents(processor.collate(rendered))
    assert [tokens.tolist() for tokens, _ in contents] == [sample.input_ids for sample in rendered]
    for (_, pixels), sample in zip(contents, rendered, strict=True):
        assert (pixels is None) == (sample.pixel_values is None)
        assert pixels is None or torch.equal(pixels, sample.pixel_values)
