"""The model package: single-device PyTorch, never imports DeepSpeed.

``build_model(cfg)`` takes the ``model`` config group (DictConfig, dict or ``ModelConfig``) and returns a
``HybridDecoder``; see its docstring for the forward contract and the accounting methods.
"""

from __future__ import annotations

from typing import Any, Optional

import torch

from .config import ModelConfig, ModelConfigError
from .decoder import DecoderOutput, HybridDecoder, LayerSpec, layer_specs
from .packing import DocumentLayout, doc_ids_from_eos


def build_model(cfg: Any, device: Optional[torch.device | str] = None) -> HybridDecoder:
    """Build the decoder described by ``cfg``. ``device="meta"`` builds it without allocating memory
    (parameter and FLOP accounting of published shapes)."""
    model_cfg = ModelConfig.from_mapping(cfg)
    if device is None:
        return HybridDecoder(model_cfg)
    with torch.device(device):
        return HybridDecoder(model_cfg)


__all__ = [
    "DecoderOutput",
    "DocumentLayout",
    "HybridDecoder",
    "LayerSpec",
    "ModelConfig",
    "ModelConfigError",
    "build_model",
    "doc_ids_from_eos",
    "layer_specs",
]
