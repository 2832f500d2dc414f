"""Grouped GEMM for the MoE experts: rows sorted by expert, each contiguous group times its own matrix.

Tensor suffixes: M rows (token-expert pairs, sorted by expert), K input width, N output width, E groups (experts).

Two paths compute the same thing:

* ``native``: ``torch._grouped_mm`` (PyTorch >= 2.8). On CUDA, bf16 on sm90/sm100 runs a CUTLASS kernel; other
  dtypes/architectures run PyTorch's own per-group fallback. On CPU (checked on torch 2.13) it supports float32,
  bfloat16 and float16 -- not float64 -- forward and backward. Constraints it imposes, checked here before use:
  both operands of one dtype, offsets int32 and cumulative (``offs[e]`` = end row of group ``e``), and every
  row stride a multiple of 16 bytes (K and N multiples of 4 for fp32, of 8 for bf16/fp16). Rows past
  ``offs[-1]`` come back as uninitialised memory, so the group sizes must cover all M rows.
  Its backward rejects gradients with zero strides (e.g. the gradient of ``y.sum()``), so a hook makes the
  incoming gradient contiguous.
* ``loop``: a Python loop over the groups with ``torch.mm``; the reference, and the path for float64, unaligned
  widths and PyTorch builds without ``_grouped_mm``. Autograd works through both.

Path selection: the ``impl`` argument, else the environment variable ``ATTNRES_GROUPED_MM``
(``auto`` | ``native`` | ``loop``, default ``auto``). ``auto`` uses ``native`` whenever the inputs qualify.
"""

from __future__ import annotations

import os
import warnings
from typing import Optional

import torch

GROUPED_MM_IMPLS = ("auto", "native", "loop")
ENV_VAR = "ATTNRES_GROUPED_MM"

_NATIVE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# (device type, dtype) pairs on which the native op raised once; auto mode stops trying them.
_native_failed: set[tuple[str, torch.dtype]] = set()


def native_grouped_mm_available() -> bool:
    """Whether this PyTorch build has ``torch._grouped_mm``."""
    return hasattr(torch, "_grouped_mm")


def grouped_mm(
    x_MK: torch.Tensor,
    w_EKN: torch.Tensor,
    group_sizes_E: torch.Tensor,
    impl: Optional[str] = None,
) -> torch.Tensor:
    """``y[rows of group e] = x[rows of group e] @ w[e]`` for rows already sorted by group.

    Args:
        x_MK: ``[M, K]`` rows, group 0's rows first, then group 1's, ...
        w_EKN: ``[E, K, N]`` one matrix per group.
        group_sizes_E: ``[E]`` integer row count per group (zeros allowed); must sum to ``M``.
        impl: ``auto`` | ``native`` | ``loop``; ``None`` reads ``ATTNRES_GROUPED_MM`` (default ``auto``).

    Returns:
        ``[M, N]`` in the dtype of ``x_MK``.

    The sum check needs the sizes on the host; on CUDA's native path it is skipped to avoid a device sync.
    """
    impl = _resolve_impl(impl)
    _check_shapes(x_MK, w_EKN, group_sizes_E)
    if impl == "loop":
        return _loop_grouped_mm(x_MK, w_EKN, group_sizes_E)
    qualifies = _native_qualifies(x_MK, w_EKN)
    if impl == "native" and not qualifies:
        raise ValueError(
            f"grouped_mm impl='native': inputs do not qualify for torch._grouped_mm (available="
            f"{native_grouped_mm_available()}, dtypes {x_MK.dtype}/{w_EKN.dtype}, expected one of "
            f"{_NATIVE_DTYPES} for both, K={x_MK.shape[1]} and N={w_EKN.shape[2]} giving 16-byte-aligned rows)"
        )
    key = (x_MK.device.type, x_MK.dtype)
    if not qualifies or (impl == "auto" and key in _native_failed):
        return _loop_grouped_mm(x_MK, w_EKN, group_sizes_E)
    if x_MK.device.type != "cuda":
        _check_sizes_cover_rows(x_MK, group_sizes_E)
    try:
        return _native_grouped_mm(x_MK, w_EKN, group_sizes_E)
    except RuntimeError as err:
        if impl == "native":
            raise
        # An op present but not built for this device/dtype: fall back for good and say so once.
        _native_failed.add(key)
        warnings.warn(f"torch._grouped_mm failed on {key} ({err}); using the per-expert loop from now on")
        return _loop_grouped_mm(x_MK, w_EKN, group_sizes_E)


def _resolve_impl(impl: Optional[str]) -> str:
    if impl is None:
        impl = os.environ.get(ENV_VAR, "auto").strip().lower() or "auto"
        if impl not in GROUPED_MM_IMPLS:
            raise ValueError(f"environment variable {ENV_VAR}={impl!r}: expected one of {GROUPED_MM_IMPLS}")
    elif impl not in GROUPED_MM_IMPLS:
        raise ValueError(f"grouped_mm impl={impl!r}: expected one of {GROUPED_MM_IMPLS}")
    return impl


def _check_shapes(x_MK: torch.Tensor, w_EKN: torch.Tensor, group_sizes_E: torch.Tensor) -> None:
    if x_MK.dim() != 2:
        raise ValueError(f"grouped_mm x: expected a 2-D [M, K] tensor, got shape {tuple(x_MK.shape)}")
    if w_EKN.dim() != 3 or w_EKN.shape[1] != x_MK.shape[1]:
        raise ValueError(
            f"grouped_mm w: expected a 3-D [E, K={x_MK.shape[1]}, N] tensor, got shape {tuple(w_EKN.shape)}"
        )
    if group_sizes_E.dim() != 1 or group_sizes_E.shape[0] != w_EKN.shape[0] or group_sizes_E.is_floating_point():
        raise ValueError(
            f"grouped_mm group_sizes: expected a 1-D integer tensor of E={w_EKN.shape[0]} row counts, "
            f"got shape {tuple(group_sizes_E.shape)} dtype {group_sizes_E.dtype}"
        )


def _check_sizes_cover_rows(x_MK: torch.Tensor, group_sizes_E: torch.Tensor) -> None:
    total = int(group_sizes_E.sum())
    if total != x_MK.shape[0]:
        raise ValueError(f"grouped_mm group_sizes: expected them to sum to M={x_MK.shape[0]} rows, got {total}")


def _native_qualifies(x_MK: torch.Tensor, w_EKN: torch.Tensor) -> bool:
    if not native_grouped_mm_available():
        return False
    if x_MK.dtype != w_EKN.dtype or x_MK.dtype not in _NATIVE_DTYPES or x_MK.device != w_EKN.device:
        return False
    element_size = x_MK.element_size()
    k_width, n_width = x_MK.shape[1], w_EKN.shape[2]
    return (k_width * element_size) % 16 == 0 and (n_width * element_size) % 16 == 0


def _contiguous_grad(grad: torch.Tensor) -> torch.Tensor:
    return grad.contiguous()


def _native_grouped_mm(x_MK: torch.Tensor, w_EKN: torch.Tensor, group_sizes_E: torch.Tensor) -> torch.Tensor:
    offsets_E = torch.cumsum(group_sizes_E, dim=0, dtype=torch.int32)
    y_MN = torch._grouped_mm(x_MK.contiguous(), w_EKN.contiguous(), offs=offsets_E)
    if y_MN.requires_grad:
        y_MN.register_hook(_contiguous_grad)
    return y_MN


def _loop_grouped_mm(x_MK: torch.Tensor, w_EKN: torch.Tensor, group_sizes_E: torch.Tensor) -> torch.Tensor:
    sizes = [int(s) for s in group_sizes_E.tolist()]
    if sum(sizes) != x_MK.shape[0]:
        raise ValueError(f"grouped_mm group_sizes: expected them to sum to M={x_MK.shape[0]} rows, got {sum(sizes)}")
    outputs = [rows_K @ w_EKN[e] for e, rows_K in enumerate(torch.split(x_MK, sizes)) if sizes[e] > 0]
    if not outputs:
        return x_MK.new_zeros((0, w_EKN.shape[2]))
    return torch.cat(outputs, dim=0)
