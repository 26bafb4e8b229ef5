"""Building a CoMa model around a pretrained MLLM (`CoMaBuildMixin.from_backbone`): the backbone loaded, K compression
tokens added to its tokenizer, their embedding rows initialised, and the processor that renders with them.

Part of the remote code shipped with every checkpoint: imports only torch, transformers, sibling files and the
standard library.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
from transformers import PreTrainedModel
from transformers.utils import logging as hf_logging

from .backbones import get_family
from .configuration_coma import CoMaConfig
from .constants_coma import (
    COMPRESSION_TOKEN_FORMAT,
    DEFAULT_COMPRESS_INSTRUCTION,
    DEFAULT_DOCUMENT_INSTRUCTION,
    DEFAULT_QUERY_INSTRUCTION,
    compression_token_names,
)
from .masking import check_language_model_attention
from .processing_coma import BackboneProcessorParts, CoMaProcessor

if TYPE_CHECKING:
    from .modeling_coma import CoMaModel

logger = hf_logging.get_logger(__name__)


class CoMaBuildMixin:
    """`from_backbone` and the initialisation of the compression rows; mixed into `CoMaModel`."""

    @classmethod
    # Kept at about 70 lines: 17 are the docstring; the processor it builds takes one keyword per setting.
    def from_backbone(
        cls,
        model_name_or_path_or_model: str | PreTrainedModel,
        processor: Any = None,
        num_compression_tokens: int = 32,
        min_image_tokens: int | None = None,
        max_image_tokens: int | None = None,
        max_length: int | None = None,
        seed: int = 0,
        attn_implementation: str = "sdpa",
        dtype: Any = "auto",
        loss_on: str = "answers",
        compress_instruction: str = DEFAULT_COMPRESS_INSTRUCTION,
        query_instruction: str = DEFAULT_QUERY_INSTRUCTION,
        document_instruction: str = DEFAULT_DOCUMENT_INSTRUCTION,
        compression_token_format: str = COMPRESSION_TOKEN_FORMAT,
        initialize_compression_rows: bool = True,
        **config_kwargs,
    ) -> CoMaModel:
        """A CoMa model around a pretrained MLLM: Hub id, local folder, or a loaded `...ForConditionalGeneration`.

        Adds the K compression tokens `<cmp_0>` … `<cmp_{K-1}>` to the tokenizer, grows the embedding matrix only if
        the new ids do not fit (published Qwen checkpoints carry spare rows, which are never cut), and initialises
        the K rows explicitly (see `init_compression_embeddings`). `processor` (a processor with `tokenizer` and
        `image_processor`) is required when passing a model object; it is loaded from the Hub id or folder otherwise.
        `loss_on` and the compress/query/document instructions go to the processor (see `CoMaProcessor`), the token
        limits and `max_length` too; remaining keyword arguments go to `CoMaConfig` (pooling, attention rule, …).

        `compression_token_format` names the K tokens (the processor saves it). `initialize_compression_rows=False`
        keeps the rows a backbone already trained for tokens its tokenizer already carries (a checkpoint converted
        from the authors' release): nothing is resized or initialised, and ids outside the embedding matrix are an
        error.
        """
        backbone, processor = _load_backbone(model_name_or_path_or_model, processor, attn_implementation, dtype)
        family = get_family(backbone.config.model_type)
        check_language_model_attention(backbone.config.get_text_config()._attn_implementation)
        tokenizer = processor.tokenizer
        real_vocabulary = len(tokenizer)
        new_tokens = compression_token_names(num_compression_tokens, compression_token_format)
        tokenizer.add_special_tokens({"extra_special_tokens": new_tokens}, replace_extra_special_tokens=False)
        token_ids = tokenizer.convert_tokens_to_ids(new_tokens)
        if isinstance(model_name_or_path_or_model, str):
            config_kwargs.setdefault("backbone_name_or_path", model_name_or_path_or_model)
        config = CoMaConfig(
            backbone_config=backbone.config,
            num_compression_tokens=num_compression_tokens,
            compression_token_ids=token_ids,
            # the backbone's own choice; without it the config resets every sub-config to transformers' default
            attn_implementation=backbone.config.get_text_config()._attn_implementation,
            **config_kwargs,
        )
        with torch.device("meta"):  # the backbone's own modules replace these; nothing is allocated twice
            model = cls(config)
        model.model, model.lm_head = backbone.model, backbone.lm_head
        model.apply_vision_attention()  # the backbone's own vision tower
        model.tie_weights()
        model._make_compression_rows(new_tokens, token_ids, real_vocabulary, initialize_compression_rows, seed)
        model.processor = CoMaProcessor(
            image_processor=processor.image_processor,
            tokenizer=tokenizer,
            chat_template=getattr(processor, "chat_template", None) or getattr(tokenizer, "chat_template", None),
            num_compression_tokens=num_compression_tokens,
            compress_instruction=compress_instruction,
            query_instruction=query_instruction,
            document_instruction=document_instruction,
            loss_on=loss_on,
            min_image_tokens=min_image_tokens,
            max_image_tokens=max_image_tokens,
            max_length=max_length,
            compression_token_format=compression_token_format,
        )
        logger.info("Built a CoMa model on a %s backbone with K=%d", family.model_type, num_compression_tokens)
        return model

    def _make_compression_rows(
        self, names: list[str], token_ids: list[int], real_vocabulary: int, initialize: bool, seed: int
    ) -> None:
        """Rows for the compression tokens: the embedding matrix grown only if their ids do not fit, and the rows
        initialised (`init_compression_embeddings`); with `initialize=False` the rows a backbone already trained are
        kept, and ids beyond the matrix are an error. K = 0 (a VLM2Vec-style embedder) adds nothing."""
        rows = self.get_input_embeddings().num_embeddings
        if not initialize:
            outside = [token for token, index in zip(names, token_ids, strict=True) if index >= rows]
            if outside:
                raise ValueError(
                    f"The compression tokens {outside} have ids beyond the embedding matrix's {rows} rows: there "
                    "are no trained rows to keep for them"
                )
            return
        if token_ids and max(token_ids) >= rows:
            self.resize_token_embeddings(max(token_ids) + 1, mean_resizing=False)
        if token_ids:
            self.init_compression_embeddings(token_ids, real_vocabulary, seed=seed)

    @torch.no_grad()
    def init_compression_embeddings(self, token_ids: Sequence[int], reference_rows: int, seed: int = 0) -> None:
        """Initialise the K compression rows: the mean of the first `reference_rows` (real-token) input embeddings
        plus Gaussian noise with their standard deviation, so every row has a typical norm and the K rows differ.
        Untied output rows get the mean output row (they are never prediction targets)."""
        embeddings = self.get_input_embeddings().weight
        reference = embeddings[:reference_rows].float()
        generator = torch.Generator().manual_seed(seed)
        noise = torch.randn(len(token_ids), embeddings.shape[1], generator=generator) * reference.std()
        ids = torch.tensor(list(token_ids), device=embeddings.device)
        embeddings[ids] = (reference.mean(dim=0).cpu() + noise).to(embeddings.device, embeddings.dtype)
        output = self.get_output_embeddings().weight
        if output.data_ptr() != embeddings.data_ptr():
            output[ids] = output[:reference_rows].float().mean(dim=0).to(output.dtype)


def _load_backbone(source: str | PreTrainedModel, processor: Any, attn_implementation: str, dtype: Any):
    """`(backbone, processor parts)`: a loaded `...ForConditionalGeneration` (its processor parts must be given), or
    one loaded from a Hub id or folder (safetensors only) with its tokenizer and image processor."""
    if isinstance(source, PreTrainedModel):
        if processor is None:
            raise ValueError("Pass the backbone's processor (tokenizer + image processor) with a model object.")
        return source, processor
    from transformers import AutoModelForImageTextToText

    backbone = AutoModelForImageTextToText.from_pretrained(
        source,
        attn_implementation=attn_implementation,
        dtype=dtype,
        use_safetensors=True,  # never a pickle
    )
    return backbone, processor or BackboneProcessorParts.from_pretrained(source)
