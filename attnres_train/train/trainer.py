"""The training loop: data -> DeepSpeed engine -> optimizer step -> MoE balancing -> metrics -> checkpoints.

Exact resume: a checkpoint holds model, optimizer and LR-schedule state (DeepSpeed) plus, in client_state, the
step, tokens seen, the training loader's position, every RNG state and the model config with its fingerprint.
Checkpoints are only taken between optimizer steps, where the MoE load counters are empty, so restoring this
state continues the run as if it had never stopped.
"""

from __future__ import annotations

import json
import logging
import math
import os
import signal
import time
from pathlib import Path
from typing import Any, Optional

import torch
import torch.nn.functional as F

from attnres_train.data import build_loaders, build_tokenizer
from attnres_train.data.config import DataConfig
from attnres_train.model import ModelConfig, build_model
from attnres_train.model.accounting import describe

from .checkpoint import (
    FINGERPRINT_KEY,
    read_checkpoint_file,
    MODEL_CONFIG_KEY,
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
    validate_logger,
    validate_parallel,
    validate_train,
)
from .engine import DistributedContext, deepspeed_config, initialize_engine, resolve_precision, setup_distributed
from .metrics import MetricsLogger, model_flops_utilization, peak_flops_per_device
from .optim import OptimConfig, build_optimizer, param_group_names
from .pipelined import (
    batches_by_source,
    build_stage_module,
    mixture_loss,
    clip_by_global_norm,
    needs_own_clipping,
    pipeline_batches,
    pipeline_traffic,
    pipeline_validation_loss,
    validation_source_names,
)
from .reshard import OPTIMIZER_NAMES_KEY, layout_changes, model_names
from .rng import capture_rng_state, restore_rng_state
from .run_state import (
    FAILED_NAME,
    FINISHED_NAME,
    RESOLVED_CONFIG_NAME,
    clear_marker,
    config_key,
    is_finished_with,
    write_json_atomic,
)
from .schedule import build_lr_scheduler

_log = logging.getLogger(__name__)

IGNORE_INDEX = -100


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


def language_model_loss(logits_BTV: torch.Tensor, labels_BT: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(
        logits_BTV.float().reshape(-1, logits_BTV.shape[-1]), labels_BT.reshape(-1), ignore_index=IGNORE_INDEX
    )


def _typed(section: Any, cls):
    from omegaconf import DictConfig, OmegaConf

    if isinstance(section, cls):
        return section
    if isinstance(section, DictConfig):
        section = OmegaConf.to_container(section, resolve=True)
    return cls(**section)


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
        train = self.train_cfg
        if train.num_threads:
            torch.set_num_threads(train.num_threads)
        ctx = setup_distributed(self.parallel_cfg, train)
        precision = resolve_precision(train, ctx.device)
        stages = self.parallel_cfg.pipeline_stages
        if ctx.world_size % stages:
            raise RunConfigError(
                f"parallel.pipeline_stages={stages}: must divide the number of processes ({ctx.world_size})"
            )
        # DeepSpeed's pipe x data topology numbers ranks data-fastest: rank = stage * dp_world + dp_rank.
        dp_world, dp_rank = ctx.world_size // stages, ctx.rank % (ctx.world_size // stages)
        self._check_expert_parallel(dp_world, precision)

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

        checkpoints = CheckpointManager(
            self.run_dir / "checkpoints",
            keep_last=train.keep_checkpoints,
            rank=ctx.rank,
            world_size=ctx.world_size,
            barrier=ctx.barrier,
        )
        resume_tag, resume_marker = self._resume_target(checkpoints)

        torch.manual_seed(train.seed)
        model = build_model(self.model_cfg)
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
        flops_per_token = accounting["train_flops_per_token"]
        tokens_per_step = train.micro_batch_size * train.grad_accum_steps * dp_world * self.data_cfg.seq_len
        total_steps = target_steps(train, flops_per_token, tokens_per_step)
        expert_group, expert_rank, expert_dispatches = self._shard_experts(model)
        trained_module, moe_layers = model, model.moe_layers()
        if stages > 1:
            trained_module = build_stage_module(
                model, self.parallel_cfg, self.data_cfg.seq_len, train.activation_checkpointing
            )
            from attnres_train.parallel.pipeline import local_moe_layers

            moe_layers = local_moe_layers(trained_module)
        optimizer = build_optimizer(trained_module, self.optim_cfg)
        lr_scheduler = build_lr_scheduler(optimizer, self.optim_cfg, total_steps=total_steps)
        own_clipping = needs_own_clipping(self.parallel_cfg, precision)
        grad_clip = 0.0 if own_clipping else self.optim_cfg.grad_clip
        ds_config = deepspeed_config(train, self.parallel_cfg, grad_clip, precision, dp_world)
        engine = initialize_engine(trained_module, optimizer, lr_scheduler, ds_config)
        dp_group = engine.grid.get_data_parallel_group() if stages > 1 else None
        own_grad_norm = None
        if own_clipping:
            own_grad_norm = clip_by_global_norm(
                engine.optimizer, trained_module, self.optim_cfg.grad_clip,
                pipe_group=engine.grid.get_pipe_parallel_group() if stages > 1 else None, expert_group=expert_group)

        step, tokens_seen = 0, 0
        layout = self._layout(precision, dp_world, trained_module)
        if resume_tag is not None:
            restore = None
            changes = layout_changes(resume_marker, layout, checkpoints.root_dir / resume_tag)
            if changes:  # saved under another layout: read it back by parameter name
                _log.warning("checkpoint %s was saved under another parallel layout (%s): resuming it by parameter "
                             "name", checkpoints.root_dir / resume_tag, "; ".join(changes))
                restore = self._layout_change_restore(int(resume_marker.get("pipeline_stages") or 1), stages,
                                                      int(resume_marker.get("expert_parallel") or 1), expert_rank)
            client_state = checkpoints.load(engine, tag=resume_tag, restore=restore)
            if expert_dispatches and not changes:  # DeepSpeed gave every rank rank 0's expert slice
                from attnres_train.parallel.expert_parallel import load_expert_shard

                load_expert_shard(checkpoints.root_dir / resume_tag, engine.module, self.parallel_cfg.expert_parallel,
                                  expert_rank, lambda name: name, read_checkpoint_file)
            step = int(client_state["step"])
            tokens_seen = int(client_state["tokens_seen"])
            train_loader.load_state_dict(client_state["train_loader"])
            rank_state = checkpoints.load_rank_state(resume_tag)
            if rank_state is not None:  # absent when resuming on more ranks than saved
                restore_rng_state(rank_state["rng"])
        peak = peak_flops_per_device(ctx.device, train.peak_flops)
        if ctx.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            if resume_tag is not None:
                _supersede_metrics_after(self.run_dir / "metrics.jsonl", step)
            summary = {**accounting, "tokens_per_step": tokens_per_step, "total_steps": total_steps,
                       "flops_budget": train.flops_budget}
            if stages > 1:
                summary["pipeline"] = pipeline_traffic(
                    model, self.parallel_cfg, self.data_cfg.seq_len, train.micro_batch_size, precision
                )
            (self.run_dir / "model_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
            _write_resolved_config(self.run_dir / RESOLVED_CONFIG_NAME, self.resolved_config)
            clear_marker(self.run_dir, FAILED_NAME)
            if step < total_steps:  # a finished run being extended is unfinished again until it ends
                clear_marker(self.run_dir, FINISHED_NAME)
        logger = MetricsLogger(
            self.run_dir,
            self.logger_cfg,
            ctx.is_main,
            total_steps=total_steps,
            start_step=step,
            progress_bar=train.progress_bar,
            resolved_config=self.resolved_config,
        )
        logger.message(
            f"run_dir={self.run_dir} device={ctx.device} world_size={ctx.world_size} precision={precision} "
            f"params={accounting['total_parameters']:,} active={accounting['active_parameters']:,} "
            f"layers={accounting['layer_pattern']} steps={total_steps}"
            + (f" flops_budget={train.flops_budget:.4g}" if train.flops_budget else "")
            + (f" resumed_from={resume_tag} step={step}" if resume_tag is not None else "")
        )

        stop = StopRequested()
        stop.install()
        last_loss = float("nan")
        last_val: Optional[float] = None
        stopped_by: Optional[str] = None
        try:
            window_start = time.perf_counter()
            window_steps = 0
            window_all_to_all_bytes = 0
            train_batches = pipeline_batches(train_loader, ctx.device)
            while step < total_steps:
                engine.train()
                step_loss, step_aux, grad_norm = 0.0, 0.0, None
                if stages > 1:
                    # The pipeline loss already contains the MoE aux losses carried across the stages.
                    step_loss = float(engine.train_batch(data_iter=train_batches))
                    grad_norm = own_grad_norm() if own_grad_norm is not None else None
                else:
                    for _ in range(train.grad_accum_steps):
                        batch = {k: v.to(ctx.device, non_blocking=True) for k, v in next(train_loader).items()}
                        out = engine(batch["input_ids"], doc_ids=batch["doc_ids"])
                        lm_loss = language_model_loss(out.logits, batch["labels"])
                        engine.backward(lm_loss + out.aux_loss)
                        if engine.is_gradient_accumulation_boundary():
                            grad_norm = _unclipped_grad_norm_if_untracked(engine)
                        engine.step()
                        step_loss += lm_loss.item() / train.grad_accum_steps
                        step_aux += float(out.aux_loss.item()) / train.grad_accum_steps
                    if own_grad_norm is not None:
                        grad_norm = own_grad_norm()
                step += 1
                window_all_to_all_bytes += sum(d.take_bytes_sent() for d in expert_dispatches)
                tokens_seen += tokens_per_step
                window_steps += 1
                moe_stats = self._update_moe_balance(moe_layers, ctx, dp_group)
                last_loss = ctx.mean_over_ranks(step_loss)

                if step % train.log_every == 0 or step == total_steps:
                    elapsed = time.perf_counter() - window_start
                    tokens_per_s = tokens_per_step * window_steps / max(elapsed, 1e-9)
                    record = {
                        "step": step,
                        "loss": last_loss,
                        "aux_loss": ctx.mean_over_ranks(step_aux),
                        "lr": float(lr_scheduler.get_last_lr()[0]),
                        "grad_norm": grad_norm if grad_norm is not None else _grad_norm(engine),
                        "tokens": tokens_seen,
                        "flops": tokens_seen * flops_per_token,
                        "tokens_per_s": tokens_per_s,
                        "step_time_s": elapsed / window_steps,
                        "mfu": model_flops_utilization(flops_per_token, tokens_per_s, peak, ctx.world_size),
                    }
                    if moe_stats:
                        record["moe"] = moe_stats
                    if expert_dispatches:  # this rank's dispatch + combine traffic, forward and backward
                        record["expert_all_to_all_bytes_per_step"] = window_all_to_all_bytes / window_steps
                        window_all_to_all_bytes = 0
                    logger.log(record)
                    logger.progress(step, last_loss, tokens_per_s)
                    window_start, window_steps = time.perf_counter(), 0

                validation_due = train.val_every and (step % train.val_every == 0 or step == total_steps)
                if validation_due and val_loader is not None and train.val_batches > 0:
                    if stages > 1:
                        per_source = pipeline_validation_loss(engine, val_loader, ctx.device)
                        if per_source:
                            last_val = mixture_loss(per_source, val_loader)
                            record = {"step": step, "tokens": tokens_seen, "flops": tokens_seen * flops_per_token,
                                      "val_loss": last_val}
                            if len(per_source) > 1:
                                record["val_loss_by_source"] = per_source
                            logger.log(record)
                            logger.message(f"step {step}: val_loss={last_val:.4f}")
                    else:
                        last_val = self._validate(
                            engine, model, val_loader, ctx, logger, step, tokens_seen, tokens_seen * flops_per_token
                        )
                    window_start = time.perf_counter()
                    window_steps = 0
                    for dispatch in expert_dispatches:  # validation traffic is not a training step's
                        dispatch.take_bytes_sent()

                stopped_by = self._agreed_stop(stop, ctx)
                periodic = train.checkpoint_every and step % train.checkpoint_every == 0
                if periodic or step == total_steps or stopped_by:
                    self._save(checkpoints, engine, ctx, step, tokens_seen, train_loader, layout, expert_rank)
                    window_start = time.perf_counter()
                    window_steps = 0
                if stopped_by:
                    logger.message(f"received {stopped_by}: checkpoint saved at step {step}, exiting")
                    break
        finally:
            stop.uninstall()
            logger.close()
        result = {
            "step": step,
            "total_steps": total_steps,
            "tokens": tokens_seen,
            "flops": tokens_seen * flops_per_token,
            "loss": last_loss,
            "val_loss": last_val,
            "stopped_by": stopped_by,
        }
        key = config_key(self.resolved_config)
        # A re-launch of a finished run trains nothing; its marker (with the real final losses) stays as it was.
        if ctx.is_main and step >= total_steps and not stopped_by and not is_finished_with(self.run_dir, key):
            write_json_atomic(self.run_dir / FINISHED_NAME, {**result, "config_key": key})
        return result

    # ------------------------------------------------------------------------------------------------
    def _resume_target(self, checkpoints: CheckpointManager) -> tuple[Optional[str], dict]:
        """The tag to resume from (None: start fresh) and its marker, once the model config is known to match."""
        mode = self.train_cfg.resume
        if mode == "never":
            return None, {}
        if mode == "auto":
            latest = checkpoints.latest()
            tag = latest[0] if latest is not None else None
        else:
            tag = self._explicit_resume_tag(checkpoints, mode)
        if tag is None:
            return None, {}
        marker = checkpoints.read_marker(tag) or {}
        saved_model_cfg = marker.get(MODEL_CONFIG_KEY)
        # Nested under "model" so the differing fields are named as on the command line (model.hidden_size).
        validate_fingerprint(
            {
                FINGERPRINT_KEY: marker.get("config_fingerprint"),
                MODEL_CONFIG_KEY: {"model": saved_model_cfg} if isinstance(saved_model_cfg, dict) else None,
            },
            config_fingerprint(self.model_cfg.to_dict()),
            current_model_config={"model": self.model_cfg.to_dict()},
        )
        return tag, marker

    def _layout(self, precision: str, dp_world: int, trained_module) -> dict:
        """This run's parallel layout, in the terms checkpoints record (``reshard.layout_changes``)."""
        stages = self.parallel_cfg.pipeline_stages
        return {"pipeline_stages": stages, "pipeline_parts": list(trained_module.parts) if stages > 1 else None,
                "zero_stage": self.parallel_cfg.zero_stage, "precision": precision, "data_parallel": dp_world,
                "optimizer": self.optim_cfg.name, "expert_parallel": self.parallel_cfg.expert_parallel}

    def _check_expert_parallel(self, dp_world: int, precision: str) -> None:
        experts = self.parallel_cfg.expert_parallel
        if experts == 1:
            return
        field = f"parallel.expert_parallel={experts}"
        if "moe" not in self.model_cfg.mlp_kinds():
            raise RunConfigError(f"{field}: the model has no MoE layers (model.mlp={self.model_cfg.mlp!r}, a dense "
                                 "preset); expert parallelism needs an MoE model or parallel.expert_parallel=1")
        if self.model_cfg.num_experts % experts:
            raise RunConfigError(f"{field}: must divide model.num_experts={self.model_cfg.num_experts}")
        if dp_world % experts:
            raise RunConfigError(f"{field}: must divide the data-parallel degree ({dp_world} ranks)")
        if precision == "bf16" and self.parallel_cfg.zero_stage == 0:
            raise RunConfigError(f"{field} with train.precision=bf16 and parallel.zero_stage=0: DeepSpeed's bf16 "
                                 "optimizer without ZeRO mis-counts expert gradient norms; use parallel=zero1 or zero2")

    def _shard_experts(self, model) -> tuple:
        """Expert parallelism: keep this rank's expert slices, install the all-to-all dispatch and tag the model
        for DeepSpeed; returns ``(expert-parallel group, rank in it, dispatches)`` (None, 0, [] without it)."""
        experts = self.parallel_cfg.expert_parallel
        if experts == 1:
            return None, 0, []
        from attnres_train.parallel import expert_parallel

        group, rank = expert_parallel.create_expert_groups(experts)
        dispatches = expert_parallel.shard_experts(model, experts, rank, group)
        expert_parallel.mark_expert_parameters(model, experts)
        model.add_module("expert_parallel_marker",
                         expert_parallel.deepspeed_moe_marker(self.model_cfg.num_experts, experts))
        return group, rank, dispatches

    def _expert_shard_files(self, engine, expert_rank: int) -> dict:
        """The expert slice this rank saves (the first replica of each slice saves it)."""
        experts = self.parallel_cfg.expert_parallel
        if experts == 1:
            return {}
        from attnres_train.parallel import expert_parallel

        if expert_parallel.expert_data_parallel_rank(experts) != 0:
            return {}
        return {expert_parallel.shard_file_name(expert_rank, experts):
                expert_parallel.expert_shard_state(engine.module, lambda name: name)}

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

    @staticmethod
    @torch.no_grad()
    def _update_moe_balance(layers: list, ctx: DistributedContext, dp_group=None) -> dict:
        """Once per optimizer step: every rank updates the expert biases of its MoE layers from the load seen by
        all data-parallel replicas of those layers (``dp_group``: the replicas of this pipeline stage)."""
        if not layers:
            return {}
        violations = []
        for moe in layers:
            counts = moe.tokens_per_expert.detach().clone().to(ctx.device)
            if dp_group is not None:
                torch.distributed.all_reduce(counts, group=dp_group)
            else:
                ctx.all_reduce_sum_(counts)
            stats = moe.update_expert_bias(counts)
            violations.append(float(stats.get("max_violation", float("nan"))))
        finite = [v for v in violations if math.isfinite(v)]
        return {
            "max_violation_mean": sum(finite) / len(finite) if finite else None,
            "max_violation_per_layer": violations,
        }

    def _validate(self, engine, model, val_loader, ctx, logger, step, tokens_seen, flops) -> Optional[float]:
        engine.eval()
        names = validation_source_names(val_loader)
        totals = torch.zeros(len(names), 2, dtype=torch.float64, device=ctx.device)  # [source, (loss sum, tokens)]
        diagnostics = None
        with torch.no_grad():
            for i, (name, batch) in enumerate(batches_by_source(val_loader)):
                batch = {k: v.to(ctx.device) for k, v in batch.items()}
                want_diag = i == 0
                out = engine(batch["input_ids"], doc_ids=batch["doc_ids"], return_diagnostics=want_diag)
                n_tokens = int((batch["labels"] != IGNORE_INDEX).sum())
                totals[names.index(name), 0] += language_model_loss(out.logits, batch["labels"]).double() * n_tokens
                totals[names.index(name), 1] += n_tokens
                if want_diag:
                    diagnostics = out
        engine.train()
        ctx.all_reduce_sum_(totals)
        per_source = {name: float(totals[k, 0] / totals[k, 1]) for k, name in enumerate(names) if totals[k, 1] > 0}
        if not per_source:
            return None
        val_loss = mixture_loss(per_source, val_loader)
        record = {"step": step, "tokens": tokens_seen, "flops": flops, "val_loss": val_loss}
        if len(per_source) > 1:
            record["val_loss_by_source"] = per_source
        if diagnostics is not None:
            record["sublayer_input_rms"] = diagnostics.sublayer_input_rms.tolist()
            if diagnostics.depth_weights:
                weights = [w.tolist() for w in diagnostics.depth_weights]
                record["attnres_depth_weights"] = weights
                record["attnres_embedding_weight_mean"] = sum(w[0] for w in weights) / len(weights)
        logger.log(record)
        logger.message(f"step {step}: val_loss={val_loss:.4f}")
        return val_loss


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

    tmp = path.with_name(path.name + ".tmp")
    OmegaConf.save(OmegaConf.create(resolved_config), tmp)
    os.replace(tmp, path)


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
    tmp = path.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(line + "\n" for line in keep), encoding="utf-8")
    os.replace(tmp, path)
