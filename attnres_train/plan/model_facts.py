"""What the planner needs to know about a model, read from a ``HybridDecoder`` built on the meta device (exact
parameter counts and FLOPs, no memory): per decoder layer its kind, dense and routed-expert parameters and
forward FLOPs per token (the pipeline partitioner's costs, AttnRes mixes included), and the parameters that sit
outside the layers (embedding on the first pipeline stage; final mix, final norm and LM head on the last).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache

import torch

from attnres_train.model import ModelConfig, build_model
from attnres_train.parallel.expert_parallel import EXPERT_WEIGHT_NAMES


@dataclass(frozen=True)
class LayerFacts:
    kind: str  # "L" linear attention, "F" full attention
    mlp: str  # "moe" or "dense"
    dense_parameters: int  # everything but the routed experts (router and shared experts included)
    expert_parameters: int  # routed experts, all of them
    forward_flops_per_token: float


@dataclass(frozen=True)
class ModelFacts:
    config: ModelConfig
    seq_len: int
    layers: tuple[LayerFacts, ...]
    first_stage_parameters: int  # the input embedding
    last_stage_parameters: int  # final AttnRes mix, final norm, LM head (0 extra when tied: counted once)
    train_flops_per_token: float  # HybridDecoder.flops_per_token(seq_len, training=True)
    last_stage_forward_flops_per_token: float  # final mix + LM head
    model: torch.nn.Module  # the meta-device build (pipeline partitioning reads it)

    @property
    def total_parameters(self) -> int:
        return (self.first_stage_parameters + self.last_stage_parameters
                + sum(layer.dense_parameters + layer.expert_parameters for layer in self.layers))


@lru_cache(maxsize=8)
def _cached(config_json: str, seq_len: int) -> ModelFacts:
    from attnres_train.parallel.pipeline_partition import stage_costs

    config = ModelConfig.from_mapping(json.loads(config_json))
    with torch.device("meta"):
        model = build_model(config)
    costs = stage_costs(model, seq_len)
    layers = []
    for layer, kind, mlp, flops in zip(model.layers, config.layer_kinds(), config.mlp_kinds(), costs.layer_flops):
        expert = sum(p.numel() for name, p in layer.named_parameters() if name.rsplit(".", 1)[-1] in EXPERT_WEIGHT_NAMES
                     and mlp == "moe")
        total = sum(p.numel() for p in layer.parameters())
        layers.append(LayerFacts(kind, mlp, total - expert, expert, flops))
    embedding = model.embed_tokens.weight.numel()
    in_layers = sum(p.numel() for p in model.layers.parameters())
    rest = sum(p.numel() for p in model.parameters()) - in_layers - embedding  # parameters() dedups a tied head
    return ModelFacts(config, seq_len, tuple(layers), embedding, rest, model.flops_per_token(seq_len, training=True),
                      costs.last_stage_extra, model)


def model_facts(config: ModelConfig, seq_len: int) -> ModelFacts:
    return _cached(json.dumps(config.to_dict(), sort_keys=True), seq_len)
