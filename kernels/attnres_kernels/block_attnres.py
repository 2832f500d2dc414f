"""Triton kernels of the two-phase Block AttnRes (forward and backward) and their autograd functions.

Phase 1 (:func:`block_phase1`): all S queries of a block score the N completed block summaries together.

* forward: ``_phase1_scores`` reads every source once per D chunk and keeps each (source, query, token) logit and
  the per-(query, token) log-sum-exp (fp32, N x S x T and S x T: per-token statistics, no D dimension);
  ``_phase1_mix`` reads the sources once more and writes the S outputs.
* backward: ``_phase1_score_grads`` forms dp = dO . v and delta = dO . o in one pass over D, then the logit
  gradients; ``_phase1_value_grads`` writes dV. dQ is one matmul (torch). Nothing of size D is saved besides the
  outputs; the probabilities are recomputed from the saved logits and log-sum-exps.

Phase 2 (:func:`block_phase2`): one sublayer merges its phase-1 result with its partial-sum source (online
softmax) and optionally applies the following RMSNorm, row by row; backward recomputes the merge from the saved
per-token partial logit and RMSNorm reciprocal.

The rstd of each source is an input (it is computed once per source and shared by many mixes); the kernels
return its gradient so autograd carries it on through the torch code that computed it.

All arithmetic is fp32; inputs and outputs keep the sources' dtype. Shapes: N sources, S queries, T tokens,
D hidden.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

# --------------------------------------------------------------------------------------------------------------
# Phase 1
# --------------------------------------------------------------------------------------------------------------


@triton.jit
def _phase1_scores(v_ptr, rstd_ptr, q_ptr, logits_ptr, lse_ptr, N, S, T, D,
                   S_PAD: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    offs_t = (tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)).to(tl.int64)
    offs_s = tl.arange(0, S_PAD)
    mask_t = offs_t < T
    mask_st = (offs_s[:, None] < S) & mask_t[None, :]
    TD = T.to(tl.int64) * D  # element offsets of [N or S, T, D] tensors pass 2**31 at realistic sizes
    running_max = tl.full([S_PAD, BLOCK_T], float("-inf"), tl.float32)
    running_sum = tl.zeros([S_PAD, BLOCK_T], tl.float32)
    for i in range(N):
        dots = tl.zeros([S_PAD, BLOCK_T], tl.float32)
        for d0 in range(0, D, BLOCK_D):
            offs_d = d0 + tl.arange(0, BLOCK_D)
            mask_d = offs_d < D
            v = tl.load(v_ptr + i * TD + offs_t[:, None] * D + offs_d[None, :],
                        mask=mask_t[:, None] & mask_d[None, :], other=0.0).to(tl.float32)
            q = tl.load(q_ptr + offs_s[:, None] * D + offs_d[None, :],
                        mask=(offs_s[:, None] < S) & mask_d[None, :], other=0.0).to(tl.float32)
            dots += tl.sum(q[:, None, :] * v[None, :, :], axis=2)
        rstd = tl.load(rstd_ptr + i * T + offs_t, mask=mask_t, other=0.0).to(tl.float32)
        logit = dots * rstd[None, :]
        tl.store(logits_ptr + i * S * T + offs_s[:, None] * T + offs_t[None, :], logit, mask=mask_st)
        new_max = tl.maximum(running_max, logit)
        running_sum = running_sum * tl.exp(running_max - new_max) + tl.exp(logit - new_max)
        running_max = new_max
    tl.store(lse_ptr + offs_s[:, None] * T + offs_t[None, :], running_max + tl.log(running_sum), mask=mask_st)


@triton.jit
def _phase1_mix(v_ptr, logits_ptr, lse_ptr, o_ptr, N, S, T, D,
                S_PAD: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    offs_t = (tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)).to(tl.int64)
    offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    offs_s = tl.arange(0, S_PAD)
    mask_t = offs_t < T
    mask_td = mask_t[:, None] & (offs_d[None, :] < D)
    mask_st = (offs_s[:, None] < S) & mask_t[None, :]
    TD = T.to(tl.int64) * D
    lse = tl.load(lse_ptr + offs_s[:, None] * T + offs_t[None, :], mask=mask_st, other=0.0)
    acc = tl.zeros([S_PAD, BLOCK_T, BLOCK_D], tl.float32)
    for i in range(N):
        logit = tl.load(logits_ptr + i * S * T + offs_s[:, None] * T + offs_t[None, :], mask=mask_st, other=0.0)
        weight = tl.where(mask_st, tl.exp(logit - lse), 0.0)
        v = tl.load(v_ptr + i * TD + offs_t[:, None] * D + offs_d[None, :], mask=mask_td, other=0.0)
        acc += weight[:, :, None] * v.to(tl.float32)[None, :, :]
    o_offsets = offs_s[:, None, None] * TD + offs_t[None, :, None] * D + offs_d[None, None, :]
    o_mask = (offs_s[:, None, None] < S) & mask_td[None, :, :]
    tl.store(o_ptr + o_offsets, acc.to(o_ptr.dtype.element_ty), mask=o_mask)


@triton.jit
def _phase1_score_grads(v_ptr, do_ptr, dlse_ptr, logits_ptr, lse_ptr, rstd_ptr, dp_ptr, dlogits_ptr, drstd_ptr,
                        N, S, T, D, S_PAD: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    offs_t = (tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)).to(tl.int64)
    offs_s = tl.arange(0, S_PAD)
    mask_t = offs_t < T
    mask_st = (offs_s[:, None] < S) & mask_t[None, :]
    st_offsets = offs_s[:, None] * T + offs_t[None, :]
    TD = T.to(tl.int64) * D
    # dp[i] = dO . v_i is accumulated over D chunks in a scratch row owned by this program (no other program
    # touches these tokens), so dO and every source are read once. The barrier orders each chunk's stores
    # before the next chunk's loads across the program's threads.
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        mask_td = mask_t[:, None] & (offs_d[None, :] < D)
        std_offsets = offs_s[:, None, None] * TD + offs_t[None, :, None] * D + offs_d[None, None, :]
        std_mask = (offs_s[:, None, None] < S) & mask_td[None, :, :]
        do = tl.load(do_ptr + std_offsets, mask=std_mask, other=0.0).to(tl.float32)
        for i in range(N):
            v = tl.load(v_ptr + i * TD + offs_t[:, None] * D + offs_d[None, :], mask=mask_td,
                        other=0.0).to(tl.float32)
            partial = tl.sum(do * v[None, :, :], axis=2)
            scratch = dp_ptr + i * S * T + st_offsets
            if d0 == 0:
                tl.store(scratch, partial, mask=mask_st)
            else:
                tl.store(scratch, tl.load(scratch, mask=mask_st, other=0.0) + partial, mask=mask_st)
        tl.debug_barrier()
    lse = tl.load(lse_ptr + st_offsets, mask=mask_st, other=0.0)
    dlse = tl.load(dlse_ptr + st_offsets, mask=mask_st, other=0.0)
    # delta = dO . o = sum_i p_i dp_i, from the fp32 dp (dO . o with o stored in bf16 would lose the small
    # difference dp - delta that the logit gradient is made of)
    delta = tl.zeros([S_PAD, BLOCK_T], tl.float32)
    for i in range(N):
        logit = tl.load(logits_ptr + i * S * T + st_offsets, mask=mask_st, other=0.0)
        dp = tl.load(dp_ptr + i * S * T + st_offsets, mask=mask_st, other=0.0)
        delta += tl.where(mask_st, tl.exp(logit - lse), 0.0) * dp
    for i in range(N):
        logit = tl.load(logits_ptr + i * S * T + st_offsets, mask=mask_st, other=0.0)
        dp = tl.load(dp_ptr + i * S * T + st_offsets, mask=mask_st, other=0.0)
        prob = tl.where(mask_st, tl.exp(logit - lse), 0.0)
        dlogit = prob * (dp - delta + dlse)
        tl.store(dlogits_ptr + i * S * T + st_offsets, dlogit, mask=mask_st)
        rstd = tl.load(rstd_ptr + i * T + offs_t, mask=mask_t, other=1.0).to(tl.float32)
        # logit = rstd * (v . q), so d logit / d rstd = v . q = logit / rstd
        drstd = tl.sum(dlogit * logit, axis=0) / rstd
        tl.store(drstd_ptr + i * T + offs_t, drstd, mask=mask_t)


@triton.jit
def _phase1_value_grads(q_ptr, do_ptr, logits_ptr, lse_ptr, dlogits_ptr, rstd_ptr, dv_ptr, N, S, T, D,
                        S_PAD: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    offs_t = (tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)).to(tl.int64)
    offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    offs_s = tl.arange(0, S_PAD)
    mask_t = offs_t < T
    mask_d = offs_d < D
    mask_td = mask_t[:, None] & mask_d[None, :]
    mask_st = (offs_s[:, None] < S) & mask_t[None, :]
    st_offsets = offs_s[:, None] * T + offs_t[None, :]
    TD = T.to(tl.int64) * D
    std_offsets = offs_s[:, None, None] * TD + offs_t[None, :, None] * D + offs_d[None, None, :]
    do = tl.load(do_ptr + std_offsets, mask=(offs_s[:, None, None] < S) & mask_td[None, :, :],
                 other=0.0).to(tl.float32)
    q = tl.load(q_ptr + offs_s[:, None] * D + offs_d[None, :], mask=(offs_s[:, None] < S) & mask_d[None, :],
                other=0.0).to(tl.float32)
    lse = tl.load(lse_ptr + st_offsets, mask=mask_st, other=0.0)
    for i in range(N):
        logit = tl.load(logits_ptr + i * S * T + st_offsets, mask=mask_st, other=0.0)
        prob = tl.where(mask_st, tl.exp(logit - lse), 0.0)
        dlogit = tl.load(dlogits_ptr + i * S * T + st_offsets, mask=mask_st, other=0.0)
        rstd = tl.load(rstd_ptr + i * T + offs_t, mask=mask_t, other=0.0).to(tl.float32)
        dv = tl.sum(prob[:, :, None] * do, axis=0) + rstd[:, None] * tl.sum(dlogit[:, :, None] * q[:, None, :], axis=0)
        tl.store(dv_ptr + i * TD + offs_t[:, None] * D + offs_d[None, :], dv.to(dv_ptr.dtype.element_ty),
                 mask=mask_td)


def _phase1_blocks(S: int, D: int) -> tuple[int, int, int]:
    s_pad = max(2, triton.next_power_of_2(S))
    block_d = min(64, triton.next_power_of_2(D))
    block_t = max(1, min(32, 4096 // (s_pad * block_d)))  # keeps the [S, T, D] register tile at ~4K floats
    return s_pad, block_t, block_d


class _Phase1(torch.autograd.Function):
    @staticmethod
    def forward(ctx, sources_NTD, rstd_NT, queries_SD):
        N, T, D = sources_NTD.shape
        S = queries_SD.shape[0]
        sources_NTD, rstd_NT, queries_SD = sources_NTD.contiguous(), rstd_NT.contiguous(), queries_SD.contiguous()
        logits_NST = torch.empty(N, S, T, device=sources_NTD.device, dtype=torch.float32)
        lse_ST = torch.empty(S, T, device=sources_NTD.device, dtype=torch.float32)
        o_STD = torch.empty(S, T, D, device=sources_NTD.device, dtype=sources_NTD.dtype)
        s_pad, block_t, block_d = _phase1_blocks(S, D)
        _phase1_scores[(triton.cdiv(T, block_t),)](
            sources_NTD, rstd_NT, queries_SD, logits_NST, lse_ST, N, S, T, D,
            S_PAD=s_pad, BLOCK_T=block_t, BLOCK_D=block_d)
        _phase1_mix[(triton.cdiv(T, block_t), triton.cdiv(D, block_d))](
            sources_NTD, logits_NST, lse_ST, o_STD, N, S, T, D, S_PAD=s_pad, BLOCK_T=block_t, BLOCK_D=block_d)
        ctx.save_for_backward(sources_NTD, rstd_NT, queries_SD, logits_NST, lse_ST)
        return o_STD, lse_ST

    @staticmethod
    def backward(ctx, do_STD, dlse_ST):
        sources_NTD, rstd_NT, queries_SD, logits_NST, lse_ST = ctx.saved_tensors
        N, T, D = sources_NTD.shape
        S = queries_SD.shape[0]
        do_STD, dlse_ST = do_STD.contiguous(), dlse_ST.contiguous().float()  # autograd materialises zeros
        dp_NST = torch.empty_like(logits_NST)
        dlogits_NST = torch.empty_like(logits_NST)
        drstd_NT = torch.empty(N, T, device=rstd_NT.device, dtype=torch.float32)
        dv_NTD = torch.empty_like(sources_NTD)
        s_pad, block_t, block_d = _phase1_blocks(S, D)
        _phase1_score_grads[(triton.cdiv(T, block_t),)](
            sources_NTD, do_STD, dlse_ST, logits_NST, lse_ST, rstd_NT, dp_NST, dlogits_NST, drstd_NT,
            N, S, T, D, S_PAD=s_pad, BLOCK_T=block_t, BLOCK_D=block_d)
        _phase1_value_grads[(triton.cdiv(T, block_t), triton.cdiv(D, block_d))](
            queries_SD, do_STD, logits_NST, lse_ST, dlogits_NST, rstd_NT, dv_NTD, N, S, T, D,
            S_PAD=s_pad, BLOCK_T=block_t, BLOCK_D=block_d)
        # dq_s = sum_{i,t} dlogit_sit * rstd_it * v_it: a matmul over the N*T rows, in fp32 (bf16 weights would
        # round away most of dq), chunked so the fp32 copy of the sources stays small.
        weights_SR = (dlogits_NST * rstd_NT[:, None, :].float()).permute(1, 0, 2).reshape(S, N * T)
        rows_RD = sources_NTD.reshape(N * T, D)
        dq_SD = torch.zeros(S, D, device=queries_SD.device, dtype=torch.float32)
        chunk = max(1, (1 << 24) // D)
        for start in range(0, N * T, chunk):
            dq_SD += weights_SR[:, start:start + chunk] @ rows_RD[start:start + chunk].float()
        return dv_NTD, drstd_NT.to(rstd_NT.dtype), dq_SD.to(queries_SD.dtype)


def block_phase1(
    sources_NTD: torch.Tensor, rstd_NT: torch.Tensor, queries_SD: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Phase 1 on the GPU: ``(o_STD, lse_ST)`` as :func:`attnres_kernels.reference.phase1_reference`."""
    return _Phase1.apply(sources_NTD, rstd_NT, queries_SD)


# --------------------------------------------------------------------------------------------------------------
# Phase 2
# --------------------------------------------------------------------------------------------------------------


@triton.jit
def _phase2_forward(o_ptr, lse_ptr, p_ptr, prstd_ptr, q_ptr, w_ptr, y_ptr, plogit_ptr, nrstd_ptr, T, D, eps,
                    HAS_PARTIAL: tl.constexpr, HAS_NORM: tl.constexpr, ROWS: tl.constexpr, BLOCK_D: tl.constexpr):
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < D
    if HAS_PARTIAL:
        q = tl.load(q_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)
    if HAS_NORM:
        w = tl.load(w_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)
    for r in range(ROWS):
        t = tl.program_id(0) * ROWS + r
        if t < T:
            row = t.to(tl.int64) * D
            h = tl.load(o_ptr + row + offs_d, mask=mask_d, other=0.0).to(tl.float32)
            if HAS_PARTIAL:
                p = tl.load(p_ptr + row + offs_d, mask=mask_d, other=0.0).to(tl.float32)
                lse = tl.load(lse_ptr + t)
                plogit = tl.load(prstd_ptr + t).to(tl.float32) * tl.sum(p * q, axis=0)
                tl.store(plogit_ptr + t, plogit)
                share = 1.0 / (1.0 + tl.exp(lse - plogit))  # softmax weight of the partial sum
                h = (1.0 - share) * h + share * p
            if HAS_NORM:
                nrstd = 1.0 / tl.sqrt(tl.sum(h * h, axis=0) / D + eps)
                tl.store(nrstd_ptr + t, nrstd)
                h = h * nrstd * w
            tl.store(y_ptr + row + offs_d, h.to(y_ptr.dtype.element_ty), mask=mask_d)


@triton.jit
def _phase2_backward(dy_ptr, o_ptr, lse_ptr, p_ptr, prstd_ptr, q_ptr, w_ptr, plogit_ptr, nrstd_ptr,
                     do_ptr, dlse_ptr, dp_ptr, dprstd_ptr, dq_part_ptr, dw_part_ptr, T, D,
                     HAS_PARTIAL: tl.constexpr, HAS_NORM: tl.constexpr, ROWS: tl.constexpr, BLOCK_D: tl.constexpr):
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < D
    dq_acc = tl.zeros([BLOCK_D], tl.float32)
    dw_acc = tl.zeros([BLOCK_D], tl.float32)
    if HAS_PARTIAL:
        q = tl.load(q_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)
    if HAS_NORM:
        w = tl.load(w_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)
    for r in range(ROWS):
        t = tl.program_id(0) * ROWS + r
        if t < T:
            row = t.to(tl.int64) * D
            o = tl.load(o_ptr + row + offs_d, mask=mask_d, other=0.0).to(tl.float32)
            dh = tl.load(dy_ptr + row + offs_d, mask=mask_d, other=0.0).to(tl.float32)
            h = o
            if HAS_PARTIAL:
                p = tl.load(p_ptr + row + offs_d, mask=mask_d, other=0.0).to(tl.float32)
                lse = tl.load(lse_ptr + t)
                plogit = tl.load(plogit_ptr + t)
                share = 1.0 / (1.0 + tl.exp(lse - plogit))
                h = (1.0 - share) * o + share * p
            if HAS_NORM:
                nrstd = tl.load(nrstd_ptr + t)
                dw_acc += dh * h * nrstd
                g = dh * w
                dh = nrstd * g - h * (nrstd * nrstd * nrstd) * tl.sum(g * h, axis=0) / D
            if HAS_PARTIAL:
                tl.store(do_ptr + row + offs_d, ((1.0 - share) * dh).to(do_ptr.dtype.element_ty), mask=mask_d)
                # share = sigmoid(plogit - lse): d share / d plogit = share * (1 - share)
                dz = (tl.sum(dh * p, axis=0) - tl.sum(dh * o, axis=0)) * share * (1.0 - share)
                tl.store(dlse_ptr + t, -dz)
                prstd = tl.load(prstd_ptr + t).to(tl.float32)
                dp = share * dh + dz * prstd * q
                tl.store(dp_ptr + row + offs_d, dp.to(dp_ptr.dtype.element_ty), mask=mask_d)
                tl.store(dprstd_ptr + t, dz * tl.sum(p * q, axis=0))
                dq_acc += dz * prstd * p
            else:
                tl.store(do_ptr + row + offs_d, dh.to(do_ptr.dtype.element_ty), mask=mask_d)
    if HAS_PARTIAL:
        tl.store(dq_part_ptr + tl.program_id(0) * D + offs_d, dq_acc, mask=mask_d)
    if HAS_NORM:
        tl.store(dw_part_ptr + tl.program_id(0) * D + offs_d, dw_acc, mask=mask_d)


_PHASE2_ROWS = 32  # rows per program: the weight/query gradient partials stay T / 32 x D


def _phase2_warps(block_d: int) -> int:
    # one row of D per program: wide rows need more threads to keep the live fp32 vectors in registers
    return 4 if block_d <= 1024 else 8 if block_d <= 4096 else 16


class _Phase2(torch.autograd.Function):
    @staticmethod
    def forward(ctx, o_TD, lse_T, partial_TD, partial_rstd_T, query_D, norm_weight_D, norm_eps):
        T, D = o_TD.shape
        has_partial, has_norm = partial_TD is not None, norm_weight_D is not None
        o_TD, lse_T = o_TD.contiguous(), lse_T.contiguous().float()
        partial_TD = partial_TD.contiguous() if has_partial else o_TD
        partial_rstd_T = partial_rstd_T.contiguous() if has_partial else lse_T
        query_D = query_D.contiguous()
        weight_D = norm_weight_D.contiguous() if has_norm else query_D
        y_TD = torch.empty_like(o_TD)
        plogit_T = torch.empty(T, device=o_TD.device, dtype=torch.float32)
        nrstd_T = torch.empty(T, device=o_TD.device, dtype=torch.float32)
        _phase2_forward[(triton.cdiv(T, _PHASE2_ROWS),)](
            o_TD, lse_T, partial_TD, partial_rstd_T, query_D, weight_D, y_TD, plogit_T, nrstd_T, T, D, norm_eps,
            HAS_PARTIAL=has_partial, HAS_NORM=has_norm, ROWS=_PHASE2_ROWS, BLOCK_D=triton.next_power_of_2(D),
            num_warps=_phase2_warps(triton.next_power_of_2(D)))
        ctx.save_for_backward(o_TD, lse_T, partial_TD, partial_rstd_T, query_D, weight_D, plogit_T, nrstd_T)
        ctx.flags = (has_partial, has_norm)
        return y_TD

    @staticmethod
    def backward(ctx, dy_TD):
        o_TD, lse_T, partial_TD, partial_rstd_T, query_D, weight_D, plogit_T, nrstd_T = ctx.saved_tensors
        has_partial, has_norm = ctx.flags
        T, D = o_TD.shape
        programs = triton.cdiv(T, _PHASE2_ROWS)
        do_TD = torch.empty_like(o_TD)
        dlse_T = torch.zeros(T, device=o_TD.device, dtype=torch.float32)
        dp_TD = torch.empty_like(partial_TD) if has_partial else do_TD
        dprstd_T = torch.empty(T, device=o_TD.device, dtype=torch.float32)
        dq_parts = torch.empty(programs, D, device=o_TD.device, dtype=torch.float32)
        dw_parts = torch.empty(programs, D, device=o_TD.device, dtype=torch.float32)
        _phase2_backward[(programs,)](
            dy_TD.contiguous(), o_TD, lse_T, partial_TD, partial_rstd_T, query_D, weight_D, plogit_T, nrstd_T,
            do_TD, dlse_T, dp_TD, dprstd_T, dq_parts, dw_parts, T, D,
            HAS_PARTIAL=has_partial, HAS_NORM=has_norm, ROWS=_PHASE2_ROWS, BLOCK_D=triton.next_power_of_2(D),
            num_warps=_phase2_warps(triton.next_power_of_2(D)))
        if not has_partial:
            return do_TD, None, None, None, None, (dw_parts.sum(0).to(weight_D.dtype) if has_norm else None), None
        return (do_TD, dlse_T, dp_TD, dprstd_T.to(partial_rstd_T.dtype), dq_parts.sum(0).to(query_D.dtype),
                dw_parts.sum(0).to(weight_D.dtype) if has_norm else None, None)


def block_phase2(
    o_TD: torch.Tensor,
    lse_T: torch.Tensor,
    partial_TD: Optional[torch.Tensor],
    partial_rstd_T: Optional[torch.Tensor],
    query_D: torch.Tensor,
    norm_weight_D: Optional[torch.Tensor] = None,
    norm_eps: float = 1e-6,
) -> torch.Tensor:
    """Phase 2 on the GPU, as :func:`attnres_kernels.reference.phase2_reference`."""
    return _Phase2.apply(o_TD, lse_T, partial_TD, partial_rstd_T, query_D, norm_weight_D, norm_eps)
