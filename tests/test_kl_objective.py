"""Stage 1's KL objective (`coma_hf.training.distillation`, `--objective kl|ce+kl`): token-level forward KL from a
frozen teacher that reads the input directly to the student that reads it through the K compression tokens, computed
by trl's chunked divergence on answer-aligned hidden states. Checked here against a full-vocabulary softmax computed
by hand on the stock backbone run, on a tiny model."""

from __future__ import annotations

import configparser
import copy
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from coma_hf.data.stage1 import load_stage1_dataset
from coma_hf.data.synthetic import write_synthetic_dataset
from coma_hf.tiny import build_tiny_coma
from coma_hf.training import (
    OBJECTIVES,
    CoMaCompressionCollator,
    CoMaCompressionTrainer,
    LoraArguments,
    apply_lora,
    distillation,
    frozen_teacher,
    weights_fingerprint,
)
from coma_hf.training.distillation import align_answer_states, teacher_hidden_states

from utils import TINY_MODEL_ARGS, command_line, load_example, random_image, tiny_coma, training_args

REPO = Path(__file__).parents[1]
ROWS = [  # answers of different lengths and an image-less row: the batch is padded, rows differ in label count
    {
        "id": "picture",
        "image": random_image(0, (56, 56)),
        "conversation": [
            {"question": "What colour is it?", "answer": "red and blue"},
            {"question": "Is there text?", "answer": "no"},
        ],
    },
    {"id": "words", "text": "a small grey stone", "conversation": [{"question": "What?", "answer": "a stone"}]},
]


def _batch(processor, rows=ROWS):
    return CoMaCompressionCollator(processor)(copy.deepcopy(rows))


def _perturbed(model, seed: int = 1, scale: float = 0.05):
    """A copy of `model` with seeded noise on every weight: a student whose distributions differ from the teacher's."""
    student = copy.deepcopy(model)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in student.parameters():
            parameter.add_(scale * torch.randn(parameter.shape, generator=generator))
    return student


def _trainer(model, tmp_path, processor, **kwargs) -> CoMaCompressionTrainer:
    return CoMaCompressionTrainer(
        model=model, args=training_args(tmp_path), processing_class=processor, train_dataset=[], **kwargs
    )


def _hand_rows(student, teacher, processor):
    """Per row, with no padding and computed independently of the batch code: `(student_logits, teacher_logits,
    targets)` at the positions that predict each answer token — the student's CoMa run over its own sequence, the
    teacher's stock backbone run (its own causal mask and rope) over that sequence with the K compression tokens
    taken out. Logits are the full vocabulary's."""
    compression = set(teacher.config.compression_token_ids)
    results = []
    for row in ROWS:
        single = _batch(processor, [row])
        ids, labels = single["input_ids"][0].tolist(), single["labels"][0].tolist()
        assert all(ids.count(token) == 1 for token in compression)
        kept = [position for position, token in enumerate(ids) if token not in compression]
        teacher_ids = torch.tensor([[ids[position] for position in kept]])
        image = {key: single[key] for key in ("pixel_values", "image_grid_thw") if key in single}
        with torch.no_grad():
            student_logits = student.lm_head(student.backbone_hidden_states(**single))[0]
            teacher_hidden = teacher.model(
                input_ids=teacher_ids,
                attention_mask=torch.ones_like(teacher_ids),
                mm_token_type_ids=(teacher_ids == teacher.config.backbone_config.image_token_id).int(),
                **image,
            ).last_hidden_state
            teacher_logits = teacher.lm_head(teacher_hidden)[0]
        answer = [position for position in range(1, len(ids)) if labels[position] != -100]
        student_at = [position - 1 for position in answer]
        teacher_at = [kept.index(position) - 1 for position in answer]  # the token before it, compression gone
        targets = torch.tensor([ids[position] for position in answer])
        results.append(
            (student_logits[student_at], teacher_logits[teacher_at], targets, teacher_hidden[0], teacher_at)
        )
    return results


def _hand_kl(student, teacher, processor) -> torch.Tensor:
    """Σ_tokens Σ_v p_t(v) (log p_t(v) − log p_s(v)) over every answer token of `ROWS`, / the answer-token count."""
    total, count = torch.zeros(()), 0
    for student_logits, teacher_logits, targets, _, _ in _hand_rows(student, teacher, processor):
        log_student = F.log_softmax(student_logits.double(), dim=-1)
        log_teacher = F.log_softmax(teacher_logits.double(), dim=-1)
        total = total + (log_teacher.exp() * (log_teacher - log_student)).sum()
        count += len(targets)
    return (total / count).float()


def test_trl_chunked_divergence_imports_and_is_pinned():
    from importlib.metadata import version

    from packaging.version import Version
    from trl.kernels.chunked_divergence import ChunkedDivergenceFunction  # not in trl.kernels.__all__

    assert callable(ChunkedDivergenceFunction.apply)
    assert Version(version("trl")) >= Version(distillation.MIN_TRL_VERSION) == Version("1.16")
    config = configparser.ConfigParser()
    config.read(REPO / "setup.cfg")
    requirements = config["options"]["install_requires"].split()
    assert f"trl>={distillation.MIN_TRL_VERSION}" in requirements


def test_missing_or_old_trl_is_a_clear_error(monkeypatch):
    import importlib.metadata

    monkeypatch.setattr(importlib.metadata, "version", lambda name: "1.15.2")
    with pytest.raises(ImportError, match=r"trl>=1\.16 \(trl 1\.15\.2 is installed\)"):
        distillation._check_trl()


def test_importing_the_package_does_not_import_trl():
    code = "import sys, coma_hf, coma_hf.training; assert 'trl' not in sys.modules, 'trl imported'"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO, capture_output=True, timeout=120)


def test_kl_loss_equals_full_softmax_kl_by_hand(tmp_path):
    model, processor = tiny_coma()
    teacher = frozen_teacher(model)
    student = _perturbed(model)
    trainer = _trainer(student, tmp_path, processor, objective="kl", teacher=teacher)
    batch = _batch(processor)
    assert batch["attention_mask"].eq(0).any()  # the rows are padded: alignment must see through it
    loss = trainer.compute_loss(student, dict(batch))
    hand = _hand_kl(student, teacher, processor)
    assert hand > 1e-3  # a real divergence, not two equal models
    torch.testing.assert_close(loss.detach(), hand, atol=1e-5, rtol=1e-5)


def test_teacher_and_student_align_on_exactly_the_answer_tokens(tmp_path):
    model, processor = tiny_coma()
    teacher, student = frozen_teacher(model), _perturbed(model)
    batch = _batch(processor)
    with torch.no_grad():
        student_hidden = student(**{k: v for k, v in batch.items() if k != "labels"}, output_last_hidden_state=True)
    teacher_hidden, teacher_labels = teacher_hidden_states(teacher, batch)
    aligned = align_answer_states(student_hidden.last_hidden_state, batch["labels"], teacher_hidden, teacher_labels)

    hand = _hand_rows(student, teacher, processor)
    # the targets are the answers and their end-of-turn tokens, in order
    answers = [turn["answer"] for row in ROWS for turn in row["conversation"]]
    end = processor.tokenizer.convert_tokens_to_ids("<|im_end|>")
    expected = [token for answer in answers for token in processor.tokenizer.encode(answer) + [end]]
    assert aligned.targets.tolist() == expected == torch.cat([targets for _, _, targets, _, _ in hand]).tolist()
    # the teacher's states at the positions that predict them (logits through its LM head), as computed by hand
    hand_teacher = torch.cat([teacher_logits for _, teacher_logits, _, _, _ in hand])
    torch.testing.assert_close(teacher.lm_head(aligned.teacher), hand_teacher, atol=1e-5, rtol=1e-5)
    hand_student = torch.cat([student_logits for student_logits, _, _, _, _ in hand])
    torch.testing.assert_close(student.lm_head(aligned.student), hand_student, atol=1e-5, rtol=1e-5)
    # one position later (the answer token itself) is a different state: an off-by-one could not pass the above
    shifted = torch.cat([hidden[[p + 1 for p in at]] for _, _, _, hidden, at in hand])
    assert not torch.allclose(aligned.teacher, shifted, atol=1e-3)


def test_teacher_view_drops_only_the_compression_tokens_and_sees_the_image():
    model, processor = tiny_coma()
    batch = _batch(processor)
    ids = model.config.compression_token_ids
    view = distillation.teacher_inputs(batch, list(ids))
    assert view["input_ids"].shape == (2, batch["input_ids"].shape[1] - len(ids))
    assert not torch.isin(view["input_ids"], torch.tensor(ids)).any()
    image_token = model.config.backbone_config.image_token_id
    assert view["input_ids"].eq(image_token).sum() == batch["input_ids"].eq(image_token).sum() > 0
    assert view["pixel_values"] is batch["pixel_values"]
    for key in ("attention_mask", "labels", "mm_token_type_ids"):
        keep = ~torch.isin(batch["input_ids"], torch.tensor(ids))
        assert torch.equal(view[key], batch[key][keep].view(2, -1)), key
    # the teacher reads the pixels directly: another image changes its states at the answers
    other = [dict(ROWS[0], image=random_image(7, (56, 56))), ROWS[1]]
    first = teacher_hidden_states(model, batch)[0][0]
    second = teacher_hidden_states(model, _batch(processor, other))[0][0]
    answer_rows = view["labels"][0] != -100
    assert not torch.allclose(first[answer_rows], second[answer_rows], atol=1e-4)

    broken = dict(batch, input_ids=batch["input_ids"].clone())
    broken["input_ids"][1, broken["input_ids"][1] == ids[0]] = 5
    with pytest.raises(ValueError, match="sample 1, field 'input_ids'.*found 3"):
        distillation.teacher_inputs(broken, list(ids))


def test_teacher_is_frozen_and_unchanged_by_an_optimizer_step(tmp_path):
    paths = write_synthetic_dataset(tmp_path / "scenes", num_train=8, num_dev=2, num_test=2, seed=0, image_size=56)
    dataset, root = load_stage1_dataset(paths["train"])
    model, processor = build_tiny_coma(num_compression_tokens=4, seed=0, max_image_tokens=4)
    before = weights_fingerprint(model)
    trainer = CoMaCompressionTrainer(
        model=model,
        args=training_args(tmp_path / "run", max_steps=1, learning_rate=1e-2),
        train_dataset=dataset,
        processing_class=processor,
        image_root=root,
        objective="kl",
    )
    teacher = trainer.teacher
    assert teacher is not model and not teacher.training
    assert all(not parameter.requires_grad for parameter in teacher.parameters())
    assert teacher.lm_head.weight.data_ptr() != model.lm_head.weight.data_ptr()
    trainer.train()
    assert trainer.state.global_step == 1 and trainer.first_step_loss > 0
    assert weights_fingerprint(teacher) == before != weights_fingerprint(model)  # the student moved, not the teacher
    assert all(parameter.grad is None for parameter in teacher.parameters())


def test_ce_plus_kl_is_the_weighted_sum(tmp_path):
    model, processor = tiny_coma()
    teacher, student = frozen_teacher(model), _perturbed(model)
    batch = _batch(processor)
    losses = {
        objective: _trainer(
            student,
            tmp_path,
            processor,
            objective=objective,
            teacher=teacher if objective != "ce" else None,
            kl_weight=0.3,
        ).compute_loss(student, dict(batch), num_items_in_batch=9)
        for objective in OBJECTIVES
    }
    assert losses["kl"] > 0 and losses["ce"] > 0
    torch.testing.assert_close(losses["ce+kl"], losses["ce"] + 0.3 * losses["kl"])


def test_bad_objectives_and_teachers_are_clear_errors(tmp_path):
    model, processor = tiny_coma()
    with pytest.raises(ValueError, match="objective must be one of"):
        _trainer(model, tmp_path, processor, objective="kld")
    with pytest.raises(ValueError, match="kl_weight must be a finite number > 0"):
        _trainer(model, tmp_path, processor, objective="ce+kl", kl_weight=0.0)
    with pytest.raises(ValueError, match="A teacher is for the KL objectives"):
        _trainer(model, tmp_path, processor, objective="ce", teacher=model)
    lora = apply_lora(copy.deepcopy(model), LoraArguments(use_lora=True))
    with pytest.raises(ValueError, match="before apply_lora"):
        _trainer(lora, tmp_path, processor, objective="kl")


def test_training_with_lora_lowers_the_divergence(tmp_path):
    paths = write_synthetic_dataset(tmp_path / "scenes", num_train=16, num_dev=2, num_test=2, seed=0, image_size=56)
    dataset, root = load_stage1_dataset(paths["train"])
    model, processor = build_tiny_coma(num_compression_tokens=4, seed=0, max_image_tokens=4)
    teacher = frozen_teacher(model)  # the starting model, before the LoRA
    student = apply_lora(model, LoraArguments(use_lora=True, lora_dropout=0.0))
    trainer = CoMaCompressionTrainer(
        model=student,
        args=training_args(tmp_path / "run", max_steps=12, learning_rate=1e-2),
        train_dataset=dataset,
        processing_class=processor,
        image_root=root,
        objective="kl",
        teacher=teacher,
    )
    batch = CoMaCompressionCollator(processor, root)([dataset[index] for index in range(8)])
    student.eval()
    with torch.no_grad():
        before = trainer.compute_loss(student, dict(batch))
    trainer.train()
    student.eval()
    with torch.no_grad():
        after = trainer.compute_loss(student, dict(batch))
    assert after < 0.8 * before, (before, after)
    logged = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert logged and all("kl" in entry for entry in logged)  # the KL term is logged


@pytest.mark.slow
def test_pretrain_runs_one_kl_step_and_records_the_objective(tmp_path):
    output = tmp_path / "stage1"
    argv = TINY_MODEL_ARGS + command_line(
        "--num_train_scenes 8 --num_dev_scenes 2 --num_test_scenes 2 --scene_size 56 --max_steps 1"
        " --per_device_train_batch_size 4 --logging_steps 1 --max_eval_samples 2 --dataloader_num_workers 0",
        objective="kl",
        output_dir=output,
        synthetic_dir=tmp_path / "synthetic",
    )
    load_example("pretrain").main(argv)
    saved = json.loads((output / "pretrain_summary.json").read_text())
    assert saved["objective"] == "kl" and "kl_weight" not in saved
    assert saved["global_steps"] == 1 and saved["train_loss_first"] > 0


def test_pretrain_refuses_a_kl_weight_without_ce_plus_kl(tmp_path):
    argv = TINY_MODEL_ARGS + command_line(objective="kl", kl_weight=0.5, output_dir=tmp_path / "out")
    with pytest.raises(SystemExit, match="--kl_weight weighs the KL term of --objective ce\\+kl"):
        load_example("pretrain").main(argv)
