"""Stage 1 learns to compress (small version of the default run's claim).

One-shape scenes and colour questions: after a short stage 1, answers decoded from the K compression states alone
beat the majority answer by far, while the same questions asked of another image's states do not.
"""

from __future__ import annotations

import random

import torch
from transformers import TrainingArguments

from coma_hf.data.synthetic import render_scene, sample_scene
from coma_hf.evaluation.compression import answer_accuracy, majority_baseline
from coma_hf.tiny import build_tiny_coma
from coma_hf.training import CoMaCompressionTrainer


def _one_shape_rows(count: int, split: str) -> list[dict]:
    rows = []
    for index in range(count):
        rng = random.Random(f"learning-test/{split}/{index}")
        scene = sample_scene(f"{split}-{index}", "train", rng, image_size=56)
        scene.objects = scene.shapes[:1]
        turn = {"question": "What colour is the shape?", "answer": scene.objects[0].colour, "type": "colour"}
        rows.append({"id": scene.id, "image": render_scene(scene), "text": None, "conversation": [turn]})
    return rows


def test_answers_from_compression_states_beat_majority_and_control(tmp_path):
    torch.manual_seed(0)
    train, dev = _one_shape_rows(600, "train"), _one_shape_rows(64, "dev")
    model, processor = build_tiny_coma(num_compression_tokens=4, seed=0, min_image_tokens=4, max_image_tokens=4)
    args = TrainingArguments(
        output_dir=str(tmp_path),
        per_device_train_batch_size=16,
        learning_rate=1e-3,
        max_steps=250,
        lr_scheduler_type="constant",
        save_strategy="no",
        report_to=[],
        disable_tqdm=True,
        seed=0,
        use_cpu=True,
    )
    CoMaCompressionTrainer(model=model, args=args, train_dataset=train, processing_class=processor).train()

    heldout = answer_accuracy(model, processor, dev, show_progress_bar=False)["accuracy"]
    control = answer_accuracy(model, processor, dev, control=True, show_progress_bar=False)["accuracy"]
    majority = majority_baseline(train, dev)["accuracy"]
    assert heldout >= 2 * majority, (heldout, majority)
    assert control <= majority + 0.05, (control, majority)
