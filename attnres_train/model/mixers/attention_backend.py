"""Causal softmax attention over packed rows: flash-attn varlen on CUDA, PyTorch SDPA everywhere else.

One entry point, ``causal_attention``, used by both full-attention mixers (MLA and gated GQA). It accepts
grouped-query shapes (more query heads than key/value heads) and, as MLA needs, a value head dim that
differs from the query/key head dim. Decoding against a cache uses ``masked_attention`` instead: a few new
queries over many cached columns with an explicit per-row visibility mask (left padding).

Document boundaries come from a ``DocumentLayout``:

* flash-attn: the rows are flattened to ``[B*T, H, D]`` and ``flash_attn_varlen_func`` gets the layout's
  ``cu_seqlens`` / ``max_seqlen``, so no token ever sees another document and no work is spent on padding.
* SDPA: the documents are gathered into a padded ``[N, L, H, D]`` batch (``layout.to_padded``) and run with
  ``is_causal=True`` and no mask. Padding sits only after each document's end, and a causal query never looks
  forward, so the result is exact for every real token; a dense ``B x T x T`` block mask would cost
  O(T^2) memory and push SDPA off its fused kernels.

flash_attn is imported lazily, only when the flash path is taken, so this module imports on CPU machines.

Shape legend: B batch, T tokens per row, H query heads, G key/value heads (H % G == 0), K query/key head
dim, V value head dim, N documents in the batch, L longest document.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F

from attnres_train.model.packing import DocumentLayout

ATTENTION_IMPLS = ("auto", "sdpa", "flash")
# flash-attn 2 kernels exist for these dtypes and head dims only; "auto" falls back to SDPA outside them.
_FLASH_DTYPES = (torch.float16, torch.bfloat16)
_FLASH_MAX_HEAD_DIM = 256


@functools.lru_cache(maxsize=1)
def flash_attn_available() -> bool:
    """Whether ``flash_attn`` can be imported (checked once per process)."""
    try:
        import flash_attn  # noqa: F401
    except Exception:  # ImportError, or a broken CUDA extension raising at import time
        return False
    return True


def causal_attention(
    q_BTHD: torch.Tensor,
    k_BTHD: torch.Tensor,
    v_BTHD: torch.Tensor,
    layout: DocumentLayout | None,
    scale: float,
    impl: str = "auto",
) -> torch.Tensor:
    """Causal softmax attention ``softmax(scale * q k^T + causal mask) v`` within each document.

    Args:
        q_BTHD: queries ``[B, T, H, K]``.
        k_BTHD: keys ``[B, T, G, K]``; query head ``h`` reads key/value head ``h // (H // G)``.
        v_BTHD: values ``[B, T, G, V]``.
        layout: document boundaries inside the rows; ``None`` means one document per row.
        scale: softmax temperature multiplying the scores (usually ``1/sqrt(K)``).
        impl: ``"auto"`` (flash-attn when the tensors are CUDA fp16/bf16 with head dims <= 256 and flash_attn
            imports, else SDPA), ``"sdpa"`` or ``"flash"`` (error when flash-attn cannot run these inputs).

    Returns:
        ``[B, T, H, V]`` in the dtype of ``q``.
    """
    _check_inputs(q_BTHD, k_BTHD, v_BTHD, layout, scale, impl)
    if impl == "auto":
        impl = "flash" if _flash_supports(q_BTHD, k_BTHD, v_BTHD) else "sdpa"
    elif impl == "flash":
        _require_flash(q_BTHD, k_BTHD, v_BTHD)
    if impl == "flash":
        return _flash_attention(q_BTHD, k_BTHD, v_BTHD, layout, scale)
    return _sdpa_attention(q_BTHD, k_BTHD, v_BTHD, layout, scale)


# ---------------------------------------------------------------------------------------------------------
def _check_inputs(q, k, v, layout, scale, impl) -> None:
    if impl not in ATTENTION_IMPLS:
        raise ValueError(f"attention impl must be one of {ATTENTION_IMPLS}, got {impl!r}")
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != 4:
            raise ValueError(f"{name} must have shape [batch, seq_len, heads, head_dim], got {tuple(t.shape)}")
    if not (q.shape[:2] == k.shape[:2] == v.shape[:2]):
        raise ValueError(
            f"q, k, v must share [batch, seq_len], got {tuple(q.shape[:2])}, {tuple(k.shape[:2])}, {tuple(v.shape[:2])}"
        )
    if k.shape[2] != v.shape[2]:
        raise ValueError(f"k and v must have the same number of heads, got {k.shape[2]} and {v.shape[2]}")
    if q.shape[2] % k.shape[2] != 0:
        raise ValueError(f"query heads ({q.shape[2]}) must be a multiple of key/value heads ({k.shape[2]})")
    if q.shape[3] != k.shape[3]:
        raise ValueError(f"q and k must have the same head dim, got {q.shape[3]} and {k.shape[3]}")
    if not (isinstance(scale, (int, float)) and math.isfinite(scale) and scale > 0):
        raise ValueError(f"attention scale must be a finite float > 0, got {scale!r}")
    if layout is not None and tuple(layout.doc_ids_BT.shape) != tuple(q.shape[:2]):
        raise ValueError(
            f"layout covers a [batch, seq_len] of {tuple(layout.doc_ids_BT.shape)} but q has {tuple(q.shape[:2])}"
        )


def _flash_unsupported_reason(q, k, v) -> str | None:
    if not q.is_cuda:
        return f"flash-attn needs CUDA tensors, got device {q.device}"
    if q.dtype not in _FLASH_DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        return f"flash-attn needs q, k, v all fp16 or bf16, got {q.dtype}, {k.dtype}, {v.dtype}"
    if max(q.shape[3], v.shape[3]) > _FLASH_MAX_HEAD_DIM:
        return f"flash-attn supports head dims up to {_FLASH_MAX_HEAD_DIM}, got qk {q.shape[3]} and v {v.shape[3]}"
    if not flash_attn_available():
        return "flash_attn is not installed (pip install flash-attn, or use attention_impl='sdpa')"
    return None


def _flash_supports(q, k, v) -> bool:
    return _flash_unsupported_reason(q, k, v) is None


def _require_flash(q, k, v) -> None:
    reason = _flash_unsupported_reason(q, k, v)
    if reason is not None:
        raise RuntimeError(f"attention impl 'flash' cannot run: {reason}")


def _flash_attention(q_BTHK, k_BTGK, v_BTGV, layout, scale) -> torch.Tensor:
    from flash_attn import flash_attn_func, flash_attn_varlen_func

    B, T = q_BTHK.shape[:2]
    qk_dim, v_dim = q_BTHK.shape[3], v_BTGV.shape[3]
    # flash-attn 2 requires one head dim for q, k and v: zero-pad v up to the qk dim; the padded output
    # channels are weighted sums of zeros and get sliced off.
    if v_dim < qk_dim:
        v_BTGV = F.pad(v_BTGV, (0, qk_dim - v_dim))
    elif v_dim > qk_dim:
        pad = (0, v_dim - qk_dim)
        q_BTHK, k_BTGK = F.pad(q_BTHK, pad), F.pad(k_BTGK, pad)  # zero dims add nothing to q.k
    if layout is None or layout.is_single_document_per_row():
        o_BTHV = flash_attn_func(q_BTHK, k_BTGK, v_BTGV, softmax_scale=scale, causal=True)
    else:
        cu_seqlens = layout.cu_seqlens.to(device=q_BTHK.device, dtype=torch.int32)
        o_flat = flash_attn_varlen_func(
            q_BTHK.reshape(B * T, *q_BTHK.shape[2:]),
            k_BTGK.reshape(B * T, *k_BTGK.shape[2:]),
            v_BTGV.reshape(B * T, *v_BTGV.shape[2:]),
            cu_seqlens_q=cu_seqlens,
            cu_seqlens_k=cu_seqlens,
            max_seqlen_q=layout.max_seqlen,
            max_seqlen_k=layout.max_seqlen,
            softmax_scale=scale,
            causal=True,
        )
        o_BTHV = o_flat.view(B, T, *o_flat.shape[1:])
    return o_BTHV[..., :v_dim]


def _sdpa_attention(q_BTHK, k_BTGK, v_BTGV, layout, scale) -> torch.Tensor:
    B, T = q_BTHK.shape[:2]
    if layout is None or layout.is_single_document_per_row():
        return _sdpa_causal_rows(q_BTHK, k_BTGK, v_BTGV, scale)
    o_NLHV = _sdpa_causal_rows(layout.to_padded(q_BTHK), layout.to_padded(k_BTGK), layout.to_padded(v_BTGV), scale)
    return layout.from_padded(o_NLHV, B, T)


def _sdpa_causal_rows(q_BTHK, k_BTGK, v_BTGV, scale) -> torch.Tensor:
    """Causal SDPA with every row one document."""
    num_heads, num_kv_heads = q_BTHK.shape[2], k_BTGK.shape[2]
    q, k, v = (t.transpose(1, 2) for t in (q_BTHK, k_BTGK, v_BTGV))  # SDPA wants heads before tokens
    gqa_kwargs = {}
    if num_heads != num_kv_heads:
        if _sdpa_native_gqa(q, k, v):
            gqa_kwargs["enable_gqa"] = True
        else:
            # Query head h reads kv head h // group: repeat each kv head `group` times, consecutively.
            group = num_heads // num_kv_heads
            k = k.repeat_interleave(group, dim=1)
            v = v.repeat_interleave(group, dim=1)
    o_BHTV = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, **gqa_kwargs)
    return o_BHTV.transpose(1, 2)


def _sdpa_native_gqa(q_BHTK, k_BGTK, v_BGTV) -> bool:
    # enable_gqa is served natively by SDPA's flash backend (CUDA, fp16/bf16, equal head dims); elsewhere it
    # silently lands on the math backend, which expands K/V anyway, so repeat explicitly and keep the
    # memory-efficient kernel (the only fused one that takes a different value head dim) available.
    return (
        q_BHTK.is_cuda
        and q_BHTK.dtype in _FLASH_DTYPES
        and q_BHTK.shape[-1] == v_BGTV.shape[-1]
        and q_BHTK.shape[-1] <= _FLASH_MAX_HEAD_DIM
    )


def masked_attention(
    q_BTHK: torch.Tensor,
    k_BSGK: torch.Tensor,
    v_BSGV: torch.Tensor,
    visible_BTS: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """Softmax attention of T new queries over S cached columns with an explicit visibility mask (decoding).

    Query head ``h`` reads key/value head ``h // (H // G)``; the heads of a group share one matmul over the
    cache, so the cache is never repeated per head. Scores and softmax are in at least fp32. Every query must
    see at least one column. Returns ``[B, T, H, V]`` in the dtype of ``q``.
    """
    B, T, H, K = q_BTHK.shape
    S, G, V = k_BSGK.shape[1], k_BSGK.shape[2], v_BSGV.shape[3]
    group = H // G
    dtype = torch.promote_types(q_BTHK.dtype, torch.float32)
    q_BGrTK = q_BTHK.to(dtype).view(B, T, G, group, K).permute(0, 2, 3, 1, 4).reshape(B, G, group * T, K)
    k_BGKS = k_BSGK.to(dtype).permute(0, 2, 3, 1)
    scores_BGrTS = (q_BGrTK @ k_BGKS).view(B, G, group, T, S) * scale
    scores_BGrTS = scores_BGrTS.masked_fill(~visible_BTS[:, None, None], float("-inf"))
    weights_BGrTS = torch.softmax(scores_BGrTS, dim=-1).view(B, G, group * T, S)
    o_BGrTV = weights_BGrTS @ v_BSGV.to(dtype).transpose(1, 2)
    return o_BGrTV.view(B, G, group, T, V).permute(0, 3, 1, 2, 4).reshape(B, T, H, V).to(q_BTHK.dtype)
