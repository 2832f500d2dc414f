"""Residual strategies: the standard residual sum and Attention Residuals (Full and Block AttnRes).

Every attention/mixer sublayer and every MLP sublayer is one "sublayer" (L = 2 x decoder layers). A strategy
owns the residual stream between sublayers and answers two questions: what is the input of sublayer l, and how
does the output of sublayer l enter the stream. The decoder layers are oblivious to which strategy runs.

AttnRes (Kimi Team, arXiv:2603.15031), as implemented here:
  sources of sublayer l:  Full  -> v_0 = embedding, v_1..v_{l-1} = earlier sublayer outputs (before any add)
                          Block -> b_0 = embedding, completed block sums b_1..b_{n-1}, and from the second
                                   sublayer of block n on, the running partial sum of block n
  logit_i = w_l . RMSNorm_l(v_i)     (pseudo-query w_l is a parameter, zero-initialised: uniform start;
                                      no 1/sqrt(d); the RMSNorm with its own weight is applied to keys only)
  h_l     = sum_i softmax(logit)_i v_i   (raw, un-normalised values; nothing detached)
The final representation is one more mix over all sources with its own query and key norm, then the final norm.

Because RMSNorm_l(v) = v * rstd(v) * g_l, the logit is rstd(v_i) * (v_i . (g_l * w_l)): the per-token rstd of
each completed source is computed once when it enters the stream and reused by every later sublayer.

Shape legend: N sources, B batch, T tokens, D hidden.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import nn

from .norms import compute_dtype


class AttnResQuery(nn.Module):
    """Pseudo-query and key-RMSNorm weight of one AttnRes mix (one per sublayer, plus one for the output).

    Calling the module performs the mix. Both parameters are direct attributes read inside ``forward`` so that
    wrappers which gather parameters around a module's forward (DeepSpeed ZeRO-3) see them.
    """

    def __init__(self, hidden_size: int, eps: float = 1e-6):
        super().__init__()
        self.query = nn.Parameter(torch.zeros(hidden_size))
        # Read by the optimizer's param grouping: queries get no weight decay (decay would pull them to uniform).
        self.query._no_weight_decay = True
        self.key_norm_weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def reset_parameters(self) -> None:
        # Zero queries are part of the method (uniform mix at step 0), not an arbitrary init choice.
        with torch.no_grad():
            self.query.zero_()
            self.key_norm_weight.fill_(1.0)

    def effective_query(self, dtype: torch.dtype) -> torch.Tensor:
        return self.key_norm_weight.to(dtype) * self.query.to(dtype)

    def forward(
        self, sources_NBTD: torch.Tensor, rstd_NBT: torch.Tensor, return_weights: bool = False
    ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        return attnres_mix(sources_NBTD, rstd_NBT, self.effective_query(compute_dtype(sources_NBTD)), return_weights)


def source_rstd(v_BTD: torch.Tensor, eps: float) -> torch.Tensor:
    """Per-token 1/RMS of a source ``[B, T]``, in at least fp32."""
    vc = v_BTD.to(compute_dtype(v_BTD))
    return torch.rsqrt(vc.pow(2).mean(-1) + eps)


def attnres_mix(
    sources_NBTD: torch.Tensor,
    rstd_NBT: torch.Tensor,
    effective_query_D: torch.Tensor,
    return_weights: bool = False,
) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Softmax-over-depth mix of the stacked sources (pure-torch reference path).

    ``effective_query_D`` is the pseudo-query times the key-norm weight. Returns the mixed hidden state in the
    sources' dtype and, on request, the depth weights ``[N, B, T]``.
    """
    dtype = compute_dtype(sources_NBTD)
    sources_c = sources_NBTD.to(dtype)
    logits_NBT = torch.einsum("nbtd,d->nbt", sources_c, effective_query_D.to(dtype)) * rstd_NBT
    weights_NBT = torch.softmax(logits_NBT, dim=0)
    h_BTD = torch.einsum("nbt,nbtd->btd", weights_NBT, sources_c).to(sources_NBTD.dtype)
    return h_BTD, (weights_NBT if return_weights else None)


@dataclass
class ResidualStream:
    """State carried between sublayers.

    ``hidden``: the running residual sum (standard strategy only).
    ``sources`` / ``sources_rstd``: completed AttnRes sources (b_0 = embedding first) and their per-token rstd.
    ``partial``: running sum of the current, unfinished block (Block AttnRes), None at a block start.
    ``sublayer``: index of the next sublayer (0-based over all 2 x num_layers sublayers).
    """

    hidden: Optional[torch.Tensor] = None
    sources: list[torch.Tensor] = field(default_factory=list)
    sources_rstd: list[torch.Tensor] = field(default_factory=list)
    partial: Optional[torch.Tensor] = None
    sublayer: int = 0
    depth_weights: Optional[list[torch.Tensor]] = None  # per mix: mean weight per source over tokens [N]
    input_rms: Optional[list[torch.Tensor]] = None  # per sublayer: RMS of its input h, mean over tokens


class StandardResidual:
    """h_{l+1} = h_l + f_l(Norm(h_l)): the fixed residual sum AttnRes replaces."""

    uses_queries = False

    def begin(self, embeddings_BTD: torch.Tensor, diagnostics: bool = False) -> ResidualStream:
        return ResidualStream(
            hidden=embeddings_BTD,
            depth_weights=[] if diagnostics else None,
            input_rms=[] if diagnostics else None,
        )

    def sublayer_input(self, stream: ResidualStream, mixer: Optional[AttnResQuery]) -> torch.Tensor:
        _record_rms(stream, stream.hidden)
        return stream.hidden

    def add_output(self, stream: ResidualStream, out_BTD: torch.Tensor) -> None:
        stream.hidden = stream.hidden + out_BTD
        stream.sublayer += 1

    def final(self, stream: ResidualStream, mixer: Optional[AttnResQuery]) -> torch.Tensor:
        return stream.hidden


class _DepthMixingResidual:
    """Shared bookkeeping of the AttnRes strategies: sources start with the embedding, every mix is a
    softmax over depth. Subclasses decide how a sublayer output enters the sources."""

    uses_queries = True

    def __init__(self, eps: float):
        self.eps = eps

    def begin(self, embeddings_BTD: torch.Tensor, diagnostics: bool = False) -> ResidualStream:
        return ResidualStream(
            sources=[embeddings_BTD],
            sources_rstd=[source_rstd(embeddings_BTD, self.eps)],
            depth_weights=[] if diagnostics else None,
            input_rms=[] if diagnostics else None,
        )

    def _mix(self, stream: ResidualStream, mixer: AttnResQuery) -> torch.Tensor:
        sources = list(stream.sources)
        rstd = list(stream.sources_rstd)
        if stream.partial is not None:
            sources.append(stream.partial)
            rstd.append(source_rstd(stream.partial, self.eps))
        want_weights = stream.depth_weights is not None
        h_BTD, weights_NBT = mixer(torch.stack(sources), torch.stack(rstd), return_weights=want_weights)
        if want_weights:
            stream.depth_weights.append(weights_NBT.detach().float().mean(dim=(1, 2)))
        return h_BTD

    def _append_source(self, stream: ResidualStream, v_BTD: torch.Tensor) -> None:
        stream.sources.append(v_BTD)
        stream.sources_rstd.append(source_rstd(v_BTD, self.eps))

    def sublayer_input(self, stream: ResidualStream, mixer: AttnResQuery) -> torch.Tensor:
        h_BTD = self._mix(stream, mixer)
        _record_rms(stream, h_BTD)
        return h_BTD

    def final(self, stream: ResidualStream, mixer: AttnResQuery) -> torch.Tensor:
        return self._mix(stream, mixer)


class BlockAttnResidual(_DepthMixingResidual):
    """Block AttnRes: ``block_size`` consecutive sublayer outputs are summed into one source; inside the
    current block the running partial sum is a source too. The last block may be shorter."""

    def __init__(self, block_size: int, eps: float):
        if block_size < 1:
            raise ValueError(f"model.attnres_block_size={block_size}: expected an integer >= 1")
        super().__init__(eps)
        self.block_size = block_size

    def add_output(self, stream: ResidualStream, out_BTD: torch.Tensor) -> None:
        stream.partial = out_BTD if stream.partial is None else stream.partial + out_BTD
        stream.sublayer += 1
        if stream.sublayer % self.block_size == 0:
            self._append_source(stream, stream.partial)
            stream.partial = None


class FullAttnResidual(_DepthMixingResidual):
    """Full AttnRes: every sublayer output is its own source for every later sublayer (O(L d) per token)."""

    def add_output(self, stream: ResidualStream, out_BTD: torch.Tensor) -> None:
        self._append_source(stream, out_BTD)
        stream.sublayer += 1


def _record_rms(stream: ResidualStream, h_BTD: torch.Tensor) -> None:
    if stream.input_rms is not None:
        stream.input_rms.append(h_BTD.detach().float().pow(2).mean(-1).sqrt().mean())


def build_residual_strategy(residual: str, block_size: int, eps: float):
    if residual == "standard":
        return StandardResidual()
    if residual == "full_attnres":
        return FullAttnResidual(eps)
    if residual == "block_attnres":
        return BlockAttnResidual(block_size, eps)
    raise ValueError(f"model.residual={residual!r}: expected one of standard, full_attnres, block_attnres")


def attnres_forward_flops_per_token(residual: str, num_sublayers: int, block_size: int, hidden_size: int) -> float:
    """Forward FLOPs per token of all AttnRes mixes (logits and weighted sums: 2*D per source each).

    The final output mix is counted as one more mix over every source. The key RMSNorms are elementwise
    and not counted, consistent with the rest of the accounting.
    """
    if residual == "standard":
        return 0.0
    total_sources = 0
    for layer in range(num_sublayers + 1):  # + 1: the final output mix
        if residual == "full_attnres":
            total_sources += 1 + layer
        else:
            completed_blocks = layer // block_size
            has_partial = layer % block_size != 0
            total_sources += 1 + completed_blocks + int(has_partial)
    return 4.0 * hidden_size * total_sources
