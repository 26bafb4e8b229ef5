"""Bad input from a person (`coma_hf.cli`): every example script's flags — a nonexistent path, a folder without images,
a checkpoint that is not CoMa, a negative or absurd batch size — stop before any model loads, with one line that names
the flag, says what is wrong and what to pass; a stage-2 checkpoint asked to answer warns. No traceback unless
`--debug` (or a DEBUG log level) asks for one."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest

from coma_hf import cli

from utils import load_example, random_image, tiny_coma

EXAMPLES = Path(__file__).parents[1] / "examples"


@pytest.fixture
def places(tmp_path) -> dict:
    """A fake CoMa checkpoint (its config only: the checks stop before loading), a checkpoint of another model, a
    folder of images, an empty folder and a folder of text files."""
    coma, bert, images, empty, texts = (tmp_path / name for name in ("coma", "bert", "images", "empty", "texts"))
    for folder in (coma, bert, images, empty, texts):
        folder.mkdir()
    (coma / "config.json").write_text(json.dumps({"model_type": "coma"}))
    (bert / "config.json").write_text(json.dumps({"model_type": "bert"}))
    random_image(0, (28, 28)).save(images / "a.png")
    (texts / "notes.txt").write_text("no image here")
    return {
        "coma": str(coma),
        "bert": str(bert),
        "images": str(images),
        "empty": str(empty),
        "texts": str(texts),
        "missing": str(tmp_path / "nowhere" / "deeper"),
        "root": tmp_path,
    }


def _stops(call, *expected: str) -> str:
    """The one-line message `call` stops with; it names each of `expected`."""
    with pytest.raises(SystemExit) as stopped:
        call()
    message = str(stopped.value.code)
    assert "\n" not in message
    for part in expected:
        assert part in message, (part, message)
    return message


# ---- the checks -----------------------------------------------------------------------------------------------------
def test_each_check_names_the_flag_the_problem_and_what_to_pass(places):
    _stops(lambda: cli.existing_folder(places["missing"], "--images"), "--images", "no such folder", "pass")
    _stops(lambda: cli.image_folder(places["empty"], "--images"), "holds no images", "pass a folder of images")
    _stops(lambda: cli.image_folder(places["texts"], "--images"), "holds no images")
    assert cli.image_folder(places["images"], "--images") == Path(places["images"])
    _stops(lambda: cli.existing_file(places["images"], "--jsonl"), "is a folder, not a file")
    _stops(lambda: cli.coma_checkpoint(places["bert"], "--model"), "not a CoMa checkpoint", "'bert'", "pretrain.py")
    _stops(lambda: cli.coma_checkpoint(places["missing"], "--model"), "no such folder here (nor a Hub id)")
    _stops(lambda: cli.coma_checkpoint(places["images"], "--model"), "holds no config.json")
    assert cli.coma_checkpoint(places["coma"], "--model") == {"model_type": "coma"}
    _stops(lambda: cli.backbone_checkpoint(places["bert"], "--model_name_or_path"), "not a supported backbone")
    for bad in (0, -3, cli.MAX_BATCH_SIZE + 1):
        _stops(lambda bad=bad: cli.batch_size(bad, "--batch_size"), f"--batch_size {bad}", "pass a batch size from 1")
    assert cli.batch_size(cli.MAX_BATCH_SIZE, "--batch_size") == cli.MAX_BATCH_SIZE


def test_a_hub_id_is_left_to_the_hub_and_a_local_looking_path_is_not(places, monkeypatch):
    monkeypatch.chdir(places["root"])
    assert cli.local_or_hub("org/coma", "--model", "a checkpoint") is None  # no folder "org" here: a Hub id
    (places["root"] / "outputs").mkdir()
    _stops(lambda: cli.local_or_hub("outputs/stage9", "--model", "a checkpoint"), "no such folder here")
    _stops(lambda: cli.local_or_hub("data/train.jsonl", "--dataset", "data"), "no such folder here")


def test_run_prints_one_line_and_a_traceback_only_when_asked(capsys):
    def main(argv):
        cli.batch_size(-1, "--batch_size")

    for argv, traceback in (([], False), (["--debug"], True), (["--log_level", "debug"], True)):
        with pytest.raises(SystemExit) as stopped:
            cli.run(main, argv)
        assert stopped.value.code == 2
        error = capsys.readouterr().err
        assert ("Traceback" in error) == traceback
        bounds = f"a batch size from 1 to {cli.MAX_BATCH_SIZE:,}"
        assert error.strip().splitlines()[-1].endswith(f"error: --batch_size -1: is not {bounds}; pass {bounds}")


# ---- every script ---------------------------------------------------------------------------------------------------
def _script_cases(p: dict) -> list[tuple[str, list[str], tuple[str, ...]]]:
    """`(script, argv, what the message names)` for each bad input each script takes."""
    coma, images = ["--model", p["coma"]], ["--images", p["images"]]
    out, jsonl = ["--output_dir", str(p["root"] / "out")], ["--output", "o.jsonl"]
    return [
        ("encode_corpus", ["--model", p["missing"], *images, *out], ("--model", "no such folder")),
        ("encode_corpus", ["--model", p["bert"], *images, *out], ("--model", "not a CoMa checkpoint")),
        ("encode_corpus", [*coma, "--images", p["empty"], *out], ("--images", "holds no images")),
        ("encode_corpus", [*coma, "--jsonl", p["missing"], *out], ("--jsonl", "no such file")),
        ("encode_corpus", [*coma, *images, *out, "--batch_size", "-4"], ("--batch_size -4",)),
        ("encode_corpus", [*coma, *images, *out, "--batch_size", "10000000"], ("--batch_size 10000000",)),
        ("encode_corpus", [*coma, *images, *out, "--shard_size", "0"], ("--shard_size 0",)),
        ("encode_corpus", [*coma, *images, "--output_dir", str(p["root"] / "coma" / "config.json")], ("is a file",)),
        ("search_corpus", [*coma, "--index_dir", p["missing"], "--query", "x"], ("--index_dir", "no such folder")),
        ("search_corpus", ["--model", p["bert"], "--index_dir", p["images"], "--query", "x"], ("not a CoMa",)),
        ("search_corpus", [*coma, "--index_dir", p["images"], "--query_image", p["missing"]], ("--query_image",)),
        ("search_corpus", [*coma, "--index_dir", p["images"], "--query", "x", "--top_k", "-1"], ("--top_k -1",)),
        ("evaluate", ["--model_name_or_path", p["bert"]], ("--model_name_or_path", "not a CoMa checkpoint")),
        ("evaluate", ["--model_name_or_path", p["coma"], "--data", p["missing"]], ("--data", "no such folder")),
        ("evaluate", ["--model_name_or_path", p["coma"], "--batch_size", "0"], ("--batch_size 0",)),
        ("evaluate", ["--model_name_or_path", p["coma"], "--image_root", p["missing"]], ("--image_root",)),
        ("push_to_hub", ["--model_name_or_path", p["missing"], "--repo_id", "o/n"], ("no such folder",)),
        ("push_to_hub", ["--model_name_or_path", p["bert"], "--repo_id", "o/n"], ("not a CoMa checkpoint",)),
        ("push_to_hub", ["--model_name_or_path", p["coma"], "--repo_id", "no id"], ("--repo_id", "owner/name")),
        ("push_to_hub", ["--model_name_or_path", p["coma"], "--repo_id", "o/n", "--eval_results", p["missing"]], ()),
        ("generate_qa", ["--model_name_or_path", p["coma"], *images, *jsonl], ("not an instruction",)),
        ("generate_qa", ["--model_name_or_path", p["bert"], "--images", p["empty"], *jsonl], ("no im",)),
        ("generate_qa", ["--model_name_or_path", p["bert"], *images, *jsonl, "--batch_size", "-2"], ()),
        ("generate_qa", ["--model_name_or_path", p["missing"], *images, *jsonl], ("no such folder",)),
        ("select_images", ["--mmeb_train", p["missing"], *jsonl], ("--mmeb_train", "no such")),
        ("select_images", ["--mmeb_train", p["images"], "--output", p["empty"]], ("--output", "is a folder")),
        ("select_images", ["--mmeb_train", p["images"], *jsonl, "--per_subset", "0"], ("--per_subset",)),
        ("convert_released", ["--source", p["missing"]], ("--source", "no such folder")),
        ("convert_released", ["--source", p["empty"]], ("--source", "neither config.json")),
        ("convert_released", ["--source", p["bert"], "--num_compression_tokens", "-1"], ("--num_compression_tokens",)),
        ("pretrain", ["--model_name_or_path", p["missing"]], ("--model_name_or_path", "no such folder")),
        ("pretrain", ["--model_name_or_path", p["bert"]], ("not a supported backbone", "'bert'")),
        ("pretrain", ["--per_device_train_batch_size", "-1"], ("--per_device_train_batch_size -1",)),
        ("pretrain", ["--dataset", p["missing"]], ("--dataset", "no such")),
        ("train_contrastive", ["--model_name_or_path", p["bert"]], ("not a CoMa checkpoint",)),
        ("train_contrastive", ["--model_name_or_path", p["missing"]], ("no such folder",)),
        ("train_contrastive", ["--model_name_or_path", p["coma"], "--per_device_eval_batch_size", "0"], ("eval",)),
        ("train_contrastive", ["--from_backbone", "true", "--backbone", p["bert"]], ("--backbone",)),
        ("train_reader", ["--per_device_train_batch_size", "0"], ("--per_device_train_batch_size 0",)),
        ("train_reader", ["--eval_batch_size", "1000000"], ("--eval_batch_size 1000000",)),
        ("app", ["--model_name_or_path", p["bert"], *images], ("--model_name_or_path", "not a CoMa checkpoint")),
        ("app", ["--model_name_or_path", p["coma"], "--images", p["missing"]], ("--images", "no such folder")),
        ("app", ["--model_name_or_path", p["coma"], *images, "--generator_name_or_path", p["bert"]], ("--generator",)),
        ("app", ["--model_name_or_path", p["coma"], *images, "--batch_size", "-8"], ("--batch_size -8",)),
        ("app", ["--model_name_or_path", p["coma"], *images, "--concurrency", "0"], ("--concurrency 0",)),
    ]


def test_every_script_stops_bad_flags_with_one_line_before_loading_anything(places, monkeypatch):
    monkeypatch.chdir(places["root"])  # outputs/ of the defaults do not exist here
    scripts = {}
    for script, argv, expected in _script_cases(places):
        module = scripts.setdefault(script, load_example(script))
        flag = next(argument for argument in argv[::-1] if argument.startswith("--") and argument != "--output_dir")
        with pytest.raises(cli.UsageError) as stopped:
            module.main(argv)
        message = str(stopped.value.code)
        assert "\n" not in message and "; pass" in message, (script, argv, message)
        for part in expected or (flag,):
            assert part in message, (script, argv, message)


def test_a_script_run_from_the_shell_prints_one_line_and_no_traceback(places):
    argv = [sys.executable, str(EXAMPLES / "encode_corpus.py"), "--model", places["bert"]]
    argv += ["--images", places["images"], "--output_dir", str(places["root"] / "out")]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip() == (
        f"encode_corpus.py: error: --model {places['bert']}: not a CoMa checkpoint (its model_type is 'bert'); "
        f"{cli.MAKE_A_COMA_CHECKPOINT}"
    )
    debug = subprocess.run([*argv, "--debug"], capture_output=True, text=True, timeout=300)
    assert debug.returncode == 2 and "Traceback" in debug.stderr and "UsageError" in debug.stderr


# ---- a stage-2 checkpoint asked to answer ---------------------------------------------------------------------------
def test_a_stage_two_checkpoint_asked_to_answer_warns(places, caplog):
    import torch

    from coma_hf import modeling_coma

    model, _ = tiny_coma(num_compression_tokens=4)
    compression = model.compress(**model.processor.process_compression_inputs([{"image": None, "text": "a cat"}]))
    logging.Logger.warning_once.cache_clear()  # transformers' once-per-process memory
    with caplog.at_level(logging.WARNING):
        model.generate_from_compression(compression, ["What is it?"], max_new_tokens=2)
        assert modeling_coma.NOT_TRAINED_TO_ANSWER not in caplog.text  # untrained: no stage recorded
        model.config.training_stage = 1
        model.generate_from_compression(compression, ["What is it?"], max_new_tokens=2)
        assert modeling_coma.NOT_TRAINED_TO_ANSWER not in caplog.text
        model.config.training_stage = 2
        answer = model.generate_from_compression(compression, ["What is it?"], max_new_tokens=2)
    assert modeling_coma.NOT_TRAINED_TO_ANSWER in caplog.text and isinstance(answer[0], str)  # a warning, not a stop
    with pytest.raises(ValueError, match="training_stage"):
        type(model.config)(backbone_config=model.config.backbone_config.to_dict(), training_stage=3)
    assert torch.is_tensor(compression.compression_states)

    # the demo's check (--generator_name_or_path): the config's stage, else the run records of older checkpoints
    assert "never trained to answer" in cli.answering_warning(places["coma"], {"training_stage": 2})
    assert cli.answering_warning(places["coma"], {"training_stage": 1}) is None
    (Path(places["coma"]) / "contrastive_summary.json").write_text("{}")
    assert "stage-2 (contrastive)" in cli.answering_warning(places["coma"], {"model_type": "coma"})
