"""coma_hf: CoMa ("Compressing then Matching") multimodal embeddings on Hugging Face transformers."""

from transformers import AutoConfig, AutoModel, AutoProcessor

from .configuration_coma import CoMaConfig
from .hub import push_to_hub, save_checkpoint
from .inputs import CoMaInputError, load_image
from .masking import may_attend
from .modeling_coma import CoMaCompression, CoMaModel, CoMaModelOutput
from .processing_coma import CoMaProcessor
from .released import convert_released_checkpoint

__version__ = "0.1.0"

# Local registration: with coma_hf imported, the Auto classes resolve "coma" without remote code.
AutoConfig.register("coma", CoMaConfig, exist_ok=True)
AutoModel.register(CoMaConfig, CoMaModel, exist_ok=True)
AutoProcessor.register(CoMaConfig, CoMaProcessor, exist_ok=True)
# Checkpoints carry `auto_map` and these files, so they also load where coma_hf is not installed.
CoMaConfig.register_for_auto_class()
CoMaModel.register_for_auto_class("AutoModel")
CoMaProcessor.register_for_auto_class("AutoProcessor")

__all__ = [
    "CoMaCompression",
    "CoMaConfig",
    "CoMaInputError",
    "CoMaModel",
    "CoMaModelOutput",
    "CoMaProcessor",
    "convert_released_checkpoint",
    "load_image",
    "may_attend",
    "push_to_hub",
    "save_checkpoint",
]
