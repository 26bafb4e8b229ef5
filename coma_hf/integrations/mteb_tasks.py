"""MMEB-format folders (the mini-MMEB, or a local copy of MMEB's files) as mteb tasks, read from disk, offline.

Each dataset file becomes one task, named `{prefix}{dataset}`:

- **zero-shot classification** when every row asks about an image against the same set of label texts (MMEB's
  classification rows list all labels, gold first): mteb's `AbsTaskZeroShotClassification`, accuracy;
- **Any2Any retrieval** otherwise: `AbsTaskRetrieval` whose corpus is every distinct candidate of the file and whose
  `top_ranked` restricts each query to its own row's candidates, as MMEB scores it; the relevant document is the gold.

Their card names the data as an MMEB-format folder (`dataset["path"] == MMEB_FOLDER`, the revision the split files'
sha256), which tells `coma_hf.integrations.mteb` to add no instruction: an MMEB row carries its own in its text.

Where mteb's numbers and `MMEBEvaluator`'s agree, and where they cannot: `recall_at_1` (retrieval) and `accuracy`
(classification) are MMEB's precision@1 when no candidate ties the gold. A tie is a miss for `MMEBEvaluator`; mteb
breaks it (retrieval by document id, descending, as pytrec_eval sorts; classification to the first label in
`get_candidate_labels`), and a candidate listed twice in one row is one document here.

A task's split is its folder's name when that names one (`dev`, `test`, …), else `test`.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from datasets import Dataset
from datasets import Image as ImageFeature
from mteb.abstasks.retrieval import AbsTaskRetrieval
from mteb.abstasks.retrieval_dataset_loaders import RetrievalSplitData
from mteb.abstasks.task_metadata import TaskMetadata
from mteb.abstasks.zeroshot_classification import AbsTaskZeroShotClassification

from ..evaluation.mmeb import EvalItem, MMEBDataset, load_mmeb_datasets

PREFIX = "MMEB-"
SPLITS = ("train", "dev", "validation", "test")  # a folder with one of these names is that split
MMEB_FOLDER = "coma_hf/mmeb-format-folder"  # the tasks' dataset path: rows in MMEB's layout, instructions included
DEFAULT_SPLIT = "test"  # the split of a folder not named after one
RETRIEVAL_SCORE = "recall_at_1"  # MMEB's precision@1: one relevant document per query
CLASSIFICATION_SCORE = "accuracy"
_METADATA = {  # what mteb requires of a task's card; these tasks are local files
    "reference": None,
    "eval_langs": ["eng-Latn"],
    "date": None,
    "domains": [],
    "task_subtypes": [],
    "license": "not specified",
    "annotations_creators": "derived",
    "dialect": [],
    "sample_creation": "found",
    "bibtex_citation": "",
    "is_public": False,
}


def mmeb_tasks(
    folder: str | os.PathLike,
    names: Sequence[str] | None = None,
    image_root: str | None = None,
    prefix: str = PREFIX,
) -> list[Any]:
    """One mteb task per dataset of an MMEB-format folder (`load_mmeb_datasets`' rules: the manifest, the image
    root), zero-shot classification or Any2Any retrieval as the rows are."""
    split = Path(folder).name if Path(folder).name in SPLITS else DEFAULT_SPLIT
    return [mmeb_task(dataset, prefix, split) for dataset in load_mmeb_datasets(folder, names, image_root)]


def mmeb_task(dataset: MMEBDataset, prefix: str = PREFIX, split: str = DEFAULT_SPLIT) -> Any:
    """The mteb task of one MMEB dataset (verbatim rows only: the release's prepared rows name processor layouts,
    which mteb cannot pass on)."""
    if dataset.parser is not None:
        raise ValueError(f"{dataset.name}: rows prepared by the release's rules ({dataset.parser}) are not mteb rows")
    if not dataset.rows:
        raise ValueError(f"{dataset.name}: no rows to evaluate")
    queries, candidate_lists = dataset.items()
    labels = shared_labels(queries, candidate_lists)
    if labels is not None:
        return _zero_shot_task(dataset, prefix, split, queries, candidate_lists, labels)
    return _retrieval_task(dataset, prefix, split, queries, candidate_lists)


def shared_labels(queries: list[EvalItem], candidate_lists: list[list[EvalItem]]) -> list[str] | None:
    """The label texts, in sorted order, when every query has an image and every row's candidates are the same set
    of texts without images (a classification row); else `None`."""
    first = {item.text for item in candidate_lists[0]}
    for query, candidates in zip(queries, candidate_lists, strict=True):
        if query.image is None or any(item.image for item in candidates):
            return None
        if {item.text for item in candidates} != first or len(candidates) != len(first):
            return None
    return sorted(first)


def _metadata(
    dataset: MMEBDataset, prefix: str, split: str, task_type: str, category: str, main_score: str
) -> TaskMetadata:
    return TaskMetadata(
        name=f"{prefix}{dataset.name}",
        description=f"{dataset.name} ({dataset.meta_task}, {dataset.distribution}) read from an MMEB-format folder.",
        type=task_type,
        category=category,
        modalities=["image", "text"],
        main_score=main_score,
        dataset={"path": MMEB_FOLDER, "revision": dataset.split_sha256 or "unknown"},
        eval_splits=[split],
        **_METADATA,
    )


def _side(items: list[EvalItem]) -> tuple[str, dict[str, list]]:
    """The category letters of one side (`"i"`, `"t"` or `"it"`) and its columns (`image` paths, `text`)."""
    columns: dict[str, list] = {}
    if any(item.image for item in items):
        columns["image"] = [item.image or None for item in items]
    if any(item.text for item in items):
        columns["text"] = [item.text for item in items]
    return ("i" if "image" in columns else "") + ("t" if "text" in columns else ""), columns


def _dataset(ids: list[str], columns: dict[str, list]) -> Dataset:
    table = Dataset.from_dict({"id": ids, **columns})
    return table.cast_column("image", ImageFeature()) if "image" in columns else table


class MMEBRetrievalTask(AbsTaskRetrieval):
    """An MMEB dataset as Any2Any retrieval over each row's own candidates (built by `mmeb_task`)."""

    split_data: RetrievalSplitData

    def load_data(self, num_proc: int | None = None, **kwargs: Any) -> None:
        self.dataset = {"default": {self.metadata.eval_splits[0]: self.split_data}}
        self.data_loaded = True


class MMEBZeroShotTask(AbsTaskZeroShotClassification):
    """An MMEB classification dataset as zero-shot classification over its label texts (built by `mmeb_task`)."""

    input_column_name = ("image", "text")
    label_column_name = "label"
    labels: list[str]
    table: Dataset

    def load_data(self, num_proc: int | None = None, **kwargs: Any) -> None:
        self.dataset = {self.metadata.eval_splits[0]: self.table}
        self.data_loaded = True

    def get_candidate_labels(self) -> list[str]:
        return list(self.labels)


def _retrieval_task(dataset, prefix, split, queries, candidate_lists) -> MMEBRetrievalTask:
    documents = list(dict.fromkeys(item for items in candidate_lists for item in items))
    document_id = {item: f"d{index}" for index, item in enumerate(documents)}
    query_ids = [f"q{index}" for index in range(len(queries))]
    query_letters, query_columns = _side(queries)
    document_letters, document_columns = _side(documents)
    split_data = RetrievalSplitData(
        queries=_dataset(query_ids, query_columns),
        corpus=_dataset([document_id[item] for item in documents], document_columns),
        relevant_docs={qid: {document_id[items[0]]: 1} for qid, items in zip(query_ids, candidate_lists, strict=True)},
        top_ranked={
            qid: list(dict.fromkeys(document_id[item] for item in items))
            for qid, items in zip(query_ids, candidate_lists, strict=True)
        },
    )
    category = f"{query_letters}2{document_letters}"
    metadata = _metadata(dataset, prefix, split, "Any2AnyRetrieval", category, RETRIEVAL_SCORE)
    task_class = type(_class_name(dataset), (MMEBRetrievalTask,), {"metadata": metadata, "split_data": split_data})
    return task_class()


def _zero_shot_task(dataset, prefix, split, queries, candidate_lists, labels) -> MMEBZeroShotTask:
    columns = {
        "image": [query.image for query in queries],
        "text": [query.text for query in queries],
        "label": [labels.index(candidates[0].text) for candidates in candidate_lists],
    }
    table = Dataset.from_dict(columns).cast_column("image", ImageFeature())
    metadata = _metadata(dataset, prefix, split, "ZeroShotClassification", "it2t", CLASSIFICATION_SCORE)
    task_class = type(
        _class_name(dataset), (MMEBZeroShotTask,), {"metadata": metadata, "labels": labels, "table": table}
    )
    return task_class()


def _class_name(dataset: MMEBDataset) -> str:
    return "MMEB_" + "".join(character if character.isalnum() else "_" for character in dataset.name)
