"""The pre-trained reader: the embedded tiny backbone, trained once as an ordinary VLM and shipped with the package.

`examples/train_reader.py` trains the stock family class (`Qwen2_5_VLForConditionalGeneration`) with plain causal
attention on captions and multi-turn QA about synthetic *training* scenes, and writes it to `resources/reader/`:
weights, config, tokenizer, image processor and `record.json` (how it was trained and how well it reads). Its config
carries the embedded-backbone marker, so recipes treat it as the embedded backbone (`tiny`).

The reader reads what CoMa's stage 1 renders, minus the compression tokens (a `CoMaProcessor` with K = 0)::

    <|vision_start|><|image_pad|>…<|vision_end|>{text}\\n{compress_instruction}
    <|im_start|>user\\n{Q1}<|im_end|>\\n<|im_start|>assistant\\n{A1}<|im_end|>\\n …

so what it learns carries over when stage 1 puts the compression tokens before the questions. `reader_answer_accuracy`
asks each question of the full input (image visible, no bottleneck), answers greedily with the stock `generate`, and
scores as the stage-1 evaluation scores answers decoded from the compression states.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import torch
from transformers import AutoConfig, BatchFeature, PretrainedConfig, PreTrainedModel
from transformers.utils.logging import tqdm

from .backbones import get_family
from .configuration_coma import EMBEDDED_BACKBONE_MARKER
from .constants_coma import DEFAULT_COMPRESS_INSTRUCTION
from .data.synthetic import every_question, generate_split, render_scene
from .evaluation.compression import _Scores, generation_length
from .layout_coma import RenderedSample
from .processing_coma import BackboneProcessorParts, CoMaProcessor, processor_method

READER_FOLDER = "resources/reader"  # inside the package
RECORD_FILE = "record.json"
CAPTION_QUESTION = "Describe the image in a few words."
DESCRIPTION_QUESTION = "Describe the image in detail."


# --------------------------------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------------------------------
def reader_path() -> Path:
    """The folder of the shipped reader."""
    return Path(str(resources.files("coma_hf").joinpath(READER_FOLDER)))


def load_reader(
    path: str | Path | None = None, attn_implementation: str = "sdpa"
) -> tuple[PreTrainedModel, BackboneProcessorParts]:
    """The reader as the stock family class (float32, eval mode) and its tokenizer and image processor.

    `path` defaults to the shipped reader; `attn_implementation` applies to the language model and the vision tower.
    """
    source = str(path or reader_path())
    config = AutoConfig.from_pretrained(source)
    model = get_family(config.model_type).generation_class.from_pretrained(
        source, attn_implementation=attn_implementation, dtype=torch.float32, use_safetensors=True
    )
    return model.eval(), BackboneProcessorParts.from_pretrained(source)


def reader_record(path: str | Path | None = None) -> dict:
    """The record of how the reader at `path` (default: the shipped one) was trained and how well it reads."""
    import json

    return json.loads((Path(path or reader_path()) / RECORD_FILE).read_text())


def mark_embedded_backbone(config: PretrainedConfig) -> PretrainedConfig:
    """Mark a stock backbone config as the package's embedded backbone (saved in its `config.json`), so
    `is_embedded_backbone` and the recipes recognise it and `CoMaConfig` inherits the marker."""
    setattr(config, EMBEDDED_BACKBONE_MARKER, True)
    return config


def reader_processor(
    parts: BackboneProcessorParts,
    min_image_tokens: int | None = None,
    max_image_tokens: int | None = None,
    max_length: int | None = None,
    compress_instruction: str = DEFAULT_COMPRESS_INSTRUCTION,
) -> CoMaProcessor:
    """The reader's renderer: CoMa's stage-1 layout with no compression tokens (K = 0). Image bounds in tokens;
    `None` keeps the image processor's own (the shipped reader's are saved with it)."""
    return CoMaProcessor(
        image_processor=parts.image_processor,
        tokenizer=parts.tokenizer,
        chat_template=getattr(parts, "chat_template", None) or parts.tokenizer.chat_template,
        num_compression_tokens=0,
        compress_instruction=compress_instruction,
        min_image_tokens=min_image_tokens,
        max_image_tokens=max_image_tokens,
        max_length=max_length,
    )


# --------------------------------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------------------------------
def scene_samples(split: str, count: int, seed: int = 0, image_size: int = 112) -> list[dict]:
    """`count` synthetic scenes of `split` as stage-1 samples with in-memory images (the same scenes and questions
    `write_synthetic_dataset` writes with this `seed`): `id`, `image` (PIL), `text` (None), `conversation`,
    `caption`, `description`."""
    return [
        {**record, "image": render_scene(scene)} for scene, record in generate_split(split, count, seed, image_size)
    ]


class ReaderTrainingScenes(torch.utils.data.Dataset):
    """Training samples of the reader: synthetic *training* scenes only (their split holds no dev/test scene and no
    held-out colour–shape combination), each drawn on access.

    A sample's conversation is the scene's own QA turns (`scene_questions`, as in the stage-1 data) or, with
    `all_question_types`, one turn of every type the scene allows (`every_question`); plus, at seeded random places, a
    caption turn (`CAPTION_QUESTION`) and, for a `description_share` of the scenes, a description turn
    (`DESCRIPTION_QUESTION`).
    """

    def __init__(
        self,
        count: int,
        seed: int = 0,
        image_size: int = 112,
        description_share: float = 0.5,
        all_question_types: bool = False,
    ):
        self.rows = generate_split("train", count, seed, image_size)
        self.seed = seed
        self.description_share = description_share
        self.all_question_types = all_question_types

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict:
        scene, record = self.rows[index]
        rng = random.Random(f"coma-reader/{self.seed}/{scene.id}")
        turns = every_question(scene, rng) if self.all_question_types else list(record["conversation"])
        extra = [{"question": CAPTION_QUESTION, "answer": record["caption"], "type": "caption"}]
        if rng.random() < self.description_share:
            extra.append({"question": DESCRIPTION_QUESTION, "answer": record["description"], "type": "description"})
        for turn in extra:
            turns.insert(rng.randint(0, len(turns)), turn)
        return {"id": scene.id, "image": render_scene(scene), "text": None, "conversation": turns}

    def records(self) -> list[dict]:
        """The scenes' records (image paths, not images, and the stage-1 questions), e.g. for `majority_baseline`."""
        return [record for _, record in self.rows]


@dataclass
class ReaderCollator:
    """Renders stage-1 samples in the reader's format (labels on the answers) and left-pads them into a batch:
    `input_ids`, `attention_mask`, `mm_token_type_ids`, `labels` `[batch, length]`, `pixel_values`
    `[patches, patch_dim]`, `image_grid_thw` `[images, 3]` — what the stock model's `forward` takes."""

    processor: CoMaProcessor

    def __call__(self, samples: Sequence[dict]) -> BatchFeature:
        rendered = [
            processor_method(self.processor, "render_qa_sample")(
                sample.get("image"), sample.get("text"), sample["conversation"], sample=sample.get("id")
            )
            for sample in samples
        ]
        return self.processor.collate(rendered)


# --------------------------------------------------------------------------------------------------------------------
# Evaluation
# --------------------------------------------------------------------------------------------------------------------
def question_prompts(processor: CoMaProcessor, records: Sequence[dict]) -> list[tuple[RenderedSample, str, str]]:
    """One prompt per question: the record's input then the question turn, `(prompt, answer, type)`."""
    prompts = []
    for record in records:
        prefix = processor.render_compression_input(record.get("image"), record.get("text"), sample=record.get("id"))
        for turn in record["conversation"]:
            ids = prefix.input_ids + processor.render_question(turn["question"])
            prompt = RenderedSample(ids, None, prefix.pixel_values, prefix.image_grid_thw)
            prompts.append((prompt, turn["answer"], turn.get("type", "all")))
    return prompts


@torch.no_grad()
def generate_answers(
    model: PreTrainedModel, processor: CoMaProcessor, prompts: Sequence[RenderedSample], max_new_tokens: int
) -> list[str]:
    """Greedy answers of the stock model to rendered prompts, cut at `<|im_end|>`."""
    batch = processor.collate(prompts).to(model.device)
    end = processor.tokenizer.convert_tokens_to_ids("<|im_end|>")
    output = model.generate(
        **batch,
        max_new_tokens=max_new_tokens,
        do_sample=False,
        eos_token_id=end,
        pad_token_id=processor.tokenizer.pad_token_id,
    )
    answers = []
    for row in output[:, batch["input_ids"].shape[1] :].tolist():
        row = row[: row.index(end)] if end in row else row
        answers.append(processor.tokenizer.decode(row, skip_special_tokens=True).strip())
    return answers


def reader_answer_accuracy(
    model: PreTrainedModel,
    processor: CoMaProcessor,
    records: Sequence[dict],
    max_new_tokens: int | None = None,
    batch_size: int = 64,
    show_progress_bar: bool = True,
) -> dict:
    """Exact match and token F1 of the reader's answers with the image visible (overall and per question type).

    Each question of each record (stage-1 schema with a `type` per turn) is asked alone after the record's input.
    `max_new_tokens` defaults to `generation_length` (the longest reference and `<|im_end|>`, capped at
    `MAX_ANSWER_TOKENS`), the cap of the stage-1 evaluation. Returns `_Scores.summary()` plus `max_new_tokens` and
    the generated `answers`.
    """
    max_new_tokens = max_new_tokens or generation_length(processor, records)
    was_training = model.training
    model.eval()
    prompts = question_prompts(processor, records)
    scores, answers = _Scores(), []
    for start in tqdm(range(0, len(prompts), batch_size), desc="Reading", disable=not show_progress_bar):
        chunk = prompts[start : start + batch_size]
        generated = generate_answers(model, processor, [prompt for prompt, _, _ in chunk], max_new_tokens)
        for (_, reference, kind), answer in zip(chunk, generated, strict=True):
            scores.add(kind, answer, reference)
        answers += generated
    model.train(was_training)
    return {**scores.summary(), "max_new_tokens": max_new_tokens, "answers": answers}
