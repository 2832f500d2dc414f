"""Linear-attention sequence mixers: Kimi Delta Attention (KDA, Kimi Linear) and Gated DeltaNet (GDN,
Qwen3-Next).

Both map ``x [B, T, D] -> y [B, T, D]``::

    q, k, v  = silu(short_conv(W_q x)), silu(short_conv(W_k x)), silu(short_conv(W_v x))
    q, k     = l2_normalize(q), l2_normalize(k)                          (per head)
    g        = -exp(A_log) * softplus(gate_input(x) + dt_bias)           (log-space forget gate)
    beta     = sigmoid(b_proj(x))                                        (x2 with allow_neg_eigval)
    o        = gated_delta_rule(q, k, v, g, beta)                        (see delta_rule.py)
    y        = o_proj(rms_norm(o) * act(output_gate(x)))                 (per value head)

KDA: per-key-channel gate (``gate_input`` = low-rank ``f_proj``, ``g [B, T, HV, K]``), sigmoid output gate
from the low-rank ``g_proj``. GDN: one scalar gate per value head (``a_proj``, ``g [B, T, HV]``), swish
output gate from a full-rank ``g_proj`` (fla's ``use_gate=True``).

Parameter names, shapes and inits are those of fla 0.6.0's ``fla.layers.KimiDeltaAttention`` and
``fla.layers.GatedDeltaNet`` (short conv without bias, no cache), so a state_dict loads into either. One
choice differs by default: fla's KDA output gate has a bias on its second projection (``g_proj.1.bias``), the
published Kimi Linear model and transformers' ``KimiLinearForCausalLM`` have none; ``output_gate_bias=True``
gives fla's layout.

Two implementations of the mixing (``impl``):
* ``torch``: pure PyTorch on any device. Documents of a packed row become padded rows
  (``DocumentLayout.to_padded``), so the recurrent state and the conv window restart exactly at each
  document; the chunked delta rule of ``delta_rule.py`` does the recurrence. Projections run on the
  B*T real tokens; the conv and the recurrence cost grows with documents x longest document.
* ``fla``: CUDA only. fla's Triton kernels (``chunk_kda`` / ``chunk_gated_delta_rule``, and the
  ``fused_recurrent_*`` kernels in eval mode without grad for T <= 64) and fla's ``causal_conv1d`` for the
  short convs, on the flattened ``[1, B*T]`` tokens with ``cu_seqlens`` of the layout, so no padding (the
  chunk kernels also get the layout's host copy ``cu_seqlens_cpu``, so they plan chunks without a device
  sync). fla's chunk kernels use their own chunk size: ``linear_chunk_size`` applies to ``torch`` only.
  q/k L2 norm, gate activation and beta sigmoid are fused into the kernel exactly as fla's layer does.
* ``auto``: ``fla`` for CUDA tensors when fla is importable, ``torch`` otherwise.

Shape legend: B batch, T tokens per row, D hidden size, H query/key heads, HV value heads (in suffixes: E),
K key head dim, V value head dim, R rows after padding (documents), L padded row length.
"""

from __future__ import annotations

import functools
import math
import warnings

import torch
import torch.nn.functional as F
from torch import nn

from attnres_train.model.cache import DecodeStep, RecurrentCache
from attnres_train.model.mixers.delta_rule import (
    chunk_delta_rule,
    delta_rule_flops_per_token,
    l2_normalize,
    recurrent_delta_rule,
)
from attnres_train.model.mixers.short_conv import ShortConvolution
from attnres_train.model.norms import GatedRMSNorm
from attnres_train.model.packing import DocumentLayout

LINEAR_ATTENTION_IMPLS = ("auto", "torch", "fla")


@functools.lru_cache(maxsize=None)
def _fla_importable() -> bool:
    try:
        import fla.ops.gated_delta_rule  # noqa: F401
        import fla.ops.kda  # noqa: F401
    except Exception:  # triton or fla missing / broken: the torch path still works
        return False
    return True


def kda_log_gate(gate_input: torch.Tensor, A_log: torch.Tensor, dt_bias: torch.Tensor) -> torch.Tensor:
    """KDA forget gate ``-exp(A_log[h]) * softplus(f + dt_bias[h, c])`` in fp32: ``[..., HV, K]`` in and out."""
    num_v_heads, head_k_dim = gate_input.shape[-2:]
    biased = gate_input.float() + dt_bias.float().view(num_v_heads, head_k_dim)
    return -torch.exp(A_log.float()).unsqueeze(-1) * F.softplus(biased)


def gdn_log_gate(gate_input: torch.Tensor, A_log: torch.Tensor, dt_bias: torch.Tensor) -> torch.Tensor:
    """GDN forget gate ``-exp(A_log[h]) * softplus(a + dt_bias[h])`` in fp32: ``[..., HV]`` in and out."""
    return -torch.exp(A_log.float()) * F.softplus(gate_input.float() + dt_bias.float())


def _inverse_softplus_time_steps(count: int) -> torch.Tensor:
    """fla's dt_bias init: dt log-uniform in [1e-3, 1e-1] (floored at 1e-4), stored as softplus^-1(dt)."""
    dt_min, dt_max, dt_floor = 1e-3, 1e-1, 1e-4
    dt = torch.exp(torch.rand(count) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min)).clamp(min=dt_floor)
    return dt + torch.log(-torch.expm1(-dt))


class _GatedDeltaRuleMixer(nn.Module):
    """Shared skeleton of KDA and GDN; subclasses add the gate / output-gate projections."""

    per_channel_gate: bool

    def _init_common(
        self,
        hidden_size: int,
        head_dim: int,
        num_heads: int,
        num_v_heads: int | None,
        expand_v: float,
        conv_size: int,
        allow_neg_eigval: bool,
        norm_eps: float,
        chunk_size: int,
        impl: str,
    ) -> None:
        for name, value in (
            ("hidden_size", hidden_size),
            ("head_dim", head_dim),
            ("num_heads", num_heads),
            ("conv_size", conv_size),
            ("chunk_size", chunk_size),
        ):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{type(self).__name__}: {name}={value!r}: expected a positive integer")
        num_v_heads = num_heads if num_v_heads is None else num_v_heads
        if not isinstance(num_v_heads, int) or num_v_heads < 1 or num_v_heads % num_heads != 0:
            raise ValueError(
                f"{type(self).__name__}: num_v_heads={num_v_heads!r}: expected a positive multiple of "
                f"num_heads={num_heads} (or None)"
            )
        head_v_dim = head_dim * expand_v
        if not (expand_v > 0 and math.isclose(head_v_dim, round(head_v_dim), rel_tol=1e-5)):
            raise ValueError(
                f"{type(self).__name__}: expand_v={expand_v!r}: expected a positive factor making "
                f"head_dim*expand_v an integer (head_dim={head_dim})"
            )
        if not norm_eps > 0:
            raise ValueError(f"{type(self).__name__}: norm_eps={norm_eps!r}: expected a positive float")
        if impl not in LINEAR_ATTENTION_IMPLS:
            raise ValueError(f"{type(self).__name__}: impl={impl!r}: expected one of {LINEAR_ATTENTION_IMPLS}")
        self.hidden_size = hidden_size
        self.head_dim = self.head_k_dim = head_dim
        self.num_heads = num_heads
        self.num_v_heads = num_v_heads
        self.expand_v = expand_v
        self.head_v_dim = int(round(head_v_dim))
        self.key_dim = num_heads * head_dim
        self.value_dim = num_v_heads * self.head_v_dim
        self.conv_size = conv_size
        self.allow_neg_eigval = bool(allow_neg_eigval)
        self.norm_eps = norm_eps
        self.chunk_size = chunk_size
        self.impl = impl

    def _make_qkv(self) -> None:
        self.q_proj = nn.Linear(self.hidden_size, self.key_dim, bias=False)
        self.k_proj = nn.Linear(self.hidden_size, self.key_dim, bias=False)
        self.v_proj = nn.Linear(self.hidden_size, self.value_dim, bias=False)

    def _make_convs(self) -> None:
        self.q_conv1d = ShortConvolution(self.key_dim, self.conv_size, bias=False, activation="silu")
        self.k_conv1d = ShortConvolution(self.key_dim, self.conv_size, bias=False, activation="silu")
        self.v_conv1d = ShortConvolution(self.value_dim, self.conv_size, bias=False, activation="silu")

    def _make_gate_parameters(self, A_init: torch.Tensor, dt_bias_size: int) -> None:
        self.A_log = nn.Parameter(torch.log(A_init))
        self.A_log._no_weight_decay = True
        self.dt_bias = nn.Parameter(_inverse_softplus_time_steps(dt_bias_size))
        self.dt_bias._no_weight_decay = True

    # --- subclass hooks ------------------------------------------------------------------------------
    def _gate_input(self, x: torch.Tensor) -> torch.Tensor:
        """Raw (pre-activation) gate input, ``[..., HV*K]`` (KDA) or ``[..., HV]`` (GDN)."""
        raise NotImplementedError

    def _log_gate(self, gate_input: torch.Tensor) -> torch.Tensor:
        """Log-space gate from the raw input reshaped per head (``[..., HV, K]`` or ``[..., HV]``)."""
        raise NotImplementedError

    def _gate_input_shape(self) -> tuple[int, ...]:
        raise NotImplementedError

    def _projection_macs(self) -> int:
        raise NotImplementedError

    def _fla_kernels(self):
        raise NotImplementedError

    # --- forward -------------------------------------------------------------------------------------
    def forward(self, x_BTD: torch.Tensor, layout: DocumentLayout | None = None) -> torch.Tensor:
        if x_BTD.dim() != 3 or x_BTD.shape[-1] != self.hidden_size:
            raise ValueError(
                f"{type(self).__name__} expects x of shape [batch, seq_len, hidden_size={self.hidden_size}], "
                f"got {tuple(x_BTD.shape)}"
            )
        B, T, _ = x_BTD.shape
        if layout is not None and tuple(layout.doc_ids_BT.shape) != (B, T):
            raise ValueError(
                f"layout covers doc_ids of shape {tuple(layout.doc_ids_BT.shape)}, expected the [batch, seq_len] "
                f"of x, {(B, T)}"
            )
        if self._use_fla(x_BTD):
            o_BTEV = self._mix_fla(x_BTD, layout)
        else:
            o_BTEV = self._mix_torch(x_BTD, layout)
        return self._output(x_BTD, o_BTEV)

    def _output(self, x_BTD: torch.Tensor, o_BTEV: torch.Tensor) -> torch.Tensor:
        B, T, _ = x_BTD.shape
        gate_BTEV = self.g_proj(x_BTD).view(B, T, self.num_v_heads, self.head_v_dim)
        o_BTEV = self.o_norm(o_BTEV, gate_BTEV)
        return self.o_proj(o_BTEV.reshape(B, T, self.value_dim))

    def _use_fla(self, x_BTD: torch.Tensor) -> bool:
        if self.impl == "torch":
            return False
        if self.impl == "fla":
            if not x_BTD.is_cuda:
                raise RuntimeError(
                    f"{type(self).__name__}: impl='fla' runs fla's Triton kernels and needs CUDA tensors, got a "
                    f"tensor on {x_BTD.device}; use impl='torch' or 'auto' on this device"
                )
            return True
        if not x_BTD.is_cuda:
            return False
        if not _fla_importable():
            warnings.warn(
                f"{type(self).__name__}: fla (flash-linear-attention) is not importable; impl='auto' falls back "
                f"to the pure-torch delta rule on CUDA (slow)",
                stacklevel=3,
            )
            return False
        refusal = self._fla_kernel_refusal(x_BTD)
        if refusal is not None:
            warnings.warn(f"{type(self).__name__}: {refusal}; impl='auto' uses the pure-torch delta rule", stacklevel=3)
            return False
        return True

    def _fla_kernel_refusal(self, x_BTD: torch.Tensor) -> str | None:
        """Why fla's kernels must not run for this input on this machine (None: they may)."""
        return None

    def _mix_torch(self, x_BTD: torch.Tensor, layout: DocumentLayout | None) -> torch.Tensor:
        B, T, _ = x_BTD.shape
        parts = [self.q_proj(x_BTD), self.k_proj(x_BTD), self.v_proj(x_BTD)]
        parts += [self._gate_input(x_BTD), self.b_proj(x_BTD)]
        # Projections are per token, so they run on the B*T real tokens; only the conv and the recurrence
        # need one document per row, and they get the padded [R, L] batch (gathered once, concatenated).
        padded = layout is not None and not layout.is_single_document_per_row()
        if padded:
            sizes = [p.shape[-1] for p in parts]
            parts = list(layout.to_padded(torch.cat(parts, dim=-1)).split(sizes, dim=-1))
        q_RLD, k_RLD, v_RLD, gate_input, beta_input_RLE = parts
        q_RLHK, k_RLHK, v_RLEV, g, beta_RLE = self._delta_rule_inputs(
            self.q_conv1d(q_RLD), self.k_conv1d(k_RLD), self.v_conv1d(v_RLD), gate_input, beta_input_RLE)
        o_RLEV, _ = chunk_delta_rule(q_RLHK, k_RLHK, v_RLEV, g, beta_RLE, chunk_size=self.chunk_size)
        return layout.from_padded(o_RLEV, B, T) if padded else o_RLEV

    def _delta_rule_inputs(self, q_RLD, k_RLD, v_RLD, gate_input, beta_input_RLE):
        """Convolved q, k, v and the raw gate / beta inputs -> the delta rule's ``(q, k, v, g, beta)``."""
        R, L = q_RLD.shape[:2]
        H, E, K, V = self.num_heads, self.num_v_heads, self.head_k_dim, self.head_v_dim
        q_RLHK = l2_normalize(q_RLD.float().view(R, L, H, K))
        k_RLHK = l2_normalize(k_RLD.float().view(R, L, H, K))
        v_RLEV = v_RLD.view(R, L, E, V)
        g = self._log_gate(gate_input.view(R, L, *self._gate_input_shape()))
        beta_RLE = torch.sigmoid(beta_input_RLE.float())
        if self.allow_neg_eigval:
            beta_RLE = 2.0 * beta_RLE
        return q_RLHK, k_RLHK, v_RLEV, g, beta_RLE

    # --- decoding ------------------------------------------------------------------------------------------
    def new_cache(self, batch_size: int, capacity: int, dtype: torch.dtype, device: torch.device) -> RecurrentCache:
        """Zero state and zero conv windows (a row's history before its first token); ``capacity`` is unused:
        nothing here grows with the context."""
        def window(channels: int) -> torch.Tensor:
            return torch.zeros(batch_size, self.conv_size - 1, channels, dtype=dtype, device=device)

        state_dtype = torch.promote_types(dtype, torch.float32)
        state = torch.zeros(batch_size, self.num_v_heads, self.head_k_dim, self.head_v_dim, dtype=state_dtype,
                            device=device)
        return RecurrentCache(state, window(self.key_dim), window(self.key_dim), window(self.value_dim))

    def forward_cached(self, x_BTD: torch.Tensor, cache: RecurrentCache, step: DecodeStep) -> torch.Tensor:
        """The T new tokens from the cached state and conv windows (pure torch on any device).

        Pads are no-ops: their conv inputs are zero (pads only precede a row's first token, where the window is
        all zeros anyway) and gate and beta are zero, so the state is neither decayed nor written. One token runs
        the step-by-step recurrence; more run the chunked form from the cached state.
        """
        B, T, _ = x_BTD.shape
        keep_BT1 = step.token_mask_BT.unsqueeze(-1)

        def convolved(projection: nn.Module, conv: ShortConvolution, window_BWD: torch.Tensor):
            return conv.forward_with_window(projection(x_BTD).masked_fill(~keep_BT1, 0.0), window_BWD)

        q_BTD, cache.q_window_BWD = convolved(self.q_proj, self.q_conv1d, cache.q_window_BWD)
        k_BTD, cache.k_window_BWD = convolved(self.k_proj, self.k_conv1d, cache.k_window_BWD)
        v_BTD, cache.v_window_BWD = convolved(self.v_proj, self.v_conv1d, cache.v_window_BWD)
        q_BTHK, k_BTHK, v_BTEV, g, beta_BTE = self._delta_rule_inputs(
            q_BTD, k_BTD, v_BTD, self._gate_input(x_BTD), self.b_proj(x_BTD))
        g = g.masked_fill(~step.token_mask_BT.view(B, T, *([1] * (g.dim() - 2))), 0.0)
        beta_BTE = beta_BTE.masked_fill(~keep_BT1, 0.0)
        if T == 1:
            o_BTEV, cache.state_BNKV = recurrent_delta_rule(
                q_BTHK, k_BTHK, v_BTEV, g, beta_BTE, initial_state=cache.state_BNKV, output_final_state=True)
        else:
            o_BTEV, cache.state_BNKV = chunk_delta_rule(
                q_BTHK, k_BTHK, v_BTEV, g, beta_BTE, initial_state=cache.state_BNKV, output_final_state=True,
                chunk_size=self.chunk_size)
        return self._output(x_BTD, o_BTEV)

    def _mix_fla(self, x_BTD: torch.Tensor, layout: DocumentLayout | None) -> torch.Tensor:
        chunk_kernel, recurrent_kernel = self._fla_kernels()
        B, T, D = x_BTD.shape
        # Documents: flatten to one row of B*T tokens and let cu_seqlens restart conv window and state.
        cu_seqlens = None
        if layout is not None:
            x_BTD = x_BTD.reshape(1, B * T, D)
            cu_seqlens = layout.cu_seqlens
        rows, length = x_BTD.shape[:2]
        q = self.q_conv1d(self.q_proj(x_BTD), cu_seqlens=cu_seqlens, use_fla_kernel=True)
        k = self.k_conv1d(self.k_proj(x_BTD), cu_seqlens=cu_seqlens, use_fla_kernel=True)
        v = self.v_conv1d(self.v_proj(x_BTD), cu_seqlens=cu_seqlens, use_fla_kernel=True)
        use_recurrent = not self.training and not torch.is_grad_enabled() and T <= 64
        kernel = recurrent_kernel if use_recurrent else chunk_kernel
        # fla's chunk kernels plan their chunks from host offsets: hand them the layout's host copy, or each call
        # reads cu_seqlens back from the device (a sync per layer). The recurrent kernels take no such argument.
        host_offsets = {} if use_recurrent or layout is None else {"cu_seqlens_cpu": layout.cu_seqlens_cpu}
        o, _ = kernel(
            q=q.reshape(rows, length, self.num_heads, self.head_k_dim),
            k=k.reshape(rows, length, self.num_heads, self.head_k_dim),
            v=v.reshape(rows, length, self.num_v_heads, self.head_v_dim),
            g=self._gate_input(x_BTD).reshape(rows, length, *self._gate_input_shape()),
            beta=self.b_proj(x_BTD),
            A_log=self.A_log,
            dt_bias=self.dt_bias,
            initial_state=None,
            output_final_state=False,
            use_qk_l2norm_in_kernel=True,
            use_gate_in_kernel=True,
            use_beta_sigmoid_in_kernel=True,
            allow_neg_eigval=self.allow_neg_eigval,
            cu_seqlens=cu_seqlens,
            **host_offsets,
        )
        return o.reshape(B, T, self.num_v_heads, self.head_v_dim)

    # --- accounting ----------------------------------------------------------------------------------
    def forward_flops_per_token(self, seq_len: int) -> float:
        """Forward matmul FLOPs per token on a sequence of ``seq_len`` tokens (linear in seq_len).

        ``2 * (projections + short convs) + delta rule``, with W = conv_size:
            projections   see ``_projection_macs`` of each class (multiply-adds per token)
            short convs   W * (2*H*K + HV*V)          (depthwise, one multiply-add per tap and channel)
            delta rule    2 * HV * ceil(T / C) * delta_rule_chunk_macs(C, K, V) / T with C = chunk_size
                          (delta_rule.py: intra-chunk decayed products, the WY triangular solve and the
                          inter-chunk state matmuls; fla's kernels run the same chunked algorithm, C = 64)
        Norms, gates, L2 norms and activations are elementwise and not counted.
        """
        if not isinstance(seq_len, int) or seq_len < 1:
            raise ValueError(f"seq_len={seq_len!r}: expected a positive integer")
        conv_macs = self.conv_size * (2 * self.key_dim + self.value_dim)
        recurrence = delta_rule_flops_per_token(
            seq_len, self.num_v_heads, self.head_k_dim, self.head_v_dim, self.chunk_size, self.per_channel_gate
        )
        return 2.0 * (self._projection_macs() + conv_macs) + recurrence

    def extra_repr(self) -> str:
        return (
            f"hidden_size={self.hidden_size}, num_heads={self.num_heads}, num_v_heads={self.num_v_heads}, "
            f"head_k_dim={self.head_k_dim}, head_v_dim={self.head_v_dim}, chunk_size={self.chunk_size}, "
            f"impl={self.impl}"
        )


class KimiDeltaAttention(_GatedDeltaRuleMixer):
    """Kimi Delta Attention: gated delta rule with a per-key-channel forget gate (Kimi Linear).

    Parameters (fla names): q_proj/k_proj ``[H*K, D]``, v_proj ``[HV*V, D]``, {q,k,v}_conv1d.weight
    ``[*, 1, W]``, f_proj.0 ``[V, D]``, f_proj.1 ``[HV*K, V]``, b_proj ``[HV, D]``, A_log ``[HV]``
    (log U(1, 16)), dt_bias ``[HV*K]``, g_proj.0 ``[V, D]``, g_proj.1 ``[HV*V, V]`` (+ bias ``[HV*V]`` with
    ``output_gate_bias``, fla's layout; the published Kimi Linear has none), o_norm.weight
    ``[V]`` (sigmoid-gated RMSNorm), o_proj ``[D, HV*V]``.
    """

    per_channel_gate = True

    def __init__(
        self,
        hidden_size: int,
        head_dim: int,
        num_heads: int,
        num_v_heads: int | None = None,
        expand_v: float = 1.0,
        conv_size: int = 4,
        allow_neg_eigval: bool = False,
        norm_eps: float = 1e-5,
        chunk_size: int = 64,
        impl: str = "auto",
        output_gate_bias: bool = False,
    ):
        super().__init__()
        self._init_common(
            hidden_size, head_dim, num_heads, num_v_heads, expand_v, conv_size, allow_neg_eigval, norm_eps,
            chunk_size, impl,
        )
        D, E, K, V = hidden_size, self.num_v_heads, self.head_k_dim, self.head_v_dim
        self._make_qkv()
        self._make_convs()
        self.gate_dim = E * K
        self.f_proj = nn.Sequential(nn.Linear(D, V, bias=False), nn.Linear(V, self.gate_dim, bias=False))
        self.b_proj = nn.Linear(D, E, bias=False)
        self._make_gate_parameters(torch.empty(E).uniform_(1, 16), self.gate_dim)
        self.g_proj = nn.Sequential(nn.Linear(D, V, bias=False), nn.Linear(V, self.value_dim, bias=output_gate_bias))
        self.o_norm = GatedRMSNorm(V, eps=norm_eps, activation="sigmoid")
        self.o_proj = nn.Linear(self.value_dim, D, bias=False)

    def _gate_input(self, x: torch.Tensor) -> torch.Tensor:
        return self.f_proj(x)

    def _gate_input_shape(self) -> tuple[int, ...]:
        return (self.num_v_heads, self.head_k_dim)

    def _log_gate(self, gate_input: torch.Tensor) -> torch.Tensor:
        return kda_log_gate(gate_input, self.A_log, self.dt_bias)

    def _projection_macs(self) -> int:
        """q, k: 2*D*H*K; v: D*HV*V; f_proj: D*V + V*HV*K; b_proj: D*HV; g_proj: D*V + V*HV*V; o_proj: HV*V*D."""
        D, V = self.hidden_size, self.head_v_dim
        return (
            2 * D * self.key_dim
            + D * self.value_dim
            + D * V + V * self.gate_dim
            + D * self.num_v_heads
            + D * V + V * self.value_dim
            + self.value_dim * D
        )

    def _fla_kernels(self):
        from fla.ops.kda import chunk_kda, fused_recurrent_kda

        return chunk_kda, fused_recurrent_kda


class GatedDeltaNet(_GatedDeltaRuleMixer):
    """Gated DeltaNet: gated delta rule with one scalar forget gate per value head (Qwen3-Next).

    Parameters (fla names, ``use_gate=True``): q_proj/k_proj ``[H*K, D]``, v_proj ``[HV*V, D]``,
    a_proj ``[HV, D]``, b_proj ``[HV, D]``, A_log ``[HV]`` (log U(0, 16)), dt_bias ``[HV]``,
    {q,k,v}_conv1d.weight ``[*, 1, W]``, g_proj ``[HV*V, D]``, o_norm.weight ``[V]`` (swish-gated RMSNorm),
    o_proj ``[D, HV*V]``.
    """

    per_channel_gate = False

    def _fla_kernel_refusal(self, x_BTD: torch.Tensor) -> str | None:
        # fla 0.6 raises in the backward of its gated chunk kernel for these Triton releases on Hopper
        # (wrong results, fla issue #640); deciding up front keeps a training step from dying mid-backward.
        if torch.cuda.get_device_capability(x_BTD.device)[0] != 9:
            return None
        import triton

        version = tuple(int(part) for part in triton.__version__.split(".")[:3] if part.isdigit())
        if (3, 4, 0) <= version < (3, 7, 1):
            return f"fla's gated delta-rule backward is refused with Triton {triton.__version__} on Hopper"
        return None

    def __init__(
        self,
        hidden_size: int,
        head_dim: int,
        num_heads: int,
        num_v_heads: int | None = None,
        expand_v: float = 2.0,
        conv_size: int = 4,
        allow_neg_eigval: bool = False,
        norm_eps: float = 1e-5,
        chunk_size: int = 64,
        impl: str = "auto",
    ):
        super().__init__()
        self._init_common(
            hidden_size, head_dim, num_heads, num_v_heads, expand_v, conv_size, allow_neg_eigval, norm_eps,
            chunk_size, impl,
        )
        D, E = hidden_size, self.num_v_heads
        self._make_qkv()
        self.a_proj = nn.Linear(D, E, bias=False)
        self.b_proj = nn.Linear(D, E, bias=False)
        # fla draws A from U(0, 16); the floor only keeps log() finite for the (measure-zero) draw of 0.
        self._make_gate_parameters(torch.empty(E).uniform_(0, 16).clamp_(min=1e-6), E)
        self._make_convs()
        self.g_proj = nn.Linear(D, self.value_dim, bias=False)
        self.o_norm = GatedRMSNorm(self.head_v_dim, eps=norm_eps, activation="swish")
        self.o_proj = nn.Linear(self.value_dim, D, bias=False)

    def _gate_input(self, x: torch.Tensor) -> torch.Tensor:
        return self.a_proj(x)

    def _gate_input_shape(self) -> tuple[int, ...]:
        return (self.num_v_heads,)

    def _log_gate(self, gate_input: torch.Tensor) -> torch.Tensor:
        return gdn_log_gate(gate_input, self.A_log, self.dt_bias)

    def _projection_macs(self) -> int:
        """q, k: 2*D*H*K; v: D*HV*V; a_proj, b_proj: 2*D*HV; g_proj: D*HV*V; o_proj: HV*V*D."""
        D = self.hidden_size
        return (
            2 * D * self.key_dim
            + D * self.value_dim
            + 2 * D * self.num_v_heads
            + D * self.value_dim
            + self.value_dim * D
        )

    def _fla_kernels(self):
        from fla.ops.gated_delta_rule import chunk_gated_delta_rule, fused_recurrent_gated_delta_rule

        return chunk_gated_delta_rule, fused_recurrent_gated_delta_rule
