"""Checkpoints saved by earlier versions keep loading and give the vectors they gave then.

`tests/fixtures/coma_v0_stage2` is a tiny stage-2 checkpoint saved by coma_hf 0.1.0 with its own remote code, an input
image and that version's vectors (`tests/fixtures/make_v0_checkpoint.py` wrote it).
"""

from __future__ import annotations

import json
import shutil
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from utils import run_without_coma

FIXTURE = Path(__file__).parent / "fixtures" / "coma_v0_stage2"
TEXT = "a red circle left of a blue square"
QUESTION = "What colour is the circle?"
PROCESSOR_FILE = "processor_config.json"

# A fresh interpreter in which `import coma_hf` fails (`run_without_coma`): the checkpoint's own remote code, through
# AutoModel and SentenceTransformer.
CHILD = textwrap.dedent(
    """
    import sys
    import torch
    from safetensors.torch import save_file
    from sentence_transformers import SentenceTransformer
    from transformers import AutoModel

    folder, text, question, output = sys.argv[1:5]
    image = folder + "/input.png"
    mixed = [{"image": image}, text, {"image": image, "text": question}]
    model = AutoModel.from_pretrained(folder, trust_remote_code=True).eval()
    st = SentenceTransformer(folder, trust_remote_code=True, device="cpu")
    encode = lambda **kwargs: st.encode(mixed, convert_to_tensor=True, **kwargs).float().contiguous()
    save_file({
        "auto_encode": model.encode(mixed), "auto_query": model.encode_query(mixed),
        "auto_document": model.encode_document(mixed), "st_encode": encode(),
        "st_query": encode(prompt_name="query"), "st_document": encode(prompt_name="document"),
    }, output)
    """
)


def _copy(tmp_path) -> Path:
    folder = tmp_path / "checkpoint"
    shutil.copytree(FIXTURE, folder)
    return folder


@pytest.mark.slow
def test_old_checkpoint_gives_its_vectors_through_its_remote_code(tmp_path):
    folder = _copy(tmp_path)
    run_without_coma(CHILD, [folder, TEXT, QUESTION, tmp_path / "out.safetensors"], tmp_path / "home", tmp_path)
    got, expected = (
        load_file(str(tmp_path / "out.safetensors")),
        load_file(str(FIXTURE / "expected_vectors.safetensors")),
    )
    for path in ("auto", "st"):
        for name, stored in (("encode", "encode"), ("query", "encode_query"), ("document", "encode_document")):
            torch.testing.assert_close(got[f"{path}_{name}"], expected[stored], atol=1e-5, rtol=0)


def test_old_checkpoint_gives_its_vectors_through_the_installed_package(tmp_path):
    from coma_hf import CoMaModel

    folder = _copy(tmp_path)
    model = CoMaModel.from_pretrained(folder).eval()
    assert type(model).__module__.startswith("coma_hf.")  # the package's class, not the checkpoint's copy
    image = str(folder / "input.png")
    mixed = [{"image": image}, TEXT, {"image": image, "text": QUESTION}]
    expected = load_file(str(FIXTURE / "expected_vectors.safetensors"))
    torch.testing.assert_close(model.encode(mixed), expected["encode"], atol=1e-5, rtol=0)
    torch.testing.assert_close(model.encode_query(mixed), expected["encode_query"], atol=1e-5, rtol=0)
    torch.testing.assert_close(model.encode_document(mixed), expected["encode_document"], atol=1e-5, rtol=0)
    assert not torch.allclose(expected["encode_query"], expected["encode_document"], atol=1e-3)  # not vacuous


def test_an_old_config_keeps_its_own_layout_settings(tmp_path):
    """A folder saved before the processor owned the token layout: `query_instruction` and `loss_on` (not the
    defaults) in `config.json`, none in `processor_config.json`. They stay in effect, and a save moves them to the
    processor's config."""
    from coma_hf import CoMaModel
    from coma_hf.configuration_coma import LEGACY_PROCESSOR_SETTINGS
    from coma_hf.hub.card import render_model_card
    from coma_hf.training import CoMaCompressionCollator

    from utils import random_image, tiny_coma

    model, processor = tiny_coma()
    folder = tmp_path / "old"
    model.save_pretrained(folder)
    config, saved_processor = (json.loads((folder / name).read_text()) for name in ("config.json", PROCESSOR_FILE))
    assert not set(LEGACY_PROCESSOR_SETTINGS) & set(config)  # a new config never carries them
    layout = {key: saved_processor.pop(key) for key in LEGACY_PROCESSOR_SETTINGS}
    layout.update(query_instruction="Search the collection for:", loss_on="all_after_compression")
    assert (layout["query_instruction"], layout["loss_on"]) != (processor.query_instruction, processor.loss_on)
    (folder / "config.json").write_text(json.dumps({**config, **layout}))
    (folder / PROCESSOR_FILE).write_text(json.dumps(saved_processor))

    old = CoMaModel.from_pretrained(folder).eval()
    assert old.processor.query_instruction == "Search the collection for:"
    assert old.processor.loss_on == "all_after_compression"
    inputs = ["a red circle", random_image(0)]
    torch.testing.assert_close(
        old.encode_query(inputs), model.encode(inputs, instruction="Search the collection for:"), atol=1e-5, rtol=0
    )
    torch.testing.assert_close(old.encode_document(inputs), model.encode_document(inputs), atol=1e-5, rtol=0)
    turns = [{"question": "What colour?", "answer": "red"}]
    batch = CoMaCompressionCollator(old.processor)([{"id": "x", "text": "a red circle", "conversation": turns}])
    labelled = batch["labels"][batch["labels"] != -100].tolist()
    assert old.processor.decode(labelled).startswith("<|im_start|>user\nWhat colour?")  # all after compression
    assert "all_after_compression" in str(render_model_card(folder))  # the card reads config.json's

    old.save_pretrained(tmp_path / "resaved")
    resaved = json.loads((tmp_path / "resaved" / "config.json").read_text())
    assert not set(LEGACY_PROCESSOR_SETTINGS) & set(resaved)
    resaved_processor = json.loads((tmp_path / "resaved" / PROCESSOR_FILE).read_text())
    assert {key: resaved_processor[key] for key in layout} == layout
    prompts = json.loads((tmp_path / "resaved" / "config_sentence_transformers.json").read_text())["prompts"]
    assert prompts["query"] == "Search the collection for:"
    again = CoMaModel.from_pretrained(tmp_path / "resaved").eval()
    torch.testing.assert_close(again.encode_query(inputs), old.encode_query(inputs), atol=1e-5, rtol=0)
    assert again.processor.loss_on == "all_after_compression"


def test_the_processor_names_before_0_2_0_still_work_and_warn(model_and_processor):
    _, processor = model_and_processor
    inputs = [{"image": None, "text": TEXT}]
    sample = {"image": None, "text": TEXT, "conversation": [{"question": QUESTION, "answer": "red"}]}
    with pytest.deprecated_call(match="process_embedding_inputs"):
        old = processor.process_for_embedding(inputs)
    assert torch.equal(old["input_ids"], processor.process_embedding_inputs(inputs)["input_ids"])
    with pytest.deprecated_call(match="process_qa_samples"):
        old = processor.process_for_compression([sample])
    assert torch.equal(old["labels"], processor.process_qa_samples([sample])["labels"])
    with pytest.deprecated_call(match="render_qa_sample"):
        old = processor.render_compression_sample(None, TEXT, sample["conversation"])
    assert old.input_ids == processor.render_qa_sample(None, TEXT, sample["conversation"]).input_ids


def test_callers_fall_back_to_the_old_names_on_a_processor_from_before_the_rename(tmp_path):
    from transformers.dynamic_module_utils import get_class_from_dynamic_module

    from coma_hf import CoMaProcessor
    from coma_hf.processing_coma import processor_method
    from coma_hf.training import CoMaCompressionCollator

    folder = tmp_path / FIXTURE.name  # the fixture's module name, which the deprecation filters exempt
    shutil.copytree(FIXTURE, folder)
    old = get_class_from_dynamic_module("processing_coma.CoMaProcessor", str(folder)).from_pretrained(folder)
    new = CoMaProcessor.from_pretrained(folder)
    assert not hasattr(old, "process_embedding_inputs") and not hasattr(old, "render_qa_sample")
    inputs = [{"image": str(folder / "input.png"), "text": TEXT}, TEXT]
    got = processor_method(old, "process_embedding_inputs")(inputs)
    assert torch.equal(got["input_ids"], new.process_embedding_inputs(inputs)["input_ids"])
    row = {"id": "r", "text": TEXT, "conversation": [{"question": QUESTION, "answer": "red"}]}
    batches = [CoMaCompressionCollator(processor)([row]) for processor in (old, new)]
    assert torch.equal(batches[0]["labels"], batches[1]["labels"])


@pytest.mark.slow
def test_stage_two_trains_from_a_checkpoint_saved_before_the_rename(tmp_path):
    from utils import command_line, load_example

    output = tmp_path / "stage2"
    summary = load_example("train_contrastive").main(
        command_line(
            "--recipe tiny --max_steps 2 --per_device_train_batch_size 4 --per_device_eval_batch_size 8"
            " --dataloader_num_workers 0 --cached false --report_to none --max_train_scenes 4",
            model_name_or_path=_copy(tmp_path),
            synthetic_dir=tmp_path / "synthetic",
            output_dir=output,
        )
    )
    assert summary["global_steps"] == 2 and (output / "model.safetensors").is_file()


def test_names_that_moved_in_0_2_0_still_import_from_their_old_place_with_a_warning():
    from coma_hf.evaluation import mmeb_v2
    from coma_hf.released import evaluation
    from coma_hf.training import building, recipes

    with pytest.deprecated_call(match="moved to coma_hf.released.evaluation"):
        assert mmeb_v2.RELEASED_PROCESSOR_SETTINGS is evaluation.RELEASED_PROCESSOR_SETTINGS
    with pytest.deprecated_call(match="moved to coma_hf.training.building"):
        assert recipes.build_coma is building.build_coma
    with pytest.raises(AttributeError):
        _ = recipes.no_such_name
