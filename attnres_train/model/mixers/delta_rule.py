"""The gated delta rule in pure PyTorch: a chunked (WY / UT-transform) form for training and a
step-by-step recurrence as its reference.

Both implement, per value head, with state ``S [K, V]``, L2-normalised ``q_t, k_t``, ``beta_t`` after the
sigmoid and a log-space forget gate ``g_t <= 0``::

    S_t = diag(exp(g_t)) S_{t-1}                        (decay: per key channel for KDA, one scalar for GDN)
    S_t = S_t + beta_t k_t (v_t - k_t^T S_t)^T          (delta-rule write)
    o_t = scale * S_t^T q_t

which is the semantics of fla's ``naive_recurrent_kda`` / ``naive_recurrent_gated_delta_rule``. The gate
decides the flavour: ``g [B, T, N, K]`` is Kimi Delta Attention's per-channel decay, ``g [B, T, N]`` is Gated
DeltaNet's per-head scalar decay. With grouped value heads (``N > H``) value head ``n`` reads query/key head
``n // (N // H)``, as fla's kernels do.

Chunked algorithm (chunk length C; per chunk, per value head; ``G_r`` = cumulative gate inside the chunk,
so ``Gamma_r = exp(G_r) <= 1``)::

    A_kk[s, j] = sum_c k_s[c] k_j[c] exp(G_s[c] - G_j[c])      j < s      (decayed key-key products)
    A_qk[s, j] = sum_c q_s[c] k_j[c] exp(G_s[c] - G_j[c])      j <= s
    (I + diag(beta) A_kk) [U | W] = diag(beta) [v | k * Gamma]          (unit lower-triangular solve)
    loop over chunks, S = state entering the chunk:
        delta = U - W S                                         (the "new values" of the chunk)
        o     = (q * Gamma) S + A_qk delta
        S     = diag(Gamma_C) S + (k * Gamma_C / Gamma)^T delta

Numerical stability: every exponent is a difference ``G_s - G_j`` with ``j <= s`` (so <= 0 for a
non-positive gate), never ``exp(-G)``. For the scalar gate the pairwise ``[C, C]`` decay matrix is cheap.
For the per-channel gate the chunk is cut into sub-blocks of ``c`` tokens: pairs in different sub-blocks
factor through the gate at the end of the earlier sub-block (both factors <= 1, so one matmul per
sub-block pair), pairs inside a sub-block use the exact pairwise ``[c, c, K]`` decay.
Everything is computed in float32 (float64 when the inputs are float64) whatever the input dtype.

Shape legend: B batch, T tokens, H query/key heads, N value heads, K key head dim, V value head dim,
M chunks, C chunk length, S sub-blocks per chunk, c sub-block length, P sub-block pairs.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

# Largest sub-block used for the per-channel (KDA) intra-chunk products; see _sub_block_size.
MAX_SUB_BLOCK = 16


def l2_normalize(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """``x / sqrt(sum(x^2) + eps)`` over the last dim, the L2 norm fla applies to q and k in its kernels."""
    return x * torch.rsqrt(x.pow(2).sum(-1, keepdim=True) + eps)


def _sub_block_size(chunk_size: int) -> int:
    """Largest divisor of ``chunk_size`` that is at most MAX_SUB_BLOCK (16 for the usual C = 64)."""
    for size in range(min(MAX_SUB_BLOCK, chunk_size), 0, -1):
        if chunk_size % size == 0:
            return size
    return 1


def _check_inputs(q, k, v, g, beta, initial_state) -> tuple[int, int, int, int, int, int]:
    if q.dim() != 4:
        raise ValueError(f"q must have shape [batch, seq_len, heads, key_dim], got {tuple(q.shape)}")
    if k.shape != q.shape:
        raise ValueError(f"k must have the shape of q {tuple(q.shape)}, got {tuple(k.shape)}")
    B, T, H, K = q.shape
    if v.dim() != 4 or v.shape[:2] != (B, T):
        raise ValueError(f"v must have shape [batch={B}, seq_len={T}, value_heads, value_dim], got {tuple(v.shape)}")
    N, V = v.shape[2], v.shape[3]
    if N % H != 0:
        raise ValueError(f"v has {N} value heads, expected a multiple of the {H} query/key heads of q")
    if tuple(g.shape) not in ((B, T, N, K), (B, T, N)):
        raise ValueError(
            f"g must have shape [batch, seq_len, value_heads, key_dim]={[B, T, N, K]} (per-channel gate) or "
            f"[batch, seq_len, value_heads]={[B, T, N]} (scalar gate), got {list(g.shape)}"
        )
    if tuple(beta.shape) != (B, T, N):
        raise ValueError(f"beta must have shape [batch, seq_len, value_heads]={[B, T, N]}, got {list(beta.shape)}")
    if initial_state is not None and tuple(initial_state.shape) != (B, N, K, V):
        raise ValueError(
            f"initial_state must have shape [batch, value_heads, key_dim, value_dim]={[B, N, K, V]}, "
            f"got {list(initial_state.shape)}"
        )
    return B, T, H, N, K, V


def _compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    dtype = torch.float32
    for t in tensors:
        dtype = torch.promote_types(dtype, t.dtype)
    return dtype


def _expand_to_value_heads(x_BTHK: torch.Tensor, num_value_heads: int) -> torch.Tensor:
    group = num_value_heads // x_BTHK.shape[2]
    return x_BTHK if group == 1 else x_BTHK.repeat_interleave(group, dim=2)


def _intra_chunk_products(
    q: torch.Tensor, k: torch.Tensor, gate_cum: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Decayed query-key and key-key products of every chunk, ``(A_qk, A_kk)``, each ``[..., C, C]``:

    ``A_qk[s, j] = sum_c q_s[c] k_j[c] exp(G_s[c] - G_j[c])`` for ``j <= s``, ``A_kk`` likewise from k for
    ``j < s``, zero elsewhere. ``q, k [..., C, K]``; ``gate_cum [..., C]`` (scalar) or ``[..., C, K]``.
    Both products share one decay computation.
    """
    C = q.shape[-2]
    strict_CC = torch.ones(C, C, dtype=torch.bool, device=q.device).tril(-1)
    if gate_cum.dim() == q.dim() - 1:  # scalar gate: the decay factors out of the channel sum
        keep_CC = torch.ones(C, C, dtype=torch.bool, device=q.device).tril()
        diff = gate_cum[..., :, None] - gate_cum[..., None, :]
        # Masking before exp: the upper triangle (positive exponents) is never evaluated.
        decay_CC = torch.exp(diff.masked_fill(~keep_CC, float("-inf")))
        qk_products = torch.stack([q, k], dim=-3) @ k.unsqueeze(-3).transpose(-1, -2)  # [..., 2, C, C]
        A_qk = qk_products[..., 0, :, :] * decay_CC
        A_kk = qk_products[..., 1, :, :] * (decay_CC * strict_CC)
        return A_qk, A_kk

    K = q.shape[-1]
    lead = q.shape[:-2]
    c = _sub_block_size(C)
    S = C // c
    q_Sck = q.reshape(*lead, S, c, K)
    k_Sck = k.reshape(*lead, S, c, K)
    G_Sck = gate_cum.reshape(*lead, S, c, K)

    # Pairs inside one sub-block: exact pairwise decay exp(G_i - G_j), j <= i, masked before exp.
    keep_cc1 = torch.ones(c, c, dtype=torch.bool, device=q.device).tril().unsqueeze(-1)
    diff_Scck = G_Sck[..., :, None, :] - G_Sck[..., None, :, :]
    k_decayed_Scck = torch.exp(diff_Scck.masked_fill(~keep_cc1, float("-inf"))) * k_Sck.unsqueeze(-3)
    # For each row i: [c(j), K] @ [K, 2] with the two columns q_i, k_i -> both products in one matmul.
    qk_Sck2 = torch.stack([q_Sck, k_Sck], dim=-1)
    diag_2Scc = (k_decayed_Scck @ qk_Sck2).movedim(-1, 0)  # [2, ..., S, c(i), c(j)]
    if S == 1:
        diag = diag_2Scc.reshape(2, *lead, C, C)
        return diag[0], diag[1] * strict_CC

    # Pairs in sub-blocks p > q: factor through the gate at the last token of sub-block q, which lies
    # between the two tokens, so both exponents are <= 0 and each factor is <= 1.
    rows, cols = torch.tril_indices(S, S, offset=-1, device=q.device)  # (p, q) with p > q
    G_ref_SK = G_Sck[..., -1, :]
    k_right_Sck = k_Sck * torch.exp(G_ref_SK.unsqueeze(-2) - G_Sck)
    left_decay_Pck = torch.exp(G_Sck[..., rows, :, :] - G_ref_SK[..., cols, :].unsqueeze(-2))
    left_2Pck = torch.stack([q_Sck[..., rows, :, :], k_Sck[..., rows, :, :]]) * left_decay_Pck
    off_2Pcc = left_2Pck @ k_right_Sck[..., cols, :, :].transpose(-1, -2)

    block_index = torch.cat([torch.arange(S, device=q.device) * (S + 1), rows * S + cols])
    blocks = torch.zeros(2, *lead, S * S, c, c, dtype=q.dtype, device=q.device)
    blocks = blocks.index_copy(len(lead) + 1, block_index, torch.cat([diag_2Scc, off_2Pcc], dim=-3))
    A = blocks.reshape(2, *lead, S, S, c, c).transpose(-3, -2).reshape(2, *lead, C, C)
    return A[0], A[1] * strict_CC


def chunk_delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    *,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    chunk_size: int = 64,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Chunked gated delta rule (see the module docstring for the algorithm).

    Args:
        q, k: ``[B, T, H, K]``, already L2-normalised.
        v: ``[B, T, N, V]`` with ``N`` a multiple of ``H``.
        g: log-space forget gate (<= 0), ``[B, T, N, K]`` (KDA) or ``[B, T, N]`` (GDN).
        beta: ``[B, T, N]``, after the sigmoid (and the x2 of allow_neg_eigval).
        scale: query scale, default ``K ** -0.5``.
        initial_state: ``[B, N, K, V]`` or None (zeros).
        output_final_state: also return the state after the last token.
        chunk_size: chunk length C; T need not be a multiple of it.

    Returns ``(o [B, T, N, V] in v's dtype, final_state [B, N, K, V] in the compute dtype or None)``.
    Only the chunk loop is Python; it runs ceil(T / C) times.
    """
    B, T, H, N, K, V = _check_inputs(q, k, v, g, beta, initial_state)
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size={chunk_size!r}: expected a positive integer")
    dtype = _compute_dtype(q, k, v, g, beta)
    scale = K**-0.5 if scale is None else scale
    per_channel = g.dim() == 4

    C = chunk_size
    M = -(-T // C)
    pad = M * C - T

    def chunked(x: torch.Tensor) -> torch.Tensor:
        # [B, T, N, *F] -> [B, N, M, C, *F]. Padded tokens have k = beta = g = 0: no decay and no write,
        # so the final state is exactly the state after token T.
        x = x.to(dtype)
        if pad:
            x = F.pad(x, (0, 0) * (x.dim() - 2) + (0, pad))
        return x.reshape(B, M, C, *x.shape[2:]).movedim(3, 1)

    q_BNMCK = chunked(_expand_to_value_heads(q, N)) * scale
    k_BNMCK = chunked(_expand_to_value_heads(k, N))
    v_BNMCV = chunked(v)
    beta_BNMC = chunked(beta)
    gate_cum = chunked(g).cumsum(dim=3)  # [B, N, M, C, K] or [B, N, M, C]
    gate_channels = gate_cum if per_channel else gate_cum.unsqueeze(-1)  # broadcastable over K

    # Intra-chunk: decayed products and the WY solve, for all chunks at once.
    A_qk, A_kk = _intra_chunk_products(q_BNMCK, k_BNMCK, gate_cum)
    rhs = beta_BNMC.unsqueeze(-1) * torch.cat([v_BNMCV, k_BNMCK * torch.exp(gate_channels)], dim=-1)
    # Unit lower-triangular system (I + diag(beta) A_kk); the solver takes the unit diagonal as given.
    solution = torch.linalg.solve_triangular(beta_BNMC.unsqueeze(-1) * A_kk, rhs, upper=False, unitriangular=True)
    u_BNMCV, w_BNMCK = solution.split([V, K], dim=-1)

    q_decayed = q_BNMCK * torch.exp(gate_channels)
    gate_last = gate_channels[..., -1:, :]
    k_to_chunk_end = k_BNMCK * torch.exp(gate_last - gate_channels)
    state_decay = torch.exp(gate_last).transpose(-1, -2)  # [B, N, M, K or 1, 1]

    if initial_state is None:
        state_BNKV = torch.zeros(B, N, K, V, dtype=dtype, device=v.device)
    else:
        state_BNKV = initial_state.to(dtype)
    outputs = []
    for m in range(M):
        delta_BNCV = u_BNMCV[:, :, m] - w_BNMCK[:, :, m] @ state_BNKV
        outputs.append(q_decayed[:, :, m] @ state_BNKV + A_qk[:, :, m] @ delta_BNCV)
        state_BNKV = state_BNKV * state_decay[:, :, m] + k_to_chunk_end[:, :, m].transpose(-1, -2) @ delta_BNCV

    if M == 0:
        o_BTNV = v_BNMCV.new_zeros(B, 0, N, V)
    else:
        o_BTNV = torch.stack(outputs, dim=2).movedim(1, 3).reshape(B, M * C, N, V)[:, :T]
    return o_BTNV.to(v.dtype), (state_BNKV if output_final_state else None)


def recurrent_delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    *,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Token-by-token gated delta rule: the slow reference for ``chunk_delta_rule`` (same arguments)."""
    B, T, H, N, K, V = _check_inputs(q, k, v, g, beta, initial_state)
    dtype = _compute_dtype(q, k, v, g, beta)
    scale = K**-0.5 if scale is None else scale
    q_BTNK = _expand_to_value_heads(q, N).to(dtype) * scale
    k_BTNK = _expand_to_value_heads(k, N).to(dtype)
    v_BTNV, g, beta = v.to(dtype), g.to(dtype), beta.to(dtype)
    if g.dim() == 3:
        g = g.unsqueeze(-1)  # scalar gate: the same decay for every key channel

    if initial_state is None:
        state_BNKV = torch.zeros(B, N, K, V, dtype=dtype, device=v.device)
    else:
        state_BNKV = initial_state.to(dtype)
    outputs = []
    for t in range(T):
        state_BNKV = state_BNKV * torch.exp(g[:, t]).unsqueeze(-1)
        k_t = k_BTNK[:, t]
        prediction_BNV = torch.einsum("bnk,bnkv->bnv", k_t, state_BNKV)
        correction_BNV = beta[:, t].unsqueeze(-1) * (v_BTNV[:, t] - prediction_BNV)
        state_BNKV = state_BNKV + k_t.unsqueeze(-1) * correction_BNV.unsqueeze(-2)
        outputs.append(torch.einsum("bnk,bnkv->bnv", q_BTNK[:, t], state_BNKV))
    o_BTNV = torch.stack(outputs, dim=1) if outputs else v_BTNV.new_zeros(B, 0, N, V)
    return o_BTNV.to(v.dtype), (state_BNKV if output_final_state else None)


def delta_rule_chunk_macs(chunk_size: int, head_k_dim: int, head_v_dim: int, per_channel_gate: bool) -> int:
    """Multiply-adds of ``chunk_delta_rule`` for one chunk of one value head.

    With C = chunk_size, K = head_k_dim, V = head_v_dim and, for the per-channel gate, c = sub-block length
    (16 for C = 64) and S = C / c sub-blocks:
        A_kk and A_qk   2 * C^2 K               (scalar gate: dense [C, K] x [K, C] products)
                        2 * S(S+1)/2 * c^2 K    (per-channel: S(S-1)/2 off-diagonal sub-block matmuls plus
                                                 S diagonal sub-blocks of pairwise dot products)
        WY solve        C(C-1)/2 * (K + V)      (unit lower-triangular solve with K + V right-hand sides)
        W S, (q Gamma) S, k^T delta             3 * C K V
        A_qk delta      C^2 V
    """
    C, K, V = chunk_size, head_k_dim, head_v_dim
    if per_channel_gate:
        c = _sub_block_size(C)
        S = C // c
        pair_products = S * (S + 1) // 2 * c * c * K
    else:
        pair_products = C * C * K
    return 2 * pair_products + C * (C - 1) // 2 * (K + V) + 3 * C * K * V + C * C * V


def delta_rule_flops_per_token(
    seq_len: int, num_v_heads: int, head_k_dim: int, head_v_dim: int, chunk_size: int, per_channel_gate: bool
) -> float:
    """Forward FLOPs per token of ``chunk_delta_rule`` on one sequence: ``2 * N * ceil(T / C) *
    delta_rule_chunk_macs / T`` (the last chunk is computed in full even when partial)."""
    if not isinstance(seq_len, int) or seq_len < 1:
        raise ValueError(f"seq_len={seq_len!r}: expected a positive integer")
    num_chunks = math.ceil(seq_len / chunk_size)
    macs = num_v_heads * num_chunks * delta_rule_chunk_macs(chunk_size, head_k_dim, head_v_dim, per_channel_gate)
    return 2.0 * macs / seq_len
