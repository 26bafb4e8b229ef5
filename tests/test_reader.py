"""The pre-trained reader: the training script writes a reader that loads as the stock model and as a CoMa backbone;
the shipped one is small, marked as the embedded backbone, reads as its record says, and carries the package's
tokenizer; its training format is CoMa's stage-1 format without the compression tokens."""

from __future__ import annotations

import configparser
import fnmatch
import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from coma_hf import CoMaModel
from coma_hf.backbones import get_family
from coma_hf.configuration_coma import is_embedded_backbone
from coma_hf.data.synthetic import HELD_OUT_COMBINATIONS, QUESTION_TYPES
from coma_hf.reader import (
    CAPTION_QUESTION,
    RECORD_FILE,
    ReaderCollator,
    ReaderTrainingScenes,
    load_reader,
    reader_answer_accuracy,
    reader_path,
    reader_processor,
    reader_record,
    scene_samples,
)
from coma_hf.tiny import build_tiny_coma, build_tokenizer
from coma_hf.training.recipes import recipe_of_start

from utils import command_line, load_example, tiny_coma

ROOT = Path(__file__).parents[1]
MAX_PARAMETERS = 1_500_000
MAX_WEIGHT_BYTES = 6_000_000


@pytest.fixture(scope="module")
def shipped():
    """The shipped reader, its reader processor and its record."""
    model, parts = load_reader()
    record = reader_record()
    return model, reader_processor(parts, max_length=record["model"]["max_length"]), record


@pytest.mark.slow
def test_a_quick_run_writes_a_reader_that_loads_as_the_stock_model_and_as_a_coma_backbone(tmp_path):
    output = tmp_path / "reader"
    record = load_example("train_reader").main(["--quick", "--output_dir", str(output)])
    assert record["steps"] == 2 and json.loads((output / RECORD_FILE).read_text())["steps"] == 2
    assert record["evaluation"]["num_questions"] > 0
    assert set(record["evaluation"]["per_type"]) <= set(QUESTION_TYPES)

    stock, parts = load_reader(output)
    assert type(stock) is get_family("qwen2_5_vl").generation_class
    assert recipe_of_start(str(output))[0] == "tiny"  # the marker in its config.json

    model = CoMaModel.from_backbone(str(output), num_compression_tokens=4)
    assert model.config.embedded_backbone  # inherited from the reader's config
    coma, _ = build_tiny_coma(reader=output, num_compression_tokens=4)
    assert coma.config.embedded_backbone and coma.config.backbone_name_or_path is None
    for wrapped in (model, coma):  # the reader's weights, unchanged, under the stock key names
        weights = wrapped.model.state_dict()
        for name, value in stock.model.state_dict().items():
            if name != "language_model.embed_tokens.weight":  # grown by the compression rows
                assert torch.equal(weights[name], value), name
        rows = stock.model.language_model.embed_tokens.weight
        assert torch.equal(weights["language_model.embed_tokens.weight"][: len(rows)], rows)


def test_the_shipped_reader_is_small_and_marked_as_the_embedded_backbone(shipped):
    model, _, record = shipped
    folder = reader_path()
    parameters = sum(parameter.numel() for parameter in model.parameters())
    assert parameters == record["model"]["parameters"] <= MAX_PARAMETERS
    assert (folder / "model.safetensors").stat().st_size == record["weight_bytes"] <= MAX_WEIGHT_BYTES
    with safe_open(folder / "model.safetensors", "pt") as weights:
        assert {weights.get_tensor(name).dtype for name in weights.keys()} == {torch.float32}
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == "qwen2_5_vl" and is_embedded_backbone(config)
    assert recipe_of_start(str(folder))[0] == "tiny"
    for key in ("command", "seed", "steps", "num_train_scenes", "train_seconds", "machine", "evaluation"):
        assert key in record, key


def test_the_shipped_reader_reads_its_recorded_subset_as_recorded(shipped):
    model, processor, record = shipped
    subset = record["evaluation"]["subset"]
    rows = scene_samples("dev", subset["num_scenes"], record["seed"], record["model"]["scene_size"])
    result = reader_answer_accuracy(model, processor, rows, batch_size=subset["batch_size"], show_progress_bar=False)
    assert result["num_questions"] == subset["num_questions"]
    assert result["max_new_tokens"] == subset["max_new_tokens"]
    assert result["accuracy"] == pytest.approx(subset["accuracy"])
    assert result["per_type"] == pytest.approx(subset["per_type"])


@pytest.mark.slow
def test_the_shipped_reader_reads_the_dev_scenes_as_recorded(shipped):
    model, processor, record = shipped
    evaluation = record["evaluation"]
    rows = scene_samples("dev", evaluation["num_scenes"], record["seed"], record["model"]["scene_size"])
    result = reader_answer_accuracy(
        model, processor, rows, batch_size=evaluation["subset"]["batch_size"], show_progress_bar=False
    )
    assert result["num_questions"] == evaluation["num_questions"]
    assert result["accuracy"] == pytest.approx(evaluation["overall"]["reader"])
    assert result["per_type"] == pytest.approx({kind: row["reader"] for kind, row in evaluation["per_type"].items()})


def test_the_tokenizer_the_package_builds_is_the_shipped_one(shipped):
    _, processor, _ = shipped
    built, loaded = build_tokenizer(), processor.tokenizer
    assert json.loads(built.backend_tokenizer.to_str()) == json.loads(loaded.backend_tokenizer.to_str())
    assert built.get_vocab() == loaded.get_vocab()
    assert built.special_tokens_map == loaded.special_tokens_map
    assert (built.chat_template, built.padding_side) == (loaded.chat_template, loaded.padding_side)
    text = "<|im_start|>user\nWhat colour is the triangle?<|im_end|>"
    assert built(text)["input_ids"] == loaded(text)["input_ids"]


def test_setup_cfg_ships_every_reader_file():
    parser = configparser.ConfigParser()
    parser.read(ROOT / "setup.cfg")
    patterns = [pattern.strip() for pattern in parser["options.package_data"]["coma_hf"].split(",")]
    package = ROOT / "coma_hf"
    files = [path.relative_to(package).as_posix() for path in reader_path().iterdir()]
    assert {"model.safetensors", "config.json", "tokenizer.json", RECORD_FILE} <= {Path(name).name for name in files}
    for name in files:
        assert any(fnmatch.fnmatch(name, pattern) for pattern in patterns), name


def test_the_reader_trains_on_the_stage1_layout_without_the_compression_tokens():
    model, coma_processor = tiny_coma()
    reader = reader_processor(coma_processor, 16, 16)  # the same tokenizer and image processor, K = 0
    sample = scene_samples("train", 1)[0]
    batch = ReaderCollator(reader)([sample])
    stage1 = coma_processor.render_qa_sample(sample["image"], None, sample["conversation"])
    compression = set(coma_processor.compression_token_ids)
    keep = [index for index, token in enumerate(stage1.input_ids) if token not in compression]
    assert batch["input_ids"][0].tolist() == [stage1.input_ids[index] for index in keep]
    assert batch["labels"][0].tolist() == [stage1.labels[index] for index in keep]
    assert torch.equal(batch["pixel_values"], stage1.pixel_values)


def test_the_reader_never_trains_on_dev_scenes_or_held_out_combinations():
    scenes = ReaderTrainingScenes(200, all_question_types=True)
    assert all(scene.split == "train" for scene, _ in scenes.rows)
    pairs = {(obj.colour, obj.shape) for scene, _ in scenes.rows for obj in scene.shapes}
    assert pairs.isdisjoint(HELD_OUT_COMBINATIONS)
    # one question of every type the scene allows, one caption turn; or the scene's own stage-1 questions
    sample = scenes[0]
    kinds = [turn["type"] for turn in sample["conversation"]]
    assert kinds.count("caption") == 1 and len(set(kinds)) == len(kinds)
    assert {"count", "text"} <= set(kinds) <= {*QUESTION_TYPES, "caption", "description"}
    own = ReaderTrainingScenes(4, all_question_types=False, description_share=0.0)
    for index in range(len(own)):
        turns = own[index]["conversation"]
        assert [turn for turn in turns if turn["type"] in QUESTION_TYPES] == own.rows[index][1]["conversation"]
        assert [turn["question"] for turn in turns if turn["type"] == "caption"] == [CAPTION_QUESTION]


def test_a_tiny_coma_from_the_reader_keeps_the_reader_family():
    with pytest.raises(ValueError, match="not qwen2_vl"):
        build_tiny_coma("qwen2_vl", reader=True)
    with pytest.raises(ValueError, match="backbone_config"):
        build_tiny_coma(reader=True, tokenizer=build_tokenizer())


def test_the_scripts_start_from_the_reader_unless_told_random(tmp_path):
    """`pretrain.py` builds the embedded backbone from the shipped reader by default (at learning rate 0 its weights
    stay the reader's, fresh compression rows aside); `--tiny_init random` keeps the random-weight backbone of the
    `tiny_*` sizes. `train_contrastive.py --from_backbone` builds its model the same way (`build_coma`)."""
    reader = load_reader()[0].state_dict()
    toy = command_line(
        "--num_train_scenes 8 --num_dev_scenes 2 --num_test_scenes 2 --scene_size 56 --max_steps 1 --learning_rate 0"
        " --per_device_train_batch_size 2 --max_eval_samples 2 --dataloader_num_workers 0 --num_compression_tokens 2"
        " --min_image_tokens 4 --max_image_tokens 4",
        synthetic_dir=tmp_path / "synthetic",
    )
    for tiny_init in ("reader", "random"):
        output = tmp_path / tiny_init
        extra = [] if tiny_init == "reader" else ["--tiny_init", "random"]
        load_example("pretrain").main(toy + extra + command_line(output_dir=output))
        weights = CoMaModel.from_pretrained(output).state_dict()
        shared = [name for name in reader if "embed_tokens" not in name and name != "lm_head.weight"]
        same = [name in weights and torch.equal(weights[name], reader[name]) for name in shared]
        assert all(same) if tiny_init == "reader" else not any(same)
