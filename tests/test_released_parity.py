"""A converted release encodes exactly as the authors' evaluation does.

A tiny checkpoint in their format (the stock Qwen2.5-VL class's weights under their older key names, their
`<|ctoken_pad_i|>` tokens, trained compression rows) is converted; `tests/released_reference.py` — their inference
path re-implemented on the stock transformers class, in a process where `coma_hf` cannot be imported — embeds plain
inputs and scores MMEB-V2 instruct rows of every parser. The converted checkpoint must give the same vectors
through `AutoModel` and `SentenceTransformer` (remote code), and the same scores through `MMEBEvaluator` with
`load_mmeb_v2_datasets`, within 1e-5 in float32.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from coma_hf import convert_released_checkpoint
from coma_hf.evaluation.mmeb import MMEBEvaluator, as_encoder
from coma_hf.evaluation.mmeb_v2 import load_mmeb_v2_datasets

from mmeb_v2_rows import PARSERS, TINY_IMAGE, write_instruct_folder
from utils import load_example, random_image, run_without_coma

REFERENCE = Path(__file__).parent / "released_reference.py"
ATOL = 1e-5


@pytest.fixture(scope="module")
def parity(tmp_path_factory):
    """The converted checkpoint, the instruct rows, the plain inputs and the reference's tensors."""
    from test_convert_released import trained_backbone, write_released

    root = tmp_path_factory.mktemp("parity")
    source = write_released(root / "released", trained_backbone(tie=True))
    converted = root / "converted"
    convert_released_checkpoint(source, converted)
    rows = write_instruct_folder(root / "mmeb_v2")
    picture = root / "picture.png"
    random_image(11, (84, 56)).save(picture)
    plain = {
        "image": {"image": str(rows / "images" / TINY_IMAGE)},  # under 28 px: enlarged
        "text": {"text": "a red circle \n left of a blue square"},
        "image_text": {"image": str(picture), "text": "What colour is the circle? \n"},
    }
    spec = {
        "plain": plain,
        "mmeb_v2": {"folder": str(rows), "image_root": str(rows / "images"), "datasets": PARSERS},
    }
    (root / "spec.json").write_text(json.dumps(spec))
    output = root / "reference.safetensors"
    run_without_coma(REFERENCE, [source, root / "spec.json", output], root / "hf_home", root)
    return {"converted": converted, "rows": rows, "plain": plain, "reference": load_file(output)}


def _automodel(folder: Path):
    from transformers import AutoModel

    return AutoModel.from_pretrained(folder, trust_remote_code=True).eval()


def _sentence_transformer(folder: Path):
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(folder), trust_remote_code=True, device="cpu")


def test_plain_inputs_embed_as_their_evaluation_through_automodel_and_sentence_transformers(parity):
    plain, reference = parity["plain"], parity["reference"]
    expected = torch.stack([reference[f"plain/{name}"] for name in plain])
    model = _automodel(parity["converted"])
    assert model.dtype == torch.float32
    by_api = torch.cat(
        [
            model.encode_images([plain["image"]["image"]]),
            model.encode_text([plain["text"]["text"]]),
            model.encode([plain["image_text"]]),
        ]
    )
    assert torch.allclose(by_api, expected, atol=ATOL), (by_api - expected).abs().max()
    assert torch.allclose(model.encode(list(plain.values()), batch_size=3), expected, atol=ATOL)  # padded batch
    # the check can tell renderings apart: the same text without the final newline is far off
    other = model.encode([{"text": plain["text"]["text"], "layout": "image_cls.candidate"}])[0]
    assert (other - expected[1]).abs().max() > 100 * ATOL
    st = _sentence_transformer(parity["converted"])
    inputs = [{"image": plain["image"]["image"]}, plain["text"]["text"], plain["image_text"]]
    vectors = torch.as_tensor(st.encode(inputs, convert_to_tensor=True)).float()
    assert torch.allclose(vectors, expected, atol=ATOL), (vectors - expected).abs().max()


@pytest.mark.parametrize("path", ["automodel", "sentence_transformers"])
def test_mmeb_v2_rows_score_as_their_evaluation_through_mmeb_evaluator(parity, path):
    model = _automodel(parity["converted"]) if path == "automodel" else _sentence_transformer(parity["converted"])
    encode = as_encoder(model, batch_size=4, show_progress_bar=False)
    evaluator = MMEBEvaluator(load_mmeb_v2_datasets(parity["rows"]), show_progress_bar=False)
    checked = 0
    for dataset in evaluator.datasets:
        for index, scores in enumerate(evaluator.score_dataset(encode, dataset)):
            expected = parity["reference"][f"{dataset.name}/scores/{index}"]
            assert torch.allclose(scores, expected, atol=ATOL), (dataset.name, index, (scores - expected).abs().max())
            checked += 1
    assert checked == sum(len(dataset.rows) for dataset in evaluator.datasets) == 9
    results = evaluator(model)
    assert set(results["datasets"]) == set(PARSERS)


def test_evaluate_script_reads_instruct_rows_for_a_converted_checkpoint(parity, tmp_path):
    output = tmp_path / "eval"
    load_example("evaluate").main(
        ["--model_name_or_path", str(parity["converted"]), "--data", str(parity["rows"]), "--output_dir", str(output)]
    )
    results = json.loads((output / "mmeb_results.json").read_text())
    assert set(results["datasets"]) == set(PARSERS)
    assert results["datasets"]["WebQA"]["num_queries"] == 2
