"""``AttnResConfig``: this package's model config as a transformers ``PretrainedConfig`` (``model_type: attnres``).

The decoder's own fields travel as one nested dict, ``config.attnres`` (every ``ModelConfig`` field, validated),
so they never collide with transformers' generic attributes; ``vocab_size``, ``hidden_size``,
``num_hidden_layers`` and ``tie_word_embeddings`` mirror it for code that reads those. Importing this module
costs transformers' configuration code only, not its modeling code.
"""

from __future__ import annotations

from typing import Any, Optional

from transformers import PretrainedConfig

from attnres_train.model.config import ModelConfig, with_legacy_fields

MODEL_TYPE = "attnres"


class AttnResConfig(PretrainedConfig):
    model_type = MODEL_TYPE

    def __init__(self, attnres: Optional[dict[str, Any]] = None, use_cache: bool = True, **kwargs: Any):
        model_cfg = ModelConfig.from_mapping(with_legacy_fields(dict(attnres or {})))
        self.attnres = model_cfg.to_dict()
        for mirrored in ("vocab_size", "hidden_size", "num_hidden_layers", "tie_word_embeddings"):
            kwargs.pop(mirrored, None)
        super().__init__(tie_word_embeddings=model_cfg.tie_embeddings, **kwargs)
        self.vocab_size = model_cfg.vocab_size
        self.hidden_size = model_cfg.hidden_size
        self.num_hidden_layers = model_cfg.num_layers
        self.use_cache = use_cache  # generate() decodes with the model's DecodeCache

    def model_config(self) -> ModelConfig:
        return ModelConfig.from_mapping(self.attnres)
