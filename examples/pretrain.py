"""Stage 1 of CoMa: compression pre-training — the project's main job.

With no arguments it runs on the embedded default: starts from the shipped pre-trained reader (`coma_hf.reader`, a
0.8 M-parameter Qwen2.5-VL that reads the synthetic scenes; `--tiny_init random` builds a random-weight backbone of the
`--tiny_*` sizes instead), writes the synthetic scenes (train/dev/test) to `outputs/synthetic`, trains all weights
(`--recipe tiny`),
measures how well answers decoded from the compression states alone match on unseen dev scenes, prints a summary
and saves the merged checkpoint to `outputs/stage1` with `pretrain_summary.json`.

With `--model_name_or_path` (a Hub id or folder of a Qwen2/2.5/3-VL model) the paper's recipe is the default
(`--recipe paper`: LoRA on the language model, vision tower frozen, compression rows trained); `--recipe released` is
what the authors' released script runs (DoRA, the whole embedding matrix trained, plain causal attention, loss on
everything after the compression tokens as a per-sample mean). The recipe follows the start checkpoint
(`coma_hf.training.recipe_of_start`, which the log quotes): the recipe its run summary records, else `tiny` when its
config marks the package's embedded backbone, else `paper`.

A recipe states the global batch (`--global_train_batch_size`); the per-device batch and the accumulation are derived
from it and the process count, and logged (`coma_hf.training.plan_batch`). `--per_device_train_batch_size` /
`--gradient_accumulation_steps` on the command line win.

    python examples/pretrain.py
    python examples/pretrain.py --model_name_or_path Qwen/Qwen2.5-VL-3B-Instruct --dataset data/stage1.jsonl
    python examples/pretrain.py --model_name_or_path Qwen/Qwen2.5-VL-3B-Instruct --recipe released --dataset qa.jsonl
    python examples/pretrain.py --recipe examples/configs/stage1_paper.json --use_dora true
    python examples/pretrain.py --objective ce+kl --kl_weight 0.5   # the paper's KL ablation (needs trl>=1.16)

Every `TrainingArguments` option works on the command line and overrides the recipe.
"""

from __future__ import annotations

import logging
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from transformers import TrainingArguments, set_seed

from coma_hf import cli
from coma_hf.data.stage1 import (
    hold_out_by_image,
    load_stage1_dataset,
    normalize_stage1_record,
    validate_stage1_dataset,
)
from coma_hf.data.synthetic import write_synthetic_dataset
from coma_hf.evaluation.compression import (
    MAX_ANSWER_TOKENS,
    SCORING,
    answer_accuracy,
    generation_length,
    majority_baseline,
)
from coma_hf.hub import hardware, write_run_summary
from coma_hf.released import COMPATIBILITY
from coma_hf.training import (
    LOSS_NORMALIZATIONS,
    OBJECTIVES,
    BackboneArguments,
    BatchArguments,
    DataSourceArguments,
    LoraArguments,
    apply_lora,
    build_coma,
    check_sharding,
    frozen_teacher,
    parse_with_recipe,
    uses_teacher,
    weights_fingerprint,
)

logger = logging.getLogger("pretrain")
CONFIGS = Path(__file__).parent / "configs"


@dataclass
class ModelArguments:
    model_name_or_path: str | None = field(
        default=None, metadata={"help": "Backbone MLLM (Hub id or folder). Default: the embedded tiny backbone."}
    )
    recipe: str | None = field(
        default=None,
        metadata={
            "help": "'tiny', 'paper', 'released' or a JSON file of defaults (default: what the backbone calls "
            "for: tiny for the embedded one, paper for a real one)."
        },
    )
    loss_on: str = field(
        default="answers",
        metadata={"help": f"'answers' or 'all_after_compression' ({COMPATIBILITY}); the method's value is 'answers'."},
    )
    loss_normalization: str = field(
        default="tokens",
        metadata={
            "help": "'tokens' (the summed token loss over the global batch's label tokens) or 'per_sample_mean' "
            f"(each sample's mean token loss, averaged over the global batch's samples: {COMPATIBILITY}); the "
            "method's value is 'tokens'.",
            "choices": LOSS_NORMALIZATIONS,
        },
    )
    attention_rule: str = field(default="bottleneck", metadata={"help": "'bottleneck' (CoMa) or 'causal' (control)."})
    on_nonfinite_loss: str = field(
        default="stop", metadata={"help": "A NaN/inf loss: 'stop' (naming step and samples) or 'skip' the batch."}
    )
    objective: str = field(
        default="ce",
        metadata={
            "help": "Stage-1 loss: 'ce' (answer cross-entropy, the paper's), 'kl' (token-level KL(teacher || "
            "student) on the answer tokens; the teacher is a frozen copy of the starting model that reads the input "
            "directly) or 'ce+kl' (ce + kl_weight * kl). The KL objectives need trl>=1.16.",
            "choices": OBJECTIVES,
        },
    )
    kl_weight: float = field(default=1.0, metadata={"help": "Weight of the KL term in --objective ce+kl."})


@dataclass
class DataArguments(DataSourceArguments):
    """Stage 1's data: QA rows (or synthetic scenes), the held-out split and the answer evaluation."""

    dataset: str | None = field(
        default=None,
        metadata={
            "help": "Stage-1 data: JSONL, folder with train.jsonl, saved dataset, or Hub id. "
            "Default: synthetic scenes written to --synthetic_dir."
        },
    )
    eval_dataset: str | None = field(
        default=None,
        metadata={
            "help": "Held-out data (default: the dev split next to --dataset, if any; else a slice of "
            "--dataset, see --validation_split_percentage)."
        },
    )
    validation_split_percentage: float = field(
        default=5.0,
        metadata={
            "help": "With --dataset and no held-out data: this percentage of its rows, drawn as whole images (no "
            "image on both sides) and at most --max_eval_samples rows, is held out of training for the answer "
            "evaluation; 0 turns it off."
        },
    )
    num_train_scenes: int = field(default=4000, metadata={"help": "Synthetic training scenes."})
    num_dev_scenes: int = field(default=200, metadata={"help": "Synthetic dev scenes."})
    num_test_scenes: int = field(default=200, metadata={"help": "Synthetic test scenes."})
    scene_size: int = field(default=112, metadata={"help": "Side of the synthetic images in pixels."})
    max_eval_samples: int = field(default=200, metadata={"help": "Held-out samples for the answer evaluation."})
    max_answer_tokens: int = field(
        default=MAX_ANSWER_TOKENS, metadata={"help": "Cap on generated answer tokens (else the longest reference's)."}
    )
    max_qa_turns: int | None = field(default=None, metadata={"help": "Train on each conversation's first turns only."})


# The script's arguments, in the order `main` unpacks them.
ARGUMENTS = (ModelArguments, BackboneArguments, DataArguments, LoraArguments, BatchArguments, TrainingArguments)


def load_data(data_args: DataArguments, seed: int = 0):
    """(train, train image root, eval, eval image root, where eval came from); synthetic scenes when no dataset is
    named, and with --dataset alone a held-out slice of it, split by image."""
    if data_args.dataset is None:
        paths = write_synthetic_dataset(
            data_args.synthetic_dir,
            data_args.num_train_scenes,
            data_args.num_dev_scenes,
            data_args.num_test_scenes,
            image_size=data_args.scene_size,
        )
        train, root = load_stage1_dataset(paths["train"], image_root=data_args.image_root)
        evaluation, eval_root = load_stage1_dataset(paths["dev"], image_root=data_args.image_root)
        return train, root, evaluation, eval_root, "synthetic dev scenes"
    train, root = load_stage1_dataset(data_args.dataset, "train", data_args.image_root)
    if data_args.eval_dataset:
        evaluation, eval_root = load_stage1_dataset(data_args.eval_dataset, "dev", data_args.image_root)
        return train, root, evaluation, eval_root, data_args.eval_dataset
    if Path(data_args.dataset).is_dir() and (Path(data_args.dataset) / "dev.jsonl").is_file():
        evaluation, eval_root = load_stage1_dataset(data_args.dataset, "dev", data_args.image_root)
        return train, root, evaluation, eval_root, f"{data_args.dataset} (dev split)"
    train, evaluation = hold_out_by_image(
        train, data_args.validation_split_percentage, data_args.max_eval_samples, seed, image_root=root
    )
    if evaluation is None:
        if data_args.validation_split_percentage > 0:
            logger.warning(
                "No held-out rows: --dataset has too few images for --validation_split_percentage %g and "
                "--max_eval_samples %d; name held-out data with --eval_dataset for a quality signal",
                data_args.validation_split_percentage,
                data_args.max_eval_samples,
            )
        return train, root, None, None, None
    logger.info("Held out %d rows of --dataset (whole images) for the answer evaluation", len(evaluation))
    source = f"{len(evaluation)} rows held out of --dataset by image ({data_args.validation_split_percentage:g} %)"
    return train, root, evaluation, root, source


def drop_bad_rows(dataset, processor, root, data_args: DataArguments, name: str):
    """Validate up front when asked; skip and count bad rows, or stop naming them."""
    if not (data_args.validate_data or data_args.skip_bad_samples):
        return dataset, []
    bad = validate_stage1_dataset(dataset, processor, root)
    if bad and not data_args.skip_bad_samples:
        listing = "\n".join(f"  row {sample.index}: {sample.error}" for sample in bad[:20])
        raise SystemExit(f"{len(bad)} bad rows in the {name} data (use --skip_bad_samples to skip them):\n{listing}")
    for sample in bad:
        logger.warning("Skipping %s row %d: %s", name, sample.index, sample.error)
    bad_indices = {sample.index for sample in bad}
    return dataset.select([index for index in range(len(dataset)) if index not in bad_indices]), bad


def check_start(model_args: ModelArguments) -> None:
    """A backbone named with --model_name_or_path must be one CoMa builds on (stops before the recipe reads it)."""
    if model_args.model_name_or_path is not None:
        cli.backbone_checkpoint(model_args.model_name_or_path, "--model_name_or_path")


def check_data(data_args: DataArguments) -> None:
    for flag, value in (("--dataset", data_args.dataset), ("--eval_dataset", data_args.eval_dataset)):
        if value is not None:
            cli.local_or_hub(value, flag, "stage-1 data (a JSONL file, a folder or a saved dataset)")


# Kept long: the stage's steps in order (parse, build, data, train, evaluate, save), each one call.
def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    (model_args, backbone_args, data_args, lora_args, _, training_args), why, batch = parse_with_recipe(
        ARGUMENTS,
        argv,
        "stage1",
        CONFIGS,
        lambda model_args: model_args.model_name_or_path,
        check_start=check_start,
        output_dir="outputs/stage1",
    )
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    logger.info("Recipe %r: %s", model_args.recipe, why)
    logger.info("Batch: %s", batch.describe())
    check_data(data_args)
    check_sharding(training_args, lora_args, "stage1")
    if model_args.objective != "ce+kl" and model_args.kl_weight != 1.0:
        raise SystemExit(
            f"--kl_weight weighs the KL term of --objective ce+kl; the objective is {model_args.objective!r}"
        )
    set_seed(training_args.seed)
    started = time.time()

    model, processor = build_coma(
        backbone_args,
        model_args.model_name_or_path,
        training_args.seed,
        loss_on=model_args.loss_on,
        attention_rule=model_args.attention_rule,
    )
    initial_weights = weights_fingerprint(model)  # runs with equal fingerprints started from the same weights
    with training_args.main_process_first(desc="writing or reading the data"):  # synthetic scenes written once
        train, root, evaluation, eval_root, eval_source = load_data(data_args, training_args.seed)
    train, bad_train = drop_bad_rows(train, processor, root, data_args, "training")
    if evaluation is not None:
        evaluation, _ = drop_bad_rows(evaluation, processor, eval_root, data_args, "evaluation")
    logger.info("Training on %d samples (%d skipped)", len(train), len(bad_train))

    from coma_hf.training.trainers import CoMaCompressionTrainer

    teacher = frozen_teacher(model) if uses_teacher(model_args.objective) else None  # the starting model, frozen
    trainer = CoMaCompressionTrainer(
        model=apply_lora(model, lora_args),
        args=training_args,
        train_dataset=train,
        processing_class=processor,
        image_root=root,
        max_turns=data_args.max_qa_turns,
        on_nonfinite_loss=model_args.on_nonfinite_loss,
        objective=model_args.objective,
        kl_weight=model_args.kl_weight,
        teacher=teacher,
        loss_normalization=model_args.loss_normalization,
    )
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    merged = trainer.save_merged(training_args.output_dir)

    summary = summarize(trainer, merged, processor, train, evaluation, eval_root, data_args, bad_train, started)
    summary["initial_weights"] = initial_weights
    summary["eval_source"] = eval_source
    summary["recipe"] = model_args.recipe
    summary["batch"] = batch.as_dict()
    summary["objective"] = model_args.objective
    summary["loss_normalization"] = model_args.loss_normalization
    if model_args.objective == "ce+kl":
        summary["kl_weight"] = model_args.kl_weight
    summary["train_dataset"] = data_args.dataset or "synthetic scenes"
    summary["hardware"] = hardware()
    if training_args.should_save:
        write_run_summary(training_args.output_dir, "pretrain_summary.json", summary)
    print_summary(summary, training_args.output_dir)
    return summary


def summarize(trainer, model, processor, train, evaluation, eval_root, data_args, bad_train, started) -> dict:
    summary = {
        "train_loss_first": trainer.first_step_loss,  # the run's first optimizer step
        "train_loss_last": trainer.last_step_loss,  # and its last
        "train_loss_steps": trainer.loss_steps,  # their step numbers (after a resume, the first is not step 1)
        "num_train_samples": len(train),
        "num_skipped_samples": len(bad_train),
        "skipped_samples": [asdict(sample) for sample in bad_train],
        "dropped_qa_turns": trainer.dropped_turns,
        "skipped_nonfinite_batches": trainer.skipped_batches,
        "global_steps": trainer.state.global_step,
        "first_step_rows": trainer.first_step_rows,  # rows of the first optimizer step, all processes together
    }
    if evaluation is not None and len(evaluation):
        rows = [evaluation[index] for index in range(min(len(evaluation), data_args.max_eval_samples))]
        records = [normalize_stage1_record(row, index, eval_root) for index, row in enumerate(rows)]
        needed = generation_length(processor, records, cap=None)
        length = min(needed, data_args.max_answer_tokens)
        model.eval()
        heldout = answer_accuracy(model, processor, records, max_new_tokens=length)
        control = answer_accuracy(model, processor, records, control=True, max_new_tokens=length)
        majority = majority_baseline((train[index] for index in range(len(train))), records)
        summary.update(
            heldout_answer_accuracy=heldout["accuracy"],
            majority_baseline_accuracy=majority["accuracy"],
            control_answer_accuracy=control["accuracy"],
            heldout_answer_f1=heldout["f1"],
            majority_baseline_f1=majority["f1"],
            control_answer_f1=control["f1"],
            answer_scoring=SCORING,
            answer_max_new_tokens=length,
            answer_token_cap=data_args.max_answer_tokens,
            answers_cut_at_cap=needed > length,  # then the longest references cannot be matched exactly
            num_eval_samples=len(records),
            eval_sample_ids=[str(record["id"]) for record in records],
            num_eval_questions=heldout["num_questions"],
            per_type={
                kind: {
                    "heldout": heldout["per_type"][kind],
                    "majority": majority["per_type"].get(kind),
                    "control": control["per_type"].get(kind),
                    "heldout_f1": heldout["per_type_f1"][kind],
                }
                for kind in heldout["per_type"]
            },
        )
    summary["seconds"] = round(time.time() - started, 1)
    summary["device"] = str(model.device)
    return summary


def print_summary(summary: dict, output_dir: str) -> None:
    print(f"\nStage 1 finished in {summary['seconds']} s ({summary['global_steps']} steps); saved to {output_dir}")
    weight = f" (kl_weight {summary['kl_weight']:g})" if "kl_weight" in summary else ""
    print(f"  objective             {summary['objective']}{weight}")
    first, last = (summary[key] for key in ("train_loss_first", "train_loss_last"))
    if first is not None:
        print(f"  train loss            {first:.4f} -> {last:.4f} (first -> last optimizer step)")
    if "heldout_answer_accuracy" in summary:
        print(
            f"  held-out answers on {summary['num_eval_samples']} samples ({summary['eval_source']}), "
            f"{summary['num_eval_questions']} questions, answers of up to {summary['answer_max_new_tokens']} tokens "
            f"generated from the K states alone; scored by {summary['answer_scoring']}:"
        )
        print("                          exact match  token F1")
        for label, key in (
            ("from the K states", "heldout_answer"),
            ("majority baseline", "majority_baseline"),
            ("control (other input)", "control_answer"),
        ):
            print(f"    {label:<22} {summary[key + '_accuracy']:>9.3f}  {summary[key + '_f1']:>8.3f}")
        for kind, scores in summary["per_type"].items():
            print(
                f"    {kind:<10} held-out {scores['heldout']:.2f}  majority {scores['majority']:.2f}  control "
                f"{scores['control']:.2f}  (exact match)"
            )
    print(f"  samples {summary['num_train_samples']} trained, {summary['num_skipped_samples']} skipped")


if __name__ == "__main__":
    cli.run(main)
