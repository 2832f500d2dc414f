"""Per-GPU memory of a training layout: weights, gradients, optimizer states (by ZeRO stage) and activations.

States, in bytes per parameter held by a rank (e = 2 for bf16 training, 4 for fp32; d = the degree the state is
sharded over: the data-parallel degree for dense parameters, the expert-data-parallel degree DP / EP for routed
experts, whose slice a rank holds is already 1 / EP of them):

    ZeRO   weights   gradients                    optimizer (AdamW: 2 fp32 moments, fp32 master where kept)
    0      e         e (+ 4 fp32 copy, bf16)      8 (fp32) | 12 / d (bf16: DeepSpeed's bf16 optimizer shards them)
    1      e         e + 4 / d (fp32 partition)   (4 + 8) / d (the fp32 master is a copy even in fp32 training)
    2      e         e / d + 4 / d                (4 + 8) / d
    3      e / d     e / d + 4 / d                (4 + 8) / d  (+ the gathered weights of the largest layer)

plus the step's workspace: torch's multi-tensor AdamW (the default on CUDA) makes one fp32 temporary of every
parameter it steps (the square root of its second moment: 4 bytes per parameter of the rank's optimizer shard;
the fused AdamW makes none), and DeepSpeed's flat communication buffers, e bytes per parameter up to its bucket
size (5e8 elements) each: the gradient reduction bucket (flattened even on one rank) and, under ZeRO-1/2 over
d > 1 ranks, the bucket gathering the updated weight partitions back. The workspace and the activations are not
held at the same time (backward has freed the activations when gradients are reduced and the optimizer steps),
so the peak counts the larger of the two.

Activations, in elements per token kept for the backward pass, per component (what autograd saves in this
repository's implementations; "reference" = the pure-torch paths used on CPU, "kernels" = fla's chunk kernels and
flash attention on GPU, which recompute their intra-chunk products and chunk states in the backward pass):

- RMSNorm: input and rstd, 2D + 1; each decoder layer also keeps its sublayer sums, 2D;
- AttnRes mix of sublayer l: the stacked sources, (1 + completed blocks [+ 1 partial]) * D (block summaries);
- full attention (MLA): input D, latent 3 r_kv (+ 2 r_q), 2 H d_qk + 3 H d_v, log-sum-exp H;
- linear attention (KDA/GDN): input D, conv windows 2 (2 K_all + V_all), normalised q/k, gate and output
  gate 8 K_all + 7 V_all-ish (see ``_linear_attention``), then the chunk algorithm: reference path the
  per-channel sub-block decays 2 N c K, sub-block pair products, chunk matrices, and the chunk states
  ~6 N K V / C (the linear-attention states); kernels path the [C, C] chunk matrices 2 N C only;
- MoE: input D, router scores E, per routed pair (K of them) the sorted input, gate, up, activation and
  output 2D + 4F, shared experts 4 S F; dense MLP: D + 4 F_dense;
- LM head: input D, logits and log-softmax 2 V_vocab (fp32), and their gradient during backward V_vocab.

With activation checkpointing (every sublayer) a layer keeps its sublayer inputs and AttnRes stacks, and one
sublayer's full activations exist at a time during recomputation. A pipeline stage s of P holds the activations
of min(P - s, m) micro-batches (1F1B schedule, m micro-batches per step).

The total is a bound, not a simulation of the step: it holds every gradient together with the activations, while
backward frees activations as gradients appear. CPU runs of the small preset peaked 2% above it (ZeRO-1 with
activation checkpointing) to 15% below it (``tests/plan/test_planner.py``).

Shape legend: D hidden, H heads, N value heads, K/V key/value head dims, K_all/V_all their totals, C chunk, c
sub-block, E experts, F expert width, S shared experts, r latent ranks.
"""

from __future__ import annotations

from dataclasses import dataclass

from .model_facts import ModelFacts

GiB = 1024 ** 3
DEEPSPEED_BUCKET_ELEMENTS = 5e8  # DeepSpeed's default reduce_bucket_size and allgather_bucket_size


@dataclass(frozen=True)
class Layout:
    pipeline_stages: int
    expert_parallel: int
    data_parallel: int
    zero_stage: int
    micro_batch: int
    activation_checkpointing: bool

    def describe(self) -> str:
        return (f"P={self.pipeline_stages} EP={self.expert_parallel} DP={self.data_parallel} "
                f"ZeRO-{self.zero_stage} mb={self.micro_batch}{' AC' if self.activation_checkpointing else ''}")


@dataclass(frozen=True)
class MemoryEstimate:
    weights: float
    gradients: float
    optimizer: float
    workspace: float
    activations: float
    stage: int  # the pipeline stage with the largest total (0-based)

    @property
    def total(self) -> float:
        # The step's workspace exists only while the optimizer steps, after backward has freed the activations.
        return self.weights + self.gradients + self.optimizer + max(self.workspace, self.activations)


def stage_parameters(facts: ModelFacts, stage_layers: list[range]) -> list[tuple[int, int]]:
    """(dense, routed-expert) parameters of each pipeline stage."""
    out = []
    for s, layers in enumerate(stage_layers):
        dense = sum(facts.layers[i].dense_parameters for i in layers)
        expert = sum(facts.layers[i].expert_parameters for i in layers)
        if s == 0:
            dense += facts.first_stage_parameters
        if s == len(stage_layers) - 1:
            dense += facts.last_stage_parameters
        out.append((dense, expert))
    return out


def state_bytes(dense: float, expert_local: float, layout: Layout, precision: str,
                largest_layer_parameters: float = 0.0) -> tuple[float, float, float, float]:
    """(weights, gradients, optimizer, workspace) bytes of one rank holding ``dense`` and ``expert_local``
    parameters."""
    e = 2 if precision == "bf16" else 4
    bf16 = precision == "bf16"
    zero = layout.zero_stage
    dp = layout.data_parallel
    edp = max(1, dp // layout.expert_parallel)

    def one(count: float, d: int) -> tuple[float, float, float, float]:
        stepped = count if zero == 0 and not bf16 else count / d  # parameters this rank's optimizer updates
        weights = e * count / (d if zero == 3 else 1)
        gradients = e * count / (d if zero >= 2 else 1)
        if zero >= 1 or bf16:  # the fp32 gradients the optimizer steps on (its shard under ZeRO)
            gradients += 4 * count / (1 if zero == 0 else d)
        if zero == 0:
            optimizer = 12 * count / d if bf16 else 8 * count
        else:
            optimizer = 12 * count / d
        workspace = 4 * stepped
        buckets = 1 if zero in (0, 3) or d == 1 else 2
        workspace += buckets * e * min(count, DEEPSPEED_BUCKET_ELEMENTS)
        return weights, gradients, optimizer, workspace

    dense_states = one(dense, dp)
    expert_states = one(expert_local, edp)
    weights, gradients, optimizer, workspace = (a + b for a, b in zip(dense_states, expert_states))
    if zero == 3:
        weights += e * largest_layer_parameters  # one layer's parameters gathered at a time
    return weights, gradients, optimizer, workspace


def _attnres_sources(residual: str, block_size: int, sublayer: int) -> int:
    """Sources mixed at sublayer ``sublayer`` (0-based; 2 * num_layers is the final mix)."""
    if residual == "standard":
        return 0
    if residual == "full_attnres":
        return sublayer + 1
    completed = sublayer // block_size
    return 1 + completed + (1 if sublayer % block_size else 0)


def _linear_attention(cfg, kernels: bool) -> tuple[float, float]:
    """(elements in the activation dtype, fp32 elements) per token of one linear-attention layer."""
    from attnres_train.model.mixers.delta_rule import _sub_block_size

    D = cfg.hidden_size
    heads = cfg.linear_num_heads
    value_heads = cfg.linear_num_v_heads or heads
    K = cfg.linear_head_dim
    V = int(round(K * cfg.linear_expand_v))
    key_all, value_all = heads * K, value_heads * V
    projections = D + 2 * K + 2 * (2 * key_all + value_all) + 4 * key_all + 5 * value_all
    if kernels:
        C = 64  # fla's chunk size
        return projections, 2 * value_heads * C
    C = cfg.linear_chunk_size
    c = _sub_block_size(C)
    subs = C // c
    pairs = subs * (subs - 1) // 2
    per_channel = cfg.linear_mixer == "kda"
    intra = (2 * value_heads * c * K + 7 * value_heads * pairs * c * K / C
             + 2 * value_heads * (subs * (subs + 1) // 2) * c * c / C + 4 * value_heads * K) if per_channel else (
        2 * value_heads * C)
    chunk = 7 * value_heads * C + 2 * value_heads * (K + V)
    states = 6.25 * value_heads * K * V / C
    return projections, intra + chunk + states


def _full_attention(cfg) -> float:
    D = cfg.hidden_size
    if cfg.full_mixer == "mla":
        heads = cfg.mla_num_heads
        qk = cfg.mla_qk_nope_head_dim + cfg.mla_qk_rope_head_dim
        q_latent = 2 * cfg.mla_q_lora_rank if cfg.mla_q_lora_rank else 0
        return D + 3 * cfg.mla_kv_lora_rank + q_latent + 2 * heads * qk + 3 * heads * cfg.mla_v_head_dim + heads
    heads, kv_heads, head = cfg.gqa_num_heads, cfg.gqa_num_kv_heads, cfg.gqa_head_dim
    return D + 3 * heads * head + 2 * 2 * kv_heads * head + heads


def _mlp(cfg, kind: str) -> float:
    D = cfg.hidden_size
    if kind == "moe":
        F = cfg.expert_ffn_dim
        return D + cfg.num_experts + cfg.top_k * (2 * D + 4 * F) + 4 * cfg.num_shared_experts * F + 4 * cfg.top_k
    width = cfg.first_dense_ffn_dim if getattr(cfg, "first_dense_ffn_dim", None) else cfg.ffn_dim
    return D + 4 * width


def activation_bytes_per_token(facts: ModelFacts, layers: range, precision: str, kernels: bool,
                               checkpointing: bool, last_stage: bool) -> float:
    """Bytes per token one micro-batch leaves for the backward pass in the decoder ``layers`` of a stage."""
    cfg = facts.config
    e = 2 if precision == "bf16" else 4
    D = cfg.hidden_size
    kept, largest_sublayer = 0.0, 0.0
    for i in layers:
        layer = facts.layers[i]
        if layer.kind == "L":
            in_dtype, in_fp32 = _linear_attention(cfg, kernels)
            mixer = e * in_dtype + 4 * in_fp32
        else:
            mixer = e * _full_attention(cfg)
        mlp_kind = "moe" if layer.mlp == "moe" else "dense"
        mlp = e * _mlp(cfg, mlp_kind)
        norms = e * 2 * (2 * D + 1) + e * 2 * D
        mixes = e * sum((D + 2) * _attnres_sources(cfg.residual, cfg.attnres_block_size, 2 * i + j) for j in (0, 1))
        if checkpointing:
            kept += mixes + e * 2 * D
            largest_sublayer = max(largest_sublayer, mixer + e * (2 * D + 1), mlp + e * (2 * D + 1))
        else:
            kept += mixer + mlp + norms + mixes
    if last_stage:
        kept += e * (D + 2 * D + 1) + e * (D + 2) * _attnres_sources(
            cfg.residual, cfg.attnres_block_size, 2 * cfg.num_layers)
        kept += 3 * 4 * cfg.vocab_size  # logits, log-softmax (fp32) and, during backward, their gradient
    return kept + largest_sublayer


def estimate_memory(facts: ModelFacts, layout: Layout, stage_layers: list[range], precision: str, kernels: bool,
                    micro_batches_per_step: int) -> MemoryEstimate:
    """The largest per-GPU memory over the pipeline stages of ``layout``."""
    params = stage_parameters(facts, stage_layers)
    largest_layer = max(layer.dense_parameters + layer.expert_parameters / layout.expert_parallel
                        for layer in facts.layers)
    tokens = layout.micro_batch * facts.seq_len
    P = layout.pipeline_stages
    best = None
    for s, (dense, expert) in enumerate(params):
        weights, gradients, optimizer, workspace = state_bytes(dense, expert / layout.expert_parallel, layout,
                                                               precision, largest_layer)
        in_flight = min(P - s, micro_batches_per_step)
        per_token = activation_bytes_per_token(facts, stage_layers[s], precision, kernels,
                                               layout.activation_checkpointing, s == P - 1)
        estimate = MemoryEstimate(weights, gradients, optimizer, workspace, in_flight * tokens * per_token, s)
        if best is None or estimate.total > best.total:
            best = estimate
    return best
