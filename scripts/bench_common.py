"""Plumbing shared by the benchmark scripts: timing on the right clock, the environment record, the JSON file."""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Callable

import torch

RESULTS_DIR = Path(__file__).resolve().parents[1] / "benchmarks" / "results"


def package_version(package: str):
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_seconds(once: Callable[[], None], device: torch.device, repeats: int, warmup: int):
    """``(median, all)`` wall-clock seconds of ``once()``, the device drained before and after each call."""
    for _ in range(warmup):
        once()
    times = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        once()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times), times


def environment(device: torch.device) -> dict:
    """Date, device name and library versions for a report."""
    return {
        "date": datetime.now(timezone.utc).isoformat(),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "versions": {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
                     "triton": package_version("triton"), "fla": package_version("fla-core"),
                     "flash_attn": package_version("flash-attn"), "deepspeed": package_version("deepspeed")},
    }


def one_process_environment() -> dict:
    """This process's environment without its distributed variables, for a child run that must be one process of
    its own (a test's in-process group, or a launcher, may have set them here)."""
    return {key: value for key, value in os.environ.items()
            if key not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}


def write_report(report: dict, out, default_name: str) -> Path:
    path = Path(out) if out else RESULTS_DIR / default_name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {path}")
    return path
