"""The hybrid decoder: a per-layer list of slots (sequence mixer, MLP, residual strategy) built from data.

``ModelConfig.layer_kinds()`` / ``mlp_kinds()`` give the per-layer plan; ``LayerSpec`` records it, and
``DecoderLayer`` fills its two sublayer slots from it. Nothing in the forward pass branches on the mixer type.

Shape legend: B batch, T tokens, D hidden, V vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from .attnres import AttnResQuery, attnres_forward_flops_per_token, build_residual_strategy
from .cache import DecodeCache, DecodeStep, LayerCache
from .config import ModelConfig
from .norms import GatedRMSNorm, RMSNorm
from .packing import DocumentLayout
from .slots import build_mlp, build_sequence_mixer


@dataclass(frozen=True)
class LayerSpec:
    index: int
    mixer: str  # kda | gdn | mla | gqa
    mlp: str  # moe | dense

    @property
    def is_full_attention(self) -> bool:
        return self.mixer in ("mla", "gqa")


def layer_specs(cfg: ModelConfig) -> list[LayerSpec]:
    """The stack as data: one spec per decoder layer."""
    mixer_of = {"L": cfg.linear_mixer, "F": cfg.full_mixer}
    return [
        LayerSpec(index=i, mixer=mixer_of[kind], mlp=mlp)
        for i, (kind, mlp) in enumerate(zip(cfg.layer_kinds(), cfg.mlp_kinds()))
    ]


def _check_one_run_of_tokens(mask_BT: torch.Tensor) -> None:
    starts_BT = mask_BT.clone()
    starts_BT[:, 1:] &= ~mask_BT[:, :-1]
    if bool((starts_BT.sum(dim=1) > 1).any()):
        raise ValueError("attention_mask: a row has pads (0) between real tokens (1); expected left or right padding")


@dataclass
class DecoderOutput:
    logits: torch.Tensor  # [B, T, V]
    aux_loss: torch.Tensor  # scalar; zero when no auxiliary loss is active
    # Diagnostics (only with return_diagnostics=True):
    depth_weights: Optional[list[torch.Tensor]] = None  # per AttnRes mix, mean softmax weight per source [N]
    sublayer_input_rms: Optional[torch.Tensor] = None  # [2 * num_layers] RMS of each sublayer's input


class DecoderLayer(nn.Module):
    """Two sublayers: ``mixer`` (sequence mixing) and ``mlp``, each with its pre-norm and, under AttnRes, its
    own pseudo-query."""

    def __init__(self, spec: LayerSpec, cfg: ModelConfig):
        super().__init__()
        self.spec = spec
        self.mixer_norm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.mixer = build_sequence_mixer(spec.mixer, cfg)
        self.mlp_norm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.mlp = build_mlp(spec.mlp, cfg)
        if cfg.residual != "standard":
            self.mixer_attnres = AttnResQuery(cfg.hidden_size, cfg.norm_eps)
            self.mlp_attnres = AttnResQuery(cfg.hidden_size, cfg.norm_eps)
        else:
            self.mixer_attnres = None
            self.mlp_attnres = None

    # ``normed_BTD``: the input already through this sublayer's pre-norm (the fused AttnRes applies it).
    # ``cache``/``step``: decoding (the mixer reads and advances its cached state instead of seeing the prefix).
    def mixer_sublayer(self, h_BTD: Optional[torch.Tensor], layout: Optional[DocumentLayout],
                       normed_BTD: Optional[torch.Tensor] = None, cache: Optional[LayerCache] = None,
                       step: Optional[DecodeStep] = None) -> torch.Tensor:
        x_BTD = self.mixer_norm(h_BTD) if normed_BTD is None else normed_BTD
        if cache is not None:
            return self.mixer.forward_cached(x_BTD, cache, step)
        return self.mixer(x_BTD, layout)

    def mlp_sublayer(self, h_BTD: Optional[torch.Tensor],
                     normed_BTD: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        return self.mlp(self.mlp_norm(h_BTD) if normed_BTD is None else normed_BTD)

    def forward(self, stream, residual, layout: Optional[DocumentLayout], aux_losses: list,
                cache: Optional[LayerCache] = None, step: Optional[DecodeStep] = None) -> None:
        normed_BTD = residual.fused_normed_input(stream, self.mixer_attnres, self.mixer_norm)
        h_BTD = residual.sublayer_input(stream, self.mixer_attnres) if normed_BTD is None else None
        residual.add_output(stream, self.mixer_sublayer(h_BTD, layout, normed_BTD, cache, step))
        normed_BTD = residual.fused_normed_input(stream, self.mlp_attnres, self.mlp_norm)
        h_BTD = residual.sublayer_input(stream, self.mlp_attnres) if normed_BTD is None else None
        out_BTD, aux_loss = self.mlp_sublayer(h_BTD, normed_BTD)
        residual.add_output(stream, out_BTD)
        if aux_loss is not None:
            aux_losses.append(aux_loss)

    def forward_flops_per_token(self, seq_len: int) -> float:
        return self.mixer.forward_flops_per_token(seq_len) + self.mlp.forward_flops_per_token(seq_len)


class HybridDecoder(nn.Module):
    """Kimi-Linear / Qwen3-Next style decoder.

    ``forward(input_ids, doc_ids=None)`` -> ``DecoderOutput(logits, aux_loss, ...)``. ``doc_ids`` ([B, T]) marks
    the documents packed into each row; no token attends to or carries state from another document.

    Decoding (see ``attnres_train.model.cache``): ``cache = new_cache(batch_size, max_length)``, then
    ``forward(new_ids, attention_mask=mask_of_new_ids, cache=cache)`` once per chunk of new tokens. Without a
    cache, ``attention_mask`` marks the pads of left-padded rows (they become a separate document).

    Accounting (see ``attnres_train.model.accounting`` for the definitions):
      ``num_parameters()``, ``num_active_parameters()``, ``flops_per_token(seq_len, training=True)``.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.specs = layer_specs(cfg)
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(spec, cfg) for spec in self.specs)
        self.final_attnres = AttnResQuery(cfg.hidden_size, cfg.norm_eps) if cfg.residual != "standard" else None
        self.final_norm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.residual = build_residual_strategy(cfg.residual, cfg.attnres_block_size, cfg.norm_eps, cfg.attnres_impl)
        if hasattr(self.residual, "register_queries"):
            self.residual.register_queries(self.attnres_queries())
        self.reset_parameters()

    # ------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Initialise every weight: linear and embedding weights normal(0, init_std), biases zero, norms one,
        AttnRes queries zero, MoE experts through their own ``reset_parameters(std)``. Module-specific
        parameters (the gates' A_log / dt_bias, short-conv kernels) keep the init their module gave them."""
        from .moe import MoE

        std = self.config.init_std
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, mean=0.0, std=std)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, mean=0.0, std=std)
            elif isinstance(module, (RMSNorm, GatedRMSNorm, AttnResQuery)):
                module.reset_parameters()
            elif isinstance(module, MoE):
                module.reset_parameters(std)

    # ------------------------------------------------------------------------------------------------
    def new_cache(self, batch_size: int, max_length: int, dtype: Optional[torch.dtype] = None,
                  device: Optional[torch.device | str] = None) -> DecodeCache:
        """An empty decoding cache for ``batch_size`` rows, preallocated for ``max_length`` columns (prompt, pads
        and generated tokens; it grows if a call needs more). Attention caches take ``dtype`` (default: the
        embedding's), recurrent states at least fp32."""
        if batch_size < 1 or max_length < 1:
            raise ValueError(f"new_cache(batch_size={batch_size}, max_length={max_length}): expected positive integers")
        weight = self.embed_tokens.weight
        dtype = weight.dtype if dtype is None else dtype
        device = weight.device if device is None else torch.device(device)
        layers = [layer.mixer.new_cache(batch_size, max_length, dtype, device) for layer in self.layers]
        return DecodeCache(layers, batch_size, max_length, device)

    def forward(
        self,
        input_ids: torch.Tensor,
        doc_ids: Optional[torch.Tensor] = None,
        layout: Optional[DocumentLayout] = None,
        return_diagnostics: bool = False,
        *,
        attention_mask: Optional[torch.Tensor] = None,
        cache: Optional[DecodeCache] = None,
        logits_to_keep: int = 0,
    ) -> DecoderOutput:
        """``attention_mask`` [B, T]: 1 real token, 0 pad of a left-padded row (with a cache: the new columns
        only). ``cache``: consume ``input_ids`` as the next columns of the cached rows and advance the cache.
        ``logits_to_keep``: compute logits of the last N positions only (0: all)."""
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must have shape [batch, seq_len], got {tuple(input_ids.shape)}")
        step = None
        if cache is not None or attention_mask is not None:
            if doc_ids is not None or layout is not None:
                raise ValueError("doc_ids/layout (packed documents) cannot be combined with attention_mask or a cache")
        if cache is not None:
            if input_ids.shape[0] != cache.batch_size:
                raise ValueError(f"input_ids has {input_ids.shape[0]} rows but the cache holds {cache.batch_size}")
            step = cache.begin(attention_mask, input_ids.shape[1])
        elif attention_mask is not None:
            if attention_mask.shape != input_ids.shape:
                raise ValueError(f"attention_mask shape {tuple(attention_mask.shape)} must equal input_ids shape "
                                 f"{tuple(input_ids.shape)}")
            _check_one_run_of_tokens(attention_mask.bool())
            # Pads become documents of their own around the real tokens: exact, and the packed kernels run
            # unchanged (left or right padding).
            doc_ids = attention_mask.long()
        if layout is None and doc_ids is not None:
            if doc_ids.shape != input_ids.shape:
                raise ValueError(
                    f"doc_ids shape {tuple(doc_ids.shape)} must equal input_ids shape {tuple(input_ids.shape)}"
                )
            layout = DocumentLayout.from_doc_ids(doc_ids)
            if layout.is_single_document_per_row():
                layout = None
        x_BTD = self.embed_tokens(input_ids)
        stream = self.residual.begin(x_BTD, diagnostics=return_diagnostics)
        aux_losses: list[torch.Tensor] = []
        for index, layer in enumerate(self.layers):
            layer(stream, self.residual, layout, aux_losses, None if cache is None else cache.layers[index], step)
        if cache is not None:
            cache.finish(step)
        hidden_BTD = self.final_hidden(stream)
        if logits_to_keep > 0:
            hidden_BTD = hidden_BTD[:, -logits_to_keep:]
        logits_BTV = self.lm_head(hidden_BTD)
        aux_loss = torch.stack(aux_losses).sum() if aux_losses else logits_BTV.new_zeros((), dtype=torch.float32)
        out = DecoderOutput(logits=logits_BTV, aux_loss=aux_loss)
        if return_diagnostics:
            out.depth_weights = stream.depth_weights
            out.sublayer_input_rms = torch.stack(stream.input_rms)
        return out

    def final_hidden(self, stream) -> torch.Tensor:
        """The output mix followed by the final norm (in one pass under the fused AttnRes)."""
        normed_BTD = self.residual.fused_normed_input(stream, self.final_attnres, self.final_norm)
        if normed_BTD is not None:
            return normed_BTD
        return self.final_norm(self.residual.final(stream, self.final_attnres))

    # ------------------------------------------------------------------------------------------------
    def attnres_queries(self, layer_indices=None, include_output: bool = True) -> dict[int, "AttnResQuery"]:
        """The AttnRes pseudo-queries by sublayer index (mixer of layer i: 2i, its MLP: 2i + 1, the output
        mix: 2 * num_layers), of the given layers (default all); empty for the standard residual."""
        if self.final_attnres is None:
            return {}
        indices = range(len(self.layers)) if layer_indices is None else layer_indices
        queries = {}
        for i in indices:
            queries[2 * i] = self.layers[i].mixer_attnres
            queries[2 * i + 1] = self.layers[i].mlp_attnres
        if include_output:
            queries[2 * len(self.layers)] = self.final_attnres
        return queries

    def moe_layers(self) -> list[nn.Module]:
        return [layer.mlp for layer in self.layers if layer.spec.mlp == "moe"]

    def num_parameters(self, exclude_embeddings: bool = False) -> int:
        from .accounting import count_parameters

        return count_parameters(self, exclude_embeddings=exclude_embeddings)

    def num_active_parameters(self) -> int:
        from .accounting import count_active_parameters

        return count_active_parameters(self)

    def flops_per_token(self, seq_len: int, training: bool = True) -> float:
        """FLOPs per token of one step on sequences of ``seq_len`` (training = forward + backward = 3x)."""
        cfg = self.config
        forward = sum(layer.forward_flops_per_token(seq_len) for layer in self.layers)
        forward += attnres_forward_flops_per_token(
            cfg.residual, 2 * cfg.num_layers, cfg.attnres_block_size, cfg.hidden_size
        )
        forward += 2.0 * cfg.hidden_size * cfg.vocab_size  # LM head
        return 3.0 * forward if training else forward
