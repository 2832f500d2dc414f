"""Dense SwiGLU MLP: the ``mlp: dense`` choice of the MLP slot and the shared expert of the MoE.

Tensor suffixes: B batch, T sequence, D hidden size, F ffn width.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn


class SwiGLU(nn.Module):
    """``down_proj(silu(gate_proj(x)) * up_proj(x))`` without biases (LLaMA / DeepSeek / Kimi MLP).

    Parameter names ``gate_proj``, ``up_proj``, ``down_proj`` match the Hugging Face checkpoints of those families.
    ``forward`` returns ``(y, None)`` so the decoder treats dense and MoE MLPs alike (the second slot is the
    MoE auxiliary loss).
    """

    def __init__(self, hidden_size: int, ffn_dim: int):
        super().__init__()
        if not isinstance(hidden_size, int) or hidden_size <= 0:
            raise ValueError(f"SwiGLU hidden_size={hidden_size!r}: expected a positive integer")
        if not isinstance(ffn_dim, int) or ffn_dim <= 0:
            raise ValueError(f"SwiGLU ffn_dim={ffn_dim!r}: expected a positive integer")
        self.hidden_size = hidden_size
        self.ffn_dim = ffn_dim
        self.gate_proj = nn.Linear(hidden_size, ffn_dim, bias=False)
        self.up_proj = nn.Linear(hidden_size, ffn_dim, bias=False)
        self.down_proj = nn.Linear(ffn_dim, hidden_size, bias=False)

    def forward(self, x_BTD: torch.Tensor) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        if x_BTD.shape[-1] != self.hidden_size:
            raise ValueError(
                f"SwiGLU input: expected last dimension hidden_size={self.hidden_size}, got shape {tuple(x_BTD.shape)}"
            )
        h_BTF = F.silu(self.gate_proj(x_BTD)) * self.up_proj(x_BTD)
        return self.down_proj(h_BTF), None

    def reset_parameters(self, init_std: float = 0.02) -> None:
        for proj in (self.gate_proj, self.up_proj, self.down_proj):
            nn.init.normal_(proj.weight, mean=0.0, std=init_std)

    def forward_flops_per_token(self, seq_len: int) -> float:
        """Three ``D x F`` matmuls per token: ``3 * 2 * D * F`` (independent of ``seq_len``)."""
        return 3 * 2 * self.hidden_size * self.ffn_dim

    def active_parameters(self) -> int:
        """Parameters used per token (all of them for a dense MLP): ``3 * D * F``."""
        return 3 * self.hidden_size * self.ffn_dim

    def total_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())
