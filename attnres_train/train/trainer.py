"""The training loop: data -> DeepSpeed engine -> optimizer step -> callbacks (MoE balancing, divergence check,
metrics, validation, checkpoints).

``Trainer.run`` holds the run directory's lock for the whole run, then: set-up (loaders, model, engine),
resume (verified checkpoint, config comparison), run-directory markers, and the loop. A step is one of two kinds
(``MicroBatchStep``: forward/backward per micro-batch; ``PipelineStep``: DeepSpeed's pipeline schedule); what
follows a step lives in ``callbacks.py``.

Exact resume: a checkpoint holds model, optimizer and LR-schedule state (DeepSpeed) plus, in client_state, the
step, tokens seen, the training loader's position, every RNG state, the model config with its fingerprint and
the launch's resolved config. Checkpoints are only taken between optimizer steps, where the MoE load counters
are empty, so restoring this state continues the run as if it had never stopped.
"""

from __future__ import annotations

import json
import logging
import math
import os
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch

from attnres_train.atomic_files import atomic_write_text
from attnres_train.data import build_loaders, build_tokenizer
from attnres_train.data.config import DataConfig
from attnres_train.model import ModelConfig, build_model
from attnres_train.model.config import with_legacy_fields
from attnres_train.model.accounting import describe
from attnres_train.model.loss import language_model_loss

from .callbacks import (
    Checkpointing,
    DivergenceCheck,
    MetricsRecording,
    MoEBalancing,
    StepResult,
    TrainState,
    Validation,
)
from .checkpoint import (
    FINGERPRINT_KEY,
    read_checkpoint_file,
    MODEL_CONFIG_KEY,
    RUN_CONFIG_KEY,
    CheckpointError,
    CheckpointManager,
    config_fingerprint,
    model_config_state,
    validate_fingerprint,
)
from .config import (
    LoggerConfig,
    ParallelConfig,
    RunConfigError,
    TrainConfig,
    validate_expert_parallel,
    validate_logger,
    validate_parallel,
    validate_train,
)
from .divergence import NonFiniteStepGuard
from .engine import (
    DistributedContext,
    deepspeed_config,
    initialize_engine,
    resolve_device,
    resolve_precision,
    setup_distributed,
)
from .metrics import MetricsLogger, peak_flops_per_device
from .optim import OptimConfig, build_optimizer, param_group_names
from .pipelined import build_stage_module, clip_by_global_norm, needs_own_clipping, pipeline_batches, pipeline_traffic
from .reshard import OPTIMIZER_NAMES_KEY, layout_changes, model_names
from .resume_config import apply_optimizer_config, check_resume_config, optimizer_hyperparameters
from .rng import capture_rng_state, restore_rng_state
from .run_lock import RunDirLock, RunDirLockedError
from .run_state import (
    FAILED_NAME,
    FINISHED_NAME,
    RESOLVED_CONFIG_NAME,
    clear_marker,
    config_key,
    finished_marker,
    is_finished_with,
    write_json_atomic,
)
from .schedule import build_lr_scheduler

_log = logging.getLogger(__name__)


class StopRequested:
    """SIGTERM/SIGINT set a flag; the loop checkpoints at the next step boundary and exits cleanly."""

    def __init__(self) -> None:
        self.signal_name: Optional[str] = None
        self._previous = {}

    def install(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._handle)

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum, frame) -> None:
        self.signal_name = signal.Signals(signum).name


def _typed(section: Any, cls):
    from omegaconf import DictConfig, OmegaConf

    if isinstance(section, cls):
        return section
    if isinstance(section, DictConfig):
        section = OmegaConf.to_container(section, resolve=True)
    return cls(**section)


class MicroBatchStep:
    """One optimizer step as ``grad_accum_steps`` forward/backward passes through the DeepSpeed engine."""

    def __init__(self, engine, train_loader, grad_accum_steps: int, own_grad_norm, guard: NonFiniteStepGuard, ctx):
        self.engine, self.train_loader, self.grad_accum_steps = engine, train_loader, grad_accum_steps
        self.own_grad_norm, self.guard, self.ctx = own_grad_norm, guard, ctx

    def __call__(self) -> StepResult:
        engine, ctx = self.engine, self.ctx
        loss, aux, grad_norm = 0.0, 0.0, None
        for _ in range(self.grad_accum_steps):
            batch = {k: v.to(ctx.device, non_blocking=True) for k, v in next(self.train_loader).items()}
            out = engine(batch["input_ids"], doc_ids=batch["doc_ids"])
            lm_loss = language_model_loss(out.logits, batch["labels"])
            engine.backward(lm_loss + out.aux_loss)
            micro_loss = lm_loss.item()
            self.guard.report_loss(micro_loss + float(out.aux_loss.item()))
            if engine.is_gradient_accumulation_boundary():
                grad_norm = _unclipped_grad_norm_if_untracked(engine)
            engine.step()
            loss += micro_loss / self.grad_accum_steps
            aux += float(out.aux_loss.item()) / self.grad_accum_steps
        if self.own_grad_norm is not None:  # the trainer's own clipping measured it (expert parallelism)
            grad_norm = self.own_grad_norm()
        if self.guard.skipped_last_step:
            grad_norm = None  # a skipped step's norm was never measured (or was not finite)
        return StepResult(loss=ctx.mean_over_ranks(loss), aux_loss=ctx.mean_over_ranks(aux),
                          grad_norm=_finite_or_none(grad_norm), skipped=self.guard.skipped_last_step)


class PipelineStep:
    """One optimizer step as DeepSpeed's pipeline schedule; its loss already holds the MoE aux losses carried
    across the stages."""

    def __init__(self, engine, train_batches, grad_norm, guard: NonFiniteStepGuard, ctx):
        self.engine, self.train_batches, self.grad_norm, self.guard, self.ctx = (
            engine, train_batches, grad_norm, guard, ctx)

    def __call__(self) -> StepResult:
        loss = float(self.engine.train_batch(data_iter=self.train_batches))
        grad_norm = self.grad_norm() if self.grad_norm is not None and not self.guard.skipped_last_step else None
        return StepResult(loss=self.ctx.mean_over_ranks(loss), aux_loss=0.0, grad_norm=_finite_or_none(grad_norm),
                          skipped=self.guard.skipped_last_step)


@dataclass
class RunSetup:
    """What ``Trainer._set_up`` prepares before DeepSpeed is involved."""

    precision: str
    dp_world: int
    train_loader: Any
    val_loader: Any
    checkpoints: CheckpointManager
    resume: "ResumePoint"
    model: Any
    accounting: dict
    tokens_per_step: int
    total_steps: int


@dataclass
class EngineParts:
    """What ``Trainer._build_engine`` wires together around the DeepSpeed engine."""

    engine: Any
    trained_module: Any  # the model, or this rank's pipeline stage
    moe_layers: list
    optimizer: Any
    guard: NonFiniteStepGuard
    lr_scheduler: Any
    launched_hyperparameters: list
    own_grad_norm: Any  # the trainer's clipping norm where DeepSpeed's is wrong, else None
    dp_group: Any
    layout: dict
    expert_rank: int
    expert_dispatches: list


@dataclass
class ResumePoint:
    tag: Optional[str]  # None: a fresh start
    marker: dict
    config_changes: tuple[str, ...] = ()  # "field: saved X, current Y" for each field this launch changes


class Trainer:
    def __init__(self, cfg: Any):
        from omegaconf import DictConfig, OmegaConf

        self.resolved_config = (
            OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else dict(cfg)
        )
        self.run_dir = Path(self.resolved_config["run_dir"]).resolve()
        self.model_cfg = ModelConfig.from_mapping(self.resolved_config["model"])
        self.data_cfg = DataConfig.from_mapping(self.resolved_config["data"])
        self.optim_cfg = OptimConfig.from_mapping(self.resolved_config["optim"])
        self.train_cfg = _typed(self.resolved_config["train"], TrainConfig)
        self.parallel_cfg = _typed(self.resolved_config["parallel"], ParallelConfig)
        self.logger_cfg = _typed(self.resolved_config["logger"], LoggerConfig)
        validate_train(self.train_cfg)
        validate_parallel(self.parallel_cfg)
        validate_logger(self.logger_cfg)
        if self.optim_cfg.name == "muon" and self.parallel_cfg.zero_stage > 0:
            raise RunConfigError(
                f"parallel.zero_stage={self.parallel_cfg.zero_stage} with optim.name='muon': ZeRO hands the "
                "optimizer flattened 1-D shards, but Muon orthogonalises whole 2-D matrices; use parallel=zero0 "
                "with optim=muon, or optim=adamw with ZeRO"
            )

    # ------------------------------------------------------------------------------------------------
    def run(self) -> dict:
        if self.train_cfg.num_threads:
            torch.set_num_threads(self.train_cfg.num_threads)
        self._check_layout(int(os.environ.get("WORLD_SIZE", "1")))  # before any rendezvous: refusals are quick
        ctx = setup_distributed(self.parallel_cfg, self.train_cfg)
        lock = self._lock_run_dir(ctx)
        try:
            return self._run_locked(ctx)
        finally:
            if lock is not None:
                lock.release()

    def _check_layout(self, world_size: int) -> None:
        """The parallel layout against the number of processes and the model."""
        stages = self.parallel_cfg.pipeline_stages
        if world_size % stages:
            raise RunConfigError(
                f"parallel.pipeline_stages={stages}: must divide the number of processes ({world_size})"
            )
        precision = resolve_precision(self.train_cfg, resolve_device(self.train_cfg))
        validate_expert_parallel(self.parallel_cfg, self.model_cfg, world_size // stages, precision)

    def _lock_run_dir(self, ctx: DistributedContext) -> Optional[RunDirLock]:
        """Rank 0 holds the run_dir lock; every rank learns whether it got it, so all of them stop together."""
        lock, refusal = None, None
        if ctx.is_main:
            lock = RunDirLock(self.run_dir)
            try:
                lock.acquire()
            except RunDirLockedError as error:
                lock, refusal = None, str(error)
        flag = torch.tensor([1.0 if refusal else 0.0], device=ctx.device)
        ctx.all_reduce_sum_(flag)
        if flag.item() > 0:
            raise RunDirLockedError(refusal or f"run_dir {self.run_dir} is in use by another launch (see rank 0)")
        return lock

    def _run_locked(self, ctx: DistributedContext) -> dict:
        run = self._set_up(ctx)
        if run.resume.tag is not None:
            done = self._finished_before_start(run.resume, run.total_steps, ctx)
            if done is not None:
                return done
        parts = self._build_engine(ctx, run)
        state = TrainState(step=0, tokens_seen=0, total_steps=run.total_steps, tokens_per_step=run.tokens_per_step,
                           flops_per_token=run.accounting["train_flops_per_token"])
        applied_changes: list[str] = []
        if run.resume.tag is not None:
            state.step, state.tokens_seen = self._restore(run.checkpoints, parts.engine, run.resume, parts.layout,
                                                          run.train_loader, parts.expert_rank,
                                                          bool(parts.expert_dispatches))
            applied_changes = self._apply_config_changes(run.resume, parts.optimizer, parts.lr_scheduler,
                                                         parts.launched_hyperparameters)
        if ctx.is_main:
            self._prepare_run_dir(run.checkpoints, run.resume, state, run.accounting, run.model, run.precision)
        logger = MetricsLogger(self.run_dir, self.logger_cfg, ctx.is_main, total_steps=run.total_steps,
                               start_step=state.step, progress_bar=self.train_cfg.progress_bar,
                               resolved_config=self.resolved_config)
        accounting, train = run.accounting, self.train_cfg
        logger.message(
            f"run_dir={self.run_dir} device={ctx.device} world_size={ctx.world_size} precision={run.precision} "
            f"params={accounting['total_parameters']:,} active={accounting['active_parameters']:,} "
            f"layers={accounting['layer_pattern']} steps={run.total_steps}"
            + (f" flops_budget={train.flops_budget:.4g}" if train.flops_budget else "")
            + (f" resumed_from={run.resume.tag} step={state.step}" if run.resume.tag is not None else "")
        )
        for change in applied_changes:
            logger.message(f"resume: applying the changed config: {change}")
        self._train(ctx, run, parts, state, logger)
        result = {
            "step": state.step,
            "total_steps": run.total_steps,
            "tokens": state.tokens_seen,
            "flops": state.flops,
            "loss": state.last_loss,
            "val_loss": state.last_val,
            "stopped_by": state.stopped_by,
        }
        key = config_key(self.resolved_config)
        finished = state.step >= run.total_steps and not state.stopped_by
        if ctx.is_main and finished and not is_finished_with(self.run_dir, key):
            write_json_atomic(self.run_dir / FINISHED_NAME, {**result, "config_key": key})
        return result

    def _set_up(self, ctx: DistributedContext) -> "RunSetup":
        """Everything before DeepSpeed: layout checks, tokenizer and loaders, the resume point, the model (seeded,
        or initialised from ``train.init_from``) and the step count."""
        train = self.train_cfg
        precision = resolve_precision(train, ctx.device)
        stages = self.parallel_cfg.pipeline_stages
        # DeepSpeed's pipe x data topology numbers ranks data-fastest: rank = stage * dp_world + dp_rank.
        dp_world, dp_rank = ctx.world_size // stages, ctx.rank % (ctx.world_size // stages)

        tokenizer = build_tokenizer(self.data_cfg)
        if self.model_cfg.vocab_size < tokenizer.vocab_size:
            raise RunConfigError(
                f"model.vocab_size={self.model_cfg.vocab_size} is smaller than the tokenizer's vocabulary "
                f"({tokenizer.vocab_size} for data.tokenizer={self.data_cfg.tokenizer!r}); "
                f"set model.vocab_size>={tokenizer.vocab_size}"
            )
        train_loader, val_loader = build_loaders(
            self.data_cfg,
            tokenizer,
            micro_batch_size=train.micro_batch_size,
            dp_rank=dp_rank,
            dp_world_size=dp_world,
            seed=train.seed,
            val_num_batches=train.val_batches,
            grad_accum_steps=train.grad_accum_steps,  # a mixture apportions whole optimizer steps
        )
        checkpoints = CheckpointManager(self.run_dir / "checkpoints", keep_last=train.keep_checkpoints,
                                        rank=ctx.rank, world_size=ctx.world_size, barrier=ctx.barrier)
        resume = self._resume_point(checkpoints, ctx)

        torch.manual_seed(train.seed)
        model = build_model(self.model_cfg)
        if train.init_from and resume.tag is None:
            from attnres_train.interop.pretrained import initial_weights

            model.load_state_dict(initial_weights(train.init_from, self.model_cfg), strict=True)
        if self.parallel_cfg.zero_stage == 3 and hasattr(model.residual, "per_module_parameters"):
            model.residual.per_module_parameters = True  # ZeRO-3 gathers each module's shards only around its call
        if train.activation_checkpointing and stages == 1:
            from .activation_checkpointing import apply_activation_checkpointing

            apply_activation_checkpointing(model)
        model.to(ctx.device)
        if train.compile:
            if ctx.device.type != "cuda":
                raise RunConfigError("train.compile=true: torch.compile is supported on CUDA runs only")
            for layer in model.layers:
                layer.compile()

        # Counted before DeepSpeed wraps the model: ZeRO-3 partitions parameters in place (numel 0 per rank).
        accounting = describe(model, self.data_cfg.seq_len)
        tokens_per_step = train.micro_batch_size * train.grad_accum_steps * dp_world * self.data_cfg.seq_len
        total_steps = target_steps(train, accounting["train_flops_per_token"], tokens_per_step)
        return RunSetup(precision, dp_world, train_loader, val_loader, checkpoints, resume, model, accounting,
                        tokens_per_step, total_steps)

    def _build_engine(self, ctx: DistributedContext, run: "RunSetup") -> "EngineParts":
        """Expert sharding, pipeline stage wrapping, the optimizer with its divergence guard, the LR schedule,
        the DeepSpeed engine and, where DeepSpeed's clipping is wrong, the trainer's own."""
        stages = self.parallel_cfg.pipeline_stages
        expert_group, expert_rank, expert_dispatches = self._shard_experts(run.model)
        trained_module, moe_layers = run.model, run.model.moe_layers()
        if stages > 1:
            trained_module = build_stage_module(
                run.model, self.parallel_cfg, self.data_cfg.seq_len, self.train_cfg.activation_checkpointing
            )
            from attnres_train.parallel.pipeline import local_moe_layers

            moe_layers = local_moe_layers(trained_module)
        if expert_group is not None:
            self._tag_expert_parallel(trained_module)
        optimizer = build_optimizer(trained_module, self.optim_cfg)
        guard = NonFiniteStepGuard(optimizer, ctx.all_reduce_sum_, ctx.device)  # before the scheduler wraps step
        lr_scheduler = build_lr_scheduler(optimizer, self.optim_cfg, total_steps=run.total_steps)
        launched_hyperparameters = optimizer_hyperparameters(optimizer)
        own_clipping = needs_own_clipping(self.parallel_cfg, run.precision)
        grad_clip = 0.0 if own_clipping else self.optim_cfg.grad_clip
        ds_config = deepspeed_config(self.train_cfg, self.parallel_cfg, grad_clip, run.precision, run.dp_world)
        engine = initialize_engine(trained_module, optimizer, lr_scheduler, ds_config)
        own_grad_norm = None
        if own_clipping:
            own_grad_norm = clip_by_global_norm(
                engine.optimizer, trained_module, self.optim_cfg.grad_clip,
                pipe_group=engine.grid.get_pipe_parallel_group() if stages > 1 else None, expert_group=expert_group)
        return EngineParts(
            engine=engine, trained_module=trained_module, moe_layers=moe_layers, optimizer=optimizer, guard=guard,
            lr_scheduler=lr_scheduler, launched_hyperparameters=launched_hyperparameters, own_grad_norm=own_grad_norm,
            dp_group=engine.grid.get_data_parallel_group() if stages > 1 else None,
            layout=self._layout(run.precision, run.dp_world, trained_module),
            expert_rank=expert_rank, expert_dispatches=expert_dispatches)

    def _train(self, ctx: DistributedContext, run: "RunSetup", parts: "EngineParts", state: TrainState,
               logger: MetricsLogger) -> None:
        """The loop: one step of the configured kind, then each callback, until the last step or a stop signal."""
        train, engine, checkpoints = self.train_cfg, parts.engine, run.checkpoints
        pipelined = self.parallel_cfg.pipeline_stages > 1

        def newest_checkpoint() -> str:
            latest = checkpoints.latest()
            return str(latest[1]) if latest else "none"

        stop = StopRequested()
        if pipelined:
            step_fn = PipelineStep(engine, pipeline_batches(run.train_loader, ctx.device), parts.own_grad_norm,
                                   parts.guard, ctx)
        else:
            step_fn = MicroBatchStep(engine, run.train_loader, train.grad_accum_steps, parts.own_grad_norm,
                                     parts.guard, ctx)
        callbacks = [
            MoEBalancing(parts.moe_layers, ctx, parts.dp_group),
            MetricsRecording(logger, train.log_every, parts.lr_scheduler, lambda: _grad_norm(engine), ctx,
                             peak_flops_per_device(ctx.device, train.peak_flops), parts.expert_dispatches),
            DivergenceCheck(train.skip_nonfinite_steps, logger, newest_checkpoint),  # after the step's record
            Validation(engine, run.val_loader, train.val_every, train.val_batches, ctx, logger, pipelined=pipelined,
                       expert_dispatches=parts.expert_dispatches),
            Checkpointing(train.checkpoint_every,
                          lambda s: self._save(checkpoints, engine, ctx, s.step, s.tokens_seen, run.train_loader,
                                               parts.layout, parts.expert_rank),
                          lambda: self._agreed_stop(stop, ctx), parts.trained_module.parameters, ctx,
                          newest_checkpoint),
        ]
        stop.install()
        try:
            state.speed.restart()
            while state.step < state.total_steps:
                engine.train()
                parts.guard.begin_step()
                state.result = step_fn()
                state.step += 1
                state.tokens_seen += state.tokens_per_step
                state.speed.tick()
                state.last_loss = state.result.loss
                for callback in callbacks:
                    callback.on_step_end(state)
                if state.stopped_by:
                    logger.message(f"received {state.stopped_by}: checkpoint saved at step {state.step}, exiting")
                    break
        finally:
            stop.uninstall()
            logger.close()

    # --- resume -------------------------------------------------------------------------------------------------
    def _resume_point(self, checkpoints: CheckpointManager, ctx: DistributedContext) -> ResumePoint:
        """The checkpoint to resume from, verified, once its model and run config are known to fit this launch.

        ``train.resume=auto`` falls back past checkpoints whose files fail verification, naming each one; when
        none passes the run stops rather than silently starting over."""
        mode = self.train_cfg.resume
        if mode == "never":
            return ResumePoint(None, {})
        if mode == "auto":
            if self.train_cfg.verify_checkpoints:
                tag, rejected = checkpoints.newest_verified()
            else:
                latest, rejected = checkpoints.latest(), []
                tag = latest[0] if latest else None
            for problem in rejected:
                self._warn_loudly(ctx, f"checkpoint rejected: {problem}" + (
                    f"; falling back to {checkpoints.root_dir / tag}" if tag else ""))
            if tag is None and rejected:
                raise CheckpointError(
                    f"no checkpoint in {checkpoints.root_dir} passes verification ({len(rejected)} rejected, see "
                    f"above); nothing was changed. Restore the files, or start over with train.resume=never")
        else:
            tag = self._explicit_resume_tag(checkpoints, mode)
            problem = checkpoints.verify(tag) if self.train_cfg.verify_checkpoints else None
            if problem is not None:
                raise CheckpointError(f"train.resume={mode!r}: {problem}")
        if tag is None:
            return ResumePoint(None, {})
        marker = checkpoints.read_marker(tag) or {}
        saved_model_cfg = marker.get(MODEL_CONFIG_KEY)
        saved_fingerprint = marker.get("config_fingerprint")
        if isinstance(saved_model_cfg, dict):
            # A config saved before a field existed is compared as the model it trained (legacy values filled in).
            saved_model_cfg = with_legacy_fields(saved_model_cfg)
            saved_fingerprint = config_fingerprint(saved_model_cfg)
        # Nested under "model" so the differing fields are named as on the command line (model.hidden_size).
        validate_fingerprint(
            {
                FINGERPRINT_KEY: saved_fingerprint,
                MODEL_CONFIG_KEY: {"model": saved_model_cfg} if isinstance(saved_model_cfg, dict) else None,
            },
            config_fingerprint(self.model_cfg.to_dict()),
            current_model_config={"model": self.model_cfg.to_dict()},
        )
        saved_run_config = marker.get(RUN_CONFIG_KEY)
        changes: list[str] = []
        if isinstance(saved_run_config, dict):
            changes = check_resume_config(saved_run_config, self.resolved_config, str(checkpoints.root_dir / tag))
        else:
            _log.warning("checkpoint %s records no run config (written by an older version): config changes on "
                         "this resume cannot be listed", checkpoints.root_dir / tag)
        return ResumePoint(tag, marker, tuple(changes))

    def _finished_before_start(self, resume: ResumePoint, total_steps: int, ctx: DistributedContext
                               ) -> Optional[dict]:
        """A checkpoint at or past this launch's last step: nothing to train. At the last step the run is
        already finished and nothing is touched; past it the launch is refused."""
        step = int(resume.marker.get("step", 0))
        if step > total_steps:
            limit = (f"train.flops_budget={self.train_cfg.flops_budget:.4g} ({total_steps} steps)"
                     if self.train_cfg.flops_budget else f"train.max_steps={total_steps}")
            raise RunConfigError(
                f"{limit}: the newest checkpoint {resume.tag} is already at step {step}, past the end of this run; "
                f"raise it to continue training, or export/evaluate that checkpoint")
        if step < total_steps:
            return None
        finished = finished_marker(self.run_dir)
        if ctx.is_main:
            print(f"run_dir={self.run_dir} resumed_from={resume.tag} step={step}: already at the last step, "
                  "nothing to train", flush=True)
            if finished is None:  # stopped between the final checkpoint and the marker
                finished = {"step": step, "total_steps": total_steps, "loss": None, "val_loss": None,
                            "stopped_by": None, "config_key": config_key(self.resolved_config)}
                write_json_atomic(self.run_dir / FINISHED_NAME, finished)
        return {**(finished or {}), "step": step, "total_steps": total_steps, "stopped_by": None}

    def _restore(self, checkpoints, engine, resume: ResumePoint, layout: dict, train_loader, expert_rank: int,
                 expert_parallel: bool) -> tuple[int, int]:
        restore = None
        changes = layout_changes(resume.marker, layout, checkpoints.root_dir / resume.tag)
        if changes:  # saved under another layout: read it back by parameter name
            _log.warning("checkpoint %s was saved under another parallel layout (%s): resuming it by parameter "
                         "name", checkpoints.root_dir / resume.tag, "; ".join(changes))
            restore = self._layout_change_restore(int(resume.marker.get("pipeline_stages") or 1),
                                                  self.parallel_cfg.pipeline_stages,
                                                  int(resume.marker.get("expert_parallel") or 1), expert_rank)
        client_state = checkpoints.load(engine, tag=resume.tag, restore=restore, verify=False)  # verified above
        if expert_parallel and not changes:  # DeepSpeed gave every rank rank 0's expert slice
            from attnres_train.parallel.expert_parallel import load_expert_shard

            load_expert_shard(checkpoints.root_dir / resume.tag, engine.module, self.parallel_cfg.expert_parallel,
                              expert_rank, model_names(self.model_cfg.num_layers, self.parallel_cfg.pipeline_stages),
                              read_checkpoint_file, self._expert_shard_stage(engine))
        train_loader.load_state_dict(client_state["train_loader"])
        rank_state = checkpoints.load_rank_state(resume.tag)
        if rank_state is not None:  # absent when resuming on more ranks than saved
            restore_rng_state(rank_state["rng"])
        return int(client_state["step"]), int(client_state["tokens_seen"])

    @staticmethod
    def _apply_config_changes(resume: ResumePoint, optimizer, lr_scheduler, launched: list[dict]) -> list[str]:
        """The optimizer settings DeepSpeed restored are replaced by the launch's. Returns the changed config
        fields (``check_resume_config``), then each optimizer value that differed from the restored one."""
        return [*resume.config_changes, *apply_optimizer_config(optimizer, lr_scheduler, launched)]

    def _prepare_run_dir(self, checkpoints, resume: ResumePoint, state: TrainState, accounting: dict, model,
                         precision: str) -> None:
        """Rank 0: the run directory's records for this launch (summary, resolved config, markers). A fresh start
        keeps an earlier run's metrics and checkpoints, moved aside."""
        train, step, total_steps = self.train_cfg, state.step, state.total_steps
        self.run_dir.mkdir(parents=True, exist_ok=True)
        metrics_path = self.run_dir / "metrics.jsonl"
        if resume.tag is not None:
            _supersede_metrics_after(metrics_path, step)
        else:
            moved = checkpoints.supersede_all()
            if moved:
                print(f"fresh start (train.resume={train.resume}): earlier checkpoints moved to "
                      f"{moved[0].parent}", flush=True)
            if metrics_path.exists():
                kept = metrics_path.with_name(f"metrics.{time.strftime('%Y%m%d-%H%M%S')}.jsonl")
                metrics_path.replace(kept)
                print(f"fresh start: the earlier metrics.jsonl is kept as {kept.name}", flush=True)
        summary = {**accounting, "tokens_per_step": state.tokens_per_step, "total_steps": total_steps,
                   "flops_budget": train.flops_budget}
        if self.parallel_cfg.pipeline_stages > 1:
            summary["pipeline"] = pipeline_traffic(
                model, self.parallel_cfg, self.data_cfg.seq_len, train.micro_batch_size, precision
            )
        write_json_atomic(self.run_dir / "model_summary.json", summary)
        _write_resolved_config(self.run_dir / RESOLVED_CONFIG_NAME, self.resolved_config)
        clear_marker(self.run_dir, FAILED_NAME)
        if step < total_steps:  # a finished run being extended is unfinished again until it ends
            clear_marker(self.run_dir, FINISHED_NAME)

    @staticmethod
    def _warn_loudly(ctx: DistributedContext, message: str) -> None:
        _log.warning(message)
        if ctx.is_main:
            print(f"WARNING: {message}", file=sys.stderr, flush=True)

    # --- checkpoint and layout helpers ------------------------------------------------------------------
    def _layout(self, precision: str, dp_world: int, trained_module) -> dict:
        """This run's parallel layout, in the terms checkpoints record (``reshard.layout_changes``)."""
        stages = self.parallel_cfg.pipeline_stages
        return {"pipeline_stages": stages, "pipeline_parts": list(trained_module.parts) if stages > 1 else None,
                "zero_stage": self.parallel_cfg.zero_stage, "precision": precision, "data_parallel": dp_world,
                "optimizer": self.optim_cfg.name, "expert_parallel": self.parallel_cfg.expert_parallel}

    def _shard_experts(self, model) -> tuple:
        """Expert parallelism: keep this rank's expert slices, install the all-to-all dispatch and tag the model
        for DeepSpeed; returns ``(expert-parallel group, rank in it, dispatches)`` (None, 0, [] without it)."""
        experts = self.parallel_cfg.expert_parallel
        if experts == 1:
            return None, 0, []
        from attnres_train.parallel import expert_parallel

        # Under pipelining each stage's data-parallel replicas form their own expert groups.
        group, rank = expert_parallel.create_expert_groups(experts, self.parallel_cfg.pipeline_stages)
        dispatches = expert_parallel.shard_experts(model, experts, rank, group)
        expert_parallel.mark_expert_parameters(model, experts)
        return group, rank, dispatches

    def _tag_expert_parallel(self, trained_module) -> None:
        """DeepSpeed looks for its MoE class in the module it is given (the model, or this rank's stage)."""
        from attnres_train.parallel import expert_parallel

        trained_module.add_module("expert_parallel_marker", expert_parallel.deepspeed_moe_marker(
            self.model_cfg.num_experts, self.parallel_cfg.expert_parallel, self.parallel_cfg.pipeline_stages))

    def _expert_shard_stage(self, engine) -> Optional[int]:
        """The pipeline stage named in this rank's expert shard file (None without pipeline stages)."""
        return engine.stage_id if self.parallel_cfg.pipeline_stages > 1 else None

    def _expert_shard_files(self, engine, expert_rank: int) -> dict:
        """The expert slice this rank saves (the first replica of each slice saves it; one file per stage)."""
        experts = self.parallel_cfg.expert_parallel
        if experts == 1:
            return {}
        from attnres_train.parallel import expert_parallel

        if expert_parallel.expert_data_parallel_rank(experts) != 0:
            return {}
        to_model_name = model_names(self.model_cfg.num_layers, self.parallel_cfg.pipeline_stages)
        return {expert_parallel.shard_file_name(expert_rank, experts, self._expert_shard_stage(engine)):
                expert_parallel.expert_shard_state(engine.module, to_model_name)}

    def _layout_change_restore(self, saved_stages: int, stages: int, saved_experts: int, expert_rank: int):
        from .reshard import SavedTrainingState, restore_engine

        num_layers = self.model_cfg.num_layers
        to_model_name = model_names(num_layers, stages)
        experts = self.parallel_cfg.expert_parallel
        expert_slice = (expert_rank, experts) if experts > 1 else None

        def restore(engine, tag_dir):
            saved = SavedTrainingState(tag_dir, saved_stages, num_layers, expert_parallel=saved_experts)
            return restore_engine(engine, saved, to_model_name, expert_slice)

        return restore

    @staticmethod
    def _explicit_resume_tag(checkpoints: CheckpointManager, mode: str) -> str:
        target = Path(mode)
        if target.resolve().parent != checkpoints.root_dir.resolve() or checkpoints.read_marker(target.name) is None:
            raise CheckpointError(
                f"train.resume={mode!r}: expected a complete checkpoint directory of this run "
                f"(a step_* directory with a COMPLETE marker inside {checkpoints.root_dir})"
            )
        return target.name

    def _save(self, checkpoints, engine, ctx: DistributedContext, step, tokens_seen, train_loader, layout,
              expert_rank: int = 0):
        stages = self.parallel_cfg.pipeline_stages
        to_model_name = model_names(self.model_cfg.num_layers, stages)
        client_state = {
            "step": step,
            "tokens_seen": tokens_seen,
            "train_loader": train_loader.state_dict(),
            "world_size": ctx.world_size,
            **{key: layout[key] for key in ("pipeline_stages", "pipeline_parts", "zero_stage", "precision",
                                            "optimizer", "expert_parallel")},
            # This rank's optimizer order (its stage's, under pipelining; DeepSpeed stores each stage's client
            # state with that stage's files): lets another layout match unpartitioned optimizer state by name.
            OPTIMIZER_NAMES_KEY: [[to_model_name(name) for name in group]
                                  for group in param_group_names(engine.module, self.optim_cfg)],
            **model_config_state(self.model_cfg.to_dict()),
            RUN_CONFIG_KEY: self.resolved_config,
        }
        checkpoints.save(engine, step, client_state, rank_state={"rng": capture_rng_state()},
                         rank_files=self._expert_shard_files(engine, expert_rank))

    @staticmethod
    def _agreed_stop(stop: StopRequested, ctx: DistributedContext) -> Optional[str]:
        """A signal may reach only some ranks; every rank must take the same decision."""
        flag = torch.tensor([1.0 if stop.signal_name else 0.0], device=ctx.device)
        ctx.all_reduce_sum_(flag)
        if flag.item() > 0:
            return stop.signal_name or "SIGTERM"
        return None


def target_steps(train: TrainConfig, train_flops_per_token: float, tokens_per_step: int) -> int:
    """Optimizer steps of the run: ``train.max_steps``, or with ``train.flops_budget`` set (which then replaces
    max_steps) the fewest steps whose training FLOPs reach the budget:
    ``ceil(flops_budget / (train_flops_per_token * tokens_per_step))``, where train_flops_per_token is the
    model's exact count (``HybridDecoder.flops_per_token(seq_len)``, forward + backward)."""
    if train.flops_budget is None:
        return train.max_steps
    flops_per_step = train_flops_per_token * tokens_per_step
    # The tiny relative slack keeps a budget that is an exact multiple of a step from rounding up a step.
    return max(1, math.ceil(train.flops_budget / flops_per_step * (1 - 1e-12)))


def _write_resolved_config(path: Path, resolved_config: dict) -> None:
    from omegaconf import OmegaConf

    atomic_write_text(path, OmegaConf.to_yaml(OmegaConf.create(resolved_config)))


def _finite_or_none(value: Optional[float]) -> Optional[float]:
    return value if value is not None and math.isfinite(value) else None


def _grad_norm(engine) -> Optional[float]:
    norm = engine.get_global_grad_norm()
    if norm is None:
        return None
    norm = float(norm.item() if isinstance(norm, torch.Tensor) else norm)
    return norm if math.isfinite(norm) else None


def _unclipped_grad_norm_if_untracked(engine) -> Optional[float]:
    """DeepSpeed records the global grad norm only inside its ZeRO / bf16 optimizers; for plain fp32
    stage 0 we read it from the (already data-parallel averaged) gradients before the step clips them."""
    if engine.zero_optimization() or engine.bfloat16_enabled() or engine.fp16_enabled():
        return None
    grads = [p.grad for p in engine.module.parameters() if p.grad is not None]
    if not grads:
        return None
    return float(torch.nn.utils.get_total_norm(grads).item())


def _supersede_metrics_after(path: Path, step: int) -> None:
    """On resume, records of steps beyond the checkpoint belong to an abandoned timeline: move them to
    ``metrics.superseded.jsonl`` (kept, not deleted) so metrics.jsonl holds one consistent history."""
    if not path.exists():
        return
    keep, superseded = [], []
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        try:
            record_step = int(json.loads(line).get("step", 0))
        except (ValueError, AttributeError):
            record_step = 0
        (superseded if record_step > step else keep).append(line)
    if not superseded:
        return
    with open(path.with_name("metrics.superseded.jsonl"), "a", encoding="utf-8") as f:
        f.write("\n".join(superseded) + "\n")
    atomic_write_text(path, "".join(line + "\n" for line in keep))
