"""The trainer's pipeline-parallel pieces: building the stage module from the run config, the traffic record,
pipeline validation and the micro-batch stream DeepSpeed's pipeline engine draws from.

Used by ``Trainer`` when ``parallel.pipeline_stages > 1``; the stage wrapping itself lives in
``attnres_train.parallel.pipeline``.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch

from .config import ParallelConfig, RunConfigError


def build_stage_module(model, parallel: ParallelConfig, seq_len: int, activation_checkpointing: bool):
    from attnres_train.parallel.pipeline import build_pipeline_module

    try:
        return build_pipeline_module(
            model,
            parallel.pipeline_stages,
            seq_len,
            boundaries=parallel.pipeline_boundaries,
            partition_tolerance=parallel.pipeline_partition_tolerance,
            activation_checkpoint_interval=1 if activation_checkpointing else 0,
        )
    except ValueError as exc:  # bad stage counts / boundaries: a config error, already naming the field
        raise RunConfigError(str(exc)) from exc


def pipeline_traffic(model, parallel: ParallelConfig, seq_len: int, micro_batch_size: int, precision: str) -> dict:
    """Stage layout and the activation bytes each stage boundary sends per micro-batch (forward; backward
    returns as many gradient bytes)."""
    from attnres_train.parallel.pipeline import describe_partition
    from attnres_train.parallel.pipeline_partition import boundary_bytes, boundary_tensor_count

    cfg = model.config
    partition = describe_partition(
        model, parallel.pipeline_stages, seq_len, parallel.pipeline_boundaries, parallel.pipeline_partition_tolerance
    )
    element = 2 if precision == "bf16" else 4
    boundaries = [
        {
            "layers_before": layers,
            "on_block_boundary": on_block,
            "tensors": boundary_tensor_count(cfg.residual, cfg.attnres_block_size, layers),
            "bytes_per_micro_batch": boundary_bytes(
                cfg.residual, cfg.attnres_block_size, layers, micro_batch_size, seq_len, cfg.hidden_size, element
            ),
        }
        for layers, on_block in zip(partition.boundaries, partition.on_block_boundary)
    ]
    return {
        "stages": parallel.pipeline_stages,
        "stage_layers": [len(r) for r in partition.stage_layers(cfg.num_layers)],
        "stage_forward_flops_per_token": list(partition.stage_flops),
        "boundaries": boundaries,
    }


def validation_source_names(val_loader) -> list[str]:
    """The sources a validation loader scores (one unnamed source for a loader that does not name them)."""
    return list(getattr(val_loader, "source_names", None) or ["data"])


def batches_by_source(val_loader):
    """``(source name, batch)`` pairs of a validation loader."""
    if hasattr(val_loader, "iter_by_source"):
        yield from val_loader.iter_by_source()
    else:
        for batch in val_loader:
            yield "data", batch


def mixture_loss(per_source: dict[str, float], val_loader) -> float:
    """The validation loss of the training distribution: per-source losses weighted by the mixture weights
    (one source: its loss)."""
    weights = dict(zip(validation_source_names(val_loader), getattr(val_loader, "source_weights", None) or [1.0]))
    total = sum(weights[name] for name in per_source)
    if total <= 0:  # only zero-weight sources were scored
        return sum(per_source.values()) / len(per_source)
    return sum(weights[name] * loss for name, loss in per_source.items()) / total


def pipeline_validation_loss(engine, val_loader, device: torch.device) -> dict[str, float]:
    """Validation loss per source through the pipeline engine (one ``eval_batch`` per source)."""
    grouped: dict[str, list] = {}
    for name, batch in batches_by_source(val_loader):
        grouped.setdefault(name, []).append(batch)
    out = {}
    for name, batches in grouped.items():
        micro_batches = list(pipeline_batches(batches, device))
        out[name] = float(engine.eval_batch(iter(micro_batches), num_micro_batches=len(micro_batches)))
    engine.train()
    return out


def pipeline_batches(loader, device: torch.device):
    """The ``((input_ids, doc_ids), labels)`` micro-batches DeepSpeed's pipeline engine draws (first and last
    stage only)."""
    for batch in loader:
        yield (
            (batch["input_ids"].to(device, non_blocking=True), batch["doc_ids"].to(device, non_blocking=True)),
            batch["labels"].to(device, non_blocking=True),
        )


def needs_own_clipping(parallel: ParallelConfig, precision: str) -> bool:
    """fp32 ZeRO-0 pipelines: DeepSpeed's ``clip_grad_norm_`` there counts only the first stage's gradients in
    the norm (it treats the pipeline group as tensor-parallel replicas of stage 0), so every stage would clip by
    the wrong norm. ZeRO-0 under expert parallelism: it averages the ranks' norms, each of which counts only
    that rank's experts. The trainer then disables DeepSpeed's clipping and installs :func:`clip_by_global_norm`
    instead. (ZeRO and the bf16 optimizers compute the norm over all stages and experts correctly.)"""
    if parallel.zero_stage != 0:
        return False
    return (parallel.pipeline_stages > 1 and precision == "fp32") or parallel.expert_parallel > 1


def clip_by_global_norm(optimizer: torch.optim.Optimizer, module: torch.nn.Module, max_norm: float,
                        pipe_group=None, expert_group=None) -> Callable[[], Optional[float]]:
    """Before each ``optimizer.step()``, scale this rank's gradients by ``min(1, max_norm / global norm)``,
    the norm taken over every stage's gradients (a tied copy on a later stage counted once) and every expert
    once (expert-parallel slices summed over ``expert_group``); returns a function giving the last step's
    unclipped global norm. Data-parallel replicas hold equal, averaged gradients by then."""
    import torch.distributed as dist

    trainable = [p for p in module.parameters() if p.requires_grad]
    experts = [p for p in trainable if getattr(p, "allreduce", True) is False]
    expert_ids = {id(p) for p in experts}
    shared = [p for p in trainable if not getattr(p, "ds_pipe_replicated", False) and id(p) not in expert_ids]
    last: dict[str, float] = {}

    def squares_of(params, device):
        total = torch.zeros((), device=device, dtype=torch.float32)
        for p in params:
            if p.grad is not None:
                total += p.grad.detach().float().pow(2).sum()
        return total

    def clip(_optimizer, _args, _kwargs):
        device = trainable[0].device
        expert_squares = squares_of(experts, device)
        if expert_group is not None:
            dist.all_reduce(expert_squares, group=expert_group)
        squares = squares_of(shared, device) + expert_squares
        if pipe_group is not None:
            dist.all_reduce(squares, group=pipe_group)
        norm = squares.sqrt()
        last["norm"] = float(norm)
        scale = max_norm / (float(norm) + 1e-6) if max_norm > 0 else 1.0  # 0: clipping off, norm still logged
        if scale < 1.0:
            for p in trainable:
                if p.grad is not None:
                    p.grad.detach().mul_(scale)

    optimizer.register_step_pre_hook(clip)
    return lambda: last.get("norm")
