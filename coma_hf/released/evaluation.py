"""The authors' released evaluation, as data: how it renders MMEB-V2 instruct test rows, read from their code, and
the processor settings that reproduce it (`RELEASED_PROCESSOR_SETTINGS`, which a converted checkpoint records).
`coma_hf.evaluation.mmeb_v2` reads the rows by these rules.

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
text in the instruction slot (`RELEASED_EMBEDDING_LAYOUT`). `coma_hf.evaluation.mmeb_v2` reads the rows and does
what their parsers do to the fields before the prompt is assembled (the placeholder removed from instructions, the
VQA/grounding instruction stripped behind a newline, a caption joined to its candidate's instruction, VisDial's extra
newline, the candidates' names), yielding the `EvalItem`s `MMEBEvaluator` encodes with the checkpoint's layouts.

**Known differences.** Ties count as misses here (their `argsort` breaks them arbitrarily); an image more elongated
than 200:1 is padded onto a white canvas here and stretched to a square there; special-token strings inside a row's
text stay text here; a row with an empty instruction renders as their concatenation does, but an empty `qry_text` of
a text-to-image query is refused here.
"""

from __future__ import annotations

from typing import Any

from ..inputs import ENLARGED_IMAGE_SIZE, MMEB_IMAGE_PLACEHOLDER

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
