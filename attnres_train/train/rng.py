"""Capture and restore every random number generator a training step draws from.

DeepSpeed checkpoints do not include RNG state, so a resumed run would draw different dropout masks, data
shuffles and router noise than the uninterrupted run. The state dict returned here is plain picklable data
(tuples, numpy arrays, CPU byte tensors) that can go into a checkpoint's client state.

RNG state is per process: under data parallelism each rank should save its own (see
``CheckpointManager.save(..., rank_state=...)``), because DeepSpeed writes the client state of rank 0 only.
"""

from __future__ import annotations

import logging
import random
from typing import Any, Mapping

import numpy as np
import torch

logger = logging.getLogger(__name__)

PYTHON_KEY = "python"
NUMPY_KEY = "numpy"
TORCH_CPU_KEY = "torch_cpu"
TORCH_CUDA_KEY = "torch_cuda"  # present only when CUDA was available at capture time
REQUIRED_KEYS = (PYTHON_KEY, NUMPY_KEY, TORCH_CPU_KEY)


def capture_rng_state() -> dict[str, Any]:
    """Snapshot python ``random``, numpy's global generator, torch CPU and (if available) every CUDA device."""
    state: dict[str, Any] = {
        PYTHON_KEY: random.getstate(),
        NUMPY_KEY: np.random.get_state(),
        TORCH_CPU_KEY: torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state[TORCH_CUDA_KEY] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: Mapping[str, Any]) -> None:
    """Put every generator back to the state ``capture_rng_state`` returned.

    CUDA states are restored for the devices present both at capture and now; a different device count (or
    no CUDA now) only logs a warning, since a checkpoint may legitimately be inspected on another machine.
    """
    if not isinstance(state, Mapping):
        raise TypeError(f"restore_rng_state: expected the dict from capture_rng_state(), got {type(state).__name__}")
    missing = [key for key in REQUIRED_KEYS if key not in state]
    if missing:
        raise ValueError(
            f"restore_rng_state: RNG state lacks key(s) {missing}; expected the dict from capture_rng_state() "
            f"with keys {list(REQUIRED_KEYS)} (+ optional '{TORCH_CUDA_KEY}')"
        )
    torch_cpu_state = state[TORCH_CPU_KEY]
    if not (isinstance(torch_cpu_state, torch.Tensor) and torch_cpu_state.dtype == torch.uint8):
        raise ValueError(
            f"restore_rng_state: '{TORCH_CPU_KEY}' must be the uint8 tensor from torch.get_rng_state(), "
            f"got {type(torch_cpu_state).__name__}"
        )

    random.setstate(state[PYTHON_KEY])
    np.random.set_state(state[NUMPY_KEY])
    torch.set_rng_state(torch_cpu_state)

    cuda_states = state.get(TORCH_CUDA_KEY)
    if cuda_states is None:
        return
    if not torch.cuda.is_available():
        logger.warning("RNG state holds %d CUDA generator(s) but CUDA is not available: not restored", len(cuda_states))
        return
    device_count = torch.cuda.device_count()
    if len(cuda_states) != device_count:
        logger.warning(
            "RNG state holds %d CUDA generator(s), this process sees %d device(s): restoring the first %d",
            len(cuda_states),
            device_count,
            min(len(cuda_states), device_count),
        )
    for device_index, device_state in enumerate(cuda_states[:device_count]):
        torch.cuda.set_rng_state(device_state, device_index)
