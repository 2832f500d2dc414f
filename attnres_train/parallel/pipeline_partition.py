"""Pipeline stage partitioning and the activation traffic at each stage boundary.

Stages own contiguous runs of decoder layers; the embedding goes with the first stage and the final AttnRes mix,
final norm and LM head with the last. The default partitioner is pipeline-aware:

1. it balances stages by compute — forward FLOPs per token of each layer from the model's exact accounting
   (active experts only: a parameter count would make MoE layers look 30x heavier than they run);
2. among the partitions whose slowest stage is within ``tolerance`` of the best achievable, it prefers stage
   boundaries on AttnRes block boundaries, where the running partial sum is empty and only completed block
   summaries travel.

What crosses a boundary, per micro-batch (floating tensors of shape [B, T, D] each):
- ``standard``: the hidden state, 1 tensor;
- ``block_attnres``: the completed block summaries [b_0 .. b_{n-1}], plus the partial sum when the boundary
  falls inside a block;
- ``full_attnres``: every source so far: the embedding and each sublayer output (O(L d)).
Integer document ids travel beside them ([B, T] int64) so packed-document masking keeps working.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Optional, Sequence

from attnres_train.model.attnres import attnres_forward_flops_per_token


@dataclass(frozen=True)
class StageCosts:
    layer_flops: tuple[float, ...]  # forward FLOPs per token of each decoder layer (mixer + MLP + its AttnRes mixes)
    first_stage_extra: float  # embedding
    last_stage_extra: float  # final AttnRes mix + LM head


@dataclass(frozen=True)
class Partition:
    """``boundaries[i]`` is the number of decoder layers before stage i+1 starts (len = stages - 1)."""

    boundaries: tuple[int, ...]
    stage_flops: tuple[float, ...]
    on_block_boundary: tuple[bool, ...]

    @property
    def num_stages(self) -> int:
        return len(self.stage_flops)

    @property
    def bottleneck(self) -> float:
        return max(self.stage_flops)

    def stage_layers(self, num_layers: int) -> list[range]:
        edges = (0, *self.boundaries, num_layers)
        return [range(edges[i], edges[i + 1]) for i in range(len(edges) - 1)]


def stage_costs(model, seq_len: int) -> StageCosts:
    """Per-layer forward FLOPs per token at ``seq_len`` of a built ``HybridDecoder`` (meta device is fine)."""
    cfg = model.config
    per_layer = []
    for i, layer in enumerate(model.layers):
        # The AttnRes mixes of this layer's two sublayers: difference of the cumulative counts.
        mixes = _attnres_flops_up_to(cfg, 2 * i + 2) - _attnres_flops_up_to(cfg, 2 * i)
        per_layer.append(layer.forward_flops_per_token(seq_len) + mixes)
    final_mix = _attnres_flops_up_to(cfg, 2 * cfg.num_layers + 1) - _attnres_flops_up_to(cfg, 2 * cfg.num_layers)
    head = 2.0 * cfg.hidden_size * cfg.vocab_size
    return StageCosts(layer_flops=tuple(per_layer), first_stage_extra=0.0, last_stage_extra=final_mix + head)


def _attnres_flops_up_to(cfg, num_mixes: int) -> float:
    """FLOPs of the first ``num_mixes`` AttnRes mixes (sublayer inputs in order, then the output mix)."""
    if cfg.residual == "standard" or num_mixes <= 0:
        return 0.0
    # attnres_forward_flops_per_token(L) counts mixes 0..L (L sublayers + the final one).
    return attnres_forward_flops_per_token(cfg.residual, num_mixes - 1, cfg.attnres_block_size, cfg.hidden_size)


def is_block_boundary(residual: str, block_size: int, layers_before: int) -> bool:
    """Whether a stage boundary after ``layers_before`` decoder layers leaves no partial block in flight."""
    if residual != "block_attnres":
        return True
    return (2 * layers_before) % block_size == 0


def boundary_tensor_count(residual: str, block_size: int, layers_before: int) -> int:
    """Floating [B, T, D] tensors sent across a boundary after ``layers_before`` decoder layers."""
    sublayers = 2 * layers_before
    if residual == "standard":
        return 1
    if residual == "full_attnres":
        return 1 + sublayers
    if residual == "block_attnres":
        return 1 + sublayers // block_size + int(sublayers % block_size != 0)
    raise ValueError(f"model.residual={residual!r}: expected standard, full_attnres or block_attnres")


def boundary_bytes(
    residual: str, block_size: int, layers_before: int, micro_batch: int, seq_len: int, hidden: int, bytes_per_element: int
) -> int:
    return boundary_tensor_count(residual, block_size, layers_before) * micro_batch * seq_len * hidden * bytes_per_element


def partition_stages(
    costs: StageCosts,
    num_stages: int,
    residual: str,
    block_size: int,
    tolerance: float = 0.05,
    boundaries: Optional[Sequence[int]] = None,
) -> Partition:
    """Split the layers into ``num_stages`` contiguous stages (see the module docstring for the objective).

    ``boundaries`` given explicitly are validated and used as they are (the partial sum then travels where a
    boundary falls inside a block).
    """
    num_layers = len(costs.layer_flops)
    if num_stages < 1:
        raise ValueError(f"parallel.pipeline_stages={num_stages}: expected an integer >= 1")
    if num_stages > num_layers:
        raise ValueError(
            f"parallel.pipeline_stages={num_stages}: a {num_layers}-layer model has at most {num_layers} stages"
        )
    if boundaries is not None:
        boundaries = tuple(int(b) for b in boundaries)
        if len(boundaries) != num_stages - 1 or list(boundaries) != sorted(set(boundaries)) or (
            boundaries and (boundaries[0] < 1 or boundaries[-1] > num_layers - 1)
        ):
            raise ValueError(
                f"parallel.pipeline_boundaries={list(boundaries)}: expected {num_stages - 1} strictly increasing "
                f"layer counts in [1, {num_layers - 1}]"
            )
        return _make_partition(costs, boundaries, residual, block_size)

    prefix = [0.0]
    for flops in costs.layer_flops:
        prefix.append(prefix[-1] + flops)

    def stage_cost(start: int, end: int, stage: int) -> float:
        cost = prefix[end] - prefix[start]
        if stage == 0:
            cost += costs.first_stage_extra
        if stage == num_stages - 1:
            cost += costs.last_stage_extra
        return cost

    @lru_cache(maxsize=None)
    def best_bottleneck(start: int, stage: int) -> float:
        if stage == num_stages - 1:
            return stage_cost(start, num_layers, stage)
        best = float("inf")
        for end in range(start + 1, num_layers - (num_stages - stage - 1) + 1):
            best = min(best, max(stage_cost(start, end, stage), best_bottleneck(end, stage + 1)))
        return best

    limit = best_bottleneck(0, 0) * (1.0 + tolerance)

    @lru_cache(maxsize=None)
    def fewest_off_block(start: int, stage: int) -> tuple[int, float, tuple[int, ...]]:
        """(off-block boundaries, bottleneck, boundaries) of the best way to split layers [start:] into the
        remaining stages with every stage within ``limit``; (inf, ...) if impossible."""
        if stage == num_stages - 1:
            cost = stage_cost(start, num_layers, stage)
            return (0, cost, ()) if cost <= limit else (10**9, float("inf"), ())
        best = (10**9, float("inf"), ())
        for end in range(start + 1, num_layers - (num_stages - stage - 1) + 1):
            cost = stage_cost(start, end, stage)
            if cost > limit:
                break
            off, tail_bottleneck, tail = fewest_off_block(end, stage + 1)
            candidate = (
                off + int(not is_block_boundary(residual, block_size, end)),
                max(cost, tail_bottleneck),
                (end, *tail),
            )
            best = min(best, candidate)
        return best

    _, _, chosen = fewest_off_block(0, 0)
    return _make_partition(costs, chosen, residual, block_size)


def _make_partition(costs: StageCosts, boundaries: tuple[int, ...], residual: str, block_size: int) -> Partition:
    num_layers = len(costs.layer_flops)
    edges = (0, *boundaries, num_layers)
    stage_flops = []
    for i in range(len(edges) - 1):
        cost = sum(costs.layer_flops[edges[i] : edges[i + 1]])
        if i == 0:
            cost += costs.first_stage_extra
        if i == len(edges) - 2:
            cost += costs.last_stage_extra
        stage_flops.append(cost)
    return Partition(
        boundaries=boundaries,
        stage_flops=tuple(stage_flops),
        on_block_boundary=tuple(is_block_boundary(residual, block_size, b) for b in boundaries),
    )
