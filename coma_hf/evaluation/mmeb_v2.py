"""MMEB-V2 instruct test rows read as the authors' released evaluation reads them: the rows' fields turned into the
`EvalItem`s `MMEBEvaluator` encodes with a converted checkpoint's layouts. The rules themselves, read from their code,
and the processor settings that reproduce their prompts are `coma_hf.released.evaluation`'s.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import replace

from ..data.sources import resolve_image_path
from ..inputs import CoMaInputError, without_image_placeholders
from ..moved import moved_names
from ..released.evaluation import (
    CANDIDATE,
    CANDIDATE_WITHOUT_TEXT,
    EXTRA_NEWLINE_QUERIES,
    PARSER_OF,
    PARSERS,
    PLACEHOLDER,
    QUERY,
    layout_name,
)
from .mmeb import EvalItem, MMEBDataset, load_mmeb_datasets, read_manifest

logger = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------------------------------
# One row → query, candidates and their names
# --------------------------------------------------------------------------------------------------------------------
class _Row:
    """A raw row's fields, read with errors that name the dataset, the row and the field."""

    def __init__(self, dataset: str, index: int, row: dict, image_root: str | None):
        self.dataset, self.index, self.row, self.image_root = dataset, index, row, image_root

    @property
    def where(self) -> str:
        return f"{self.dataset} row {self.index}"

    def text(self, field: str, optional: bool = False) -> str:
        value = self.row.get(field)
        if value is None and optional:  # `process_input_text` skips a missing text
            return ""
        if not isinstance(value, str):
            raise CoMaInputError(f"expected a string, got {type(value).__name__}", self.where, field)
        return value

    def texts(self, field: str, count: int | None = None) -> list[str]:
        value = self.row.get(field)
        if not isinstance(value, (list, tuple)) or not all(isinstance(item, str) for item in value) or not value:
            raise CoMaInputError("expected a non-empty list of strings", self.where, field)
        if count is not None and len(value) != count:
            raise CoMaInputError(f"has {len(value)} entries for {count} candidate images", self.where, field)
        return list(value)

    def image(self, path: str, field: str) -> str:
        if not path:
            raise CoMaInputError("no image path", self.where, field)
        return resolve_image_path(path, self.image_root)

    def instruction(self, field: str) -> str:
        """The instruction with the image placeholder removed, as every parser does."""
        return without_image_placeholders(self.text(field), re.escape(PLACEHOLDER))


Parsed = tuple[EvalItem, list[EvalItem], list[str]]  # the query, the candidates (gold first) and their names


def _image_query(row: _Row, parser: str, stripped: bool) -> EvalItem:
    """An image query: `image_cls` / `image_i2t` take the instruction as it is, `image_qa` / `image_i2i_vg` as
    `"\\n" + instruction.strip()`."""
    instruction = row.instruction("qry_inst")
    if stripped:
        instruction = "\n" + instruction.strip()
    image = row.image(row.text("qry_img_path"), "qry_img_path")
    return EvalItem(row.text("qry_text", optional=True), image, instruction, layout_name(parser, QUERY))


def _text_candidates(row: _Row, parser: str) -> tuple[list[EvalItem], list[str]]:
    """Candidates that are texts as they are, named by their text."""
    texts = row.texts("tgt_text")
    return [EvalItem(text, None, None, layout_name(parser, CANDIDATE)) for text in texts], texts


def _image_candidates(row: _Row, parser: str) -> list[EvalItem]:
    """Image candidates with the target instruction, a caption joined to it when the first caption is not blank (as
    `process_input_text(tgt_inst + " " + caption)` does); without captions, `image_i2i_vg`'s have no final newline."""
    paths = row.texts("tgt_img_path")
    captions = row.texts("tgt_text", count=len(paths))
    instruction = row.instruction("tgt_inst")
    images = [row.image(path, "tgt_img_path") for path in paths]
    if captions[0].strip():
        layout = layout_name(parser, CANDIDATE)
        pairs = zip(images, captions, strict=True)
        return [EvalItem("", image, f"{instruction} {caption}", layout) for image, caption in pairs]
    side = CANDIDATE_WITHOUT_TEXT if parser == "image_i2i_vg" else CANDIDATE
    return [EvalItem("", image, instruction, layout_name(parser, side)) for image in images]


def parse_cls_i2t(row: _Row, parser: str) -> Parsed:
    return (_image_query(row, parser, stripped=False), *_text_candidates(row, parser))


def parse_qa(row: _Row, parser: str) -> Parsed:
    return (_image_query(row, parser, stripped=True), *_text_candidates(row, parser))


def parse_t2i(row: _Row, parser: str) -> Parsed:
    instruction = row.text("qry_inst")
    if PLACEHOLDER in instruction:  # theirs would put a vision block in a query that has no image
        raise CoMaInputError(f"a text-to-image query's instruction holds {PLACEHOLDER}", row.where, "qry_inst")
    text = row.text("qry_text") + ("\n" if row.dataset in EXTRA_NEWLINE_QUERIES else "")
    query = EvalItem(text, None, instruction, layout_name(parser, QUERY))
    return query, _image_candidates(row, parser), row.texts("tgt_img_path")


def parse_i2i_vg(row: _Row, parser: str) -> Parsed:
    candidates = _image_candidates(row, parser)
    paths, captions = row.texts("tgt_img_path"), row.texts("tgt_text")
    names = [f"{path}:{caption.strip(chr(34))}" for path, caption in zip(paths, captions, strict=True)]  # path:caption
    return _image_query(row, parser, stripped=True), candidates, names


PARSE: dict[str, Callable[[_Row, str], Parsed]] = {
    "image_cls": parse_cls_i2t,
    "image_i2t": parse_cls_i2t,
    "image_qa": parse_qa,
    "image_t2i": parse_t2i,
    "image_i2i_vg": parse_i2i_vg,
}


# --------------------------------------------------------------------------------------------------------------------
# Datasets
# --------------------------------------------------------------------------------------------------------------------
def is_instruct_rows(rows: Sequence[dict]) -> bool:
    """Whether rows are in the MMEB-V2 instruct field layout (they carry `qry_inst`)."""
    return bool(rows) and all(isinstance(row, dict) and "qry_inst" in row for row in rows)


def parser_of(name: str, parsers: dict[str, str] | None = None) -> str:
    """The release's parser of dataset `name`: `parsers` (e.g. a manifest's) first, then `PARSER_OF`."""
    parser = (parsers or {}).get(name) or PARSER_OF.get(name)
    if parser is None:
        raise ValueError(
            f"No MMEB-V2 parser is known for dataset {name!r}: name one of {PARSERS} for it (parsers={{{name!r}: …}}, "
            "or `parsers` in the folder's mmeb_manifest.json)"
        )
    if parser not in PARSERS:
        raise ValueError(f"Unknown MMEB-V2 parser {parser!r} for dataset {name!r}; known: {PARSERS}")
    return parser


def instruct_dataset(dataset: MMEBDataset, parser: str) -> MMEBDataset:
    """`dataset`'s raw instruct rows prepared by `parser`'s rules: prepared rows (`{"query", "candidates"}`) whose
    candidates are deduplicated by name across the dataset, the first kept, as their candidate set is."""
    parse = PARSE[parser]
    first_of: dict[str, EvalItem] = {}
    rows = []
    for index, raw in enumerate(dataset.rows):
        query, candidates, names = parse(_Row(dataset.name, index, raw, dataset.image_root), parser)
        if len(names) != len(candidates):
            raise CoMaInputError(
                f"{len(names)} candidate names for {len(candidates)} candidates", f"{dataset.name} row {index}"
            )
        for name, candidate in zip(names, candidates, strict=True):
            first_of.setdefault(name, candidate)
        rows.append({"query": query, "candidates": [first_of[name] for name in names]})
    return replace(dataset, rows=rows, parser=parser)  # keeps the split hash


def load_mmeb_v2_datasets(
    source: str | os.PathLike,
    names: Sequence[str] | None = None,
    image_root: str | None = None,
    split: str = "test",
    parsers: dict[str, str] | None = None,
) -> list[MMEBDataset]:
    """MMEB-V2 instruct test datasets, each side prepared by its family's rule (see `coma_hf.released.evaluation`).

    `source` is a folder of `{name}.jsonl` / `{name}.parquet` files in the instruct field layout
    (`coma_hf.released.evaluation.INSTRUCT_FIELDS`; its `mmeb_manifest.json` may add `parsers`, `image_root`,
    `meta_tasks`, `out_of_distribution`) or a Hub id such as `ziyjiang/MMEB_Test_Instruct` with `names` (one config
    each). `parsers` maps dataset names to parsers beyond
    `PARSER_OF`. Rows are encoded with the checkpoint's named layouts: a checkpoint converted from the release has
    them (`convert_released_checkpoint`).
    """
    return load_evaluation_datasets(source, names, image_root, split, data_format="mmeb_v2", parsers=parsers)


DATA_FORMATS = ("auto", "mmeb", "mmeb_v2")  # how `load_evaluation_datasets` reads rows


def load_evaluation_datasets(
    source: str | os.PathLike,
    names: Sequence[str] | None = None,
    image_root: str | None = None,
    split: str = "test",
    data_format: str = "auto",
    parsers: dict[str, str] | None = None,
) -> list[MMEBDataset]:
    """Evaluation datasets read as `data_format` says: `"mmeb"`, MMEB's verbatim rows (`load_mmeb_datasets`);
    `"mmeb_v2"`, instruct rows prepared by their family's rule (`load_mmeb_v2_datasets`); `"auto"`, instruct rows when
    every dataset's rows are (`is_instruct_rows`), else verbatim ones. `parsers` adds to the folder manifest's."""
    if data_format not in DATA_FORMATS:
        raise ValueError(f"data_format must be one of {DATA_FORMATS}, got {data_format!r}")
    datasets = load_mmeb_datasets(source, names=names, image_root=image_root, split=split)
    instruct = all(is_instruct_rows(dataset.rows) for dataset in datasets)
    if data_format == "mmeb" or (data_format == "auto" and not instruct):
        return datasets
    manifest_parsers = read_manifest(source).get("parsers", {}) if os.path.isdir(source) else {}
    chosen = {**manifest_parsers, **(parsers or {})}
    return [as_instruct_dataset(dataset, chosen) for dataset in datasets]


def as_instruct_dataset(dataset: MMEBDataset, parsers: dict[str, str] | None = None) -> MMEBDataset:
    """A dataset read by `load_mmeb_datasets` whose rows are in the instruct layout, prepared by its parser; an
    error naming the dataset when its rows are not."""
    if not is_instruct_rows(dataset.rows):
        missing = next((row for row in dataset.rows if "qry_inst" not in row), None)
        raise CoMaInputError(
            "not in the MMEB-V2 instruct field layout (no qry_inst)"
            + (f"; the row has {sorted(missing)}" if missing is not None else ": no rows"),
            dataset.name,
            "qry_inst",
        )
    return instruct_dataset(dataset, parser_of(dataset.name, parsers))


# Names that moved in 0.2.0 → their new module: importing them from here still works, with a warning (`coma_hf.moved`).
_MOVED = {
    "RELEASED_LAYOUTS": "coma_hf.released.evaluation",
    "RELEASED_PROCESSOR_SETTINGS": "coma_hf.released.evaluation",
    "RELEASED_EMBEDDING_LAYOUT": "coma_hf.released.evaluation",
    "IMAGE_PROMPT": "coma_hf.released.evaluation",
    "IMAGE_PROMPT_NO_NEWLINE": "coma_hf.released.evaluation",
    "TEXT_PROMPT": "coma_hf.released.evaluation",
    "TEXT_AS_IS": "coma_hf.released.evaluation",
    "EVAL_MIN_IMAGE_TOKENS": "coma_hf.released.evaluation",
    "EVAL_MAX_IMAGE_TOKENS": "coma_hf.released.evaluation",
    "TINY_IMAGE_SIDE": "coma_hf.released.evaluation",
    "TINY_IMAGE_SIZE": "coma_hf.released.evaluation",
    "INSTRUCT_FIELDS": "coma_hf.released.evaluation",
}


__getattr__ = moved_names(__name__, _MOVED)
