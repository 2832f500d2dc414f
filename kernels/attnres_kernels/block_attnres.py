"""Triton kernels of the two-phase Block AttnRes (forward and backward) and their autograd functions.

Data movement is the design goal: per block, every completed source is read from memory once in the forward and
once in the backward, whatever S is. Each kernel works on a tile of BLOCK_T tokens and walks its sources twice,
the second walk re-reading the tile it has just read (a few hundred KB per program, served by L2, not HBM).

Phase 1 (:func:`block_phase1`): all S queries of a block score the N completed block summaries together.

* ``_phase1_forward``: pass 1 forms every (source, query) logit of the tile and the per-query log-sum-exp
  (online over sources); pass 2 mixes the sources into the S outputs. The logits (fp32, N x S x T, no D) and
  log-sum-exps are kept for the backward.
* ``_phase1_backward``: pass 1 forms dp = dO . v for every source (each source read once; the S output
  gradients re-read from L2) and turns it into logit and rstd gradients; pass 2 writes dV and accumulates dQ in
  a per-program fp32 row, so no fp32 copy of the sources is ever made. A fixed number of programs walks the
  token tiles, which keeps those dQ rows few.

The sources and the output gradients are passed as tables of addresses (int64), so the caller's separate tensors
are read in place: no per-block stack of the sources, and each sublayer owns its own phase-1 output, whose
gradient arrives alone (a missing one is a null address and counts as zero).

Phase 2 (:func:`block_phase2`): one sublayer merges its phase-1 result with its partial-sum source (online
softmax), computing the partial sum's rstd on the way, and optionally applies the following RMSNorm, row by row;
backward recomputes the merge from the saved per-token partial logit, partial rstd and norm rstd.

All arithmetic is fp32; inputs and outputs keep the sources' dtype. Shapes: N sources, S queries, T tokens,
D hidden. Integer arguments may be specialised to constants by Triton (a value of 1 is), so no kernel calls a
method on a scalar argument: offsets become int64 through the int64 token offsets.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import triton
import triton.language as tl

# Every kernel launch goes through ``_launch`` so that attnres_kernels.compile_check can record the launches of
# the real host code and compile them for a GPU that is not present.
_launch_hook = None


def _launch(kernel, grid, *args, **meta):
    if _launch_hook is not None:
        return _launch_hook(kernel, grid, args, meta)
    return kernel[grid](*args, **meta)


# --------------------------------------------------------------------------------------------------------------
# Phase 1
# --------------------------------------------------------------------------------------------------------------


@triton.jit
def _phase1_forward(src_table, rstd_ptr, q_ptr, logits_ptr, lse_ptr, o_ptr, N, S, T, D,
                    S_PAD: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    dtype = o_ptr.dtype.element_ty
    offs_t = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_s = tl.arange(0, S_PAD)
    mask_t = offs_t < T
    mask_s = offs_s < S
    mask_st = mask_s[:, None] & mask_t[None, :]
    st_offsets = offs_s[:, None] * T + offs_t[None, :]
    # pass 1: logits, online log-sum-exp over the sources
    running_max = tl.full([S_PAD, BLOCK_T], float("-inf"), tl.float32)
    running_sum = tl.zeros([S_PAD, BLOCK_T], tl.float32)
    for i in range(N):
        v_ptr = tl.load(src_table + i).to(tl.pointer_type(dtype))
        # products summed over D once per source, not per chunk: the chunk loop is loads and FMAs only
        products = tl.zeros([S_PAD, BLOCK_T, BLOCK_D], tl.float32)
        for d0 in range(0, D, BLOCK_D):
            offs_d = d0 + tl.arange(0, BLOCK_D)
            mask_d = offs_d < D
            v = tl.load(v_ptr + offs_t[:, None] * D + offs_d[None, :], mask=mask_t[:, None] & mask_d[None, :],
                        other=0.0).to(tl.float32)
            q = tl.load(q_ptr + offs_s[:, None] * D + offs_d[None, :], mask=mask_s[:, None] & mask_d[None, :],
                        other=0.0).to(tl.float32)
            products += q[:, None, :] * v[None, :, :]
        rstd = tl.load(rstd_ptr + i * T + offs_t, mask=mask_t, other=0.0).to(tl.float32)
        logit = tl.sum(products, axis=2) * rstd[None, :]
        tl.store(logits_ptr + i * S * T + st_offsets, logit, mask=mask_st)
        new_max = tl.maximum(running_max, logit)
        running_sum = running_sum * tl.exp(running_max - new_max) + tl.exp(logit - new_max)
        running_max = new_max
    lse = running_max + tl.log(running_sum)
    tl.store(lse_ptr + st_offsets, lse, mask=mask_st)
    tl.debug_barrier()  # the logits stored above are read back below by other threads of this program
    # pass 2: the mix, one D chunk at a time (the tile's sources come from L2 this time)
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        mask_td = mask_t[:, None] & (offs_d[None, :] < D)
        acc = tl.zeros([S_PAD, BLOCK_T, BLOCK_D], tl.float32)
        for i in range(N):
            v_ptr = tl.load(src_table + i).to(tl.pointer_type(dtype))
            logit = tl.load(logits_ptr + i * S * T + st_offsets, mask=mask_st, other=0.0)
            weight = tl.where(mask_st, tl.exp(logit - lse), 0.0)
            v = tl.load(v_ptr + offs_t[:, None] * D + offs_d[None, :], mask=mask_td, other=0.0).to(tl.float32)
            acc += weight[:, :, None] * v[None, :, :]
        o_offsets = (offs_s[:, None, None] * T + offs_t[None, :, None]) * D + offs_d[None, None, :]
        tl.store(o_ptr + o_offsets, acc.to(dtype), mask=mask_s[:, None, None] & mask_td[None, :, :])


@triton.jit
def _phase1_backward(src_table, do_table, dv_ptr, rstd_ptr, q_ptr, logits_ptr, lse_ptr, dlse_ptr, dlogits_ptr,
                     drstd_ptr, dq_rows_ptr, N, S, T, D, tiles_per_program, HAS_DLSE: tl.constexpr,
                     S_PAD: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    dtype = dv_ptr.dtype.element_ty
    pid = tl.program_id(0)
    offs_s = tl.arange(0, S_PAD)
    mask_s = offs_s < S
    dq_row = dq_rows_ptr + pid.to(tl.int64) * S * D  # this program's fp32 dQ partial [S, D]
    for k in range(tiles_per_program):  # a contiguous run of tiles; the last program's may pass T (masked)
        tile = pid * tiles_per_program + k
        # one address per query's output gradient; 0 where that output got none (loaded per tile: cheaper than
        # keeping the 64-bit addresses live across the tile loop)
        do_address = tl.load(do_table + offs_s, mask=mask_s, other=0)
        has_do = do_address != 0
        do_base = do_address.to(tl.pointer_type(dtype))
        offs_t = tile * BLOCK_T + tl.arange(0, BLOCK_T).to(tl.int64)  # tile * BLOCK_T < T fits int32
        mask_t = offs_t < T
        mask_st = mask_s[:, None] & mask_t[None, :]
        st_offsets = offs_s[:, None] * T + offs_t[None, :]
        do_mask_st = has_do[:, None] & mask_t[None, :]
        # pass 1: dp_i = dO . v_i for every source and query, kept in the dlogits scratch (fp32, no D)
        for i in range(N):
            v_ptr = tl.load(src_table + i).to(tl.pointer_type(dtype))
            products = tl.zeros([S_PAD, BLOCK_T, BLOCK_D], tl.float32)
            for d0 in range(0, D, BLOCK_D):
                offs_d = d0 + tl.arange(0, BLOCK_D)
                mask_d = offs_d < D
                v = tl.load(v_ptr + offs_t[:, None] * D + offs_d[None, :], mask=mask_t[:, None] & mask_d[None, :],
                            other=0.0).to(tl.float32)
                do = tl.load(do_base[:, None, None] + offs_t[None, :, None] * D + offs_d[None, None, :],
                             mask=do_mask_st[:, :, None] & mask_d[None, None, :], other=0.0).to(tl.float32)
                products += do * v[None, :, :]
            tl.store(dlogits_ptr + i * S * T + st_offsets, tl.sum(products, axis=2), mask=mask_st)
        tl.debug_barrier()
        lse = tl.load(lse_ptr + st_offsets, mask=mask_st, other=0.0)
        if HAS_DLSE:
            dlse = tl.load(dlse_ptr + st_offsets, mask=mask_st, other=0.0)
        else:
            dlse = tl.zeros([S_PAD, BLOCK_T], tl.float32)
        # delta = dO . o = sum_i p_i dp_i, from the fp32 dp (dO . o with o stored in bf16 would lose the small
        # difference dp - delta that the logit gradient is made of)
        delta = tl.zeros([S_PAD, BLOCK_T], tl.float32)
        for i in range(N):
            logit = tl.load(logits_ptr + i * S * T + st_offsets, mask=mask_st, other=0.0)
            dp = tl.load(dlogits_ptr + i * S * T + st_offsets, mask=mask_st, other=0.0)
            delta += tl.where(mask_st, tl.exp(logit - lse), 0.0) * dp
        for i in range(N):
            logit = tl.load(logits_ptr + i * S * T + st_offsets, mask=mask_st, other=0.0)
            dp = tl.load(dlogits_ptr + i * S * T + st_offsets, mask=mask_st, other=0.0)
            dlogit = tl.where(mask_st, tl.exp(logit - lse), 0.0) * (dp - delta + dlse)
            tl.store(dlogits_ptr + i * S * T + st_offsets, dlogit, mask=mask_st)
            rstd = tl.load(rstd_ptr + i * T + offs_t, mask=mask_t, other=1.0).to(tl.float32)
            # logit = rstd * (v . q), so d logit / d rstd = v . q = logit / rstd
            tl.store(drstd_ptr + i * T + offs_t, tl.sum(dlogit * logit, axis=0) / rstd, mask=mask_t)
        tl.debug_barrier()
        # pass 2: dV_i = sum_s p dO + rstd_i sum_s dlogit q ;  dQ_s += sum_t dlogit rstd_i v_i
        for d0 in range(0, D, BLOCK_D):
            offs_d = d0 + tl.arange(0, BLOCK_D)
            mask_d = offs_d < D
            mask_td = mask_t[:, None] & mask_d[None, :]
            do = tl.load(do_base[:, None, None] + offs_t[None, :, None] * D + offs_d[None, None, :],
                         mask=do_mask_st[:, :, None] & mask_d[None, None, :], other=0.0).to(tl.float32)
            q = tl.load(q_ptr + offs_s[:, None] * D + offs_d[None, :], mask=mask_s[:, None] & mask_d[None, :],
                        other=0.0).to(tl.float32)
            dq = tl.zeros([S_PAD, BLOCK_D], tl.float32)
            for i in range(N):
                v_ptr = tl.load(src_table + i).to(tl.pointer_type(dtype))
                v = tl.load(v_ptr + offs_t[:, None] * D + offs_d[None, :], mask=mask_td, other=0.0).to(tl.float32)
                logit = tl.load(logits_ptr + i * S * T + st_offsets, mask=mask_st, other=0.0)
                prob = tl.where(mask_st, tl.exp(logit - lse), 0.0)
                dlogit = tl.load(dlogits_ptr + i * S * T + st_offsets, mask=mask_st, other=0.0)
                rstd = tl.load(rstd_ptr + i * T + offs_t, mask=mask_t, other=0.0).to(tl.float32)
                scaled = dlogit * rstd[None, :]  # d loss / d (v . q) per query and token
                dv = tl.sum(prob[:, :, None] * do + scaled[:, :, None] * q[:, None, :], axis=0)
                tl.store(dv_ptr + i * T * D + offs_t[:, None] * D + offs_d[None, :], dv.to(dtype), mask=mask_td)
                dq += tl.sum(scaled[:, :, None] * v[None, :, :], axis=1)
            dq_offsets = offs_s[:, None] * D + offs_d[None, :]
            dq_mask = mask_s[:, None] & mask_d[None, :]
            # only this program touches its row, and every tile uses the same layout: no atomics, no barrier
            tl.store(dq_row + dq_offsets, tl.load(dq_row + dq_offsets, mask=dq_mask, other=0.0) + dq, mask=dq_mask)
        tl.debug_barrier()  # the next tile overwrites the dlogits scratch rows of its own tokens only


def _phase1_blocks(S: int, D: int, tile_floats: int) -> tuple[int, int, int]:
    """``(S_PAD, BLOCK_T, BLOCK_D)`` with the [S, T, D] register tiles at about ``tile_floats`` fp32 (the backward
    keeps more such tiles live than the forward: the sm_90 compile tests hold both free of spills)."""
    s_pad = max(2, triton.next_power_of_2(S))
    block_d = min(64, triton.next_power_of_2(D))
    block_t = max(1, min(16, tile_floats // (s_pad * block_d)))
    return s_pad, block_t, block_d


_FORWARD_TILE_FLOATS = 2048
_BACKWARD_TILE_FLOATS = 1024


def _backward_programs(num_tiles: int, device: torch.device) -> int:
    """Programs of the phase-1 backward: a few per SM, each walking many tiles (their dQ rows are summed after)."""
    if device.type == "cuda":
        return max(1, min(num_tiles, 4 * torch.cuda.get_device_properties(device).multi_processor_count))
    return max(1, min(num_tiles, 8))


def _address_table(tensors: Sequence[Optional[torch.Tensor]], device: torch.device) -> torch.Tensor:
    addresses = torch.tensor([0 if t is None else t.data_ptr() for t in tensors], dtype=torch.int64)
    if device.type == "cuda":
        return addresses.pin_memory().to(device, non_blocking=True)
    return addresses


class _Phase1(torch.autograd.Function):
    @staticmethod
    def forward(ctx, rstd_NT, queries_SD, *sources_TD):
        N, S = len(sources_TD), queries_SD.shape[0]
        T, D = sources_TD[0].shape
        device, dtype = sources_TD[0].device, sources_TD[0].dtype
        sources_TD = tuple(s.contiguous() for s in sources_TD)
        rstd_NT, queries_SD = rstd_NT.contiguous(), queries_SD.contiguous()
        logits_NST = torch.empty(N, S, T, device=device, dtype=torch.float32)
        lse_ST = torch.empty(S, T, device=device, dtype=torch.float32)
        o_STD = torch.empty(S, T, D, device=device, dtype=dtype)
        s_pad, block_t, block_d = _phase1_blocks(S, D, _FORWARD_TILE_FLOATS)
        _launch(_phase1_forward, (triton.cdiv(T, block_t),), _address_table(sources_TD, device), rstd_NT,
                queries_SD, logits_NST, lse_ST, o_STD, N, S, T, D, S_PAD=s_pad, BLOCK_T=block_t, BLOCK_D=block_d)
        ctx.save_for_backward(rstd_NT, queries_SD, logits_NST, lse_ST, *sources_TD)
        ctx.set_materialize_grads(False)
        return (*o_STD.unbind(0), lse_ST)

    @staticmethod
    def backward(ctx, *grads):
        rstd_NT, queries_SD, logits_NST, lse_ST, *sources_TD = ctx.saved_tensors
        N, S = len(sources_TD), queries_SD.shape[0]
        T, D = sources_TD[0].shape
        device, dtype = sources_TD[0].device, sources_TD[0].dtype
        do_TD = [None if g is None else g.to(dtype).contiguous() for g in grads[:S]]
        dlse_ST = grads[S]
        dlse_ST = None if dlse_ST is None else dlse_ST.float().contiguous()
        dv_NTD = torch.empty(N, T, D, device=device, dtype=dtype)
        dlogits_NST = torch.empty_like(logits_NST)
        drstd_NT = torch.empty(N, T, device=device, dtype=torch.float32)
        s_pad, block_t, block_d = _phase1_blocks(S, D, _BACKWARD_TILE_FLOATS)
        num_tiles = triton.cdiv(T, block_t)
        tiles_per_program = triton.cdiv(num_tiles, _backward_programs(num_tiles, device))
        programs = triton.cdiv(num_tiles, tiles_per_program)
        dq_rows = torch.zeros(programs, S, D, device=device, dtype=torch.float32)
        _launch(_phase1_backward, (programs,), _address_table(sources_TD, device), _address_table(do_TD, device),
                dv_NTD, rstd_NT, queries_SD, logits_NST, lse_ST, lse_ST if dlse_ST is None else dlse_ST,
                dlogits_NST, drstd_NT, dq_rows, N, S, T, D, tiles_per_program, HAS_DLSE=dlse_ST is not None,
                S_PAD=s_pad, BLOCK_T=block_t, BLOCK_D=block_d)
        dq_SD = dq_rows.sum(0).to(queries_SD.dtype)
        return (drstd_NT.to(rstd_NT.dtype), dq_SD, *dv_NTD.unbind(0))


def block_phase1(
    sources_TD: Sequence[torch.Tensor], rstd_NT: torch.Tensor, queries_SD: torch.Tensor
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Phase 1 on the GPU: ``(outputs, lse_ST)`` as :func:`attnres_kernels.reference.phase1_reference`."""
    *outputs, lse_ST = _Phase1.apply(rstd_NT, queries_SD, *sources_TD)
    return outputs, lse_ST


# --------------------------------------------------------------------------------------------------------------
# Phase 2
# --------------------------------------------------------------------------------------------------------------


@triton.jit
def _phase2_forward(o_ptr, lse_ptr, p_ptr, q_ptr, w_ptr, y_ptr, plogit_ptr, prstd_ptr, nrstd_ptr, T, D, eps,
                    norm_eps, HAS_PARTIAL: tl.constexpr, HAS_NORM: tl.constexpr, ROWS: tl.constexpr,
                    BLOCK_D: tl.constexpr):
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < D
    if HAS_PARTIAL:
        q = tl.load(q_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)
    if HAS_NORM:
        w = tl.load(w_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)
    for r in range(ROWS):
        t = tl.program_id(0).to(tl.int64) * ROWS + r
        if t < T:
            h = tl.load(o_ptr + t * D + offs_d, mask=mask_d, other=0.0).to(tl.float32)
            if HAS_PARTIAL:
                p = tl.load(p_ptr + t * D + offs_d, mask=mask_d, other=0.0).to(tl.float32)
                prstd = 1.0 / tl.sqrt(tl.sum(p * p, axis=0) / D + eps)
                plogit = prstd * tl.sum(p * q, axis=0)
                tl.store(prstd_ptr + t, prstd)
                tl.store(plogit_ptr + t, plogit)
                share = 1.0 / (1.0 + tl.exp(tl.load(lse_ptr + t) - plogit))  # softmax weight of the partial sum
                h = (1.0 - share) * h + share * p
            if HAS_NORM:
                nrstd = 1.0 / tl.sqrt(tl.sum(h * h, axis=0) / D + norm_eps)
                tl.store(nrstd_ptr + t, nrstd)
                h = h * nrstd * w
            tl.store(y_ptr + t * D + offs_d, h.to(y_ptr.dtype.element_ty), mask=mask_d)


@triton.jit
def _phase2_backward(dy_ptr, o_ptr, lse_ptr, p_ptr, q_ptr, w_ptr, plogit_ptr, prstd_ptr, nrstd_ptr,
                     do_ptr, dlse_ptr, dp_ptr, dq_part_ptr, dw_part_ptr, T, D,
                     HAS_PARTIAL: tl.constexpr, HAS_NORM: tl.constexpr, ROWS: tl.constexpr, BLOCK_D: tl.constexpr):
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < D
    if HAS_PARTIAL:
        q = tl.load(q_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)
        dq_acc = tl.zeros([BLOCK_D], tl.float32)
    if HAS_NORM:
        w = tl.load(w_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)
        dw_acc = tl.zeros([BLOCK_D], tl.float32)
    for r in range(ROWS):
        t = tl.program_id(0).to(tl.int64) * ROWS + r
        if t < T:
            o = tl.load(o_ptr + t * D + offs_d, mask=mask_d, other=0.0).to(tl.float32)
            dh = tl.load(dy_ptr + t * D + offs_d, mask=mask_d, other=0.0).to(tl.float32)
            if HAS_PARTIAL:
                p = tl.load(p_ptr + t * D + offs_d, mask=mask_d, other=0.0).to(tl.float32)
                share = 1.0 / (1.0 + tl.exp(tl.load(lse_ptr + t) - tl.load(plogit_ptr + t)))
            if HAS_NORM:
                h = o
                if HAS_PARTIAL:
                    h = (1.0 - share) * o + share * p
                nrstd = tl.load(nrstd_ptr + t)
                dw_acc += dh * h * nrstd
                g = dh * w
                dh = nrstd * g - h * (nrstd * nrstd * nrstd) * tl.sum(g * h, axis=0) / D
            if HAS_PARTIAL:
                tl.store(do_ptr + t * D + offs_d, ((1.0 - share) * dh).to(do_ptr.dtype.element_ty), mask=mask_d)
                # share = sigmoid(plogit - lse): d share / d plogit = share * (1 - share)
                dz = (tl.sum(dh * p, axis=0) - tl.sum(dh * o, axis=0)) * share * (1.0 - share)
                tl.store(dlse_ptr + t, -dz)
                prstd = tl.load(prstd_ptr + t)
                # plogit = prstd (p . q) with prstd = (|p|^2 / D + eps)^-1/2: d prstd / d p = -prstd^3 p / D
                pq = tl.sum(p * q, axis=0)
                dp = share * dh + (dz * prstd) * q - (dz * pq * prstd * prstd * prstd / D) * p
                tl.store(dp_ptr + t * D + offs_d, dp.to(dp_ptr.dtype.element_ty), mask=mask_d)
                dq_acc += (dz * prstd) * p
            else:
                tl.store(do_ptr + t * D + offs_d, dh.to(do_ptr.dtype.element_ty), mask=mask_d)
    if HAS_PARTIAL:
        tl.store(dq_part_ptr + tl.program_id(0) * D + offs_d, dq_acc, mask=mask_d)
    if HAS_NORM:
        tl.store(dw_part_ptr + tl.program_id(0) * D + offs_d, dw_acc, mask=mask_d)


_PHASE2_ROWS = 32  # rows per program: the weight/query gradient partials stay T / 32 x D


def _phase2_warps(block_d: int, backward: bool) -> int:
    # One row of D per program, held in registers. The backward keeps ~10 row vectors live: at 4 fp32 per thread
    # per vector it stays under ~64 registers, so an SM holds 32 of its warps (at D = 4096: 202 registers and 8
    # warps with 8 warps per program); the forward needs half the threads for the same. Checked by the sm_90
    # compile tests through ptxas.
    return max(4, min(32, block_d // (128 if backward else 256)))


class _Phase2(torch.autograd.Function):
    @staticmethod
    def forward(ctx, o_TD, lse_T, partial_TD, query_D, norm_weight_D, eps, norm_eps):
        T, D = o_TD.shape
        has_partial, has_norm = partial_TD is not None, norm_weight_D is not None
        o_TD = o_TD.contiguous()
        lse_T = lse_T.contiguous().float() if has_partial else o_TD  # unread without a partial sum
        partial_TD = partial_TD.contiguous() if has_partial else o_TD
        query_D = query_D.contiguous()
        weight_D = norm_weight_D.contiguous() if has_norm else query_D
        y_TD = torch.empty_like(o_TD)
        stats_3T = torch.empty(3, T, device=o_TD.device, dtype=torch.float32)  # partial logit, partial rstd, norm rstd
        block_d = triton.next_power_of_2(D)
        _launch(_phase2_forward, (triton.cdiv(T, _PHASE2_ROWS),), o_TD, lse_T, partial_TD, query_D, weight_D, y_TD,
                stats_3T[0], stats_3T[1], stats_3T[2], T, D, eps, norm_eps, HAS_PARTIAL=has_partial,
                HAS_NORM=has_norm, ROWS=_PHASE2_ROWS, BLOCK_D=block_d, num_warps=_phase2_warps(block_d, backward=False))
        ctx.save_for_backward(o_TD, lse_T, partial_TD, query_D, weight_D, stats_3T)
        ctx.flags = (has_partial, has_norm)
        return y_TD

    @staticmethod
    def backward(ctx, dy_TD):
        o_TD, lse_T, partial_TD, query_D, weight_D, stats_3T = ctx.saved_tensors
        has_partial, has_norm = ctx.flags
        T, D = o_TD.shape
        programs = triton.cdiv(T, _PHASE2_ROWS)
        do_TD = torch.empty_like(o_TD)
        dlse_T = torch.empty(T, device=o_TD.device, dtype=torch.float32)
        dp_TD = torch.empty_like(partial_TD) if has_partial else do_TD
        dq_parts = torch.empty(programs if has_partial else 1, D, device=o_TD.device, dtype=torch.float32)
        dw_parts = torch.empty(programs if has_norm else 1, D, device=o_TD.device, dtype=torch.float32)
        block_d = triton.next_power_of_2(D)
        _launch(_phase2_backward, (programs,), dy_TD.contiguous(), o_TD, lse_T, partial_TD, query_D, weight_D,
                stats_3T[0], stats_3T[1], stats_3T[2], do_TD, dlse_T, dp_TD, dq_parts, dw_parts, T, D,
                HAS_PARTIAL=has_partial, HAS_NORM=has_norm, ROWS=_PHASE2_ROWS, BLOCK_D=block_d,
                num_warps=_phase2_warps(block_d, backward=True))
        dw = dw_parts.sum(0).to(weight_D.dtype) if has_norm else None
        if not has_partial:
            return do_TD, None, None, None, dw, None, None
        return do_TD, dlse_T, dp_TD, dq_parts.sum(0).to(query_D.dtype), dw, None, None


def block_phase2(
    o_TD: torch.Tensor,
    lse_T: torch.Tensor,
    partial_TD: Optional[torch.Tensor],
    query_D: torch.Tensor,
    norm_weight_D: Optional[torch.Tensor] = None,
    eps: float = 1e-6,
    norm_eps: float = 1e-6,
) -> torch.Tensor:
    """Phase 2 on the GPU, as :func:`attnres_kernels.reference.phase2_reference`."""
    return _Phase2.apply(o_TD, lse_T, partial_TD, query_D, norm_weight_D, eps, norm_eps)
