"""Triton kernels of the two-phase Block AttnRes (forward and backward) and their autograd functions.

Data movement is the design goal (scripts/bench_attnres_kernels.py models it against the compulsory floor).
One block of S sublayers over N completed sources costs, forward and backward, one kernel at each point where
the sublayers' own kernels hand over, plus phase 1 and its backward:

* :func:`block_phase1` (``_phase1_forward``): all S queries score the N completed sources together and write
  each query's mix o_j and log-sum-exp. Each kernel works on a tile of BLOCK_T tokens and walks its sources
  twice, the second walk re-reading the tile it has just read (a few hundred KB per program, served by L2).
  It also reads the query vectors by address and copies them into :class:`BlockParameters` (no stack), zeroes
  the block's parameter-gradient buffer and, where nothing is merged into the first query's mix,
  applies the following RMSNorm to o_0 (the first :func:`block_merge` then returns that without a launch).
* :func:`block_merge` (``_merge_forward``), once per sublayer j: forms the partial sum
  p_j = p_{j-1} + f_{j-1} from the previous sublayer's output, merges it with o_j by an online softmax (its rstd
  computed on the way) and applies the sublayer's RMSNorm. Writes the sublayer's input and p_j; nothing else of
  the block's residual stream is written in between, so the partial sum never needs an add of its own. The
  first sublayer's merge returns what phase 1 formed and launches only in the backward.
* :func:`block_close` (``_close_forward``): b_n = p_{S-1} + f_{S-1} and its rstd, the next blocks' source.

Backward, in autograd's order: ``close`` passes its gradient through (no kernel); ``_merge_backward`` per
sublayer from the last to the first, each reading the partial sum's gradient from its later uses and adding
its own (so f_{j-1} gets its gradient without an autograd sum), and writing its output gradient for phase 1;
``_phase1_backward`` last, when every sublayer's output gradient is known: one pass over the sources for all S
queries. It folds the rstd gradient into the source gradients (the rstd given to phase 1 must be that of its
sources, as the model computes it) and accumulates each source's gradient in place across blocks
(:class:`SourceGradients`): the source's first consumer in the forward runs last in the backward and hands the
sum to autograd. Parameter gradients (pseudo-query, key-norm weight, sublayer norm weight) go by atomic adds
into one fp32 buffer per block, returned as views when the parameters are fp32.

All arithmetic is fp32; activations keep the sources' dtype. Shapes: N sources, S queries, T tokens, D hidden.
Integer arguments may be specialised to constants by Triton (a value of 1 is), so no kernel calls a method on a
scalar argument: offsets become int64 through the int64 token offsets.
"""

from __future__ import annotations

from dataclasses import dataclass
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
def _phase1_forward(table, prm_ptr, logits_ptr, lse_ptr, o_ptr, dprm_ptr, w_ptr, x_ptr, stats_ptr, N, S, T, D,
                    norm_eps, S_PAD: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
                    ZERO_BLOCK: tl.constexpr, HAS_FIRST_NORM: tl.constexpr):
    # table: N source addresses, N addresses of their fp32 rstd, then S pseudo-query and S key-weight addresses;
    # prm: [2, S, D] written here, the copy of those the merges and the backward read.
    # HAS_FIRST_NORM: also x_0 = RMSNorm(o_0) * w into x (the first query's merge then launches nothing), its
    # rstd into stats[2] (the [3, T] layout of _merge_forward's statistics)
    dtype = o_ptr.dtype.element_ty
    prm_dtype = prm_ptr.dtype.element_ty
    # the block's fp32 parameter gradients [3, S, D] start at zero for the backwards' atomic adds: zeroed here,
    # spread over the programs, instead of by a launch of its own
    for start in range(tl.program_id(0) * ZERO_BLOCK, 3 * S * D, tl.num_programs(0) * ZERO_BLOCK):
        offs_zero = start + tl.arange(0, ZERO_BLOCK)
        tl.store(dprm_ptr + offs_zero, tl.zeros([ZERO_BLOCK], tl.float32), mask=offs_zero < 3 * S * D)
    # likewise the copy of the 2S query vectors (no stack launched for it); this kernel reads them by address
    for start in range(tl.program_id(0) * ZERO_BLOCK, 2 * S * D, tl.num_programs(0) * ZERO_BLOCK):
        offs_copy = start + tl.arange(0, ZERO_BLOCK)
        mask_copy = offs_copy < 2 * S * D
        vector = offs_copy // D
        vector_base = tl.load(table + 2 * N + vector, mask=mask_copy, other=0).to(tl.pointer_type(prm_dtype))
        values = tl.load(vector_base + offs_copy % D, mask=mask_copy, other=0.0)
        tl.store(prm_ptr + offs_copy, values, mask=mask_copy)
    offs_t = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_s = tl.arange(0, S_PAD)
    mask_t = offs_t < T
    mask_s = offs_s < S
    query_base = tl.load(table + 2 * N + offs_s, mask=mask_s, other=0).to(tl.pointer_type(prm_dtype))
    key_weight_base = tl.load(table + 2 * N + S + offs_s, mask=mask_s, other=0).to(tl.pointer_type(prm_dtype))
    mask_st = mask_s[:, None] & mask_t[None, :]
    st_offsets = offs_s[:, None] * T + offs_t[None, :]
    # pass 1: logits, online log-sum-exp over the sources
    running_max = tl.full([S_PAD, BLOCK_T], float("-inf"), tl.float32)
    running_sum = tl.zeros([S_PAD, BLOCK_T], tl.float32)
    for i in range(N):
        v_ptr = tl.load(table + i).to(tl.pointer_type(dtype))
        rstd_ptr = tl.load(table + N + i).to(tl.pointer_type(tl.float32))
        # products summed over D once per source, not per chunk: the chunk loop is loads and FMAs only
        products = tl.zeros([S_PAD, BLOCK_T, BLOCK_D], tl.float32)
        for d0 in range(0, D, BLOCK_D):
            offs_d = d0 + tl.arange(0, BLOCK_D)
            mask_d = offs_d < D
            v = tl.load(v_ptr + offs_t[:, None] * D + offs_d[None, :], mask=mask_t[:, None] & mask_d[None, :],
                        other=0.0).to(tl.float32)
            mask_sd = mask_s[:, None] & mask_d[None, :]
            q = (tl.load(query_base[:, None] + offs_d[None, :], mask=mask_sd, other=0.0).to(tl.float32)
                 * tl.load(key_weight_base[:, None] + offs_d[None, :], mask=mask_sd, other=0.0).to(tl.float32))
            products += q[:, None, :] * v[None, :, :]
        rstd = tl.load(rstd_ptr + offs_t, mask=mask_t, other=0.0)
        logit = tl.sum(products, axis=2) * rstd[None, :]
        tl.store(logits_ptr + i * S * T + st_offsets, logit, mask=mask_st)
        new_max = tl.maximum(running_max, logit)
        running_sum = running_sum * tl.exp(running_max - new_max) + tl.exp(logit - new_max)
        running_max = new_max
    lse = running_max + tl.log(running_sum)
    tl.store(lse_ptr + st_offsets, lse, mask=mask_st)
    tl.debug_barrier()  # the logits stored above are read back below by other threads of this program
    # pass 2: the mix, one D chunk at a time (the tile's sources come from L2 this time)
    first_square_sum = tl.zeros([BLOCK_T], tl.float32)
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        mask_td = mask_t[:, None] & (offs_d[None, :] < D)
        acc = tl.zeros([S_PAD, BLOCK_T, BLOCK_D], tl.float32)
        for i in range(N):
            v_ptr = tl.load(table + i).to(tl.pointer_type(dtype))
            logit = tl.load(logits_ptr + i * S * T + st_offsets, mask=mask_st, other=0.0)
            weight = tl.where(mask_st, tl.exp(logit - lse), 0.0)
            v = tl.load(v_ptr + offs_t[:, None] * D + offs_d[None, :], mask=mask_td, other=0.0).to(tl.float32)
            acc += weight[:, :, None] * v[None, :, :]
        o_offsets = (offs_s[:, None, None] * T + offs_t[None, :, None]) * D + offs_d[None, None, :]
        stored = acc.to(dtype)
        tl.store(o_ptr + o_offsets, stored, mask=mask_s[:, None, None] & mask_td[None, :, :])
        if HAS_FIRST_NORM:  # the norm of o_0 as stored, as the merge would compute it
            first = tl.sum(tl.where((offs_s == 0)[:, None, None], stored.to(tl.float32), 0.0), axis=0)
            first_square_sum += tl.sum(first * first, axis=1)
    if HAS_FIRST_NORM:
        nrstd = 1.0 / tl.sqrt(first_square_sum / D + norm_eps)
        tl.store(stats_ptr + 2 * T + offs_t, nrstd, mask=mask_t)
        tl.debug_barrier()  # o_0 of this tile, stored above by other threads of this program, is read back
        for d0 in range(0, D, BLOCK_D):
            offs_d = d0 + tl.arange(0, BLOCK_D)
            mask_d = offs_d < D
            td_offsets = offs_t[:, None] * D + offs_d[None, :]
            mask_td = mask_t[:, None] & mask_d[None, :]
            o_first = tl.load(o_ptr + td_offsets, mask=mask_td, other=0.0).to(tl.float32)
            w = tl.load(w_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)
            tl.store(x_ptr + td_offsets, (o_first * nrstd[:, None] * w[None, :]).to(dtype), mask=mask_td)


@triton.jit
def _phase1_backward(table, grad_table, like_ptr, prm_ptr, logits_ptr, lse_ptr, dlogits_ptr, drstd_ptr,
                     dq_rows_ptr, dprm_ptr, N, S, T, D, tiles_per_program,
                     S_PAD: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    # grad_table: N source-gradient addresses, N flags (1: add to what is there), S output-gradient addresses,
    # S log-sum-exp-gradient addresses (0: that gradient is zero). like_ptr: any tensor of the sources' dtype.
    dtype = like_ptr.dtype.element_ty
    pid = tl.program_id(0)
    offs_s = tl.arange(0, S_PAD)
    mask_s = offs_s < S
    dq_row = dq_rows_ptr + pid.to(tl.int64) * S * D  # this program's fp32 dQ partial [S, D]
    for k in range(tiles_per_program):  # a contiguous run of tiles; the last program's may pass T (masked)
        tile = pid * tiles_per_program + k
        # loaded per tile: cheaper than keeping the 64-bit addresses live across the tile loop
        do_address = tl.load(grad_table + 2 * N + offs_s, mask=mask_s, other=0)
        has_do = do_address != 0
        do_base = do_address.to(tl.pointer_type(dtype))
        dlse_address = tl.load(grad_table + 2 * N + S + offs_s, mask=mask_s, other=0)
        has_dlse = dlse_address != 0
        dlse_base = dlse_address.to(tl.pointer_type(tl.float32))
        offs_t = tile * BLOCK_T + tl.arange(0, BLOCK_T).to(tl.int64)  # tile * BLOCK_T < T fits int32
        mask_t = offs_t < T
        mask_st = mask_s[:, None] & mask_t[None, :]
        st_offsets = offs_s[:, None] * T + offs_t[None, :]
        do_mask_st = has_do[:, None] & mask_t[None, :]
        # pass 1: dp_i = dO . v_i for every source and query, kept in the dlogits scratch (fp32, no D)
        for i in range(N):
            v_ptr = tl.load(table + i).to(tl.pointer_type(dtype))
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
        dlse = tl.load(dlse_base[:, None] + offs_t[None, :], mask=has_dlse[:, None] & mask_t[None, :], other=0.0)
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
            rstd = tl.load(tl.load(table + N + i).to(tl.pointer_type(tl.float32)) + offs_t, mask=mask_t, other=1.0)
            # logit = rstd * (v . q), so d logit / d rstd = v . q = logit / rstd
            tl.store(drstd_ptr + i * T + offs_t, tl.sum(dlogit * logit, axis=0) / rstd, mask=mask_t)
        tl.debug_barrier()
        # pass 2: dV_i = sum_s p dO + rstd_i sum_s dlogit q + drstd_i d rstd_i / d v_i (+ what earlier blocks
        # left there);  dQ_s += sum_t dlogit rstd_i v_i
        for d0 in range(0, D, BLOCK_D):
            offs_d = d0 + tl.arange(0, BLOCK_D)
            mask_d = offs_d < D
            mask_td = mask_t[:, None] & mask_d[None, :]
            do = tl.load(do_base[:, None, None] + offs_t[None, :, None] * D + offs_d[None, None, :],
                         mask=do_mask_st[:, :, None] & mask_d[None, None, :], other=0.0).to(tl.float32)
            sd_offsets = offs_s[:, None] * D + offs_d[None, :]
            mask_sd = mask_s[:, None] & mask_d[None, :]
            q = (tl.load(prm_ptr + sd_offsets, mask=mask_sd, other=0.0).to(tl.float32)
                 * tl.load(prm_ptr + S * D + sd_offsets, mask=mask_sd, other=0.0).to(tl.float32))
            dq = tl.zeros([S_PAD, BLOCK_D], tl.float32)
            for i in range(N):
                v_ptr = tl.load(table + i).to(tl.pointer_type(dtype))
                dv_ptr = tl.load(grad_table + i).to(tl.pointer_type(dtype))
                accumulate = (tl.zeros([BLOCK_T, BLOCK_D], tl.int64) + tl.load(grad_table + N + i)) != 0
                v = tl.load(v_ptr + offs_t[:, None] * D + offs_d[None, :], mask=mask_td, other=0.0).to(tl.float32)
                logit = tl.load(logits_ptr + i * S * T + st_offsets, mask=mask_st, other=0.0)
                prob = tl.where(mask_st, tl.exp(logit - lse), 0.0)
                dlogit = tl.load(dlogits_ptr + i * S * T + st_offsets, mask=mask_st, other=0.0)
                rstd = tl.load(tl.load(table + N + i).to(tl.pointer_type(tl.float32)) + offs_t, mask=mask_t,
                               other=0.0)
                drstd = tl.load(drstd_ptr + i * T + offs_t, mask=mask_t, other=0.0)
                scaled = dlogit * rstd[None, :]  # d loss / d (v . q) per query and token
                # rstd = (|v|^2 / D + eps)^-1/2: d rstd / d v = -rstd^3 v / D
                dv = (tl.sum(prob[:, :, None] * do + scaled[:, :, None] * q[:, None, :], axis=0)
                      - (drstd * rstd * rstd * rstd / D)[:, None] * v)
                dv_offsets = offs_t[:, None] * D + offs_d[None, :]
                dv += tl.load(dv_ptr + dv_offsets, mask=mask_td & accumulate, other=0.0).to(tl.float32)
                tl.store(dv_ptr + dv_offsets, dv.to(dtype), mask=mask_td)
                dq += tl.sum(scaled[:, :, None] * v[None, :, :], axis=1)
            # only this program touches its row, and every tile uses the same layout: no atomics, no barrier
            previous = tl.load(dq_row + sd_offsets, mask=mask_sd & ((tl.zeros([S_PAD, BLOCK_D], tl.int32) + k) > 0),
                               other=0.0)
            tl.store(dq_row + sd_offsets, previous + dq, mask=mask_sd)
        tl.debug_barrier()  # the next tile overwrites the dlogits scratch rows of its own tokens only
    # dQ of the effective query (pseudo-query * key weight) into the block's parameter gradients
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        sd_offsets = offs_s[:, None] * D + offs_d[None, :]
        mask_sd = mask_s[:, None] & (offs_d[None, :] < D)
        dq = tl.load(dq_row + sd_offsets, mask=mask_sd, other=0.0)
        query = tl.load(prm_ptr + sd_offsets, mask=mask_sd, other=0.0).to(tl.float32)
        key_weight = tl.load(prm_ptr + S * D + sd_offsets, mask=mask_sd, other=0.0).to(tl.float32)
        tl.atomic_add(dprm_ptr + sd_offsets, dq * key_weight, mask=mask_sd)
        tl.atomic_add(dprm_ptr + S * D + sd_offsets, dq * query, mask=mask_sd)


def _phase1_blocks(S: int, D: int, tile_floats: int) -> tuple[int, int, int]:
    """``(S_PAD, BLOCK_T, BLOCK_D)`` with the [S, T, D] register tiles at about ``tile_floats`` fp32 (the backward
    keeps more such tiles live than the forward: the sm_90 compile tests hold both free of spills)."""
    s_pad = max(2, triton.next_power_of_2(S))
    block_d = min(64, triton.next_power_of_2(D))
    block_t = max(1, min(16, tile_floats // (s_pad * block_d)))
    return s_pad, block_t, block_d


_FORWARD_TILE_FLOATS = 2048
_ZERO_BLOCK = 1024  # parameter-gradient floats each phase-1 forward program zeroes per step
_BACKWARD_TILE_FLOATS = 1024


def _backward_programs(num_tiles: int, device: torch.device) -> int:
    """Programs of the phase-1 backward: a few per SM, each walking many tiles (their dQ rows are summed after)."""
    if device.type == "cuda":
        return max(1, min(num_tiles, 4 * torch.cuda.get_device_properties(device).multi_processor_count))
    return max(1, min(num_tiles, 8))


def _address_table(entries: Sequence, device: torch.device) -> torch.Tensor:
    """int64 table of tensor addresses (None: 0) and plain integers, on ``device`` (one host-to-device copy)."""
    values = [0 if e is None else e if isinstance(e, int) else e.data_ptr() for e in entries]
    addresses = torch.tensor(values, dtype=torch.int64)
    if device.type == "cuda":
        return addresses.pin_memory().to(device, non_blocking=True)
    return addresses


class SourceGradients:
    """The completed sources' gradients of one forward, accumulated in place by the blocks' phase-1 backwards.

    A source is scored by every later block. The first block to score it (in the forward) is the last to run
    its backward: autograd cannot run it before the block summaries its sublayers produced have all their
    gradients, which come from every later block. So each later block adds its share into one buffer and the
    first consumer hands the total to autograd, instead of every block writing a fresh gradient that autograd
    then sums (two reads and a write per source and block saved).
    """

    def __init__(self):
        # keyed by address: the model hands each block new [T, D] views of the same [B, T, D] sources
        self._first_consumer: dict[int, int] = {}
        self._buffers: dict[int, torch.Tensor] = {}
        self._handed_over: set[int] = set()
        self._calls = 0

    def register(self, sources: Sequence[torch.Tensor]) -> tuple[int, list[bool]]:
        """Called by a phase-1 forward: its call number and, per source, whether it is the first consumer."""
        call = self._calls
        self._calls += 1
        owned = []
        for source in sources:
            owned.append(self._first_consumer.setdefault(source.data_ptr(), call) == call)
        return call, owned

    def buffers(self, sources: Sequence[torch.Tensor]) -> tuple[list[torch.Tensor], list[int]]:
        """Per source, the buffer its gradient share goes into and 1 where earlier shares are already in it."""
        buffers, accumulate = [], []
        for source in sources:
            key = source.data_ptr()
            if key in self._handed_over:
                raise RuntimeError("Block AttnRes backward: a block's phase 1 ran its backward after the first "
                                   "block that scored the same source (gradients would be lost)")
            buffer = self._buffers.get(key)
            accumulate.append(int(buffer is not None))
            if buffer is None:
                buffer = self._buffers[key] = torch.empty_like(source)
            buffers.append(buffer)
        return buffers, accumulate

    def hand_over(self, source: torch.Tensor) -> torch.Tensor:
        key = source.data_ptr()
        self._handed_over.add(key)
        return self._buffers.pop(key)


@dataclass
class BlockParameters:
    """One block's query parameters as phase 1 and the merges read them, and their gradients.

    ``values_2SD``: pseudo-queries then key-norm weights (a copy, valid in the backward whatever happens to the
    parameters' storage), written by phase 1's forward. ``grads_3SD`` (fp32): pseudo-query, key-norm weight and
    sublayer-norm weight gradients, zeroed by phase 1's forward and filled by atomic adds from the merges' and
    phase 1's backwards. ``first_input``: what phase 1 prepared for the first merge (``first_norm``).
    """

    values_2SD: torch.Tensor
    grads_3SD: torch.Tensor
    # the first query's normed input, when phase 1 formed it: (o_0, norm weight, norm eps, x_0, stats [3, T]),
    # taken by the first merge
    first_input: Optional[tuple] = None

    @classmethod
    def of(cls, queries: Sequence[torch.Tensor], key_weights: Sequence[torch.Tensor]) -> "BlockParameters":
        first = queries[0]
        if any(t.dtype != first.dtype or t.device != first.device or t.shape != first.shape
               for t in (*queries, *key_weights)):
            raise ValueError("block_phase1: the queries and key weights must share one dtype, device and shape")
        values = torch.empty(2, len(queries), first.shape[-1], device=first.device, dtype=first.dtype)
        grads = torch.empty(3, len(queries), first.shape[-1], device=first.device, dtype=torch.float32)
        return cls(values, grads)

    def grad(self, kind: int, index: int, like: torch.Tensor) -> torch.Tensor:
        return self.grads_3SD[kind, index].to(like.dtype)


class _Phase1(torch.autograd.Function):
    @staticmethod
    def forward(ctx, params, source_grads, first_norm, N, *inputs):
        sources_TD, rstd_T, queries = inputs[:N], inputs[N:2 * N], inputs[2 * N:]
        S = len(queries) // 2
        T, D = sources_TD[0].shape
        device, dtype = sources_TD[0].device, sources_TD[0].dtype
        if not all(t.is_contiguous() for t in (*sources_TD, *rstd_T)) or any(
                r.dtype != torch.float32 for r in rstd_T):
            raise ValueError("block_phase1: sources and their rstd must be contiguous, the rstd fp32")
        logits_NST = torch.empty(N, S, T, device=device, dtype=torch.float32)
        lse_ST = torch.empty(S, T, device=device, dtype=torch.float32)
        o_STD = torch.empty(S, T, D, device=device, dtype=dtype)
        s_pad, block_t, block_d = _phase1_blocks(S, D, _FORWARD_TILE_FLOATS)
        if first_norm is not None:
            norm_weight_D, norm_eps = first_norm[0].contiguous(), float(first_norm[1])
            x_TD = torch.empty_like(o_STD[0])
            stats_3T = torch.empty(3, T, device=device, dtype=torch.float32)  # only the norm rstd (row 2) is used
            params.first_input = (o_STD[0], first_norm[0], norm_eps, x_TD, stats_3T)
        else:  # unread
            norm_weight_D, norm_eps, x_TD, stats_3T = lse_ST, 0.0, o_STD, lse_ST
        query_vectors = [q.detach().contiguous() for q in queries]  # read by address: no stack of them
        _launch(_phase1_forward, (triton.cdiv(T, block_t),),
                _address_table([*sources_TD, *rstd_T, *query_vectors], device),
                params.values_2SD, logits_NST, lse_ST, o_STD, params.grads_3SD, norm_weight_D, x_TD, stats_3T,
                N, S, T, D, norm_eps, S_PAD=s_pad, BLOCK_T=block_t, BLOCK_D=block_d, ZERO_BLOCK=_ZERO_BLOCK,
                HAS_FIRST_NORM=first_norm is not None)
        ctx.save_for_backward(logits_NST, lse_ST, *sources_TD, *rstd_T)
        ctx.params, ctx.N, ctx.S = params, N, S
        ctx.source_grads = source_grads
        ctx.owned = source_grads.register(sources_TD)[1]
        ctx.set_materialize_grads(False)
        return (*o_STD.unbind(0), *lse_ST.unbind(0))

    @staticmethod
    def backward(ctx, *grads):
        logits_NST, lse_ST, *saved = ctx.saved_tensors
        N, S, params = ctx.N, ctx.S, ctx.params
        sources_TD, rstd_T = saved[:N], saved[N:]
        T, D = sources_TD[0].shape
        device, dtype = sources_TD[0].device, sources_TD[0].dtype
        do_TD = [None if g is None else g.to(dtype).contiguous() for g in grads[:S]]
        dlse_T = [None if g is None else g.float().contiguous() for g in grads[S:]]
        dv_TD, accumulate = ctx.source_grads.buffers(sources_TD)
        dlogits_NST = torch.empty_like(logits_NST)
        drstd_NT = torch.empty(N, T, device=device, dtype=torch.float32)
        s_pad, block_t, block_d = _phase1_blocks(S, D, _BACKWARD_TILE_FLOATS)
        num_tiles = triton.cdiv(T, block_t)
        tiles_per_program = triton.cdiv(num_tiles, _backward_programs(num_tiles, device))
        programs = triton.cdiv(num_tiles, tiles_per_program)
        dq_rows = torch.empty(programs, S, D, device=device, dtype=torch.float32)
        _launch(_phase1_backward, (programs,), _address_table([*sources_TD, *rstd_T], device),
                _address_table([*dv_TD, *accumulate, *do_TD, *dlse_T], device), sources_TD[0], params.values_2SD,
                logits_NST, lse_ST, dlogits_NST, drstd_NT, dq_rows, params.grads_3SD, N, S, T, D,
                tiles_per_program, S_PAD=s_pad, BLOCK_T=block_t, BLOCK_D=block_d)
        source_grads = [ctx.source_grads.hand_over(s) if owned else None for s, owned in zip(sources_TD, ctx.owned)]
        values = params.values_2SD
        query_grads = [params.grad(kind, s, values) for kind in (0, 1) for s in range(S)]
        return (None, None, None, None, *source_grads, *([None] * N), *query_grads)


def block_phase1(
    sources_TD: Sequence[torch.Tensor],
    rstd_T: Sequence[torch.Tensor],
    queries_D: Sequence[torch.Tensor],
    key_weights_D: Sequence[torch.Tensor],
    source_grads: Optional[SourceGradients] = None,
    first_norm: Optional[tuple[torch.Tensor, float]] = None,
) -> tuple[list[torch.Tensor], list[torch.Tensor], BlockParameters]:
    """Phase 1 on the GPU: ``(outputs o_j [T, D], log-sum-exps [T], parameters for the merges)``.

    Query j's effective query is ``key_weights_D[j] * queries_D[j]``; ``rstd_T[i]`` must be the key RMSNorm's
    rstd of ``sources_TD[i]`` (its gradient is taken through the sources here, none is returned for it).
    ``source_grads`` is shared by the blocks of one forward (a fresh one: this call owns every source's gradient).
    ``first_norm``: ``(weight, eps)`` of the RMSNorm that follows the first query's mix when no partial sum is
    merged into it; phase 1 then forms that normed input too, and :func:`block_merge` of query 0 with the same
    weight and eps returns it without a launch of its own (the merge's backward is unchanged).
    """
    params = BlockParameters.of(queries_D, key_weights_D)
    N, S = len(sources_TD), len(queries_D)
    results = _Phase1.apply(params, source_grads or SourceGradients(), first_norm, N, *sources_TD, *rstd_T,
                            *queries_D, *key_weights_D)
    return list(results[:S]), list(results[S:]), params


# --------------------------------------------------------------------------------------------------------------
# Phase 2: one merge per sublayer, and the block's close
# --------------------------------------------------------------------------------------------------------------


@triton.jit
def _merge_forward(o_ptr, lse_ptr, f_ptr, pp_ptr, query_ptr, key_weight_ptr, w_ptr, y_ptr, p_ptr, stats_ptr,
                   T, D, eps, norm_eps, HAS_PARTIAL: tl.constexpr, HAS_PREVIOUS: tl.constexpr,
                   HAS_NORM: tl.constexpr, ROWS: tl.constexpr, BLOCK_D: tl.constexpr):
    # stats: [3, T] fp32 partial logit, partial rstd, norm rstd
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < D
    if HAS_PARTIAL:
        q = (tl.load(query_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)
             * tl.load(key_weight_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32))
    if HAS_NORM:
        w = tl.load(w_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)
    for r in range(ROWS):
        t = tl.program_id(0).to(tl.int64) * ROWS + r
        if t < T:
            h = tl.load(o_ptr + t * D + offs_d, mask=mask_d, other=0.0).to(tl.float32)
            if HAS_PARTIAL:
                p = tl.load(f_ptr + t * D + offs_d, mask=mask_d, other=0.0).to(tl.float32)
                if HAS_PREVIOUS:
                    p += tl.load(pp_ptr + t * D + offs_d, mask=mask_d, other=0.0).to(tl.float32)
                    p = p.to(p_ptr.dtype.element_ty)  # the stored partial sum is what the merge uses
                    tl.store(p_ptr + t * D + offs_d, p, mask=mask_d)
                    p = p.to(tl.float32)
                prstd = 1.0 / tl.sqrt(tl.sum(p * p, axis=0) / D + eps)
                plogit = prstd * tl.sum(p * q, axis=0)
                tl.store(stats_ptr + t, plogit)
                tl.store(stats_ptr + T + t, prstd)
                share = 1.0 / (1.0 + tl.exp(tl.load(lse_ptr + t) - plogit))  # softmax weight of the partial sum
                h = (1.0 - share) * h + share * p
            if HAS_NORM:
                nrstd = 1.0 / tl.sqrt(tl.sum(h * h, axis=0) / D + norm_eps)
                tl.store(stats_ptr + 2 * T + t, nrstd)
                h = h * nrstd * w
            tl.store(y_ptr + t * D + offs_d, h.to(y_ptr.dtype.element_ty), mask=mask_d)


@triton.jit
def _merge_backward(dy_ptr, o_ptr, lse_ptr, p_ptr, dpo_ptr, query_ptr, key_weight_ptr, w_ptr, stats_ptr,
                    do_ptr, dlse_ptr, dp_ptr, dquery_ptr, dkey_weight_ptr, dw_ptr, T, D,
                    HAS_PARTIAL: tl.constexpr, HAS_LATER: tl.constexpr, HAS_NORM: tl.constexpr,
                    ROWS: tl.constexpr, BLOCK_D: tl.constexpr):
    # dpo: gradient of the partial sum from its later uses (next merge or the close), added to this one's
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < D
    if HAS_PARTIAL:
        query = tl.load(query_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)
        key_weight = tl.load(key_weight_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)
        q = query * key_weight
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
                share = 1.0 / (1.0 + tl.exp(tl.load(lse_ptr + t) - tl.load(stats_ptr + t)))
            if HAS_NORM:
                h = o
                if HAS_PARTIAL:
                    h = (1.0 - share) * o + share * p
                nrstd = tl.load(stats_ptr + 2 * T + t)
                dw_acc += dh * h * nrstd
                g = dh * w
                dh = nrstd * g - h * (nrstd * nrstd * nrstd) * tl.sum(g * h, axis=0) / D
            if HAS_PARTIAL:
                tl.store(do_ptr + t * D + offs_d, ((1.0 - share) * dh).to(do_ptr.dtype.element_ty), mask=mask_d)
                # share = sigmoid(plogit - lse): d share / d plogit = share * (1 - share)
                dz = (tl.sum(dh * p, axis=0) - tl.sum(dh * o, axis=0)) * share * (1.0 - share)
                tl.store(dlse_ptr + t, -dz)
                prstd = tl.load(stats_ptr + T + t)
                # plogit = prstd (p . q) with prstd = (|p|^2 / D + eps)^-1/2: d prstd / d p = -prstd^3 p / D
                pq = tl.sum(p * q, axis=0)
                dp = share * dh + (dz * prstd) * q - (dz * pq * prstd * prstd * prstd / D) * p
                if HAS_LATER:
                    dp += tl.load(dpo_ptr + t * D + offs_d, mask=mask_d, other=0.0).to(tl.float32)
                tl.store(dp_ptr + t * D + offs_d, dp.to(dp_ptr.dtype.element_ty), mask=mask_d)
                dq_acc += (dz * prstd) * p
            else:
                tl.store(do_ptr + t * D + offs_d, dh.to(do_ptr.dtype.element_ty), mask=mask_d)
    if HAS_PARTIAL:
        tl.atomic_add(dquery_ptr + offs_d, dq_acc * key_weight, mask=mask_d)
        tl.atomic_add(dkey_weight_ptr + offs_d, dq_acc * query, mask=mask_d)
    if HAS_NORM:
        tl.atomic_add(dw_ptr + offs_d, dw_acc, mask=mask_d)


@triton.jit
def _close_forward(p_ptr, f_ptr, b_ptr, rstd_ptr, T, D, eps, HAS_PREVIOUS: tl.constexpr, ROWS: tl.constexpr,
                   BLOCK_D: tl.constexpr):
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < D
    for r in range(ROWS):
        t = tl.program_id(0).to(tl.int64) * ROWS + r
        if t < T:
            b = tl.load(f_ptr + t * D + offs_d, mask=mask_d, other=0.0).to(tl.float32)
            if HAS_PREVIOUS:
                b += tl.load(p_ptr + t * D + offs_d, mask=mask_d, other=0.0).to(tl.float32)
                b = b.to(b_ptr.dtype.element_ty)
                tl.store(b_ptr + t * D + offs_d, b, mask=mask_d)
                b = b.to(tl.float32)  # the rstd of the summary as stored
            tl.store(rstd_ptr + t, 1.0 / tl.sqrt(tl.sum(b * b, axis=0) / D + eps))


def _same_tensor(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.data_ptr() == b.data_ptr() and a.shape == b.shape and a.dtype == b.dtype


_PHASE2_ROWS = 32  # rows per program: one atomic add of the parameter gradients per 32 rows


def _phase2_warps(block_d: int, backward: bool) -> int:
    # One row of D per program, held in registers. The backward keeps ~10 row vectors live: at 4 fp32 per thread
    # per vector it stays under ~64 registers, so an SM holds 32 of its warps (at D = 4096: 202 registers and 8
    # warps with 8 warps per program); the forward needs half the threads for the same. Checked by the sm_90
    # compile tests through ptxas.
    return max(4, min(32, block_d // (128 if backward else 256)))


class _Merge(torch.autograd.Function):
    @staticmethod
    def forward(ctx, params, index, eps, norm_eps, o_TD, lse_T, previous_output_TD, previous_partial_TD,
                norm_weight_D):
        T, D = o_TD.shape
        has_partial, has_previous = previous_output_TD is not None, previous_partial_TD is not None
        has_norm = norm_weight_D is not None
        o_TD = o_TD.contiguous()
        f_TD = previous_output_TD.contiguous() if has_partial else o_TD  # unread without a partial sum
        pp_TD = previous_partial_TD.contiguous() if has_previous else o_TD
        weight_D = norm_weight_D.contiguous() if has_norm else lse_T
        prepared, params.first_input = params.first_input, None  # usable by this call only
        if prepared is not None and index == 0 and has_norm and not has_partial and _same_tensor(
                prepared[0], o_TD) and _same_tensor(prepared[1], norm_weight_D) and prepared[2] == norm_eps:
            y_TD, stats_3T = prepared[3], prepared[4]  # phase 1 formed this input already
            p_TD = f_TD
        else:
            y_TD = torch.empty_like(o_TD)
            p_TD = torch.empty_like(f_TD) if has_previous else f_TD
            stats_3T = torch.empty(3, T, device=o_TD.device, dtype=torch.float32)
            block_d = triton.next_power_of_2(D)
            _launch(_merge_forward, (triton.cdiv(T, _PHASE2_ROWS),), o_TD, lse_T, f_TD, pp_TD,
                    params.values_2SD[0, index], params.values_2SD[1, index], weight_D, y_TD, p_TD, stats_3T,
                    T, D, eps, norm_eps, HAS_PARTIAL=has_partial, HAS_PREVIOUS=has_previous, HAS_NORM=has_norm,
                    ROWS=_PHASE2_ROWS, BLOCK_D=block_d, num_warps=_phase2_warps(block_d, backward=False))
        ctx.save_for_backward(o_TD, lse_T, p_TD, weight_D, stats_3T)
        ctx.params, ctx.index, ctx.flags = params, index, (has_partial, has_previous, has_norm)
        ctx.set_materialize_grads(False)
        if not has_partial:
            return y_TD, None
        # p_1 = f_0 is returned as a view: a tensor of its own for autograd, so its later uses' gradient comes
        # back here (and is added in the kernel) instead of being summed with this merge's share by autograd
        return y_TD, (p_TD if has_previous else p_TD.view_as(p_TD))

    @staticmethod
    def backward(ctx, dy_TD, dp_later_TD):
        o_TD, lse_T, p_TD, weight_D, stats_3T = ctx.saved_tensors
        has_partial, has_previous, has_norm = ctx.flags
        params, index = ctx.params, ctx.index
        T, D = o_TD.shape
        if dy_TD is None:
            dy_TD = torch.zeros_like(o_TD)
        do_TD = torch.empty_like(o_TD)
        dlse_T = torch.empty(T, device=o_TD.device, dtype=torch.float32)
        dp_TD = torch.empty_like(p_TD) if has_partial else do_TD
        has_later = has_partial and dp_later_TD is not None
        dp_later_TD = dp_later_TD.contiguous() if has_later else do_TD
        grads = params.grads_3SD
        block_d = triton.next_power_of_2(D)
        _launch(_merge_backward, (triton.cdiv(T, _PHASE2_ROWS),), dy_TD.contiguous(), o_TD, lse_T, p_TD,
                dp_later_TD, params.values_2SD[0, index], params.values_2SD[1, index], weight_D, stats_3T,
                do_TD, dlse_T, dp_TD, grads[0, index], grads[1, index], grads[2, index], T, D,
                HAS_PARTIAL=has_partial, HAS_LATER=has_later, HAS_NORM=has_norm, ROWS=_PHASE2_ROWS,
                BLOCK_D=block_d, num_warps=_phase2_warps(block_d, backward=True))
        dw = params.grad(2, index, weight_D) if has_norm else None
        if not has_partial:
            return None, None, None, None, do_TD, None, None, None, dw
        # the partial sum's gradient is that of f_{j-1} and of p_{j-1} alike (p_j = p_{j-1} + f_{j-1})
        return None, None, None, None, do_TD, dlse_T, dp_TD, (dp_TD if has_previous else None), dw


def block_merge(
    o_TD: torch.Tensor,
    lse_T: torch.Tensor,
    previous_output_TD: Optional[torch.Tensor],
    previous_partial_TD: Optional[torch.Tensor],
    params: BlockParameters,
    index: int,
    norm_weight_D: Optional[torch.Tensor] = None,
    eps: float = 1e-6,
    norm_eps: float = 1e-6,
) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Phase 2 of query ``index`` of ``params`` on the GPU, as :func:`attnres_kernels.reference.merge_reference`.

    The norm weight's gradient comes from here; the query's from :func:`block_phase1`'s backward (which runs
    after every merge's), both through ``params.grads_3SD``.
    """
    return _Merge.apply(params, index, eps, norm_eps, o_TD, lse_T, previous_output_TD, previous_partial_TD,
                        norm_weight_D)


class _Close(torch.autograd.Function):
    @staticmethod
    def forward(ctx, eps, partial_TD, output_TD):
        T, D = output_TD.shape
        output_TD = output_TD.contiguous()
        has_previous = partial_TD is not None
        summary_TD = torch.empty_like(output_TD) if has_previous else output_TD
        rstd_T = torch.empty(T, device=output_TD.device, dtype=torch.float32)
        block_d = triton.next_power_of_2(D)
        _launch(_close_forward, (triton.cdiv(T, _PHASE2_ROWS),), partial_TD.contiguous() if has_previous else
                output_TD, output_TD, summary_TD, rstd_T, T, D, eps, HAS_PREVIOUS=has_previous, ROWS=_PHASE2_ROWS,
                BLOCK_D=block_d, num_warps=_phase2_warps(block_d, backward=False))
        ctx.save_for_backward(summary_TD, rstd_T)
        ctx.has_previous = has_previous
        ctx.set_materialize_grads(False)
        return (summary_TD if has_previous else summary_TD.view_as(summary_TD)), rstd_T

    @staticmethod
    def backward(ctx, d_summary_TD, drstd_T):
        if drstd_T is not None:
            # only when the rstd reaches a mix outside phase 1 (the torch path); phase 1 takes it through the
            # sources itself
            summary_TD, rstd_T = ctx.saved_tensors
            term = (-(drstd_T * rstd_T.pow(3)) / summary_TD.shape[-1])[:, None] * summary_TD.float()
            d_summary_TD = term.to(summary_TD.dtype) if d_summary_TD is None else d_summary_TD + term
        return None, (d_summary_TD if ctx.has_previous else None), d_summary_TD


def block_close(
    partial_TD: Optional[torch.Tensor], output_TD: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """The block summary and its rstd on the GPU, as :func:`attnres_kernels.reference.close_reference`."""
    return _Close.apply(eps, partial_TD, output_TD)
