"""Causal depthwise short convolution (width W, SiLU) on q, k and v of the linear-attention mixers.

Same parameter (``weight [D, 1, W]``, optional ``bias [D]``) and semantics as fla's ``ShortConvolution``:
``y[t, d] = silu(sum_w weight[d, 0, w] * x[t - (W - 1) + w, d])`` with zeros before the first token, so the
last tap multiplies the current token.

Two implementations of the same function:
* torch ``conv1d`` with left padding (CPU, and any device). Each row is one sequence, so callers run
  packed documents as padded rows (``DocumentLayout.to_padded``) to restart the window per document.
* fla's Triton ``causal_conv1d`` (CUDA only, imported lazily), which restarts the window at every
  ``cu_seqlens`` boundary of a flattened ``[1, B*T, D]`` batch with no padding.

Shape legend: B batch (or documents), T tokens, D channels, W kernel width.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

SHORT_CONV_ACTIVATIONS = ("silu", "swish", None)
SMALL_STEP_TOKENS = 16  # decoding calls of at most this many new columns skip conv1d (see forward_with_window)


class ShortConvolution(nn.Module):
    """Causal depthwise conv1d + SiLU; ``forward(x [B, T, D], cu_seqlens=None, use_fla_kernel=False)``."""

    def __init__(self, hidden_size: int, kernel_size: int, bias: bool = False, activation: str | None = "silu"):
        super().__init__()
        if not isinstance(hidden_size, int) or hidden_size < 1:
            raise ValueError(f"hidden_size={hidden_size!r}: expected a positive integer")
        if not isinstance(kernel_size, int) or kernel_size < 1:
            raise ValueError(f"kernel_size={kernel_size!r}: expected a positive integer")
        if activation not in SHORT_CONV_ACTIVATIONS:
            raise ValueError(f"activation={activation!r}: expected one of {SHORT_CONV_ACTIVATIONS}")
        self.hidden_size = hidden_size
        self.kernel_size = kernel_size
        self.activation = activation
        self.weight = nn.Parameter(torch.empty(hidden_size, 1, kernel_size))
        self.bias = nn.Parameter(torch.empty(hidden_size)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # nn.Conv1d's default init (fla's ShortConvolution is an nn.Conv1d): U(-1/sqrt(fan_in), 1/sqrt(fan_in))
        # with fan_in = kernel_size for a depthwise kernel.
        bound = 1.0 / math.sqrt(self.kernel_size)
        nn.init.uniform_(self.weight, -bound, bound)
        if self.bias is not None:
            nn.init.uniform_(self.bias, -bound, bound)

    def forward(
        self, x_BTD: torch.Tensor, cu_seqlens: torch.Tensor | None = None, use_fla_kernel: bool = False
    ) -> torch.Tensor:
        if x_BTD.dim() != 3 or x_BTD.shape[-1] != self.hidden_size:
            raise ValueError(
                f"ShortConvolution expects x of shape [batch, seq_len, {self.hidden_size}], got {tuple(x_BTD.shape)}"
            )
        if use_fla_kernel:
            return self._forward_fla(x_BTD, cu_seqlens)
        if cu_seqlens is not None:
            raise ValueError(
                "cu_seqlens needs use_fla_kernel=True; the torch path restarts the window per row, so pass "
                "documents as padded rows instead"
            )
        x_BDT = F.pad(x_BTD.transpose(1, 2), (self.kernel_size - 1, 0))
        y_BTD = F.conv1d(x_BDT, self.weight, self.bias, groups=self.hidden_size).transpose(1, 2)
        return y_BTD if self.activation is None else F.silu(y_BTD)

    def forward_with_window(self, x_BTD: torch.Tensor, window_BWD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Decoding: convolve T new columns after ``window`` (the previous W - 1 inputs, zeros before a row's
        first token) and return ``(y [B, T, D], the new window [B, W - 1, D])``. Same arithmetic as ``forward``
        on the whole sequence, whose left padding is the all-zero first window."""
        full_BLD = torch.cat((window_BWD.to(x_BTD.dtype), x_BTD), dim=1)
        if x_BTD.shape[1] <= SMALL_STEP_TOKENS:
            # A few columns: an explicit weighted sum over the W taps. CPU conv1d spends far longer setting up
            # its kernel than computing W * D multiply-adds per token.
            taps_BTDW = full_BLD.unfold(1, self.kernel_size, 1)
            y_BTD = (taps_BTDW * self.weight.squeeze(1).to(x_BTD.dtype)).sum(-1)
            if self.bias is not None:
                y_BTD = y_BTD + self.bias.to(x_BTD.dtype)
        else:
            y_BTD = F.conv1d(full_BLD.transpose(1, 2), self.weight, self.bias, groups=self.hidden_size).transpose(1, 2)
        y_BTD = y_BTD if self.activation is None else F.silu(y_BTD)
        return y_BTD, full_BLD[:, x_BTD.shape[1]:]

    def _forward_fla(self, x_BTD: torch.Tensor, cu_seqlens: torch.Tensor | None) -> torch.Tensor:
        if not x_BTD.is_cuda:
            raise RuntimeError("ShortConvolution: the fla causal_conv1d kernel needs a CUDA tensor")
        if cu_seqlens is not None and x_BTD.shape[0] != 1:
            raise ValueError(f"with cu_seqlens x must be flattened to [1, total_tokens, D], got {tuple(x_BTD.shape)}")
        from fla.modules.causal_conv1d import causal_conv1d

        y_BTD, _ = causal_conv1d(
            x=x_BTD,
            weight=self.weight.squeeze(1),
            bias=self.bias,
            activation=self.activation,
            backend="triton",
            cu_seqlens=cu_seqlens,
        )
        return y_BTD

    def forward_flops_per_token(self, seq_len: int) -> float:
        """``2 * D * W``: one multiply-add per channel and tap (the activation is not counted)."""
        return 2.0 * self.hidden_size * self.kernel_size

    def extra_repr(self) -> str:
        return (
            f"{self.hidden_size}, kernel_size={self.kernel_size}, bias={self.bias is not None}, "
            f"activation={self.activation}"
        )
