"""Pure-torch reference of the two-phase Block AttnRes computation (the math the Triton kernels implement).

Block AttnRes mixes, for sublayer j of block n, the completed block summaries [b_0 .. b_{n-1}] and (from the
second sublayer of the block on) the block's running partial sum p_j:

    logit_i = rstd(v_i) * (v_i . q_j)          q_j = key-norm weight * pseudo-query of sublayer j
    h_j     = sum_i softmax(logit)_i v_i

The pseudo-queries do not depend on the input, so all sublayers of a block can score the completed blocks
together (phase 1), keeping per token only their output and log-sum-exp; each sublayer then folds its own partial
sum in with an online-softmax merge (phase 2), optionally followed by the RMSNorm that comes next.

The completed sources arrive as a list (the model keeps them as separate tensors; nothing is stacked per block)
and phase 1 returns one output per query, so each sublayer owns its own tensor. Phase 2 computes the partial
sum's rstd itself: the partial sum is new at every sublayer, and its rstd is needed nowhere else.

Shapes: N completed sources, S queries, T tokens (batch and sequence flattened), D hidden.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch


def _compute(x: torch.Tensor) -> torch.Tensor:
    """``x`` in at least fp32 (float64 stays float64, so the reference can be checked in double precision)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def phase1_reference(
    sources_TD: Sequence[torch.Tensor], rstd_NT: torch.Tensor, queries_SD: torch.Tensor
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Scores every source against every query at once.

    Returns the S outputs ``o_TD`` (each query's softmax mix over the sources, in the sources' dtype) and
    ``lse_ST`` (fp32 log-sum-exp of each query's logits), all that phase 2 needs.
    """
    values_NTD = _compute(torch.stack(list(sources_TD)))
    logits_SNT = torch.einsum("ntd,sd->snt", values_NTD, queries_SD.to(values_NTD.dtype))
    logits_SNT = logits_SNT * rstd_NT.to(values_NTD.dtype)[None]
    lse_ST = torch.logsumexp(logits_SNT, dim=1)
    weights_SNT = torch.exp(logits_SNT - lse_ST[:, None])
    o_STD = torch.einsum("snt,ntd->std", weights_SNT, values_NTD).to(sources_TD[0].dtype)
    return list(o_STD.unbind(0)), lse_ST


def source_rstd_reference(v_TD: torch.Tensor, eps: float) -> torch.Tensor:
    """Per-token 1/RMS of a source, in at least fp32 (the rstd the key RMSNorm applies)."""
    vc = _compute(v_TD)
    return torch.rsqrt(vc.pow(2).mean(-1) + eps)


def phase2_reference(
    o_TD: torch.Tensor,
    lse_T: torch.Tensor,
    partial_TD: Optional[torch.Tensor],
    query_D: torch.Tensor,
    norm_weight_D: Optional[torch.Tensor] = None,
    eps: float = 1e-6,
    norm_eps: float = 1e-6,
) -> torch.Tensor:
    """Merges one query's phase-1 result with its partial-sum source; applies ``RMSNorm(norm_weight)`` if given.

    ``eps`` is the key RMSNorm's (it sets the partial sum's rstd), ``norm_eps`` the following RMSNorm's. Without a
    partial sum (the first sublayer of a block) the phase-1 output is the mix already.
    """
    h_TD = _compute(o_TD)
    if partial_TD is not None:
        partial = partial_TD.to(h_TD.dtype)
        logit_T = source_rstd_reference(partial, eps) * (partial @ query_D.to(h_TD.dtype))
        lse_T = lse_T.to(h_TD.dtype)
        total_T = torch.logaddexp(lse_T, logit_T)
        h_TD = torch.exp(lse_T - total_T)[:, None] * h_TD + torch.exp(logit_T - total_T)[:, None] * partial
    if norm_weight_D is not None:
        h_TD = h_TD * torch.rsqrt(h_TD.pow(2).mean(-1, keepdim=True) + norm_eps) * norm_weight_D.to(h_TD.dtype)
    return h_TD.to(o_TD.dtype)
