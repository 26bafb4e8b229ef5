"""A CoMa checkpoint served through the stock backbone class gives `CoMaModel.encode`'s vectors.

The serving side (`SERVER`) runs in a fresh interpreter in which `import coma_hf` fails. It reads only what
`export_stock_backbone` wrote: the stock config and weights (loaded by `AutoModelForImageTextToText`), the tokenizer,
the image processor and `coma_pooling.json`; it renders each input from the layout text there, appends the K
compression-token ids, runs one causal forward per input and pools the last positions' final hidden states.
"""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from coma_hf.released import RELEASED_PROCESSOR_SETTINGS
from coma_hf.serving import POOLING_FILE, REMOTE_CODE_KEYS, export_stock_backbone, pool_token_states, vllm_prompt
from coma_hf.tiny import build_tiny_coma

from utils import random_image, run_without_coma

SERVER = textwrap.dedent(
    r"""
    import json, re, sys
    import torch
    import torch.nn.functional as F
    from PIL import Image, ImageOps
    from transformers import AutoImageProcessor, AutoModelForImageTextToText, AutoTokenizer


    def is_slot(part):
        return part.startswith("{") and part.endswith("}")


    def pieces_of(spec, block, text, instruction):
        # the input before the compression tokens as coma_pooling.json describes it: a list of [kind, string] pieces,
        # kind "image" (the expanded block), "text" (the user's text: what truncation cuts) or "words" (instruction
        # and separators); each piece is tokenized on its own
        layout = spec["embedding_layout"]
        options = layout if isinstance(layout, dict) else {"template": layout}
        prompt_mode = options.get("mode") == "prompt"
        placeholder = spec["image_placeholder"]
        if not prompt_mode and block and text and re.search(placeholder, text):
            match = re.search(placeholder, text)
            return [["text", text[: match.start()]], ["image", block], ["text", text[match.end() :]]]
        text = re.sub(placeholder, "", text) if text else text
        if prompt_mode:
            instruction = re.sub(placeholder, "", instruction) if instruction else instruction
            if options.get("text_as_instruction") and instruction is None:
                instruction, text = text or "", None
        values = {"image": block, "instruction": instruction, "text": text, "compression": ""}
        present = {name: bool(value) for name, value in values.items()} | {"compression": True}
        if prompt_mode:
            present["instruction"] = instruction is not None
        parts = [part for part in re.split(r"(\{\w+\})", options["template"]) if part]
        pieces = []
        for index, part in enumerate(parts):
            if is_slot(part):
                name = part[1:-1]
                kind = {"image": "image", "text": "text"}.get(name, "words")
                if name != "compression" and values[name]:
                    pieces.append([kind, values[name]])
            elif present[parts[index - 1][1:-1]] and present[parts[index + 1][1:-1]]:
                pieces.append(["words", part])
        merged = []  # parts mode: runs of words join; prompt mode: everything between image blocks joins
        for kind, value in pieces:
            joins = merged and merged[-1][0] != "image" and kind != "image"
            if joins and (prompt_mode or (merged[-1][0] == "words" and kind == "words")):
                merged[-1] = ["text" if "text" in (kind, merged[-1][0]) else "words", merged[-1][1] + value]
            else:
                merged.append([kind, value])
        if prompt_mode:
            for piece in merged:
                if piece[0] != "image" and options.get("clean_space_newline"):
                    piece[1] = piece[1].replace(" \n", "\n")
            if options.get("trailing_newline"):
                merged.append(["newline", "\n"])  # joined to the stretch before it unless a cut comes between
        return merged


    def prepared(image, settings):
        # image_settings: upright by EXIF orientation, enlarged when tiny
        image = Image.open(image)
        if settings["apply_exif_orientation"]:
            image = ImageOps.exif_transpose(image)
        image = image.convert("RGB")
        below = settings["enlarge_images_below"]
        if below and (image.width < below or image.height < below):
            image = image.resize((settings["enlarged_image_size"],) * 2)
        width, height = image.size
        limit = settings["max_aspect_ratio"]
        if max(width, height) > limit * min(width, height):  # centred on a white canvas widened to the limit
            short = -(-max(width, height) // limit)
            size = (width, short) if width >= height else (short, height)
            canvas = Image.new("RGB", size, (255, 255, 255))
            canvas.paste(image, ((size[0] - width) // 2, (size[1] - height) // 2))
            image = canvas
        return image


    def token_ids(spec, tokenizer, pieces):
        # each piece tokenized alone, special-token strings in text kept plain; the text cut from its end to fit
        def encode(value):
            return tokenizer(value, add_special_tokens=False, split_special_tokens=True)["input_ids"]

        def tokenized(pieces):
            out = []
            for kind, value in pieces:
                if kind == "image":
                    out.append(tokenizer(value, add_special_tokens=False)["input_ids"])
                else:
                    out.append(encode(value))
            return out

        joined = [list(piece) for piece in pieces]
        if joined and joined[-1][0] == "newline" and len(joined) > 1 and joined[-2][0] != "image":
            joined[-2:] = [[joined[-2][0], joined[-2][1] + "\n"]]
        ids = tokenized(joined)
        kinds = [kind for kind, _ in joined]
        room = (spec["max_length"] or float("inf")) - spec["num_compression_tokens"]
        if sum(map(len, ids)) > room:
            if len(joined) < len(pieces):  # the trailing newline follows a cut text as its own tokens
                joined, kinds = pieces, [kind for kind, _ in pieces]
                ids = tokenized(pieces)
            excess = sum(map(len, ids)) - room
            for index in reversed([i for i, kind in enumerate(kinds) if kind == "text"]):
                take = min(excess, len(ids[index]))
                ids[index] = ids[index][: len(ids[index]) - take]
                excess -= take
        return [token for piece in ids for token in piece]


    def embed(folder, rows):
        spec = json.load(open(f"{folder}/coma_pooling.json"))
        model = AutoModelForImageTextToText.from_pretrained(folder).eval()
        assert type(model).__name__ == spec["architecture"], type(model)
        tokenizer = AutoTokenizer.from_pretrained(folder)
        image_processor = AutoImageProcessor.from_pretrained(folder)
        vectors = []
        for row in rows:
            image_inputs, block = {}, None
            if row["image"]:
                image = prepared(row["image"], spec["image_settings"])
                image_inputs = dict(image_processor(images=[image], return_tensors="pt"))
                image_tokens = int(image_inputs["image_grid_thw"].prod()) // image_processor.merge_size**2
                start, end = spec["image_block"].split(spec["image_token"])
                block = start + spec["image_token"] * image_tokens + end
            pieces = pieces_of(spec, block, row["text"], row["instruction"])
            ids = torch.tensor([token_ids(spec, tokenizer, pieces) + spec["compression_token_ids"]])
            with torch.no_grad():
                output = model(
                    input_ids=ids,
                    attention_mask=torch.ones_like(ids),
                    # what the stock processor returns beside the ids: M-RoPE needs it
                    mm_token_type_ids=(ids == model.config.image_token_id).int(),
                    output_hidden_states=True,
                    **image_inputs,
                )
            states = output.hidden_states[-1][0, -spec["pooled_positions"] :]
            pooled = states.mean(dim=0) if spec["pooling"] == "mean" else states[-1]
            if spec["embedding_dim"]:
                pooled = pooled[: spec["embedding_dim"]]
            vectors.append(F.normalize(pooled, dim=-1) if spec["normalize"] else pooled)
        return torch.stack(vectors)


    jobs, output = json.load(open(sys.argv[1])), sys.argv[2]
    torch.save({folder: embed(folder, rows) for folder, rows in jobs.items()}, output)
    """
)

# (family, CoMa settings): every family, both poolings, Matryoshka truncation, and K = 0 (VLM2Vec-style).
CASES = {
    "qwen2_vl-last": ("qwen2_vl", {"pooling": "last"}),
    "qwen2_5_vl-mean": ("qwen2_5_vl", {}),
    "qwen3_vl-mean-dim48": ("qwen3_vl", {"embedding_dim": 48}),
    "qwen2_5_vl-k0": ("qwen2_5_vl", {"num_compression_tokens": 0, "pooling": "last"}),
    "qwen2_5_vl-released": ("qwen2_5_vl", {"pooling": "last", "attention_rule": "causal"}),
}
# Processor settings of a case: a checkpoint converted from the release renders as their evaluation (a prompt layout).
PROCESSOR_SETTINGS = {"qwen2_5_vl-released": RELEASED_PROCESSOR_SETTINGS}
INSTRUCTION = "Find the matching image"
EXIF_ORIENTATION = 0x0112


LONG_TEXT = " ".join(f"shape{index} left of circle{index}" for index in range(600))  # past max_length (1024)


def _rows(folder: Path) -> list[dict]:
    """Image, text and image + text, with and without an instruction, an MMEB row with its image placeholder, and the
    rows that need the spec's image settings and special-token rule: a text holding a special-token string, an image
    under one visual token (28 px: enlarged in the released layout), an EXIF-rotated JPEG, a text cut at max_length,
    an image beyond 200:1."""
    images = []
    for seed, size in ((1, (84, 112)), (2, (140, 56))):
        images.append(str(folder / f"image{seed}.png"))
        random_image(seed, size).save(images[-1])
    tiny = folder / "tiny.png"
    random_image(3, (20, 14)).save(tiny)
    sliver = folder / "sliver.png"
    random_image(5, (1206, 3)).save(sliver)  # 402:1, beyond the 200:1 a stock processor accepts
    rotated = folder / "rotated.jpg"
    exif = Image.Exif()
    exif[EXIF_ORIENTATION] = 6  # stored sideways: upright is 90° clockwise
    random_image(4, (112, 56)).save(rotated, exif=exif)
    return [
        {"image": images[0], "text": None, "instruction": INSTRUCTION},
        {"image": None, "text": "a red circle left of a blue square", "instruction": INSTRUCTION},
        {"image": images[1], "text": "what colour is the triangle?", "instruction": INSTRUCTION},
        {"image": None, "text": "a green star", "instruction": None},
        {"image": images[1], "text": None, "instruction": None},
        {"image": images[0], "text": "Represent the image <|image_1|> for classification", "instruction": None},
        {"image": None, "text": "a <|im_end|> b", "instruction": INSTRUCTION},
        {"image": str(tiny), "text": None, "instruction": INSTRUCTION},
        {"image": str(rotated), "text": "which way is up?", "instruction": None},
        {"image": None, "text": LONG_TEXT, "instruction": INSTRUCTION},
        {"image": str(sliver), "text": None, "instruction": INSTRUCTION},
    ]


def _as_coma_input(row: dict) -> dict:
    return {key: value for key, value in row.items() if value is not None}


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> dict:
    """Per case: the CoMa checkpoint folder, its stock export and `CoMaModel.encode`'s vectors of the rows."""
    root = tmp_path_factory.mktemp("serving")
    rows = _rows(root)
    cases = {}
    for name, (family, settings) in CASES.items():
        settings = {"num_compression_tokens": 4, **settings}
        model, processor = build_tiny_coma(family, **settings)
        model.processor = processor.with_settings(**PROCESSOR_SETTINGS.get(name, {}))
        checkpoint = root / name
        model.save_pretrained(checkpoint)
        expected = model.encode([_as_coma_input(row) for row in rows])
        cases[name] = {
            "checkpoint": checkpoint,
            "export": export_stock_backbone(checkpoint, root / f"{name}-stock"),
            "expected": expected,
        }
    return {"root": root, "rows": rows, "cases": cases}


@pytest.fixture(scope="module")
def served(exported) -> dict:
    """Per case: the vectors the serving side computed from the export alone."""
    root = exported["root"]
    jobs = {str(case["export"]): exported["rows"] for case in exported["cases"].values()}
    (root / "jobs.json").write_text(json.dumps(jobs))
    run_without_coma(SERVER, [root / "jobs.json", root / "served.pt"], root / "home", root)
    vectors = torch.load(root / "served.pt")
    return {name: vectors[str(case["export"])] for name, case in exported["cases"].items()}


@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(CASES))
def test_stock_class_gives_coma_vectors(case, exported, served):
    expected = exported["cases"][case]["expected"]
    assert served[case].shape == expected.shape
    torch.testing.assert_close(served[case], expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("case", ["qwen2_5_vl-mean", "qwen3_vl-mean-dim48"])
def test_export_is_a_stock_folder_with_the_same_weights(case, exported):
    checkpoint, export = exported["cases"][case]["checkpoint"], exported["cases"][case]["export"]
    family, settings = CASES[case]
    config = json.loads((export / "config.json").read_text())
    assert config["model_type"] == family and "auto_map" not in config
    assert not list(export.glob("*.py"))  # nothing to trust: no remote code
    for path in export.glob("*.json"):
        content = json.loads(path.read_text())
        assert not set(REMOTE_CODE_KEYS) & set(content), path.name

    ours, stock = load_file(str(checkpoint / "model.safetensors")), load_file(str(export / "model.safetensors"))
    assert set(ours) == set(stock)
    for name, tensor in stock.items():
        assert tensor.dtype == ours[name].dtype and torch.equal(tensor, ours[name]), name

    spec = json.loads((export / POOLING_FILE).read_text())
    coma = json.loads((checkpoint / "config.json").read_text())
    assert spec["compression_token_ids"] == coma["compression_token_ids"]
    assert spec["num_compression_tokens"] == coma["num_compression_tokens"] == 4
    assert (spec["pooling"], spec["embedding_dim"]) == (coma["pooling"], settings.get("embedding_dim"))
    tokenizer = json.loads((export / "tokenizer.json").read_text())
    added = {token["content"]: token["id"] for token in tokenizer["added_tokens"]}
    assert [added[token] for token in spec["compression_tokens"]] == spec["compression_token_ids"]
    # the checkpoint's visual-token bounds travel with the image processor
    processor = json.loads((checkpoint / "processor_config.json").read_text())["image_processor"]
    assert json.loads((export / "preprocessor_config.json").read_text())["size"] == processor["size"]


def test_export_refuses_to_write_into_the_checkpoint(exported):
    checkpoint = exported["cases"]["qwen2_5_vl-mean"]["checkpoint"]
    with pytest.raises(ValueError, match="new folder"):
        export_stock_backbone(checkpoint, checkpoint)
    assert json.loads((checkpoint / "config.json").read_text())["model_type"] == "coma"


def test_the_spec_of_a_released_rendering_carries_its_layouts_image_settings_and_rules():
    from coma_hf.processing_coma import InputLayout
    from coma_hf.serving import pooling_spec

    model, processor = build_tiny_coma(num_compression_tokens=2)
    released = processor.with_settings(**RELEASED_PROCESSOR_SETTINGS)
    spec = pooling_spec(model.config, released)
    assert spec["layouts"] == released.layouts and spec["layouts"] != pooling_spec(model.config, processor)["layouts"]
    assert spec["embedding_layout"] == released.embedding_layout
    assert spec["image_settings"]["enlarge_images_below"] == released.enlarge_images_below is not None
    # the rules stated are those of the layout's mode: a prompt drops placeholders, an MMEB row's image goes there
    parts = pooling_spec(model.config, processor)
    assert (spec["layout_mode"], parts["layout_mode"]) == ("prompt", "parts")
    assert "removed from the instruction and the text" in spec["image_placeholder_rule"]
    assert "in place of the first placeholder" in parts["image_placeholder_rule"]
    assert "even empty" in spec["separators"] and "even empty" not in parts["separators"]
    assert set(spec["layout_options"]) == set(InputLayout.OPTIONS)
    json.dumps(spec)  # written as JSON


@pytest.mark.parametrize("case", sorted(CASES))
def test_the_vllm_client_helpers_turn_stock_token_states_into_encodes_vectors(case, exported):
    """`vllm_prompt` renders each row's request, the stock class's final hidden states of every position stand in for
    vLLM's `token_embed` output, and `pool_token_states` pools them as `coma_pooling.json` says."""
    from transformers import AutoImageProcessor, AutoModelForImageTextToText

    from coma_hf.processing_coma import CoMaProcessor

    export, checkpoint = exported["cases"][case]["export"], exported["cases"][case]["checkpoint"]
    spec = json.loads((export / POOLING_FILE).read_text())
    processor = CoMaProcessor.from_pretrained(checkpoint)
    stock = AutoModelForImageTextToText.from_pretrained(export).eval()
    image_processor = AutoImageProcessor.from_pretrained(export)
    vectors = []
    for index, row in enumerate(exported["rows"]):
        prompt = vllm_prompt(processor, _as_coma_input(row), sample=index)
        ids = torch.tensor([prompt["prompt_token_ids"]])
        tail = ids[0, len(ids[0]) - spec["num_compression_tokens"] :].tolist()
        assert tail == spec["compression_token_ids"]  # the K compression ids last (none for K = 0)
        image = prompt.get("multi_modal_data", {}).get("image")
        features = dict(image_processor(images=[image], return_tensors="pt")) if image is not None else {}
        with torch.no_grad():
            states = stock(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                mm_token_type_ids=(ids == stock.config.image_token_id).int(),
                output_hidden_states=True,
                **features,
            ).hidden_states[-1][0]
        vectors.append(pool_token_states(states, spec))
    torch.testing.assert_close(torch.stack(vectors), exported["cases"][case]["expected"], atol=1e-5, rtol=0)


def test_the_gpu_script_builds_vllm_requests_and_pools_a_stand_in_output(exported, tmp_path):
    """`benchmarks/gpu/vllm_serving.py` runs only where vLLM does (a CUDA machine); what surrounds the `LLM` runs here:
    its inputs, its requests and pooling (a stand-in `LLM` answers with the stock class's states), its agreement."""
    import importlib.util
    import types

    from transformers import AutoImageProcessor, AutoModel, AutoModelForImageTextToText

    path = Path(__file__).parents[1] / "benchmarks" / "gpu" / "vllm_serving.py"
    spec_of = importlib.util.spec_from_file_location("vllm_serving_script", path)
    script = importlib.util.module_from_spec(spec_of)
    spec_of.loader.exec_module(script)

    case = exported["cases"]["qwen2_5_vl-mean"]
    export = case["export"]
    stock = AutoModelForImageTextToText.from_pretrained(export).eval()
    image_processor = AutoImageProcessor.from_pretrained(export)

    class StandInLLM:
        """vLLM's `LLM.encode` for `token_embed`: per prompt, an output whose `.outputs.data` is `[length, hidden]`."""

        def encode(self, prompts, pooling_task, pooling_params):
            assert pooling_task == "token_embed" and pooling_params.use_activation is False
            outputs = []
            for prompt in prompts:
                ids = torch.tensor([prompt["prompt_token_ids"]])
                image = prompt.get("multi_modal_data", {}).get("image")
                features = dict(image_processor(images=[image], return_tensors="pt")) if image is not None else {}
                with torch.no_grad():
                    states = stock(
                        input_ids=ids,
                        mm_token_type_ids=(ids == stock.config.image_token_id).int(),
                        output_hidden_states=True,
                        **features,
                    ).hidden_states[-1][0]
                outputs.append(types.SimpleNamespace(outputs=types.SimpleNamespace(data=states)))
            return outputs

    inputs = script.scene_inputs(6)
    assert [sorted(item) for item in inputs[:3]] == [["image"], ["text"], ["image", "text"]]
    model = AutoModel.from_pretrained(case["checkpoint"], trust_remote_code=True).eval()
    spec = json.loads((export / POOLING_FILE).read_text())
    instruction = spec["document_instruction"]
    served = script.vllm_vectors(
        StandInLLM(), model.processor, inputs, spec, instruction, types.SimpleNamespace(use_activation=False)
    )
    expected = model.encode(inputs, instruction=instruction)
    agreement = script.agreement(served, expected)
    assert agreement["min_cosine"] > 1 - 1e-5 and agreement["mean_cosine"] <= 1 + 1e-6
    assert script.agreement(-served, expected)["min_cosine"] < -0.99  # it measures what it says
