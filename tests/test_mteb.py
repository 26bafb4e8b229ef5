"""CoMa in MTEB / MIEB (`coma_hf.integrations.mteb`, `.mteb_tasks`, `examples/evaluate_mteb.py`), offline: mteb's
mock tasks, the mini-MMEB as mteb tasks cross-checked against `MMEBEvaluator`, instructions, the model card."""

from __future__ import annotations

import json
import sys

import pytest
import torch

if sys.version_info < (3, 11):  # the [mteb] extra's marker; from 3.11 on the dev extra installs it, and it must import
    pytest.skip("mteb needs Python >= 3.11", allow_module_level=True)

import mteb  # noqa: E402
from mteb.types import PromptType  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

from coma_hf.data.mini_mmeb import write_mini_mmeb  # noqa: E402
from coma_hf.evaluation.mmeb import MMEBEvaluator, gold_ranks, load_mmeb_datasets  # noqa: E402
from coma_hf.hub.card import mteb_summary  # noqa: E402
from coma_hf.integrations.mteb import CoMaEncoder, batch_inputs, from_sentence_transformer, load  # noqa: E402
from coma_hf.integrations.mteb_tasks import MMEBRetrievalTask, MMEBZeroShotTask, mmeb_task, mmeb_tasks  # noqa: E402

from utils import TINY_MODEL_ARGS, command_line, load_example, tiny_coma, tiny_sentence_transformer  # noqa: E402


@pytest.fixture(scope="module")
def mini(tmp_path_factory):
    root = tmp_path_factory.mktemp("synthetic")
    write_mini_mmeb(root, num_train=12, num_dev=4, num_test=12, image_size=56)
    return root / "mini_mmeb"


@pytest.fixture(scope="module")
def trained(tmp_path_factory, mini):
    """A tiny checkpoint trained for a few stage-2 steps on the mini-MMEB's training pairs (from the backbone)."""
    output = tmp_path_factory.mktemp("stage2")
    arguments = (
        TINY_MODEL_ARGS
        + (
            "--from_backbone --recipe tiny --max_steps 8 --per_device_train_batch_size 8"
            " --per_device_eval_batch_size 16 --dataloader_num_workers 0 --cached false --report_to none"
            " --eval_datasets Mini-Count"
        ).split()
    )
    load_example("train_contrastive").main(arguments + command_line(synthetic_dir=mini.parent, output_dir=output))
    return output


def _failures(report) -> dict:
    return {name: status for name, status in report.items() if status is not None and not hasattr(status, "scores")}


def test_the_wrapper_passes_mtebs_mock_tasks_for_image_and_text():
    model, _ = tiny_coma()
    report = mteb.mock_run(CoMaEncoder(model))
    assert report.all_passed, _failures(report)
    ran = {row[1]: row[0] for row in report.modality_summary()}
    assert ran["image"].startswith("✓") and ran["text"].startswith("✓")  # image tasks ran, not skipped


def test_mtebs_own_sentence_transformer_wrapper_runs_a_coma_checkpoint_with_its_modalities(tmp_path_factory):
    model = tiny_sentence_transformer(tmp_path_factory)
    wrapper = from_sentence_transformer(model, name="local/tiny")
    assert wrapper.mteb_model_meta.modalities == ["image", "text"]
    report = mteb.mock_run(wrapper)
    assert report.all_passed, _failures(report)
    assert {row[1]: row[0] for row in report.modality_summary()}["image"].startswith("✓")


def test_model_meta_names_what_defines_the_embedding(tmp_path):
    model, _ = tiny_coma()
    model.save_pretrained(tmp_path / "tiny-coma")
    meta = load(tmp_path / "tiny-coma").mteb_model_meta
    assert meta.name == "local/tiny-coma" and meta.modalities == ["image", "text"]
    assert meta.embed_dim == model.config.embedding_size and meta.similarity_fn_name.value == "cosine"
    assert meta.use_instructions is True and len(meta.revision) == 16  # the weights' sha256, for a folder
    assert meta.experiment_kwargs == {"num_compression_tokens": 4, "pooling": "mean", "attention_rule": "bottleneck"}
    assert CoMaEncoder(model, revision="abc").mteb_model_meta.revision == "abc"


def test_each_mini_mmeb_dataset_becomes_the_task_its_rows_are(mini):
    tasks = {task.metadata.name: task for task in mmeb_tasks(mini / "test")}
    assert isinstance(tasks["MMEB-Mini-Count"], MMEBZeroShotTask)
    assert tasks["MMEB-Mini-Count"].get_candidate_labels() == sorted(["one", "two", "three"])
    retrieval = tasks["MMEB-Mini-Caption2Image"]
    assert isinstance(retrieval, MMEBRetrievalTask) and retrieval.metadata.category == "t2i"
    assert tasks["MMEB-Mini-Grounding"].metadata.category == "it2i"
    assert tasks["MMEB-Mini-VQA"].metadata.category == "it2t"
    rows = load_mmeb_datasets(mini / "test", ["Mini-Caption2Image"])[0].rows
    split = retrieval.split_data
    corpus = dict(zip(split["corpus"]["id"], split["corpus"].with_format("python")["image"], strict=True))
    for index, row in enumerate(rows):  # each query ranks exactly its own row's candidates; the gold is relevant
        ranked = split["top_ranked"][f"q{index}"]
        assert len(ranked) == len(row["tgt_img_path"])
        assert split["relevant_docs"][f"q{index}"] == {ranked[0]: 1}
        assert corpus[ranked[0]].filename.endswith(row["tgt_img_path"][0])


def _loader(texts: list[str]) -> DataLoader:
    return DataLoader(
        [{"text": text} for text in texts], batch_size=4, collate_fn=lambda rows: {"text": [r["text"] for r in rows]}
    )


def test_an_mmeb_row_gets_no_second_instruction_and_a_prompted_task_gets_its_own(mini):
    model, _ = tiny_coma()
    encoder = CoMaEncoder(model)
    task = mmeb_task(load_mmeb_datasets(mini / "test", ["Mini-Caption2Image"])[0])
    query = task.split_data["queries"]["text"][0]  # "Find me an image that matches the given caption: …"
    assert query.startswith("Find me an image")
    as_mmeb = encoder.encode(
        _loader([query]),
        task_metadata=task.metadata,
        hf_split="test",
        hf_subset="default",
        prompt_type=PromptType.query,
    )
    assert torch.allclose(torch.from_numpy(as_mmeb), model.encode([query]), atol=1e-6)  # the row as it is

    # the same row in a task of another dataset, with a prompt of its own
    prompted = task.metadata.model_copy(
        update={"prompt": "Retrieve the picture.", "dataset": {"path": "x", "revision": "1"}}
    )
    with_prompt = encoder.encode(
        _loader([query]), task_metadata=prompted, hf_split="test", hf_subset="default", prompt_type=PromptType.query
    )
    assert torch.allclose(
        torch.from_numpy(with_prompt), model.encode([query], instruction="Retrieve the picture."), atol=1e-6
    )
    assert not torch.allclose(torch.from_numpy(with_prompt), torch.from_numpy(as_mmeb), atol=1e-3)
    # a document of a task with one prompt for both sides gets the processor's document instruction, as encode_document
    assert encoder.instruction(prompted, PromptType.document) == model.processor.document_instruction
    by_side = prompted.model_copy(update={"prompt": {"query": "q?", "document": "d!"}})
    assert encoder.instruction(by_side, PromptType.document) == "d!"
    assert encoder.instruction(by_side, PromptType.query) == "q?"
    query_only = prompted.model_copy(update={"prompt": {"query": "q?"}})  # most of MIEB's retrieval tasks
    assert encoder.instruction(query_only, PromptType.document) == model.processor.document_instruction
    assert encoder.instruction(query_only, None) is None  # a prompt dict read without a side is no instruction


def test_batches_become_one_input_per_row():
    image = object()
    assert batch_inputs({"image": [image, None], "text": ["a", ""]}) == [{"image": image, "text": "a"}, {}]
    assert batch_inputs({"text": ["x", "y"]}) == [{"text": "x"}, {"text": "y"}]


def _untied(evaluator: MMEBEvaluator, model, dataset) -> bool:
    scores = evaluator.score_dataset(lambda items: model.encode([item.as_input() for item in items]), dataset)
    return all(not bool((row[1:] == row[0]).any()) for row in scores)


@pytest.mark.slow
def test_one_command_scores_a_trained_checkpoint_as_mmeb_evaluator_does(trained, mini, tmp_path):
    results = load_example("evaluate_mteb").main(
        command_line(model_name_or_path=trained, data=mini / "test", output_dir=tmp_path / "mteb")
    )
    scores = {result.task_name: result.scores["test"][0]["main_score"] for result in results.task_results}
    datasets = load_mmeb_datasets(mini / "test")
    assert len(scores) == len(datasets) == 11
    model = load(trained).model
    evaluator = MMEBEvaluator(datasets, show_progress_bar=False)
    ours = evaluator(model)["datasets"]
    for dataset in datasets:  # no tie in these rows, so the definitions coincide: recall@1 / accuracy == P@1
        assert _untied(evaluator, model, dataset), dataset.name
        assert scores[f"MMEB-{dataset.name}"] == pytest.approx(
            ours[dataset.name]["precision@1"], abs=1e-5
        )  # mteb: 5 decimals
    assert len({round(value, 6) for value in scores.values()}) > 2  # trained: not one score everywhere

    # the results folder is mteb's; its main scores go into a card's model-index
    summary = mteb_summary(tmp_path / "mteb")
    assert {task["task_name"] for task in summary["tasks"]} == set(scores)
    upload = tmp_path / "upload"
    load_example("push_to_hub").main(
        ["--dry_run", *command_line(model_name_or_path=trained, repo_id="org/coma", output_dir=upload)]
        + command_line(mteb_results=tmp_path / "mteb")
    )
    card = (upload / "README.md").read_text()
    assert "type: local/MMEB-Mini-Count" in card and f"value: {round(100 * scores['MMEB-Mini-Count'], 2)}" in card
    assert json.loads((upload / "mteb_results.json").read_text()) == summary


def test_a_tie_is_a_miss_for_mmeb_evaluator_and_broken_by_mteb(mini):
    """Where the definitions differ: a model that embeds everything alike ties every candidate with the gold."""
    model, _ = tiny_coma()

    class Constant(CoMaEncoder):
        def encode(self, inputs, **kwargs):
            return torch.ones(sum(len(next(iter(batch.values()))) for batch in inputs), 8).numpy()

    dataset = load_mmeb_datasets(mini / "test", ["Mini-VQA"])[0]
    mmeb = MMEBEvaluator([dataset], show_progress_bar=False)(lambda items: torch.ones(len(items), 8))
    assert mmeb["datasets"]["Mini-VQA"]["precision@1"] == 0
    assert gold_ranks([torch.ones(3)]) == [3]
    result = mteb.evaluate(Constant(model), [mmeb_task(dataset)], cache=None, show_progress_bar=False)
    assert result.task_results[0].scores["test"][0]["main_score"] > 0  # pytrec_eval's tie order finds some golds


def test_mteb_summary_refuses_two_models_and_an_empty_folder(tmp_path):
    result = {"task_name": "T", "scores": {"test": [{"main_score": 0.5, "hf_subset": "default"}]}}
    for model in ("a", "b"):
        (tmp_path / model).mkdir()
        (tmp_path / model / "T.json").write_text(json.dumps(result))
    assert mteb_summary(tmp_path / "a")["tasks"][0]["main_score"] == 0.5
    with pytest.raises(ValueError, match="T appears twice"):
        mteb_summary(tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no mteb task results"):
        mteb_summary(tmp_path / "empty")
