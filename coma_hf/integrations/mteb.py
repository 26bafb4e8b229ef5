"""A CoMa checkpoint as an MTEB / MIEB model: an `AbsEncoder` that embeds mteb's batches with `CoMaModel.encode`.

    import mteb
    from coma_hf.integrations import mteb as coma_mteb
    from coma_hf.integrations.mteb_tasks import mmeb_tasks

    results = mteb.evaluate(coma_mteb.load("path-or-hub-id"), mmeb_tasks("outputs/mini_mmeb/test"), cache=None)

Each row of a batch (image, text, or both) becomes one `encode` input, so an image and its text are embedded
together as CoMa trains them. The instruction is mteb's (`AbsEncoder.get_instruction`: the task's prompt, the
model's `prompts_dict`, or the task type's default) in CoMa's instruction slot, not glued to the text. A document
without a document prompt of its own gets the processor's `document_instruction`, as `encode_document` does. A task
read from an MMEB-format folder (`coma_hf.integrations.mteb_tasks`) gets none: an MMEB row carries its instruction in
its text already.

Needs the `[mteb]` extra (mteb ≥ 2.26, Python ≥ 3.11).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from mteb.models.abs_encoder import AbsEncoder
from mteb.models.model_meta import ModelMeta, ScoringFunction
from mteb.types import PromptType
from transformers import AutoModel
from transformers.utils import logging as hf_logging

from ..hub.card import HUB_ID
from ..training.building import weights_fingerprint
from .mteb_tasks import MMEB_FOLDER

MODALITIES = ["image", "text"]  # mteb refuses image tasks to a model without "image"
LOCAL_ORGANIZATION = "local"  # mteb names a model "organization/name"; a folder becomes "local/{folder name}"


def load(name_or_path: str | os.PathLike, revision: str | None = None, **kwargs: Any) -> CoMaEncoder:
    """The CoMa checkpoint at `name_or_path` (a folder, or a Hub id: the one place this downloads) as an mteb model;
    `kwargs` go to `CoMaEncoder`."""
    return CoMaEncoder(name_or_path, revision=revision, **kwargs)


class CoMaEncoder(AbsEncoder):
    """mteb's encoder protocol over a `CoMaModel`: `encode(inputs, *, task_metadata, hf_split, hf_subset,
    prompt_type)` returns unit-norm float32 `[N, embedding_size]`; similarity is cosine (`mteb_model_meta`).

    Args:
        model: a loaded `CoMaModel`, or where to load one from (a folder or a Hub id).
        revision: the Hub revision to load; recorded in the meta (a folder's revision is its weights' sha256).
        name: the meta's `"organization/name"`; defaults to the Hub id, or `local/{folder name}`.
        batch_size: inputs per forward pass (mteb's `encode_kwargs["batch_size"]` sizes the batches it hands over).
        device: where to run; defaults to the model's device.
    """

    def __init__(
        self,
        model: Any,
        revision: str | None = None,
        name: str | None = None,
        batch_size: int = 16,
        device: str | torch.device | None = None,
        **model_kwargs: Any,
    ) -> None:
        if isinstance(model, (str, os.PathLike)):
            model = AutoModel.from_pretrained(str(model), revision=revision, trust_remote_code=True, **model_kwargs)
        self.model = model.eval()
        self.batch_size = batch_size
        self.device = device
        self.mteb_model_meta = model_meta(model, name=name, revision=revision)

    def encode(
        self,
        inputs,
        *,
        task_metadata,
        hf_split: str,
        hf_subset: str,
        prompt_type: PromptType | None = None,
        **kwargs: Any,
    ) -> np.ndarray:
        """Embed mteb's batches (`{"image": [PIL…], "text": [str…]}`, either key optional) in order."""
        instruction = self.instruction(task_metadata, prompt_type)
        show = kwargs.get("show_progress_bar", True)
        chunks = [
            self.model.encode(
                batch_inputs(batch),
                instruction=instruction,
                batch_size=self.batch_size,
                device=self.device,
                show_progress_bar=False,
            )
            for batch in hf_logging.tqdm(inputs, desc=f"Encoding {task_metadata.name}", disable=not show)
        ]
        if not chunks:
            return np.empty((0, self.model.config.embedding_size), dtype=np.float32)
        return torch.cat(chunks).numpy()

    def instruction(self, task_metadata, prompt_type: PromptType | None) -> str | None:
        """CoMa's instruction for this side of this task: none for MMEB rows (they carry their own); the processor's
        `document_instruction` for documents of a task without a document prompt of its own (a task prompt, or a
        `{"query": …}` dict, describes the query side); else mteb's (`get_instruction`), none when that is empty or
        not a string (a prompt dict read without a side)."""
        if task_metadata.dataset.get("path") == MMEB_FOLDER:
            return None
        prompt = task_metadata.prompt
        if prompt_type == PromptType.document and not (isinstance(prompt, dict) and prompt.get("document")):
            return self.model.processor.document_instruction
        instruction = self.get_instruction(task_metadata, prompt_type)
        return instruction if isinstance(instruction, str) and instruction else None


def from_sentence_transformer(model: Any, name: str | None = None) -> AbsEncoder:
    """mteb's own wrapper for a `SentenceTransformer` (of a CoMa checkpoint, or any), with the modalities the model
    declares: mteb reads them from `sentence_bert_config.json` for a Hub id, but from a loaded model only text.
    Its prompts (`query` / `document`, the processor's instructions) apply to every task, MMEB rows included."""
    from mteb.models import SentenceTransformerEncoderWrapper

    wrapper = SentenceTransformerEncoderWrapper(model)
    modalities = [modality for modality in MODALITIES if modality in getattr(model, "modalities", ["text"])]
    update = {"modalities": modalities, **({"name": name} if name else {})}
    wrapper.mteb_model_meta = wrapper.mteb_model_meta.model_copy(update=update)
    return wrapper


def batch_inputs(batch: dict[str, list]) -> list[dict]:
    """mteb's column batch as `CoMaModel.encode` inputs, one dict per row; an empty text or a missing image is
    left out, so a row is an image, a text, or both."""
    columns = [value for key, value in batch.items() if key in ("image", "text")]
    if not columns:
        raise ValueError(f"an mteb batch without image or text (keys: {sorted(batch)}): CoMa embeds images and texts")
    size = len(columns[0])
    rows = []
    for index in range(size):
        row = {}
        image = batch.get("image", [None] * size)[index]
        text = batch.get("text", [None] * size)[index]
        if image is not None:
            row["image"] = image
        if text:
            row["text"] = text
        rows.append(row)
    return rows


def model_meta(model: Any, name: str | None = None, revision: str | None = None) -> ModelMeta:
    """mteb's `ModelMeta` for a `CoMaModel`: image and text, cosine, instructions, the embedding size, and in
    `experiment_kwargs` what defines a CoMa embedding (K, pooling, attention rule)."""
    config = model.config
    source = str(model.name_or_path or "")
    hub_id = source if HUB_ID.match(source) and not Path(source).exists() else None
    if name is None:
        name = hub_id or f"{LOCAL_ORGANIZATION}/{Path(source).name or 'coma'}"
    if revision is None:
        revision = getattr(config, "_commit_hash", None) if hub_id else None
    return ModelMeta.create_empty(
        overwrites={
            "name": name,
            "revision": revision or weights_fingerprint(model)[:16],
            "loader": CoMaEncoder,
            "modalities": MODALITIES,
            "embed_dim": config.embedding_size,
            "similarity_fn_name": ScoringFunction.COSINE,
            "use_instructions": True,
            "n_parameters": sum(parameter.numel() for parameter in model.parameters()),
            "max_tokens": model.processor.max_length,
            "framework": ["PyTorch"],
            "reference": f"https://huggingface.co/{hub_id}" if hub_id else None,
            "experiment_kwargs": {
                "num_compression_tokens": config.num_compression_tokens,
                "pooling": config.pooling,
                "attention_rule": config.attention_rule,
            },
        }
    )
