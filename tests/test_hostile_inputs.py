"""Hostile inputs through every entry point: each gives a valid embedding or sample, or a clear error naming the input
(index or row, field, path) — never a traceback from inside a library, never a silent wrong result."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from coma_hf import CoMaInputError, inference
from coma_hf.data.mini_mmeb import write_mini_mmeb
from coma_hf.evaluation.mmeb import MMEBEvaluator, load_mmeb_datasets

from utils import TINY_MODEL_ARGS, command_line, load_example, random_image, tiny_coma, tiny_sentence_transformer

# name → (why it is hostile, the text a clear error must contain; None: it must embed)
IMAGE_CASES = {
    "missing.png": ("missing file", "image file not found"),
    "zero.png": ("zero-byte file", "cannot read image"),
    "truncated.jpg": ("truncated JPEG", "cannot read image"),
    "text.png": ("a text file named .png", "cannot read image"),
    "bomb.png": ("over Pillow's decompression-bomb limit (lowered for the test)", "too large to decode safely"),
    "wide.png": ("aspect ratio 300:1, beyond what Qwen's image processor takes", None),
    "needle.png": ("aspect ratio 1:2000", None),
    "palette.png": ("palette", None),
    "palette_alpha.png": ("palette with transparency", None),
    "alpha.png": ("RGBA", None),
    "gray16.png": ("16-bit grayscale", None),
    "cmyk.jpg": ("CMYK JPEG", None),
    "bilevel.png": ("1-bit", None),
    "one_pixel.png": ("1×1", None),
    "tall.png": ("aspect ratio 1:150", None),
    "rotated.jpg": ("EXIF orientation 6", None),
}


@pytest.fixture(scope="module")
def hostile(tmp_path_factory):
    folder = tmp_path_factory.mktemp("hostile")
    photo = random_image(3, (56, 84))
    buffer = io.BytesIO()
    photo.save(buffer, "JPEG")
    (folder / "truncated.jpg").write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    (folder / "zero.png").write_bytes(b"")
    (folder / "text.png").write_text("this is not an image")
    Image.new("L", (250, 250), 128).save(folder / "bomb.png")
    Image.new("RGB", (3000, 10), (200, 10, 10)).save(folder / "wide.png")
    Image.new("RGB", (1, 2000), (10, 200, 10)).save(folder / "needle.png")
    photo.quantize(16).save(folder / "palette.png")
    transparent = photo.quantize(16)
    transparent.info["transparency"] = 0
    transparent.save(folder / "palette_alpha.png", transparency=0)
    photo.convert("RGBA").save(folder / "alpha.png")
    Image.fromarray(np.arange(56 * 56, dtype=np.uint16).reshape(56, 56) * 19).save(folder / "gray16.png")
    photo.convert("CMYK").save(folder / "cmyk.jpg")
    photo.convert("1").save(folder / "bilevel.png")
    Image.new("RGB", (1, 1), (0, 255, 0)).save(folder / "one_pixel.png")
    Image.new("RGB", (2, 300), (0, 0, 255)).save(folder / "tall.png")
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90° clockwise to display"
    photo.save(folder / "rotated.jpg", exif=exif.tobytes(), quality=95)
    return folder


@pytest.fixture(autouse=True)
def small_bomb_limit(monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 20_000)  # bomb.png (62,500 pixels) is over twice the limit


def _ok(vectors: torch.Tensor) -> None:
    assert torch.isfinite(vectors).all()
    torch.testing.assert_close(vectors.norm(dim=-1), torch.ones(len(vectors)), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", sorted(IMAGE_CASES))
def test_encode_embeds_or_names_the_sample_field_and_path(hostile, name):
    model, _ = tiny_coma()
    expected_error = IMAGE_CASES[name][1]
    inputs = ["first", {"text": "second"}, {"image": str(hostile / name), "text": "third"}]
    if expected_error is None:
        _ok(model.encode(inputs))
        return
    with pytest.raises(CoMaInputError) as caught:
        model.encode(inputs)
    message = str(caught.value)
    assert message.startswith("sample 2, field 'image'") and expected_error in message
    assert name in message


def test_exif_orientation_is_applied(hostile):
    model, _ = tiny_coma()
    stored = Image.open(hostile / "rotated.jpg")
    upright = stored.transpose(Image.Transpose.ROTATE_270)  # what orientation 6 means on screen
    vectors = model.encode([{"image": str(hostile / "rotated.jpg")}, {"image": upright}, {"image": stored.copy()}])
    torch.testing.assert_close(vectors[0], vectors[1], rtol=1e-5, atol=1e-5)  # the file is read upright
    assert not torch.allclose(vectors[0], vectors[2], atol=1e-3)  # not vacuous: the sideways pixels embed otherwise
    assert (
        model.processor.render_embedding_input(image=str(hostile / "rotated.jpg")).image_grid_thw.tolist()
        == model.processor.render_embedding_input(image=upright).image_grid_thw.tolist()
    )


def test_texts_empty_whitespace_and_huge():
    model, processor = tiny_coma()
    for text in ("", "   \n\t"):
        with pytest.raises(CoMaInputError, match=r"sample 1, field 'text': empty text"):
            model.encode(["fine", text])
    huge = "lorem ipsum " * 8_400  # 100,800 characters
    _ok(model.encode([huge, {"image": random_image(1), "text": huge}]))
    rendered = processor.render_embedding_input(text=huge)
    text_tokens = len(processor.tokenizer(huge, add_special_tokens=False)["input_ids"])
    kept = processor.max_length - len(processor.compression_token_ids)  # no instruction: all the rest is text
    assert len(rendered.input_ids) == processor.max_length and rendered.truncated_text_tokens == text_tokens - kept
    # what remains of the text ends in the compression tokens, as for any input
    assert rendered.input_ids[-len(processor.compression_token_ids) :] == processor.compression_token_ids


def test_sentence_transformer_encode_names_the_input_by_content(hostile, tmp_path_factory):
    st = tiny_sentence_transformer(tmp_path_factory)
    _ok(
        torch.as_tensor(
            st.encode(
                [
                    Image.open(hostile / "cmyk.jpg"),
                    Image.open(hostile / "bilevel.png"),
                    "text",
                    Image.open(hostile / "wide.png"),
                    {"image": str(hostile / "needle.png")},
                ]
            )
        )
    )
    for name, (_, expected_error) in IMAGE_CASES.items():
        if expected_error is None:
            continue
        with pytest.raises(CoMaInputError) as caught:
            st.encode(["a longer text that sorts elsewhere", {"image": str(hostile / name), "text": "caption"}])
        message = str(caught.value)
        assert "field 'image'" in message and expected_error in message, name
        assert name in message, name  # the input is named by its path (sentence-transformers reorders by length)
    with pytest.raises(CoMaInputError, match=r"text '   ', field 'text': empty text"):
        st.encode(["fine", "   "])


@pytest.mark.slow
def test_encode_corpus_skips_and_lists_every_bad_image(hostile, tmp_path):
    model, _ = tiny_coma()
    model.save_pretrained(tmp_path / "model")
    result = load_example("encode_corpus").main(
        command_line(model=tmp_path / "model", images=hostile, output_dir=tmp_path / "out", shard_size=4)
    )
    manifest = result["manifest"]
    bad = {name for name, (_, error) in IMAGE_CASES.items() if error is not None and name != "missing.png"}
    assert {entry["id"] for entry in manifest["skipped_rows"]} == bad
    for entry in manifest["skipped_rows"]:
        assert entry["error"].startswith("field 'image'") and IMAGE_CASES[entry["id"]][1] in entry["error"]
    ids, vectors = inference.load_embeddings(tmp_path / "out")
    assert set(ids) == {name for name, (_, error) in IMAGE_CASES.items() if error is None}
    _ok(vectors)


def _stage1_rows(hostile) -> bytes:
    conversation = [{"question": "What is it?", "answer": "a picture"}]
    good = [
        {"id": f"good{i}", "image": str(random_path), "conversation": conversation}
        for i, random_path in enumerate(
            [hostile / "palette.png", hostile / "rotated.jpg", hostile / "one_pixel.png", hostile / "wide.png"]
        )
    ]
    bad = [
        {"id": "missing", "image": str(hostile / "missing.png"), "conversation": conversation},
        {"id": "truncated", "image": str(hostile / "truncated.jpg"), "conversation": conversation},
        {"id": "empty", "text": "   ", "conversation": []},
    ]
    lines = [json.dumps(row).encode() for row in good + bad]
    return b"\n".join(lines + [b"{this is not json", b"\xff\xfe not utf-8"]) + b"\n"


@pytest.mark.slow
def test_stage_one_data_path_skips_and_counts_or_names_bad_rows(hostile, tmp_path):
    data = tmp_path / "stage1.jsonl"
    data.write_bytes(_stage1_rows(hostile))
    common = TINY_MODEL_ARGS + command_line(
        "--max_steps 1 --per_device_train_batch_size 2 --dataloader_num_workers 0 --validation_split_percentage 0",
        dataset=data,
        output_dir=tmp_path / "out",
    )
    with pytest.raises(SystemExit) as stopped:
        load_example("pretrain").main(common + ["--validate_data", "true"])
    listing = str(stopped.value)
    assert "5 bad rows" in listing and "missing.png" in listing and "truncated.jpg" in listing
    assert "line 8" in listing and "not JSON" in listing and "line 9" in listing and "not UTF-8" in listing
    summary = load_example("pretrain").main(common + ["--skip_bad_samples", "true"])
    assert (summary["num_train_samples"], summary["num_skipped_samples"]) == (4, 5)
    assert {entry["id"] for entry in summary["skipped_samples"]} >= {"missing", "truncated", "empty"}


@pytest.mark.slow
def test_stage_two_data_path_skips_and_counts_bad_rows(hostile, tmp_path):
    good = [
        {
            "qry": f"<|image_1|> Represent image {i}",
            "qry_image_path": str(hostile / name),
            "pos_text": f"label {i}",
            "pos_image_path": "",
        }
        for i, name in enumerate(["palette.png", "cmyk.jpg", "gray16.png", "alpha.png", "needle.png"])
    ]
    bad = [
        {"qry": "<|image_1|> x", "qry_image_path": str(hostile / "text.png"), "pos_text": "t", "pos_image_path": ""},
        {"qry": "   ", "qry_image_path": "", "pos_text": "t", "pos_image_path": ""},
        {"qry": "q", "qry_image_path": ""},
    ]
    data = tmp_path / "pairs.jsonl"
    data.write_bytes(b"\n".join([json.dumps(row).encode() for row in good + bad] + [b"[1, 2]"]) + b"\n")
    model, _ = tiny_coma()
    model.save_pretrained(tmp_path / "start")
    synthetic = tmp_path / "synthetic"
    write_mini_mmeb(synthetic, num_train=2, num_dev=2, num_test=1, image_size=56)
    summary = load_example("train_contrastive").main(
        command_line(
            "--skip_bad_samples true --by_dataset false --max_steps 1 --per_device_train_batch_size 4 --recipe tiny"
            " --eval_datasets Mini-Digit --dataloader_num_workers 0",
            model_name_or_path=tmp_path / "start",
            dataset=data,
            synthetic_dir=synthetic,
            output_dir=tmp_path / "out",
        )
    )
    assert (summary["num_train_pairs"], summary["num_skipped_samples"]) == (5, 4)
    errors = " | ".join(entry["error"] for entry in summary["skipped_samples"])
    assert "text.png" in errors and errors.count("are empty") == 2 and "is a JSON list" in errors, errors


def _toy_mmeb(folder: Path, query_image: Path, candidate_images: list[Path]) -> list[dict]:
    """The two rows written to `folder`/Toy.jsonl: an image query over two texts, a text query over two images."""
    folder.mkdir()
    rows = [
        {
            "qry_text": "<|image_1|> what is it",
            "qry_img_path": str(query_image),
            "tgt_text": ["a", "b"],
            "tgt_img_path": ["", ""],
        },
        {
            "qry_text": "find it",
            "qry_img_path": "",
            "tgt_text": ["", ""],
            "tgt_img_path": [str(path) for path in candidate_images],
        },
    ]
    (folder / "Toy.jsonl").write_text("\n".join(json.dumps(row) for row in rows))
    return rows


def _evaluated(through: str, tmp_path_factory):
    """The tiny CoMa model, or the SentenceTransformer over it, as `through` names."""
    return tiny_coma()[0] if through == "coma" else tiny_sentence_transformer(tmp_path_factory)


@pytest.mark.parametrize("through", ["coma", "sentence_transformer"])
def test_evaluator_names_dataset_row_and_image(hostile, tmp_path, tmp_path_factory, through):
    folder = tmp_path / "mmeb"
    rows = _toy_mmeb(folder, hostile / "palette.png", [hostile / "alpha.png", hostile / "zero.png"])
    model = _evaluated(through, tmp_path_factory)
    with pytest.raises(CoMaInputError, match=r"Toy row 1 \(candidate, image .*zero.png\), field 'image': cannot read"):
        MMEBEvaluator(load_mmeb_datasets(folder), show_progress_bar=False)(model)
    (folder / "Toy.jsonl").write_text(json.dumps(rows[0]) + "\n{broken\n")
    with pytest.raises(CoMaInputError, match=r"line 2 of .*Toy.jsonl is not JSON"):
        load_mmeb_datasets(folder)


@pytest.mark.parametrize("through", ["coma", "sentence_transformer"])
def test_evaluator_scores_rows_with_extreme_aspect_ratios(hostile, tmp_path, tmp_path_factory, through):
    folder = tmp_path / "mmeb"
    _toy_mmeb(folder, hostile / "wide.png", [hostile / "needle.png", hostile / "alpha.png"])
    results = MMEBEvaluator(load_mmeb_datasets(folder), show_progress_bar=False)(_evaluated(through, tmp_path_factory))
    assert results["datasets"]["Toy"]["num_queries"] == 2
