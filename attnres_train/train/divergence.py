"""The divergence guard: a non-finite loss or gradient never reaches the weights, and a diverged run stops loudly.

The guard sits on the optimizer the trainer builds, below every DeepSpeed wrapper (ZeRO 1-2 and the bf16
optimizer step this inner optimizer on their fp32 partitions; the pipeline engine steps it once per batch), so
one hook covers every step kind. At the first inner ``step()`` of an optimizer step it decides, together with
every other rank (one all-reduce), whether the update is finite: the trainer's loss flag and this rank's
gradients. A non-finite update is skipped entirely -- no parameter, moment or step count changes -- and the
trainer logs the step as skipped. After ``train.skip_nonfinite_steps`` skipped updates in a row the run stops
with an error naming the step; checkpoints are only written from finite weights (``weights_are_finite``).

The LR schedule still advances on a skipped step (DeepSpeed steps its scheduler regardless), so the schedule
stays a function of the step count and a resumed run reproduces it.
"""

from __future__ import annotations

import math
import types
from typing import Callable, Iterable, Optional

import torch


class TrainingDivergedError(RuntimeError):
    """Training produced non-finite values the guard could not skip past; the message names the step."""


def _all_finite(tensors: list[torch.Tensor]) -> bool:
    if not tensors:
        return True
    norms = torch._foreach_norm([t.detach() for t in tensors])
    return bool(torch.isfinite(torch.stack([n.float() for n in norms]).sum()))


class NonFiniteStepGuard:
    """Gates ``optimizer.step`` on finite gradients and loss, agreed over all ranks.

    Args:
        optimizer: the torch optimizer the trainer built (install before creating the LR scheduler, which
            wraps ``step`` itself).
        any_rank_flags: sums a float tensor over every rank in place (the whole world: pipeline stages and
            data-parallel replicas must take the same decision).
        device: where that tensor must live for the process group's backend.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, any_rank_flags: Callable[[torch.Tensor], None],
                 device: torch.device):
        self.optimizer = optimizer
        self._sum_over_ranks = any_rank_flags
        self._device = device
        self._inner_step = optimizer.step
        self._decision: Optional[bool] = None  # None: not yet decided for the current optimizer step
        self._loss_is_finite = True
        self.skipped_last_step = False
        guard = self

        def guarded_step(_optimizer, *args, **kwargs):
            return guard._guarded_step(*args, **kwargs)

        # A method bound to the optimizer (the LR scheduler re-binds step's __func__ to it when it wraps step).
        optimizer.step = types.MethodType(guarded_step, optimizer)

    def begin_step(self) -> None:
        """Call before each optimizer step (before the micro-batches' forward/backward)."""
        self._decision = None
        self._loss_is_finite = True
        self.skipped_last_step = False

    def report_loss(self, loss: float) -> None:
        """The loss of a micro-batch on this rank (known before the step on the non-pipelined path)."""
        if not math.isfinite(loss):
            self._loss_is_finite = False

    def _grads(self) -> list[torch.Tensor]:
        return [p.grad for group in self.optimizer.param_groups for p in group["params"] if p.grad is not None]

    def _guarded_step(self, *args, **kwargs):
        if self._decision is None:
            local_bad = not (self._loss_is_finite and _all_finite(self._grads()))
            flag = torch.tensor([1.0 if local_bad else 0.0], device=self._device)
            self._sum_over_ranks(flag)
            self._decision = bool(flag.item() == 0)
            self.skipped_last_step = not self._decision
        if not self._decision:
            return None
        return self._inner_step(*args, **kwargs)


def weights_are_finite(parameters: Iterable[torch.nn.Parameter], any_rank_flags: Callable[[torch.Tensor], None],
                       device: torch.device) -> bool:
    """True when every rank's parameters are finite (ZeRO-3 partitions: the local shard, ``ds_tensor``)."""
    local = [getattr(p, "ds_tensor", p) for p in parameters]
    local = [t for t in local if t.numel() > 0]
    flag = torch.tensor([0.0 if _all_finite(local) else 1.0], device=device)
    any_rank_flags(flag)
    return bool(flag.item() == 0)
