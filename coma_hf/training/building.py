"""How a fresh CoMa model is built for training (`build_coma`: the embedded tiny backbone or a named one), and the
fingerprint that tells whether two runs started from the same weights (`weights_fingerprint`)."""

from __future__ import annotations

import hashlib

import torch

from .arguments import BackboneArguments


def build_coma(arguments: BackboneArguments, backbone: str | None = None, seed: int = 0, **config_kwargs):
    """`(model, processor)`: CoMa over `backbone` (Hub id or folder), or over the embedded tiny backbone if `None`
    (the shipped reader, or random weights of the `tiny_*` sizes, as `arguments.tiny_init` says).
    Keyword arguments go to `CoMaModel.from_backbone`: the processor's (`loss_on`, instructions) and the config's."""
    from ..modeling_coma import CoMaModel
    from ..tiny import build_tiny_coma, tiny_backbone_config

    common = dict(
        num_compression_tokens=arguments.num_compression_tokens,
        min_image_tokens=arguments.min_image_tokens,
        max_image_tokens=arguments.max_image_tokens,
        max_length=arguments.max_length,
        **config_kwargs,
    )
    if backbone is None and arguments.tiny_init == "reader":
        return build_tiny_coma(arguments.family, seed=seed, reader=True, **common)
    if backbone is None:
        backbone_config = tiny_backbone_config(
            arguments.family,
            hidden_size=arguments.tiny_hidden_size,
            num_layers=arguments.tiny_num_layers,
            vision_width=arguments.tiny_vision_width,
            vision_depth=arguments.tiny_vision_depth,
        )
        return build_tiny_coma(arguments.family, seed=seed, backbone_config=backbone_config, **common)
    model = CoMaModel.from_backbone(backbone, seed=seed, **common)
    return model, model.processor


def weights_fingerprint(model) -> str:
    """SHA-256 of a model's parameters (names, dtypes, shapes and values, in name order): equal fingerprints mean
    runs started from the same weights."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()
