"""Learning-rate schedules: one multiplier curve applied to every parameter group's peak lr.

Step convention: ``step`` counts the optimizer updates already taken, so ``lr_multiplier(0, ...)`` is the factor
of the first update and ``lr_multiplier(total_steps - 1, ...)`` that of the last. This is ``LambdaLR``'s
``last_epoch`` when the scheduler is stepped once after each ``optimizer.step()`` (DeepSpeed does exactly that).

- warmup (all schedules): update k = step + 1 of the first ``warmup_steps`` uses k / warmup_steps of the peak,
  so the first update is not wasted at lr 0 and the last warmup update reaches the peak.
- ``wsd``: warmup, then the peak, then over the last D = round(decay_fraction * total_steps) updates a decay to
  ``min_lr_ratio`` of the peak. With progress p = (step - (total_steps - D) + 1) / D in (0, 1] the factor is
  ``m + (1 - m) * shape(p)``, shape = 1 - p (linear), 1 - sqrt(p) (sqrt) or (1 + cos(pi p)) / 2 (cosine), so
  the last update runs exactly at the minimum.
- ``cosine``: warmup, then (1 + cos(pi p)) / 2 from the peak to the minimum over the remaining updates, with
  p = (step - warmup_steps + 1) / (total_steps - warmup_steps).
- ``constant``: warmup, then the peak.
Past ``total_steps`` every schedule holds its final value.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch.optim.lr_scheduler import LambdaLR

from .optim import OptimConfig, OptimConfigError


def _decay_shape(name: str) -> Callable[[float], float]:
    """Maps decay progress p in [0, 1] to the remaining fraction of (peak - minimum)."""
    if name == "linear":
        return lambda p: 1.0 - p
    if name == "sqrt":
        return lambda p: 1.0 - math.sqrt(p)
    if name == "cosine":
        return lambda p: 0.5 * (1.0 + math.cos(math.pi * p))
    raise OptimConfigError(f"optim.decay_shape={name!r}: expected one of linear, sqrt, cosine")


def decay_steps(cfg: OptimConfig, total_steps: int) -> int:
    """Updates in the WSD decay phase: round(decay_fraction * total_steps), halves rounded up."""
    return int(math.floor(cfg.decay_fraction * total_steps + 0.5))


def make_lr_multiplier(cfg: OptimConfig, total_steps: int) -> Callable[[int], float]:
    """The schedule as a function of the number of completed updates; validates it against ``total_steps``."""
    cfg.validate()
    if not isinstance(total_steps, int) or isinstance(total_steps, bool) or total_steps < 0:
        raise ValueError(f"total_steps={total_steps!r}: expected an integer >= 0 (optimizer updates in the run)")
    if total_steps == 0:
        return lambda step: 1.0  # a run with no updates (evaluation only) never reads the curve
    warmup = cfg.warmup_steps
    floor = cfg.min_lr_ratio

    def warmup_factor(step: int) -> float:
        return (step + 1) / warmup

    if cfg.schedule == "constant":
        if warmup > total_steps:
            raise OptimConfigError(
                f"optim.warmup_steps={warmup}: exceeds total_steps={total_steps}; the peak lr would never be reached"
            )
        return lambda step: warmup_factor(step) if step < warmup else 1.0

    if cfg.schedule == "cosine":
        if warmup >= total_steps:
            raise OptimConfigError(
                f"optim.warmup_steps={warmup}: must be < total_steps={total_steps} to leave updates for the "
                "cosine decay"
            )
        span = total_steps - warmup
        cosine = _decay_shape("cosine")

        def cosine_factor(step: int) -> float:
            if step < warmup:
                return warmup_factor(step)
            progress = min(1.0, (step - warmup + 1) / span)
            return floor + (1.0 - floor) * cosine(progress)

        return cosine_factor

    # wsd
    n_decay = decay_steps(cfg, total_steps)
    if warmup + n_decay > total_steps:
        raise OptimConfigError(
            f"optim.warmup_steps={warmup} plus the {n_decay} decay updates (optim.decay_fraction={cfg.decay_fraction} "
            f"of total_steps={total_steps}) exceed total_steps={total_steps}; lower optim.warmup_steps or "
            "optim.decay_fraction"
        )
    decay_start = total_steps - n_decay
    shape = _decay_shape(cfg.decay_shape)

    def wsd_factor(step: int) -> float:
        if step < warmup:
            return warmup_factor(step)
        if n_decay == 0 or step < decay_start:
            return 1.0
        progress = min(1.0, (step - decay_start + 1) / n_decay)
        return floor + (1.0 - floor) * shape(progress)

    return wsd_factor


def lr_multiplier(step: int, cfg: OptimConfig, total_steps: int) -> float:
    """Factor applied to every group's peak lr for the update that follows ``step`` completed updates."""
    return make_lr_multiplier(cfg, total_steps)(step)


def build_lr_scheduler(optimizer: torch.optim.Optimizer, cfg: OptimConfig, total_steps: int) -> LambdaLR:
    """A ``LambdaLR`` scaling each group's peak lr (its ``lr`` when the scheduler is built, kept as
    ``initial_lr``) by the schedule; call ``step()`` once after every optimizer update.

    Its ``state_dict`` holds the step counter and the per-group peaks, not the curve: on resume the curve is
    rebuilt from ``cfg`` and ``total_steps`` (so a longer run can be resumed) and continues from the saved step.
    """
    # A plain function (not a callable object) so LambdaLR leaves it out of its state_dict.
    schedule = make_lr_multiplier(cfg, total_steps)

    def multiplier(step: int) -> float:
        return schedule(step)

    return LambdaLR(optimizer, lr_lambda=multiplier)
