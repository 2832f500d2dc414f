"""Typed schema of the whole run config (``configs/train.yaml`` and its groups) and its validation.

The schema is registered in Hydra's ConfigStore as ``run_schema``; ``configs/train.yaml`` lists it first in its
defaults, so every group YAML and every command-line override is type-checked against these dataclasses and an
unknown or mistyped key fails at composition time, naming the key.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from attnres_train.data.config import DataConfig
from attnres_train.model.config import ModelConfig
from attnres_train.train.optim import OptimConfig

PRECISIONS = ("auto", "fp32", "bf16")
DEVICES = ("auto", "cpu", "cuda")
RESUME_MODES = ("auto", "never")
LOGGER_BACKENDS = ("jsonl", "wandb")
WANDB_MODES = ("auto", "online", "offline", "disabled")


class RunConfigError(ValueError):
    """A run config field has an impossible value; the message names the field."""


@dataclass
class TrainConfig:
    max_steps: int = 200  # optimizer steps (ignored when flops_budget is set)
    # Compute-matched runs: train for ceil(flops_budget / (train_flops_per_token * tokens_per_step)) steps, so
    # every run of a sweep spends the same training FLOPs (at least the budget, less than one step more).
    flops_budget: Optional[float] = None
    micro_batch_size: int = 8  # sequences per rank per forward/backward
    grad_accum_steps: int = 1  # micro-batches per optimizer step
    precision: str = "auto"  # auto (bf16 on CUDA, fp32 on CPU) | fp32 | bf16
    device: str = "auto"  # auto | cpu | cuda
    seed: int = 1234
    log_every: int = 10  # steps between metrics.jsonl records
    val_every: int = 100  # steps between validation passes (0 disables; also run at the end)
    val_batches: int = 8  # validation micro-batches per pass (per rank)
    checkpoint_every: int = 100  # steps between checkpoints (0: only at the end and on SIGTERM/SIGINT)
    keep_checkpoints: int = 2  # complete checkpoints kept in run_dir/checkpoints
    resume: str = "auto"  # auto: newest complete checkpoint in run_dir | never | path to a checkpoint tag dir
    # Start from these weights (a fresh run only; a resumed run keeps its own): a Hugging Face Kimi Linear
    # directory, a directory written by attnres-export, a complete checkpoint or an exported .pt. The model config
    # must describe the same architecture (a mismatch names the fields to set).
    init_from: Optional[str] = None
    activation_checkpointing: bool = False  # recompute sublayers in backward to save activation memory
    compile: bool = False  # torch.compile each decoder layer (CUDA only)
    progress_bar: bool = True  # tqdm bar on rank 0
    num_threads: Optional[int] = None  # torch CPU threads per process (default: torch's choice)
    peak_flops: Optional[float] = None  # per-device peak FLOP/s for MFU; default: looked up from the GPU name
    # Updates skipped in a row when the loss or a gradient is non-finite (NaN/inf) before the run stops with an
    # error naming the step; 0 stops at the first. A skipped update changes no weight, moment or step count.
    skip_nonfinite_steps: int = 3
    # Hash every checkpoint file before resuming (and fall back past damaged ones with resume=auto). Off only for
    # file systems where re-reading a checkpoint is too slow and its integrity is guaranteed otherwise.
    verify_checkpoints: bool = True


@dataclass
class ParallelConfig:
    zero_stage: int = 0  # DeepSpeed ZeRO stage 0 | 1 | 2 | 3 (at most 1 with pipeline stages)
    pipeline_stages: int = 1  # >1: DeepSpeed pipeline parallelism; data parallelism fills the remaining ranks
    pipeline_boundaries: Optional[List[int]] = None  # decoder layers before each stage after the first (default: partitioner)
    pipeline_partition_tolerance: float = 0.05  # slack on the slowest stage the partitioner may spend to cut on AttnRes blocks
    # >1: shard each MoE layer's routed experts over this many data-parallel ranks (all-to-all token dispatch);
    # must divide model.num_experts and the data-parallel degree (per pipeline stage); ZeRO stage 0-2
    expert_parallel: int = 1
    dist_backend: str = "auto"  # auto (nccl on CUDA, gloo on CPU) | nccl | gloo
    deepspeed_overrides: Dict[str, Any] = field(default_factory=dict)  # raw DeepSpeed config keys, merged last


@dataclass
class LoggerConfig:
    backend: str = "jsonl"  # jsonl (run_dir/metrics.jsonl, always written) | wandb (also logs to W&B)
    wandb_project: str = "attnres-train"
    wandb_entity: Optional[str] = None
    wandb_mode: str = "auto"  # auto: online when an API key is configured, else offline | online | offline | disabled
    wandb_run_name: Optional[str] = None


@dataclass
class RunConfig:
    run_dir: str = "runs/default"  # checkpoints, metrics and Hydra's output; identical on every rank
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)


def validate_train(train: TrainConfig) -> None:
    def need(cond: bool, name: str, expected: str) -> None:
        if not cond:
            raise RunConfigError(f"train.{name}={getattr(train, name)!r}: expected {expected}")

    need(train.max_steps >= 0, "max_steps", "an integer >= 0")
    need(train.micro_batch_size >= 1, "micro_batch_size", "an integer >= 1")
    need(train.grad_accum_steps >= 1, "grad_accum_steps", "an integer >= 1")
    need(train.precision in PRECISIONS, "precision", f"one of {PRECISIONS}")
    need(train.device in DEVICES, "device", f"one of {DEVICES}")
    need(train.log_every >= 1, "log_every", "an integer >= 1")
    need(train.val_every >= 0, "val_every", "an integer >= 0")
    need(train.val_batches >= 0, "val_batches", "an integer >= 0")
    need(train.checkpoint_every >= 0, "checkpoint_every", "an integer >= 0")
    need(train.keep_checkpoints >= 1, "keep_checkpoints", "an integer >= 1")
    need(bool(train.resume), "resume", "auto, never or a checkpoint path")
    need(train.num_threads is None or train.num_threads >= 1, "num_threads", "null or an integer >= 1")
    need(train.flops_budget is None or train.flops_budget > 0, "flops_budget", "null or a positive FLOP count")
    need(train.peak_flops is None or train.peak_flops > 0, "peak_flops", "null or a positive FLOP/s figure")
    need(train.skip_nonfinite_steps >= 0, "skip_nonfinite_steps", "an integer >= 0")


def validate_parallel(parallel: ParallelConfig) -> None:
    if parallel.zero_stage not in (0, 1, 2, 3):
        raise RunConfigError(f"parallel.zero_stage={parallel.zero_stage!r}: expected 0, 1, 2 or 3")
    if parallel.pipeline_stages < 1:
        raise RunConfigError(f"parallel.pipeline_stages={parallel.pipeline_stages}: expected an integer >= 1")
    if parallel.pipeline_stages > 1 and parallel.zero_stage > 1:
        raise RunConfigError(
            f"parallel.zero_stage={parallel.zero_stage} with parallel.pipeline_stages={parallel.pipeline_stages}: "
            "DeepSpeed's pipeline engine supports ZeRO stage 0 or 1 only"
        )
    if parallel.expert_parallel < 1:
        raise RunConfigError(f"parallel.expert_parallel={parallel.expert_parallel}: expected an integer >= 1")
    if parallel.expert_parallel > 1 and parallel.zero_stage == 3:
        raise RunConfigError(
            f"parallel.expert_parallel={parallel.expert_parallel} with parallel.zero_stage=3: DeepSpeed supports "
            "expert parallelism with ZeRO stage 0, 1 or 2 only")
    if parallel.pipeline_partition_tolerance < 0:
        raise RunConfigError(
            f"parallel.pipeline_partition_tolerance={parallel.pipeline_partition_tolerance}: expected a float >= 0"
        )
    if parallel.dist_backend not in ("auto", "nccl", "gloo"):
        raise RunConfigError(f"parallel.dist_backend={parallel.dist_backend!r}: expected auto, nccl or gloo")


def validate_expert_parallel(parallel: ParallelConfig, model: ModelConfig, dp_world: int, precision: str) -> None:
    """The layout checks of ``parallel.expert_parallel`` that need the model and the data-parallel degree."""
    experts = parallel.expert_parallel
    if experts == 1:
        return
    field_name = f"parallel.expert_parallel={experts}"
    if "moe" not in model.mlp_kinds():
        raise RunConfigError(f"{field_name}: the model has no MoE layers (model.mlp={model.mlp!r}, a dense "
                             "preset); expert parallelism needs an MoE model or parallel.expert_parallel=1")
    if model.num_experts % experts:
        raise RunConfigError(f"{field_name}: must divide model.num_experts={model.num_experts}")
    if dp_world % experts:
        raise RunConfigError(f"{field_name}: must divide the data-parallel degree ({dp_world} ranks)")
    if precision == "bf16" and parallel.zero_stage == 0:
        raise RunConfigError(f"{field_name} with train.precision=bf16 and parallel.zero_stage=0: DeepSpeed's bf16 "
                             "optimizer without ZeRO mis-counts expert gradient norms; use parallel=zero1 or zero2")


def validate_logger(logger: LoggerConfig) -> None:
    if logger.backend not in LOGGER_BACKENDS:
        raise RunConfigError(f"logger.backend={logger.backend!r}: expected one of {LOGGER_BACKENDS}")
    if logger.wandb_mode not in WANDB_MODES:
        raise RunConfigError(f"logger.wandb_mode={logger.wandb_mode!r}: expected one of {WANDB_MODES}")


def register_schema() -> None:
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name="run_schema", node=RunConfig)
