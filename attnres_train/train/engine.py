"""Process-group setup and the DeepSpeed engine: the only module that configures DeepSpeed for training.

A run works the same as one plain process (``attnres-train ...``), under ``torchrun --nproc_per_node N`` and
under the ``deepspeed`` launcher: rank, world size and rendezvous come from the environment those launchers set,
and a plain process gets single-rank defaults.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch

from .config import ParallelConfig, RunConfigError, TrainConfig


@dataclass
class DistributedContext:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world_size > 1 and torch.distributed.is_initialized():
            torch.distributed.barrier()

    def all_reduce_sum_(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.world_size > 1:
            torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.SUM)
        return tensor

    def mean_over_ranks(self, value: float) -> float:
        if self.world_size == 1:
            return float(value)
        t = torch.tensor([float(value)], dtype=torch.float64, device=self.device)
        self.all_reduce_sum_(t)
        return float(t.item()) / self.world_size


def resolve_device(train: TrainConfig) -> torch.device:
    if train.device == "cuda" and not torch.cuda.is_available():
        raise RunConfigError("train.device='cuda': no CUDA device is visible to this process")
    if train.device == "cuda" or (train.device == "auto" and torch.cuda.is_available()):
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def resolve_precision(train: TrainConfig, device: torch.device) -> str:
    if train.precision == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    return train.precision


def is_single_process(env) -> bool:
    """False for a rank started by a launcher (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR`` and ``MASTER_PORT`` all
    set); True for one process, also when some of these are left in the environment with a world size of 1.
    Ranks of a larger world without the rendezvous address get one clear error."""
    variables = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
    if all(name in env for name in variables):
        return False
    if env.get("WORLD_SIZE", "1") == "1":
        return True
    missing = " and ".join(name for name in variables if name not in env)
    raise RunConfigError(f"WORLD_SIZE={env['WORLD_SIZE']} is set but {missing} not: start the ranks with torchrun or "
                         "deepspeed, or unset WORLD_SIZE to train in one process")


def setup_distributed(parallel: ParallelConfig, train: TrainConfig) -> DistributedContext:
    """Initialise torch.distributed through DeepSpeed (it also selects DeepSpeed's accelerator)."""
    single_process = is_single_process(os.environ)
    if single_process:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    device = resolve_device(train)
    if device.type == "cpu":
        # DeepSpeed would otherwise pick its CUDA accelerator on a GPU box even when the user asked for CPU.
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    backend = parallel.dist_backend
    if backend == "auto":
        backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    import deepspeed

    if single_process and not torch.distributed.is_initialized():
        # One rank needs no rendezvous. A TCP store would need a free port, and another process on this machine
        # can take a port between its choice and its use; DeepSpeed adopts a process group that already exists.
        torch.distributed.init_process_group(backend, store=torch.distributed.HashStore(), rank=0, world_size=1)
    deepspeed.init_distributed(dist_backend=backend, verbose=False)
    return DistributedContext(
        rank=int(os.environ["RANK"]),
        world_size=int(os.environ["WORLD_SIZE"]),
        local_rank=int(os.environ.get("LOCAL_RANK", 0)),
        device=device,
    )


def deepspeed_config(
    train: TrainConfig, parallel: ParallelConfig, grad_clip: float, precision: str, world_size: int
) -> dict[str, Any]:
    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": train.micro_batch_size,
        "gradient_accumulation_steps": train.grad_accum_steps,
        "train_batch_size": train.micro_batch_size * train.grad_accum_steps * world_size,
        "gradient_clipping": float(grad_clip),
        "zero_optimization": {"stage": parallel.zero_stage},
        "bf16": {"enabled": precision == "bf16"},
        "fp16": {"enabled": False},
        # Our own logger reports; DeepSpeed's periodic prints would interleave with the progress bar.
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }
    for key, value in dict(parallel.deepspeed_overrides).items():
        if isinstance(value, dict) and isinstance(config.get(key), dict):
            config[key] = {**config[key], **value}
        else:
            config[key] = value
    return config


def initialize_engine(model, optimizer, lr_scheduler, ds_config: dict):
    import deepspeed

    engine, _, _, _ = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=lr_scheduler, config=ds_config
    )
    restrict_checkpoint_loads(engine)
    return engine


def restrict_checkpoint_loads(engine) -> None:
    """DeepSpeed unpickles checkpoint files with ``weights_only=False``, which runs any code planted in them.
    Every file it reads goes through its checkpoint engine's ``load``; route that through the weights-only
    loader (tensors, containers and DeepSpeed's allow-listed data records)."""
    from .checkpoint import load_weights_only

    checkpoint_engine = getattr(engine, "checkpoint_engine", None)
    if checkpoint_engine is None:
        raise RuntimeError("this DeepSpeed version has no engine.checkpoint_engine: checkpoint loads cannot be "
                           "restricted to weights; pin the deepspeed version this package was tested with")
    checkpoint_engine.load = lambda path, map_location=None: load_weights_only(path, map_location=map_location)
