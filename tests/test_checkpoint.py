"""A saved CoMa checkpoint loads like a Hub model: no coma_hf needed, identical vectors, stock-loadable weights."""

from __future__ import annotations

import json
import os
import textwrap
from pathlib import Path

import pytest
import torch

from utils import FAMILIES, REMOTE_CODE_FILES, hub_cache, random_image, run_without_coma, tiny_coma

# Runs in a fresh interpreter in which `import coma_hf` fails (`run_without_coma`), as on a machine without it.
CHILD = textwrap.dedent(
    """
    import sys
    import torch
    from PIL import Image
    from transformers import AutoModel, AutoProcessor

    source, image_path, output = sys.argv[1:4]
    model = AutoModel.from_pretrained(source, trust_remote_code=True).eval()
    processor = AutoProcessor.from_pretrained(source, trust_remote_code=True)
    assert "coma_hf" not in type(model).__module__, type(model).__module__
    image = Image.open(image_path)
    inputs = ["a red circle", image, {"image": image, "text": "a caption"}]
    with torch.no_grad():
        through_processor = model(**processor.process_embedding_inputs(inputs, instruction="Find it")).pooler_output
    torch.save({"processor": through_processor, "encode": model.encode(inputs, instruction="Find it")}, output)
    """
)


def _reference(model, processor, image_path):
    from PIL import Image

    image = Image.open(image_path)
    inputs = ["a red circle", image, {"image": image, "text": "a caption"}]
    with torch.no_grad():
        return model(**processor.process_embedding_inputs(inputs, instruction="Find it")).pooler_output


def _run_child(source: str, image_path: Path, output: Path, hf_home: Path) -> dict:
    """What CHILD saved to `output` after loading `source` offline with `hf_home` as its Hugging Face home."""
    run_without_coma(CHILD, [source, image_path, output], hf_home, output.parent)
    return torch.load(output)


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen3_vl"])
def test_checkpoint_loads_without_coma_hf_from_folder_and_from_hub_cache(family, tmp_path):
    model, processor = tiny_coma(family)
    folder = tmp_path / "checkpoint"
    model.save_pretrained(folder)
    files = set(os.listdir(folder))
    assert {"config.json", "model.safetensors", "processor_config.json", "tokenizer.json"} | REMOTE_CODE_FILES <= files
    config = json.loads((folder / "config.json").read_text())
    assert config["auto_map"] == {
        "AutoConfig": "configuration_coma.CoMaConfig",
        "AutoModel": "modeling_coma.CoMaModel",
    }
    for name in sorted(REMOTE_CODE_FILES):
        assert "coma_hf" not in (folder / name).read_text().replace('"coma_hf"', ""), name

    image_path = tmp_path / "image.png"
    random_image(7).save(image_path)
    expected = _reference(model, processor, image_path)

    from_folder = _run_child(str(folder), image_path, tmp_path / "folder.pt", tmp_path / "home1")
    torch.testing.assert_close(from_folder["processor"], expected, atol=0, rtol=0)
    torch.testing.assert_close(from_folder["encode"], expected, atol=0, rtol=0)

    # The same files laid out as the Hub cache snapshot of `org/coma`, loaded by repo id, offline.
    hub_cache(folder, tmp_path / "home2", "org/coma")
    from_hub = _run_child("org/coma", image_path, tmp_path / "hub.pt", tmp_path / "home2")
    torch.testing.assert_close(from_hub["processor"], expected, atol=0, rtol=0)
    torch.testing.assert_close(from_hub["encode"], expected, atol=0, rtol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_saved_backbone_weights_load_into_the_stock_class(family, tmp_path):
    model, _ = tiny_coma(family)
    model.save_pretrained(tmp_path)
    from coma_hf.backbones import get_family

    stock_class = get_family(family).generation_class
    stock, info = stock_class.from_pretrained(tmp_path, config=model.config.backbone_config, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    ours = model.state_dict()
    for name, tensor in stock.state_dict().items():
        assert torch.equal(tensor, ours[name]), name


def test_in_process_reload_gives_identical_outputs(tmp_path):
    from transformers import AutoModel, AutoProcessor

    import coma_hf  # noqa: F401  (registers the Auto classes locally)

    model, processor = tiny_coma()
    model.save_pretrained(tmp_path)
    reloaded = AutoModel.from_pretrained(tmp_path).eval()
    reloaded_processor = AutoProcessor.from_pretrained(tmp_path)
    assert reloaded_processor.compression_token_ids == processor.compression_token_ids
    assert reloaded_processor.max_length == processor.max_length
    batch = processor.process_embedding_inputs(["text", random_image(0)])
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**batch).pooler_output, model(**batch).pooler_output, atol=0, rtol=0)


def test_save_pretrained_and_the_stock_export_shard_at_the_package_limit(tmp_path, monkeypatch):
    """`CoMaModel.save_pretrained` (so also Trainer's `checkpoint-N` and the final save of a sharded run) and the stock
    export shard at `coma_hf.saving.MAX_SHARD_SIZE`, not transformers' 50GB: with the limit patched where it is read,
    both write several shards that load back as the model; an explicit `max_shard_size` still wins."""
    from coma_hf import CoMaModel, modeling_coma, serving
    from coma_hf.backbones import get_family

    monkeypatch.setattr(modeling_coma, "MAX_SHARD_SIZE", "200KB")
    monkeypatch.setattr(serving, "MAX_SHARD_SIZE", "200KB")
    model, _ = tiny_coma()
    model.save_pretrained(tmp_path / "coma")
    assert len(list((tmp_path / "coma").glob("model-*.safetensors"))) > 1
    reloaded = CoMaModel.from_pretrained(tmp_path / "coma").state_dict()
    for name, tensor in model.state_dict().items():
        assert torch.equal(reloaded[name], tensor), name
    model.save_pretrained(tmp_path / "one-file", max_shard_size="50GB")
    assert [path.name for path in (tmp_path / "one-file").glob("*.safetensors")] == ["model.safetensors"]

    serving.export_stock_backbone(tmp_path / "coma", tmp_path / "stock")
    assert len(list((tmp_path / "stock").glob("model-*.safetensors"))) > 1
    stock = get_family("qwen2_5_vl").generation_class.from_pretrained(tmp_path / "stock")
    assert torch.equal(stock.get_input_embeddings().weight, model.get_input_embeddings().weight)
