"""Dropless Mixture-of-Experts MLP with DeepSeek-V3 routing and aux-loss-free load balancing.

Tensor suffixes: B batch, T sequence, D hidden size, N tokens (B*T), E routed experts, K top_k,
F expert ffn width, R routed token-expert pairs (N*K), sorted by expert where the name says so.

Parameters and buffers (names are the checkpoint contract):

* ``gate.weight [E, D]``: router (``nn.Linear(D, E, bias=False)``; same name as the DeepSeek-V3 / Kimi HF gate).
* ``w_gate [E, D, F]``, ``w_up [E, D, F]``, ``w_down [E, F, D]``: routed experts stacked, stored input-major
  (``x @ w_gate[e]``), i.e. the TRANSPOSE of the per-expert ``nn.Linear.weight``; HF's fused
  ``experts.gate_up_proj [E, 2F, D]`` is ``cat(w_gate, w_up, dim=2).transpose(1, 2)`` and ``experts.down_proj
  [E, D, F]`` is ``w_down.transpose(1, 2)``.
* ``shared_experts.{gate_proj,up_proj,down_proj}``: the shared experts fused into one SwiGLU of width
  ``num_shared_experts * expert_ffn_dim`` (mathematically the sum of that many separate experts); absent when
  ``num_shared_experts == 0``.
* ``expert_bias [E]`` (persistent buffer, fp32): the aux-loss-free balancing bias. It is added to the scores
  only to choose the top-k experts; the combine weights use the unbiased scores.
* ``tokens_per_expert [E]`` (non-persistent buffer, fp32): routed-pair counts accumulated by training-mode
  forwards since the last ``update_expert_bias``. Not checkpointed: the engine updates the bias after every
  optimizer step, so it is zero whenever a checkpoint is written.

Both buffers stay fp32 when the module is cast to bf16 (``_apply``): a 1e-3 bias step is below bf16 resolution.

Routing (per token, in fp32 or wider): ``scores = sigmoid(x @ gate.weight.T)`` (or softmax); ``top-k`` of
``scores + expert_bias``; combine weights ``= scores[selected] / sum(scores[selected]) * routed_scaling_factor``.
Dropless: every token is processed by exactly ``top_k`` routed experts and by the shared experts; there is no
capacity factor. Dispatch sorts the N*K pairs by expert once, gathers, runs three grouped GEMMs and un-sorts.

Expert parallelism: the module itself is single-device code. A parallel engine may give it an
``expert_dispatch`` (``attnres_train.parallel.expert_parallel``) and keep only a contiguous slice of the experts in
``w_gate``/``w_up``/``w_down``; the dispatch then carries the expert-sorted pairs to the ranks owning their experts,
runs :meth:`expert_ffn` there on the local slice and brings the outputs back in the same order. Router, bias,
load counters and shared experts always cover all E experts on every rank.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .grouped_gemm import grouped_mm
from .mlp import SwiGLU

ROUTER_SCORES = ("sigmoid", "softmax")


class MoE(nn.Module):
    """Routed + shared SwiGLU experts; ``forward(x_BTD) -> (y_BTD, aux_loss or None)``.

    Args:
        hidden_size: D.
        num_experts: E routed experts.
        top_k: routed experts per token, ``1 <= top_k <= num_experts``.
        expert_ffn_dim: F, the SwiGLU width of each routed (and each shared) expert.
        num_shared_experts: shared experts applied to every token (0 for none).
        router_score: ``sigmoid`` (DeepSeek-V3 / Kimi) or ``softmax``.
        routed_scaling_factor: multiplies the renormalised combine weights (Kimi Linear: 2.446).
        bias_update_rate: step of the aux-loss-free bias update (``u`` in DeepSeek-V3); 0 disables it.
        aux_loss_coef: weight of the sequence-level balance loss (``alpha``); 0 returns no aux loss.
        grouped_mm_impl: ``auto`` | ``native`` | ``loop`` passed to :func:`grouped_mm` (``None``: env default).
    """

    def __init__(
        self,
        hidden_size: int,
        num_experts: int,
        top_k: int,
        expert_ffn_dim: int,
        num_shared_experts: int = 1,
        router_score: str = "sigmoid",
        routed_scaling_factor: float = 1.0,
        bias_update_rate: float = 1e-3,
        aux_loss_coef: float = 0.0,
        grouped_mm_impl: Optional[str] = None,
    ):
        super().__init__()
        _require(isinstance(hidden_size, int) and hidden_size > 0, "hidden_size", hidden_size, "a positive integer")
        _require(isinstance(num_experts, int) and num_experts > 0, "num_experts", num_experts, "a positive integer")
        _require(
            isinstance(top_k, int) and 1 <= top_k <= num_experts,
            "top_k",
            top_k,
            f"an integer in [1, num_experts={num_experts}]",
        )
        _require(
            isinstance(expert_ffn_dim, int) and expert_ffn_dim > 0,
            "expert_ffn_dim",
            expert_ffn_dim,
            "a positive integer",
        )
        _require(
            isinstance(num_shared_experts, int) and num_shared_experts >= 0,
            "num_shared_experts",
            num_shared_experts,
            "an integer >= 0",
        )
        _require(router_score in ROUTER_SCORES, "router_score", router_score, f"one of {ROUTER_SCORES}")
        _require(routed_scaling_factor > 0, "routed_scaling_factor", routed_scaling_factor, "a positive float")
        _require(bias_update_rate >= 0, "bias_update_rate", bias_update_rate, "a float >= 0")
        _require(aux_loss_coef >= 0, "aux_loss_coef", aux_loss_coef, "a float >= 0")

        self.hidden_size = hidden_size
        self.num_experts = num_experts
        self.top_k = top_k
        self.expert_ffn_dim = expert_ffn_dim
        self.num_shared_experts = num_shared_experts
        self.router_score = router_score
        self.routed_scaling_factor = float(routed_scaling_factor)
        self.bias_update_rate = float(bias_update_rate)
        self.aux_loss_coef = float(aux_loss_coef)
        self.grouped_mm_impl = grouped_mm_impl

        self.gate = nn.Linear(hidden_size, num_experts, bias=False)
        self.w_gate = nn.Parameter(torch.empty(num_experts, hidden_size, expert_ffn_dim))
        self.w_up = nn.Parameter(torch.empty(num_experts, hidden_size, expert_ffn_dim))
        self.w_down = nn.Parameter(torch.empty(num_experts, expert_ffn_dim, hidden_size))
        self.shared_experts = (
            SwiGLU(hidden_size, num_shared_experts * expert_ffn_dim) if num_shared_experts > 0 else None
        )
        self.register_buffer("expert_bias", torch.zeros(num_experts, dtype=torch.float32), persistent=True)
        self.register_buffer("tokens_per_expert", torch.zeros(num_experts, dtype=torch.float32), persistent=False)
        # Set by a parallel engine (expert parallelism): callable(x_sorted_RD, pairs_per_expert_E, expert_ffn).
        self.expert_dispatch = None
        self.reset_parameters()

    # ------------------------------------------------------------------------------------------------
    def reset_parameters(self, init_std: float = 0.02) -> None:
        """Normal(0, init_std) for the router and every expert matrix; zero the routing state."""
        nn.init.normal_(self.gate.weight, mean=0.0, std=init_std)
        for weight in (self.w_gate, self.w_up, self.w_down):
            nn.init.normal_(weight, mean=0.0, std=init_std)
        if self.shared_experts is not None:
            self.shared_experts.reset_parameters(init_std)
        with torch.no_grad():
            self.expert_bias.zero_()
            self.tokens_per_expert.zero_()

    def _apply(self, fn, recurse=True):
        # Casting the module (e.g. .bfloat16()) must move the routing buffers but keep them fp32.
        routing_state = {name: self._buffers[name] for name in ("expert_bias", "tokens_per_expert")}
        super()._apply(fn, recurse)
        for name, old in routing_state.items():
            moved = self._buffers[name]
            if moved.dtype != torch.float32:
                self._buffers[name] = old.to(device=moved.device, dtype=torch.float32)
        return self

    # ------------------------------------------------------------------------------------------------
    def route(self, x_ND: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Router in fp32 (fp64 for fp64 inputs): returns ``(scores_NE, expert_ids_NK, combine_weights_NK)``.

        ``scores_NE`` are the unbiased sigmoid/softmax scores; ``expert_ids_NK`` the top-k of
        ``scores + expert_bias``; ``combine_weights_NK`` the selected unbiased scores renormalised over the
        top-k and multiplied by ``routed_scaling_factor``.
        """
        # bf16 logits would flip near-tied selections and quantise the combine weights; so no autocast here.
        router_dtype = torch.promote_types(x_ND.dtype, torch.float32)
        with torch.autocast(device_type=x_ND.device.type, enabled=False):
            logits_NE = F.linear(x_ND.to(router_dtype), self.gate.weight.to(router_dtype))
            if self.router_score == "sigmoid":
                scores_NE = torch.sigmoid(logits_NE)
            else:
                scores_NE = torch.softmax(logits_NE, dim=-1)
        with torch.no_grad():
            expert_ids_NK = torch.topk(scores_NE + self.expert_bias, self.top_k, dim=-1, sorted=False).indices
        selected_NK = scores_NE.gather(1, expert_ids_NK)
        combine_weights_NK = selected_NK / (selected_NK.sum(dim=-1, keepdim=True) + 1e-20)
        return scores_NE, expert_ids_NK, combine_weights_NK * self.routed_scaling_factor

    def forward(self, x_BTD: torch.Tensor) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        if x_BTD.dim() != 3 or x_BTD.shape[-1] != self.hidden_size:
            raise ValueError(
                f"MoE input: expected a [batch, seq, hidden_size={self.hidden_size}] tensor, got shape "
                f"{tuple(x_BTD.shape)}"
            )
        B, T, D = x_BTD.shape
        x_ND = x_BTD.reshape(B * T, D)
        scores_NE, expert_ids_NK, combine_weights_NK = self.route(x_ND)

        expert_ids_R = expert_ids_NK.reshape(-1)  # pair r = token * K + slot
        pairs_per_expert_E = torch.bincount(expert_ids_R, minlength=self.num_experts)
        if self.training and _not_recomputing():
            with torch.no_grad():
                self.tokens_per_expert.add_(pairs_per_expert_E.to(self.tokens_per_expert.dtype))

        y_ND = self._routed_experts(x_ND, expert_ids_R, pairs_per_expert_E, combine_weights_NK)
        if self.shared_experts is not None:
            shared_ND, _ = self.shared_experts(x_ND)
            y_ND = y_ND + shared_ND.to(y_ND.dtype)

        aux_loss = None
        if self.training and self.aux_loss_coef > 0:
            aux_loss = self.aux_loss_coef * self.sequence_balance_loss(
                scores_NE.view(B, T, self.num_experts), expert_ids_NK.view(B, T, self.top_k)
            )
        return y_ND.view(B, T, D), aux_loss

    def _routed_experts(
        self,
        x_ND: torch.Tensor,
        expert_ids_R: torch.Tensor,
        pairs_per_expert_E: torch.Tensor,
        combine_weights_NK: torch.Tensor,
    ) -> torch.Tensor:
        N, D = x_ND.shape
        compute_dtype = _compute_dtype(x_ND, self.w_gate)
        # Sort the pairs by expert once; stable so each expert sees its tokens in sequence order.
        sorted_pairs_R = torch.argsort(expert_ids_R, stable=True)
        token_of_sorted_R = torch.div(sorted_pairs_R, self.top_k, rounding_mode="floor")
        x_sorted_RD = x_ND.to(compute_dtype).index_select(0, token_of_sorted_R)

        if self.expert_dispatch is None:
            y_sorted_RD = self.expert_ffn(x_sorted_RD, pairs_per_expert_E)
        else:
            y_sorted_RD = self.expert_dispatch(x_sorted_RD, pairs_per_expert_E, self.expert_ffn)

        # Un-sort with a gather (a permutation, so its backward has no colliding writes: deterministic).
        unsort_R = torch.empty_like(sorted_pairs_R)
        unsort_R[sorted_pairs_R] = torch.arange(sorted_pairs_R.numel(), device=sorted_pairs_R.device)
        y_NKD = y_sorted_RD.index_select(0, unsort_R).view(N, self.top_k, D)
        # Broadcast multiply + sum: einsum lowers this to a tiny-matrix bmm that is ~6x slower on CPU.
        return (y_NKD * combine_weights_NK.to(compute_dtype).unsqueeze(-1)).sum(dim=1)

    def expert_ffn(self, x_sorted_RD: torch.Tensor, pairs_per_expert_L: torch.Tensor) -> torch.Tensor:
        """The SwiGLU of the experts this module holds (L = ``w_gate.shape[0]``, all E without expert
        parallelism) on pairs sorted by expert, ``pairs_per_expert_L`` rows each; computes in ``x``'s dtype."""
        dtype, impl = x_sorted_RD.dtype, self.grouped_mm_impl
        gate_RF = grouped_mm(x_sorted_RD, self.w_gate.to(dtype), pairs_per_expert_L, impl)
        up_RF = grouped_mm(x_sorted_RD, self.w_up.to(dtype), pairs_per_expert_L, impl)
        return grouped_mm(F.silu(gate_RF) * up_RF, self.w_down.to(dtype), pairs_per_expert_L, impl)

    def sequence_balance_loss(self, scores_BTE: torch.Tensor, expert_ids_BTK: torch.Tensor) -> torch.Tensor:
        """DeepSeek-V3 sequence-wise balance loss (without ``alpha``), averaged over batch rows.

        Per row: ``sum_i f_i * P_i`` with ``f_i = E / (K * T) * #{t : i in topk(t)}`` and
        ``P_i = mean_t s'_{t,i}``, where ``s'`` are the scores normalised to sum to 1 over all experts.
        Equals 1 for a perfectly balanced row; only ``P`` carries gradient.
        """
        B, T, E = scores_BTE.shape
        normalised_BTE = scores_BTE / (scores_BTE.sum(dim=-1, keepdim=True) + 1e-20)
        mean_score_BE = normalised_BTE.mean(dim=1)
        with torch.no_grad():
            counts_BE = torch.zeros(B, E, device=scores_BTE.device, dtype=torch.float32)
            counts_BE.scatter_add_(
                1, expert_ids_BTK.reshape(B, -1), torch.ones(B, T * self.top_k, device=scores_BTE.device)
            )
            fraction_BE = counts_BE * (E / (self.top_k * T))
        return (fraction_BE * mean_score_BE).sum(dim=-1).mean()

    # ------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def update_expert_bias(self, global_tokens_per_expert: Optional[torch.Tensor] = None) -> dict:
        """Aux-loss-free balancing step: ``expert_bias += rate * sign(mean_load - load)`` (DeepSeek-V3).

        ``global_tokens_per_expert``: the ``tokens_per_expert`` buffer summed over data-parallel ranks (the
        engine all-reduces it); ``None`` uses this rank's counts. Zeroes the counts and returns the load
        statistics the step was based on (see :meth:`load_statistics`). No-op on the bias when the rate is 0 or
        no tokens were counted.
        """
        if global_tokens_per_expert is None:
            load_E = self.tokens_per_expert.clone()
        else:
            if global_tokens_per_expert.shape != (self.num_experts,):
                raise ValueError(
                    f"update_expert_bias global_tokens_per_expert: expected shape ({self.num_experts},), got "
                    f"{tuple(global_tokens_per_expert.shape)}"
                )
            load_E = global_tokens_per_expert.detach().to(device=self.expert_bias.device, dtype=torch.float32)
        stats = _load_statistics(load_E)
        if self.bias_update_rate > 0 and stats["routed_tokens"] > 0:
            self.expert_bias.add_(self.bias_update_rate * torch.sign(load_E.mean() - load_E))
        self.tokens_per_expert.zero_()
        stats["expert_bias"] = self.expert_bias.detach().cpu().clone()
        return stats

    @torch.no_grad()
    def load_statistics(self) -> dict:
        """Load since the last bias update, without resetting it.

        Keys: ``tokens_per_expert`` (counts, CPU tensor), ``load_fraction`` (counts / total),
        ``routed_tokens`` (total token-expert pairs), ``max_to_mean_load`` (max load / mean load; 1 = perfect)
        and ``max_violation`` (``max_to_mean_load - 1``, MaxVio of the loss-free balancing paper).
        """
        return _load_statistics(self.tokens_per_expert)

    # ------------------------------------------------------------------------------------------------
    def forward_flops_per_token(self, seq_len: int) -> float:
        """Router ``2*D*E`` + ``top_k`` routed experts x 3 matmuls x ``2*D*F`` + shared ``3*2*D*(S*F)``.

        The combine (weighted sum of k outputs) and the routing elementwise work are ignored.
        """
        D, F_ = self.hidden_size, self.expert_ffn_dim
        shared = 3 * 2 * D * self.num_shared_experts * F_
        return 2 * D * self.num_experts + self.top_k * 3 * 2 * D * F_ + shared

    def active_parameters(self) -> int:
        """Parameters touched per token: router ``D*E`` + ``top_k * 3*D*F`` + shared ``3*D*S*F``."""
        D, F_ = self.hidden_size, self.expert_ffn_dim
        return D * self.num_experts + (self.top_k + self.num_shared_experts) * 3 * D * F_

    def total_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def extra_repr(self) -> str:
        return (
            f"experts={self.num_experts}, top_k={self.top_k}, expert_ffn_dim={self.expert_ffn_dim}, "
            f"shared={self.num_shared_experts}, score={self.router_score}, "
            f"routed_scaling_factor={self.routed_scaling_factor}, bias_update_rate={self.bias_update_rate}, "
            f"aux_loss_coef={self.aux_loss_coef}"
        )


# ----------------------------------------------------------------------------------------------------
def _require(ok: bool, name: str, value, expected: str) -> None:
    if not ok:
        raise ValueError(f"MoE {name}={value!r}: expected {expected}")


def _not_recomputing() -> bool:
    # Activation checkpointing re-runs forward inside backward; counting again would double the loads.
    return torch._C._current_graph_task_id() == -1


def _compute_dtype(x: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    # Follow autocast like nn.Linear would; otherwise compute in the weights' dtype.
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return weight.dtype


def _load_statistics(counts_E: torch.Tensor) -> dict:
    counts_E = counts_E.detach().float().cpu()
    total = float(counts_E.sum())
    if total > 0:
        fraction_E = counts_E / total
        max_to_mean = float(counts_E.max() / counts_E.mean())
    else:
        fraction_E = torch.zeros_like(counts_E)
        max_to_mean = 0.0
    return {
        "tokens_per_expert": counts_E,
        "load_fraction": fraction_E,
        "routed_tokens": total,
        "max_to_mean_load": max_to_mean,
        "max_violation": max(max_to_mean - 1.0, 0.0),
    }
