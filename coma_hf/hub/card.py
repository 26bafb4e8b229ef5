"""The model card of a CoMa checkpoint: `model_cards/coma.md` filled in from the checkpoint and its run's summaries.

Inputs, all read from the checkpoint folder: `config.json` (backbone, K, pooling), `pretrain_summary.json` (stage 1),
`contrastive_summary.json` (stage 2), `mmeb_results.json` (`examples/evaluate.py`), `mteb_results.json` (the main
scores of an mteb results folder, `mteb_summary`) and `conversion_summary.json` (a checkpoint converted from the
authors' release, `coma_hf.released`), each used when present.
`save_checkpoint` is the package's one save: `save_pretrained` and then `write_model_card`, so every checkpoint a
script or trainer saves carries an up-to-date `README.md` (sentence-transformers' own generated card is never
written). A plain `CoMaModel.save_pretrained` writes no card of its own: it keeps the card of the folder the model was
loaded from.
"""

from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path

from huggingface_hub import EvalResult, ModelCard, ModelCardData

from ..configuration_coma import is_embedded_backbone
from ..evaluation.mmeb import markdown_table
from ..saving import (  # noqa: F401 - the summary names are re-exported: callers import them from here too
    CONTRASTIVE_SUMMARY,
    CONVERSION_SUMMARY,
    MAX_SHARD_SIZE,
    MMEB_RESULTS,
    MTEB_RESULTS,
    PRETRAIN_SUMMARY,
    SUMMARY_FILES,
)
from ..storage import load_record

PLACEHOLDER_REPO = "path/to/this/model"
HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")
TAGS = ["coma", "multimodal-embedding", "sentence-transformers", "transformers", "feature-extraction", "image-text"]


def template_path() -> Path:
    """`model_cards/coma.md` of a source checkout, else the copy a wheel installs under `share/coma_hf`."""
    candidates = [
        Path(__file__).resolve().parents[2] / "model_cards" / "coma.md",
        Path(sys.prefix) / "share" / "coma_hf" / "model_cards" / "coma.md",
    ]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise FileNotFoundError("The CoMa model card template (model_cards/coma.md) is not installed")


def render_model_card(folder: str | os.PathLike, repo_id: str | None = None, license: str = "other") -> ModelCard:
    """The card of the checkpoint in `folder`; `repo_id` goes into the usage snippets (a placeholder if `None`)."""
    folder = Path(folder)
    config = json.loads((folder / "config.json").read_text())
    summaries = {name: read_json_file(folder / name) for name in SUMMARY_FILES}
    backbone = config.get("backbone_config", {})
    base_model = config.get("backbone_name_or_path")
    base_model = base_model if base_model and HUB_ID.match(base_model) else None
    evaluation = summaries[MMEB_RESULTS]
    model_name = repo_id.split("/")[-1] if repo_id else "CoMa embedding model"
    conversion = summaries[CONVERSION_SUMMARY]
    if conversion:  # the weights are the authors'; the card names where they came from
        base_model_text = f"the authors' released checkpoint `{_source_name(conversion.get('source'))}`"
    elif base_model:
        base_model_text = f"`{base_model}`"
    else:
        base_model_text = "the small random-initialised backbone built into coma_hf"
    card_data = ModelCardData(
        language=["en"],
        license=license,
        library_name="sentence-transformers",
        pipeline_tag="feature-extraction",
        tags=TAGS + [backbone.get("model_type", "")],
        base_model=base_model,
        datasets=_hub_datasets(summaries),
        model_name=model_name,
        eval_results=(_eval_results(evaluation) if evaluation else []) + _mteb_eval_results(summaries[MTEB_RESULTS])
        or None,
    )
    processor = read_json_file(folder / "processor_config.json") or {}
    text = backbone.get("text_config", {})
    return ModelCard.from_template(
        card_data,
        template_path=str(template_path()),
        model_name=model_name,
        repo_id=repo_id or PLACEHOLDER_REPO,
        base_model_text=base_model_text,
        model_type=backbone.get("model_type", "unknown"),
        num_compression_tokens=config.get("num_compression_tokens"),
        pooling=config.get("pooling", "mean"),
        loss_on=processor.get("loss_on") or config.get("loss_on", "answers"),  # older folders: config.json
        embedding_size=config.get("embedding_dim") or text.get("hidden_size") or backbone.get("hidden_size"),
        training_rows=_training_rows(summaries),
        evaluation_table=markdown_table(evaluation) if evaluation else "",
        evaluation_source="Precision@1 (%) in the MMEB format, from `examples/evaluate.py` "
        "(gold ranked first among all candidates; ties count as misses).",
        tiny=is_embedded_backbone(config),
        image_tokens=f"{processor.get('min_image_tokens') or 'the default'} and "
        f"{processor.get('max_image_tokens') or 'the default'}",
        max_length=processor.get("max_length") or "the model's",
    )


def write_run_summary(folder: str | os.PathLike, name: str, summary: dict) -> None:
    """Write a run summary (one of `SUMMARY_FILES`) beside the checkpoint and render the card again, which reads it."""
    (Path(folder) / name).write_text(json.dumps(summary, indent=2))
    write_model_card(folder)


def write_model_card(folder: str | os.PathLike, repo_id: str | None = None, license: str = "other") -> Path:
    """Render the card of `folder` into `folder/README.md`; returns its path."""
    path = Path(folder) / "README.md"
    render_model_card(folder, repo_id, license).save(path)
    return path


def save_checkpoint(
    model, folder: str | os.PathLike, max_shard_size: int | str = MAX_SHARD_SIZE, **save_kwargs
) -> None:
    """Save a CoMa model as the package does everywhere: `model.save_pretrained(folder, **save_kwargs)` (weights,
    remote code, processor, sentence-transformers files, the run summaries it carries), then its CoMa card
    (`write_model_card`). A process that is not the main one (`is_main_process=False`) writes nothing.

    Weights are written in safetensors shards of at most `max_shard_size` (bytes, or a string such as `"2GB"`;
    default `coma_hf.saving.MAX_SHARD_SIZE`), a tensor larger than that alone in its own shard."""
    model.save_pretrained(folder, max_shard_size=max_shard_size, **save_kwargs)
    if save_kwargs.get("is_main_process", True):
        write_model_card(folder)


def hardware() -> str:
    """What trained the model, for the summaries and the card: the GPU's name, or the CPU core count."""
    import torch

    if torch.cuda.is_available():
        return f"{torch.cuda.device_count()} × {torch.cuda.get_device_name(0)}"
    return f"CPU, {os.cpu_count()} cores"


def read_json_file(path: Path) -> dict | None:
    """The JSON object in `path`, or `None` when there is no such file or it does not hold a readable object (with a
    warning naming it: `coma_hf.storage.load_record`, the one reader of such records)."""
    return load_record(path)


def _hub_datasets(summaries: dict) -> list[str] | None:
    names = [summary.get("train_dataset") for summary in summaries.values() if summary]
    hub = sorted({name for name in names if isinstance(name, str) and HUB_ID.match(name) and not Path(name).exists()})
    return hub or None


def _source_name(source: str | None) -> str:
    """A released checkpoint's name for the card: a Hub id as it is, a local folder by its last part only."""
    if not source:
        return "unknown"
    return source if HUB_ID.match(source) and not Path(source).exists() else Path(source).name


def _training_rows(summaries: dict) -> list[tuple[str, str]]:
    rows = []
    conversion = summaries[CONVERSION_SUMMARY]
    if conversion:
        merged = (
            f", adapter merged into `{_source_name(conversion.get('base_model'))}`"
            if conversion.get("adapter")
            else ""
        )
        rows.append(
            (
                "converted from the release",
                f"`{_source_name(conversion.get('source'))}`{merged} (recipe {conversion.get('recipe')}; compression "
                f"tokens {conversion.get('compression_token_format')} from the {conversion.get('tokens_from')}; "
                f"pooling {conversion.get('pooling')} as their evaluation)",
            )
        )
    stage1, stage2 = summaries["pretrain_summary.json"], summaries["contrastive_summary.json"]
    if stage1:
        rows.append(
            (
                "stage 1 (compression)",
                f"{stage1.get('global_steps')} steps on {stage1.get('num_train_samples')} "
                f"samples, recipe {stage1.get('recipe', 'n/a')}, {stage1.get('seconds')} s on "
                f"{stage1.get('hardware', stage1.get('device'))}",
            )
        )
        if stage1.get("heldout_answer_accuracy") is not None:
            rows.append(
                (
                    "stage-1 held-out answers",
                    f"{stage1['heldout_answer_accuracy']:.3f} exact match from the K "
                    f"states (majority answer {stage1['majority_baseline_accuracy']:.3f})",
                )
            )
    if stage2:
        rows.append(
            (
                "stage 2 (contrastive)",
                f"{stage2.get('global_steps')} steps on {stage2.get('num_train_pairs')} "
                f"pairs ({stage2.get('train_dataset', 'n/a')}), recipe {stage2.get('recipe', 'n/a')}, "
                f"{stage2.get('seconds')} s on {stage2.get('hardware', stage2.get('device'))}",
            )
        )
        rows.append(
            (
                "stage-2 dev Precision@1",
                f"{100 * stage2['eval_precision_at_1']:.1f} (chance/constant baseline "
                f"{100 * stage2['baseline_precision_at_1']:.1f})"
                + "".join(
                    f"; {name} {100 * value:.1f}" for name, value in stage2.get("eval_per_distribution", {}).items()
                ),
            )
        )
    return rows


def mteb_summary(results_folder: str | os.PathLike) -> dict:
    """The main score of every task result under an mteb results folder (`mteb.ResultCache`'s layout, or any folder
    of its task-result JSON files): `{"tasks": [{"task_name", "task_type", "dataset", "metric", "split", "subset",
    "main_score", "dataset_revision", "mteb_version"}, …]}`. The task's type, dataset path and main-score name come
    from mteb's registry when mteb knows the task (`local` and `main_score` for a task it does not, such as an
    MMEB-format folder's). One model's results only: a task found twice is an error naming both files."""
    tasks, seen = [], {}
    for path in sorted(Path(results_folder).rglob("*.json")):
        result = read_json_file(path)
        if not result or "task_name" not in result or "scores" not in result:
            continue  # model_meta.json and other files
        name = result["task_name"]
        if name in seen:
            raise ValueError(
                f"{results_folder}: {name} appears twice ({seen[name]} and {path}); pass the results folder of one "
                "model and revision (results/<model>/<revision>)"
            )
        seen[name] = path
        card = _mteb_task_card(name)
        for split, scores in result["scores"].items():
            tasks += [
                {
                    "task_name": name,
                    **card,
                    "split": split,
                    "subset": score.get("hf_subset", "default"),
                    "main_score": score["main_score"],
                    "dataset_revision": result.get("dataset_revision"),
                    "mteb_version": result.get("mteb_version"),
                }
                for score in scores
            ]
    if not tasks:
        raise ValueError(f"{results_folder}: no mteb task results (JSON files with task_name and scores)")
    return {"tasks": tasks}


def _mteb_task_card(name: str) -> dict:
    """`{"task_type", "dataset", "metric"}` of an mteb task, from its registry (as mteb's own cards name them)."""
    try:
        import mteb

        metadata = mteb.get_task(name).metadata
    except (ImportError, KeyError):
        return {"task_type": "local", "dataset": f"local/{name}", "metric": "main_score"}
    return {"task_type": metadata.type, "dataset": metadata.dataset["path"], "metric": metadata.main_score}


def _mteb_eval_results(summary: dict | None) -> list[EvalResult]:
    """model-index entries as mteb's cards write them: the task type, the task's dataset path, its main score."""
    return [
        EvalResult(
            task_type=task["task_type"],
            task_name=task["task_name"],
            dataset_type=task["dataset"],
            dataset_name=f"MTEB {task['task_name']} ({task['subset']})",
            dataset_config=task["subset"],
            dataset_split=task["split"],
            dataset_revision=task["dataset_revision"],
            metric_type=task["metric"],
            metric_value=round(100 * task["main_score"], 2),
        )
        for task in (summary or {}).get("tasks", [])
    ]


def _eval_results(results: dict) -> list[EvalResult]:
    evaluated = [("overall", results["overall"])] + sorted(results.get("distributions", {}).items())
    evaluated += sorted(results["meta_tasks"].items())
    return [
        EvalResult(
            task_type="feature-extraction",
            task_name="Multimodal embedding (MMEB format)",
            dataset_type="mmeb",
            dataset_name=f"MMEB-format evaluation ({name})",
            dataset_config=name,  # the Hub groups results by dataset type and config
            metric_type="precision_at_1",
            metric_name="Precision@1",
            metric_value=round(100 * metrics["precision@1"], 2),
        )
        for name, metrics in evaluated
    ]
