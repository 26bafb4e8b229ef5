"""Paths no other test walked: DoRA in the stage-1 paper recipe (trained, merged), the stage-2 script's LoRA (trained,
merged, saved without adapter keys) and `--matryoshka_dims` through the cached (GradCache) loss."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import TrainingArguments

from coma_hf.data.mini_mmeb import write_mini_mmeb
from coma_hf.data.stage1 import load_stage1_dataset
from coma_hf.data.synthetic import write_synthetic_dataset
from coma_hf.tiny import build_tiny_coma
from coma_hf.training import CoMaCompressionCollator, CoMaCompressionTrainer, LoraArguments, apply_lora, trainers

from utils import load_example, random_image, tiny_coma, tiny_sentence_transformer

ADAPTER_NAMES = ("lora_", "base_layer", "magnitude", "token_adapter")  # what peft adds to a wrapped model's keys
TEXTS = ["a red circle left of a blue square", "the digit seven"]
SAME = dict(atol=1e-5, rtol=1e-5)


def _outputs(model, images, batch) -> dict[str, torch.Tensor]:
    """What a CoMa model gives: text and image vectors (`encode_*`) and the stage-1 loss of `batch`."""
    model.eval()
    with torch.no_grad():
        loss = model(**batch).loss
    return {"text": model.encode_text(TEXTS), "images": model.encode_images(images), "loss": loss}


# ---- DoRA in the paper recipe ---------------------------------------------------------------------------------------


def test_dora_adapter_trains_and_merges_into_the_same_outputs(tmp_path):
    paths = write_synthetic_dataset(tmp_path / "scenes", num_train=8, num_dev=1, num_test=1, seed=0, image_size=56)
    dataset, root = load_stage1_dataset(paths["train"])
    model, processor = build_tiny_coma(num_compression_tokens=4, seed=0, max_image_tokens=4)
    paper = json.loads((Path(__file__).parents[1] / "examples" / "configs" / "stage1_paper.json").read_text())
    recipe = {key: value for key, value in paper.items() if key in LoraArguments.__dataclass_fields__}
    assert recipe["use_lora"] and recipe["lora_r"] == 16 and recipe["lora_alpha"] == 64  # the paper's recipe
    peft_model = apply_lora(model, LoraArguments(**{**recipe, "use_dora": True}))
    adapter = {name: value.detach().clone() for name, value in peft_model.named_parameters() if value.requires_grad}
    assert any("lora_magnitude_vector" in name for name in adapter) and any("lora_B" in name for name in adapter)

    args = TrainingArguments(
        output_dir=str(tmp_path / "out"),
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        max_steps=3,
        save_strategy="no",
        report_to=[],
        disable_tqdm=True,
        seed=0,
        use_cpu=True,
        dataloader_num_workers=0,
    )
    trainer = CoMaCompressionTrainer(
        model=peft_model, args=args, train_dataset=dataset, processing_class=processor, image_root=root
    )
    trainer.train()
    trained = dict(peft_model.named_parameters())
    for kind in ("lora_magnitude_vector", "lora_A", "lora_B"):
        assert any(kind in name and not torch.equal(trained[name], value) for name, value in adapter.items()), kind

    images = [random_image(1, (56, 56)), random_image(2, (84, 56))]
    turns = [{"question": "What is shown?", "answer": "shapes"}]
    batch = CoMaCompressionCollator(processor)([{"id": "x", "image": images[0], "conversation": turns}])
    batch = {key: value for key, value in batch.items() if key not in ("dropped_turns", "sample_ids")}
    with_adapter = _outputs(peft_model, images, batch)
    untrained = _outputs(build_tiny_coma(num_compression_tokens=4, seed=0, max_image_tokens=4)[0], images, batch)
    assert (with_adapter["text"] - untrained["text"]).abs().max() > 1e-4  # not vacuous: the adapter moved the outputs

    merged = trainer.save_merged(str(tmp_path / "merged"))
    assert type(merged).__name__ == "CoMaModel"
    assert not any(part in name for name in merged.state_dict() for part in ADAPTER_NAMES)
    for name, value in _outputs(merged, images, batch).items():
        torch.testing.assert_close(value, with_adapter[name], **SAME, msg=name)
    reloaded = type(merged).from_pretrained(tmp_path / "merged")
    for name, value in _outputs(reloaded, images, batch).items():
        torch.testing.assert_close(value, with_adapter[name], **SAME, msg=name)


# ---- stage-2 LoRA through examples/train_contrastive.py -------------------------------------------------------------

STAGE2 = (
    "--recipe tiny --use_lora true --lora_r 4 --lora_alpha 16 --max_steps 2 --max_train_pairs 8"
    " --per_device_train_batch_size 4 --by_dataset false --eval_datasets Mini-Digit"
    " --per_device_eval_batch_size 8 --dataloader_num_workers 0 --learning_rate 0.01"
    " --warmup_steps 0 --logging_steps 1 --seed 0"
).split()


def _weight_names(folder) -> set[str]:
    return {name for path in folder.glob("*.safetensors") for name in load_file(str(path))}


@pytest.mark.slow
def test_stage_two_lora_is_merged_into_a_plain_checkpoint_with_the_adapter_vectors(tmp_path, monkeypatch):
    from sentence_transformers import SentenceTransformer
    from transformers import AutoModel

    synthetic = tmp_path / "synthetic"
    write_mini_mmeb(synthetic, num_train=4, num_dev=2, num_test=1, image_size=56)
    start = tmp_path / "start"
    tiny_coma()[0].save_pretrained(start)
    script = load_example("train_contrastive")
    images = [random_image(3, (56, 56))]
    captured, merge = {}, trainers.merge_lora

    def merge_after_capturing(model):  # the trainer's own merge, once the trained adapter model's vectors are kept
        assert hasattr(model, "peft_config")
        captured["text"], captured["images"] = model.encode_text(TEXTS), model.encode_images(images)
        return merge(model)

    monkeypatch.setattr(trainers, "merge_lora", merge_after_capturing)
    output = tmp_path / "stage2"
    script.main(
        STAGE2 + ["--model_name_or_path", str(start), "--synthetic_dir", str(synthetic), "--output_dir", str(output)]
    )
    assert captured, "the script did not merge a LoRA"

    keys = _weight_names(output)
    assert keys and not [name for name in keys if any(part in name for part in ADAPTER_NAMES)]
    assert keys == _weight_names(start)  # a plain CoMa checkpoint, as the one stage 2 started from
    saved = AutoModel.from_pretrained(output, trust_remote_code=True).eval()
    torch.testing.assert_close(saved.encode_text(TEXTS), captured["text"], **SAME)
    torch.testing.assert_close(saved.encode_images(images), captured["images"], **SAME)
    st = SentenceTransformer(str(output), trust_remote_code=True, device="cpu")
    torch.testing.assert_close(st.encode(TEXTS, convert_to_tensor=True), captured["text"], **SAME)
    before = tiny_coma()[0].encode_text(TEXTS)
    assert (captured["text"] - before).abs().max() > 1e-4  # not vacuous: the trained LoRA moved the vectors


# ---- --matryoshka_dims through the cached loss ----------------------------------------------------------------------

MATRYOSHKA = "64,32,8"
ANCHORS = ["a red circle", "two blue squares", "a green triangle", "the digit seven", "three yellow dots", "a cat"]
POSITIVES = ["red", "blue", "green", "seven", "yellow", "animal"]


def _loss_arguments(script, **overrides):
    values = dict(matryoshka_dims=MATRYOSHKA, cached=True, mini_batch_size=2, gather_across_devices=False)
    return script.LossArguments(**{**values, **overrides})


def _per_dimension_losses(script, st, features) -> dict[int, float]:
    """The loss at each matryoshka dimension alone (a fresh one-dimension wrapper each)."""
    losses = {}
    for dim in map(int, MATRYOSHKA.split(",")):
        loss_fn = script.build_loss(st, _loss_arguments(script, matryoshka_dims=str(dim)))
        with torch.no_grad():
            losses[dim] = loss_fn(features, None).item()
    return losses


def _gradients(st, loss_fn, features) -> dict[str, torch.Tensor]:
    st.zero_grad()
    loss_fn(features, None).backward()
    return {name: p.grad.clone() for name, p in st.named_parameters() if p.grad is not None}


@pytest.fixture
def st(tmp_path_factory):
    model = copy.deepcopy(tiny_sentence_transformer(tmp_path_factory))
    model.train()
    return model


@pytest.mark.slow
def test_matryoshka_dims_through_the_cached_loss_backpropagate_and_train(st):
    script = load_example("train_contrastive")
    features = [st.preprocess(ANCHORS), st.preprocess(POSITIVES)]
    cached = script.build_loss(st, _loss_arguments(script))
    assert type(cached).__name__ == "MatryoshkaLoss" and cached.uses_gradient_cache

    gradients = _gradients(st, cached, features)
    assert len(gradients) > 10 and all(torch.isfinite(grad).all() for grad in gradients.values())
    assert sum(grad.abs().sum() for grad in gradients.values()) > 0
    plain = _gradients(st, script.build_loss(st, _loss_arguments(script, cached=False)), features)
    for name, grad in plain.items():  # GradCache under MatryoshkaLoss gives the plain gradients (float32 sums)
        torch.testing.assert_close(gradients[name], grad, rtol=1e-4, atol=1e-5 * float(grad.abs().max()), msg=name)

    before = _per_dimension_losses(script, st, features)
    optimizer = torch.optim.AdamW(st.parameters(), lr=1e-3)
    for _ in range(5):
        optimizer.zero_grad()
        cached(features, None).backward()
        optimizer.step()
    after = _per_dimension_losses(script, st, features)
    for dim in before:
        assert after[dim] < before[dim], (dim, before, after)
