"""CoMaModel: a backbone MLLM read through K compression tokens.

Weight names. `CoMaModel` holds the backbone family's *base* model as `self.model` and an LM head as
`self.lm_head` — the same two attribute names the stock `...ForConditionalGeneration` classes use — so a CoMa
checkpoint's weights are named `model.visual.*`, `model.language_model.*` and `lm_head.weight`, exactly as the
stock class names them. The stock class (and inference servers built on it) load a CoMa checkpoint's backbone
with `config=coma_config.backbone_config`; `tests/test_checkpoint.py` holds us to it.

Part of the remote code shipped with every checkpoint: imports only torch, transformers, Pillow and sibling files.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from transformers import DynamicCache, PreTrainedModel
from transformers.utils import ModelOutput
from transformers.utils import logging as hf_logging

from .backbones import cache_argument_name, get_family, language_model, output_cache
from .configuration_coma import CoMaConfig
from .inputs import CoMaInputError
from .masking import additive_mask, build_attention_mask, check_language_model_attention, compression_span
from .processing_coma import (
    COMPRESSION_TOKEN_FORMAT,
    DEFAULT_COMPRESS_INSTRUCTION,
    DEFAULT_DOCUMENT_INSTRUCTION,
    DEFAULT_QUERY_INSTRUCTION,
    IGNORE_INDEX,
    MODEL_INPUT_NAMES,
    BackboneProcessorParts,
    BatchKey,
    CoMaProcessor,
    compression_token_names,
)
from .saving import MAX_SHARD_SIZE, carry_files, save_atomically
from .sentence_transformers_files import write_sentence_transformers_files
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


class CoMaModel(PreTrainedModel):
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
    _supports_flex_attn = False  # the compression rule is a dense float mask, which flex attention cannot take
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
        self._processor: CoMaProcessor | None = None
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

    @property
    def processor(self) -> CoMaProcessor:
        """The checkpoint's own processor, loaded from where the model came from on first use."""
        if self._processor is None:
            if not self.name_or_path:
                raise ValueError("This model has no processor; set `model.processor = CoMaProcessor(...)`.")
            # the code being trusted is this checkpoint's own, already trusted to load the model
            self.processor = CoMaProcessor.from_pretrained(self.name_or_path, trust_remote_code=True)
        return self._processor

    @processor.setter
    def processor(self, processor: CoMaProcessor) -> None:
        """Attach `processor`, which must render the compression tokens this model was built with (K is stored by
        both: its ids in `config.compression_token_ids`, its token names in the processor's config).

        A checkpoint saved before the processor owned the token layout (version 0.1.0) holds `query_instruction`,
        `document_instruction` and `loss_on` in its `config.json`; those values were in effect then, so they replace
        the processor's (its `compress_instruction` was the processor's already, and stays).
        """
        expected = self.config.compression_token_ids
        if expected is not None and list(processor.compression_token_ids) != list(expected):
            raise ValueError(
                f"The processor's compression tokens {processor.compression_tokens} have ids "
                f"{processor.compression_token_ids}, but this model was built for ids {expected} (K="
                f"{self.config.num_compression_tokens}): use the processor saved with the model."
            )
        legacy = self.config.legacy_processor_settings()
        legacy.pop("compress_instruction", None)
        for key, value in legacy.items():
            setattr(processor, key, value)
        self._processor = processor

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        """As transformers', reading weights from safetensors only: a folder or repository that offers just a pickled
        `pytorch_model.bin` is refused (`OSError`) instead of unpickled."""
        if kwargs.get("use_safetensors") is False:
            raise ValueError("CoMa checkpoints load from safetensors only (use_safetensors=False is not supported)")
        kwargs["use_safetensors"] = True
        return super().from_pretrained(*args, **kwargs)

    def save_pretrained(self, save_directory, *args, **kwargs):
        """Save weights, config and remote code, the processor (tokenizer, image processor), the
        sentence-transformers files and the model card beside them.

        Atomic: everything is written to a temporary folder beside `save_directory` first. A new folder is then one
        rename; an existing one (a Trainer output folder with checkpoints, an older save) first loses its
        `config.json`, then receives the new files with `config.json` last — so a save cut short at any point leaves
        either the previous model, or a folder without `config.json` that refuses to load, never a mix.

        Weights go into safetensors shards of at most `max_shard_size`, by default `saving.MAX_SHARD_SIZE` (2GB, not
        transformers' 50GB) — also for Trainer's `checkpoint-N` saves, which call this method.
        """
        kwargs.setdefault("max_shard_size", MAX_SHARD_SIZE)
        if kwargs.get("push_to_hub"):
            raise ValueError(
                "Save, then upload the folder with the package's `push_to_hub(folder, repo_id)`: saving is atomic and "
                "uploads separately (transformers' own `model.push_to_hub` writes a generic card)."
            )
        if not kwargs.get("is_main_process", True):  # a data-parallel rank that writes nothing
            return super().save_pretrained(save_directory, *args, **kwargs)
        save_atomically(save_directory, lambda staging: self._save_files(staging, *args, **kwargs))

    def _save_files(self, save_directory: str, *args, **kwargs) -> None:
        super().save_pretrained(save_directory, *args, **kwargs)
        carry_files(self.name_or_path, save_directory)
        if self._processor is None and self.name_or_path:
            try:
                self.processor  # noqa: B018 - loads the processor the model came with
            except (OSError, ValueError) as error:
                logger.warning(
                    "Saved without a processor: none could be loaded from %s (%s)", self.name_or_path, error
                )
        if self._processor is not None:
            self._processor.save_pretrained(save_directory)
            query, document = self._processor.query_instruction, self._processor.document_instruction
        else:  # the instructions an old config holds, or the defaults
            legacy = self.config.legacy_processor_settings()
            query = legacy.get("query_instruction", DEFAULT_QUERY_INSTRUCTION)
            document = legacy.get("document_instruction", DEFAULT_DOCUMENT_INSTRUCTION)
        write_sentence_transformers_files(save_directory, query, document)

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
        mask = build_attention_mask(attention_mask, start, end, self.dtype, rule or self.config.attention_rule)
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
        processor: CoMaProcessor | None = None,
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
        decoder = language_model(self.model)
        cache_name = cache_argument_name(decoder)
        end_id = processor.tokenizer.convert_tokens_to_ids("<|im_end|>")
        generated = torch.empty(batch, 0, dtype=torch.long, device=device)
        finished = torch.zeros(batch, dtype=torch.bool, device=device)
        for _ in range(max_new_tokens):
            mask = additive_mask(_decoding_allowed(key_valid, token_ids.shape[1]), self.dtype)
            output = decoder(
                inputs_embeds=self.get_input_embeddings()(token_ids),
                attention_mask=mask,
                position_ids=positions[None].expand(3, -1, -1),
                use_cache=True,
                **{cache_name: cache},
            )
            next_ids = self.lm_head(output.last_hidden_state[:, -1]).argmax(dim=-1)
            next_ids = torch.where(finished, torch.full_like(next_ids, end_id), next_ids)
            generated = torch.cat([generated, next_ids[:, None]], dim=1)
            finished |= next_ids == end_id
            if bool(finished.all()):
                break
            token_ids = next_ids[:, None]
            positions = positions[:, -1:] + 1
            key_valid = torch.cat([key_valid, torch.ones(batch, 1, dtype=torch.bool, device=device)], dim=1)
        if return_token_ids:
            return generated
        return [_decode_until(processor, row.tolist(), end_id) for row in generated]

    # ---- encode API -------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def encode(
        self,
        inputs: Sequence[Any],
        instruction: str | None = None,
        batch_size: int = 16,
        device: str | torch.device | None = None,
        show_progress_bar: bool | None = None,
    ) -> torch.Tensor:
        """Embed a mixed list, keeping its order; returns `[N, embedding_size]` unit-norm float32 on the CPU.

        Each input is a text (`str`), a PIL image, or `{"image": …, "text": …}` (`image` a PIL image or a path).
        A bare string is always text here: only the dict form makes a string an image.
        `instruction` goes in the instruction slot of every input that has no `"instruction"` of its own.
        """
        inputs = list(inputs)
        device = torch.device(device) if device is not None else self.device
        if device != self.device:
            self.to(device)
        was_training = self.training
        self.eval()
        if show_progress_bar is None:
            show_progress_bar = len(inputs) > 4 * batch_size
        chunks = []
        starts = range(0, len(inputs), batch_size)
        for start in hf_logging.tqdm(starts, desc="Encoding", disable=not show_progress_bar, unit="batch"):
            batch = self.processor.process_for_embedding(inputs[start : start + batch_size], instruction, offset=start)
            chunks.append(self(**batch.to(device)).pooler_output.float().cpu())
        self.train(was_training)
        if not chunks:
            return torch.empty(0, self.config.embedding_size)
        return torch.cat(chunks)

    def encode_text(self, texts: str | Sequence[str], instruction: str | None = None, **kwargs) -> torch.Tensor:
        """Embed texts (`[N, embedding_size]`)."""
        texts = [texts] if isinstance(texts, str) else list(texts)
        for index, text in enumerate(texts):
            if not isinstance(text, str):
                raise CoMaInputError(f"expected a string, got {type(text).__name__}", index, "text")
        return self.encode(texts, instruction=instruction, **kwargs)

    def encode_images(self, images: Any, instruction: str | None = None, **kwargs) -> torch.Tensor:
        """Embed images (`[N, embedding_size]`): PIL images, or strings that are image paths."""
        if isinstance(images, (str, Image.Image)):
            images = [images]
        return self.encode([{"image": image} for image in images], instruction=instruction, **kwargs)

    def encode_query(self, inputs: Sequence[Any], **kwargs) -> torch.Tensor:
        """`encode` with the processor's query instruction (`processor.query_instruction`)."""
        return self.encode(inputs, instruction=self.processor.query_instruction, **kwargs)

    def encode_document(self, inputs: Sequence[Any], **kwargs) -> torch.Tensor:
        """`encode` with the processor's document instruction (`processor.document_instruction`)."""
        return self.encode(inputs, instruction=self.processor.document_instruction, **kwargs)

    # ---- construction -----------------------------------------------------------------------------------------------
    @classmethod
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
        if isinstance(model_name_or_path_or_model, PreTrainedModel):
            backbone = model_name_or_path_or_model
            if processor is None:
                raise ValueError("Pass the backbone's processor (tokenizer + image processor) with a model object.")
        else:
            from transformers import AutoModelForImageTextToText

            source = model_name_or_path_or_model
            backbone = AutoModelForImageTextToText.from_pretrained(
                source,
                attn_implementation=attn_implementation,
                dtype=dtype,
                use_safetensors=True,  # never a pickle
            )
            processor = processor or BackboneProcessorParts.from_pretrained(source)
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
        rows = model.get_input_embeddings().num_embeddings
        if not initialize_compression_rows:
            outside = [token for token, index in zip(new_tokens, token_ids, strict=True) if index >= rows]
            if outside:
                raise ValueError(
                    f"The compression tokens {outside} have ids beyond the embedding matrix's {rows} rows: there "
                    "are no trained rows to keep for them"
                )
        elif token_ids and max(token_ids) >= rows:
            model.resize_token_embeddings(max(token_ids) + 1, mean_resizing=False)
        if token_ids and initialize_compression_rows:  # K = 0: a VLM2Vec-style embedder, nothing to add
            model.init_compression_embeddings(token_ids, real_vocabulary, seed=seed)
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


def _decode_until(processor: CoMaProcessor, token_ids: list[int], end_id: int) -> str:
    if end_id in token_ids:
        token_ids = token_ids[: token_ids.index(end_id)]
    return processor.tokenizer.decode(token_ids, skip_special_tokens=True).strip()


def _model_inputs(inputs: dict) -> dict:
    """Keep the keys the backbone run takes (a processor batch may carry labels)."""
    return {name: inputs[name] for name in MODEL_INPUT_NAMES if inputs.get(name) is not None}
