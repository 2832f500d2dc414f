"""Layouts of a cluster, their step time and tokens/s, ranked.

Step time of one optimizer step (seconds), each term on its own, none assumed to overlap another:

- compute: the tokens a data-parallel replica trains per step x the slowest pipeline stage's training FLOPs per
  token (the model's exact count, x 4/3 with activation checkpointing: one more forward) / (peak x MFU), times
  ``1 + (P - 1) / m`` for the 1F1B pipeline bubble (m micro-batches per step);
- expert all-to-all: per MoE layer and micro-batch a rank sends ``4 (EP - 1) / EP`` x its routed pairs x D x
  bytes (dispatch and combine, forward and backward: what the trainer logs as
  ``expert_all_to_all_bytes_per_step``), at the intra-node bandwidth when the EP group fits in a node;
- pipeline boundaries: per micro-batch each boundary sends its activations forward and their gradients back
  (``model_summary.json``'s ``bytes_per_micro_batch``, twice), ranks of neighbouring stages being DP ranks apart;
- gradient reduction: a ring all-reduce (ZeRO-2: reduce-scatter + all-gather, the same bytes) of the stage's
  dense gradients over DP and of the expert slice's over DP / EP, ``2 (d - 1) / d`` x bytes; ZeRO-3 adds the
  parameter all-gathers of forward and backward.

A link is intra-node when every rank of the group sits on one node (ranks are numbered node-major; expert
groups are consecutive ranks, data-parallel replicas of a stage too), inter-node otherwise.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Optional

from .hardware import Cluster
from .memory import GiB, Layout, MemoryEstimate, estimate_memory, stage_parameters
from .model_facts import ModelFacts


@dataclass(frozen=True)
class StepTime:
    compute: float
    all_to_all: float
    boundaries: float
    gradient_reduction: float

    @property
    def total(self) -> float:
        return self.compute + self.all_to_all + self.boundaries + self.gradient_reduction


@dataclass(frozen=True)
class Plan:
    layout: Layout
    memory: MemoryEstimate
    time: StepTime
    tokens_per_second: float
    fits: bool


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _stage_layers(facts: ModelFacts, stages: int):
    from attnres_train.parallel.pipeline import describe_partition

    partition = describe_partition(facts.model, stages, facts.seq_len)
    return partition, partition.stage_layers(facts.config.num_layers)


def expert_all_to_all_bytes(facts: ModelFacts, layout: Layout, stage_layers: Iterable[int], element: int) -> float:
    """Bytes one rank sends per micro-batch in the MoE layers of its stage (forward and backward)."""
    cfg = facts.config
    if layout.expert_parallel == 1:
        return 0.0
    moe_layers = sum(1 for i in stage_layers if facts.layers[i].mlp == "moe")
    pairs = layout.micro_batch * facts.seq_len * cfg.top_k
    share = (layout.expert_parallel - 1) / layout.expert_parallel
    return moe_layers * 4 * share * pairs * cfg.hidden_size * element


def boundary_bytes_per_micro_batch(facts: ModelFacts, partition, micro_batch: int, element: int) -> list[int]:
    from attnres_train.parallel.pipeline_partition import boundary_bytes

    cfg = facts.config
    return [boundary_bytes(cfg.residual, cfg.attnres_block_size, layers, micro_batch, facts.seq_len,
                           cfg.hidden_size, element) for layers in partition.boundaries]


def _bandwidth(cluster: Cluster, group_span_ranks: int) -> float:
    return cluster.intra_node_bandwidth if group_span_ranks <= cluster.gpus_per_node else cluster.inter_node_bandwidth


def evaluate(facts: ModelFacts, layout: Layout, cluster: Cluster, global_batch: int, precision: str = "bf16",
             kernels: bool = True) -> Plan:
    """Memory and step time of ``layout`` for ``global_batch`` sequences per optimizer step."""
    P, EP, DP = layout.pipeline_stages, layout.expert_parallel, layout.data_parallel
    element = 2 if precision == "bf16" else 4
    micro_batches = global_batch // (DP * layout.micro_batch)  # per replica per step
    partition, stage_layers = _stage_layers(facts, P)
    memory = estimate_memory(facts, layout, stage_layers, precision, kernels, micro_batches)

    recompute = 4 / 3 if layout.activation_checkpointing else 1.0
    slowest_stage = max(partition.stage_flops) if P > 1 else facts.train_flops_per_token / 3
    tokens_per_replica = global_batch // DP * facts.seq_len
    compute = (tokens_per_replica * 3 * slowest_stage * recompute / (cluster.peak_flops * cluster.mfu)
               * (1 + (P - 1) / micro_batches))

    all_to_all = max(expert_all_to_all_bytes(facts, layout, layers, element) for layers in stage_layers)
    # Expert groups are EP consecutive ranks of one stage's replicas.
    all_to_all_time = micro_batches * all_to_all / _bandwidth(cluster, EP)

    boundary = boundary_bytes_per_micro_batch(facts, partition, layout.micro_batch, element) if P > 1 else []
    boundary_time = sum(micro_batches * 2 * b / _bandwidth(cluster, DP + 1) for b in boundary)

    reduce_time = 0.0
    for dense, expert in stage_parameters(facts, stage_layers):
        t = 0.0
        for count, degree, span in ((dense, DP, DP), (expert / EP, DP // EP, DP)):
            if degree > 1:
                volume = 2 * (degree - 1) / degree * count * element
                if layout.zero_stage == 3:
                    volume *= 2  # + the forward and backward parameter all-gathers
                t += volume / _bandwidth(cluster, span)
        reduce_time = max(reduce_time, t)

    time = StepTime(compute, all_to_all_time, boundary_time, reduce_time)
    tokens = global_batch * facts.seq_len / time.total
    fits = memory.total <= cluster.memory_per_gpu * cluster.usable_memory_fraction
    return Plan(layout, memory, time, tokens, fits)


def enumerate_layouts(facts: ModelFacts, cluster: Cluster, global_batch: int,
                      micro_batches: Iterable[int] = (1, 2, 4, 8), precision: str = "bf16") -> list[Layout]:
    """Every layout the trainer can run: P stages dividing the GPUs (at most one layer each), EP dividing the
    data-parallel degree and the expert count (with P > 1 too: each stage's replicas form their own expert groups
    of consecutive ranks, so a stage's all-to-all stays among its ranks), ZeRO 0-3 where DeepSpeed allows it with
    P and EP, micro-batches dividing the global batch, with and without activation checkpointing."""
    cfg = facts.config
    gpus = cluster.gpus
    is_moe = any(layer.mlp == "moe" for layer in facts.layers)
    out = []
    for P in divisors(gpus):
        if P > cfg.num_layers:
            continue
        DP = gpus // P
        for EP in divisors(DP):
            if EP > 1 and (not is_moe or cfg.num_experts % EP):
                continue
            for zero in (0, 1, 2, 3):
                if (P > 1 and zero > 1) or (EP > 1 and zero == 3) or (EP > 1 and zero == 0 and precision == "bf16"):
                    continue
                for micro in micro_batches:
                    if global_batch % (DP * micro):
                        continue
                    for checkpointing in (False, True):
                        out.append(Layout(P, EP, DP, zero, micro, checkpointing))
    return out


def rank_plans(facts: ModelFacts, cluster: Cluster, global_batch: int, precision: str = "bf16",
               kernels: bool = True, micro_batches: Iterable[int] = (1, 2, 4, 8)) -> list[Plan]:
    """Every layout evaluated; fitting layouts first, fastest first (less memory breaking ties), then the others
    by memory."""
    plans = [evaluate(facts, layout, cluster, global_batch, precision, kernels)
             for layout in enumerate_layouts(facts, cluster, global_batch, micro_batches, precision)]
    return sorted(plans, key=lambda p: (not p.fits, -round(p.tokens_per_second) if p.fits else 0, p.memory.total))


def format_table(plans: list[Plan], rows: Optional[int] = None) -> str:
    header = ("| # | layout | weights | grads | optim | workspace | activations | total GiB | fits | compute s | a2a s | "
              "p2p s | grad-reduce s | step s | tokens/s |")
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    for number, plan in enumerate(plans[:rows] if rows else plans, start=1):
        m, t = plan.memory, plan.time
        lines.append(
            f"| {number} | {plan.layout.describe()} | {m.weights / GiB:.1f} | {m.gradients / GiB:.1f} | "
            f"{m.optimizer / GiB:.1f} | {m.workspace / GiB:.1f} | {m.activations / GiB:.1f} | {m.total / GiB:.1f} | "
            f"{'yes' if plan.fits else 'NO'} | {t.compute:.2f} | {t.all_to_all:.2f} | {t.boundaries:.2f} | "
            f"{t.gradient_reduction:.2f} | {t.total:.2f} | {plan.tokens_per_second:,.0f} |")
    return "\n".join(lines)
