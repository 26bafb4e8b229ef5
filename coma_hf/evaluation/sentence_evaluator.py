"""`MMEBEvaluator` as a sentence-transformers evaluator, for evaluation during stage-2 training."""

from __future__ import annotations

try:  # sentence-transformers ≥ 6.1 moved the base class
    from sentence_transformers.base.evaluation import SentenceEvaluator
except ImportError:  # pragma: no cover - older sentence-transformers
    from sentence_transformers.evaluation import SentenceEvaluator

from .mmeb import MMEBDataset, MMEBEvaluator, write_results


class MMEBSentenceEvaluator(SentenceEvaluator):
    """Scores a `SentenceTransformer` (or CoMa model) on MMEB-format datasets; primary metric: overall P@1.

    Args:
        datasets: the `MMEBDataset`s to score (e.g. `load_mmeb_datasets("outputs/synthetic/mini_mmeb/dev")`).
        name: prefix of the returned metric names.
        batch_size: encoding batch size.
    """

    def __init__(self, datasets: list[MMEBDataset], name: str = "mmeb", batch_size: int = 16):
        super().__init__()
        self.evaluator = MMEBEvaluator(datasets, batch_size=batch_size, show_progress_bar=False)
        self.name = name
        self.primary_metric = "overall_precision@1"

    def __call__(self, model, output_path: str | None = None, epoch: int = -1, steps: int = -1) -> dict[str, float]:
        results = self.evaluator(model)
        if output_path is not None:
            write_results(results, output_path)
        metrics = {f"overall_{key}": value for key, value in results["overall"].items() if key != "num_datasets"}
        for name, values in results["distributions"].items():
            metrics[f"{name}_precision@1"] = values["precision@1"]
        for task, values in results["meta_tasks"].items():
            metrics[f"{task.lower().replace(' ', '_')}_precision@1"] = values["precision@1"]
        for dataset, values in results["datasets"].items():
            metrics[f"{dataset}_precision@1"] = values["precision@1"]
        metrics = self.prefix_name_to_metrics(metrics, self.name)
        if hasattr(model, "model_card_data"):
            self.store_metrics_in_model_card_data(model, metrics, epoch, steps)
        return metrics
