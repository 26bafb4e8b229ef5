"""The release's evaluation rules, one test per rule (`coma_hf.evaluation.mmeb_v2`, `InputLayout`'s prompt mode).

Each test renders rows of the MMEB-V2 instruct field layout (or plain inputs) with a processor carrying the rules a
converted release records (`RELEASED_PROCESSOR_SETTINGS`) and compares the tokens with the prompt string written out
by hand from their parsers (`src/data/eval_dataset/image_*.py`, `process_input_text`), tokenized at once as their
stock processor does. The vectors themselves are checked against an independent re-implementation in
`tests/test_released_parity.py`.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from coma_hf.evaluation.mmeb import EvalItem, load_mmeb_datasets
from coma_hf.evaluation.mmeb_v2 import (
    as_instruct_dataset,
    is_instruct_rows,
    load_evaluation_datasets,
    load_mmeb_v2_datasets,
)
from coma_hf.inputs import MMEB_IMAGE_PLACEHOLDER, CoMaInputError
from coma_hf.processing_coma import EMBEDDING_LAYOUT, InputLayout
from coma_hf.released import processor_for_training, rendering_settings
from coma_hf.released.evaluation import EVAL_MAX_IMAGE_TOKENS, PARSER_OF, RELEASED_LAYOUTS, RELEASED_PROCESSOR_SETTINGS

from mmeb_v2_rows import PARSERS, ROWS, TINY_IMAGE, write_instruct_folder
from utils import random_image, tiny_coma

V_START, V_END, PAD = "<|vision_start|>", "<|vision_end|>", "<|image_pad|>"


@pytest.fixture(scope="module")
def processor():
    """The tiny model's processor with the rules a converted release records."""
    return tiny_coma()[1].with_settings(**RELEASED_PROCESSOR_SETTINGS)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return write_instruct_folder(tmp_path_factory.mktemp("mmeb_v2"))


@pytest.fixture(scope="module")
def datasets(folder):
    return {dataset.name: dataset for dataset in load_mmeb_v2_datasets(folder)}


def tokens(processor, item) -> list[int]:
    """The ids of one input, rendered alone (no padding)."""
    item = item.as_input() if isinstance(item, EvalItem) else item
    return processor.process_embedding_inputs([item])["input_ids"][0].tolist()


def expected(processor, prompt: str) -> list[int]:
    """`prompt` + the compression tokens tokenized at once, as their stock processor does (special tokens read)."""
    compression = "".join(processor.compression_tokens)
    return processor.tokenizer(prompt + compression, add_special_tokens=False)["input_ids"]


def vision(processor, image) -> str:
    """The vision block of `image` (a path or PIL image) as their processor expands it: one pad per visual token."""
    picture = Image.open(image) if isinstance(image, str) else image
    if min(picture.size) < 28:
        picture = picture.resize((56, 56))
    grid = processor.image_processor(images=[picture.convert("RGB")], return_tensors="pt")["image_grid_thw"]
    return V_START + PAD * (int(grid.prod()) // processor.image_processor.merge_size**2) + V_END


def image_of(datasets, name: str, field: str, row: int = 0, index: int | None = None) -> str:
    item = datasets[name].rows[row]["query" if field == "query" else "candidates"]
    return (item if index is None else item[index]).image


# ---- each family and side -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["ImageNet-1K", "MSCOCO_i2t"])
def test_classification_and_image_to_text_queries(processor, datasets, name):
    """`(V + " " + instruction without <|image_1|> [+ " " + text]).replace(" \\n", "\\n") + "\\n"`."""
    row = ROWS[name][0]
    query = datasets[name].rows[0]["query"]
    block = vision(processor, query.image)
    instruction = row["qry_inst"].replace("<|image_1|>", "")
    prompt = (block + " " + instruction + (" " + row["qry_text"] if row["qry_text"] else "")).replace(" \n", "\n")
    assert tokens(processor, query) == expected(processor, prompt + "\n")
    if name == "ImageNet-1K":  # the instruction's " \n" is cleaned, its leading space kept: two spaces after V
        assert processor.decode(tokens(processor, query)).startswith(block + "  Represent the given image for")
        assert "classification\n\n<cmp_0>" in processor.decode(tokens(processor, query))


@pytest.mark.parametrize("name", ["OK-VQA", "CIRR", "RefCOCO-Matching"])
def test_vqa_and_grounding_queries(processor, datasets, name):
    """`"\\n" + instruction.strip()` after `V + " "`, the text after a space, cleaned, then a newline."""
    row = ROWS[name][0]
    query = datasets[name].rows[0]["query"]
    instruction = "\n" + row["qry_inst"].replace("<|image_1|>", "").strip()
    prompt = (vision(processor, query.image) + " " + instruction + " " + row["qry_text"]).replace(" \n", "\n")
    assert tokens(processor, query) == expected(processor, prompt + "\n")
    assert f"{V_END}\n" in processor.decode(tokens(processor, query))  # V + " " + "\n" cleaned


@pytest.mark.parametrize("name", ["ImageNet-1K", "OK-VQA", "MSCOCO_i2t"])
def test_text_candidates_are_their_text_as_it_is(processor, datasets, name):
    for row_index, row in enumerate(ROWS[name]):
        candidates = datasets[name].rows[row_index]["candidates"]
        assert [item.text for item in candidates] == row["tgt_text"]  # named by their text: no two alike here
        for item, text in zip(candidates, row["tgt_text"], strict=True):
            assert tokens(processor, item) == expected(processor, text)  # no clean-up, no newline


def test_text_to_image_query(processor, datasets):
    """`qry_inst + " " + qry_text + "\\n"`, not cleaned; VisDial adds a newline."""
    for name, extra in (("WebQA", ""), ("VisDial", "\n")):
        for row_index, row in enumerate(ROWS[name]):
            query = datasets[name].rows[row_index]["query"]
            assert query.image is None
            prompt = row["qry_inst"] + " " + row["qry_text"] + "\n" + extra
            assert tokens(processor, query) == expected(processor, prompt)
    assert " \n A:a dog\n\n<cmp_0>" in processor.decode(tokens(processor, datasets["VisDial"].rows[0]["query"]))


def test_text_to_image_candidates_with_and_without_captions(processor, datasets):
    """Per image: `(V + " " + tgt_inst [+ " " + caption]).replace(" \\n", "\\n") + "\\n"`; named by image path, the
    first rendering of a path kept."""
    for name in ("WebQA", "VisDial"):
        row = ROWS[name][0]
        instruction = row["tgt_inst"].replace("<|image_1|>", "")
        captions = row["tgt_text"] if row["tgt_text"][0].strip() else [None] * len(row["tgt_text"])
        for item, caption in zip(datasets[name].rows[0]["candidates"], captions, strict=True):
            body = instruction + (" " + caption if caption is not None else "")
            prompt = (vision(processor, item.image) + " " + body).replace(" \n", "\n") + "\n"
            assert tokens(processor, item) == expected(processor, prompt)
    first, second = datasets["WebQA"].rows
    assert second["candidates"][0] == first["candidates"][1]  # t2i/1.png: "A crow" kept, "A raven" dropped
    assert "A crow" in second["candidates"][0].instruction
    assert second["candidates"][1] == first["candidates"][0]


def test_grounding_candidates_keep_the_newline_only_with_captions(processor, datasets):
    cirr = ROWS["CIRR"][0]
    for item in datasets["CIRR"].rows[0]["candidates"]:  # no captions: cleaned, no newline
        prompt = (vision(processor, item.image) + " " + cirr["tgt_inst"].replace("<|image_1|>", "")).replace(
            " \n", "\n"
        )
        assert tokens(processor, item) == expected(processor, prompt)
        assert processor.decode(tokens(processor, item)).endswith("image.\n<cmp_0><cmp_1><cmp_2><cmp_3>")
    matching = ROWS["RefCOCO-Matching"][0]
    candidates = datasets["RefCOCO-Matching"].rows[0]["candidates"]
    assert len(set(candidates)) == 3  # path:caption names: the same image with two captions stays two candidates
    for item, caption in zip(candidates, matching["tgt_text"], strict=True):
        instruction = matching["tgt_inst"].replace("<|image_1|>", "")
        prompt = (vision(processor, item.image) + " " + instruction + " " + caption).replace(" \n", "\n") + "\n"
        assert tokens(processor, item) == expected(processor, prompt)


# ---- the options of a prompt layout -------------------------------------------------------------------------------
def test_clean_space_newline_acts_on_the_joined_prompt_and_only_when_asked(processor):
    values = {"instruction": "Find \n", "text": "a \n b", "compression": [processor.compression_token_ids[0]]}
    cleaned = InputLayout("{instruction} {text}{compression}", mode="prompt", clean_space_newline=True)
    plain = InputLayout("{instruction} {text}{compression}", mode="prompt")
    first = processor.compression_tokens[0]
    assert processor.decode(processor._render_layout(cleaned, values, 0)[0]) == "Find\n a\n b" + first
    assert processor.decode(processor._render_layout(plain, values, 0)[0]) == "Find \n a \n b" + first


def test_the_trailing_newline_follows_the_clean_up_and_needs_no_text(processor):
    """Image only, the plain rule: `(V + " " + "").replace(" \\n", "\\n") + "\\n"` keeps its space."""
    image = random_image(5)
    rendered = processor.decode(tokens(processor, {"image": image}))
    assert rendered == vision(processor, image) + " \n" + "".join(processor.compression_tokens)
    no_newline = InputLayout.from_spec(RELEASED_LAYOUTS["image_i2i_vg.candidate_without_text"])
    assert (
        not no_newline.trailing_newline and InputLayout.from_spec(RELEASED_LAYOUTS["image_cls.query"]).trailing_newline
    )


def test_prompt_mode_tokenizes_the_prompt_at_once(processor):
    """Separators join the words they touch, as in their single prompt string (parts mode tokenizes them apart)."""
    values = {"instruction": "Find the", "text": "the red", "compression": processor.compression_token_ids}
    prompt = InputLayout("{instruction} {text}{compression}", mode="prompt")
    parts = InputLayout("{instruction} {text}{compression}")
    assert processor._render_layout(prompt, values, 0)[0] == expected(processor, "Find the the red")
    assert processor._render_layout(parts, values, 0)[0] != processor._render_layout(prompt, values, 0)[0]


def test_an_empty_instruction_is_present_in_a_prompt(processor):
    """As their concatenation: `V + " " + ""` — a prompt starts from its instruction, even an empty one."""
    image = random_image(6)
    item = {"image": image, "instruction": "", "layout": "image_i2i_vg.candidate_without_text"}
    assert processor.decode(tokens(processor, item)) == vision(processor, image) + " " + "".join(
        processor.compression_tokens
    )


def test_prompt_mode_drops_image_placeholders_from_instruction_and_text(processor):
    """A prompt has no place for a placeholder: `<|image_1|>` is removed as the release's parsers remove it, not kept
    as literal text (parts mode puts the image there instead)."""
    image = random_image(13)
    block = vision(processor, image)
    item = {"image": image, "text": f"{MMEB_IMAGE_PLACEHOLDER} a cat", "instruction": f"{MMEB_IMAGE_PLACEHOLDER} Find"}
    assert tokens(processor, item) == expected(processor, block + "  Find  a cat\n")
    plain = {"image": image, "text": f"{MMEB_IMAGE_PLACEHOLDER} Represent the image"}  # text in the instruction slot
    assert tokens(processor, plain) == expected(processor, block + "  Represent the image\n")
    assert tokens(processor, f"a {MMEB_IMAGE_PLACEHOLDER}dog") == expected(processor, "a dog\n")


@pytest.mark.parametrize("num_compression_tokens", [0, 2])
def test_the_clean_up_and_trailing_newline_finish_the_prompt_with_or_without_compression_tokens(
    processor, num_compression_tokens
):
    """The last stretch is cleaned and ends in the newline whether or not compression tokens follow it (K = 0)."""
    layout = InputLayout(
        "{instruction} {text}{compression}", mode="prompt", clean_space_newline=True, trailing_newline=True
    )
    compression = processor.compression_token_ids[:num_compression_tokens]
    values = {"instruction": "a cat", "text": "\n sits", "compression": compression}
    ids, cut = processor._render_layout(layout, values, 0)
    assert (
        cut == 0 and ids == processor.tokenizer("a cat\n sits\n", add_special_tokens=False)["input_ids"] + compression
    )


def test_a_cut_prompt_text_keeps_its_trailing_newline(processor):
    """`max_length` cuts the text's stretch before the trailing newline is added: the newline and the compression
    tokens end every prompt."""
    image = random_image(14)
    text = "a long description of a small red circle left of a blue square"
    item = {"image": image, "text": text, "instruction": "Find it."}  # the text in its own slot, which gives way
    full = tokens(processor, item)
    short = processor.with_settings(max_length=len(full) - 3)
    ids = tokens(short, item)
    newline = processor.tokenizer("\n", add_special_tokens=False)["input_ids"]
    assert len(ids) == len(full) - 3
    assert ids[-len(processor.compression_token_ids) - len(newline) :] == newline + processor.compression_token_ids
    assert short.render_embedding_input(text, image, "Find it.").truncated_text_tokens == 3


def test_a_converted_processor_trains_with_the_default_rendering(processor):
    """An MMEB-train row rendered for training from a converted release equals the rendering of any CoMa run: the
    plain layout, image reading and enlargement reset, the recipe's bounds and `max_length`, the named layouts kept."""
    default = tiny_coma()[1]
    recipe = (default.min_image_tokens, default.max_image_tokens, default.max_length)
    training = processor_for_training(processor, *recipe)
    text = f"{MMEB_IMAGE_PLACEHOLDER} Represent the given image\n"
    for image in (random_image(15, (20, 24)), random_image(16, (336, 336))):  # enlarged / more tokens in evaluation
        row = {"image": image, "text": text}
        assert tokens(training, row) == tokens(default, row)
        assert tokens(processor, row) != tokens(default, row)  # the evaluation's prompt and image settings
    assert rendering_settings(training) == rendering_settings(default)
    assert training.layouts == processor.layouts
    bounded = processor_for_training(processor, 16, 64, 128)
    assert (bounded.min_image_tokens, bounded.max_image_tokens, bounded.max_length) == (16, 64, 128)
    assert bounded.image_processor.size["longest_edge"] == 64 * bounded.pixels_per_token**2
    assert bounded.embedding_layout == EMBEDDING_LAYOUT and bounded.apply_exif_orientation
    assert processor_for_training(default) is None  # a CoMa processor trains as it is


def test_layout_options_are_checked_and_saved():
    with pytest.raises(ValueError, match="need mode 'prompt'"):
        InputLayout("{text}{compression}", clean_space_newline=True)
    with pytest.raises(ValueError, match="unknown options"):
        InputLayout.from_spec({"template": "{text}{compression}", "strip": True})
    with pytest.raises(ValueError, match="needs an \\{instruction\\} slot"):
        InputLayout("{text}{compression}", text_as_instruction=True)
    assert InputLayout.from_spec("{image}{text}{compression}").spec == "{image}{text}{compression}"
    spec = RELEASED_PROCESSOR_SETTINGS["embedding_layout"]
    assert InputLayout.from_spec(spec).spec == spec


# ---- the plain API ------------------------------------------------------------------------------------------------
def test_the_plain_api_puts_the_text_in_the_instruction_slot(processor):
    image = random_image(7)
    block, compression = vision(processor, image), "".join(processor.compression_tokens)
    assert processor.decode(tokens(processor, "a red \n circle")) == "a red\n circle\n" + compression
    both = tokens(processor, {"image": image, "text": "What colour?"})
    assert both == expected(processor, block + " What colour?\n")
    with_instruction = tokens(processor, {"image": image, "text": "a cat", "instruction": "Find it."})
    assert with_instruction == expected(processor, block + " Find it. a cat\n")


def test_chat_messages_and_dicts_name_a_layout_the_same_way(processor):
    """How sentence-transformers reaches a named layout: a chat message carrying `layout` (the system message is the
    instruction, even empty)."""
    image = random_image(12)
    item = {"image": image, "instruction": "", "layout": "image_i2i_vg.candidate_without_text"}
    messages = [
        {"role": "system", "content": ""},
        {"role": "user", "content": [{"type": "image", "image": image}], "layout": item["layout"]},
    ]
    from_messages = processor.apply_chat_template(messages, tokenize=True)["input_ids"][0].tolist()
    assert from_messages == tokens(processor, item)
    clash = [{"role": "system", "content": "a", "layout": "image_cls.query"}, {**messages[1]}]
    with pytest.raises(CoMaInputError, match="field 'layout'.*several layouts"):
        processor.apply_chat_template(clash, tokenize=True)
    with pytest.raises(CoMaInputError, match="unknown keys \\['layouts'\\]"):
        processor.process_embedding_inputs([{"text": "a", "layouts": "image_cls.query"}])


def test_an_ordinary_processor_has_no_named_layouts_and_says_so():
    processor = tiny_coma()[1]
    assert processor.layouts == {} and processor._embedding_layout.mode == "parts"
    item = {"text": "tench", "layout": "image_cls.candidate"}
    with pytest.raises(CoMaInputError, match=r"sample 0, field 'layout'.*no layout named 'image_cls.candidate'"):
        processor.process_embedding_inputs([item])


# ---- images -------------------------------------------------------------------------------------------------------
def test_images_under_28_pixels_are_enlarged_to_56(processor, datasets):
    tiny = random_image(8, (20, 40))
    features = processor.process_embedding_inputs([{"image": tiny}])
    reference = processor.image_processor(images=[tiny.resize((56, 56))], return_tensors="pt")
    assert torch.equal(features["pixel_values"], reference["pixel_values"])
    assert features["image_grid_thw"].tolist() == [[1, 4, 4]]
    ordinary = tiny_coma()[1].process_embedding_inputs([{"image": tiny}])  # no enlargement configured
    assert ordinary["image_grid_thw"].tolist() != [[1, 4, 4]]
    wide_enough = random_image(9, (28, 40))
    untouched = processor.image_processor(images=[wide_enough], return_tensors="pt")["pixel_values"]
    assert torch.equal(processor.process_embedding_inputs([{"image": wide_enough}])["pixel_values"], untouched)
    assert datasets["ImageNet-1K"].rows[1]["query"].image.endswith(TINY_IMAGE)  # the evaluator's tiny image


def test_eval_image_bounds_are_recorded_in_tokens(processor):
    assert (processor.min_image_tokens, processor.max_image_tokens) == (4, EVAL_MAX_IMAGE_TOKENS) == (4, 1280)
    assert processor.image_processor.size == {"shortest_edge": 28 * 28 * 4, "longest_edge": 28 * 28 * 1280}
    large = Image.new("RGB", (1400, 1400))
    grid = processor.process_embedding_inputs([{"image": large}])["image_grid_thw"]
    assert int(grid.prod()) // 4 <= 1280 < (1400 // 28) ** 2


def test_images_are_read_as_stored_without_exif_orientation(processor, tmp_path):
    stored = Image.fromarray(np.random.RandomState(0).randint(0, 256, (56, 112, 3), dtype=np.uint8))
    exif = stored.getexif()
    exif[0x0112] = 6  # "rotate 90° clockwise to display"
    path = tmp_path / "sideways.jpg"
    stored.save(path, exif=exif, quality=95)
    released = processor.process_embedding_inputs([{"image": str(path)}])["image_grid_thw"].tolist()
    ordinary = tiny_coma()[1].with_settings(min_image_tokens=4, max_image_tokens=1280)
    upright = ordinary.process_embedding_inputs([{"image": str(path)}])["image_grid_thw"].tolist()
    assert released == [[1, 4, 8]] and upright == [[1, 8, 4]]  # 56 × 112 as stored; turned, 112 × 56


# ---- the loader ---------------------------------------------------------------------------------------------------
def test_the_loader_reads_the_instruct_field_layout(folder, datasets, tmp_path):
    assert set(datasets) == set(ROWS)
    for name, dataset in datasets.items():
        assert dataset.parser == PARSERS[name] == PARSER_OF[name]
        assert all({"query", "candidates"} <= set(row) for row in dataset.rows)
    assert datasets["OK-VQA"].meta_task == "VQA" and datasets["CIRR"].meta_task == "Retrieval"
    assert datasets["RefCOCO-Matching"].distribution == "OOD" and datasets["ImageNet-1K"].distribution == "IND"
    assert datasets["OK-VQA"].rows[0]["query"].image == str(folder / "images" / "qa" / "0.png")
    raw = load_mmeb_datasets(folder, names=["WebQA"])[0]
    assert is_instruct_rows(raw.rows) and raw.parser is None

    # a dataset outside MMEB needs its parser named (here by the manifest)
    (folder / "My-Classes.jsonl").write_text(json.dumps(ROWS["ImageNet-1K"][0]) + "\n")
    with pytest.raises(ValueError, match="No MMEB-V2 parser is known for dataset 'My-Classes'"):
        load_mmeb_v2_datasets(folder, names=["My-Classes"])
    manifest = json.loads((folder / "mmeb_manifest.json").read_text())
    (folder / "mmeb_manifest.json").write_text(json.dumps({**manifest, "parsers": {"My-Classes": "image_cls"}}))
    try:
        (mine,) = load_mmeb_v2_datasets(folder, names=["My-Classes"])
        assert mine.parser == "image_cls" and mine.rows[0]["query"].layout == "image_cls.query"
    finally:
        (folder / "My-Classes.jsonl").unlink()
        (folder / "mmeb_manifest.json").write_text(json.dumps(manifest))


def test_evaluation_datasets_are_read_as_the_data_format_says(folder, datasets):
    """`examples/evaluate.py --data_format`: auto reads instruct rows as `load_mmeb_v2_datasets`, mmeb as they are."""
    auto = load_evaluation_datasets(folder, names=["WebQA", "OK-VQA"])
    assert {dataset.name: dataset.rows for dataset in auto} == {
        name: datasets[name].rows for name in ("WebQA", "OK-VQA")
    }
    verbatim = load_evaluation_datasets(folder, names=["WebQA"], data_format="mmeb")[0]
    assert verbatim.parser is None and is_instruct_rows(verbatim.rows)
    with pytest.raises(ValueError, match="data_format must be one of"):
        load_evaluation_datasets(folder, data_format="mmeb_v3")


def test_a_bad_instruct_row_is_named_by_dataset_row_and_field(folder, tmp_path):
    (tmp_path / "WebQA.jsonl").write_text(
        json.dumps({**ROWS["WebQA"][0], "tgt_inst": None}) + "\n" + json.dumps(ROWS["WebQA"][1]) + "\n"
    )
    with pytest.raises(CoMaInputError, match=r"sample WebQA row 0, field 'tgt_inst': expected a string"):
        load_mmeb_v2_datasets(tmp_path)
    (tmp_path / "WebQA.jsonl").write_text(json.dumps({**ROWS["WebQA"][0], "tgt_text": ["a", "b"]}) + "\n")
    with pytest.raises(CoMaInputError, match=r"WebQA row 0, field 'tgt_text': has 2 entries for 3"):
        load_mmeb_v2_datasets(tmp_path)
    (tmp_path / "WebQA.jsonl").write_text(json.dumps({"qry_text": "x", "tgt_text": ["y"]}) + "\n")
    with pytest.raises(CoMaInputError, match="WebQA.*not in the MMEB-V2 instruct field layout"):
        as_instruct_dataset(load_mmeb_datasets(tmp_path)[0])


# ---- pooling ------------------------------------------------------------------------------------------------------
def test_a_converted_checkpoint_pools_the_last_compression_token(converted_model):
    model = converted_model
    batch = model.processor.process_embedding_inputs([{"image": random_image(10), "text": "a cat"}, "a dog"])
    with torch.no_grad():
        output = model(**batch)
    last = F.normalize(output.compression_states[:, -1], dim=-1)
    mean = F.normalize(output.compression_states.mean(dim=1), dim=-1)
    assert torch.allclose(output.pooler_output, last, atol=1e-6)
    assert not torch.allclose(output.pooler_output, mean, atol=1e-3)
    assert model.config.pooling == "last"


@pytest.fixture(scope="module")
def converted_model(tmp_path_factory):
    from test_convert_released import trained_backbone, write_released

    from coma_hf import CoMaModel, convert_released_checkpoint

    folder = tmp_path_factory.mktemp("released")
    convert_released_checkpoint(write_released(folder / "source", trained_backbone()), folder / "converted")
    model = CoMaModel.from_pretrained(folder / "converted").eval()
    saved = json.loads((folder / "converted" / "processor_config.json").read_text())
    for key, value in RELEASED_PROCESSOR_SETTINGS.items():
        if value is not None:
            assert saved[key] == value, key
    return model
