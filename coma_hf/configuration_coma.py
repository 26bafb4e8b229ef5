"""CoMa configuration.

Part of the remote code shipped with every checkpoint: imports only transformers and sibling files.
"""

from __future__ import annotations

from transformers import AutoConfig, PretrainedConfig

from .backbones import get_family

POOLING_MODES = ("mean", "last")
ATTENTION_RULES = ("bottleneck", "causal")
VISION_ATTENTION_MODES = ("auto", "stock")
TRAINING_STAGES = (1, 2)  # compression pre-training, contrastive matching
DEFAULT_CONTRASTIVE_TEMPERATURE = 0.03  # the paper's
# The config key that marks the package's embedded backbone: on a CoMa config, and on a stock backbone config that
# the package trained itself (the shipped reader), which a CoMa config built over it inherits.
EMBEDDED_BACKBONE_MARKER = "embedded_backbone"
# Token-layout settings that configs saved before the processor owned them (version 0.1.0) carry. Such a config keeps
# them as plain attributes (transformers keeps unknown keys); `CoMaModel` hands them to its processor, and a config
# never writes them again.
LEGACY_PROCESSOR_SETTINGS = ("loss_on", "compress_instruction", "query_instruction", "document_instruction")


class CoMaConfig(PretrainedConfig):
    r"""Configuration of a CoMa embedding model: a backbone MLLM plus K learnable compression tokens.

    Only what the model needs to run: the token layout (instructions, `loss_on`, token names) is `CoMaProcessor`'s.

    Args:
        backbone_config (`dict` or `PretrainedConfig`, *optional*):
            The full config of the backbone MLLM (Qwen2-VL, Qwen2.5-VL or Qwen3-VL). Defaults to a stock
            Qwen2.5-VL config.
        num_compression_tokens (`int`, defaults to 32):
            K, the number of compression tokens appended after every input. The paper's ablation found 32 best.
            0 makes a VLM2Vec-style embedder: no compression tokens, the embedding read off the last input token.
        compression_token_ids (`list[int]`, *optional*):
            Vocabulary ids of `<cmp_0>` … `<cmp_{K-1}>`, in order. Set by `CoMaModel.from_backbone`.
        pooling (`str`, defaults to `"mean"`):
            How the embedding is read off the K final (post-norm) compression states: `"mean"` or `"last"`.
            `"last"`: compatibility with the authors' release (their evaluation); the method's value is `"mean"`.
        attention_rule (`str`, defaults to `"bottleneck"`):
            `"bottleneck"`: tokens after the compression tokens never see the input (CoMa).
            `"causal"`: plain causal attention everywhere (the control that isolates compression; also
            compatibility with the authors' release, whose published scripts never switch the bottleneck on). The
            method's value is `"bottleneck"`.
        contrastive_temperature (`float`, defaults to 0.03):
            Stage-2 InfoNCE temperature (cosine similarity / temperature). Not called `temperature`, which
            transformers reserves for generation.
        embedding_dim (`int`, *optional*):
            Truncate pooled embeddings to their first `embedding_dim` dimensions (Matryoshka-style) before
            normalising. `None` keeps the full hidden size.
        normalize_embeddings (`bool`, defaults to `True`):
            L2-normalise `pooler_output` (the contract every encode API relies on).
        vision_attention (`str`, defaults to `"auto"`):
            The vision tower's attention: `"auto"` — flash-attn when installed, else the project's batched attention
            (all windows of a layer in one call; `vision_attention.py`); `"stock"` — whatever the backbone was loaded
            with (transformers' per-window calls without flash-attn). The language model is not affected.
        backbone_name_or_path (`str`, *optional*):
            Where the backbone came from (Hub id or folder), set by `CoMaModel.from_backbone`; the model card's
            `base_model`. `None` for the embedded tiny backbone.
        embedded_backbone (`bool`, *optional*):
            Whether the backbone is the package's embedded one (its `tiny` module, or the shipped reader), set by its
            builder. Scripts pick the recipe a run starts with from it (`tiny` for the embedded backbone, `paper` for a
            real one). `None` takes the backbone config's own marker (`EMBEDDED_BACKBONE_MARKER`), else `False`.
        training_stage (`int`, *optional*):
            The stage that last trained these weights, set by the stage's trainer: `1` (compression pre-training:
            the weights answer questions from the K compression states) or `2` (contrastive matching: they were never
            trained to answer, and `generate_from_compression` warns). `None`: untrained, or saved before this field.
    """

    model_type = "coma"
    sub_configs = {"backbone_config": AutoConfig}

    def __init__(
        self,
        backbone_config: dict | PretrainedConfig | None = None,
        num_compression_tokens: int = 32,
        compression_token_ids: list[int] | None = None,
        pooling: str = "mean",
        attention_rule: str = "bottleneck",
        contrastive_temperature: float = DEFAULT_CONTRASTIVE_TEMPERATURE,
        embedding_dim: int | None = None,
        normalize_embeddings: bool = True,
        vision_attention: str = "auto",
        backbone_name_or_path: str | None = None,
        embedded_backbone: bool | None = None,
        training_stage: int | None = None,
        **kwargs,
    ):
        self.backbone_config = _as_backbone_config(backbone_config)
        get_family(self.backbone_config.model_type)  # fail early on an unsupported family
        self.num_compression_tokens = num_compression_tokens
        self.compression_token_ids = list(compression_token_ids) if compression_token_ids is not None else None
        self.pooling = _check_choice("pooling", pooling, POOLING_MODES)
        self.attention_rule = _check_choice("attention_rule", attention_rule, ATTENTION_RULES)
        self.contrastive_temperature = contrastive_temperature
        self.embedding_dim = embedding_dim
        self.normalize_embeddings = normalize_embeddings
        self.vision_attention = _check_choice("vision_attention", vision_attention, VISION_ATTENTION_MODES)
        self.backbone_name_or_path = backbone_name_or_path
        if embedded_backbone is None:
            embedded_backbone = bool(getattr(self.backbone_config, EMBEDDED_BACKBONE_MARKER, False))
        self.embedded_backbone = embedded_backbone
        if training_stage is not None and training_stage not in TRAINING_STAGES:
            raise ValueError(f"training_stage must be one of {TRAINING_STAGES} or None, got {training_stage!r}")
        self.training_stage = training_stage
        if self.compression_token_ids is not None and len(self.compression_token_ids) != num_compression_tokens:
            raise ValueError(
                f"compression_token_ids has {len(self.compression_token_ids)} ids but num_compression_tokens is "
                f"{num_compression_tokens}"
            )
        # Tying follows the backbone (Qwen2.5-VL-3B ties its embeddings, 7B does not).
        kwargs["tie_word_embeddings"] = bool(getattr(self.backbone_config, "tie_word_embeddings", False))
        super().__init__(**kwargs)

    def to_dict(self) -> dict:
        """As transformers', leaving out the token-layout settings an old config may still hold (the processor saves
        them; see `LEGACY_PROCESSOR_SETTINGS`)."""
        output = super().to_dict()
        for key in LEGACY_PROCESSOR_SETTINGS:
            output.pop(key, None)
        return output

    def legacy_processor_settings(self) -> dict:
        """The token-layout settings this config was loaded with, if it was saved before the processor owned them
        (`{}` for a config saved since)."""
        return {key: self.__dict__[key] for key in LEGACY_PROCESSOR_SETTINGS if key in self.__dict__}

    def get_text_config(self, *args, **kwargs) -> PretrainedConfig:
        """The language model's config (vocabulary size, hidden size), as transformers' resizing expects."""
        return self.backbone_config.get_text_config(*args, **kwargs)

    @property
    def hidden_size(self) -> int:
        """Width of the language model, i.e. of the compression states."""
        return self.get_text_config().hidden_size

    @property
    def embedding_size(self) -> int:
        """Dimension of `pooler_output` (what sentence-transformers reports as the embedding dimension)."""
        return self.embedding_dim or self.hidden_size

    @property
    def projection_dim(self) -> int:
        """Alias of `embedding_size`: where sentence-transformers looks for the size of a pooled output."""
        return self.embedding_size


def is_embedded_backbone(config: dict) -> bool:
    """Whether a saved config (`config.json` as a dict) holds the package's embedded backbone: its
    `embedded_backbone` marker (a CoMa config's, or a stock backbone config's such as the shipped reader's); CoMa
    checkpoints saved before the marker existed built the embedded backbone without naming a source
    (`backbone_name_or_path` unset). Any other config (a stock backbone's) holds a real one."""
    if EMBEDDED_BACKBONE_MARKER in config:
        return bool(config[EMBEDDED_BACKBONE_MARKER])
    return config.get("model_type") == CoMaConfig.model_type and config.get("backbone_name_or_path") is None


def _as_backbone_config(backbone_config: dict | PretrainedConfig | None) -> PretrainedConfig:
    if backbone_config is None:
        return AutoConfig.for_model("qwen2_5_vl")
    if isinstance(backbone_config, dict):
        backbone_config = dict(backbone_config)
        return AutoConfig.for_model(backbone_config.pop("model_type"), **backbone_config)
    return backbone_config


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")
    return value
