"""CoMaCompressionTrainer: what TrainingArguments offers works, resuming is exact, recipes and merging."""

from __future__ import annotations

import itertools
import json
import weakref

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from coma_hf import CoMaInputError
from coma_hf.data.stage1 import load_stage1_dataset
from coma_hf.data.synthetic import write_synthetic_dataset
from coma_hf.tiny import build_tiny_coma
from coma_hf.training import CoMaCompressionCollator, CoMaCompressionTrainer, LoraArguments, apply_lora

from utils import random_image, run_without_coma, training_args


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    folder = tmp_path_factory.mktemp("scenes")
    paths = write_synthetic_dataset(folder, num_train=48, num_dev=8, num_test=8, seed=0, image_size=56)
    return load_stage1_dataset(paths["train"])


def _fresh_model():
    return build_tiny_coma(num_compression_tokens=4, seed=0, max_image_tokens=4)


def _weights(model):
    return {name: value.detach().clone() for name, value in model.state_dict().items()}


def test_resume_from_checkpoint_gives_the_weights_of_an_uninterrupted_run(scenes, tmp_path):
    dataset, root = scenes
    model, processor = _fresh_model()
    CoMaCompressionTrainer(
        model=model,
        args=training_args(tmp_path / "full"),
        train_dataset=dataset,
        processing_class=processor,
        image_root=root,
    ).train()
    uninterrupted = _weights(model)

    model, processor = _fresh_model()
    interrupted_args = training_args(tmp_path / "part", save_strategy="steps", save_steps=3)  # same run, checkpointed
    CoMaCompressionTrainer(
        model=model, args=interrupted_args, train_dataset=dataset, processing_class=processor, image_root=root
    ).train()
    checkpoint = tmp_path / "part" / "checkpoint-3"
    assert (checkpoint / "processor_config.json").exists()  # checkpoints carry the processor

    model, processor = _fresh_model()
    resumed = CoMaCompressionTrainer(
        model=model,
        args=training_args(tmp_path / "resumed", save_strategy="steps", save_steps=3),
        train_dataset=dataset,
        processing_class=processor,
        image_root=root,
    )
    resumed.train(resume_from_checkpoint=str(checkpoint))
    assert resumed.state.global_step == 6
    for name, value in _weights(model).items():
        torch.testing.assert_close(value, uninterrupted[name], atol=1e-6, rtol=1e-5, msg=name)


def test_gradient_accumulation_matches_a_larger_batch(scenes, tmp_path):
    """Loss normalised by the global label count: 2 × 2 accumulated equals one batch of 4."""
    dataset, root = scenes
    results = []
    for batch, accumulation in ((4, 1), (2, 2)):
        model, processor = _fresh_model()
        args = training_args(
            tmp_path / f"acc{accumulation}",
            per_device_train_batch_size=batch,
            gradient_accumulation_steps=accumulation,
            max_steps=2,
            optim="sgd",
            learning_rate=0.5,
        )
        CoMaCompressionTrainer(
            model=model, args=args, train_dataset=dataset, processing_class=processor, image_root=root
        ).train()
        results.append(_weights(model))
    for name, value in results[0].items():
        torch.testing.assert_close(value, results[1][name], atol=1e-5, rtol=1e-4, msg=name)


def _hand_answer_loss(model, inputs) -> float:
    """Mean next-token cross-entropy of the LM head's logits at the labelled positions, computed here."""
    with torch.no_grad():
        hidden = model.backbone_hidden_states(**inputs)
    targets = inputs["labels"][:, 1:]
    keep = targets != -100
    return F.cross_entropy(model.lm_head(hidden[:, :-1][keep]).float(), targets[keep]).item()


def test_training_logs_loss_tokens_per_second_and_evaluates(scenes, tmp_path):
    dataset, root = scenes
    model, processor = _fresh_model()
    args = training_args(
        tmp_path / "log",
        eval_strategy="steps",
        eval_steps=3,
        per_device_eval_batch_size=4,
        activation_checkpointing=True,
    )
    trainer = CoMaCompressionTrainer(
        model=model,
        args=args,
        train_dataset=dataset,
        eval_dataset=dataset.select(range(8)),
        processing_class=processor,
        image_root=root,
    )
    expected, tokens, padded = [], [], []
    compute_loss = trainer.compute_loss

    def recording(model, inputs, *args, **kwargs):  # each training batch, with the weights of its step
        if model.training:
            expected.append(_hand_answer_loss(model, inputs))
            tokens.append(int(inputs["attention_mask"].sum()))
            padded.append(inputs["attention_mask"].numel())
        return compute_loss(model, inputs, *args, **kwargs)

    trainer.compute_loss = recording
    trainer.train()
    history = trainer.state.log_history
    losses = [entry["loss"] for entry in history if "loss" in entry]
    assert len(expected) == 6 and losses == pytest.approx(expected, rel=1e-5)  # one batch per logged step
    assert [entry["eval_loss"] for entry in history if "eval_loss" in entry] and history[-1]["step"] == 6
    seen = [entry["num_input_tokens_seen"] for entry in history if "loss" in entry]
    assert seen == list(itertools.accumulate(tokens)) and sum(tokens) < sum(padded)  # padding is not counted
    timed = [entry for entry in history if "train_tokens_per_second" in entry]
    assert len(timed) >= 6
    for entry in timed:  # the speed is the tokens counted above over the time taken
        speed = entry["num_input_tokens_seen"] / entry["train_runtime"]
        assert entry["train_tokens_per_second"] == pytest.approx(speed, rel=0.01)


def test_bad_row_stops_training_naming_row_and_field(tmp_path):
    random_image(0).save(tmp_path / "good.png")
    turns = [{"question": "What?", "answer": "this"}]
    rows = [{"id": f"row-{i}", "image": "good.png", "conversation": turns} for i in range(3)]
    rows.append({"id": "row-bad", "image": "missing.png", "conversation": turns})
    (tmp_path / "data.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    dataset, root = load_stage1_dataset(tmp_path / "data.jsonl")
    model, processor = _fresh_model()
    trainer = CoMaCompressionTrainer(
        model=model,
        args=training_args(tmp_path / "out", max_steps=1),
        train_dataset=dataset,
        processing_class=processor,
        image_root=root,
    )
    with pytest.raises(CoMaInputError, match=r"sample row-bad, field 'image'.*missing.png"):
        trainer.train()


@pytest.mark.slow
def test_paper_recipe_trains_lora_and_compression_rows_then_merges(scenes, tmp_path):
    dataset, root = scenes
    model, processor = _fresh_model()
    vision_before = {name: value.clone() for name, value in model.model.visual.state_dict().items()}
    embeddings_before = model.get_input_embeddings().weight.detach().clone()
    peft_model = apply_lora(model, LoraArguments(use_lora=True, lora_r=4, lora_alpha=16))
    trainable = {name for name, parameter in peft_model.named_parameters() if parameter.requires_grad}
    assert trainable and all("lora_" in name or "token_adapter" in name for name in trainable), trainable
    assert not any("visual" in name for name in trainable)
    assert any("q_proj" in name for name in trainable) and any("o_proj" in name for name in trainable)

    trainer = CoMaCompressionTrainer(
        model=peft_model,
        args=training_args(tmp_path / "lora", learning_rate=1e-2, max_steps=3),
        train_dataset=dataset,
        processing_class=processor,
        image_root=root,
    )
    trainer.train()
    merged = trainer.save_merged(str(tmp_path / "merged"))
    assert type(merged).__name__ == "CoMaModel" and not any("lora" in name for name in merged.state_dict())
    for name, value in merged.model.visual.state_dict().items():
        assert torch.equal(value, vision_before[name]), name  # vision tower frozen
    after = merged.get_input_embeddings().weight.detach()
    ids = merged.config.compression_token_ids
    assert not torch.equal(after[ids], embeddings_before[ids])  # compression rows trained
    others = [index for index in range(after.shape[0]) if index not in ids]
    assert torch.equal(after[others], embeddings_before[others])  # the rest of the vocabulary untouched

    # the merged checkpoint is plain: it loads without coma_hf and embeds like the merged model
    child = """
        import sys
        import torch
        from transformers import AutoModel
        model = AutoModel.from_pretrained(sys.argv[1], trust_remote_code=True)
        torch.save(model.encode_text(["a red circle", "two squares"]), sys.argv[2])
        """
    run_without_coma(child, [tmp_path / "merged", tmp_path / "vectors.pt"], tmp_path / "hf", tmp_path)
    merged.eval()
    expected = merged.encode_text(["a red circle", "two squares"])
    torch.testing.assert_close(torch.load(tmp_path / "vectors.pt"), expected, atol=1e-5, rtol=1e-5)


def test_a_sharded_runs_final_save_frees_the_trained_model_then_reloads_in_the_runs_precision(
    scenes, tmp_path, monkeypatch
):
    """After a sharded run every process loads the saved checkpoint back (`save_merged`); first the trained model, its
    optimizer and the KL teacher are freed, with nothing left that holds them, and a bf16 run's float32 checkpoint
    comes back in bfloat16. Sharding itself is faked: the gathered save of one process is the same save."""
    from coma_hf.training import trainers

    dataset, root = scenes
    model, processor = _fresh_model()
    trainer = CoMaCompressionTrainer(
        model=model,
        args=training_args(tmp_path / "run", max_steps=1),
        train_dataset=dataset,
        processing_class=processor,
        image_root=root,
        objective="kl",
    )
    trainer.train()
    trained = {"model": weakref.ref(model), "optimizer": weakref.ref(trainer.optimizer)}
    trained["teacher"] = weakref.ref(trainer.teacher)
    del model
    monkeypatch.setattr(trainers, "shards_parameters", lambda args: True)
    trainer.args.bf16 = True  # what a bf16 run records; its sharded (and saved) master weights stay float32
    saved = trainer.save_merged(str(tmp_path / "saved"))
    assert {name: ref() for name, ref in trained.items()} == dict.fromkeys(trained)
    assert trainer.model is None and trainer.optimizer is None and trainer.teacher is None
    assert {tensor.dtype for tensor in load_file(str(tmp_path / "saved" / "model.safetensors")).values()} == {
        torch.float32
    }
    assert saved.dtype == torch.bfloat16 and saved.processor is processor


@pytest.mark.parametrize(
    ("processes", "tp_size", "n_gpu", "average"),
    [(1, 1, 1, True), (4, 1, 1, True), (8, 2, 1, True), (8, 4, 0, True), (1, 1, 2, True), (8, 2, 1, False)],
)
def test_the_kl_and_per_sample_losses_scale_across_processes_as_the_installed_trainer_does(
    processes, tp_size, n_gpu, average
):
    """`_across_devices_scale` copies a private rule of `Trainer.compute_loss`; the installed Trainer, run on a model
    whose loss is 1, gives the same factor (tensor-parallel ranks sharing one batch included)."""
    from types import SimpleNamespace

    from transformers import Trainer

    trainer = SimpleNamespace(
        args=SimpleNamespace(average_tokens_across_devices=average, n_gpu=n_gpu),
        accelerator=SimpleNamespace(num_processes=processes, parallelism_config=None),
        get_tp_size=lambda: tp_size,
        label_smoother=None,
        compute_loss_func=None,
        model_accepts_loss_kwargs=True,
    )
    for count in (None, torch.tensor(10)):
        expected = Trainer.compute_loss(trainer, lambda **_: {"loss": torch.tensor(1.0)}, {}, num_items_in_batch=count)
        assert CoMaCompressionTrainer._across_devices_scale(trainer, count) == expected, count


def test_collator_counts_dropped_turns():
    model, processor = _fresh_model()
    processor.max_length = 64
    collator = CoMaCompressionCollator(processor)
    turns = [{"question": f"Question number {index} about the picture?", "answer": "an answer"} for index in range(6)]
    image = random_image(0, (56, 56))
    batch = collator([{"id": "x", "image": image, "conversation": turns}])
    # by hand: image block, compress instruction and K compression tokens, then whole turns while they fit in 64
    tokenizer = processor.tokenizer

    def tokens(text):
        return len(tokenizer(text, add_special_tokens=False)["input_ids"])

    grid = processor.image_processor(images=[image], return_tensors="pt")["image_grid_thw"]
    length = (
        2 + int(grid.prod()) // processor.image_processor.merge_size**2 + tokens(processor.compress_instruction) + 4
    )
    kept = 0
    for turn in turns:  # <|im_start|>user\n{Q}<|im_end|>\n<|im_start|>assistant\n{A}<|im_end|>\n
        turn_length = 4 + tokens("user\n") + tokens(turn["question"]) + 2 * tokens("\n") + tokens("assistant\n")
        turn_length += tokens(turn["answer"])
        if length + turn_length > 64:
            break
        length, kept = length + turn_length, kept + 1
    assert 0 < kept < 6 and batch["input_ids"].shape[1] == length and collator.dropped_turns == 6 - kept
    assert int(batch["dropped_turns"]) == collator.dropped_turns
