"""The trainer's pipeline-parallel pieces: building the stage module from the run config, the traffic record,
pipeline validation and the micro-batch stream DeepSpeed's pipeline engine draws from.

Used by ``Trainer`` when ``parallel.pipeline_stages > 1``; the stage wrapping itself lives in
``attnres_train.parallel.pipeline``.
"""

from __future__ import annotations

from typing import Optional

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


def pipeline_validation_loss(engine, val_loader, device: torch.device) -> Optional[float]:
    batches = list(pipeline_batches(val_loader, device))
    if not batches:
        return None
    val_loss = float(engine.eval_batch(iter(batches), num_micro_batches=len(batches)))
    engine.train()
    return val_loss


def pipeline_batches(loader, device: torch.device):
    """The ``((input_ids, doc_ids), labels)`` micro-batches DeepSpeed's pipeline engine draws (first and last
    stage only)."""
    for batch in loader:
        yield (
            (batch["input_ids"].to(device, non_blocking=True), batch["doc_ids"].to(device, non_blocking=True)),
            batch["labels"].to(device, non_blocking=True),
        )
