"""A resume never drops a config change silently: each changed field is applied on purpose and logged, or refused.

A checkpoint records the resolved config of the launch that wrote it (``run_config`` in its marker). On resume
the launch's config is compared with it field by field:

- **Refused** (``REFUSED_FIELDS``): fields whose meaning is fixed by the restored state. ``train.seed`` keys the
  data order and the RNG streams the checkpoint continues; ``data.*`` defines what the restored loader position
  points into. Changing them mid-run would silently train on a different stream, so the resume stops and lists
  them. (``model.*`` is refused earlier, by the model fingerprint; parallel layout changes are resharded.)
- **Applied**: everything else. Most fields act through the new config by themselves (the LR curve's shape and
  length, gradient clipping, validation cadence). The optimizer hyperparameters are the exception: DeepSpeed
  restores each param group's lr, betas, eps and weight decay and the scheduler's peak lrs from the checkpoint,
  which would override the launch. ``apply_optimizer_config`` puts the launch's values back after the load, so
  a new ``optim.lr`` rescales the schedule from the resumed step on. Every applied change is logged.
"""

from __future__ import annotations

from typing import Any, Mapping

from .checkpoint import diff_configs
from .run_state import NON_TRAINING_KEYS

# Dotted prefixes of fields a resume refuses to change.
REFUSED_FIELDS = ("train.seed", "data.")
# Data fields that only say how to read the same tokens, not which tokens.
DATA_FIELDS_SAFE_TO_CHANGE = ("data.verify_shards",)
# Checked elsewhere: the model by its fingerprint, the layout by reshard.layout_changes, run_dir by definition;
# train.init_from only seeds a fresh run's weights, a resume reads them from the checkpoint.
COMPARED_ELSEWHERE = ("model.", "parallel.", "run_dir", "train.init_from")


class ResumeConfigError(ValueError):
    """The launch changes fields a resume cannot honour; the message lists them."""


def _matches(field: str, prefixes) -> bool:
    return any(field == p.rstrip(".") or (p.endswith(".") and field.startswith(p)) or field.startswith(p + ".")
               for p in prefixes)


def classify_changes(saved: Mapping[str, Any], current: Mapping[str, Any]) -> tuple[list[str], list[str]]:
    """``(applied, refused)``: one ``"field: saved X, current Y"`` line per changed field, by kind."""
    applied, refused = [], []
    for line in diff_configs(saved, current):
        field = line.split(":", 1)[0]
        if _matches(field, COMPARED_ELSEWHERE) or _matches(field, NON_TRAINING_KEYS):
            continue
        if _matches(field, REFUSED_FIELDS) and not _matches(field, DATA_FIELDS_SAFE_TO_CHANGE):
            refused.append(line)
        else:
            applied.append(line)
    return applied, refused


def check_resume_config(saved: Mapping[str, Any], current: Mapping[str, Any], checkpoint: str) -> list[str]:
    """The applied changes, or ResumeConfigError listing the refused ones."""
    applied, refused = classify_changes(saved, current)
    if refused:
        raise ResumeConfigError(
            f"resuming {checkpoint}: this launch changes fields the checkpoint's state depends on: "
            f"{'; '.join(refused)}. Launch with the saved values, or start a fresh run (another run_dir, or "
            f"train.resume=never, which keeps the old checkpoints under checkpoints/superseded)")
    return applied


def optimizer_hyperparameters(optimizer) -> list[dict]:
    """Every param group's settings except its parameters (``initial_lr``: the peak the schedule scales)."""
    return [{key: value for key, value in group.items() if key != "params"} for group in optimizer.param_groups]


def apply_optimizer_config(optimizer, lr_scheduler, launched: list[dict]) -> list[str]:
    """After a checkpoint load: give each param group the launch's hyperparameters (``launched``, taken right
    after the optimizer was built) and the scheduler the launch's peak lrs, then recompute the current lr from
    the schedule at the restored step. Returns one line per value that the checkpoint had differently."""
    groups = optimizer.param_groups
    if len(groups) != len(launched):
        raise ResumeConfigError(f"the checkpoint's optimizer has {len(groups)} param groups, this launch builds "
                                f"{len(launched)}")
    changed = []
    for group, fresh in zip(groups, launched):
        for key, value in fresh.items():
            if key == "lr":
                continue  # the current lr follows from the schedule below
            if group.get(key) != value:
                changed.append(f"param group {group.get('name', '?')}: {key} {group.get(key)!r} -> {value!r}")
                group[key] = value
    lr_scheduler.base_lrs = [fresh["initial_lr"] for fresh in launched]
    step = lr_scheduler.last_epoch
    current = [base * multiplier(step) for base, multiplier in zip(lr_scheduler.base_lrs, lr_scheduler.lr_lambdas)]
    for group, lr in zip(groups, current):
        group["lr"] = lr
    lr_scheduler._last_lr = current
    return changed
