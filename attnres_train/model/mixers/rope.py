"""Rotary position embedding (RoPE) with explicit per-token positions.

Positions are passed in, never assumed to be ``arange(T)``: in a packed row they restart at 0 in every
document (``DocumentLayout.position_ids_BT``), which keeps each document's attention identical to running
it alone. cos/sin are computed on the fly from the positions (a few fp32 elementwise ops on ``[B, T, R/2]``),
so there is no maximum length and no buffer to keep in sync with meta-device initialisation.

Layout: the rotated dims are the first ``rotary_dim`` dims of each head, split in two halves
(GPT-NeoX / Llama / Qwen3-Next ``rotate_half`` convention, not the interleaved-pairs layout of the original
DeepSeek-V3 checkpoints). Dims past ``rotary_dim`` pass through unchanged (partial rotary).

Shape legend: B batch, T tokens per row, H heads, D head dim, R rotary dims (even, <= D).
"""

from __future__ import annotations

import torch
from torch import nn


def rotary_inverse_frequencies(rotary_dim: int, theta: float, device: torch.device | None = None) -> torch.Tensor:
    """``theta ** (-2i / rotary_dim)`` for ``i = 0 .. rotary_dim/2 - 1``, fp32 ``[R/2]``."""
    exponents = torch.arange(0, rotary_dim, 2, device=device, dtype=torch.float32) / rotary_dim
    return 1.0 / (theta**exponents)


def rotary_cos_sin(
    position_ids_BT: torch.Tensor, rotary_dim: int, theta: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 ``cos``/``sin`` of the rotation angles ``position * inv_freq``, each ``[B, T, R/2]``."""
    inv_freq = rotary_inverse_frequencies(rotary_dim, theta, device=position_ids_BT.device)
    angles_BTr = position_ids_BT.to(torch.float32).unsqueeze(-1) * inv_freq
    return angles_BTr.cos(), angles_BTr.sin()


def apply_rotary(x_BTHD: torch.Tensor, cos_BTr: torch.Tensor, sin_BTr: torch.Tensor) -> torch.Tensor:
    """Rotate the first ``R = 2 * cos.shape[-1]`` dims of every head of ``x``; the rest pass through.

    The rotation is done in fp32 (float64 for float64 inputs) and cast back to ``x``'s dtype. ``cos``/``sin``
    broadcast over heads.
    """
    half = cos_BTr.shape[-1]
    rotary_dim = 2 * half
    if rotary_dim == 0:
        return x_BTHD
    if rotary_dim > x_BTHD.shape[-1]:
        raise ValueError(f"rotary_dim={rotary_dim} exceeds the head dim {x_BTHD.shape[-1]} of the input")
    cos = cos_BTr.unsqueeze(-2)  # [B, T, 1, R/2]: same angle for every head
    sin = sin_BTr.unsqueeze(-2)
    # fp32 at least; float64 inputs (tests, references) keep their precision.
    x_rot = x_BTHD[..., :rotary_dim].to(torch.promote_types(x_BTHD.dtype, torch.float32))
    x1, x2 = x_rot[..., :half], x_rot[..., half:]
    rotated = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).to(x_BTHD.dtype)
    if rotary_dim == x_BTHD.shape[-1]:
        return rotated
    return torch.cat((rotated, x_BTHD[..., rotary_dim:]), dim=-1)


class RotaryEmbedding(nn.Module):
    """RoPE on the first ``rotary_dim`` dims of each head, angles ``position * theta^(-2i/rotary_dim)``.

    No parameters and no buffers. ``forward(x_BTHD, position_ids_BT)`` rotates one tensor; attention calls
    it on queries and keys with the same positions, so scores depend only on position differences.
    """

    def __init__(self, rotary_dim: int, theta: float = 10000.0):
        super().__init__()
        if rotary_dim < 0 or rotary_dim % 2 != 0:
            raise ValueError(f"rotary_dim must be an even integer >= 0, got {rotary_dim}")
        if not theta > 0:
            raise ValueError(f"rope theta must be > 0, got {theta}")
        self.rotary_dim = rotary_dim
        self.theta = float(theta)

    def cos_sin(self, position_ids_BT: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """fp32 ``cos``/``sin`` ``[B, T, R/2]``; compute once and reuse for queries and keys."""
        if position_ids_BT.dim() != 2:
            raise ValueError(f"position_ids must have shape [batch, seq_len], got {tuple(position_ids_BT.shape)}")
        return rotary_cos_sin(position_ids_BT, self.rotary_dim, self.theta)

    def forward(self, x_BTHD: torch.Tensor, position_ids_BT: torch.Tensor) -> torch.Tensor:
        if x_BTHD.dim() != 4 or x_BTHD.shape[:2] != position_ids_BT.shape:
            raise ValueError(
                f"RotaryEmbedding expects x [batch, seq_len, heads, head_dim] and position_ids [batch, seq_len], "
                f"got x {tuple(x_BTHD.shape)} and position_ids {tuple(position_ids_BT.shape)}"
            )
        cos, sin = self.cos_sin(position_ids_BT)
        return apply_rotary(x_BTHD, cos, sin)

    def extra_repr(self) -> str:
        return f"rotary_dim={self.rotary_dim}, theta={self.theta}"
