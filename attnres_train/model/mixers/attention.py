"""Full-attention sequence mixers: Multi-head Latent Attention (Kimi Linear / DeepSeek-V3) and gated
grouped-query attention (Qwen3-Next).

Both map ``x [B, T, D] -> y [B, T, D]`` causally within each document of a packed row and take the
document layout of the batch; the softmax attention itself is ``attention_backend.causal_attention``
(flash-attn varlen on CUDA, SDPA elsewhere). Parameter names and shapes follow the transformers
implementations (``KimiLinearAttention``, ``Qwen3NextAttention``) so checkpoints map one to one; see each
class for the one deliberate difference.

Shape legend: B batch, T tokens per row, D hidden size, H query heads, G key/value heads, K query/key
head dim, V value head dim, n MLA's unrotated qk dims (qk_nope_head_dim), R MLA's shared qk dims
(qk_rope_head_dim), C kv latent rank (kv_lora_rank).
"""

from __future__ import annotations

import torch
from torch import nn

from attnres_train.model.cache import DecodeStep, KVCache, LatentKVCache
from attnres_train.model.mixers.attention_backend import ATTENTION_IMPLS, causal_attention, masked_attention
from attnres_train.model.mixers.rope import RotaryEmbedding, apply_rotary
from attnres_train.model.norms import RMSNorm
from attnres_train.model.packing import DocumentLayout


def _require(cond: bool, name: str, value, expected: str) -> None:
    if not cond:
        raise ValueError(f"{name}={value!r}: expected {expected}")


def _check_positive(**values: int) -> None:
    for name, value in values.items():
        _require(isinstance(value, int) and value > 0, name, value, "a positive integer")


def _check_forward_input(module: nn.Module, x_BTD: torch.Tensor, layout: DocumentLayout | None) -> None:
    if x_BTD.dim() != 3 or x_BTD.shape[-1] != module.hidden_size:
        raise ValueError(
            f"{type(module).__name__} expects x of shape [batch, seq_len, hidden_size={module.hidden_size}], "
            f"got {tuple(x_BTD.shape)}"
        )
    if layout is not None and tuple(layout.doc_ids_BT.shape) != tuple(x_BTD.shape[:2]):
        raise ValueError(
            f"layout covers a [batch, seq_len] of {tuple(layout.doc_ids_BT.shape)} but x has {tuple(x_BTD.shape[:2])}"
        )


def _position_ids(x_BTD: torch.Tensor, layout: DocumentLayout | None) -> torch.Tensor:
    """Per-document positions when packed, else ``0 .. T-1`` in every row."""
    if layout is not None:
        return layout.position_ids_BT.to(x_BTD.device)
    B, T = x_BTD.shape[:2]
    return torch.arange(T, device=x_BTD.device).expand(B, T)


def _causal_keys_per_token(seq_len: int) -> float:
    # Token t (0-based) attends to t + 1 keys; averaged over a sequence of seq_len tokens.
    return (seq_len + 1) / 2


class MultiheadLatentAttention(nn.Module):
    """Multi-head Latent Attention as in DeepSeek-V3 and Kimi Linear.

    Keys and values come from a shared low-rank latent: ``c = RMSNorm(kv_a(x)[:C])`` of rank C, expanded per
    head by ``kv_b_proj`` into ``k_nope [H, qk_nope_head_dim]`` and ``v [H, v_head_dim]``. The last
    ``qk_rope_head_dim`` outputs of ``kv_a_proj_with_mqa`` are one key part shared by all heads, matched by
    the last ``qk_rope_head_dim`` dims of each query head. Queries are full rank (``q_proj``, Kimi Linear) or
    low rank (``q_a_proj -> q_a_layernorm -> q_b_proj``, DeepSeek-V3) when ``q_lora_rank`` is set.

    Positions: ``qk_rope_head_dim=0`` is NoPE (Kimi Linear: position comes from the linear-attention layers).
    With ``qk_rope_head_dim > 0`` and ``use_rope=True`` the shared dims get RoPE (half-split layout, i.e.
    DeepSeek-V3 with ``rope_interleave=False``); ``use_rope=False`` keeps them unrotated, which is how the
    released Kimi Linear checkpoints (qk_rope_head_dim=64, no positional encoding) compute.

    Training forward materialises per-head K/V from the latent; decoding (``forward_cached``) caches only the
    latent and absorbs ``kv_b_proj`` into queries and outputs. Softmax
    scale ``1/sqrt(qk_nope_head_dim + qk_rope_head_dim)``. No biases; norms are ``RMSNorm`` (weight init 1).
    Parameter names match transformers' ``KimiLinearAttention`` / ``DeepseekV3Attention``.
    """

    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        kv_lora_rank: int,
        qk_nope_head_dim: int,
        qk_rope_head_dim: int = 0,
        *,
        v_head_dim: int,
        q_lora_rank: int | None = None,
        rope_theta: float = 10000.0,
        norm_eps: float = 1e-6,
        attention_impl: str = "auto",
        use_rope: bool = True,
    ):
        super().__init__()
        _check_positive(
            hidden_size=hidden_size, num_heads=num_heads, kv_lora_rank=kv_lora_rank,
            qk_nope_head_dim=qk_nope_head_dim, v_head_dim=v_head_dim,
        )
        _require(
            isinstance(qk_rope_head_dim, int) and qk_rope_head_dim >= 0 and qk_rope_head_dim % 2 == 0,
            "qk_rope_head_dim", qk_rope_head_dim, "an even integer >= 0 (0 = NoPE)",
        )
        _require(
            q_lora_rank is None or (isinstance(q_lora_rank, int) and q_lora_rank > 0),
            "q_lora_rank", q_lora_rank, "None (full-rank queries) or a positive integer",
        )
        _require(rope_theta > 0, "rope_theta", rope_theta, "a float > 0")
        _require(norm_eps > 0, "norm_eps", norm_eps, "a float > 0")
        _require(attention_impl in ATTENTION_IMPLS, "attention_impl", attention_impl, f"one of {ATTENTION_IMPLS}")

        self.hidden_size = hidden_size
        self.num_heads = num_heads
        self.kv_lora_rank = kv_lora_rank
        self.qk_nope_head_dim = qk_nope_head_dim
        self.qk_rope_head_dim = qk_rope_head_dim
        self.qk_head_dim = qk_nope_head_dim + qk_rope_head_dim
        self.v_head_dim = v_head_dim
        self.q_lora_rank = q_lora_rank
        self.attention_impl = attention_impl
        self.scale = self.qk_head_dim**-0.5

        if q_lora_rank is None:
            self.q_proj = nn.Linear(hidden_size, num_heads * self.qk_head_dim, bias=False)
        else:
            self.q_a_proj = nn.Linear(hidden_size, q_lora_rank, bias=False)
            self.q_a_layernorm = RMSNorm(q_lora_rank, eps=norm_eps)
            self.q_b_proj = nn.Linear(q_lora_rank, num_heads * self.qk_head_dim, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(hidden_size, kv_lora_rank + qk_rope_head_dim, bias=False)
        self.kv_a_layernorm = RMSNorm(kv_lora_rank, eps=norm_eps)
        self.kv_b_proj = nn.Linear(kv_lora_rank, num_heads * (qk_nope_head_dim + v_head_dim), bias=False)
        self.o_proj = nn.Linear(num_heads * v_head_dim, hidden_size, bias=False)
        self.rotary = RotaryEmbedding(qk_rope_head_dim, rope_theta) if (use_rope and qk_rope_head_dim > 0) else None

    def _project(
        self, x_BTD: torch.Tensor, position_ids_BT: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(q_nope [B, T, H, n], q_shared [B, T, H, R], normed latent [B, T, C], k_shared [B, T, R])``, the
        shared parts rotated when RoPE is on."""
        B, T, _ = x_BTD.shape
        if self.q_lora_rank is None:
            q_flat = self.q_proj(x_BTD)
        else:
            q_flat = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x_BTD)))
        q_nope_BTHn, q_shared_BTHR = q_flat.view(B, T, self.num_heads, self.qk_head_dim).split(
            [self.qk_nope_head_dim, self.qk_rope_head_dim], dim=-1)
        kv_latent_BTC, k_shared_BTR = self.kv_a_proj_with_mqa(x_BTD).split(
            [self.kv_lora_rank, self.qk_rope_head_dim], dim=-1)
        if self.rotary is not None:
            cos, sin = self.rotary.cos_sin(position_ids_BT)
            q_shared_BTHR = apply_rotary(q_shared_BTHR, cos, sin)
            k_shared_BTR = apply_rotary(k_shared_BTR.unsqueeze(2), cos, sin).squeeze(2)
        return q_nope_BTHn, q_shared_BTHR, self.kv_a_layernorm(kv_latent_BTC), k_shared_BTR

    def forward(self, x_BTD: torch.Tensor, layout: DocumentLayout | None = None) -> torch.Tensor:
        _check_forward_input(self, x_BTD, layout)
        B, T, _ = x_BTD.shape
        H, nope, rope = self.num_heads, self.qk_nope_head_dim, self.qk_rope_head_dim
        positions = _position_ids(x_BTD, layout) if self.rotary is not None else None
        q_nope_BTHn, q_shared_BTHR, latent_BTC, k_shared_BTR = self._project(x_BTD, positions)
        q_BTHK = torch.cat((q_nope_BTHn, q_shared_BTHR), dim=-1)
        k_nope_and_v = self.kv_b_proj(latent_BTC).view(B, T, H, nope + self.v_head_dim)
        k_nope_BTHn, v_BTHV = k_nope_and_v.split([nope, self.v_head_dim], dim=-1)
        k_BTHK = torch.cat((k_nope_BTHn, k_shared_BTR.unsqueeze(2).expand(B, T, H, rope)), dim=-1)

        o_BTHV = causal_attention(q_BTHK, k_BTHK, v_BTHV, layout, self.scale, impl=self.attention_impl)
        return self.o_proj(o_BTHV.reshape(B, T, H * self.v_head_dim))

    # --- decoding ---------------------------------------------------------------------------------------------
    def new_cache(self, batch_size: int, capacity: int, dtype: torch.dtype, device: torch.device) -> LatentKVCache:
        entries = torch.zeros(batch_size, capacity, self.kv_lora_rank + self.qk_rope_head_dim, dtype=dtype,
                              device=device)
        return LatentKVCache(entries)

    def forward_cached(self, x_BTD: torch.Tensor, cache: LatentKVCache, step: DecodeStep) -> torch.Tensor:
        """The T new tokens against the latent cache, with ``kv_b_proj`` absorbed (weights, not activations).

        Per head, ``q_nope . (W_k c) = (W_k^T q_nope) . c`` and ``sum_s p_s W_v c_s = W_v sum_s p_s c_s``: the
        queries move into the latent space (``[H, C]``, plus the shared dims), attention runs over the cached
        ``[S, C + R]`` entries as one key/value head, and ``W_v`` maps the latent output back to ``[H, V]``. No
        per-head key or value is ever materialised for the cached columns.
        """
        B, T, _ = x_BTD.shape
        H, nope, C = self.num_heads, self.qk_nope_head_dim, self.kv_lora_rank
        q_nope_BTHn, q_shared_BTHR, latent_BTC, k_shared_BTR = self._project(x_BTD, step.position_ids_BT)
        entries_BSE = cache.write(step.start, torch.cat((latent_BTC, k_shared_BTR), dim=-1))
        w_HXC = self.kv_b_proj.weight.view(H, nope + self.v_head_dim, C)
        q_latent_BTHC = torch.einsum("bthn,hnc->bthc", q_nope_BTHn, w_HXC[:, :nope])
        q_BTHE = torch.cat((q_latent_BTHC, q_shared_BTHR), dim=-1)
        entries_BS1E = entries_BSE.unsqueeze(2)
        o_latent_BTHC = masked_attention(q_BTHE, entries_BS1E, entries_BS1E[..., :C], step.visible_BTS, self.scale)
        o_BTHV = torch.einsum("bthc,hvc->bthv", o_latent_BTHC, w_HXC[:, nope:])
        return self.o_proj(o_BTHV.reshape(B, T, H * self.v_head_dim))

    def forward_flops_per_token(self, seq_len: int) -> float:
        """Forward matmul FLOPs per token, averaged over a causal sequence of ``seq_len`` tokens.

        With D hidden, H heads, K = qk_nope + qk_rope, n = qk_nope, R = qk_rope, V = v_head_dim, C = kv_lora_rank:
            queries     2*D*H*K                     (or 2*D*Q + 2*Q*H*K with q_lora_rank Q)
            kv_a        2*D*(C + R)
            kv_b        2*C*H*(n + V)
            o_proj      2*H*V*D
            attention   (seq_len + 1)/2 * (2*H*K + 2*H*V)   (q.k scores and the weighted sum of values over
                        the causal average of (seq_len + 1)/2 keys per token)
        Norms, RoPE, softmax and other elementwise work are not counted.
        """
        _require(isinstance(seq_len, int) and seq_len > 0, "seq_len", seq_len, "a positive integer")
        D, H, K, V = self.hidden_size, self.num_heads, self.qk_head_dim, self.v_head_dim
        C, R, n = self.kv_lora_rank, self.qk_rope_head_dim, self.qk_nope_head_dim
        if self.q_lora_rank is None:
            query = 2 * D * H * K
        else:
            query = 2 * D * self.q_lora_rank + 2 * self.q_lora_rank * H * K
        projections = query + 2 * D * (C + R) + 2 * C * H * (n + V) + 2 * H * V * D
        attention = _causal_keys_per_token(seq_len) * (2 * H * K + 2 * H * V)
        return float(projections + attention)

    def extra_repr(self) -> str:
        return (
            f"heads={self.num_heads}, qk_nope={self.qk_nope_head_dim}, qk_rope={self.qk_rope_head_dim}, "
            f"v={self.v_head_dim}, kv_lora_rank={self.kv_lora_rank}, q_lora_rank={self.q_lora_rank}, "
            f"rope={'on' if self.rotary is not None else 'off'}, impl={self.attention_impl}"
        )


class GatedGroupedQueryAttention(nn.Module):
    """Gated grouped-query attention as in Qwen3-Next.

    ``q_proj`` emits, per query head, ``head_dim`` query dims followed by ``head_dim`` output-gate dims
    (layout ``[H, 2*head_dim]``, as transformers' ``Qwen3NextAttention``). Queries and keys get a per-head
    RMSNorm (``q_norm``, ``k_norm``) and then RoPE on their first ``rope_fraction * head_dim`` dims; after
    attention the output is multiplied by ``sigmoid(gate)`` and projected by ``o_proj``. Softmax scale
    ``1/sqrt(head_dim)``; no biases.

    Norm convention: ``q_norm``/``k_norm`` are plain ``RMSNorm`` (``y = x_hat * weight``, weight init 1), not
    Qwen3-Next's zero-centred ``x_hat * (1 + weight)`` with weight init 0. The two compute the same function
    at init; converting a Qwen3-Next checkpoint means ``ours = theirs + 1``.
    """

    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        rope_fraction: float = 0.25,
        rope_theta: float = 10000.0,
        norm_eps: float = 1e-6,
        attention_impl: str = "auto",
    ):
        super().__init__()
        _check_positive(hidden_size=hidden_size, num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=head_dim)
        _require(num_heads % num_kv_heads == 0, "num_kv_heads", num_kv_heads, f"a divisor of num_heads={num_heads}")
        rotary_dims = head_dim * rope_fraction
        _require(
            0.0 <= rope_fraction <= 1.0 and float(rotary_dims).is_integer() and int(rotary_dims) % 2 == 0,
            "rope_fraction", rope_fraction,
            f"a fraction in [0, 1] giving an even number of rotary dims of head_dim={head_dim}",
        )
        _require(rope_theta > 0, "rope_theta", rope_theta, "a float > 0")
        _require(norm_eps > 0, "norm_eps", norm_eps, "a float > 0")
        _require(attention_impl in ATTENTION_IMPLS, "attention_impl", attention_impl, f"one of {ATTENTION_IMPLS}")

        self.hidden_size = hidden_size
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.rotary_dim = int(rotary_dims)
        self.attention_impl = attention_impl
        self.scale = head_dim**-0.5

        self.q_proj = nn.Linear(hidden_size, num_heads * head_dim * 2, bias=False)
        self.k_proj = nn.Linear(hidden_size, num_kv_heads * head_dim, bias=False)
        self.v_proj = nn.Linear(hidden_size, num_kv_heads * head_dim, bias=False)
        self.o_proj = nn.Linear(num_heads * head_dim, hidden_size, bias=False)
        self.q_norm = RMSNorm(head_dim, eps=norm_eps)
        self.k_norm = RMSNorm(head_dim, eps=norm_eps)
        self.rotary = RotaryEmbedding(self.rotary_dim, rope_theta) if self.rotary_dim > 0 else None

    def _project(
        self, x_BTD: torch.Tensor, position_ids_BT: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(q [B, T, H, K], gate [B, T, H, K], k [B, T, G, K], v [B, T, G, K])``, q and k normed and rotated."""
        B, T, _ = x_BTD.shape
        H, G, K = self.num_heads, self.num_kv_heads, self.head_dim
        q_BTHK, gate_BTHK = self.q_proj(x_BTD).view(B, T, H, 2 * K).chunk(2, dim=-1)
        q_BTHK = self.q_norm(q_BTHK)
        k_BTGK = self.k_norm(self.k_proj(x_BTD).view(B, T, G, K))
        v_BTGK = self.v_proj(x_BTD).view(B, T, G, K)
        if self.rotary is not None:
            cos, sin = self.rotary.cos_sin(position_ids_BT)
            q_BTHK = apply_rotary(q_BTHK, cos, sin)
            k_BTGK = apply_rotary(k_BTGK, cos, sin)
        return q_BTHK, gate_BTHK, k_BTGK, v_BTGK

    def _output(self, o_BTHK: torch.Tensor, gate_BTHK: torch.Tensor) -> torch.Tensor:
        B, T = o_BTHK.shape[:2]
        return self.o_proj((o_BTHK * torch.sigmoid(gate_BTHK)).reshape(B, T, self.num_heads * self.head_dim))

    def forward(self, x_BTD: torch.Tensor, layout: DocumentLayout | None = None) -> torch.Tensor:
        _check_forward_input(self, x_BTD, layout)
        positions = _position_ids(x_BTD, layout) if self.rotary is not None else None
        q_BTHK, gate_BTHK, k_BTGK, v_BTGK = self._project(x_BTD, positions)
        o_BTHK = causal_attention(q_BTHK, k_BTGK, v_BTGK, layout, self.scale, impl=self.attention_impl)
        return self._output(o_BTHK, gate_BTHK)

    # --- decoding ---------------------------------------------------------------------------------------------
    def new_cache(self, batch_size: int, capacity: int, dtype: torch.dtype, device: torch.device) -> KVCache:
        shape = (batch_size, capacity, self.num_kv_heads, self.head_dim)
        return KVCache(torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device))

    def forward_cached(self, x_BTD: torch.Tensor, cache: KVCache, step: DecodeStep) -> torch.Tensor:
        """The T new tokens against the cached keys and values (RoPE at each row's own positions)."""
        q_BTHK, gate_BTHK, k_BTGK, v_BTGK = self._project(x_BTD, step.position_ids_BT)
        keys_BSGK, values_BSGK = cache.write(step.start, k_BTGK, v_BTGK)
        o_BTHK = masked_attention(q_BTHK, keys_BSGK, values_BSGK, step.visible_BTS, self.scale)
        return self._output(o_BTHK, gate_BTHK)

    def forward_flops_per_token(self, seq_len: int) -> float:
        """Forward matmul FLOPs per token, averaged over a causal sequence of ``seq_len`` tokens.

        With D hidden, H query heads, G kv heads, K head_dim:
            q_proj (query + gate)   2*D*2*H*K
            k_proj, v_proj          2 * 2*D*G*K
            o_proj                  2*H*K*D
            attention               (seq_len + 1)/2 * (2*H*K + 2*H*K)   (q.k scores and the weighted sum of
                                    values over the causal average of (seq_len + 1)/2 keys per token)
        Norms, RoPE, the sigmoid gate and other elementwise work are not counted.
        """
        _require(isinstance(seq_len, int) and seq_len > 0, "seq_len", seq_len, "a positive integer")
        D, H, G, K = self.hidden_size, self.num_heads, self.num_kv_heads, self.head_dim
        projections = 2 * D * 2 * H * K + 2 * (2 * D * G * K) + 2 * H * K * D
        attention = _causal_keys_per_token(seq_len) * (2 * H * K + 2 * H * K)
        return float(projections + attention)

    def extra_repr(self) -> str:
        return (
            f"heads={self.num_heads}, kv_heads={self.num_kv_heads}, head_dim={self.head_dim}, "
            f"rotary_dim={self.rotary_dim}, impl={self.attention_impl}"
        )
