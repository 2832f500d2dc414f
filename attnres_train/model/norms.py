"""Normalisation layers shared by the mixers, the residual strategies and the decoder."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """fp32 for low-precision inputs (a bf16 mean of squares loses too much), the input's own dtype if wider."""
    return torch.promote_types(x.dtype, torch.float32)


class RMSNorm(nn.Module):
    """RMSNorm computed in at least fp32, cast back to the input dtype."""

    def __init__(self, hidden_size: int, eps: float = 1e-6):
        super().__init__()
        self.hidden_size = hidden_size
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = compute_dtype(x)
        xc = x.to(dtype)
        y = xc * torch.rsqrt(xc.pow(2).mean(-1, keepdim=True) + self.eps)
        return (y * self.weight.to(dtype)).to(x.dtype)

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)


class GatedRMSNorm(nn.Module):
    """Per-head output norm of the linear-attention mixers: ``RMSNorm(o) * act(gate)``.

    Parameter name and shape (``weight [head_dim]``) match fla's ``FusedRMSNormGated`` so checkpoints move
    between the two implementations.
    """

    def __init__(self, hidden_size: int, eps: float = 1e-5, activation: str = "sigmoid"):
        super().__init__()
        if activation not in ("sigmoid", "swish", "silu"):
            raise ValueError(f"GatedRMSNorm activation must be sigmoid, swish or silu, got {activation!r}")
        self.hidden_size = hidden_size
        self.eps = eps
        self.activation = activation
        self.weight = nn.Parameter(torch.ones(hidden_size))

    def forward(self, x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        dtype = compute_dtype(x)
        xc = x.to(dtype)
        y = xc * torch.rsqrt(xc.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight.to(dtype)
        gc = gate.to(dtype)
        gc = torch.sigmoid(gc) if self.activation == "sigmoid" else F.silu(gc)
        return (y * gc).to(x.dtype)

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)
