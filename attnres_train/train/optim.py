"""Optimizer construction: the ``optim`` config group, parameter grouping, AdamW and Muon(+AdamW).

Parameter groups (every trainable parameter lands in exactly one):

- ``muon``: hidden weight matrices, optimised by Muon when ``optim.name=muon``. These are 2-D matmul weights
  (``nn.Linear`` weights inside the decoder: q/k/v/o projections, MLP and router weights) and stacked 3-D
  expert weights ``[E, in, out]``, which Muon treats as E independent matrices. With ``optim.name=adamw``
  this group is empty and its parameters join ``adamw_decay``.
- ``adamw_decay``: everything else that takes weight decay: token embeddings, the LM head (never Muon, as in
  Moonlight / Kimi), convolution filters.
- ``adamw_no_decay``: parameters weight decay would only hurt: norm weights (module class or attribute name
  contains "norm"), biases (``bias`` or ``*_bias``, e.g. ``dt_bias``), every 1-D parameter, AttnRes
  pseudo-queries (names matching ``attn_?res.*quer(y|ies)``, or parameters of a module flagged ``_is_attnres_proj`` as
  fla does) and any parameter carrying ``_no_weight_decay = True`` (fla marks ``A_log`` and ``dt_bias`` so).
  Buffers (the MoE ``expert_bias``) are not parameters and are never optimised.

DeepSpeed takes one optimizer object, so Muon and AdamW are held together by ``CompositeOptimizer``, whose
``param_groups`` is the concatenation of both optimizers' groups (the same dict objects), so an LR scheduler or
DeepSpeed setting ``group["lr"]`` reaches the optimizer that owns the group.

DeepSpeed compatibility of the Muon composite: it needs DeepSpeed to hand the optimizer the real, shaped
parameters. That holds for ZeRO stage 0 in fp32 (DeepSpeed uses the client optimizer as is) and in bf16 (its
unfused bf16 wrapper keeps one fp32 master copy per parameter). ZeRO stages 1-3 and the ZeRO-1 bf16 optimizer
replace each group's parameters by one flat 1-D partition: Muon cannot run on that, and ``StackedMuon.step``
raises an error saying so. DeepSpeed's own ``"optimizer": {"type": "Muon"}`` is the ZeRO-compatible route.

Tensor-name legend: E = experts stacked in one parameter.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import re
from collections import defaultdict
from dataclasses import dataclass
from typing import Any, Iterable, Optional, Sequence, Tuple

import torch
from torch import nn

from attnres_train.schema import section_from_mapping

OPTIMIZER_NAMES = ("adamw", "muon")
SCHEDULES = ("wsd", "cosine", "constant")
DECAY_SHAPES = ("linear", "sqrt", "cosine")
MUON_ADJUST_LR = ("match_rms_adamw", "original")
GROUP_NAMES = ("muon", "adamw_decay", "adamw_no_decay")
# AttnRes pseudo-queries: attnres/attn_res ... query/queries (e.g. layers.3.mlp_attnres.query)
ATTNRES_QUERY_PATTERN = re.compile(r"attn_?res.*quer(y|ies)")


class OptimConfigError(ValueError):
    """An optim config field has an impossible value; the message names the field."""


@dataclass
class OptimConfig:
    # --- optimizer -----------------------------------------------------------------------------------
    name: str = "adamw"  # adamw: AdamW on every parameter | muon: Muon on hidden matrices, AdamW on the rest
    lr: float = 1.0e-3  # peak learning rate of the AdamW groups (and of Muon when muon_lr is null)
    min_lr_ratio: float = 0.1  # the schedule decays to min_lr_ratio * peak lr (per group)
    weight_decay: float = 0.1  # decoupled weight decay of the decay groups (AdamW and Muon); 0 disables
    betas: Tuple[float, float] = (0.9, 0.95)  # AdamW (beta1, beta2)
    eps: float = 1.0e-8  # AdamW epsilon

    # --- Muon (torch.optim.Muon's update rule; used when name=muon) ---------------------------------------
    muon_lr: Optional[float] = None  # peak lr of the Muon group; null: same as lr (sensible with match_rms_adamw)
    muon_momentum: float = 0.95
    muon_nesterov: bool = True
    muon_ns_steps: int = 5  # Newton-Schulz iterations per update (torch allows 1..99)
    # match_rms_adamw: scale the update to AdamW's RMS (0.2 * sqrt(max(rows, cols))), as Moonlight/Kimi do, so
    # AdamW's lr and weight decay carry over | original: Keller Jordan's sqrt(max(1, rows / cols))
    muon_adjust_lr: str = "match_rms_adamw"

    # --- learning-rate schedule (see attnres_train/train/schedule.py) -------------------------------------
    schedule: str = "wsd"  # wsd (warmup-stable-decay) | cosine | constant (after warmup)
    warmup_steps: int = 50  # linear warmup: the k-th update (k = 1..warmup_steps) uses k / warmup_steps * peak
    decay_fraction: float = 0.2  # wsd: the last round(decay_fraction * total_steps) updates decay to the minimum
    decay_shape: str = "sqrt"  # wsd decay curve: linear | sqrt (1 - sqrt, Haegele et al. 2024) | cosine

    # --- gradient clipping (applied by DeepSpeed's "gradient_clipping") -----------------------------------
    grad_clip: float = 1.0  # max global gradient L2 norm; 0 disables

    # ------------------------------------------------------------------------------------------------
    @classmethod
    def from_mapping(cls, cfg: Any) -> "OptimConfig":
        """Build from a DictConfig, a dict or an OptimConfig; unknown keys are an error naming the key."""
        out = section_from_mapping(cls, cfg, "optim", OptimConfigError)
        if isinstance(out.betas, (list, tuple)):
            out.betas = tuple(out.betas)  # OmegaConf hands tuples over as lists
        out.validate()
        return out

    def validate(self) -> None:
        """Raise ``OptimConfigError`` naming the first field that has an impossible value."""

        def need(cond: bool, name: str, expected: str) -> None:
            if not cond:
                raise OptimConfigError(f"optim.{name}={getattr(self, name)!r}: expected {expected}")

        need(self.name in OPTIMIZER_NAMES, "name", f"one of {OPTIMIZER_NAMES}")
        need(_is_real(self.lr) and self.lr > 0, "lr", "a positive float")
        need(_is_real(self.min_lr_ratio) and 0 <= self.min_lr_ratio <= 1, "min_lr_ratio", "a float in [0, 1]")
        need(_is_real(self.weight_decay) and self.weight_decay >= 0, "weight_decay", "a float >= 0")
        need(
            isinstance(self.betas, (list, tuple))
            and len(self.betas) == 2
            and all(_is_real(b) and 0 <= b < 1 for b in self.betas),
            "betas",
            "two floats in [0, 1), e.g. [0.9, 0.95]",
        )
        need(_is_real(self.eps) and self.eps > 0, "eps", "a positive float")
        need(
            self.muon_lr is None or (_is_real(self.muon_lr) and self.muon_lr > 0), "muon_lr", "null or a positive float"
        )
        need(_is_real(self.muon_momentum) and 0 <= self.muon_momentum < 1, "muon_momentum", "a float in [0, 1)")
        need(isinstance(self.muon_nesterov, bool), "muon_nesterov", "true or false")
        need(_is_int(self.muon_ns_steps) and 1 <= self.muon_ns_steps < 100, "muon_ns_steps", "an integer in [1, 99]")
        need(self.muon_adjust_lr in MUON_ADJUST_LR, "muon_adjust_lr", f"one of {MUON_ADJUST_LR}")
        need(self.schedule in SCHEDULES, "schedule", f"one of {SCHEDULES}")
        need(_is_int(self.warmup_steps) and self.warmup_steps >= 0, "warmup_steps", "an integer >= 0")
        need(_is_real(self.decay_fraction) and 0 <= self.decay_fraction <= 1, "decay_fraction", "a float in [0, 1]")
        need(self.decay_shape in DECAY_SHAPES, "decay_shape", f"one of {DECAY_SHAPES}")
        need(_is_real(self.grad_clip) and self.grad_clip >= 0, "grad_clip", "a float >= 0 (0 disables clipping)")
        if self.name == "muon":
            missing = _missing_muon_reason()
            need(missing is None, "name", f"'adamw', because Muon is unavailable: {missing}")

    @property
    def peak_muon_lr(self) -> float:
        return self.lr if self.muon_lr is None else self.muon_lr

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _is_real(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _missing_muon_reason() -> Optional[str]:
    """None when torch ships Muon (class and functional update, torch >= 2.9), else why not."""
    if not hasattr(torch.optim, "Muon"):
        return f"torch {torch.__version__} has no torch.optim.Muon (added in torch 2.9)"
    try:
        from torch.optim._muon import muon  # noqa: F401
    except ImportError as exc:
        return f"torch {torch.__version__} lacks the functional Muon update torch.optim._muon.muon ({exc})"
    return None


# ----------------------------------------------------------------------------------------------------
# Parameter grouping
# ----------------------------------------------------------------------------------------------------


def _named_params_with_owner(model: nn.Module) -> Iterable[tuple[str, nn.Module, nn.Parameter]]:
    """(qualified name, owning module, parameter) for each distinct trainable parameter, in
    ``model.named_parameters()`` order; a tied parameter appears once, under its first name."""
    seen: set[int] = set()
    for module_name, module in model.named_modules():
        for leaf_name, param in module.named_parameters(recurse=False):
            if id(param) in seen:
                continue
            seen.add(id(param))
            if param.requires_grad:
                yield (f"{module_name}.{leaf_name}" if module_name else leaf_name), module, param


def _skips_weight_decay(name: str, module: nn.Module, param: nn.Parameter) -> bool:
    segments = name.lower().split(".")
    leaf = segments[-1]
    return (
        param.ndim < 2
        or bool(getattr(param, "_no_weight_decay", False))
        or "norm" in type(module).__name__.lower()
        or any("norm" in segment for segment in segments[:-1])
        or leaf == "bias"
        or leaf.endswith("_bias")
        or ATTNRES_QUERY_PATTERN.search(name.lower()) is not None
        or bool(getattr(module, "_is_attnres_proj", False))
    )


def _is_embedding_or_head(name: str, module: nn.Module) -> bool:
    module_segments = name.lower().split(".")[:-1]
    return isinstance(module, nn.Embedding) or any("embed" in s or s == "lm_head" for s in module_segments)


def _is_hidden_matrix(param: nn.Parameter) -> bool:
    """A matrix Muon can orthogonalise: 2-D, or 3-D stacked [E, in, out], with no dimension of size 1
    (orthogonalising a vector only normalises it)."""
    if param.ndim == 2:
        return min(param.shape) > 1
    if param.ndim == 3:
        return min(param.shape[1:]) > 1
    return False


def _assign_groups(model: nn.Module, cfg: OptimConfig) -> dict[str, list[tuple[str, nn.Parameter]]]:
    groups: dict[str, list[tuple[str, nn.Parameter]]] = {g: [] for g in GROUP_NAMES}
    for name, module, param in _named_params_with_owner(model):
        if _skips_weight_decay(name, module, param):
            groups["adamw_no_decay"].append((name, param))
        elif (
            cfg.name == "muon"
            and not _is_embedding_or_head(name, module)
            and not isinstance(module, nn.modules.conv._ConvNd)  # depthwise short-conv filters are not matmuls
            and _is_hidden_matrix(param)
        ):
            groups["muon"].append((name, param))
        else:
            groups["adamw_decay"].append((name, param))
    return groups


def describe_param_groups(model: nn.Module, cfg: OptimConfig) -> dict[str, list[str]]:
    """Parameter names per group (keys ``muon``, ``adamw_decay``, ``adamw_no_decay``; a group may be empty),
    for logging and tests. Frozen parameters are left out."""
    return {group: [name for name, _ in members] for group, members in _assign_groups(model, cfg).items()}


def param_group_names(model: nn.Module, cfg: OptimConfig) -> list[list[str]]:
    """The parameter names of each group ``build_optimizer(model, cfg)`` creates, in its ``param_groups``
    order (what a torch optimizer's ``state_dict`` numbers ``0..N-1``); checkpoints record it so optimizer state
    can be matched by name when a run resumes under another layout."""
    assigned = _assign_groups(model, cfg)
    return [[name for name, _ in members] for group in GROUP_NAMES for members in _expert_split(assigned[group])]


def _is_expert_param(param: nn.Parameter) -> bool:
    # DeepSpeed's marking of expert-parallel parameters (attnres_train.parallel.expert_parallel).
    return getattr(param, "allreduce", True) is False


def _expert_split(members: list[tuple[str, nn.Parameter]]) -> list[list[tuple[str, nn.Parameter]]]:
    """A group's members as [shared, expert-parallel] sub-lists (empty ones left out): DeepSpeed reduces and
    partitions an expert-parallel group over its expert-data-parallel ranks, so the two may not share a group."""
    shared = [(n, p) for n, p in members if not _is_expert_param(p)]
    expert = [(n, p) for n, p in members if _is_expert_param(p)]
    return [part for part in (shared, expert) if part]


# ----------------------------------------------------------------------------------------------------
# Optimizers
# ----------------------------------------------------------------------------------------------------


class StackedMuon(torch.optim.Optimizer):
    """torch's Muon update (``torch.optim._muon.muon``, the function behind ``torch.optim.Muon.step``) for 2-D
    weights and, one expert at a time, for stacked expert weights ``[E, in, out]``.

    ``torch.optim.Muon`` rejects anything that is not 2-D. A stacked expert tensor is E independent matrices, so
    each slice gets its own Newton-Schulz orthogonalisation and its own slice of the momentum buffer (state
    ``momentum_buffer`` has the parameter's full shape). Slices are viewed as ``[out, in]`` (``W_e.mT``) so the
    shape-dependent lr adjustment sees the same orientation as an ``nn.Linear`` weight. On 2-D parameters the
    result is exactly ``torch.optim.Muon``'s. The per-expert loop issues E small Newton-Schulz runs per tensor:
    fine for tens of experts; hundreds would want a batched iteration.
    """

    def __init__(
        self,
        params: Any,
        lr: float,
        weight_decay: float,
        momentum: float = 0.95,
        nesterov: bool = True,
        ns_steps: int = 5,
        adjust_lr_fn: str = "match_rms_adamw",
    ) -> None:
        missing = _missing_muon_reason()
        if missing is not None:
            raise RuntimeError(missing)
        if adjust_lr_fn not in MUON_ADJUST_LR:
            raise ValueError(f"adjust_lr_fn={adjust_lr_fn!r}: expected one of {MUON_ADJUST_LR}")
        # The constants this project does not expose are whatever torch.optim.Muon defaults to.
        torch_defaults = inspect.signature(torch.optim.Muon.__init__).parameters
        defaults = {
            "lr": lr,
            "weight_decay": weight_decay,
            "momentum": momentum,
            "nesterov": nesterov,
            "ns_coefficients": tuple(torch_defaults["ns_coefficients"].default),
            "eps": torch_defaults["eps"].default,
            "ns_steps": ns_steps,
            "adjust_lr_fn": adjust_lr_fn,
        }
        super().__init__(params, defaults)
        for group in self.param_groups:
            for p in group["params"]:
                if p.ndim not in (2, 3):
                    raise ValueError(
                        f"StackedMuon optimises 2-D weights or stacked [E, in, out] expert weights; got a parameter "
                        f"of shape {tuple(p.shape)}"
                    )

    @torch.no_grad()
    def step(self, closure=None):  # type: ignore[override]
        """One Muon update of every parameter that has a gradient."""
        from torch.optim._muon import muon

        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            matrices, grads, buffers = [], [], []
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.ndim not in (2, 3) or p.grad.shape != p.shape:
                    raise RuntimeError(
                        f"Muon received a parameter of shape {tuple(p.shape)} (gradient {tuple(p.grad.shape)}): "
                        "it needs the model's 2-D / 3-D weights. DeepSpeed ZeRO stages >= 1 (and its ZeRO-1 bf16 "
                        "optimizer) hand the optimizer flat 1-D partitions; use optim.name=adamw there, ZeRO stage 0, "
                        "or DeepSpeed's own Muon optimizer."
                    )
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                buf = state["momentum_buffer"]
                if p.ndim == 2:
                    matrices.append(p)
                    grads.append(p.grad)
                    buffers.append(buf)
                else:
                    for e in range(p.shape[0]):
                        matrices.append(p[e].mT)
                        grads.append(p.grad[e].mT)
                        buffers.append(buf[e].mT)
            if not matrices:
                continue
            muon(
                matrices,
                grads,
                buffers,
                lr=group["lr"],
                weight_decay=group["weight_decay"],
                momentum=group["momentum"],
                nesterov=group["nesterov"],
                ns_coefficients=group["ns_coefficients"],
                ns_steps=group["ns_steps"],
                eps=group["eps"],
                adjust_lr_fn=group["adjust_lr_fn"],
                has_complex=False,
            )
        return loss


class CompositeOptimizer(torch.optim.Optimizer):
    """Several optimizers over disjoint parameters, presented as one ``torch.optim.Optimizer``.

    ``param_groups`` is the concatenation of the inner optimizers' groups (the same dict objects, so setting a
    group's ``lr`` reaches its owner) and ``state`` is one dict shared by all of them. ``step``/``zero_grad`` act
    on every inner optimizer; ``state_dict`` is torch's standard format over the concatenated groups, and
    ``load_state_dict`` hands each inner optimizer its own slice so its class-specific loading runs.
    """

    def __init__(self, optimizers: Sequence[torch.optim.Optimizer]) -> None:
        optimizers = list(optimizers)
        if not optimizers:
            raise ValueError("CompositeOptimizer needs at least one optimizer")
        for opt in optimizers:
            if any(len(g["params"]) == 0 for g in opt.param_groups):
                # DeepSpeed drops empty groups from the outer list only, which would misalign the slices.
                raise ValueError(f"CompositeOptimizer: {type(opt).__name__} has an empty parameter group")
        self.optimizers = optimizers
        self._group_counts = [len(opt.param_groups) for opt in optimizers]
        self._initialised = False
        super().__init__([g for opt in optimizers for g in opt.param_groups], defaults={})
        self._initialised = True
        self._share_state()

    def _share_state(self) -> None:
        shared: defaultdict = defaultdict(dict)
        for opt in self.optimizers:
            shared.update(opt.state)
        self.state = shared
        for opt in self.optimizers:
            opt.state = shared
        self.param_groups[:] = [g for opt in self.optimizers for g in opt.param_groups]

    def __getstate__(self) -> dict[str, Any]:
        # torch's version keeps only defaults/state/param_groups; a copy must keep its inner optimizers too
        # (pickle preserves the shared state and group objects between them).
        return {
            **super().__getstate__(),
            "optimizers": self.optimizers,
            "_group_counts": self._group_counts,
            "_initialised": self._initialised,
        }

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if self._initialised:
            raise NotImplementedError(
                "CompositeOptimizer cannot tell which inner optimizer a new group belongs to; build a new one"
            )
        super().add_param_group(param_group)

    @torch.no_grad()
    def step(self, closure=None):  # type: ignore[override]
        """Evaluate ``closure`` once (if given), then step every inner optimizer."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for opt in self.optimizers:
            opt.step()
        return loss

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        saved_groups = state_dict["param_groups"]
        if len(saved_groups) != sum(self._group_counts):
            raise ValueError(
                f"CompositeOptimizer.load_state_dict: the state has {len(saved_groups)} parameter groups, this "
                f"optimizer has {sum(self._group_counts)} ({self._group_counts} across "
                f"{[type(o).__name__ for o in self.optimizers]})"
            )
        start = 0
        for opt, count in zip(self.optimizers, self._group_counts):
            groups = saved_groups[start : start + count]
            start += count
            ids = {i for g in groups for i in g["params"]}
            opt.load_state_dict(
                {"state": {k: v for k, v in state_dict["state"].items() if k in ids}, "param_groups": groups}
            )
        self._share_state()


def _adamw(groups: list[dict[str, Any]], cfg: OptimConfig) -> torch.optim.AdamW:
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, weight_decay=cfg.weight_decay)


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    """The optimizer ``cfg`` describes, over ``model``'s trainable parameters.

    ``name=adamw``: one ``torch.optim.AdamW`` with groups ``adamw_decay`` / ``adamw_no_decay``.
    ``name=muon``: a ``CompositeOptimizer`` of ``StackedMuon`` (group ``muon``, lr ``cfg.muon_lr or cfg.lr``)
    and AdamW (the other two groups). Each group's dict carries its ``name`` and its peak ``lr``; an LR
    scheduler records that peak as ``initial_lr`` and scales it. Empty groups are left out. Under expert
    parallelism each group is split in two, the expert part marked ``moe=True`` with DeepSpeed's expert group
    under ``name`` and the group's own name under ``kind``.
    """
    cfg.validate()
    assigned = _assign_groups(model, cfg)
    decay_for = {"muon": cfg.weight_decay, "adamw_decay": cfg.weight_decay, "adamw_no_decay": 0.0}
    lr_for = {"muon": cfg.peak_muon_lr, "adamw_decay": cfg.lr, "adamw_no_decay": cfg.lr}

    def group(name: str) -> list[dict[str, Any]]:
        out = []
        for members in _expert_split(assigned[name]):
            entry = {"params": [p for _, p in members], "name": name, "lr": lr_for[name],
                     "weight_decay": decay_for[name]}
            if _is_expert_param(members[0][1]):
                # DeepSpeed's MoE group convention: 'moe' and the expert group's name under 'name'.
                entry.update(moe=True, name=members[0][1].group_name, kind=name)
            out.append(entry)
        return out

    adamw_groups = group("adamw_decay") + group("adamw_no_decay")
    muon_groups = group("muon")
    if not adamw_groups and not muon_groups:
        raise ValueError("build_optimizer: the model has no trainable parameters")
    inner: list[torch.optim.Optimizer] = []
    if muon_groups:
        inner.append(
            StackedMuon(
                muon_groups,
                lr=cfg.peak_muon_lr,
                weight_decay=cfg.weight_decay,
                momentum=cfg.muon_momentum,
                nesterov=cfg.muon_nesterov,
                ns_steps=cfg.muon_ns_steps,
                adjust_lr_fn=cfg.muon_adjust_lr,
            )
        )
    if adamw_groups:
        inner.append(_adamw(adamw_groups, cfg))
    if not muon_groups:
        return inner[0]
    return CompositeOptimizer(inner)
