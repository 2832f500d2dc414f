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

Implementations (``model.attnres_impl``, resolved once per forward by :func:`resolve_attnres_impl`):
  torch  one softmax mix per sublayer in plain torch (the reference; every device)
  fla    one call of fla's Triton ``fused_attnres`` per sublayer (CUDA only)
  fused  Block AttnRes in two phases (see ``attnres_kernels``): at the first sublayer of a block that runs here,
         all sublayers of the block score the completed blocks together; each sublayer then merges its
         partial-sum source. Triton kernels on CUDA, the same two phases in torch elsewhere. Full AttnRes has no
         blocks and uses the torch mix under ``fused``.
  auto   torch until the fused kernels have passed their GPU tests (``FUSED_KERNELS_VERIFIED_ON_GPU``), then
         fused on CUDA and torch elsewhere.

Shape legend: N sources, B batch, T tokens, D hidden, S queries of one block.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
from torch import nn

from .config import ATTNRES_IMPLS
from .norms import compute_dtype

# The fused Triton kernels have passed their tests only under Triton's CPU interpreter so far; ``auto`` keeps the
# torch mix on CUDA until tests/kernels has run on a GPU (then set this to True).
FUSED_KERNELS_VERIFIED_ON_GPU = False


def resolve_attnres_impl(impl: str, device: torch.device) -> str:
    """The implementation ``model.attnres_impl=impl`` means on ``device``; raises naming the field when the
    choice cannot run there."""
    if impl not in ATTNRES_IMPLS:
        raise ValueError(f"model.attnres_impl={impl!r}: expected one of {ATTNRES_IMPLS}")
    if impl == "auto":
        return "fused" if device.type == "cuda" and FUSED_KERNELS_VERIFIED_ON_GPU else "torch"
    if impl == "fla" and device.type != "cuda":
        raise RuntimeError(
            f"model.attnres_impl=fla runs fla's Triton fused_attnres, which needs CUDA tensors (got {device}); "
            "use attnres_impl=torch or auto here")
    return impl


def _fla_attnres() -> Callable:
    try:
        from fla.ops.attnres import fused_attnres
    except ImportError as error:
        raise RuntimeError(
            "model.attnres_impl=fla needs flash-linear-attention with fla.ops.attnres (pip install fla-core)"
        ) from error
    return fused_attnres


def _two_phase_ops(device: torch.device):
    """``(phase1, merge, close)``: the Triton kernels on CUDA, the same steps in torch elsewhere."""
    if device.type == "cuda":
        try:
            from attnres_kernels.block_attnres import block_close, block_merge, block_phase1
        except ImportError as error:
            raise RuntimeError(
                "model.attnres_impl=fused on CUDA needs triton and the attnres_kernels package (pip install -e .)"
            ) from error
        return block_phase1, block_merge, block_close
    from attnres_kernels.reference import block_merge_torch, block_phase1_torch, close_reference

    return block_phase1_torch, block_merge_torch, close_reference


def _source_gradients(device: torch.device):
    """The in-place accumulator of the sources' gradients that the kernels share across one forward's blocks."""
    if device.type != "cuda":
        return None
    from attnres_kernels.block_attnres import SourceGradients

    return SourceGradients()


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
        self,
        sources: list[torch.Tensor],
        rstd: list[torch.Tensor],
        impl: str = "torch",
        return_weights: bool = False,
        block: Optional["BlockMixer"] = None,
        norm: Optional[nn.Module] = None,
    ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Mix ``sources`` (each ``[B, T, D]``, completed ones first, then the partial sum if any).

        ``block`` (impl ``fused``) computes the mix from the block's two phases instead, followed by the RMSNorm
        ``norm`` when one is given; it runs inside this call so that wrappers gathering this module's parameters
        around its forward (ZeRO-3) see them.
        """
        if block is not None:
            return block.mix(self, norm), None
        if impl == "fla" and not return_weights:
            mixed = _fla_attnres()(self.query, sources, self.key_norm_weight, rms_eps=self.eps)
            return mixed, None
        stacked = torch.stack(sources)
        return attnres_mix(stacked, torch.stack(rstd), self.effective_query(compute_dtype(stacked)), return_weights)


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
    ``pending``: impl fused only: the last sublayer output, not yet added to ``partial`` (the next merge adds it
    in the same pass; :meth:`settled_partial` adds it for any other reader).
    ``sublayer``: index of the next sublayer (0-based over all 2 x num_layers sublayers).
    """

    hidden: Optional[torch.Tensor] = None
    sources: list[torch.Tensor] = field(default_factory=list)
    sources_rstd: list[torch.Tensor] = field(default_factory=list)
    partial: Optional[torch.Tensor] = None
    pending: Optional[torch.Tensor] = None
    sublayer: int = 0
    depth_weights: Optional[list[torch.Tensor]] = None  # per mix: mean weight per source over tokens [N]
    input_rms: Optional[list[torch.Tensor]] = None  # per sublayer: RMS of its input h, mean over tokens
    block_mixer: Optional["BlockMixer"] = None  # impl fused: phase-1 results of the current block
    horizon: Optional[int] = None  # the stream is dropped before this sublayer: phase 1 batches no query past it
    source_grads: Optional[object] = None  # impl fused on CUDA: the sources' gradient accumulator of this forward

    def settled_partial(self) -> Optional[torch.Tensor]:
        """The running partial sum with any pending sublayer output added."""
        if self.pending is not None:
            self.partial = self.pending if self.partial is None else self.partial + self.pending
            self.pending = None
        return self.partial


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

    def fused_normed_input(self, stream: ResidualStream, mixer, norm: nn.Module) -> Optional[torch.Tensor]:
        return None

    def add_output(self, stream: ResidualStream, out_BTD: torch.Tensor) -> None:
        stream.hidden = stream.hidden + out_BTD
        stream.sublayer += 1

    def final(self, stream: ResidualStream, mixer: Optional[AttnResQuery]) -> torch.Tensor:
        return stream.hidden


class _DepthMixingResidual:
    """Shared bookkeeping of the AttnRes strategies: sources start with the embedding, every mix is a
    softmax over depth. Subclasses decide how a sublayer output enters the sources."""

    uses_queries = True

    def __init__(self, eps: float, impl: str = "torch"):
        if impl not in ATTNRES_IMPLS:
            raise ValueError(f"model.attnres_impl={impl!r}: expected one of {ATTNRES_IMPLS}")
        self.eps = eps
        self.impl = impl
        # True when a parameter holds its values only inside its own module's call (the engine sets it under
        # ZeRO-3, which gathers shards around each module's forward and backward): the fused mix then uses no
        # other module's parameters -- no batching of later queries, no folding of the following norm.
        self.per_module_parameters = False

    def begin(self, embeddings_BTD: torch.Tensor, diagnostics: bool = False) -> ResidualStream:
        return ResidualStream(
            sources=[embeddings_BTD],
            sources_rstd=[source_rstd(embeddings_BTD, self.eps)],
            depth_weights=[] if diagnostics else None,
            input_rms=[] if diagnostics else None,
        )

    def _mix(self, stream: ResidualStream, mixer: AttnResQuery) -> torch.Tensor:
        want_weights = stream.depth_weights is not None
        impl = resolve_attnres_impl(self.impl, stream.sources[0].device)
        if impl == "fused" and not want_weights:
            block = self._block_mixer(stream)
            if block is not None:
                return mixer(stream.sources, stream.sources_rstd, block=block)[0]
        sources = list(stream.sources)
        rstd = list(stream.sources_rstd)
        partial = stream.settled_partial()
        if partial is not None:
            sources.append(partial)
            rstd.append(source_rstd(partial, self.eps))
        h_BTD, weights_NBT = mixer(sources, rstd, impl=impl, return_weights=want_weights)
        if want_weights:
            stream.depth_weights.append(weights_NBT.detach().float().mean(dim=(1, 2)))
        return h_BTD

    def _block_mixer(self, stream: ResidualStream) -> Optional["BlockMixer"]:
        return None  # only Block AttnRes has blocks to batch

    def fused_normed_input(
        self, stream: ResidualStream, mixer: AttnResQuery, norm: nn.Module
    ) -> Optional[torch.Tensor]:
        """``norm(mix)`` in one pass when impl ``fused`` can apply the following RMSNorm inside phase 2 (then the
        un-normed mix is never materialised), else None: the caller mixes and normalises as usual."""
        first = stream.sources[0]
        if stream.depth_weights is not None or resolve_attnres_impl(self.impl, first.device) != "fused":
            return None
        weight = getattr(norm, "weight", None)
        if self.per_module_parameters or weight is None or weight.shape != first.shape[-1:]:
            return None
        block = self._block_mixer(stream)
        if block is None:
            return None
        return mixer(stream.sources, stream.sources_rstd, block=block, norm=norm)[0]

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

    def __init__(self, block_size: int, eps: float, impl: str = "torch"):
        if block_size < 1:
            raise ValueError(f"model.attnres_block_size={block_size}: expected an integer >= 1")
        super().__init__(eps, impl)
        self.block_size = block_size
        self._queries: dict[int, AttnResQuery] = {}

    def register_queries(self, queries: dict[int, AttnResQuery]) -> None:
        """The pseudo-queries phase 1 may batch, by sublayer index (``2 * num_layers`` is the output mix).
        The decoder registers all of its own; a pipeline stage replaces them with the ones it runs."""
        self._queries = dict(queries)

    def _block_mixer(self, stream: ResidualStream) -> Optional["BlockMixer"]:
        block = stream.sublayer // self.block_size
        if stream.block_mixer is None or stream.block_mixer.block != block:
            stream.block_mixer = BlockMixer(self, stream, block)
        return stream.block_mixer

    def add_output(self, stream: ResidualStream, out_BTD: torch.Tensor) -> None:
        mixer = stream.block_mixer
        lazy = mixer is not None and mixer.block == stream.sublayer // self.block_size
        if lazy:
            # the next merge (or the block's close) adds it in its own pass
            stream.settled_partial()
            stream.pending = out_BTD
        else:
            stream.partial = out_BTD if stream.partial is None else stream.partial + out_BTD
        stream.sublayer += 1
        if stream.sublayer % self.block_size == 0:
            if lazy:
                mixer.close()
            else:
                self._append_source(stream, stream.partial)
            stream.partial = None


class FullAttnResidual(_DepthMixingResidual):
    """Full AttnRes: every sublayer output is its own source for every later sublayer (O(L d) per token)."""

    def add_output(self, stream: ResidualStream, out_BTD: torch.Tensor) -> None:
        self._append_source(stream, out_BTD)
        stream.sublayer += 1


class BlockMixer:
    """The two phases of one Block AttnRes block for one stream (impl ``fused``).

    Phase 1 runs when a sublayer of the block first needs it, for that sublayer's query and every later one of
    the block that is registered here (a pipeline stage registers only its own layers), unless parameters are
    valid only inside their own module's call (``per_module_parameters``). Each query's output and log-sum-exp
    are kept until its sublayer's merge, which also adds the previous sublayer's output to the partial sum
    (``stream.pending``); :meth:`close` forms the block summary and its rstd when the block ends.
    """

    def __init__(self, strategy: "BlockAttnResidual", stream: ResidualStream, block: int):
        self.strategy = strategy
        self.stream = stream
        self.block = block
        first = stream.sources[0]
        self.shape = first.shape
        self.device = first.device
        self.phase1, self.merge, self.close_block = _two_phase_ops(first.device)
        if stream.source_grads is None:
            stream.source_grads = _source_gradients(first.device)
        self.sources, self.sources_rstd = stream.sources, stream.sources_rstd
        self.horizon = stream.horizon
        self.results: dict[int, tuple] = {}

    def _phase1_group(self, query: AttnResQuery, sublayer: int) -> list[tuple[int, AttnResQuery]]:
        size = self.strategy.block_size
        group = [(sublayer, query)]
        if self.strategy.per_module_parameters:
            return group
        end = (self.block + 1) * size if self.horizon is None else min((self.block + 1) * size, self.horizon)
        for index in range(sublayer + 1, end):
            other = self.strategy._queries.get(index)
            if other is not None and index not in self.results and other.query.device == self.device:
                group.append((index, other))
        return group

    def _flat(self, x: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        return None if x is None else x.reshape(-1, self.shape[-1])

    def mix(self, query: AttnResQuery, norm: Optional[nn.Module] = None) -> torch.Tensor:
        stream, sublayer = self.stream, self.stream.sublayer
        if sublayer not in self.results:
            group = self._phase1_group(query, sublayer)
            # With nothing to merge into the calling sublayer's mix, phase 1 applies its norm as well (the
            # merge then has nothing to launch).
            first_norm = None
            if norm is not None and stream.pending is None and stream.partial is None:
                first_norm = (norm.weight, norm.eps)
            # The sources go in as they are (views, no stack of [N, T, D]), here inside the calling query's
            # forward like every other input of the mix.
            outputs_TD, lse_T, params = self.phase1(
                [self._flat(source) for source in self.sources], [r.reshape(-1) for r in self.sources_rstd],
                [member.query for _, member in group], [member.key_norm_weight for _, member in group],
                stream.source_grads, first_norm)
            for position, (index, member) in enumerate(group):
                self.results[index] = (member, outputs_TD[position], lse_T[position], params, position)
        scored_for, o_TD, lse_T, params, position = self.results.pop(sublayer)
        if scored_for is not query:
            raise RuntimeError(
                f"AttnRes sublayer {sublayer}: phase 1 scored another module's query than the one mixing now "
                "(register_queries was given a different model's or stage's queries)")
        previous_output, previous_partial = stream.pending, stream.partial
        if previous_output is None:  # a partial sum settled by some other reader: it is the one to merge
            previous_output, previous_partial = previous_partial, None
        if previous_output is None and norm is None:
            return o_TD.reshape(self.shape)
        # the merge computes the partial sum's rstd itself (with the key norm's eps)
        h_TD, partial_TD = self.merge(o_TD, lse_T, self._flat(previous_output), self._flat(previous_partial),
                                      params, position, None if norm is None else norm.weight, self.strategy.eps,
                                      1e-6 if norm is None else norm.eps)
        if partial_TD is not None:
            stream.partial, stream.pending = partial_TD.reshape(self.shape), None
        return h_TD.reshape(self.shape)

    def close(self) -> None:
        """The block summary ``partial + pending`` and its rstd, appended to the stream's sources."""
        stream = self.stream
        summary_TD, rstd_T = self.close_block(self._flat(stream.partial), self._flat(stream.pending),
                                              self.strategy.eps)
        stream.sources.append(summary_TD.reshape(self.shape))
        stream.sources_rstd.append(rstd_T.reshape(self.shape[:-1]))
        stream.partial = stream.pending = None


def _record_rms(stream: ResidualStream, h_BTD: torch.Tensor) -> None:
    if stream.input_rms is not None:
        stream.input_rms.append(h_BTD.detach().float().pow(2).mean(-1).sqrt().mean())


def build_residual_strategy(residual: str, block_size: int, eps: float, impl: str = "torch"):
    if residual == "standard":
        return StandardResidual()
    if residual == "full_attnres":
        return FullAttnResidual(eps, impl)
    if residual == "block_attnres":
        return BlockAttnResidual(block_size, eps, impl)
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
