"""Run metrics: ``run_dir/metrics.jsonl``, optional Weights & Biases, the rank-0 progress bar, and MFU.

Only rank 0 writes. Every record is one JSON object per line; floats are written with full precision
(``json`` uses repr, which round-trips a float exactly), so losses can be compared bit for bit across runs.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Optional

import torch

from attnres_train.atomic_files import finite_or_none

from .config import LoggerConfig

# Dense bf16 tensor-core peak FLOP/s per device (no sparsity), by substring of torch's device name.
PEAK_BF16_FLOPS = {
    "H200": 989.4e12,
    "H100 SXM": 989.4e12,
    "H100 80GB HBM3": 989.4e12,
    "H100 PCIe": 756.0e12,
    "H100 NVL": 835.0e12,
    "H100": 989.4e12,
    "H800": 989.4e12,
    "GH200": 989.4e12,
    "B200": 2250e12,
    "A100": 312e12,
    "A800": 312e12,
    "L40S": 362e12,
    "A10G": 70e12,
    "RTX 4090": 165e12,
}


def peak_flops_per_device(device: torch.device, override: Optional[float] = None) -> Optional[float]:
    """Peak FLOP/s of one device for MFU, or None where it is not meaningful (CPU, unknown GPU)."""
    if override is not None:
        return float(override)
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, peak in PEAK_BF16_FLOPS.items():
        if key in name:
            return peak
    return None


def model_flops_utilization(
    flops_per_token: float, tokens_per_s: float, peak_per_device: Optional[float], world_size: int
) -> Optional[float]:
    if peak_per_device is None or tokens_per_s <= 0:
        return None
    return flops_per_token * tokens_per_s / (peak_per_device * world_size)


def _without_tensors(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().tolist()
    if isinstance(value, dict):
        return {k: _without_tensors(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_without_tensors(v) for v in value]
    return value


def _jsonable(value: Any) -> Any:
    """Plain strict-JSON data: tensors as lists, non-finite floats as null."""
    return finite_or_none(_without_tensors(value))


class MetricsLogger:
    """Rank-0 sink for metrics: jsonl always, W&B when ``logger.backend=wandb``, and a tqdm bar."""

    def __init__(
        self,
        run_dir: Path,
        cfg: LoggerConfig,
        is_main: bool,
        total_steps: int,
        start_step: int,
        progress_bar: bool,
        resolved_config: dict,
    ):
        self.is_main = is_main
        self.path = Path(run_dir) / "metrics.jsonl"
        self._wandb_run = None
        self._bar = None
        if not is_main:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.path, "a", encoding="utf-8")
        if cfg.backend == "wandb":
            self._wandb_run = _start_wandb(cfg, Path(run_dir), resolved_config)
        if progress_bar and total_steps > start_step:
            from tqdm import tqdm

            self._bar = tqdm(total=total_steps, initial=start_step, desc="train", unit="step", dynamic_ncols=True)

    def log(self, record: dict) -> None:
        if not self.is_main:
            return
        record = _jsonable(record)
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._wandb_run is not None:
            flat = {k: v for k, v in _flatten(record).items() if isinstance(v, (int, float)) and v is not None}
            self._wandb_run.log(flat, step=int(record["step"]))

    def progress(self, step: int, loss: float, tokens_per_s: float) -> None:
        if self._bar is not None:
            self._bar.n = step
            self._bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{tokens_per_s:,.0f}", refresh=False)
            self._bar.refresh()

    def message(self, text: str) -> None:
        if not self.is_main:
            return
        if self._bar is not None:
            self._bar.write(text)
        else:
            print(text, flush=True)

    def close(self) -> None:
        if not self.is_main:
            return
        if self._bar is not None:
            self._bar.close()
        self._file.close()
        if self._wandb_run is not None:
            self._wandb_run.finish()


def _flatten(record: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in record.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_flatten(value, prefix=f"{name}/"))
        else:
            out[name] = value
    return out


def wandb_mode(cfg: LoggerConfig) -> str:
    """``auto`` goes online only when an API key is configured; the key itself is never read into logs."""
    if cfg.wandb_mode != "auto":
        return cfg.wandb_mode
    if os.environ.get("WANDB_API_KEY"):
        return "online"
    netrc = Path.home() / ".netrc"
    if netrc.exists() and "api.wandb.ai" in netrc.read_text(errors="ignore"):
        return "online"
    return "offline"


def _start_wandb(cfg: LoggerConfig, run_dir: Path, resolved_config: dict):
    try:
        import wandb
    except ImportError as exc:
        raise RuntimeError(
            "logger.backend=wandb: the wandb package is not installed (pip install 'attnres-train[wandb]')"
        ) from exc
    return wandb.init(
        project=cfg.wandb_project,
        entity=cfg.wandb_entity,
        name=cfg.wandb_run_name or run_dir.name,
        dir=str(run_dir),
        mode=wandb_mode(cfg),
        config=resolved_config,
        resume="allow",
        id=_stable_run_id(run_dir),
    )


def _stable_run_id(run_dir: Path) -> str:
    """Same id across resumes of one run_dir, so W&B appends to the same run."""
    import hashlib

    return hashlib.sha1(str(run_dir.resolve()).encode()).hexdigest()[:16]
