"""The sentence-transformers files of a CoMa checkpoint, so that `SentenceTransformer(path, trust_remote_code=True)`
loads it with sentence-transformers' own `Transformer` module and no module of ours.

The module sends every input through the "message" path (a prompt becomes a system message, which
`CoMaProcessor.apply_chat_template` puts in CoMa's instruction slot), calls `CoMaModel.forward` and reads its
`pooler_output` (already pooled and L2-normalised) as `sentence_embedding`. The prompts `query` and `document` are the
config's instructions, so `st.encode(x, prompt_name="query")` equals `model.encode_query(x)`.

Written as plain JSON (not by instantiating sentence-transformers) because `save_pretrained` is remote code and must
not need sentence-transformers installed. Part of the remote code: imports only the standard library.
"""

from __future__ import annotations

import json
import os
from importlib.metadata import PackageNotFoundError, version

TRANSFORMER_MODULE = "sentence_transformers.base.modules.transformer.Transformer"
MODULE_OUTPUT_NAME = "sentence_embedding"


def transformer_module_config() -> dict[str, object]:
    """The keyword arguments of sentence-transformers' `Transformer` module for a CoMa checkpoint."""
    forward = {"method": "forward", "method_output_name": "pooler_output"}
    return {
        "transformer_task": "feature-extraction",
        # every modality is turned into a message before it reaches CoMaProcessor.apply_chat_template
        "modality_config": {"text": forward, "image": forward, "message": {**forward, "format": "structured"}},
        "module_output_name": MODULE_OUTPUT_NAME,
        # CoMaProcessor truncates by its own rules; there is no chat-template suffix to restore after it.
        "processing_kwargs": {"chat_template": {"restore_suffix": False}},
        "unpad_inputs": False,  # images and the compression mask need padded batches
    }


def prompts(query_instruction: str, document_instruction: str) -> dict[str, str]:
    """Prompt names → CoMa instructions (they land in the instruction slot, not before the text)."""
    return {"query": query_instruction, "document": document_instruction}


def sentence_transformers_files(query_instruction: str, document_instruction: str) -> dict[str, object]:
    """File name → JSON content of the three sentence-transformers files."""
    return {
        "modules.json": [{"idx": 0, "name": "0", "path": "", "type": TRANSFORMER_MODULE}],
        "sentence_bert_config.json": transformer_module_config(),
        "config_sentence_transformers.json": {
            "model_type": "SentenceTransformer",
            "__version__": {"sentence_transformers": _version("sentence-transformers", "6.0.0")},
            "prompts": prompts(query_instruction, document_instruction),
            "default_prompt_name": None,
            "similarity_fn_name": "cosine",
        },
    }


def write_sentence_transformers_files(
    save_directory: str | os.PathLike, query_instruction: str, document_instruction: str
) -> None:
    for name, content in sentence_transformers_files(query_instruction, document_instruction).items():
        with open(os.path.join(save_directory, name), "w", encoding="utf-8") as file:
            json.dump(content, file, indent=2)
            file.write("\n")


def _version(distribution: str, fallback: str) -> str:
    try:
        return version(distribution)
    except PackageNotFoundError:
        return fallback
