"""Train the pre-trained reader: the embedded tiny backbone as an ordinary VLM (see `coma_hf.reader`).

The stock family class (`Qwen2_5_VLForConditionalGeneration`) with plain causal attention, the full input and no
compression tokens learns with `transformers.Trainer` from captions and multi-turn QA about synthetic *training*
scenes (never a dev/test scene, never a held-out colour–shape combination). It is then asked every question of the
dev scenes with the image visible, scored as stage 1's `heldout_answer_accuracy` (same scorer, same generation cap),
and saved with its tokenizer, image processor and `record.json` (command, seed, steps, data sizes, wall time,
machine, the accuracy table against the majority-answer baseline). Deterministic on CPU for a given seed.

    python examples/train_reader.py                                        # -> outputs/reader
    python examples/train_reader.py --output_dir coma_hf/resources/reader  # the shipped reader
    python examples/train_reader.py --quick                                # a few steps on a few scenes (tests)

Every `TrainingArguments` option works on the command line.
"""

from __future__ import annotations

import json
import logging
import platform
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from transformers import HfArgumentParser, Trainer, TrainingArguments, set_seed

from coma_hf import cli
from coma_hf.data.synthetic import QUESTION_TYPES
from coma_hf.evaluation.compression import SCORING, majority_baseline
from coma_hf.hub import hardware
from coma_hf.reader import (
    RECORD_FILE,
    ReaderCollator,
    ReaderTrainingScenes,
    mark_embedded_backbone,
    reader_answer_accuracy,
    reader_processor,
    scene_samples,
)
from coma_hf.tiny import build_tiny_backbone, build_tokenizer, tiny_backbone_config
from coma_hf.vision_attention import use_batched_vision_attention

logger = logging.getLogger("train_reader")
# The defaults here and in `ReaderArguments` are the shipped reader's settings (its record.json holds the command).
TRAINING_DEFAULTS = {
    "output_dir": "outputs/reader",
    "use_cpu": True,
    "seed": 0,
    "data_seed": 0,
    "per_device_train_batch_size": 16,
    "learning_rate": 2e-3,
    "weight_decay": 0.01,
    "lr_scheduler_type": "cosine",
    "warmup_steps": 0.05,
    "max_steps": 2250,
    "logging_steps": 250,
    "save_strategy": "no",
    "report_to": "none",
    "dataloader_num_workers": 0,
    "remove_unused_columns": False,  # the collator renders raw samples
}
# --quick: a few steps on a few scenes, for the tests (arguments given after it still win)
QUICK = (
    "--num_train_scenes 16 --num_dev_scenes 3 --eval_subset_scenes 2 --max_steps 2 --per_device_train_batch_size 8"
    " --logging_steps 1"
).split()
# A question type reads well at this exact match, or this far above its majority answer (the bar).
TYPE_TARGET, MAJORITY_MARGIN, OVERALL_TARGET = 0.90, 0.25, 0.80


@dataclass
class ReaderArguments:
    family: str = field(default="qwen2_5_vl", metadata={"help": "Family of the backbone."})
    hidden_size: int = field(default=128, metadata={"help": "Width of the language model."})
    num_layers: int = field(default=3, metadata={"help": "Depth of the language model."})
    vision_width: int = field(default=64, metadata={"help": "Width of the vision tower."})
    vision_depth: int = field(default=2, metadata={"help": "Depth of the vision tower."})
    initializer_range: float = field(default=0.1, metadata={"help": "Standard deviation of the initial weights."})
    image_tokens: int = field(default=64, metadata={"help": "Visual tokens per image (min = max)."})
    max_length: int = field(default=512, metadata={"help": "Longest sequence in tokens."})
    num_train_scenes: int = field(default=36000, metadata={"help": "Synthetic training scenes (one pass)."})
    description_share: float = field(default=0.0, metadata={"help": "Share of samples with a description turn."})
    all_question_types: bool = field(
        default=True, metadata={"help": "Train on one question of every type a scene allows, not its own 3–5."}
    )
    num_dev_scenes: int = field(default=200, metadata={"help": "Dev scenes of the reader evaluation."})
    eval_subset_scenes: int = field(
        default=24, metadata={"help": "First dev scenes whose accuracy is recorded apart (what the tests re-check)."}
    )
    eval_batch_size: int = field(default=64, metadata={"help": "Questions per generation batch."})
    scene_size: int = field(default=112, metadata={"help": "Side of the synthetic images in pixels."})
    quick: bool = field(default=False, metadata={"help": "A few steps on a few scenes (tests)."})


def parse(argv: list[str]) -> tuple[ReaderArguments, TrainingArguments]:
    parser = HfArgumentParser((ReaderArguments, TrainingArguments))
    parser.set_defaults(**TRAINING_DEFAULTS)
    if "--quick" in argv or "--quick=true" in argv:
        argv = QUICK + argv
    return parser.parse_args_into_dataclasses(args=argv)


def build_reader(args: ReaderArguments, seed: int):
    """A fresh backbone of the stock family class (marked as the embedded backbone) and its reader processor."""
    tokenizer = build_tokenizer()
    config = tiny_backbone_config(
        args.family,
        tokenizer,
        hidden_size=args.hidden_size,
        num_layers=args.num_layers,
        vision_width=args.vision_width,
        vision_depth=args.vision_depth,
        initializer_range=args.initializer_range,
    )
    model, parts = build_tiny_backbone(args.family, seed, config=mark_embedded_backbone(config), tokenizer=tokenizer)
    use_batched_vision_attention(model.model.visual)  # same outputs, fewer calls; the saved config keeps "sdpa"
    processor = reader_processor(parts, args.image_tokens, args.image_tokens, args.max_length)
    return model.train(), processor


def accuracy_table(reader: dict, majority: dict) -> dict:
    """Per question type: the reader's exact match, the majority answer's, the bar (`TYPE_TARGET`, or the majority
    plus `MAJORITY_MARGIN` when lower) and whether it is met; and overall."""
    per_type = {}
    for kind in QUESTION_TYPES:
        if kind not in reader["per_type"]:
            continue
        baseline = majority["per_type"].get(kind, 0.0)
        target = min(TYPE_TARGET, baseline + MAJORITY_MARGIN)
        accuracy = reader["per_type"][kind]
        per_type[kind] = {
            "reader": accuracy,
            "reader_f1": reader["per_type_f1"][kind],
            "majority": baseline,
            "target": target,
            "met": accuracy >= target,
            "gap": max(0.0, target - accuracy),
        }
    overall = {"reader": reader["accuracy"], "reader_f1": reader["f1"], "majority": majority["accuracy"]}
    overall.update(target=OVERALL_TARGET, met=reader["accuracy"] >= OVERALL_TARGET)
    return {"overall": overall, "per_type": per_type}


def evaluate(model, processor, train: ReaderTrainingScenes, args: ReaderArguments, seed: int) -> dict:
    """The reader evaluation on the dev scenes, and on their first `eval_subset_scenes` apart."""
    dev = scene_samples("dev", args.num_dev_scenes, seed, args.scene_size)
    reader = reader_answer_accuracy(model, processor, dev, batch_size=args.eval_batch_size)
    majority = majority_baseline(train.records(), dev)
    subset = dev[: args.eval_subset_scenes]
    # the subset's own generation cap, as a fresh evaluation of those scenes alone would take
    subset_reader = reader_answer_accuracy(model, processor, subset, batch_size=args.eval_batch_size)
    return {
        "split": "dev",
        "num_scenes": len(dev),
        "num_questions": reader["num_questions"],
        "scoring": SCORING,
        "max_new_tokens": reader["max_new_tokens"],
        **accuracy_table(reader, majority),
        "majority_answers": majority["majority_answers"],
        "subset": {
            "num_scenes": len(subset),
            "num_questions": subset_reader["num_questions"],
            "accuracy": subset_reader["accuracy"],
            "per_type": subset_reader["per_type"],
            "max_new_tokens": subset_reader["max_new_tokens"],
            "batch_size": args.eval_batch_size,
        },
    }


def save(model, processor, output_dir: str, record: dict) -> None:
    """Weights (safetensors), config, tokenizer, the bounded image processor and `record.json`."""
    model.save_pretrained(output_dir)
    processor.tokenizer.save_pretrained(output_dir)
    processor.image_processor.save_pretrained(output_dir)
    (Path(output_dir) / RECORD_FILE).write_text(json.dumps(record, indent=2) + "\n")


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    args, training_args = parse(argv)
    cli.batch_sizes(args, training_args)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    set_seed(training_args.seed)
    started = time.time()
    model, processor = build_reader(args, training_args.seed)
    train = ReaderTrainingScenes(
        args.num_train_scenes, training_args.seed, args.scene_size, args.description_share, args.all_question_types
    )
    parameters = sum(parameter.numel() for parameter in model.parameters())
    logger.info("Reader of %d parameters, %d training scenes", parameters, len(train))
    trainer = Trainer(model=model, args=training_args, train_dataset=train, data_collator=ReaderCollator(processor))
    result = trainer.train()
    train_seconds = time.time() - started
    model.eval()
    evaluation = evaluate(model, processor, train, args, training_args.seed)
    record = {
        "command": " ".join(["python", "examples/train_reader.py", *argv]),
        "seed": training_args.seed,
        "steps": trainer.state.global_step,
        "batch_size": training_args.per_device_train_batch_size * training_args.gradient_accumulation_steps,
        "learning_rate": training_args.learning_rate,
        "train_loss": result.training_loss,
        "final_logged_loss": _last_loss(trainer),
        "num_train_scenes": len(train),
        "num_train_samples_seen": trainer.state.global_step * training_args.per_device_train_batch_size,
        "model": {**asdict(args), "parameters": parameters, "family": args.family},
        "format": {
            "compress_instruction": processor.compress_instruction,
            "image_tokens": args.image_tokens,
            "caption_turn": True,
        },
        "train_seconds": round(train_seconds, 1),
        "wall_seconds": round(time.time() - started, 1),
        "machine": f"{hardware()}, {platform.machine()}, torch {torch.__version__}, {torch.get_num_threads()} threads",
        "evaluation": evaluation,
    }
    if training_args.should_save:
        save(model, processor, training_args.output_dir, record)
        record["weight_bytes"] = (Path(training_args.output_dir) / "model.safetensors").stat().st_size
        (Path(training_args.output_dir) / RECORD_FILE).write_text(json.dumps(record, indent=2) + "\n")
    print_record(record, training_args.output_dir)
    return record


def _last_loss(trainer: Trainer) -> float | None:
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    return losses[-1] if losses else None


def print_record(record: dict, output_dir: str) -> None:
    evaluation = record["evaluation"]
    print(
        f"\nReader: {record['model']['parameters']:,} parameters, {record['steps']} steps in "
        f"{record['train_seconds']} s; saved to {output_dir}"
    )
    print(
        f"  dev: {evaluation['num_questions']} questions on {evaluation['num_scenes']} scenes, image visible, answers "
        f"of up to {evaluation['max_new_tokens']} tokens; {evaluation['scoring']}"
    )
    overall = evaluation["overall"]
    print(f"    {'overall':<10} reader {overall['reader']:.3f}  majority {overall['majority']:.3f}  (bar 0.80)")
    for kind, row in evaluation["per_type"].items():
        verdict = "ok" if row["met"] else f"short by {row['gap']:.3f}"
        print(
            f"    {kind:<10} reader {row['reader']:.3f}  majority {row['majority']:.3f}  bar {row['target']:.3f}  "
            f"{verdict}"
        )


if __name__ == "__main__":
    cli.run(main)
