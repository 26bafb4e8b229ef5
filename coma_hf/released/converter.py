"""Load the authors' released CoMa checkpoints (GitHub `Trustworthy-Information-Access/CoMa`) as coma_hf checkpoints.

What their code saves (read from it, not copied):

* a **merged model** (their `merge_qwen.py`): the stock `qwen2_5_vl` config and the weights of their vendored
  Qwen2.5-VL class, under the older key names (`visual.*`, `model.embed_tokens`, `model.layers.*`, `model.norm`,
  `lm_head`; a tied model may leave `lm_head` out), and a tokenizer that may carry `<|ctoken_pad_0|>` …
  `<|ctoken_pad_{K-1}|>` as added special tokens — they add them at run time, K from an environment variable, so a
  saved tokenizer may also lack them: then their ids were the base vocabulary's length + i, rows that published Qwen
  checkpoints carry spare;
* or a **peft adapter** (DoRA on q/k/v/o, `modules_to_save=["embed_tokens"]`: the whole input embedding matrix, which
  the tied 3B model's LM head shares), keyed by the same older names, over a base named in `adapter_config.json`.

`convert_released_checkpoint` loads either into the stock transformers class (whose loader reads both the older and
the current key layout), merges an adapter, keeps the trained compression-token rows and their ids (nothing is
re-initialised or appended), builds the CoMa model through `CoMaModel.from_backbone` with the release's token names,
and saves it with `save_checkpoint` (remote code, processor, sentence-transformers files, card). The config records
what their evaluation did (pooling of the **last** compression token, plain causal attention), the processor config
how it rendered inputs (`RELEASED_PROCESSOR_SETTINGS`, owned by `coma_hf.released.evaluation`: a layout per MMEB
dataset family and side, their image-query rule for the plain API, their eval image bounds, tiny images enlarged,
images read as stored), and `conversion_summary.json` that the weights came from the release (source, recipe
`released`).

That rendering is for evaluation only: training from a converted checkpoint renders as CoMa trains
(`coma_hf.released.recipe.processor_for_training`).
"""

from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..backbones import get_family
from ..hub.card import CONVERSION_SUMMARY, HUB_ID, save_checkpoint, write_run_summary
from ..modeling_coma import CoMaModel
from ..processing_coma import BackboneProcessorParts
from .evaluation import RELEASED_PROCESSOR_SETTINGS
from .recipe import RELEASED_RECIPE

logger = logging.getLogger(__name__)

RELEASED_TOKEN_FORMAT = "<|ctoken_pad_{index}|>"  # their compression tokens
RELEASED_TOKEN = re.compile(r"^<\|ctoken_pad_(\d+)\|>$")
# What their evaluation did, recorded in the converted config: `--pooling eos` (the last compression token's state);
# plain causal attention (their bottleneck mask is never switched on by a published script). Their checkpoints are
# stage-2 (contrastive) models.
RELEASED_CONFIG = {"pooling": "last", "attention_rule": "causal", "training_stage": 2}
# The older key layout of their vendored class (transformers < 4.52) → the stock class's current one, for adapter
# weights (the stock loader renames full weights itself, the same way). Current names are left as they are.
LEGACY_KEY_PREFIXES = (("visual.", "model.visual."), ("model.", "model.language_model."))
CURRENT_KEY_PREFIXES = ("model.visual.", "model.language_model.", "lm_head.")
PEFT_PREFIX = "base_model.model."
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
# What a released checkpoint needs from the Hub: configs, tokenizer files, safetensors weights (never a pickle).
HUB_FILES = ["*.json", "*.safetensors", "*.txt", "*.jinja", "*.model"]


@dataclass
class ReleasedCompressionTokens:
    """The compression tokens of a released checkpoint.

    Attributes:
        count: K.
        ids: vocabulary ids of `<|ctoken_pad_0|>` … `<|ctoken_pad_{K-1}|>`, in order.
        source: `"tokenizer"` when its tokenizer carried them, `"--num_compression_tokens"` when K came from the caller
            (the missing tokens were then added after the vocabulary, as their code did at run time).
    """

    count: int
    ids: list[int]
    source: str


def current_key(name: str) -> str:
    """A weight name of the older layout (`visual.*`, `model.layers.*`, …) in the stock class's current one
    (`model.visual.*`, `model.language_model.layers.*`, …); current names and `lm_head.*` are returned unchanged."""
    if name.startswith(CURRENT_KEY_PREFIXES):
        return name
    for old, new in LEGACY_KEY_PREFIXES:
        if name.startswith(old):
            return new + name[len(old) :]
    return name


def current_adapter_key(name: str) -> str:
    """A peft adapter weight name (`base_model.model.<module path>.lora_A.weight`, …) with its module path in the
    current layout (`current_key`)."""
    if not name.startswith(PEFT_PREFIX):
        return name
    return PEFT_PREFIX + current_key(name[len(PEFT_PREFIX) :])


def local_folder(source: str | os.PathLike) -> Path:
    """`source` as a local folder: a folder as it is; a Hub id downloaded (configs, tokenizer, safetensors only)."""
    if Path(source).is_dir():
        return Path(source)
    if not HUB_ID.match(str(source)):
        raise FileNotFoundError(f"{source} is neither a local folder nor a Hub id (owner/name)")
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(str(source), allow_patterns=HUB_FILES))


def load_released_backbone(
    folder: str | os.PathLike, dtype: torch.dtype = torch.float32, attn_implementation: str = "sdpa"
) -> Any:
    """The stock `...ForConditionalGeneration` of a released merged model in `folder` (older or current key layout;
    a tied model may lack `lm_head`). A weight the model needs but the files lack, or a weight the model does not
    have, is an error naming the folder and the weights."""
    folder = Path(folder)
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{folder} has no config.json: not a released merged model (nor an adapter)")
    model_type = json.loads(config_path.read_text()).get("model_type")
    family = get_family(model_type)
    if not any(folder.glob("*.safetensors")):
        raise FileNotFoundError(f"{folder} has no safetensors weights (pickled weights are not loaded)")
    backbone, info = family.generation_class.from_pretrained(
        folder,
        dtype=dtype,
        attn_implementation=attn_implementation,
        use_safetensors=True,
        output_loading_info=True,
    )
    missing = sorted(set(info["missing_keys"]) - _tied_keys(backbone))
    unexpected = sorted(info["unexpected_keys"])
    mismatched = sorted(str(key) for key in info.get("mismatched_keys", ()))
    if missing or unexpected or mismatched:
        raise ValueError(
            f"The weights in {folder} do not fit a {model_type} model of its config.json: "
            + "; ".join(
                f"{label} {names[:5]}{' …' if len(names) > 5 else ''}"
                for label, names in (("missing", missing), ("unexpected", unexpected), ("mismatched", mismatched))
                if names
            )
            + (" (an untied model must save lm_head.weight)" if "lm_head.weight" in missing else "")
        )
    return backbone.eval()


def _tied_keys(model: Any) -> set[str]:
    """Weights a tied model may lack because it shares them (the LM head of a tied model)."""
    if not getattr(model.config.get_text_config(), "tie_word_embeddings", False) and not getattr(
        model.config, "tie_word_embeddings", False
    ):
        return set()
    return {"lm_head.weight"}


def merge_released_adapter(backbone: Any, adapter_folder: str | os.PathLike) -> Any:
    """`backbone` with the peft adapter in `adapter_folder` (LoRA or DoRA, and `modules_to_save` such as the input
    embedding matrix) merged into its weights; adapter weights keyed by the older layout are renamed first. A tied
    backbone's LM head is tied again to the merged input embeddings, as their merge did. Every adapter weight must
    find its place and every adapter module its weights, else an error naming the adapter file."""
    from peft import PeftConfig, get_peft_model, set_peft_model_state_dict
    from safetensors.torch import load_file

    adapter_folder = Path(adapter_folder)
    weights = adapter_folder / ADAPTER_WEIGHTS
    if not weights.is_file():
        raise FileNotFoundError(f"{adapter_folder} has {ADAPTER_CONFIG} but no {ADAPTER_WEIGHTS}")
    config = PeftConfig.from_pretrained(adapter_folder)
    state = {current_adapter_key(name): tensor for name, tensor in load_file(weights).items()}
    tied = bool(_tied_keys(backbone))  # peft unties a merged model whose embedding matrix was trained
    peft_model = get_peft_model(backbone, config)
    try:
        result = set_peft_model_state_dict(peft_model, state)
    except KeyError as error:  # a `modules_to_save` entry whose weights the file lacks
        raise ValueError(f"{weights} lacks the weights of {error}") from None
    missing = sorted(key for key in result.missing_keys if ".lora_" in key or ".modules_to_save." in key)
    if missing or result.unexpected_keys:
        raise ValueError(
            f"{weights} does not fit its base model: adapter weights missing {missing[:5]}, "
            f"unexpected {sorted(result.unexpected_keys)[:5]}"
        )
    merged = peft_model.merge_and_unload()
    if tied:
        merged.config.tie_word_embeddings = True
        merged.lm_head.weight = merged.get_input_embeddings().weight
    return merged


def released_compression_tokens(tokenizer: Any, num_rows: int, num_compression_tokens: int | None = None):
    """K and the ids of the release's compression tokens, adding to `tokenizer` those it lacks.

    K is `num_compression_tokens` when given, else the number of `<|ctoken_pad_i|>` tokens the tokenizer carries
    (they must be numbered 0 … K-1). Tokens the tokenizer lacks are added after its vocabulary, in order, as their code
    did at run time (so without any, id i is the vocabulary's length + i). Every id must be a row of the embedding
    matrix (`num_rows`): the converter keeps trained rows, it never makes new ones.

    Returns a `ReleasedCompressionTokens`.
    """
    present = sorted(
        int(match.group(1)) for token in tokenizer.get_vocab() if (match := RELEASED_TOKEN.match(token)) is not None
    )
    if num_compression_tokens is None:
        if not present:
            raise ValueError(
                "The tokenizer carries no <|ctoken_pad_i|> compression tokens (their code adds them at run time): "
                "pass num_compression_tokens (--num_compression_tokens K), the K the checkpoint was trained with"
            )
        if present != list(range(len(present))):
            raise ValueError(f"The tokenizer's <|ctoken_pad_i|> tokens are not numbered 0 … K-1: {present}")
        count, source = len(present), "tokenizer"
    else:
        if num_compression_tokens < 1:
            raise ValueError(f"num_compression_tokens must be at least 1, got {num_compression_tokens}")
        count = num_compression_tokens
        source = "tokenizer" if set(range(count)) <= set(present) else "--num_compression_tokens"
        if len(present) > count:
            logger.warning("The tokenizer carries %d compression tokens; using the first %d", len(present), count)
    names = [RELEASED_TOKEN_FORMAT.format(index=index) for index in range(count)]
    tokenizer.add_special_tokens({"extra_special_tokens": names}, replace_extra_special_tokens=False)
    ids = tokenizer.convert_tokens_to_ids(names)
    outside = [f"{name} (id {index})" for name, index in zip(names, ids, strict=True) if index >= num_rows]
    if outside:
        raise ValueError(
            f"The embedding matrix has {num_rows} rows, so these compression tokens have no trained row: "
            f"{', '.join(outside)}. Check K (num_compression_tokens) and the tokenizer saved with the checkpoint."
        )
    return ReleasedCompressionTokens(count, list(ids), source)


def _has_tokenizer(folder: Path) -> bool:
    return (folder / "tokenizer_config.json").is_file() or (folder / "tokenizer.json").is_file()


# Kept long: 22 lines of docstring, then the conversion's steps in the order they happen, each one call.
def convert_released_checkpoint(
    source: str | os.PathLike,
    output_dir: str | os.PathLike,
    num_compression_tokens: int | None = None,
    base_model: str | os.PathLike | None = None,
    dtype: str | torch.dtype = "float32",
    attn_implementation: str = "sdpa",
) -> CoMaModel:
    """Convert a checkpoint of the authors' release into a coma_hf checkpoint in `output_dir`; returns the model.

    Args:
        source: a folder or Hub id holding a merged model (older or current key layout, a tied model possibly
            without `lm_head`) or a peft adapter (`adapter_config.json` + `adapter_model.safetensors`).
        output_dir: where the CoMa checkpoint is saved (weights, config with `auto_map`, remote code, processor and
            tokenizer, sentence-transformers files, card, `conversion_summary.json`).
        num_compression_tokens: K, when the tokenizer lacks the `<|ctoken_pad_i|>` tokens (or to use fewer).
        base_model: the base an adapter is merged into (folder or Hub id); default: `adapter_config.json`'s
            `base_model_name_or_path`.
        dtype: the weights' dtype (float32 by default: the vectors then do not depend on bf16 rounding).
        attn_implementation: the backbone's attention (`"sdpa"` or `"eager"`; flash cannot take CoMa's mask).

    The tokenizer and image processor come from `source`, or for an adapter without them from the base. The
    compression-token rows and ids are the trained ones (`released_compression_tokens`); the config records
    `RELEASED_CONFIG` (their evaluation's pooling and attention), the processor `RELEASED_PROCESSOR_SETTINGS` (their
    evaluation's rendering, see `coma_hf.released.evaluation`).
    """
    dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    folder = local_folder(source)
    adapter = (folder / ADAPTER_CONFIG).is_file()
    base_folder = None
    if adapter:
        if base_model is None:
            base_model = json.loads((folder / ADAPTER_CONFIG).read_text()).get("base_model_name_or_path")
            if not base_model:
                raise ValueError(f"{folder / ADAPTER_CONFIG} names no base_model_name_or_path: pass base_model")
        base_folder = local_folder(base_model)
        backbone = merge_released_adapter(load_released_backbone(base_folder, dtype, attn_implementation), folder)
    else:
        backbone = load_released_backbone(folder, dtype, attn_implementation)
    parts_folder = folder if _has_tokenizer(folder) or base_folder is None else base_folder
    parts = BackboneProcessorParts.from_pretrained(str(parts_folder))
    if base_folder is not None and not (folder / "preprocessor_config.json").is_file():
        parts.image_processor = BackboneProcessorParts.from_pretrained(str(base_folder)).image_processor
    tokens = released_compression_tokens(
        parts.tokenizer, backbone.get_input_embeddings().num_embeddings, num_compression_tokens
    )
    model = CoMaModel.from_backbone(
        backbone,
        processor=parts,
        num_compression_tokens=tokens.count,
        compression_token_format=RELEASED_TOKEN_FORMAT,
        initialize_compression_rows=False,
        backbone_name_or_path=str(source),
        **RELEASED_CONFIG,
    )
    if model.config.compression_token_ids != tokens.ids:  # from_backbone must not have moved them
        raise RuntimeError(f"compression token ids changed: {tokens.ids} → {model.config.compression_token_ids}")
    model.processor = model.processor.with_settings(**RELEASED_PROCESSOR_SETTINGS)  # how their evaluation renders
    save_checkpoint(model, output_dir)
    summary = {
        "recipe": RELEASED_RECIPE,
        "source": str(source),
        "adapter": adapter,
        "base_model": str(base_model) if adapter else None,
        "num_compression_tokens": tokens.count,
        "compression_token_format": RELEASED_TOKEN_FORMAT,
        "compression_token_ids": tokens.ids,
        "tokens_from": tokens.source,
        "dtype": str(dtype).removeprefix("torch."),
        **RELEASED_CONFIG,
    }
    write_run_summary(output_dir, CONVERSION_SUMMARY, summary)
    logger.info("Converted %s into %s (K=%d, ids %s)", source, output_dir, tokens.count, tokens.ids)
    return model
