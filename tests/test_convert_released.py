"""Converting the authors' released checkpoints (`coma_hf.released`, `examples/convert_released.py`).

Each test writes a tiny checkpoint in the release's format offline — the stock Qwen2.5-VL class's weights under their
vendored class's older key names (`visual.*`, `model.layers.*`, …) with the stock config, a tokenizer with their
`<|ctoken_pad_i|>` tokens added as special tokens, or their peft (DoRA) adapter over such a base — converts it and
checks what the conversion must keep. A Hub id cannot be tested offline: these tests use folders.
"""

from __future__ import annotations

import copy
import functools
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from transformers import Qwen2_5_VLForConditionalGeneration

from coma_hf import CoMaModel, convert_released_checkpoint
from coma_hf.hub.card import CONVERSION_SUMMARY
from coma_hf.released import RELEASED_RECIPE, current_key
from coma_hf.saving import CARRIED_FILES
from coma_hf.tiny import build_image_processor, build_tiny_backbone, build_tokenizer, tiny_backbone_config

from utils import load_example, random_image

K = 4
SPARE_ROWS = 8  # embedding rows beyond the tokenizer, as published Qwen checkpoints carry (151,936 for ~151,665)
RELEASED_TOKENS = [f"<|ctoken_pad_{index}|>" for index in range(K)]


@functools.cache
def _base_tokenizer():
    return build_tokenizer()


def base_tokenizer():
    """The base model's tokenizer (a fresh copy: tests add tokens to it)."""
    return copy.deepcopy(_base_tokenizer())


def released_tokenizer(count: int = K):
    """A tokenizer as their code makes it: `<|ctoken_pad_i|>` added as special tokens after the base vocabulary."""
    tokenizer = base_tokenizer()
    tokenizer.add_tokens([f"<|ctoken_pad_{index}|>" for index in range(count)], special_tokens=True)
    return tokenizer


def trained_backbone(tie: bool = True, seed: int = 0):
    """A stock Qwen2.5-VL with spare embedding rows, whose rows after the base vocabulary hold "trained" values
    (far from anything `CoMaModel.init_compression_embeddings` would write)."""
    tokenizer = base_tokenizer()
    config = tiny_backbone_config("qwen2_5_vl", tokenizer, tie_word_embeddings=tie)
    config.text_config.vocab_size = len(tokenizer) + SPARE_ROWS
    backbone, _ = build_tiny_backbone("qwen2_5_vl", seed=seed, config=config, tokenizer=tokenizer)
    generator = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        rows = backbone.get_input_embeddings().weight
        rows[len(tokenizer) :] = 3.0 + torch.randn(SPARE_ROWS, rows.shape[1], generator=generator)
        if not tie:
            backbone.lm_head.weight.normal_(0.0, 0.5, generator=generator)
    return backbone


def older_key(name: str) -> str:
    """A stock-class weight name as their vendored class (older transformers) names it."""
    if name.startswith("model.visual."):
        return name[len("model.") :]
    if name.startswith("model.language_model."):
        return "model." + name[len("model.language_model.") :]
    return name


def legacy_config(config) -> dict:
    """The stock config as older transformers wrote it: the language model's fields at the top level."""
    saved = config.to_dict()
    text = saved.pop("text_config")
    rope = text.pop("rope_parameters")
    flat = {key: value for key, value in text.items() if key != "model_type"}
    flat.update(saved)
    flat["rope_theta"] = rope["rope_theta"]
    flat["rope_scaling"] = {"type": "mrope", "mrope_section": rope["mrope_section"]}
    return flat


def write_released(folder: Path, backbone, tokenizer=None, layout: str = "older", lm_head: bool | None = None) -> Path:
    """Write `backbone` as their merge script saved it: weights in `layout` ("older" or "current"), `lm_head` left out
    when tied (unless `lm_head=True`), config, tokenizer (a released one by default), image processor."""
    folder.mkdir(parents=True, exist_ok=True)
    state = {name: tensor.detach().clone().contiguous() for name, tensor in backbone.state_dict().items()}
    if not (backbone.config.tie_word_embeddings is False if lm_head is None else lm_head):
        state.pop("lm_head.weight")
    rename = older_key if layout == "older" else (lambda name: name)
    save_file({rename(name): tensor for name, tensor in state.items()}, folder / "model.safetensors", {"format": "pt"})
    config = legacy_config(backbone.config) if layout == "older" else backbone.config.to_dict()
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    (tokenizer or released_tokenizer()).save_pretrained(folder)
    build_image_processor("qwen2_5_vl").save_pretrained(folder)
    return folder


def converted_state(folder: Path) -> dict[str, torch.Tensor]:
    model = CoMaModel.from_pretrained(folder)
    return {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}


def test_a_merged_release_converts_keeping_its_trained_compression_rows(tmp_path):
    backbone = trained_backbone(tie=True)
    tokenizer = released_tokenizer()
    source = write_released(tmp_path / "released", backbone, tokenizer)  # older names, tied, no lm_head
    assert "lm_head.weight" not in json.dumps(list(_safetensors_keys(source)))
    output = tmp_path / "converted"
    load_example("convert_released").main(["--source", str(source), "--output_dir", str(output)])

    ids = tokenizer.convert_tokens_to_ids(RELEASED_TOKENS)
    assert ids == [len(_base_tokenizer()) + index for index in range(K)]
    model = CoMaModel.from_pretrained(output)
    assert model.config.num_compression_tokens == K and model.config.compression_token_ids == ids
    assert model.processor.compression_tokens == RELEASED_TOKENS and model.processor.compression_token_ids == ids
    trained = backbone.get_input_embeddings().weight
    assert torch.equal(model.get_input_embeddings().weight, trained)  # every row, the K trained ones included
    assert torch.equal(model.lm_head.weight, trained)  # tied
    for name, tensor in backbone.state_dict().items():
        assert torch.equal(model.state_dict()[name], tensor), name
    # what their evaluation did, and where the weights came from
    assert (model.config.pooling, model.config.attention_rule) == ("last", "causal")
    summary = json.loads((output / CONVERSION_SUMMARY).read_text())
    assert summary["recipe"] == RELEASED_RECIPE == "released" and summary["source"] == str(source)
    assert summary["compression_token_ids"] == ids and summary["tokens_from"] == "tokenizer"
    card = (output / "README.md").read_text()
    assert "released checkpoint `released`" in card and "converted from the release" in card
    for name in ("modules.json", "config_sentence_transformers.json", "configuration_coma.py", "modeling_coma.py"):
        assert (output / name).is_file(), name
    assert "AutoModel" in json.loads((output / "config.json").read_text())["auto_map"]


def _safetensors_keys(folder: Path) -> list[str]:
    from safetensors import safe_open

    with safe_open(folder / "model.safetensors", "pt") as weights:
        return list(weights.keys())


def test_older_and_current_key_layouts_convert_to_identical_weights(tmp_path):
    backbone = trained_backbone(tie=True)
    older = write_released(tmp_path / "older", backbone, layout="older")
    current = write_released(tmp_path / "current", backbone, layout="current", lm_head=True)
    assert any(key.startswith("visual.") for key in _safetensors_keys(older))
    assert any(key.startswith("model.language_model.") for key in _safetensors_keys(current))
    convert_released_checkpoint(older, tmp_path / "from_older")
    convert_released_checkpoint(current, tmp_path / "from_current")
    from_older, from_current = converted_state(tmp_path / "from_older"), converted_state(tmp_path / "from_current")
    assert from_older.keys() == from_current.keys()
    for name in from_older:
        assert torch.equal(from_older[name], from_current[name]), name
    older_text = json.loads((tmp_path / "from_older" / "config.json").read_text())["backbone_config"]["text_config"]
    current_text = json.loads((tmp_path / "from_current" / "config.json").read_text())["backbone_config"][
        "text_config"
    ]
    assert older_text["rope_parameters"]["mrope_section"] == current_text["rope_parameters"]["mrope_section"]
    assert older_text["rope_parameters"]["rope_theta"] == current_text["rope_parameters"]["rope_theta"]


def test_an_untied_model_keeps_its_lm_head_and_needs_it(tmp_path):
    backbone = trained_backbone(tie=False)
    model = convert_released_checkpoint(write_released(tmp_path / "untied", backbone), tmp_path / "out")
    assert not model.config.tie_word_embeddings
    assert torch.equal(model.lm_head.weight, backbone.lm_head.weight)
    assert not torch.equal(model.lm_head.weight, model.get_input_embeddings().weight)
    without_head = write_released(tmp_path / "no_head", backbone, lm_head=False)
    with pytest.raises(ValueError, match=r"no_head.*missing.*lm_head\.weight"):
        convert_released_checkpoint(without_head, tmp_path / "never")
    assert not (tmp_path / "never").exists()


def test_k_from_the_flag_when_the_tokenizer_lacks_the_tokens(tmp_path):
    backbone = trained_backbone(tie=True)
    source = write_released(tmp_path / "released", backbone, tokenizer=base_tokenizer())
    with pytest.raises(ValueError, match="--num_compression_tokens"):
        convert_released_checkpoint(source, tmp_path / "never")
    with pytest.raises(ValueError, match=rf"{len(_base_tokenizer()) + SPARE_ROWS} rows.*ctoken_pad_{SPARE_ROWS}"):
        convert_released_checkpoint(source, tmp_path / "never", num_compression_tokens=SPARE_ROWS + 1)
    assert not (tmp_path / "never").exists()

    output = tmp_path / "converted"
    load_example("convert_released").main(
        ["--source", str(source), "--output_dir", str(output), "--num_compression_tokens", str(K)]
    )
    model = CoMaModel.from_pretrained(output)
    expected = [len(_base_tokenizer()) + index for index in range(K)]  # the base vocabulary's length + i
    assert model.config.compression_token_ids == expected
    assert model.processor.tokenizer.convert_tokens_to_ids(RELEASED_TOKENS) == expected
    assert model.processor.tokenizer.convert_ids_to_tokens(expected) == RELEASED_TOKENS
    assert torch.equal(model.get_input_embeddings().weight, backbone.get_input_embeddings().weight)
    summary = json.loads((output / CONVERSION_SUMMARY).read_text())
    assert summary["tokens_from"] == "--num_compression_tokens"


def test_a_tokenizer_whose_tokens_have_no_rows_is_an_error(tmp_path):
    backbone = trained_backbone(tie=True)
    source = write_released(tmp_path / "released", backbone, tokenizer=released_tokenizer(SPARE_ROWS + 2))
    with pytest.raises(ValueError, match=rf"ctoken_pad_{SPARE_ROWS}\|> \(id {len(_base_tokenizer()) + SPARE_ROWS}\)"):
        convert_released_checkpoint(source, tmp_path / "never")


class VendoredLayout(torch.nn.Module):
    """The module tree of their vendored class (`visual`, `model` = the language model, `lm_head`), over the modules
    of a stock model: a peft adapter trained on it has their key names."""

    def __init__(self, backbone):
        super().__init__()
        self.visual = backbone.model.visual
        self.model = backbone.model.language_model
        self.lm_head = backbone.lm_head


def test_a_dora_adapter_with_the_embedding_matrix_is_merged(tmp_path):
    from peft import LoraConfig, get_peft_model

    backbone = trained_backbone(tie=True)
    base = write_released(tmp_path / "base", backbone)
    base_state = {name: tensor.clone() for name, tensor in backbone.state_dict().items()}
    config = LoraConfig(
        r=4,
        lora_alpha=16,
        lora_dropout=0.1,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
        modules_to_save=["embed_tokens"],
        init_lora_weights="gaussian",
        use_dora=True,
    )
    adapter = get_peft_model(VendoredLayout(backbone), config)
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():  # "training": every adapter weight moves, and the embedding matrix (compression rows too)
        for name, parameter in adapter.named_parameters():
            if "lora_" in name or "modules_to_save" in name:
                parameter.add_(0.1 * torch.randn(parameter.shape, generator=generator))
    adapter_folder = tmp_path / "adapter"
    adapter.save_pretrained(adapter_folder)
    saved = _safetensors_keys_of(adapter_folder / "adapter_model.safetensors")
    assert "base_model.model.model.embed_tokens.weight" in saved  # their key names
    assert any(key.startswith("base_model.model.model.layers.0.self_attn.q_proj.lora_") for key in saved)
    settings = json.loads((adapter_folder / "adapter_config.json").read_text())
    (adapter_folder / "adapter_config.json").write_text(json.dumps({**settings, "base_model_name_or_path": str(base)}))

    merged = adapter.merge_and_unload()  # peft's own merge on their layout: the reference
    reference = {current_key(name): tensor.detach().clone() for name, tensor in merged.state_dict().items()}
    reference["lm_head.weight"] = reference["model.language_model.embed_tokens.weight"]  # tied, as their merge ties
    model = convert_released_checkpoint(adapter_folder, tmp_path / "converted")
    assert model.config.tie_word_embeddings  # peft unties a merge that trained the embeddings; the release ties them
    state = converted_state(tmp_path / "converted")
    for name, tensor in reference.items():
        assert torch.allclose(state[name], tensor, atol=1e-6), name
    q_proj = "model.language_model.layers.0.self_attn.q_proj.weight"
    assert not torch.allclose(state[q_proj], base_state[q_proj], atol=1e-3)  # the adapter did change it
    ids = model.config.compression_token_ids
    embeddings = state["model.language_model.embed_tokens.weight"]
    assert not torch.allclose(embeddings[ids], base_state["model.language_model.embed_tokens.weight"][ids])
    summary = json.loads((tmp_path / "converted" / CONVERSION_SUMMARY).read_text())
    assert summary["adapter"] and summary["base_model"] == str(base)


def _safetensors_keys_of(path: Path) -> list[str]:
    from safetensors import safe_open

    with safe_open(path, "pt") as weights:
        return list(weights.keys())


def test_converted_vectors_equal_the_stock_class_read_at_the_last_compression_token(tmp_path):
    """The converted model embeds as the stock class does on the same tokens: plain causal attention, the last
    compression token's final state, L2-normalised (their evaluation's pooling)."""
    backbone = trained_backbone(tie=True)
    source = write_released(tmp_path / "released", backbone)
    convert_released_checkpoint(source, tmp_path / "converted")
    model = CoMaModel.from_pretrained(tmp_path / "converted").eval()
    stock = Qwen2_5_VLForConditionalGeneration.from_pretrained(source, dtype=torch.float32).eval()
    inputs = [
        "a red circle left of a blue square",
        {"image": random_image(1)},
        {"image": random_image(2), "text": "What colour is the circle?"},
    ]
    for item in inputs:
        batch = model.processor.process_embedding_inputs([item])
        with torch.no_grad():
            ours = model(**batch).pooler_output
            theirs = stock.model(
                input_ids=batch["input_ids"],
                attention_mask=batch["attention_mask"],
                pixel_values=batch.get("pixel_values"),
                image_grid_thw=batch.get("image_grid_thw"),
                mm_token_type_ids=batch["mm_token_type_ids"],
            ).last_hidden_state[:, -1]
        assert batch["input_ids"][0, -1].item() == model.config.compression_token_ids[-1]
        assert torch.allclose(ours, F.normalize(theirs, dim=-1), atol=1e-5), item


def test_a_converted_checkpoint_gives_the_same_vectors_through_automodel_and_sentence_transformers(tmp_path):
    from sentence_transformers import SentenceTransformer
    from transformers import AutoModel

    source = write_released(tmp_path / "released", trained_backbone(tie=True))
    convert_released_checkpoint(source, tmp_path / "converted")
    inputs = ["a red circle", {"image": random_image(3), "text": "a blue square"}]
    automodel = AutoModel.from_pretrained(tmp_path / "converted", trust_remote_code=True)
    expected = automodel.encode(inputs)
    st = SentenceTransformer(str(tmp_path / "converted"), trust_remote_code=True, device="cpu")
    assert torch.allclose(torch.as_tensor(st.encode(inputs)), expected, atol=1e-5)


def test_the_conversion_record_travels_with_later_saves(tmp_path):
    source = write_released(tmp_path / "released", trained_backbone(tie=True))
    convert_released_checkpoint(source, tmp_path / "converted")
    CoMaModel.from_pretrained(tmp_path / "converted").save_pretrained(tmp_path / "saved_again")
    assert CONVERSION_SUMMARY in CARRIED_FILES
    again = json.loads((tmp_path / "saved_again" / CONVERSION_SUMMARY).read_text())
    assert again == json.loads((tmp_path / "converted" / CONVERSION_SUMMARY).read_text())
    assert again["recipe"] == "released"
