"""MMEB-format evaluation: Precision@1 (plus Recall@k and MRR) per dataset, per meta-task and overall.

An evaluation set is one file per dataset, rows in MMEB's published layout::

    {"qry_text": str, "qry_img_path": str, "tgt_text": [str, ...], "tgt_img_path": [str, ...]}

with the gold candidate first. Read from local JSONL/parquet (image paths relative to an image root) or, by Hub id,
through `datasets` (e.g. `TIGER-Lab/MMEB-eval`, one config per dataset). Rows in the field layout of the MMEB-V2
instruct test set (`qry_inst`, `tgt_inst`, …) are read by `coma_hf.evaluation.mmeb_v2`, which renders each side as
the authors' evaluation does and hands this module *prepared* rows: `{"query": EvalItem, "candidates": [EvalItem]}`.

Scoring cannot be fooled by the gold-first convention: the gold candidate's rank counts every other candidate whose
score is greater **or equal**, so ties are misses, and a NaN score ranks last. An encoder that returns one vector for
everything scores 0.

Anything with CoMa's `encode` API or a `SentenceTransformer` can be scored; each distinct query and candidate of a
dataset is encoded once.

The results name what was scored (`split`: a sha256 of the split files `load_mmeb_datasets` read and each dataset's
number of queries) and, on request (`MMEBEvaluator(..., per_query=True)`), each query's gold rank and top-1 candidate.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple, TypedDict

import torch

from ..data.sources import data_files, open_dataset, read_records, resolve_image_path
from ..inputs import CoMaInputError, load_image
from ..saving import MMEB_RESULTS

logger = logging.getLogger(__name__)

# MMEB's assignment of its 36 evaluation datasets to meta-tasks.
MMEB_META_TASKS: dict[str, tuple[str, ...]] = {
    "Classification": (
        "ImageNet-1K",
        "N24News",
        "HatefulMemes",
        "VOC2007",
        "SUN397",
        "Place365",
        "ImageNet-A",
        "ImageNet-R",
        "ObjectNet",
        "Country211",
    ),
    "VQA": (
        "OK-VQA",
        "A-OKVQA",
        "DocVQA",
        "InfographicsVQA",
        "ChartQA",
        "Visual7W",
        "ScienceQA",
        "VizWiz",
        "GQA",
        "TextVQA",
    ),
    "Retrieval": (
        "VisDial",
        "CIRR",
        "VisualNews_t2i",
        "VisualNews_i2t",
        "MSCOCO_t2i",
        "MSCOCO_i2t",
        "NIGHTS",
        "WebQA",
        "FashionIQ",
        "Wiki-SS-NQ",
        "OVEN",
        "EDIS",
    ),
    "Visual Grounding": ("MSCOCO", "RefCOCO", "RefCOCO-Matching", "Visual7W-Pointing"),
}
META_TASK_OF = {name: task for task, names in MMEB_META_TASKS.items() for name in names}
# The 16 datasets MMEB keeps out of its training set (MMEB-train): its out-of-distribution half; the other 20 are IND.
MMEB_OUT_OF_DISTRIBUTION = frozenset(
    {
        *("Place365", "ImageNet-A", "ImageNet-R", "ObjectNet", "Country211"),
        *("ScienceQA", "VizWiz", "GQA", "TextVQA"),
        *("FashionIQ", "Wiki-SS-NQ", "OVEN", "EDIS"),
        *("RefCOCO", "RefCOCO-Matching", "Visual7W-Pointing"),
    }
)
IND, OOD = "IND", "OOD"
RECALL_AT = (1, 5, 10)


def meta_task(dataset_name: str, extra: dict[str, str] | None = None) -> str:
    """The meta-task of a dataset: MMEB's assignment, then `extra` (e.g. the mini-MMEB's), else "Other"."""
    return META_TASK_OF.get(dataset_name) or (extra or {}).get(dataset_name, "Other")


def distribution(dataset_name: str, extra_out_of_distribution: Sequence[str] = ()) -> str:
    """`OOD` for MMEB's out-of-distribution datasets and those named in `extra_out_of_distribution`, else `IND`."""
    out = dataset_name in MMEB_OUT_OF_DISTRIBUTION or dataset_name in extra_out_of_distribution
    return OOD if out else IND


# --------------------------------------------------------------------------------------------------------------------
# Scoring
# --------------------------------------------------------------------------------------------------------------------
def gold_ranks(scores: Sequence[torch.Tensor]) -> list[int]:
    """1-based rank of the gold candidate (index 0) in each score vector; ties and NaNs count against the gold."""
    ranks = []
    for row in scores:
        row = row.float()
        gold = row[0]
        if torch.isnan(gold):
            ranks.append(len(row))
            continue
        others = row[1:]
        ranks.append(1 + int((torch.nan_to_num(others, nan=-math.inf) >= gold).sum()))
    return ranks


def top1_positions(scores: Sequence[torch.Tensor], ranks: Sequence[int]) -> list[int]:
    """The position in its row of each row's top-1 candidate, under `gold_ranks`' rule: 0 (the gold) exactly when the
    gold's rank is 1, else the first of the highest-scoring other candidates (NaN lowest), so a tie never reports 0."""
    positions = []
    for row, rank in zip(scores, ranks, strict=True):
        others = torch.nan_to_num(row[1:].float(), nan=-math.inf)
        positions.append(0 if rank == 1 else 1 + int(others.argmax()))  # argmax: the first of equal maxima
    return positions


PER_QUERY = "per_query"  # the results' key (and file stem) of the per-query results


class QueryResult(TypedDict):
    """One query's outcome: `query_id` is its row's index in the dataset (its file's row index for a dataset loaded
    from files, or a prefix subset of one); `gold_rank` as `gold_ranks` counts it; `top1_position` as
    `top1_positions` picks it."""

    dataset: str
    query_id: int
    gold_rank: int
    top1_position: int


def query_results(dataset: str, scores: Sequence[torch.Tensor], ranks: Sequence[int]) -> list[QueryResult]:
    """Each row's `QueryResult`, from its scores and gold rank."""
    positions = top1_positions(scores, ranks)
    return [
        QueryResult(dataset=dataset, query_id=index, gold_rank=rank, top1_position=position)
        for index, (rank, position) in enumerate(zip(ranks, positions, strict=True))
    ]


def ranking_metrics(ranks: Sequence[int], recall_at: Sequence[int] = RECALL_AT) -> dict[str, float]:
    """Precision@1, Recall@k and MRR from gold ranks."""
    count = len(ranks)
    if not count:
        return {"precision@1": 0.0, "mrr": 0.0, **{f"recall@{k}": 0.0 for k in recall_at}, "num_queries": 0}
    metrics = {"precision@1": sum(rank == 1 for rank in ranks) / count}
    metrics.update({f"recall@{k}": sum(rank <= k for rank in ranks) / count for k in recall_at})
    metrics["mrr"] = sum(1.0 / rank for rank in ranks) / count
    metrics["num_queries"] = count
    return metrics


# --------------------------------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------------------------------
MANIFEST = "mmeb_manifest.json"  # a folder's extra meta-tasks, out-of-distribution names, image root, parsers


class EvalItem(NamedTuple):
    """One query or candidate as the encoder receives it (hashable: each distinct item is encoded once).

    `text` and `image` (a path, already joined to the image root) are the input; `instruction` and `layout` (a named
    layout of the model's processor) are set for rows the release's rules prepared, `None` for MMEB's verbatim rows.
    """

    text: str
    image: str | None = None
    instruction: str | None = None
    layout: str | None = None

    @classmethod
    def of(cls, item: EvalItem | Sequence) -> EvalItem:
        """`item` as an `EvalItem` (a `(text, image path)` pair is one without instruction and layout)."""
        return item if isinstance(item, cls) else cls(*item)

    def as_input(self) -> dict:
        """The `{"text", "image", "instruction", "layout"}` dict `CoMaModel.encode` takes (unset keys left out)."""
        values = {"text": self.text, "image": self.image, "instruction": self.instruction, "layout": self.layout}
        return {key: value for key, value in values.items() if value is not None and (value or key == "instruction")}

    def as_messages(self) -> list[dict]:
        """The chat messages sentence-transformers passes through to CoMa's processor: the instruction as the system
        message, the image (by path: the processor reads it) and text as the user's, the layout named on it."""
        content = ([{"type": "image", "image": self.image}] if self.image else []) + (
            [{"type": "text", "text": self.text}] if self.text else []
        )
        user = {"role": "user", "content": content, **({"layout": self.layout} if self.layout else {})}
        system = [] if self.instruction is None else [{"role": "system", "content": self.instruction}]
        return [*system, user]


@dataclass
class MMEBDataset:
    """One evaluation dataset: its name, rows and where relative image paths start.

    Rows are MMEB's verbatim rows (`qry_text`, `qry_img_path`, `tgt_text`, `tgt_img_path`), or prepared rows
    (`{"query": EvalItem, "candidates": [EvalItem, …]}`, gold first, image paths joined) with `parser` naming the
    release's rule that prepared them (`coma_hf.evaluation.mmeb_v2`).
    """

    name: str
    rows: list[dict]
    image_root: str | None = None
    meta_task: str = "Other"
    distribution: str = IND  # or OOD: a dataset none of whose task type was trained on
    parser: str | None = None  # the release's data parser whose rules prepared `rows`; None: verbatim rows
    # `files_sha256` of the split files `load_mmeb_datasets` read (it names the files, not `rows`: a subset made with
    # `dataclasses.replace(dataset, rows=...)` keeps it); None for datasets built in code or read from the Hub
    split_sha256: str | None = None

    def items(self) -> tuple[list[EvalItem], list[list[EvalItem]]]:
        """Each row's query and its candidates (gold first)."""
        queries, candidate_lists = [], []
        for index, row in enumerate(self.rows):
            if "query" in row:  # prepared
                query, candidates = row["query"], list(row["candidates"])
            else:
                texts, images = row.get("tgt_text") or [], row.get("tgt_img_path") or []
                count = max(len(texts), len(images))
                texts, images = list(texts) + [""] * (count - len(texts)), list(images) + [""] * (count - len(images))
                query = _item(row.get("qry_text"), row.get("qry_img_path"), self.image_root)
                candidates = [_item(text, image, self.image_root) for text, image in zip(texts, images, strict=False)]
            if not candidates:
                raise ValueError(f"{self.name} row {index}: no candidates")
            queries.append(query)
            candidate_lists.append(candidates)
        return queries, candidate_lists


def read_manifest(folder: str | os.PathLike) -> dict:
    """A folder's `mmeb_manifest.json` (`meta_tasks`, `out_of_distribution`, `image_root`, `parsers`), or `{}`."""
    path = Path(folder) / MANIFEST
    return json.loads(path.read_text()) if path.exists() else {}


def files_sha256(files: Sequence[Path]) -> str:
    """sha256 over `files` sorted by name: each file's name, byte length and bytes."""
    digest = hashlib.sha256()
    for file in sorted(files, key=lambda file: file.name):
        data = file.read_bytes()
        digest.update(f"{file.name}\0{len(data)}\0".encode())
        digest.update(data)
    return digest.hexdigest()


def load_mmeb_datasets(
    source: str | os.PathLike,
    names: Sequence[str] | None = None,
    image_root: str | None = None,
    split: str = "test",
) -> list[MMEBDataset]:
    """Datasets from a folder of `{name}.jsonl` / `{name}.parquet` files, or from a Hub id (one config per name;
    `names` required). A folder may hold `mmeb_manifest.json` with `meta_tasks` (extra dataset names → meta-task),
    `out_of_distribution` (extra dataset names that are OOD) and `image_root` (relative to the folder); image paths
    start at `image_root`, else at the folder. Datasets read from a folder carry `split_sha256`: `files_sha256` of
    the files read (the chosen data files and the manifest, not the images)."""
    path = Path(source)
    if path.is_dir():
        manifest = read_manifest(path)
        extra, extra_ood = manifest.get("meta_tasks", {}), manifest.get("out_of_distribution", ())
        files = data_files(path)
        chosen = data_files(path, names)
        missing = sorted(set(names or ()) - {file.stem for file in chosen})
        if missing:
            raise ValueError(
                f"{source}: no MMEB file for {', '.join(missing)} (found: "
                f"{', '.join(file.stem for file in files) or 'none'})"
            )
        if not chosen:
            raise ValueError(f"{source}: no MMEB-format files (*.jsonl, *.parquet)")
        root = image_root or os.path.normpath(path / manifest.get("image_root", "."))
        sha256 = files_sha256([*chosen, *(file for file in [path / MANIFEST] if file.exists())])
        # every row is read (a bad JSONL line is an error naming file and line): a skipped row would change the scores
        return [
            MMEBDataset(
                file.stem,
                read_records(file),
                root,
                meta_task(file.stem, extra),
                distribution(file.stem, extra_ood),
                split_sha256=sha256,
            )
            for file in chosen
        ]
    if path.exists():
        raise ValueError(f"{source} is not a folder of MMEB-format files")
    if not names:
        raise ValueError("Loading MMEB from the Hub needs the dataset names (one config each)")
    return [
        MMEBDataset(
            name, list(open_dataset(source, name, split=split)), image_root, meta_task(name), distribution(name)
        )
        for name in names
    ]


def _item(text: str | None, image_path: str | None, image_root: str | None) -> EvalItem:
    return EvalItem(text or "", resolve_image_path(image_path or None, image_root))


# --------------------------------------------------------------------------------------------------------------------
# Encoders
# --------------------------------------------------------------------------------------------------------------------
Encoder = Callable[[list[EvalItem]], torch.Tensor]


def as_encoder(model: Any, batch_size: int = 16, show_progress_bar: bool = True) -> Encoder:
    """A function from `EvalItem`s (or `(text, image path)` pairs) to `[N, dim]` embeddings, for a CoMa model (its
    `encode`) or a `SentenceTransformer`. Both hand a verbatim MMEB text over as it is, `<|image_1|>` placeholder and
    instruction included (sentence-transformers gets the image opened), so the processor renders a row the same way
    on both paths and in stage-2 training; an item the release's rules prepared goes with its instruction and the
    name of its layout (to sentence-transformers as chat messages, which it passes through), so both paths render it
    with the checkpoint's own copy of those rules. A plain function gets `(text, image path)` pairs for verbatim rows
    and the `EvalItem`s themselves for prepared ones."""
    try:
        from sentence_transformers import SentenceTransformer
    except ImportError:  # pragma: no cover - sentence-transformers is a dependency
        SentenceTransformer = ()

    if isinstance(model, SentenceTransformer):

        def encode_with_sentence_transformer(items):
            inputs = []
            for item in map(EvalItem.of, items):
                if item.layout is not None or item.instruction is not None:
                    inputs.append(item.as_messages())
                    continue
                text, image = item.text, item.image
                if image is None:
                    inputs.append(text)
                else:
                    picture = load_image(image, sample=len(inputs), field="image")
                    inputs.append({"image": picture, "text": text} if text else picture)
            vectors = model.encode(
                inputs, batch_size=batch_size, convert_to_tensor=True, show_progress_bar=show_progress_bar
            )
            return torch.as_tensor(vectors).float().cpu()

        return encode_with_sentence_transformer

    if callable(getattr(model, "encode", None)):

        def encode_with_coma(items):
            inputs = [EvalItem.of(item).as_input() for item in items]
            return model.encode(inputs, batch_size=batch_size, show_progress_bar=show_progress_bar).float().cpu()

        return encode_with_coma
    if callable(model):

        def encode_with_function(items):
            items = [EvalItem.of(item) for item in items]
            return model([item if item.layout or item.instruction is not None else item[:2] for item in items])

        return encode_with_function
    raise TypeError(
        f"Cannot encode with {type(model).__name__}: pass a CoMa model, a SentenceTransformer or a function"
    )


# --------------------------------------------------------------------------------------------------------------------
# The evaluator
# --------------------------------------------------------------------------------------------------------------------
@dataclass
class MMEBEvaluator:
    """Scores an encoder on MMEB-format datasets.

    Example::

        evaluator = MMEBEvaluator(load_mmeb_datasets("outputs/mini_mmeb/test"))
        results = evaluator(model, output_dir="outputs/eval")   # JSON + Markdown written there
        results["overall"]["precision@1"]

    With `per_query=True` the results also hold `"per_query"`: every query's `QueryResult`, datasets in order, written
    to `per_query.jsonl` (not to the summary's JSON).
    """

    datasets: list[MMEBDataset]
    batch_size: int = 16
    show_progress_bar: bool = True
    results: dict = field(default_factory=dict)
    per_query: bool = False

    def __call__(self, model: Any, output_dir: str | os.PathLike | None = None) -> dict:
        """The summary (`summarize`) with `split` (`split_record`), and `per_query` when asked for; written to
        `output_dir` (`write_results`) when given."""
        encode = as_encoder(model, self.batch_size, self.show_progress_bar)
        per_dataset, queries = {}, []
        for dataset in self.datasets:
            scores = self.score_dataset(encode, dataset)
            ranks = gold_ranks(scores)
            if self.per_query:
                queries.extend(query_results(dataset.name, scores, ranks))
            per_dataset[dataset.name] = {
                **ranking_metrics(ranks),
                "meta_task": dataset.meta_task,
                "distribution": dataset.distribution,
            }
            logger.info(
                "%s: P@1 %.3f over %d queries", dataset.name, per_dataset[dataset.name]["precision@1"], len(ranks)
            )
        self.results = {**summarize(per_dataset), "split": split_record(self.datasets)}
        if self.per_query:
            self.results[PER_QUERY] = queries
        if output_dir is not None:
            write_results(self.results, output_dir)
        return self.results

    def rank_dataset(self, encode: Encoder, dataset: MMEBDataset) -> list[int]:
        """Gold ranks for every row; each distinct query and candidate encoded once."""
        return gold_ranks(self.score_dataset(encode, dataset))

    def score_dataset(self, encode: Encoder, dataset: MMEBDataset) -> list[torch.Tensor]:
        """Each row's scores `[candidates]` (gold first): the cosine of its query with each of its candidates."""
        queries, candidate_lists = dataset.items()
        query_vectors = _encode_unique(encode, queries, _locator(dataset.name, "query", [[item] for item in queries]))
        candidate_vectors = _encode_unique(
            encode,
            [item for items in candidate_lists for item in items],
            _locator(dataset.name, "candidate", candidate_lists),
        )
        scores = []
        for query, candidates in zip(queries, candidate_lists, strict=False):
            matrix = torch.stack([candidate_vectors[item] for item in candidates])
            scores.append(matrix @ query_vectors[query])
        return scores


def split_record(datasets: Sequence[MMEBDataset]) -> dict:
    """What was scored: `sha256`, the datasets' `split_sha256` when they share one (None: built in code), else a sha256
    over each one's name and hash; and each dataset's `num_queries` (the hash names the files, the counts the rows
    scored, e.g. of a subset)."""
    hashes = {dataset.split_sha256 for dataset in datasets}
    if len(hashes) <= 1:
        sha256 = next(iter(hashes), None)
    else:  # datasets of several loads
        named = "".join(f"{dataset.name}\0{dataset.split_sha256}\n" for dataset in datasets)
        sha256 = hashlib.sha256(named.encode()).hexdigest()
    return {"sha256": sha256, "num_queries": {dataset.name: len(dataset.rows) for dataset in datasets}}


def _encode_unique(
    encode: Encoder, items: list[EvalItem], locate: Callable[[EvalItem], str]
) -> dict[EvalItem, torch.Tensor]:
    """Encode each distinct item once; an input error is re-raised naming the dataset row the item comes from."""
    unique = list(dict.fromkeys(items))
    try:
        vectors = encode(unique) if unique else torch.empty(0)
    except CoMaInputError as error:
        position = error.position_in(unique)
        if position is None:
            raise
        raise CoMaInputError(error.reason, locate(unique[position]), error.field) from error
    return dict(zip(unique, vectors, strict=False))


def _locator(dataset: str, side: str, rows: list[list[EvalItem]]) -> Callable[[EvalItem], str]:
    """`item → "Name row 12 (query)"`: the first row whose `side` holds the item."""

    def locate(item: EvalItem) -> str:
        row = next(index for index, items in enumerate(rows) if item in items)
        return f"{dataset} row {row} ({side}{', image ' + item.image if item.image else ''})"

    return locate


def summarize(per_dataset: dict[str, dict]) -> dict:
    """Per-dataset metrics → means per meta-task, per distribution (IND, OOD) and overall (each dataset weighs the
    same, as in MMEB)."""
    labels = ("meta_task", "distribution", "num_queries")
    keys = [key for key in next(iter(per_dataset.values()), {}) if key not in labels]

    def means(label: str) -> dict[str, dict]:
        groups: dict[str, list[dict]] = {}
        for metrics in per_dataset.values():
            groups.setdefault(metrics.get(label, IND), []).append(metrics)
        return {name: _average(rows, keys) for name, rows in groups.items()}

    return {
        "datasets": per_dataset,
        "meta_tasks": means("meta_task"),
        "distributions": {name: rows for name, rows in sorted(means("distribution").items())},
        "overall": _average(list(per_dataset.values()), keys) if per_dataset else {},
    }


def _average(rows: list[dict], keys: list[str]) -> dict:
    return {**{key: sum(row[key] for row in rows) / len(rows) for key in keys}, "num_datasets": len(rows)}


def chance_baselines(datasets: Sequence[MMEBDataset]) -> dict:
    """Precision@1 that needs no model, per dataset and averaged like `summarize`.

    `random`: the expected P@1 of a random ranking (mean of 1 / candidates). `constant`: always ranking one fixed
    candidate first (the most frequent gold answer, e.g. the majority class). `best`: the larger of the two per
    dataset — the bar a model must clear to show it read its inputs.
    """
    per_dataset = {}
    for dataset in datasets:
        golds, inverse_sizes = {}, []
        for candidates in dataset.items()[1]:
            golds[candidates[0]] = golds.get(candidates[0], 0) + 1
            inverse_sizes.append(1.0 / len(candidates))
        rows = max(len(dataset.rows), 1)
        random_guess = sum(inverse_sizes) / rows
        constant = max(golds.values(), default=0) / rows
        per_dataset[dataset.name] = {
            "random": random_guess,
            "constant": constant,
            "best": max(random_guess, constant),
            "meta_task": dataset.meta_task,
            "distribution": dataset.distribution,
            "num_queries": len(dataset.rows),
        }
    return summarize(per_dataset)


def markdown_table(results: dict) -> str:
    """The results as a Markdown table: datasets grouped by meta-task, then meta-task means and overall."""
    lines = ["| meta-task | dataset | P@1 | R@5 | MRR | queries |", "| --- | --- | --- | --- | --- | --- |"]
    for name, metrics in sorted(results["datasets"].items(), key=lambda item: (item[1]["meta_task"], item[0])):
        lines.append(
            f"| {metrics['meta_task']} | {name} | {100 * metrics['precision@1']:.1f} "
            f"| {100 * metrics['recall@5']:.1f} | {100 * metrics['mrr']:.1f} | {metrics['num_queries']} |"
        )
    for task, metrics in sorted(results["meta_tasks"].items()):
        lines.append(
            f"| **{task}** | mean of {metrics['num_datasets']} | {100 * metrics['precision@1']:.1f} | "
            f"{100 * metrics['recall@5']:.1f} | {100 * metrics['mrr']:.1f} | |"
        )
    for name, metrics in results.get("distributions", {}).items():
        lines.append(
            f"| **{name}** | mean of {metrics['num_datasets']} | {100 * metrics['precision@1']:.1f} | "
            f"{100 * metrics['recall@5']:.1f} | {100 * metrics['mrr']:.1f} | |"
        )
    overall = results["overall"]
    if overall:
        lines.append(
            f"| **Overall** | {overall['num_datasets']} datasets | {100 * overall['precision@1']:.1f} | "
            f"{100 * overall['recall@5']:.1f} | {100 * overall['mrr']:.1f} | |"
        )
    return "\n".join(lines) + "\n"


def write_results(results: dict, output_dir: str | os.PathLike) -> None:
    """`mmeb_results.json` and `mmeb_results.md` (the summary) in `output_dir`, and `per_query.jsonl` (one
    `QueryResult` a line) when `results` holds per-query results."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    summary = {key: value for key, value in results.items() if key != PER_QUERY}
    (output_dir / MMEB_RESULTS).write_text(json.dumps(summary, indent=2))
    (output_dir / "mmeb_results.md").write_text(markdown_table(summary))
    if PER_QUERY in results:
        lines = (json.dumps(query) + "\n" for query in results[PER_QUERY])
        (output_dir / f"{PER_QUERY}.jsonl").write_text("".join(lines))
