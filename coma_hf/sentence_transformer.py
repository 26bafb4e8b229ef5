"""A CoMa checkpoint as a `SentenceTransformer`, whether or not the folder carries the sentence-transformers files.

Checkpoints saved by `CoMaModel.save_pretrained` carry them, so `SentenceTransformer(path, trust_remote_code=True)`
is all a user needs; `load_sentence_transformer` also takes older folders and builds the same module in memory.
"""

from __future__ import annotations

from pathlib import Path

from .sentence_transformers_files import prompts, transformer_module_config


def load_sentence_transformer(name_or_path: str, device: str | None = None, **model_kwargs):
    """`SentenceTransformer` over a CoMa checkpoint (folder or Hub id): sentence-transformers' own `Transformer`
    module calling `CoMaModel.forward`, prompts `query` / `document` from the config's instructions."""
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.base.modules import Transformer

    if (Path(name_or_path) / "modules.json").is_file():
        return SentenceTransformer(name_or_path, device=device, trust_remote_code=True, model_kwargs=model_kwargs)
    remote = {"trust_remote_code": True}
    module = Transformer(
        name_or_path,
        model_kwargs={**remote, **model_kwargs},
        processor_kwargs=remote,
        config_kwargs=remote,
        **transformer_module_config(),
    )
    config = module.model.config
    return SentenceTransformer(
        modules=[module],
        device=device,
        prompts=prompts(config.query_instruction, config.document_instruction),
        similarity_fn_name="cosine",
    )
