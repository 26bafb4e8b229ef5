"""CoMaModel: a backbone MLLM read through K compression tokens.

Weight names. `CoMaModel` holds the backbone family's *base* model as `self.model` and an LM head as
`self.lm_head` — the same two attribute names the stock `...ForConditionalGeneration` classes use — so a CoMa
checkpoint's weights are named `model.visual.*`, `model.language_model.*` and `lm_head.weight`, exactly as the
stock class names them. The stock class (and inference servers built on it) load a CoMa checkpoint's backbone
with `config=coma_config.backbone_config`; `tests/test_checkpoint.py` holds us to it.

Part of the remote code shipped with every checkpoint: imports only torch, transformers, Pillow and sibling files.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import DynamicCache, PreTrainedModel
from transformers.utils import ModelOutput
from transformers.utils import logging as hf_logging

from .backbones import cache_argument_name, get_family, language_model, output_cache
from .building_coma import CoMaBuildMixin
from .configuration_coma import CoMaConfig
from .constants_coma import IGNORE_INDEX, MODEL_INPUT_NAMES, BatchKey
from .encoding_coma import CoMaEncodeMixin
from .inputs import CoMaInputError
from .masking import (
    FLEX_ATTENTION,
    additive_mask,
    block_mask,
    build_attention_mask,
    check_language_model_attention,
    compression_span,
)
from .saving import MAX_SHARD_SIZE, save_atomically, save_model_files
from .vision_attention import use_batched_vision_attention, vision_attention_implementation

logger = hf_logging.get_logger(__name__)
NOT_TRAINED_TO_ANSWER = (
    "This checkpoint was last trained by contrastive matching (stage 2, config.training_stage = 2): it was never "
    "trained to answer from its compression states, so its answers show what stage 2 left of stage 1, not what stage "
    "1 taught. Ask the stage-1 checkpoint it was trained from."
)


@dataclass
class CoMaModelOutput(ModelOutput):
    """Output of `CoMaModel.forward`.

    Attributes:
        loss: stage-1 loss (only with `labels`): summed answer-token cross-entropy / label tokens in the global batch.
        pooler_output: `[batch, embedding_size]` pooled, L2-normalised embedding (float32 in any model dtype).
        compression_states: `[batch, K, hidden]` final (post-norm) hidden states of the K compression tokens.
        last_hidden_state: `[batch, length, hidden]` final (post-norm) hidden states of every position under the
            attention rule (only with `output_last_hidden_state=True`: a stage-1 objective that reads them, such as
            the distillation of the training package).
    """

    loss: torch.FloatTensor | None = None
    pooler_output: torch.FloatTensor | None = None
    compression_states: torch.FloatTensor | None = None
    last_hidden_state: torch.FloatTensor | None = None


@dataclass
class CoMaCompression(ModelOutput):
    """What `compress` keeps of an input: everything later tokens may see of it.

    Attributes:
        compression_states: `[batch, K, hidden]` final hidden states of the compression tokens.
        key_values: per layer, `(keys, values)` `[batch, kv_heads, K, head_dim]` of the compression tokens.
        position_offset: `[batch]` rope position of the first token after the compression tokens.
        pooler_output: `[batch, embedding_size]` the embedding read off `compression_states`.
    """

    compression_states: torch.FloatTensor | None = None
    key_values: tuple | None = None
    position_offset: torch.LongTensor | None = None
    pooler_output: torch.FloatTensor | None = None

    def select(self, rows: Sequence[int] | torch.Tensor) -> CoMaCompression:
        """The compressions of `rows`, in that order (repeat a row to ask it several questions)."""
        index = torch.as_tensor(rows, dtype=torch.long, device=self.compression_states.device)
        return CoMaCompression(
            compression_states=self.compression_states[index],
            key_values=tuple((keys[index], values[index]) for keys, values in self.key_values),
            position_offset=self.position_offset[index],
            pooler_output=None if self.pooler_output is None else self.pooler_output[index],
        )


class CoMaModel(CoMaEncodeMixin, CoMaBuildMixin, PreTrainedModel):
    """A multimodal embedding model: backbone MLLM + K compression tokens (CoMa, arXiv 2511.08480).

    * `forward(**batch)` → `CoMaModelOutput`: embeddings (`pooler_output`, `compression_states`); with `labels`,
      the stage-1 loss, computed from logits at label positions only.
    * `compress(**inputs)` / `generate_from_compression(compression, questions)`: answer questions from the K
      compression states alone.
    * `encode_text`, `encode_images`, `encode`, `encode_query`, `encode_document`: normalised embeddings.
    * `CoMaModel.from_backbone(...)`: a CoMa model from a pretrained MLLM (Hub id, folder or model).
    """

    config_class = CoMaConfig
    config: CoMaConfig
    base_model_prefix = "model"
    main_input_name = BatchKey.INPUT_IDS
    input_modalities = ("image", "text")
    supports_gradient_checkpointing = True
    # `_no_split_modules` is set per model in `__init__` (its backbone family's decoder and vision blocks):
    # accelerate's FSDP wrap policy wraps every class named there and stops on one the model lacks.
    _tied_weights_keys = {"lm_head.weight": "model.language_model.embed_tokens.weight"}
    _supports_sdpa = True
    _supports_flash_attn = True  # vision tower only; the language model refuses flash (see masking.py)
    _supports_flex_attn = True  # language model only, the rule as a BlockMask; see `set_attn_implementation`
    _supports_attention_backend = True
    accepts_loss_kwargs = True  # the loss is normalised by Trainer's `num_items_in_batch`

    def __init__(self, config: CoMaConfig):
        super().__init__(config)
        family = get_family(config.backbone_config.model_type)
        _pass_dtype_to_backbone_parts(config)
        self.model = family.base_model_class(config.backbone_config)
        self._no_split_modules = list(family.base_model_class._no_split_modules)
        text_config = config.get_text_config()
        self.lm_head = nn.Linear(text_config.hidden_size, text_config.vocab_size, bias=False)
        self._processor = None  # the `CoMaProcessor`, loaded on first use (`CoMaEncodeMixin.processor`)
        self._flex_language_model = False  # set by `set_attn_implementation("flex_attention")`
        self.post_init()
        self.apply_vision_attention()

    def apply_vision_attention(self) -> str | None:
        """Set the vision tower's attention as `config.vision_attention` asks; returns the implementation in use."""
        if self.config.vision_attention == "auto":
            return use_batched_vision_attention(self.model.visual)
        return vision_attention_implementation(self.model.visual)

    # ---- plumbing ---------------------------------------------------------------------------------------------------
    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.model.set_input_embeddings(value)

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Linear) -> None:
        self.lm_head = value

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        """As transformers', reading weights from safetensors only: a folder or repository that offers just a pickled
        `pytorch_model.bin` is refused (`OSError`) instead of unpickled. `attn_implementation="flex_attention"` is
        routed as `set_attn_implementation` says."""
        if kwargs.get("use_safetensors") is False:
            raise ValueError("CoMa checkpoints load from safetensors only (use_safetensors=False is not supported)")
        kwargs["use_safetensors"] = True
        requested = kwargs.get("attn_implementation")
        if isinstance(requested, dict) and FLEX_ATTENTION in str(requested):
            raise ValueError(
                "Ask for flex attention as attn_implementation='flex_attention' (see set_attn_implementation)"
            )
        if requested != FLEX_ATTENTION:
            return super().from_pretrained(*args, **kwargs)
        model = super().from_pretrained(*args, **{**kwargs, "attn_implementation": "sdpa"})
        model.set_attn_implementation(FLEX_ATTENTION)
        return model

    def set_attn_implementation(self, attn_implementation: str | dict, *args, **kwargs):
        """As transformers', except `"flex_attention"`: the language model runs flex attention under the bottleneck
        rule's `BlockMask` (`masking.block_mask`), everything else sdpa (the vision tower keeps the batched attention
        of `config.vision_attention="auto"`; with `"stock"` it runs sdpa). The stock Qwen-VL classes declare no flex
        support, though their attention layers dispatch on `config._attn_implementation`, so the language model's
        config is set directly. A dict naming flex is refused: its sub-models would refuse it by name."""
        if isinstance(attn_implementation, dict) and FLEX_ATTENTION in str(attn_implementation):
            raise ValueError(
                "Ask for flex attention as attn_implementation='flex_attention': CoMa routes it to the language model "
                "(the stock Qwen-VL sub-models refuse it by name)"
            )
        self._flex_language_model = attn_implementation == FLEX_ATTENTION
        if not self._flex_language_model:
            return super().set_attn_implementation(attn_implementation, *args, **kwargs)
        super().set_attn_implementation("sdpa", *args, **kwargs)
        self.config.get_text_config()._attn_implementation_internal = FLEX_ATTENTION
        self.config._attn_implementation_internal = FLEX_ATTENTION
        return None

    def save_pretrained(self, save_directory, *args, **kwargs):
        """Save weights, config and remote code, the processor (tokenizer, image processor), the
        sentence-transformers files and the run summaries the model came with, atomically
        (`saving.save_atomically`), in safetensors shards of at most `saving.MAX_SHARD_SIZE` (2GB) by default — also
        for Trainer's `checkpoint-N` saves, which call this method."""
        kwargs.setdefault("max_shard_size", MAX_SHARD_SIZE)
        if kwargs.get("push_to_hub"):
            raise ValueError(
                "Save, then upload the folder with the package's `push_to_hub(folder, repo_id)`: saving is atomic and "
                "uploads separately (transformers' own `model.push_to_hub` writes a generic card)."
            )
        if not kwargs.get("is_main_process", True):  # a data-parallel rank that writes nothing
            return super().save_pretrained(save_directory, *args, **kwargs)
        save_weights = super().save_pretrained
        save_atomically(save_directory, lambda staging: save_model_files(self, staging, save_weights, *args, **kwargs))

    # ---- the backbone under the CoMa mask ---------------------------------------------------------------------------
    def _run_backbone(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        image_grid_thw: torch.LongTensor | None = None,
        mm_token_type_ids: torch.Tensor | None = None,
        rule: str | None = None,
        use_cache: bool = False,
    ):
        """Run the backbone with CoMa's attention rule; returns (output, start, end, position_ids)."""
        check_language_model_attention(self.config.get_text_config()._attn_implementation)
        if self.config.compression_token_ids is None:
            raise ValueError("config.compression_token_ids is not set; build models with CoMaModel.from_backbone.")
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if image_grid_thw is not None and len(image_grid_thw) == 0:  # a slice of a batch whose images are elsewhere
            pixel_values = image_grid_thw = None
        if mm_token_type_ids is None:
            mm_token_type_ids = (input_ids == self.config.backbone_config.image_token_id).to(torch.int32)
        start, end = compression_span(input_ids, self.config.compression_token_ids)
        position_ids, _ = self.model.get_rope_index(
            input_ids, mm_token_type_ids, image_grid_thw=image_grid_thw, attention_mask=attention_mask
        )
        rule = rule or self.config.attention_rule
        # a flex model's decoder switches it to sdpa for a while (`_sdpa_for_decoding`): read and run under the lock
        with _FLEX_SWITCH if self._flex_language_model else contextlib.nullcontext():
            flex = self.config.get_text_config()._attn_implementation == FLEX_ATTENTION
            if flex:
                mask = block_mask(attention_mask, start, end, rule)
            else:
                mask = build_attention_mask(attention_mask, start, end, self.dtype, rule)
            with _static_flex_compile(flex, input_ids.device):
                output = self.model(
                    input_ids=input_ids,
                    attention_mask=mask,
                    position_ids=position_ids,
                    pixel_values=pixel_values,
                    image_grid_thw=image_grid_thw,
                    mm_token_type_ids=mm_token_type_ids,
                    use_cache=use_cache,
                )
        return output, start, end, position_ids

    def backbone_hidden_states(self, rule: str | None = None, **inputs) -> torch.Tensor:
        """Final (post-norm) hidden states `[batch, length, hidden]` of every position under the attention rule.

        `rule` overrides `config.attention_rule` (`"bottleneck"`, `"causal"`, or `"blocked"` for tests).
        """
        inputs = _model_inputs(inputs)
        return self._run_backbone(**inputs, rule=rule)[0].last_hidden_state

    def _compression_states(self, hidden: torch.Tensor, start: torch.Tensor, end: torch.Tensor) -> torch.Tensor:
        """`[batch, K, hidden]`: the final states at the compression tokens; with K = 0 (VLM2Vec-style) `[batch, 1,
        hidden]`, the last input token's (inputs are left-padded, so it is every row's last position)."""
        num_tokens = self.config.num_compression_tokens
        if num_tokens == 0:
            return hidden[:, -1:]
        missing = torch.nonzero(end - start != num_tokens).flatten().tolist()
        if missing:
            reason = f"no compression tokens in the input (rows {missing})"
            raise CoMaInputError(reason, missing[0], BatchKey.INPUT_IDS)
        index = start[:, None] + torch.arange(num_tokens, device=hidden.device)
        return hidden.gather(1, index[..., None].expand(-1, -1, hidden.shape[-1]))

    def pool(self, compression_states: torch.Tensor) -> torch.Tensor:
        """`[batch, K, hidden]` → `[batch, embedding_size]` float32: mean (or last) state, truncated, L2-normalised.

        Pooled in float32 whatever the model's dtype: normalised in bfloat16, vectors come out with norms up to 0.3 %
        off 1, and dot products are then no longer cosines."""
        compression_states = compression_states.float()
        if self.config.pooling == "mean":
            pooled = compression_states.mean(dim=1)
        else:
            pooled = compression_states[:, -1]
        if self.config.embedding_dim:
            pooled = pooled[:, : self.config.embedding_dim]
        if self.config.normalize_embeddings:
            pooled = F.normalize(pooled, p=2, dim=-1)
        return pooled

    def forward(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        image_grid_thw: torch.LongTensor | None = None,
        mm_token_type_ids: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        num_items_in_batch: int | torch.Tensor | None = None,
        output_last_hidden_state: bool = False,
        **kwargs,
    ) -> CoMaModelOutput:
        """Embed a batch, and with `labels` compute the stage-1 loss.

        Args:
            input_ids: `[batch, length]` rendered by `CoMaProcessor` (left-padded), K compression tokens per row.
            attention_mask: `[batch, length]` padding mask (1 = token).
            pixel_values / image_grid_thw: the batch's images as the backbone's image processor returns them.
            mm_token_type_ids: `[batch, length]` 1 at image tokens (derived from `input_ids` when absent).
            labels: `[batch, length]` stage-1 targets, `-100` where no loss.
            num_items_in_batch: label tokens in the *global* batch (Trainer passes it); the loss is the summed
                token cross-entropy divided by it, so accumulation and several processes give the same loss.
            output_last_hidden_state: also return `last_hidden_state` `[batch, length, hidden]`.
        """
        output, start, end, _ = self._run_backbone(
            input_ids, attention_mask, pixel_values, image_grid_thw, mm_token_type_ids
        )
        hidden = output.last_hidden_state
        compression_states = self._compression_states(hidden, start, end)
        loss = None if labels is None else self._answer_loss(hidden, labels, num_items_in_batch)
        return CoMaModelOutput(
            loss=loss,
            pooler_output=self.pool(compression_states),
            compression_states=compression_states,
            last_hidden_state=hidden if output_last_hidden_state else None,
        )

    def _answer_loss(
        self, hidden: torch.Tensor, labels: torch.LongTensor, num_items_in_batch: int | torch.Tensor | None
    ) -> torch.Tensor:
        """Next-token cross-entropy at label positions only (the LM head never sees the rest of the sequence)."""
        targets = labels[:, 1:]
        positions = targets != IGNORE_INDEX
        logits = self.lm_head(hidden[:, :-1][positions]).float()
        total = F.cross_entropy(logits, targets[positions], reduction="sum")
        count = num_items_in_batch if num_items_in_batch is not None else positions.sum()
        return total / torch.as_tensor(count, device=total.device, dtype=total.dtype).clamp(min=1)

    # ---- answering from the compression states ----------------------------------------------------------------------
    @torch.no_grad()
    def compress(self, **inputs) -> CoMaCompression:
        """Run inputs rendered in the stage-2 layout (ending with the K compression tokens) and keep only what the
        compression tokens hold: their final states, their cached keys/values and the rope offset after them."""
        if self.config.num_compression_tokens == 0:
            raise ValueError("A model without compression tokens (K = 0) has no compressed states to answer from")
        inputs = _model_inputs(inputs)
        output, start, end, position_ids = self._run_backbone(**inputs, use_cache=True)
        length = inputs[BatchKey.INPUT_IDS].shape[1]
        if not bool((end == length).all()):
            raise ValueError("compress() expects inputs that end with the compression tokens (the stage-2 layout)")
        num_tokens = self.config.num_compression_tokens
        cache = output_cache(output)
        key_values = tuple(
            (layer.keys[:, :, -num_tokens:].clone(), layer.values[:, :, -num_tokens:].clone())
            for layer in cache.layers
        )
        states = output.last_hidden_state[:, -num_tokens:]
        return CoMaCompression(
            compression_states=states,
            key_values=key_values,
            position_offset=position_ids[0, :, -1] + 1,
            pooler_output=self.pool(states),
        )

    @torch.no_grad()
    def generate_from_compression(
        self,
        compression: CoMaCompression,
        questions: Sequence[str],
        max_new_tokens: int = 32,
        processor: Any = None,
        return_token_ids: bool = False,
    ) -> list[str] | torch.LongTensor:
        """Greedily answer one question per compressed input, seeing the input only through its K compression tokens.

        Returns the answers as strings (up to `<|im_end|>`), or with `return_token_ids` the generated ids
        `[batch, steps]` (rows that finished early are filled with `<|im_end|>`).
        Hand-written rather than `generate`: the cache holds only the K compression positions, at the input's rope
        offset, which `GenerationMixin` cannot express.
        """
        if getattr(self.config, "training_stage", None) == 2:  # a config class shipped before the field has none
            logger.warning_once(NOT_TRAINED_TO_ANSWER)
        processor = processor or self.processor
        batch = compression.compression_states.shape[0]
        if len(questions) != batch:
            raise ValueError(f"got {len(questions)} questions for {batch} compressed inputs")
        device = compression.compression_states.device
        prompt = processor.process_questions(questions).to(device)
        token_ids, key_valid = prompt[BatchKey.INPUT_IDS], prompt[BatchKey.ATTENTION_MASK].bool()
        num_tokens = self.config.num_compression_tokens
        key_valid = torch.cat([torch.ones(batch, num_tokens, dtype=torch.bool, device=device), key_valid], dim=1)
        offsets_in_prompt = (prompt[BatchKey.ATTENTION_MASK].cumsum(dim=1) - 1).clamp(min=0)
        positions = compression.position_offset[:, None] + offsets_in_prompt

        cache = DynamicCache()
        for layer_index, (keys, values) in enumerate(compression.key_values):
            cache.update(keys.clone(), values.clone(), layer_index)
        end_id = processor.tokenizer.convert_tokens_to_ids("<|im_end|>")
        with _sdpa_for_decoding(self.config.get_text_config()):
            generated = _greedy_decode(self, cache, token_ids, positions, key_valid, max_new_tokens, end_id)
        if return_token_ids:
            return generated
        return [_decode_until(processor, row.tolist(), end_id) for row in generated]


def _greedy_decode(
    model: CoMaModel,
    cache: DynamicCache,
    token_ids: torch.LongTensor,
    positions: torch.Tensor,
    key_valid: torch.Tensor,
    max_new_tokens: int,
    end_id: int,
) -> torch.LongTensor:
    """`[batch, steps]` ids `model` generates greedily from `token_ids` (the question prompts) over `cache` (the K
    compression positions); `key_valid` marks the cache's and prompts' real keys; finished rows get `end_id`."""
    batch, device = token_ids.shape[0], token_ids.device
    decoder = language_model(model.model)
    cache_name = cache_argument_name(decoder)
    generated = torch.empty(batch, 0, dtype=torch.long, device=device)
    finished = torch.zeros(batch, dtype=torch.bool, device=device)
    for _ in range(max_new_tokens):
        mask = additive_mask(_decoding_allowed(key_valid, token_ids.shape[1]), model.dtype)
        output = decoder(
            inputs_embeds=model.get_input_embeddings()(token_ids),
            attention_mask=mask,
            position_ids=positions[None].expand(3, -1, -1),
            use_cache=True,
            **{cache_name: cache},
        )
        next_ids = model.lm_head(output.last_hidden_state[:, -1]).argmax(dim=-1)
        next_ids = torch.where(finished, torch.full_like(next_ids, end_id), next_ids)
        generated = torch.cat([generated, next_ids[:, None]], dim=1)
        finished |= next_ids == end_id
        if bool(finished.all()):
            break
        token_ids = next_ids[:, None]
        positions = positions[:, -1:] + 1
        key_valid = torch.cat([key_valid, torch.ones(batch, 1, dtype=torch.bool, device=device)], dim=1)
    return generated


# Held while a forward reads the language model's attention implementation and while the decoder switches it, so a
# forward on another thread never builds a flex mask for layers the decoder has set to sdpa.
_FLEX_SWITCH = threading.RLock()


@contextlib.contextmanager
def _sdpa_for_decoding(text_config) -> Iterator[None]:
    """The language model on sdpa while the hand-written decoder runs, when it is on flex attention: the decoder's
    mask is dense and tiny (new tokens × the cache), which flex would compile anew for every step's shape."""
    with _FLEX_SWITCH:
        implementation = text_config._attn_implementation
        if implementation == FLEX_ATTENTION:
            text_config._attn_implementation_internal = "sdpa"
        try:
            yield
        finally:
            text_config._attn_implementation_internal = implementation


def _static_flex_compile(flex: bool, device: torch.device) -> contextlib.AbstractContextManager:
    """On the CPU, flex attention compiled for each shape as it comes: torch 2.13's inductor fails to build the CPU
    flex kernel for dynamic shapes (what a second shape recompiles to by default), a C++ compile error."""
    if flex and device.type == "cpu":
        return torch._dynamo.config.patch(automatic_dynamic_shapes=False)
    return contextlib.nullcontext()


def _pass_dtype_to_backbone_parts(config: CoMaConfig) -> None:
    """Give the backbone's own sub-configs (text, vision) the dtype on the CoMa config, when one is set.

    `from_pretrained(dtype=...)` puts the dtype on a config and its direct sub-configs only (here `backbone_config`),
    but the backbone's base model builds its text and vision models from *their* configs' dtype, which a saved backbone
    may record (the shipped reader's say float32, Qwen3-VL-2B's text config bfloat16): without this,
    `from_pretrained(path, dtype=torch.bfloat16)` silently loads the reader's parts in float32.
    """
    if config.dtype is None:
        return
    backbone = config.backbone_config
    for name in backbone.sub_configs:
        if getattr(backbone, name, None) is not None:
            getattr(backbone, name).dtype = config.dtype


def _decoding_allowed(key_valid: torch.Tensor, num_queries: int) -> torch.Tensor:
    """`[batch, queries, keys]`: the last `num_queries` keys are the queries themselves (causal), padding never
    seen."""
    num_keys = key_valid.shape[1]
    query_positions = torch.arange(num_keys - num_queries, num_keys, device=key_valid.device)
    key_positions = torch.arange(num_keys, device=key_valid.device)
    allowed = (key_positions[None, :] <= query_positions[:, None])[None] & key_valid[:, None, :]
    is_padding_query = ~key_valid[:, num_keys - num_queries :]
    diagonal = key_positions[None, :] == query_positions[:, None]
    return allowed | (diagonal[None] & is_padding_query[:, :, None])


def _decode_until(processor: Any, token_ids: list[int], end_id: int) -> str:
    if end_id in token_ids:
        token_ids = token_ids[: token_ids.index(end_id)]
    return processor.tokenizer.decode(token_ids, skip_special_tokens=True).strip()


def _model_inputs(inputs: dict) -> dict:
    """Keep the keys the backbone run takes (a processor batch may carry labels)."""
    return {name: inputs[name] for name in MODEL_INPUT_NAMES if inputs.get(name) is not None}
