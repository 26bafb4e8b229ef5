"""CoMa checkpoints in sentence-transformers: single-vector (`SentenceTransformer`) and multi-vector
(`MultiVectorEncoder`, late interaction over the K compression states).

Checkpoints saved by `CoMaModel.save_pretrained` carry the sentence-transformers files, so
`SentenceTransformer(path, trust_remote_code=True)` is all a single-vector user needs; `load_sentence_transformer`
also takes older folders. `load_multi_vector_encoder` reads the same checkpoint as K vectors per input, scored with
sentence-transformers' MaxSim and trainable with its multi-vector losses.
"""

from __future__ import annotations

from pathlib import Path

import torch
from sentence_transformers.base.modules import Module, Normalize

from .sentence_transformers_files import prompts, transformer_module_config

REMOTE = {"trust_remote_code": True}


def load_sentence_transformer(name_or_path: str, device: str | None = None, **model_kwargs):
    """`SentenceTransformer` over a CoMa checkpoint (folder or Hub id): sentence-transformers' own `Transformer`
    module calling `CoMaModel.forward`, prompts `query` / `document` from the processor's instructions."""
    from sentence_transformers import SentenceTransformer

    if (Path(name_or_path) / "modules.json").is_file():
        return SentenceTransformer(name_or_path, device=device, trust_remote_code=True, model_kwargs=model_kwargs)
    module = _transformer(name_or_path, model_kwargs)
    layout = module.model.processor  # the checkpoint's own (an old checkpoint's config.json instructions applied)
    return SentenceTransformer(
        modules=[module],
        device=device,
        prompts=prompts(layout.query_instruction, layout.document_instruction),
        similarity_fn_name="cosine",
    )


class CompressionStatesMask(Module):
    """Marks all K compression states of every input as scored vectors.

    The `Transformer` module leaves the input's `[batch, length]` attention mask in the features, while its
    `token_embeddings` are the `[batch, K, hidden]` compression states; this replaces the mask with `[batch, K]`
    ones so that sentence-transformers' multi-vector encode and losses slice and score the K states.
    """

    def forward(self, features: dict, **kwargs) -> dict:
        states = features["token_embeddings"]
        features["attention_mask"] = torch.ones(states.shape[:2], dtype=torch.long, device=states.device)
        return features

    def save(self, output_path: str, *args, **kwargs) -> None:
        self.save_config(output_path)


def load_multi_vector_encoder(name_or_path: str, device: str | None = None, **model_kwargs):
    """`MultiVectorEncoder` over a CoMa checkpoint: each input becomes its K final compression states (unit-norm),
    and query–document scores are MaxSim (for each query state, the best-matching document state, summed)."""
    from sentence_transformers.multi_vector_encoder import MultiVectorEncoder

    config = {
        **transformer_module_config(),
        "modality_config": {
            name: {**params, "method_output_name": "compression_states"}
            for name, params in transformer_module_config()["modality_config"].items()
        },
        "module_output_name": "token_embeddings",
    }
    module = _transformer(name_or_path, model_kwargs, **config)
    layout = module.model.processor
    return MultiVectorEncoder(
        modules=[module, CompressionStatesMask(), Normalize(module_input_name="token_embeddings")],
        device=device,
        prompts=prompts(layout.query_instruction, layout.document_instruction),
    )


def _transformer(name_or_path: str, model_kwargs: dict, **config):
    from sentence_transformers.base.modules import Transformer

    return Transformer(
        name_or_path,
        model_kwargs={**REMOTE, **model_kwargs},
        processor_kwargs=REMOTE,
        config_kwargs=REMOTE,
        **(config or transformer_module_config()),
    )
