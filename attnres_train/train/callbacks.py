"""What happens after each optimizer step, one concern per class: MoE balancing, the divergence check, metrics,
validation and checkpointing. The loop in ``trainer.py`` runs a step and hands the shared ``TrainState`` to each
callback in order; a callback that spends wall time outside training (validation, a checkpoint) restarts the
speed window, so tokens/s measures training alone.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

import torch

from attnres_train.model.loss import IGNORE_INDEX, language_model_loss

from .divergence import TrainingDivergedError, weights_are_finite
from .metrics import model_flops_utilization
from .pipelined import batches_by_source, mixture_loss, pipeline_validation_loss, validation_source_names


@dataclass
class StepResult:
    loss: float  # mean LM loss over ranks and micro-batches (NaN when it was not finite)
    aux_loss: float
    grad_norm: Optional[float]
    skipped: bool  # the divergence guard skipped the update


class SpeedMeter:
    """Steps and wall time since the window started; ``restart`` after time spent outside training."""

    def __init__(self) -> None:
        self.restart()

    def restart(self) -> None:
        self.started = time.perf_counter()
        self.steps = 0

    def tick(self) -> None:
        self.steps += 1

    def seconds(self) -> float:
        return max(time.perf_counter() - self.started, 1e-9)


@dataclass
class TrainState:
    step: int
    tokens_seen: int
    total_steps: int
    tokens_per_step: int
    flops_per_token: float
    speed: SpeedMeter = field(default_factory=SpeedMeter)
    result: Optional[StepResult] = None
    moe_stats: dict = field(default_factory=dict)
    last_loss: float = float("nan")
    last_val: Optional[float] = None
    stopped_by: Optional[str] = None

    @property
    def flops(self) -> float:
        return self.tokens_seen * self.flops_per_token

    @property
    def is_last_step(self) -> bool:
        return self.step == self.total_steps


class MoEBalancing:
    """Once per optimizer step: every rank updates the expert biases of its MoE layers from the load seen by all
    data-parallel replicas of those layers (``dp_group``: the replicas of this pipeline stage)."""

    def __init__(self, layers: list, ctx, dp_group=None):
        self.layers, self.ctx, self.dp_group = layers, ctx, dp_group

    @torch.no_grad()
    def on_step_end(self, state: TrainState) -> None:
        if not self.layers:
            return
        if state.result.skipped:  # a skipped update changes nothing, and routing on non-finite scores is noise
            for moe in self.layers:
                moe.tokens_per_expert.zero_()
            state.moe_stats = {}
            return
        violations = []
        for moe in self.layers:
            counts = moe.tokens_per_expert.detach().clone().to(self.ctx.device)
            if self.dp_group is not None:
                torch.distributed.all_reduce(counts, group=self.dp_group)
            else:
                self.ctx.all_reduce_sum_(counts)
            stats = moe.update_expert_bias(counts)
            violations.append(float(stats.get("max_violation", float("nan"))))
        finite = [v for v in violations if math.isfinite(v)]
        state.moe_stats = {
            "max_violation_mean": sum(finite) / len(finite) if finite else None,
            "max_violation_per_layer": violations,
        }


class DivergenceCheck:
    """Counts skipped (non-finite) updates in a row; past ``limit`` the run stops, naming the step."""

    def __init__(self, limit: int, logger, newest_checkpoint: Callable[[], str]):
        self.limit, self.logger, self.newest_checkpoint = limit, logger, newest_checkpoint
        self.in_a_row = 0

    def on_step_end(self, state: TrainState) -> None:
        result = state.result
        if not result.skipped and math.isfinite(result.loss):
            self.in_a_row = 0
            return
        self.in_a_row += 1
        what = f"loss={result.loss}" + (f", grad_norm={result.grad_norm}" if result.grad_norm is not None else "")
        if self.in_a_row > self.limit:
            raise TrainingDivergedError(
                f"training diverged at step {state.step}: non-finite values ({what}) on {self.in_a_row} step(s) in a "
                f"row, more than train.skip_nonfinite_steps={self.limit}; no checkpoint was written from them; the "
                f"newest checkpoint is {self.newest_checkpoint()} (lower optim.lr or raise optim.warmup_steps and "
                f"resume from it)")
        self.logger.message(f"warning: step {state.step}: non-finite values ({what}): update skipped "
                            f"({self.in_a_row} in a row, at most {self.limit})")


class MetricsRecording:
    """A metrics.jsonl record every ``log_every`` steps, at the last step, and at every skipped step."""

    def __init__(self, logger, log_every: int, lr_scheduler, grad_norm_fallback: Callable[[], Optional[float]],
                 ctx, peak_flops: Optional[float], expert_dispatches: Sequence = ()):
        self.logger, self.log_every, self.lr_scheduler = logger, log_every, lr_scheduler
        self.grad_norm_fallback, self.ctx, self.peak_flops = grad_norm_fallback, ctx, peak_flops
        self.expert_dispatches = expert_dispatches
        self.window_all_to_all_bytes = 0

    def on_step_end(self, state: TrainState) -> None:
        result = state.result
        self.window_all_to_all_bytes += sum(d.take_bytes_sent() for d in self.expert_dispatches)
        if not (state.step % self.log_every == 0 or state.is_last_step or result.skipped):
            return
        elapsed = state.speed.seconds()
        steps = max(state.speed.steps, 1)
        tokens_per_s = state.tokens_per_step * steps / elapsed
        record = {
            "step": state.step,
            "loss": result.loss,
            "aux_loss": result.aux_loss,
            "lr": float(self.lr_scheduler.get_last_lr()[0]),
            "grad_norm": result.grad_norm if result.grad_norm is not None else self.grad_norm_fallback(),
            "tokens": state.tokens_seen,
            "flops": state.flops,
            "tokens_per_s": tokens_per_s,
            "step_time_s": elapsed / steps,
            "mfu": model_flops_utilization(state.flops_per_token, tokens_per_s, self.peak_flops, self.ctx.world_size),
        }
        if self.ctx.device.type == "cuda":  # this rank's high-water marks since the run started
            record["peak_memory_allocated_bytes"] = torch.cuda.max_memory_allocated(self.ctx.device)
            record["peak_memory_reserved_bytes"] = torch.cuda.max_memory_reserved(self.ctx.device)
        if result.skipped:
            record["skipped_update"] = True
        if state.moe_stats:
            record["moe"] = state.moe_stats
        if self.expert_dispatches:  # this rank's dispatch + combine traffic, forward and backward
            record["expert_all_to_all_bytes_per_step"] = self.window_all_to_all_bytes / steps
            self.window_all_to_all_bytes = 0
        self.logger.log(record)
        self.logger.progress(state.step, result.loss, tokens_per_s)
        state.speed.restart()


class Validation:
    """Validation loss per source (and its mixture-weighted mean) every ``val_every`` steps and at the end; the
    first batch also gives the AttnRes diagnostics on the non-pipelined path."""

    def __init__(self, engine, val_loader, val_every: int, val_batches: int, ctx, logger, pipelined: bool,
                 expert_dispatches: Sequence = ()):
        self.engine, self.val_loader, self.ctx, self.logger = engine, val_loader, ctx, logger
        self.val_every, self.val_batches, self.pipelined = val_every, val_batches, pipelined
        self.expert_dispatches = expert_dispatches

    def on_step_end(self, state: TrainState) -> None:
        due = self.val_every and (state.step % self.val_every == 0 or state.is_last_step)
        if not due or self.val_loader is None or self.val_batches <= 0:
            return
        per_source, diagnostics = (pipeline_validation_loss(self.engine, self.val_loader, self.ctx.device), None) \
            if self.pipelined else self._losses()
        if per_source:
            state.last_val = mixture_loss(per_source, self.val_loader)
            record = {"step": state.step, "tokens": state.tokens_seen, "flops": state.flops,
                      "val_loss": state.last_val}
            if len(per_source) > 1:
                record["val_loss_by_source"] = per_source
            if diagnostics is not None:
                record["sublayer_input_rms"] = diagnostics.sublayer_input_rms.tolist()
                if diagnostics.depth_weights:
                    weights = [w.tolist() for w in diagnostics.depth_weights]
                    record["attnres_depth_weights"] = weights
                    record["attnres_embedding_weight_mean"] = sum(w[0] for w in weights) / len(weights)
            self.logger.log(record)
            self.logger.message(f"step {state.step}: val_loss={state.last_val:.4f}")
        for dispatch in self.expert_dispatches:  # validation traffic is not a training step's
            dispatch.take_bytes_sent()
        state.speed.restart()

    def _losses(self) -> tuple[dict[str, float], Any]:
        engine, ctx = self.engine, self.ctx
        engine.eval()
        names = validation_source_names(self.val_loader)
        totals = torch.zeros(len(names), 2, dtype=torch.float64, device=ctx.device)  # [source, (loss sum, tokens)]
        diagnostics = None
        with torch.no_grad():
            for i, (name, batch) in enumerate(batches_by_source(self.val_loader)):
                batch = {k: v.to(ctx.device) for k, v in batch.items()}
                out = engine(batch["input_ids"], doc_ids=batch["doc_ids"], return_diagnostics=i == 0)
                n_tokens = int((batch["labels"] != IGNORE_INDEX).sum())
                totals[names.index(name), 0] += language_model_loss(out.logits, batch["labels"]).double() * n_tokens
                totals[names.index(name), 1] += n_tokens
                if i == 0:
                    diagnostics = out
        engine.train()
        ctx.all_reduce_sum_(totals)
        per_source = {name: float(totals[k, 0] / totals[k, 1]) for k, name in enumerate(names) if totals[k, 1] > 0}
        return per_source, diagnostics


class Checkpointing:
    """Every ``checkpoint_every`` steps, at the last step and when a stop signal reached any rank: a checkpoint,
    written only from finite weights."""

    def __init__(self, checkpoint_every: int, save: Callable[[TrainState], None], stop_signal: Callable[[], Optional[str]],
                 parameters: Callable[[], Any], ctx, newest_checkpoint: Callable[[], str]):
        self.checkpoint_every, self.save, self.stop_signal = checkpoint_every, save, stop_signal
        self.parameters, self.ctx, self.newest_checkpoint = parameters, ctx, newest_checkpoint

    def on_step_end(self, state: TrainState) -> None:
        state.stopped_by = self.stop_signal()
        periodic = self.checkpoint_every and state.step % self.checkpoint_every == 0
        if not (periodic or state.is_last_step or state.stopped_by):
            return
        if not weights_are_finite(self.parameters(), self.ctx.all_reduce_sum_, self.ctx.device):
            raise TrainingDivergedError(
                f"step {state.step}: the weights hold non-finite values, so no checkpoint was written; the newest "
                f"checkpoint is {self.newest_checkpoint()}")
        self.save(state)
        state.speed.restart()

