"""The embedded default: a small backbone built offline, with random weights, in seconds.

* `build_tokenizer()` trains a small byte-level BPE on text that ships with the package (`resources/`) and adds the
  Qwen chat special tokens and chat template; with `special_token_start=151643` the special tokens sit at the ids
  of published Qwen checkpoints (the vocabulary is padded with unreachable filler entries), so published configs
  can be exercised without downloading anything.
* `tiny_backbone_config(family, tokenizer)` is a small config of each supported family (Qwen2.5-VL by default, so the
  windowed vision attention is exercised); `shrink_config` shrinks a published config in width and depth while
  keeping what matters for correctness (vocabulary, special ids, tying, patch/merge sizes, rope sections).
* `build_tiny_coma()` puts these together through `CoMaModel.from_backbone`, the path real checkpoints take; with
  `reader=True` it starts from the shipped pre-trained reader (`coma_hf.reader`) instead of random weights.

Everything is deterministic from `seed`.
"""

from __future__ import annotations

import copy
import os
from importlib import resources

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoConfig, PretrainedConfig, PreTrainedTokenizerFast

from .backbones import get_family, image_processor_class
from .modeling_coma import CoMaModel
from .processing_coma import BackboneProcessorParts, CoMaProcessor

# Qwen2/2.5/3-VL special tokens, in the order (and, from 151643, at the ids) of the published tokenizers.
QWEN_SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
    "<tool_call>",
    "</tool_call>",
    "<|fim_prefix|>",
    "<|fim_middle|>",
    "<|fim_suffix|>",
    "<|fim_pad|>",
    "<|repo_name|>",
    "<|file_sep|>",
)
QWEN_SPECIAL_TOKEN_START = 151643

# The Qwen2-VL chat template, reduced to text and images.
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

DEFAULT_FAMILY = "qwen2_5_vl"
DEFAULT_MIN_IMAGE_TOKENS = 4
DEFAULT_MAX_IMAGE_TOKENS = 64


def corpus_lines() -> list[str]:
    """The text the tiny tokenizer is trained on (ships with the package)."""
    text = resources.files("coma_hf").joinpath("resources/tiny_corpus.txt").read_text(encoding="utf-8")
    return [line for line in text.splitlines() if line.strip()]


def build_tokenizer(vocab_size: int = 1024, special_token_start: int | None = None) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer with Qwen's chat special tokens, trained offline in well under a second.

    Args:
        vocab_size: target size of the learned vocabulary (the shipped corpus yields somewhat fewer).
        special_token_start: id of `<|endoftext|>`; the learned vocabulary is padded with unreachable fillers up to
            it. `None` places the special tokens right after the learned vocabulary.
    """
    learned = Tokenizer(models.BPE())
    learned.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    learned.train_from_iterator(corpus_lines(), trainer)
    vocab = learned.get_vocab()
    if special_token_start is not None:
        if special_token_start < len(vocab):
            raise ValueError(f"special_token_start={special_token_start} is inside the learned vocabulary")
        vocab.update({f"<|filler_{index}|>": index for index in range(len(vocab), special_token_start)})
        merges = [tuple(merge.split(" ")) if isinstance(merge, str) else tuple(merge) for merge in _merges(learned)]
        learned = Tokenizer(models.BPE(vocab=vocab, merges=merges))
        learned.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    learned.decoder = decoders.ByteLevel()
    learned.add_special_tokens(list(QWEN_SPECIAL_TOKENS))
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=learned,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        padding_side="left",
        model_max_length=32768,
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def _merges(tokenizer: Tokenizer) -> list:
    import json

    return json.loads(tokenizer.to_str())["model"]["merges"]


def build_image_processor(family: str = DEFAULT_FAMILY):
    """The Qwen2-VL image processor (shared by all supported families) with the family's patch size."""
    spec = get_family(family)
    ImageProcessor = image_processor_class()
    if family == "qwen3_vl":  # Qwen3-VL normalises to [-1, 1]
        return ImageProcessor(
            patch_size=spec.patch_size, merge_size=spec.spatial_merge_size, image_mean=[0.5] * 3, image_std=[0.5] * 3
        )
    return ImageProcessor(patch_size=spec.patch_size, merge_size=spec.spatial_merge_size)


# Kept long: a table of the tiny configs' values, one keyword per field of each family's config.
def tiny_backbone_config(
    family: str = DEFAULT_FAMILY,
    tokenizer: PreTrainedTokenizerFast | None = None,
    tie_word_embeddings: bool = True,
    hidden_size: int = 64,
    num_layers: int = 2,
    vision_width: int = 32,
    vision_depth: int = 2,
    initializer_range: float = 0.1,
) -> PretrainedConfig:
    """A small config of `family` (by default hidden 64, 2 layers, 2 vision blocks of width 32), special ids taken
    from `tokenizer`. Heads are 16 wide, so the rope sections (2, 3, 3) fit any width.

    `initializer_range` is 0.1 rather than transformers' 0.02: at these widths 0.02 gives near-uniform attention and
    a from-scratch model then takes far longer to learn to route the image through the compression tokens.
    """
    spec = get_family(family)
    tokenizer = tokenizer or build_tokenizer()
    head_dim = 16
    text = {
        "vocab_size": len(tokenizer),
        "hidden_size": hidden_size,
        "intermediate_size": 2 * hidden_size,
        "num_hidden_layers": num_layers,
        "num_attention_heads": hidden_size // head_dim,
        "num_key_value_heads": max(1, hidden_size // head_dim // 2),
        "head_dim": head_dim,
        "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-6,
        "initializer_range": initializer_range,
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
        "pad_token_id": tokenizer.pad_token_id,
        "bos_token_id": tokenizer.convert_tokens_to_ids("<|endoftext|>"),
        "eos_token_id": tokenizer.convert_tokens_to_ids("<|im_end|>"),
    }
    vision = {
        "depth": vision_depth,
        "num_heads": 2,
        "patch_size": spec.patch_size,
        "spatial_merge_size": spec.spatial_merge_size,
        "temporal_patch_size": 2,
        "in_channels": 3,
        "initializer_range": initializer_range,
    }
    if family == "qwen2_vl":
        vision.update(embed_dim=vision_width, mlp_ratio=2, hidden_size=hidden_size)
    elif family == "qwen2_5_vl":
        # windows of 2×2 merged tokens and a last full-attention block, so small images still use several windows
        vision.update(
            hidden_size=vision_width,
            intermediate_size=2 * vision_width,
            out_hidden_size=hidden_size,
            window_size=56,
            fullatt_block_indexes=[vision_depth - 1],
        )
    elif family == "qwen3_vl":
        text["rope_parameters"]["mrope_interleaved"] = True
        vision.update(
            hidden_size=vision_width,
            intermediate_size=2 * vision_width,
            out_hidden_size=hidden_size,
            num_position_embeddings=64,
            deepstack_visual_indexes=[0],
        )
    ids = {
        name: tokenizer.convert_tokens_to_ids(token)
        for name, token in (
            ("image_token_id", "<|image_pad|>"),
            ("video_token_id", "<|video_pad|>"),
            ("vision_start_token_id", "<|vision_start|>"),
            ("vision_end_token_id", "<|vision_end|>"),
        )
    }
    return AutoConfig.for_model(
        family, text_config=text, vision_config=vision, tie_word_embeddings=tie_word_embeddings, **ids
    )


def shrink_config(
    config: PretrainedConfig, num_layers: int = 1, num_heads: int = 2, vision_depth: int = 1
) -> PretrainedConfig:
    """A published config shrunk in width and depth, keeping vocabulary size, special token ids, tied/untied
    embeddings, patch/merge sizes and rope sections (so `head_dim` is kept: the sections must sum to half of it)."""
    config = copy.deepcopy(config)
    text = config.get_text_config()
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    text.head_dim = head_dim
    text.num_attention_heads = num_heads
    text.num_key_value_heads = 1
    text.hidden_size = head_dim * num_heads
    text.intermediate_size = 2 * text.hidden_size
    text.num_hidden_layers = num_layers
    if hasattr(text, "max_window_layers"):
        text.max_window_layers = num_layers
    if getattr(text, "layer_types", None) is not None:
        text.layer_types = list(text.layer_types)[:num_layers]
    vision = config.vision_config
    vision.depth = vision_depth
    vision.num_heads = 2
    width = 32
    if config.model_type == "qwen2_vl":
        vision.embed_dim, vision.mlp_ratio = width, 2
        vision.hidden_size = text.hidden_size
    else:
        vision.hidden_size, vision.intermediate_size = width, 2 * width
        vision.out_hidden_size = text.hidden_size
    if hasattr(vision, "fullatt_block_indexes"):
        vision.fullatt_block_indexes = [vision_depth - 1]
    if hasattr(vision, "deepstack_visual_indexes"):
        vision.deepstack_visual_indexes = [0]
    return config


def build_tiny_backbone(
    family: str = DEFAULT_FAMILY,
    seed: int = 0,
    attn_implementation: str = "sdpa",
    config: PretrainedConfig | None = None,
    tokenizer: PreTrainedTokenizerFast | None = None,
):
    """A randomly initialised stock `...ForConditionalGeneration` of `family` and a processor-like bundle
    (`tokenizer`, `image_processor`) for it."""
    spec = get_family(family)
    tokenizer = tokenizer or build_tokenizer()
    config = config or tiny_backbone_config(family, tokenizer)
    torch.manual_seed(seed)
    backbone = spec.generation_class(config).to(torch.float32).eval()  # published configs say bfloat16
    # onto every sub-config: a top-level `config._attn_implementation` leaves the layers on their own setting
    backbone.set_attn_implementation(attn_implementation)
    return backbone, BackboneProcessorParts(tokenizer, build_image_processor(family), tokenizer.chat_template)


def build_tiny_coma(
    family: str = DEFAULT_FAMILY,
    num_compression_tokens: int = 32,
    seed: int = 0,
    attn_implementation: str = "sdpa",
    min_image_tokens: int = DEFAULT_MIN_IMAGE_TOKENS,
    max_image_tokens: int = DEFAULT_MAX_IMAGE_TOKENS,
    max_length: int | None = 1024,
    backbone_config: PretrainedConfig | None = None,
    tokenizer: PreTrainedTokenizerFast | None = None,
    reader: bool | str | os.PathLike = False,
    **config_kwargs,
) -> tuple[CoMaModel, CoMaProcessor]:
    """The embedded default: a tiny random-weight backbone of `family` turned into a CoMa model, and its processor.
    Its config says so (`embedded_backbone=True`), which is how scripts choose the `tiny` recipe for it. Keyword
    arguments go to `CoMaModel.from_backbone`: the processor's (`loss_on`, instructions) and the config's.

    `reader=True` starts from the shipped pre-trained reader (a folder: a reader `examples/train_reader.py` wrote)
    instead of random weights; its size, family and tokenizer are the reader's, so `family` must match and
    `backbone_config` / `tokenizer` must not be given."""
    if reader:
        backbone, parts = _reader_backbone(reader, family, attn_implementation, backbone_config, tokenizer)
    else:
        backbone, parts = build_tiny_backbone(family, seed, attn_implementation, backbone_config, tokenizer)
    model = CoMaModel.from_backbone(
        backbone,
        processor=parts,
        num_compression_tokens=num_compression_tokens,
        min_image_tokens=min_image_tokens,
        max_image_tokens=max_image_tokens,
        max_length=max_length,
        seed=seed,
        embedded_backbone=True,
        **config_kwargs,
    )
    return model.eval(), model.processor


def _reader_backbone(reader, family, attn_implementation, backbone_config, tokenizer):
    from .reader import load_reader

    if backbone_config is not None or tokenizer is not None:
        raise ValueError("reader=... fixes the backbone and its tokenizer: do not pass backbone_config or tokenizer")
    backbone, parts = load_reader(None if reader is True else reader, attn_implementation)
    if backbone.config.model_type != family:
        raise ValueError(f"the reader is a {backbone.config.model_type} model, not {family}")
    return backbone, parts
