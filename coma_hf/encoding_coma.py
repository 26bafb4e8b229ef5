"""The encode API of a CoMa model and the processor it renders with: the one seam where model and processor meet.
`CoMaModel` composes `CoMaEncodeMixin`; `modeling_coma.py` itself imports no processor module (only these mixins do).

Part of the remote code shipped with every checkpoint: imports only torch, transformers, Pillow, sibling files and
the standard library.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from PIL import Image
from transformers.utils import logging as hf_logging

from .inputs import CoMaInputError
from .processing_coma import CoMaProcessor, processor_method


class CoMaEncodeMixin:
    """`processor` (the checkpoint's own `CoMaProcessor`, loaded on first use) and the encode API: `encode`,
    `encode_text`, `encode_images`, `encode_query`, `encode_document`, each returning unit-norm float32 embeddings
    `[N, embedding_size]` on the CPU. Mixed into `CoMaModel` (a `PreTrainedModel` with `config`, `_processor` and a
    forward that returns `pooler_output`)."""

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
        process = processor_method(self.processor, "process_embedding_inputs")
        starts = range(0, len(inputs), batch_size)
        for start in hf_logging.tqdm(starts, desc="Encoding", disable=not show_progress_bar, unit="batch"):
            batch = process(inputs[start : start + batch_size], instruction, offset=start)
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
