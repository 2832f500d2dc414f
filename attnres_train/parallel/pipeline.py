"""Pipeline parallelism: the ``HybridDecoder`` as a DeepSpeed ``PipelineModule``.

``build_pipeline_module(model, num_stages, seq_len)`` lays the decoder out as ``num_layers + 2`` pipeline layers
that wrap the decoder's OWN modules (no weight copies):

    index 0              EmbeddingStage(embed_tokens)             begins the residual stream
    index 1 .. L         DecoderLayerStage(layers[i - 1])         one per decoder layer
    index L + 1          OutputStage(final_attnres, final_norm, lm_head)
    index L + 2          tied LM head (only with tie_embeddings)  logits from the embedding matrix

With ``tie_embeddings`` the embedding is a DeepSpeed ``TiedLayerSpec`` (key ``"embed"``): the first and the last
stage each hold a copy of the embedding matrix, DeepSpeed broadcasts it from the first stage at start and after
loading, and sums the two stages' gradients of it before every optimizer step, so the copies stay equal. The
output layer then stops at the final norm and the extra layer L + 2 applies the tied matrix.

Stages are cut where ``partition_stages`` (``pipeline_partition.py``) says: compute-balanced, preferring AttnRes
block boundaries. The embedding always lives in stage 0 and the output layer in the last stage.

Wire format (what crosses a stage boundary; a tuple of tensors with fixed shapes per boundary):

    standard       (hidden_BTD,            aux_1, doc_ids_BT, marker_1)
    block_attnres  (sources_NBTD[, partial_BTD], aux_1, doc_ids_BT, marker_1)   N = 1 + completed blocks;
                                                                               partial only inside a block
    full_attnres   (sources_NBTD,          aux_1, doc_ids_BT, marker_1)   N = 1 + sublayers so far

``aux_1`` is the running sum of the MoE auxiliary losses of all earlier layers (fp32); it is a floating
activation so DeepSpeed routes its gradient back to every stage. ``doc_ids_BT`` (int64) lets each stage rebuild
the packed-document layout. ``marker_1`` is a one-element int64 tensor that carries nothing: DeepSpeed treats a
tuple's last element specially (casts it to half and drops it from gradient sends when bool tensors are
configured), so the last slot must never hold data. Inside a stage the layers hand each other the live
``ResidualStream`` instead, so sources are stacked and their rstd recomputed only once per boundary.

Parameter names: the pipeline's state dict (and DeepSpeed's ``layer_XX-model_states.pt`` files) use
``{pipeline index}.{wrapper key}`` (``tied_modules.embed.embed_tokens.weight`` for a tied embedding);
:func:`model_key` / :func:`pipeline_name_to_model` / :func:`pipeline_state_dict_to_model` map them back to the
plain ``HybridDecoder`` names (``embed_tokens.*``, ``layers.{i}.*``, ``final_*``, ``lm_head.*``).

Activation checkpointing (``activation_checkpoint_interval > 0``) recomputes decoder layers only, with DeepSpeed's
non-reentrant checkpoint; every layer then speaks the wire format. Recomputed MoE forwards count their routed
tokens again, so ``tokens_per_expert`` doubles (the sign-based bias update is unaffected; load statistics are).

Every rank holds the whole ``HybridDecoder`` it was given; only its own stage's layers are registered with the
PipelineModule (and moved, optimised, checkpointed). Build on the meta device and materialise locally to avoid
the full-model memory on each rank for large models.

Shape legend: B micro-batch rows, T tokens, D hidden, V vocabulary, N stacked residual sources.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from attnres_train.model.attnres import ResidualStream, source_rstd
from attnres_train.model.decoder import DecoderLayer, HybridDecoder
from attnres_train.model.loss import language_model_loss
from attnres_train.model.packing import DocumentLayout
from attnres_train.parallel.pipeline_partition import (
    Partition,
    boundary_tensor_count,
    partition_stages,
    stage_costs,
)

TIED_EMBEDDING_KEY = "embed"
_TIED_PREFIX = f"tied_modules.{TIED_EMBEDDING_KEY}."


# --------------------------------------------------------------------------------------------------------------
# State handed from layer to layer inside one stage
# --------------------------------------------------------------------------------------------------------------


@dataclass
class StageState:
    """What flows between pipeline layers of the same stage (never sent): the live residual stream, the
    running auxiliary loss, the document ids and the layout built from them once per stage."""

    stream: ResidualStream
    aux_1: torch.Tensor  # [1], fp32 or wider
    doc_ids_BT: torch.Tensor  # [B, T] int64
    layout: Optional[DocumentLayout]


def _layout_from_doc_ids(doc_ids_BT: torch.Tensor) -> Optional[DocumentLayout]:
    layout = DocumentLayout.from_doc_ids(doc_ids_BT)
    # The plain model drops the layout when every row is one document; do the same so both run the same code.
    return None if layout.is_single_document_per_row() else layout


def _marker(device: torch.device) -> torch.Tensor:
    return torch.zeros(1, dtype=torch.int64, device=device)


class _WireCodec:
    """Packs a ``StageState`` into the wire tuple after ``layers_before`` decoder layers and unpacks it."""

    def __init__(self, model: HybridDecoder):
        self.residual_kind = model.config.residual
        self.block_size = model.config.attnres_block_size
        self.strategy = model.residual

    def expected_floating(self, layers_before: int) -> int:
        return boundary_tensor_count(self.residual_kind, self.block_size, layers_before)

    def encode(self, state: StageState) -> tuple[torch.Tensor, ...]:
        stream = state.stream
        if self.residual_kind == "standard":
            activations = (stream.hidden,)
        else:
            activations = (torch.stack(stream.sources),)
            partial = stream.settled_partial()
            if partial is not None:
                activations = activations + (partial,)
        return (*activations, state.aux_1, state.doc_ids_BT, _marker(state.doc_ids_BT.device))

    def decode(self, wire: tuple, layers_before: int) -> StageState:
        if not isinstance(wire, tuple) or len(wire) < 4:
            raise TypeError(
                f"pipeline layer after {layers_before} decoder layers: expected the wire tuple "
                f"(activations..., aux, doc_ids, marker), got {type(wire).__name__}"
            )
        *activations, aux_1, doc_ids_BT, _ = wire
        sublayers = 2 * layers_before
        if self.residual_kind == "standard":
            (hidden_BTD,) = activations
            stream = ResidualStream(hidden=hidden_BTD, sublayer=sublayers)
        else:
            sources_NBTD = activations[0]
            has_partial = self.residual_kind == "block_attnres" and sublayers % self.block_size != 0
            expected_sources = self.expected_floating(layers_before) - int(has_partial)
            if sources_NBTD.shape[0] != expected_sources or len(activations) != 1 + int(has_partial):
                raise ValueError(
                    f"pipeline boundary after {layers_before} decoder layers: expected {expected_sources} stacked "
                    f"sources{' and a partial sum' if has_partial else ''}, got {tuple(sources_NBTD.shape)} and "
                    f"{len(activations) - 1} extra tensors"
                )
            sources = list(sources_NBTD.unbind(0))
            stream = ResidualStream(
                sources=sources,
                sources_rstd=[source_rstd(v, self.strategy.eps) for v in sources],
                partial=activations[1] if has_partial else None,
                sublayer=sublayers,
            )
        return StageState(stream=stream, aux_1=aux_1, doc_ids_BT=doc_ids_BT, layout=_layout_from_doc_ids(doc_ids_BT))


# --------------------------------------------------------------------------------------------------------------
# The pipeline layers
# --------------------------------------------------------------------------------------------------------------


class _PipelineLayer(nn.Module):
    """Base of the three wrappers: knows whether its output leaves the stage (then it emits the wire tuple)."""

    def __init__(self, codec: _WireCodec, layers_after: int):
        super().__init__()
        self._codec = codec
        self.layers_after = layers_after  # decoder layers completed once this pipeline layer has run
        self.emits_wire = False  # set by build_pipeline_module

    def _to_state(self, inputs, layers_before: int) -> StageState:
        return inputs if isinstance(inputs, StageState) else self._codec.decode(inputs, layers_before)

    def _emit(self, state: StageState):
        return self._codec.encode(state) if self.emits_wire else state


class EmbeddingStage(_PipelineLayer):
    """Pipeline layer 0: token embedding and the start of the residual stream.

    Input: ``input_ids_BT`` or ``(input_ids_BT, doc_ids_BT)`` (int64).
    """

    def __init__(self, model: HybridDecoder, codec: _WireCodec, emits_wire: bool = False):
        super().__init__(codec, layers_after=0)
        self.embed_tokens = model.embed_tokens
        self._strategy = model.residual
        self.emits_wire = emits_wire  # given here too: DeepSpeed builds the tied copy from a spec

    def forward(self, inputs):
        if torch.is_tensor(inputs):
            input_ids_BT, doc_ids_BT = inputs, None
        elif isinstance(inputs, (tuple, list)) and len(inputs) == 2:
            input_ids_BT, doc_ids_BT = inputs
        else:
            raise TypeError("pipeline inputs: expected input_ids [B, T] or a tuple (input_ids [B, T], doc_ids [B, T])")
        if input_ids_BT.dim() != 2:
            raise ValueError(f"input_ids must have shape [batch, seq_len], got {tuple(input_ids_BT.shape)}")
        if doc_ids_BT is None:
            doc_ids_BT = torch.zeros_like(input_ids_BT, dtype=torch.int64)
        elif doc_ids_BT.shape != input_ids_BT.shape:
            raise ValueError(
                f"doc_ids shape {tuple(doc_ids_BT.shape)} must equal input_ids shape {tuple(input_ids_BT.shape)}"
            )
        x_BTD = self.embed_tokens(input_ids_BT)
        # The running aux loss starts at zero but must carry a grad_fn: DeepSpeed backpropagates through every
        # floating tensor a stage sends. A zero-weighted single element of the embedding output costs nothing.
        aux_dtype = torch.promote_types(x_BTD.dtype, torch.float32)
        aux_1 = (x_BTD[:1, :1, :1].to(aux_dtype) * 0.0).reshape(1)
        state = StageState(
            stream=self._strategy.begin(x_BTD),
            aux_1=aux_1,
            doc_ids_BT=doc_ids_BT.long(),
            layout=_layout_from_doc_ids(doc_ids_BT),
        )
        return self._emit(state)


class DecoderLayerStage(_PipelineLayer):
    """Pipeline layer 1 + i: decoder layer i (attribute ``decoder_layer`` IS ``model.layers[i]``)."""

    def __init__(self, model: HybridDecoder, index: int, codec: _WireCodec):
        super().__init__(codec, layers_after=index + 1)
        self.index = index
        self.decoder_layer: DecoderLayer = model.layers[index]
        self._strategy = model.residual

    def forward(self, inputs):
        state = self._to_state(inputs, layers_before=self.index)
        if self.emits_wire:  # the stream ends with this layer: later sublayers get a stream of their own
            state.stream.horizon = 2 * (self.index + 1)
        aux_losses: list[torch.Tensor] = []
        self.decoder_layer(state.stream, self._strategy, state.layout, aux_losses)
        if aux_losses:
            state.aux_1 = state.aux_1 + torch.stack(aux_losses).sum().to(state.aux_1.dtype).reshape(1)
        return self._emit(state)


class OutputStage(_PipelineLayer):
    """Final AttnRes mix, final norm and LM head: returns ``(logits_BTV, aux_1)``. With tied embeddings the head
    is the next pipeline layer (:func:`tied_lm_head`) and this one returns ``(normed_hidden_BTD, aux_1)``."""

    def __init__(self, model: HybridDecoder, codec: _WireCodec):
        super().__init__(codec, layers_after=model.config.num_layers)
        self.final_attnres = model.final_attnres
        self.final_norm = model.final_norm
        self.lm_head = None if model.config.tie_embeddings else model.lm_head
        self._final_hidden = model.final_hidden

    def forward(self, inputs):
        state = self._to_state(inputs, layers_before=self.layers_after)
        h_BTD = self._final_hidden(state.stream)
        if self.lm_head is None:
            return h_BTD, state.aux_1
        return self.lm_head(h_BTD), state.aux_1


def tied_lm_head(embedding: EmbeddingStage, inputs: tuple[torch.Tensor, torch.Tensor]):
    """The last pipeline layer of a tied model: logits from the (last stage's copy of the) embedding matrix."""
    h_BTD, aux_1 = inputs
    return F.linear(h_BTD, embedding.embed_tokens.weight), aux_1


def pipeline_loss(outputs: tuple[torch.Tensor, torch.Tensor], labels_BT: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross entropy over labels != -100 (in fp32) plus the summed MoE auxiliary losses."""
    logits_BTV, aux_1 = outputs
    return language_model_loss(logits_BTV, labels_BT) + aux_1.sum()


# --------------------------------------------------------------------------------------------------------------
# The PipelineModule
# --------------------------------------------------------------------------------------------------------------


def _pipeline_module_class():
    from deepspeed.pipe import PipelineModule

    class HybridDecoderPipe(PipelineModule):
        """PipelineModule whose stage cuts are given explicitly (DeepSpeed has no partition method for that)."""

        def __init__(self, layers, num_stages: int, parts: Sequence[int], **kwargs):
            # _partition_layers runs inside PipelineModule.__init__, before nn.Module attributes can be set.
            object.__setattr__(self, "_explicit_parts", list(parts))
            super().__init__(layers=layers, num_stages=num_stages, **kwargs)

        def _partition_layers(self, method: str = "explicit") -> None:
            self.parts = list(self._explicit_parts)
            stage_id = self._topo.get_coord(self.global_rank).pipe
            self._set_bounds(start=self.parts[stage_id], stop=self.parts[stage_id + 1])

    return HybridDecoderPipe


def pipeline_parts(partition: Partition, num_layers: int, tied_embeddings: bool = False) -> list[int]:
    """DeepSpeed ``parts`` (pipeline-layer offsets of each stage, len = stages + 1) for a decoder partition:
    the embedding (pipeline index 0) joins stage 0 and the output layer (index L + 1, and the tied head L + 2)
    the last stage."""
    return [0, *(b + 1 for b in partition.boundaries), num_layers + 2 + int(tied_embeddings)]


def build_pipeline_module(
    model: HybridDecoder,
    num_stages: int,
    seq_len: int,
    boundaries: Optional[Sequence[int]] = None,
    partition_tolerance: float = 0.05,
    activation_checkpoint_interval: int = 0,
    topology=None,
):
    """Wrap ``model``'s modules as a ``deepspeed.pipe.PipelineModule`` of ``num_stages`` stages.

    ``boundaries`` (decoder-layer counts before each stage after the first) overrides the partitioner. The loss
    function is :func:`pipeline_loss`; the data iterator must yield ``((input_ids_BT, doc_ids_BT), labels_BT)``.
    Requires ``torch.distributed`` to be initialised (``deepspeed.init_distributed``). ``topology`` (a DeepSpeed
    ``ProcessTopology``) is optional; by default the data-parallel degree is world size / ``num_stages``.
    """
    if not isinstance(model, HybridDecoder):
        raise TypeError(f"model: expected a HybridDecoder, got {type(model).__name__}")
    if num_stages < 1:
        raise ValueError(f"num_stages={num_stages}: expected an integer >= 1")
    if seq_len < 1:
        raise ValueError(f"seq_len={seq_len}: expected a positive integer")
    if activation_checkpoint_interval < 0:
        raise ValueError(f"activation_checkpoint_interval={activation_checkpoint_interval}: expected an integer >= 0")
    cfg = model.config
    partition = describe_partition(model, num_stages, seq_len, boundaries, partition_tolerance)
    parts = pipeline_parts(partition, cfg.num_layers, cfg.tie_embeddings)
    layers: list = pipeline_layers(model)
    for stage in range(num_stages):
        # With activation checkpointing DeepSpeed's checkpoint function only passes tensors between chunks, so
        # every layer speaks the wire format; otherwise only the last layer of each stage does.
        for index in range(parts[stage], min(parts[stage + 1], len(layers))):
            layers[index].emits_wire = activation_checkpoint_interval > 0 or index == parts[stage + 1] - 1
    from deepspeed.pipe import TiedLayerSpec
    from deepspeed.runtime.activation_checkpointing.checkpointing import non_reentrant_checkpoint

    if cfg.tie_embeddings:
        codec = layers[0]._codec
        tied = {"tied_weight_attr": ["embed_tokens.weight"]}
        layers[0] = TiedLayerSpec(TIED_EMBEDDING_KEY, EmbeddingStage, model, codec, emits_wire=layers[0].emits_wire,
                                  **tied)
        layers.append(TiedLayerSpec(TIED_EMBEDDING_KEY, EmbeddingStage, model, codec, forward_fn=tied_lm_head, **tied))

    pipe_cls = _pipeline_module_class()
    pipe = pipe_cls(
        layers=layers,
        num_stages=None if topology is not None else num_stages,
        topology=topology,
        parts=parts,
        loss_fn=pipeline_loss,
        activation_checkpoint_interval=activation_checkpoint_interval,
        # Only decoder layers are recomputed: a chunk starting at the embedding has integer inputs only, and
        # DeepSpeed's reentrant checkpoint would then return outputs without a grad_fn.
        checkpointable_layers=[DecoderLayerStage.__name__],
        # DeepSpeed's reentrant checkpoint frees its saved tensors in the first backward call, but the engine
        # calls backward once per floating tensor a stage sends (sources, partial, aux): use the non-reentrant one.
        activation_checkpoint_func=non_reentrant_checkpoint,
    )
    if hasattr(model.residual, "register_queries"):
        # Phase 1 of the fused Block AttnRes batches only the queries of sublayers this stage runs.
        local = [layer for layer in pipe.forward_funcs if isinstance(layer, _PipelineLayer)]
        model.residual.register_queries(model.attnres_queries(
            [layer.index for layer in local if isinstance(layer, DecoderLayerStage)],
            include_output=any(isinstance(layer, OutputStage) for layer in local)))
    return pipe


def describe_partition(
    model: HybridDecoder,
    num_stages: int,
    seq_len: int,
    boundaries: Optional[Sequence[int]] = None,
    tolerance: float = 0.05,
) -> Partition:
    """The decoder-layer partition ``build_pipeline_module`` uses (no process group needed)."""
    cfg = model.config
    return partition_stages(
        stage_costs(model, seq_len), num_stages, cfg.residual, cfg.attnres_block_size, tolerance, boundaries
    )


def pipeline_layers(model: HybridDecoder) -> list[_PipelineLayer]:
    """The ``num_layers + 2`` pipeline layers over ``model``'s own modules (no process group needed).

    Every layer emits the in-stage ``StageState`` until ``emits_wire`` is set on it; running them in sequence
    with no wire layers reproduces ``model.forward``.
    """
    codec = _WireCodec(model)
    layers: list[_PipelineLayer] = [EmbeddingStage(model, codec)]
    layers += [DecoderLayerStage(model, i, codec) for i in range(model.config.num_layers)]
    layers.append(OutputStage(model, codec))
    return layers


# --------------------------------------------------------------------------------------------------------------
# Names back to the plain model
# --------------------------------------------------------------------------------------------------------------


def model_key(pipeline_index: int, layer_key: str, num_layers: int) -> str:
    """Plain ``HybridDecoder`` name of the parameter/buffer ``layer_key`` of pipeline layer ``pipeline_index``
    (the keys inside DeepSpeed's ``layer_{index:02d}-model_states.pt``)."""
    if not 0 <= pipeline_index <= num_layers + 1:
        raise ValueError(f"pipeline_index={pipeline_index}: expected 0..{num_layers + 1}")
    if 1 <= pipeline_index <= num_layers:
        prefix = "decoder_layer."
        if not layer_key.startswith(prefix):
            raise ValueError(f"pipeline layer {pipeline_index}: unexpected key {layer_key!r}")
        return f"layers.{pipeline_index - 1}.{layer_key[len(prefix):]}"
    return layer_key  # embedding and output wrappers use the model's own attribute names


def pipeline_name_to_model(name: str, num_layers: int) -> str:
    """Plain-model name of a PipelineModule parameter or buffer name (``"{index}.{key}"`` or a tied module's)."""
    if name.startswith(_TIED_PREFIX):
        return name[len(_TIED_PREFIX):]
    index, _, key = name.partition(".")
    return model_key(int(index), key, num_layers)


def pipeline_state_dict_to_model(state_dict: dict, num_layers: int) -> dict:
    """Map a PipelineModule state dict (possibly only one stage's) to model names. A tied embedding appears
    once, as ``embed_tokens.weight``; the plain model's ``lm_head.weight`` is the same tensor."""
    return {pipeline_name_to_model(name, num_layers): value for name, value in state_dict.items()}


def local_moe_layers(pipe_module) -> list[nn.Module]:
    """The MoE modules of this rank's stage (for the aux-loss-free bias update after each optimizer step)."""
    return [
        layer.decoder_layer.mlp
        for layer in pipe_module.forward_funcs
        if isinstance(layer, DecoderLayerStage) and layer.decoder_layer.spec.mlp == "moe"
    ]

