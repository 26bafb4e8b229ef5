"""coma_hf: CoMa ("Compressing then Matching") multimodal embeddings on Hugging Face transformers."""

from transformers import AutoConfig, AutoModel, AutoProcessor

from .configuration_coma import CoMaConfig
from .hub import push_to_hub
from .model_card import write_model_card
from .masking import may_attend
from .modeling_coma import CoMaCompression, CoMaModel, CoMaModelOutput
from .inputs import CoMaInputError, load_image
from .processing_coma import CoMaProcessor

__version__ = "0.1.0"

# Local registration: with coma_hf imported, the Auto classes resolve "coma" without remote code.
AutoConfig.register("coma", CoMaConfig, exist_ok=True)
AutoModel.register(CoMaConfig, CoMaModel, exist_ok=True)
AutoProcessor.register(CoMaConfig, CoMaProcessor, exist_ok=True)
# Checkpoints carry `auto_map` and these files, so they also load where coma_hf is not installed.
CoMaConfig.register_for_auto_class()
CoMaModel.register_for_auto_class("AutoModel")
CoMaProcessor.register_for_auto_class("AutoProcessor")
# Every checkpoint saved with coma_hf installed gets the CoMa model card (model_cards/coma.md) as README.md.
CoMaModel.model_card_writer = staticmethod(write_model_card)
# One-commit upload with the CoMa card; in the package because the remote code makes no network calls.
CoMaModel.push_to_hub = push_to_hub

__all__ = [
    "CoMaCompression",
    "CoMaConfig",
    "CoMaInputError",
    "CoMaModel",
    "CoMaModelOutput",
    "CoMaProcessor",
    "load_image",
    "may_attend",
]
