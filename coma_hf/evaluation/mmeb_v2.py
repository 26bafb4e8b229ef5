"""MMEB-V2 instruct test rows rendered exactly as the authors' released evaluation renders them.

The release (GitHub `Trustworthy-Information-Access/CoMa`) evaluates with `eval.py`, started by `scripts/eval.sh`;
its data parsers come from VLM2Vec. What they do, read from their code (file names are theirs):

**Rows.** Each image dataset is a config of the MMEB-V2 instruct test set (`ziyjiang/MMEB_Test_Instruct`, split
`test`; `src/data/eval_dataset/image_*.py`): `qry_inst`, `qry_text`, `qry_img_path`, `tgt_inst`, `tgt_text` (a
list), `tgt_img_path` (a list), paths joined to the image root (`os.path.join`). `scripts/eval.sh` reads
`scripts/eval_image.yaml`, absent from the published tree; the parser of each dataset below (`PARSER_OF`) is that
of VLM2Vec's `experiments/public/eval/image.yaml`, whose parsers these are.

**One prompt per side** (`src/model/processor.py`): `process_input_text(instruction, text)` starts from the
instruction, adds `" " + text` when the text is not empty, and puts the vision block and a space in front
(`"<|vision_start|><|image_pad|><|vision_end|> " + prompt`) on the sides that have an image;
`postprocess_input_text` appends the K compression tokens `<|ctoken_pad_i|>` to every query and candidate. The
parsers, by family and side (`PH` = `"<|image_1|>"`, `V` = the vision block):

* `image_cls` (the 10 classification sets) and `image_i2t` (MSCOCO_i2t, VisualNews_i2t) — query:
  `(V + " " + qry_inst.replace(PH, "") [+ " " + qry_text]).replace(" \\n", "\\n") + "\\n"`; candidates: each
  `tgt_text` as it is.
* `image_qa` (the 10 VQA sets) — query: the same with the instruction `"\\n" + qry_inst.replace(PH, "").strip()`;
  candidates: each `tgt_text` as it is.
* `image_t2i` (VisDial, MSCOCO_t2i, VisualNews_t2i, WebQA, EDIS, Wiki-SS-NQ) — query: `qry_inst + " " + qry_text +
  "\\n"` (VisDial: one more `"\\n"`), no image, no clean-up; candidates, one per image:
  `(V + " " + tgt_inst.replace(PH, "") [+ " " + caption]).replace(" \\n", "\\n") + "\\n"`, with the caption when
  the first `tgt_text` is not blank.
* `image_i2i_vg` (CIRR, NIGHTS, OVEN, FashionIQ, MSCOCO, RefCOCO, RefCOCO-Matching, Visual7W-Pointing) — query: as
  `image_qa`; candidates with captions as `image_t2i`'s, without: `(V + " " + tgt_inst.replace(PH, ""))
  .replace(" \\n", "\\n")`, **without** the final newline.

A candidate is named by its text (`image_cls`, `image_qa`, `image_i2t`), its image path (`image_t2i`) or
`path + ":" + caption.strip('"')` (`image_i2i_vg`); candidates are deduplicated by name across a dataset, the first
kept (`generate_cand_dataset`, VLM2Vec's `base_eval_dataset.py`), and every query is ranked among its own row's
candidates (`eval_type: local`), the gold one first.

**Tokens and images** (`Qwen2_VL_Compression_process_fn`, `load_processor`, `src/arguments.py`): each prompt is
tokenized at once by the stock processor (the vision block expanded to the image's visual tokens), with the image when
it holds the vision block, else as text alone; no truncation (`max_len` unset). An image whose width or height is
under 28 px is resized to 56 × 56 first (`image.resize((56, 56))`). `eval.sh` sets no pixel bounds, so the defaults
apply: 28·28·4 = 3,136 to 28·28·1,280 = 1,003,520 pixels, i.e. 4 to 1,280 visual tokens (training used 256 to
1,024). Images are opened as stored (no EXIF orientation).

**Vectors** (`eval.py`, `src/model/model.py`): `--pooling eos --normalize true`: the final hidden state at the last
position — the last compression token — L2-normalised; plain causal attention; bf16 autocast there, float32 here.
Their batches are padded on the right (their position ids too, `pad_and_cat`), ours on the left with matching
positions: either way each sample's vector is the one it gets alone.

**Where each rule lives here.** The prompt assembly is data of the converted checkpoint's processor config
(`RELEASED_PROCESSOR_SETTINGS`, written by `coma_hf.released.convert_released_checkpoint`): one named layout per
family and side (`RELEASED_LAYOUTS`, parsed by `InputLayout` in prompt mode, with the clean-up and the trailing
newline as options), the eval image bounds, the tiny-image enlargement and images read as stored. The plain API of a
converted checkpoint (`encode_images`, `encode_text`, `encode` without instruction) uses their image-query rule, the
text in the instruction slot (`RELEASED_EMBEDDING_LAYOUT`). This module reads the rows and does what their parsers do
to the fields before the prompt is assembled (the placeholder removed from instructions, the VQA/grounding
instruction stripped behind a newline, a caption joined to its candidate's instruction, VisDial's extra newline, the
candidates' names), yielding the `EvalItem`s `MMEBEvaluator` encodes with the checkpoint's layouts.

**Known differences.** Ties count as misses here (their `argsort` breaks them arbitrarily); an image more elongated
than 200:1 is padded onto a white canvas here and stretched to a square there; special-token strings inside a row's
text stay text here; a row with an empty instruction renders as their concatenation does, but an empty `qry_text` of
a text-to-image query is refused here.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any

from ..data.sources import resolve_image_path
from ..inputs import ENLARGED_IMAGE_SIZE, MMEB_IMAGE_PLACEHOLDER, CoMaInputError, without_image_placeholders
from .mmeb import EvalItem, MMEBDataset, load_mmeb_datasets, read_manifest

logger = logging.getLogger(__name__)

INSTRUCT_HUB_ID = "ziyjiang/MMEB_Test_Instruct"  # the MMEB-V2 instruct test set their parsers load
PLACEHOLDER = MMEB_IMAGE_PLACEHOLDER  # what their parsers remove from instructions (this literal only)
INSTRUCT_FIELDS = ("qry_inst", "qry_text", "qry_img_path", "tgt_inst", "tgt_text", "tgt_img_path")

# ---- the prompt assembly (processor-config data) --------------------------------------------------------------------
# `V + " " + instruction [+ " " + text]`, " \n" → "\n", then "\n": an image query or captioned image candidate.
IMAGE_PROMPT = {
    "template": "{image} {instruction} {text}{compression}",
    "mode": "prompt",
    "clean_space_newline": True,
    "trailing_newline": True,
}
# The same without the final newline: a grounding / image-to-image candidate without a caption.
IMAGE_PROMPT_NO_NEWLINE = {
    "template": "{image} {instruction} {text}{compression}",
    "mode": "prompt",
    "clean_space_newline": True,
}
# `instruction + " " + text + "\n"`, no clean-up: a text-to-image query.
TEXT_PROMPT = {"template": "{instruction} {text}{compression}", "mode": "prompt", "trailing_newline": True}
# A candidate's text as it is: classification labels, VQA answers, captions.
TEXT_AS_IS = {"template": "{text}{compression}", "mode": "prompt"}

QUERY, CANDIDATE, CANDIDATE_WITHOUT_TEXT = "query", "candidate", "candidate_without_text"
PARSERS = ("image_cls", "image_qa", "image_i2t", "image_t2i", "image_i2i_vg")


def layout_name(parser: str, side: str) -> str:
    """The name of a family's and side's layout in the processor config, e.g. `"image_qa.query"`."""
    return f"{parser}.{side}"


RELEASED_LAYOUTS: dict[str, dict] = {
    layout_name("image_cls", QUERY): IMAGE_PROMPT,
    layout_name("image_cls", CANDIDATE): TEXT_AS_IS,
    layout_name("image_qa", QUERY): IMAGE_PROMPT,  # the instruction arrives as "\n" + stripped (see `_query`)
    layout_name("image_qa", CANDIDATE): TEXT_AS_IS,
    layout_name("image_i2t", QUERY): IMAGE_PROMPT,
    layout_name("image_i2t", CANDIDATE): TEXT_AS_IS,
    layout_name("image_t2i", QUERY): TEXT_PROMPT,
    layout_name("image_t2i", CANDIDATE): IMAGE_PROMPT,
    layout_name("image_i2i_vg", QUERY): IMAGE_PROMPT,
    layout_name("image_i2i_vg", CANDIDATE): IMAGE_PROMPT,
    layout_name("image_i2i_vg", CANDIDATE_WITHOUT_TEXT): IMAGE_PROMPT_NO_NEWLINE,
}
# The plain API of a converted checkpoint: their image-query rule, an input's text in the instruction slot.
RELEASED_EMBEDDING_LAYOUT = {**IMAGE_PROMPT, "text_as_instruction": True}
EVAL_MIN_IMAGE_TOKENS, EVAL_MAX_IMAGE_TOKENS = 4, 1280  # `src/arguments.py` defaults (28·28·4, 28·28·1280 pixels)
TINY_IMAGE_SIDE, TINY_IMAGE_SIZE = 28, ENLARGED_IMAGE_SIZE  # an image with a side under 28 px becomes 56 × 56
# What a converted release's processor config records (`CoMaProcessor` settings).
RELEASED_PROCESSOR_SETTINGS: dict[str, Any] = {
    "embedding_layout": RELEASED_EMBEDDING_LAYOUT,
    "layouts": RELEASED_LAYOUTS,
    "min_image_tokens": EVAL_MIN_IMAGE_TOKENS,
    "max_image_tokens": EVAL_MAX_IMAGE_TOKENS,
    "enlarge_images_below": TINY_IMAGE_SIDE,
    "enlarged_image_size": TINY_IMAGE_SIZE,
    "apply_exif_orientation": False,
    "max_length": None,
}

# The parser of each MMEB image dataset (VLM2Vec's `experiments/public/eval/image.yaml`).
PARSER_OF: dict[str, str] = {
    **dict.fromkeys(
        (
            *("ImageNet-1K", "N24News", "HatefulMemes", "VOC2007", "SUN397"),
            *("Place365", "ImageNet-A", "ImageNet-R", "ObjectNet", "Country211"),
        ),
        "image_cls",
    ),
    **dict.fromkeys(
        (
            *("OK-VQA", "A-OKVQA", "DocVQA", "InfographicsVQA", "ChartQA"),
            *("Visual7W", "ScienceQA", "VizWiz", "GQA", "TextVQA"),
        ),
        "image_qa",
    ),
    **dict.fromkeys(("MSCOCO_i2t", "VisualNews_i2t"), "image_i2t"),
    **dict.fromkeys(("VisDial", "MSCOCO_t2i", "VisualNews_t2i", "WebQA", "EDIS", "Wiki-SS-NQ"), "image_t2i"),
    **dict.fromkeys(
        ("CIRR", "NIGHTS", "OVEN", "FashionIQ", "MSCOCO", "RefCOCO", "RefCOCO-Matching", "Visual7W-Pointing"),
        "image_i2i_vg",
    ),
}
EXTRA_NEWLINE_QUERIES = frozenset({"VisDial"})  # "to be consistent with v1": one more "\n" after the query


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
    """MMEB-V2 instruct test datasets, each side prepared by its family's rule (see the module docstring).

    `source` is a folder of `{name}.jsonl` / `{name}.parquet` files in the instruct field layout (`INSTRUCT_FIELDS`;
    its `mmeb_manifest.json` may add `parsers`, `image_root`, `meta_tasks`, `out_of_distribution`) or a Hub id such as
    `ziyjiang/MMEB_Test_Instruct` with `names` (one config each). `parsers` maps dataset names to parsers beyond
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
