"""Stage 2 of CoMa: contrastive matching with sentence-transformers, starting from the stage-1 checkpoint.

With no arguments it continues the embedded default: loads `outputs/stage1` (made by `python examples/pretrain.py`)
as a `SentenceTransformer`, trains all weights (`--recipe tiny`) with `CoMaContrastiveLoss` on the synthetic
mini-MMEB training pairs (each batch from one dataset), scores the dev split with `MMEBEvaluator`, and saves the
checkpoint to `outputs/stage2` (loads through `AutoModel` and `SentenceTransformer`) with `contrastive_summary.json`.

    python examples/train_contrastive.py
    python examples/train_contrastive.py --from_backbone          # skip stage 1: from the shipped reader
    python examples/train_contrastive.py --from_backbone --tiny_init random   # from a random-weight backbone
    python examples/train_contrastive.py --model_name_or_path outputs/stage1-3b --recipe paper \\
        --dataset TIGER-Lab/MMEB-train --subsets ImageNet_1K,MSCOCO_t2i --image_root mmeb_images

`--recipe paper` is the paper's setting: a fresh LoRA (r=16, alpha=64) on the language model, global batch 1024 in
GradCache mini-batches of 8, temperature 0.03, lr 5e-5, cosine, 5 % warm-up, 1500 steps. `--recipe released` is the
authors' released script: DoRA with the whole embedding matrix trained, batches of 64-row single-dataset chunks with
the datasets mixed uniformly and capped, no hard negatives, no duplicate-positive masking, mean pooling in training
and last-token pooling for evaluation (and in the saved checkpoint). A recipe states the global batch
(`--global_train_batch_size`); the per-device batch is derived from it and the process count (accumulation only when
`--max_micro_batch_size` asks for it: accumulated micro-batches do not see each other's rows as negatives).
Every `SentenceTransformerTrainingArguments` option works on the command line and overrides the recipe.
"""

from __future__ import annotations

import logging
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from sentence_transformers import SentenceTransformerTrainingArguments
from sentence_transformers.sentence_transformer.losses import MatryoshkaLoss
from transformers import set_seed

from coma_hf import cli
from coma_hf.configuration_coma import POOLING_MODES
from coma_hf.data.mini_mmeb import write_mini_mmeb
from coma_hf.data.stage2 import cap_per_dataset, load_mmeb_train, parse_dataset_caps, split_by_dataset, validate_pairs
from coma_hf.evaluation.mmeb import chance_baselines, load_mmeb_datasets
from coma_hf.evaluation.sentence_evaluator import MMEBSentenceEvaluator
from coma_hf.hub import hardware, save_checkpoint, write_run_summary
from coma_hf.released import COMPATIBILITY, processor_for_training, rendering_settings
from coma_hf.sentence_transformer import load_sentence_transformer
from coma_hf.training import (
    BackboneArguments,
    BatchArguments,
    CoMaContrastiveLoss,
    CoMaContrastiveTrainer,
    DataSourceArguments,
    KeepBestCheckpoint,
    LoraArguments,
    apply_lora,
    build_coma,
    check_sharding,
    chunked_batch_sampler,
    parse_with_recipe,
    weights_fingerprint,
)

logger = logging.getLogger("train_contrastive")
CONFIGS = Path(__file__).parent / "configs"
DEFAULT_STAGE1 = "outputs/stage1"
BEST_DEV = "best-dev"  # the --keep_best_by checkpoint's folder under --output_dir


@dataclass
class ModelArguments:
    model_name_or_path: str = field(
        default=DEFAULT_STAGE1, metadata={"help": "Stage-1 CoMa checkpoint (folder or Hub id)."}
    )
    from_backbone: bool = field(
        default=False,
        metadata={
            "help": "Skip stage 1: start from --backbone (default: the embedded tiny backbone, the shipped reader "
            "unless --tiny_init random) with fresh compression tokens."
        },
    )
    backbone: str | None = field(default=None, metadata={"help": "Backbone MLLM for --from_backbone."})
    recipe: str | None = field(
        default=None,
        metadata={
            "help": "'tiny', 'paper', 'released' or a JSON file of defaults (default: the recipe the start "
            "checkpoint was trained with, else tiny for the embedded backbone and paper for a real one)."
        },
    )
    pooling: str | None = field(
        default=None,
        metadata={
            "help": "Pooling of the K states in training (default: the checkpoint's).",
            "choices": POOLING_MODES,
        },
    )
    keep_best_by: str | None = field(
        default=None,
        metadata={
            "help": "Also keep the checkpoint with the highest value of this dev metric (e.g. dev_IND_precision@1; "
            "with --eval_strategy steps) in OUTPUT_DIR/best-dev, merged; the final checkpoint stays the output."
        },
    )
    eval_pooling: str | None = field(
        default=None,
        metadata={
            "help": "Pooling of the evaluations and of the saved checkpoint (default: the training pooling). "
            f"'last' after training on the mean: {COMPATIBILITY}; the method's value is the training pooling.",
            "choices": POOLING_MODES,
        },
    )


@dataclass
class DataArguments(DataSourceArguments):
    """Stage 2's data: MMEB-format pairs, how batches draw from datasets, and the dev evaluation."""

    dataset: str | None = field(
        default=None,
        metadata={
            "help": "MMEB-format training pairs: JSONL/parquet file, folder of per-dataset files, or Hub id "
            "(with --subsets). Default: the synthetic mini-MMEB training pairs."
        },
    )
    subsets: str | None = field(default=None, metadata={"help": "Comma-separated subsets (files or Hub configs)."})
    eval_data: str | None = field(
        default=None, metadata={"help": "MMEB-format evaluation folder (default: the mini-MMEB dev split)."}
    )
    eval_datasets: str | None = field(default=None, metadata={"help": "Comma-separated evaluation datasets."})
    max_train_scenes: int = field(default=2000, metadata={"help": "Synthetic scenes that make mini-MMEB pairs."})
    max_train_pairs: int | None = field(default=None, metadata={"help": "Use at most this many training pairs."})
    pair_seed: int = field(
        default=0,
        metadata={"help": "Seed of the shuffle that draws --max_train_pairs (one subset per seed, whatever --seed)."},
    )
    by_dataset: bool = field(default=True, metadata={"help": "Draw each batch from one dataset (the paper)."})
    dataset_chunk_size: int | None = field(
        default=None,
        metadata={
            "help": "With --by_dataset: build batches from chunks of this many rows of one dataset, each chunk's "
            "dataset drawn uniformly, instead of --multi_dataset_batch_sampler's whole batches; must divide the "
            f"global batch. 64: {COMPATIBILITY}; the method's value is unset (whole single-dataset batches)."
        },
    )
    max_pairs_per_dataset: str | None = field(
        default=None,
        metadata={
            "help": "Cap on each dataset's pairs (shuffled with seed 42, then cut): 'N' for every dataset, or "
            f"'name=N,name=N'. Caps per MMEB subset: {COMPATIBILITY}; the method's value is unset."
        },
    )
    hard_negatives: bool = field(
        default=True,
        metadata={
            "help": f"Train on the data's hard negatives (neg_*). false: {COMPATIBILITY}; the method's value is true."
        },
    )


@dataclass
class LossArguments:
    temperature: float | None = field(default=None, metadata={"help": "InfoNCE τ (default: the checkpoint's, 0.03)."})
    mini_batch_size: int = field(default=8, metadata={"help": "GradCache mini-batch (rows embedded at once)."})
    cached: bool = field(default=True, metadata={"help": "GradCache; false embeds the batch in one pass."})
    symmetric: bool = field(default=False, metadata={"help": "Add the document→query term."})
    mask_duplicate_positives: bool = field(default=True, metadata={"help": "Same-input positives are no negatives."})
    gather_across_devices: bool = field(
        default=True, metadata={"help": "Candidates from every process, gradients kept (the paper; no-op on one)."}
    )
    matryoshka_dims: str | None = field(
        default=None, metadata={"help": "e.g. '2048,512,128': wrap in MatryoshkaLoss."}
    )
    on_nonfinite_loss: str = field(
        default="stop", metadata={"help": "A NaN/inf loss: 'stop' (naming step and samples) or 'skip' the batch."}
    )


# The script's arguments, in the order `main` unpacks them.
ARGUMENTS = (
    ModelArguments,
    BackboneArguments,
    DataArguments,
    LossArguments,
    LoraArguments,
    BatchArguments,
    SentenceTransformerTrainingArguments,
)


def recipe_start(model_args: ModelArguments) -> str | None:
    """The checkpoint whose recipe stage 2 follows: the stage-1 checkpoint, or with --from_backbone the backbone
    (`None`: the embedded one). The default stage-1 folder is the embedded default run's output, so before it exists
    it counts as the embedded backbone (`initial_checkpoint` then says how to make it)."""
    if model_args.from_backbone:
        return model_args.backbone
    if model_args.model_name_or_path == DEFAULT_STAGE1 and not Path(DEFAULT_STAGE1).is_dir():
        return None
    return model_args.model_name_or_path


def check_start(model_args: ModelArguments) -> None:
    """The checkpoint a person named to start from must be one stage 2 can start from (stops before anything reads
    it); the default stage-1 folder, before it exists, is `initial_checkpoint`'s to explain."""
    if model_args.from_backbone:
        if model_args.backbone is not None:
            cli.backbone_checkpoint(model_args.backbone, "--backbone")
    elif model_args.model_name_or_path != DEFAULT_STAGE1 or Path(DEFAULT_STAGE1).exists():
        cli.coma_checkpoint(model_args.model_name_or_path, "--model_name_or_path")


def check_data(data_args: DataArguments) -> None:
    if data_args.dataset is not None:
        cli.local_or_hub(data_args.dataset, "--dataset", "MMEB-format training pairs (a file or a folder)")
    if data_args.eval_data is not None:
        cli.local_or_hub(data_args.eval_data, "--eval_data", "an MMEB-format evaluation folder")
    if data_args.image_root is not None:
        cli.existing_folder(data_args.image_root, "--image_root")


def initial_checkpoint(
    model_args: ModelArguments, backbone_args: BackboneArguments, output_dir: str, seed: int
) -> str:
    """The folder or Hub id stage 2 starts from; with --from_backbone, a fresh CoMa model saved for the purpose."""
    if not model_args.from_backbone:
        path = model_args.model_name_or_path
        if path == DEFAULT_STAGE1 and not Path(path).is_dir():
            raise SystemExit(
                f"No stage-1 checkpoint at {path}. Make it with `python examples/pretrain.py` (about 5 minutes on "
                "2 CPU cores), name another with --model_name_or_path, or pass --from_backbone to skip stage 1."
            )
        return path
    model, _ = build_coma(backbone_args, model_args.backbone, seed)
    folder = Path(output_dir) / "initial"
    save_checkpoint(model, folder)
    return str(folder)


def mini_mmeb(data_args: DataArguments) -> Path:
    folder = Path(data_args.synthetic_dir) / "mini_mmeb"
    if not (folder / "train.jsonl").is_file() or not (folder / "dev").is_dir():
        write_mini_mmeb(data_args.synthetic_dir, max_train_scenes=data_args.max_train_scenes)
    return folder


def load_training_pairs(data_args: DataArguments, processor):
    """(pairs, skipped rows): a `DatasetDict` by dataset when `by_dataset`, else one `Dataset`."""
    subsets = data_args.subsets.split(",") if data_args.subsets else None
    if data_args.dataset is None:
        source, root = mini_mmeb(data_args) / "train.jsonl", data_args.image_root or data_args.synthetic_dir
    else:
        source, root = data_args.dataset, data_args.image_root
    pairs = load_mmeb_train(source, image_root=root, subsets=subsets, hard_negatives=data_args.hard_negatives)
    if data_args.max_train_pairs is not None and len(pairs) > data_args.max_train_pairs:
        pairs = pairs.shuffle(seed=data_args.pair_seed).select(range(data_args.max_train_pairs))
    bad = []
    if data_args.validate_data or data_args.skip_bad_samples:
        bad = validate_pairs(pairs, processor)
        if bad and not data_args.skip_bad_samples:
            listing = "\n".join(f"  row {sample.index}: {sample.error}" for sample in bad[:20])
            raise SystemExit(f"{len(bad)} bad training rows (use --skip_bad_samples to skip them):\n{listing}")
        for sample in bad:
            logger.warning("Skipping training row %d: %s", sample.index, sample.error)
        skip = {sample.index for sample in bad}
        pairs = pairs.select([index for index in range(len(pairs)) if index not in skip])
    if not data_args.by_dataset:
        if data_args.max_pairs_per_dataset or data_args.dataset_chunk_size:
            raise SystemExit(
                "--max_pairs_per_dataset and --dataset_chunk_size work by dataset: pass --by_dataset true"
            )
        return pairs, bad
    return cap_per_dataset(split_by_dataset(pairs), parse_dataset_caps(data_args.max_pairs_per_dataset)), bad


def use_chunked_batches(training_args, data_args: DataArguments, train, global_batch: int) -> None:
    """With --dataset_chunk_size, batches of single-dataset chunks (`coma_hf.training.samplers`); the chunk must
    divide the global batch, so that every optimizer step is whole chunks."""
    chunk = data_args.dataset_chunk_size
    if chunk is None:
        return
    if global_batch % chunk:
        raise SystemExit(f"--dataset_chunk_size {chunk} does not divide the global batch {global_batch}")
    training_args.multi_dataset_batch_sampler = chunked_batch_sampler(chunk, list(train))


def evaluation_datasets(data_args: DataArguments):
    folder = data_args.eval_data or str(mini_mmeb(data_args) / "dev")
    names = data_args.eval_datasets.split(",") if data_args.eval_datasets else None
    return load_mmeb_datasets(
        folder, names=names, image_root=None if data_args.eval_data is None else data_args.image_root
    )


def build_loss(model, loss_args: LossArguments):
    loss = CoMaContrastiveLoss(
        model,
        temperature=loss_args.temperature,
        mini_batch_size=loss_args.mini_batch_size,
        cached=loss_args.cached,
        symmetric=loss_args.symmetric,
        mask_duplicate_positives=loss_args.mask_duplicate_positives,
        gather_across_devices=loss_args.gather_across_devices,
    )
    if loss_args.matryoshka_dims:
        loss = MatryoshkaLoss(model, loss, matryoshka_dims=[int(dim) for dim in loss_args.matryoshka_dims.split(",")])
    return loss


# Kept long: the stage's steps in order (parse, start, data, train, evaluate, save), each one call.
def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    (model_args, backbone_args, data_args, loss_args, lora_args, _, training_args), why, batch = parse_with_recipe(
        ARGUMENTS, argv, "stage2", CONFIGS, recipe_start, check_start=check_start, output_dir="outputs/stage2"
    )
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    logger.info("Recipe %r: %s", model_args.recipe, why)
    logger.info("Batch: %s", batch.describe())
    check_data(data_args)
    check_sharding(training_args, lora_args, "stage2")
    set_seed(training_args.seed)
    started = time.time()

    with training_args.main_process_first(desc="preparing the start checkpoint"):  # written once, read by all
        start_from = initial_checkpoint(model_args, backbone_args, training_args.output_dir, training_args.seed)
    model = load_sentence_transformer(start_from, device="cpu" if training_args.use_cpu else None)
    transformer = model[0]
    start_weights = weights_fingerprint(transformer.model)  # equal fingerprints: runs started from the same weights
    if model_args.pooling is not None:
        transformer.model.config.pooling = model_args.pooling
    training_pooling = transformer.model.config.pooling
    bounds = (backbone_args.min_image_tokens, backbone_args.max_image_tokens, backbone_args.max_length)
    if (training_processor := processor_for_training(transformer.processor, *bounds)) is not None:
        transformer.processor = transformer.model.processor = training_processor  # saved with the output too
        logger.info(
            "The start renders as the release's evaluation; training renders with %s",
            rendering_settings(training_processor),
        )
    transformer.model = apply_lora(transformer.model, lora_args)
    with training_args.main_process_first(desc="writing or reading the data"):
        train, bad = load_training_pairs(data_args, transformer.processor)
        evaluation = evaluation_datasets(data_args)
    evaluator = MMEBSentenceEvaluator(evaluation, name="dev", batch_size=training_args.per_device_eval_batch_size)
    num_pairs = sum(len(part) for part in train.values()) if hasattr(train, "values") else len(train)
    logger.info("Stage 2 from %s on %d pairs (%d skipped)", start_from, num_pairs, len(bad))
    use_chunked_batches(training_args, data_args, train, batch.global_batch)

    trainer = CoMaContrastiveTrainer(
        model=model,
        args=training_args,
        train_dataset=train,
        loss=build_loss(model, loss_args),
        evaluator=evaluator,
        on_nonfinite_loss=loss_args.on_nonfinite_loss,
        eval_pooling=model_args.eval_pooling,
    )
    keep_best = None
    if model_args.keep_best_by:
        keep_best = KeepBestCheckpoint(
            trainer, model_args.keep_best_by, str(Path(training_args.output_dir) / BEST_DEV)
        )
        trainer.add_callback(keep_best)
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)

    trainer.save_merged(training_args.output_dir)
    summary = summarize(trainer, model, evaluator, start_from, num_pairs, bad, started)
    summary["start_weights"] = start_weights
    summary["best_dev"] = keep_best.best if keep_best else None
    summary["recipe"] = model_args.recipe
    summary["rendering"] = rendering_settings(transformer.processor)
    summary["batch"] = batch.as_dict()
    summary["pooling"] = {"training": training_pooling, "evaluation": model_args.eval_pooling or training_pooling}
    summary["train_dataset"] = data_args.dataset or "synthetic mini-MMEB"
    summary["hardware"] = hardware()
    if training_args.should_save:
        write_run_summary(training_args.output_dir, "contrastive_summary.json", summary)
    print_summary(summary, training_args.output_dir)
    return summary


def summarize(trainer, model, evaluator, start_from, num_pairs, bad, started) -> dict:
    model.eval()
    results = evaluator.evaluator(model)
    baselines = chance_baselines(evaluator.evaluator.datasets)
    return {
        "started_from": start_from,
        "train_loss_first": trainer.first_step_loss,  # the run's first optimizer step
        "train_loss_last": trainer.last_step_loss,  # and its last
        "train_loss_steps": trainer.loss_steps,  # their step numbers (after a resume, the first is not step 1)
        "eval_precision_at_1": results["overall"]["precision@1"],
        "eval_per_distribution": {name: values["precision@1"] for name, values in results["distributions"].items()},
        "eval_per_meta_task": {task: values["precision@1"] for task, values in results["meta_tasks"].items()},
        "eval_per_dataset": {name: values["precision@1"] for name, values in results["datasets"].items()},
        "baseline_precision_at_1": baselines["overall"]["best"],
        "baseline_per_distribution": {name: values["best"] for name, values in baselines["distributions"].items()},
        "baseline_per_meta_task": {task: values["best"] for task, values in baselines["meta_tasks"].items()},
        "num_train_pairs": num_pairs,
        "num_skipped_samples": len(bad),
        "skipped_nonfinite_batches": trainer.skipped_batches,
        "skipped_samples": [asdict(sample) for sample in bad],
        "global_steps": trainer.state.global_step,
        "first_step_rows": trainer.first_step_rows,  # rows of the first optimizer step, all processes together
        "seconds": round(time.time() - started, 1),
        "device": str(model.device),
    }


def print_summary(summary: dict, output_dir: str) -> None:
    print(f"\nStage 2 finished in {summary['seconds']} s ({summary['global_steps']} steps); saved to {output_dir}")
    first, last = (summary[key] for key in ("train_loss_first", "train_loss_last"))
    if first is not None:
        print(f"  train loss          {first:.4f} -> {last:.4f} (first -> last optimizer step)")
    print(
        f"  dev P@1             {summary['eval_precision_at_1']:.3f} (chance/constant baseline "
        f"{summary['baseline_precision_at_1']:.3f})"
    )
    for name, value in summary["eval_per_distribution"].items():
        print(f"    {name:<17} {value:.3f}  baseline {summary['baseline_per_distribution'][name]:.3f}")
    for task, value in summary["eval_per_meta_task"].items():
        print(f"    {task:<17} {value:.3f}  baseline {summary['baseline_per_meta_task'][task]:.3f}")
    print(f"  pairs {summary['num_train_pairs']} trained, {summary['num_skipped_samples']} skipped")


if __name__ == "__main__":
    cli.run(main)
