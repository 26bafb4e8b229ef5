"""Serving a CoMa checkpoint with the stock backbone class, e.g. on an inference server that pools a stock model.

Stage-2 inference is ordinary causal attention over the input followed by the K compression tokens (the attention
rule only differs for tokens *after* them, and an embedding input has none), so the stock
`...ForConditionalGeneration` class computes the same final hidden states as `CoMaModel`: render the input, append
the K compression-token ids, run a causal forward, pool the final (post-norm) hidden states of the last K positions
(mean, or the last one), truncate to `embedding_dim` if set, L2-normalise.

The weights need no conversion (a CoMa checkpoint keeps the stock key names, see `modeling_coma.py`), but a CoMa
folder's `config.json` is the `coma` config and its tokenizer and image processor point at `CoMaProcessor`'s remote
code, so a server reading the folder finds no stock model there. `export_stock_backbone` therefore writes a stock
folder: the backbone's config and weights, the tokenizer (with the compression tokens) and image processor without
remote-code pointers, and `coma_pooling.json`, everything else a server must be told (`pooling_spec`).

    python -m coma_hf.serving CHECKPOINT OUTPUT_DIR

Through vLLM (`docs/serving.md`): serve the export with `--runner pooling --convert embed`, send each input as
`vllm_prompt` renders it (token ids and the prepared image), ask for every token's final state
(`pooling_task="token_embed"`) and pool it with `pool_token_states`, which reads `coma_pooling.json`.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

import torch

from .backbones import get_family
from .configuration_coma import CoMaConfig
from .inputs import MAX_ASPECT_RATIO, split_input
from .layout_coma import InputLayout
from .processing_coma import CoMaProcessor
from .saving import MAX_SHARD_SIZE

POOLING_FILE = "coma_pooling.json"
# Keys that send a loader to CoMa's remote code; the stock folder's processor files must not carry them.
REMOTE_CODE_KEYS = ("auto_map", "processor_class")
PROCESSOR_FILES = ("tokenizer_config.json", "preprocessor_config.json")
# How a layout of each mode renders (`InputLayout`'s rules, told to a server): the separators and the placeholders.
SEPARATOR_RULES = {
    "parts": "a text between two slots is written only when both slots are present (an empty part is absent)",
    "prompt": "a text between two slots is written only when both slots are present; the instruction is present "
    "whenever it is given, even empty",
}
PLACEHOLDER_RULES = {
    "parts": "an input with an image whose text contains image_placeholder (an MMEB row) is that text with the "
    "image block in place of the first placeholder, then the compression tokens: no layout, no instruction; without "
    "an image, placeholders are removed from the text",
    "prompt": "placeholders are removed from the instruction and the text; the image block goes in the {image} slot",
}
# What each option of a dict layout (`InputLayout.OPTIONS`) means, for `embedding_layout` and the named `layouts`.
OPTION_RULES = {
    "mode": "'parts' (default) or 'prompt': the parts joined into one prompt string, each stretch of it between the "
    "image block and the compression tokens tokenized at once",
    "clean_space_newline": "prompt mode: every ' \\n' of the prompt text becomes '\\n'",
    "trailing_newline": "prompt mode: '\\n' ends the prompt text, after the clean-up, whatever is present (also "
    "with K = 0); a text cut for max_length is cut before it",
    "text_as_instruction": "an input without an instruction has its text (or '', without one) in the instruction "
    "slot and no text",
}


def pooling_spec(config: CoMaConfig, processor: CoMaProcessor) -> dict[str, Any]:
    """What a server running the stock class must be told to reproduce `CoMaModel.encode`, as JSON-ready data.

    The input is `embedding_layout` with its slots filled (`{image}`: `image_block` with `image_token` repeated once
    per visual token, i.e. `image_grid_thw.prod() // merge_size**2` times, as the stock processor expands it;
    `{compression}`: the `compression_token_ids`), rendered by the rules of its mode (`layout_mode`: `separators`,
    `image_placeholder_rule`; a dict layout's options as `layout_options` says — a converted release's layout is a
    prompt); the user's text is tokenized with special-token strings left as plain text. The embedding is read off
    the final (post-norm) hidden states of the last `pooled_positions` positions.
    """
    tokenizer = processor.tokenizer
    backbone = config.backbone_config
    vision_start, image_token, vision_end = tokenizer.convert_ids_to_tokens(
        [backbone.vision_start_token_id, backbone.image_token_id, backbone.vision_end_token_id]
    )
    num_tokens = config.num_compression_tokens
    mode = InputLayout.from_spec(processor.embedding_layout).mode
    return {
        "architecture": get_family(backbone.model_type).generation_class_name,
        "attention": "causal",
        "compression_tokens": processor.compression_tokens,
        "compression_token_ids": list(processor.compression_token_ids),
        "num_compression_tokens": num_tokens,
        # K = 0 (a VLM2Vec-style embedder): the last input token's state
        "pooled_positions": max(num_tokens, 1),
        "pooling": config.pooling,
        "hidden_states": "final, after the language model's last norm (the stock output's hidden_states[-1])",
        "embedding_dim": config.embedding_dim,
        "normalize": config.normalize_embeddings,
        "embedding_layout": processor.embedding_layout,
        # a dict layout carries options (`InputLayout.OPTIONS`: prompt mode, clean-ups); `layouts` are the named ones
        # inputs may ask for (a converted release checkpoint's per-family evaluation rules)
        "layouts": processor.layouts,
        "image_settings": {
            "enlarge_images_below": processor.enlarge_images_below,
            "enlarged_image_size": processor.enlarged_image_size,
            "apply_exif_orientation": processor.apply_exif_orientation,
            # beyond this long:short ratio the image is centred on a white canvas widened to it (a stock processor
            # refuses such an image)
            "max_aspect_ratio": MAX_ASPECT_RATIO,
        },
        # the rules of embedding_layout's mode; a named layout of the other mode follows that mode's rules
        "layout_mode": mode,
        "separators": SEPARATOR_RULES[mode],
        "layout_options": OPTION_RULES,
        "image_block": f"{vision_start}{image_token}{vision_end}",
        "image_token": image_token,
        "image_placeholder": processor.image_placeholder,
        "image_placeholder_rule": PLACEHOLDER_RULES[mode],
        "text_tokenization": "special-token strings inside the user's text stay plain text (split_special_tokens); "
        "in parts mode the text is tokenized alone and each run of instruction and separators as one piece",
        "truncation": "an input longer than max_length loses tokens from the end of its text (an MMEB row: the text "
        "after the image first, then the text before it) until it fits; the rest is never cut",
        "query_instruction": processor.query_instruction,
        "document_instruction": processor.document_instruction,
        "max_length": processor.max_length,
    }


def vllm_prompt(processor: CoMaProcessor, item: Any, instruction: str | None = None, sample: Any = None) -> dict:
    """The request for one input to a server that runs the stock export (a vLLM `TokensPrompt`):

    - `prompt_token_ids`: the input rendered by the checkpoint's processor (layout, truncation, special-token rule),
      its image block expanded to one image token per visual token, the K compression-token ids last;
    - `multi_modal_data`: `{"image": the picture as the processor prepares it}` (upright, enlarged when tiny,
      aspect ratio bounded: `CoMaProcessor.prepare_image`), from which the export's image processor computes the
      same grid, so the expanded image tokens match; absent for a text.

    `item` is what `CoMaModel.encode` takes (a text, a PIL image, or `{"image", "text", "instruction", "layout"}`);
    `instruction` goes with an input that has none of its own (`processor.query_instruction` for a query)."""
    entry = split_input(item, sample)
    own = entry.instruction if entry.instruction is not None else instruction
    rendered = processor.render_embedding_input(entry.text, entry.image, own, sample=sample, layout=entry.layout)
    prompt: dict[str, Any] = {"prompt_token_ids": list(rendered.input_ids)}
    if entry.image is not None:
        prompt["multi_modal_data"] = {"image": processor.prepare_image(entry.image, sample)}
    return prompt


def pool_token_states(token_states: torch.Tensor, spec: dict[str, Any]) -> torch.Tensor:
    """One embedding `[embedding_dim or hidden]` from a server's per-token output for one input (`[length, hidden]`,
    the final hidden states of every position: vLLM's `pooling_task="token_embed"` with `use_activation=False`), as
    `coma_pooling.json` (`spec`) says: the last `pooled_positions` states, their mean or the last one, the first
    `embedding_dim` dimensions when set, L2-normalised when `normalize`. Float32."""
    states = torch.as_tensor(token_states).float()[-spec["pooled_positions"] :]
    pooled = states.mean(dim=0) if spec["pooling"] == "mean" else states[-1]
    if spec["embedding_dim"]:
        pooled = pooled[: spec["embedding_dim"]]
    return torch.nn.functional.normalize(pooled, dim=-1) if spec["normalize"] else pooled


def export_stock_backbone(
    checkpoint: str | os.PathLike, output_dir: str | os.PathLike, dtype: str | torch.dtype = "auto"
) -> Path:
    """Write a CoMa checkpoint (folder or Hub id) as a folder the stock backbone class and servers load as is.

    `output_dir` receives the stock `config.json` and weights (same tensors, loaded and saved by the family's stock
    class, which refuses missing or unexpected keys), the tokenizer (with the K compression tokens), the image
    processor (with the checkpoint's visual-token bounds) and chat template, without remote-code pointers, and
    `coma_pooling.json` (`pooling_spec`). `dtype` is the stock class's `from_pretrained` argument ("auto": the
    saved weights'). Returns `output_dir`.
    """
    output_dir = Path(output_dir)
    if os.path.isdir(checkpoint) and output_dir.exists() and output_dir.samefile(checkpoint):
        raise ValueError(f"Export the stock backbone to a new folder, not into the checkpoint {checkpoint} itself")
    config = CoMaConfig.from_pretrained(checkpoint)
    processor = CoMaProcessor.from_pretrained(checkpoint)
    stock_class = get_family(config.backbone_config.model_type).generation_class
    stock, loading = stock_class.from_pretrained(
        checkpoint, config=config.backbone_config, dtype=dtype, use_safetensors=True, output_loading_info=True
    )
    problems = {key: value for key, value in loading.items() if key in ("missing_keys", "unexpected_keys") and value}
    if problems:
        raise ValueError(f"{checkpoint}'s weights do not fit {stock_class.__name__}: {problems}")
    stock.save_pretrained(output_dir, max_shard_size=MAX_SHARD_SIZE)
    processor.tokenizer.save_pretrained(output_dir)
    processor.image_processor.save_pretrained(output_dir)
    for name in PROCESSOR_FILES:
        _drop_keys(output_dir / name, REMOTE_CODE_KEYS)
    spec = pooling_spec(config, processor)
    (output_dir / POOLING_FILE).write_text(json.dumps(spec, indent=2) + "\n", encoding="utf-8")
    return output_dir


def _drop_keys(path: Path, keys: tuple[str, ...]) -> None:
    """Remove `keys` from the JSON object in `path` (if the file exists)."""
    if not path.is_file():
        return
    content = json.loads(path.read_text(encoding="utf-8"))
    for key in keys:
        content.pop(key, None)
    path.write_text(json.dumps(content, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=export_stock_backbone.__doc__.splitlines()[0])
    parser.add_argument("checkpoint", help="a CoMa checkpoint: folder or Hub id")
    parser.add_argument("output_dir", help="the stock folder to write")
    parser.add_argument("--dtype", default="auto", help='weights dtype, e.g. "bfloat16" (default: as saved)')
    args = parser.parse_args(argv)
    print(export_stock_backbone(args.checkpoint, args.output_dir, args.dtype))


if __name__ == "__main__":
    main()
