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


def merge_reference(
    o_TD: torch.Tensor,
    lse_T: torch.Tensor,
    previous_output_TD: Optional[torch.Tensor],
    previous_partial_TD: Optional[torch.Tensor],
    query_D: torch.Tensor,
    norm_weight_D: Optional[torch.Tensor] = None,
    eps: float = 1e-6,
    norm_eps: float = 1e-6,
) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Phase 2 of sublayer j with the partial-sum update folded in: ``(input of sublayer j, p_j)``.

    ``p_j = p_{j-1} + f_{j-1}`` (``previous_partial_TD`` is None at j = 1, where ``p_1 = f_0``; both are None at
    j = 0, which has no partial sum); the input is :func:`phase2_reference` of ``p_j``.
    """
    if previous_output_TD is None:
        partial_TD = None
    elif previous_partial_TD is None:
        partial_TD = previous_output_TD
    else:
        partial_TD = previous_partial_TD + previous_output_TD
    return phase2_reference(o_TD, lse_T, partial_TD, query_D, norm_weight_D, eps, norm_eps), partial_TD


def close_reference(
    partial_TD: Optional[torch.Tensor], output_TD: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """The block summary ``b = p_{S-1} + f_{S-1}`` (just ``f_0`` for a one-sublayer block) and its rstd."""
    summary_TD = output_TD if partial_TD is None else partial_TD + output_TD
    return summary_TD, source_rstd_reference(summary_TD, eps)


def block_phase1_torch(
    sources_TD: Sequence[torch.Tensor],
    rstd_T: Sequence[torch.Tensor],
    queries_D: Sequence[torch.Tensor],
    key_weights_D: Sequence[torch.Tensor],
    source_grads=None,
    first_norm=None,
) -> tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor]:
    """Phase 1 with the interface of ``block_attnres.block_phase1``, in torch: ``(outputs, lse, queries_SD)``.
    The effective queries take the merges' place of the kernels' parameter block; ``source_grads`` and
    ``first_norm`` are unused (autograd sums the sources' gradients here; the first merge applies its norm)."""
    queries_SD = torch.stack([w * q for q, w in zip(queries_D, key_weights_D)])
    outputs, lse_ST = phase1_reference(sources_TD, torch.stack(list(rstd_T)), queries_SD)
    return outputs, list(lse_ST.unbind(0)), queries_SD


def block_merge_torch(o_TD, lse_T, previous_output_TD, previous_partial_TD, queries_SD, index, norm_weight_D=None,
                      eps=1e-6, norm_eps=1e-6):
    """:func:`merge_reference` with the interface of ``block_attnres.block_merge``."""
    return merge_reference(o_TD, lse_T, previous_output_TD, previous_partial_TD, queries_SD[index], norm_weight_D,
                           eps, norm_eps)
