"""Hub release: the dry-run folder is a complete Hub model, the card parses and its snippets run, tokens never leak."""

from __future__ import annotations

import json
import os
import re
import textwrap

import pytest
import torch
from huggingface_hub import ModelCard
from huggingface_hub.repocard_data import model_index_to_eval_results

from coma_hf.evaluation.mmeb import MMEBEvaluator, load_mmeb_datasets
from coma_hf.hub import push_to_hub, save_checkpoint

from utils import REMOTE_CODE_FILES, command_line, hub_cache, load_example, random_image, run_without_coma, tiny_coma

REPO = "org/coma"
TOKEN = "hf_PlantedTokenThatMustNeverBeWrittenAnywhere123"
COMMIT = "0123456789abcdef0123456789abcdef01234567"
CHILD = textwrap.dedent(
    """
    import sys
    import torch
    from PIL import Image
    from sentence_transformers import SentenceTransformer
    from transformers import AutoModel

    image = Image.open(sys.argv[1])
    inputs = ["a red circle", image, {"image": image, "text": "what colour?"}]
    model = AutoModel.from_pretrained("org/coma", trust_remote_code=True)
    st = SentenceTransformer("org/coma", trust_remote_code=True, device="cpu")
    torch.save({"auto": model.encode(inputs), "st": st.encode(inputs, convert_to_tensor=True)}, sys.argv[2])
    """
)


@pytest.fixture(scope="module")
def upload(tmp_path_factory):
    """A saved tiny checkpoint with evaluation results, dry-run into an upload folder."""
    root = tmp_path_factory.mktemp("hub")
    model, _ = tiny_coma()
    save_checkpoint(model, root / "model")
    summary = {
        "train_dataset": str(root / "data" / "qa.jsonl"),
        "started_from": "outputs/stage1",
        "skipped_samples": [
            {
                "index": 3,
                "id": "r3",
                "error": f"sample r3, field 'image': image file not found: {root / 'images' / 'cat.png'}",
            }
        ],
        "source": "https://huggingface.co/org/data",
    }
    (root / "model" / "pretrain_summary.json").write_text(json.dumps(summary))
    from coma_hf.data.mini_mmeb import write_mini_mmeb

    write_mini_mmeb(root / "synthetic", num_train=2, num_dev=2, num_test=3, image_size=56, max_train_scenes=0)
    results = MMEBEvaluator(load_mmeb_datasets(root / "synthetic" / "mini_mmeb" / "test"), show_progress_bar=False)(
        model, root / "eval"
    )
    load_example("push_to_hub").main(
        command_line(
            "--dry_run --license apache-2.0",
            model_name_or_path=root / "model",
            repo_id=REPO,
            output_dir=root / "upload",
            eval_results=root / "eval" / "mmeb_results.json",
        )
    )
    return root, results


@pytest.mark.slow
def test_dry_run_folder_loads_by_repo_id_without_coma_hf(upload, tmp_path):
    root, _ = upload
    folder = root / "upload"
    names = set(os.listdir(folder))
    assert (
        REMOTE_CODE_FILES
        | {
            "README.md",
            "config.json",
            "model.safetensors",
            "tokenizer.json",
            "processor_config.json",
            "modules.json",
            "sentence_bert_config.json",
            "config_sentence_transformers.json",
            "mmeb_results.json",
        }
        <= names
    )
    assert not any(name.endswith((".bin", ".pt", ".pkl")) for name in names)
    hub_cache(folder, tmp_path / "home", REPO)
    image_path = tmp_path / "image.png"
    random_image(4).save(image_path)
    run_without_coma(CHILD, [image_path, tmp_path / "out.pt"], tmp_path / "home", tmp_path)
    out = torch.load(tmp_path / "out.pt")
    model, _ = tiny_coma()
    from PIL import Image

    image = Image.open(image_path)
    expected = model.encode(["a red circle", image, {"image": image, "text": "what colour?"}])
    torch.testing.assert_close(out["auto"], expected, atol=0, rtol=0)
    torch.testing.assert_close(out["st"], expected, atol=1e-5, rtol=0)


def test_card_metadata_parses_and_holds_the_evaluation(upload):
    root, results = upload
    card = ModelCard.load(root / "upload" / "README.md")
    data = card.data.to_dict()
    assert data["library_name"] == "sentence-transformers" and data["pipeline_tag"] == "feature-extraction"
    assert {"coma", "multimodal-embedding", "sentence-transformers"} <= set(data["tags"])
    assert data["license"] == "apache-2.0"
    model_name, evaluations = model_index_to_eval_results(data["model-index"])
    assert model_name == "coma"
    overall = next(result for result in evaluations if "(overall)" in result.dataset_name)
    assert overall.metric_value == pytest.approx(round(100 * results["overall"]["precision@1"], 2))
    assert {result.dataset_name for result in evaluations} >= {
        f"MMEB-format evaluation ({task})" for task in results["meta_tasks"]
    }
    assert "| **Overall** |" in card.text and "Stage 1" in card.text
    for name in os.listdir(root / "upload"):  # no path of the machine that wrote it
        if name.endswith((".md", ".json")):
            assert str(root) not in (root / "upload" / name).read_text(), name
    summary = json.loads((root / "upload" / "pretrain_summary.json").read_text())  # shortened, not dropped
    assert summary["train_dataset"] == "qa.jsonl" and summary["started_from"] == "outputs/stage1"
    assert summary["skipped_samples"][0]["error"].endswith("image file not found: cat.png")
    assert summary["source"] == "https://huggingface.co/org/data"


@pytest.mark.slow
def test_card_snippets_run_against_the_uploaded_folder(upload, tmp_path):
    root, _ = upload
    snippets = re.findall(r"```python\n(.*?)```", (root / "upload" / "README.md").read_text(), flags=re.S)
    assert len(snippets) == 2 and all(REPO in snippet for snippet in snippets)
    hub_cache(root / "upload", tmp_path / "home", REPO)
    for snippet in snippets:
        result = run_without_coma(snippet, [], tmp_path / "home", tmp_path)
        assert "tensor" in result.stdout or "[[" in result.stdout


@pytest.mark.slow
def test_push_uploads_one_commit_and_never_writes_the_token(upload, tmp_path, monkeypatch, capsys, caplog):
    import huggingface_hub

    root, _ = upload
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    calls = []

    def upload_folder(**kwargs):
        folder = kwargs["folder_path"]
        files = {name: open(os.path.join(folder, name), "rb").read() for name in os.listdir(folder)}
        calls.append({"kwargs": {k: v for k, v in kwargs.items() if k != "folder_path"}, "files": files})
        return "https://huggingface.co/org/coma/commit/" + COMMIT

    monkeypatch.setattr(
        huggingface_hub, "create_repo", lambda repo_id, **kwargs: type("Url", (), {"repo_id": repo_id})
    )
    monkeypatch.setattr(huggingface_hub, "create_branch", lambda *args, **kwargs: None)
    monkeypatch.setattr(huggingface_hub, "upload_folder", upload_folder)
    load_example("push_to_hub").main(command_line("--revision v1", model_name_or_path=root / "model", repo_id=REPO))
    model, _ = tiny_coma()
    push_to_hub(model, REPO, commit_message="from the model")
    push_to_hub(root / "model", REPO, commit_message="from the folder")

    assert len(calls) == 3  # one commit each
    for call in calls:
        assert {"README.md", "model.safetensors", "modules.json", "modeling_coma.py"} <= set(call["files"])
        assert b"CoMa" in call["files"]["README.md"] and REPO.encode() in call["files"]["README.md"]
        assert all(TOKEN.encode() not in content for content in call["files"].values())
        assert TOKEN not in json.dumps(call["kwargs"], default=str)
    assert calls[0]["kwargs"]["revision"] == "v1"
    captured = capsys.readouterr()
    assert TOKEN not in captured.out + captured.err + caplog.text


def test_no_class_is_patched_and_a_plain_save_keeps_the_card_it_was_loaded_with(tmp_path):
    from transformers import PreTrainedModel

    from coma_hf import CoMaModel

    assert CoMaModel.push_to_hub is PreTrainedModel.push_to_hub  # importing coma_hf changes no class
    assert not hasattr(CoMaModel, "model_card_writer")
    model, _ = tiny_coma()
    model.save_pretrained(tmp_path / "plain")
    assert not (tmp_path / "plain" / "README.md").exists()  # the card is written by the package's save, not this one
    save_checkpoint(model, tmp_path / "saved")
    card = (tmp_path / "saved" / "README.md").read_text()
    assert "CoMa" in card and "{{" not in card  # the rendered CoMa card
    edited = card + "\nA line the owner added by hand.\n"
    (tmp_path / "saved" / "README.md").write_text(edited)
    CoMaModel.from_pretrained(tmp_path / "saved").save_pretrained(tmp_path / "again")
    assert (tmp_path / "again" / "README.md").read_text() == edited  # carried over as loaded, not rendered again
    save_checkpoint(CoMaModel.from_pretrained(tmp_path / "saved"), tmp_path / "rendered")
    assert (tmp_path / "rendered" / "README.md").read_text() == card  # the package's save renders it afresh
