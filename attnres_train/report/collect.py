"""Read run directories into ``RunRecord``s: config, metrics, accounting and status of each run.

A run directory is one that holds any of ``metrics.jsonl``, ``model_summary.json``, ``FINISHED``, ``FAILED``
or a ``.hydra`` folder. Reading tolerates runs in progress: a metrics line being written is skipped, missing
files leave fields empty, so a report can be made while a sweep still runs.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from attnres_train.train.run_state import (
    FAILED_NAME,
    FINISHED_NAME,
    RESOLVED_CONFIG_NAME,
    failed_marker,
    finished_marker,
    read_json,
)

RUN_MARKERS = ("metrics.jsonl", "model_summary.json", FINISHED_NAME, FAILED_NAME)
# Always shown as swept columns: the two axes the hybrid-ratio study is about.
PRIMARY_KEYS = ("model.hybrid_ratio", "model.residual")
# Runs that differ only in this key are replicates of one arm (same experiment, another seed).
SEED_KEY = "train.seed"
# Config keys that differ between runs without being an experimental variable.
IGNORED_KEYS = ("run_dir",)
CONTEXT_LENGTHS = {"4k": 4096, "128k": 131072, "1m": 1048576}


@dataclass
class RunRecord:
    """Everything the report needs about one run."""

    path: Path
    name: str  # path relative to the report root ("." for a single run)
    status: str  # finished | failed | running (unfinished: in progress, interrupted or not started)
    config: dict = field(default_factory=dict)  # resolved (or composed) config, nested
    summary: dict = field(default_factory=dict)  # model_summary.json
    train_records: list = field(default_factory=list)
    val_records: list = field(default_factory=list)
    error: Optional[str] = None

    def config_value(self, dotted: str) -> Any:
        node: Any = self.config
        for part in dotted.split("."):
            if not isinstance(node, dict) or part not in node:
                return None
            node = node[part]
        return node

    @property
    def residual(self) -> Optional[str]:
        return self.config_value("model.residual")

    @property
    def hybrid_ratio(self) -> Optional[int]:
        return self.config_value("model.hybrid_ratio")

    @property
    def loss_is_per_byte(self) -> bool:
        """With the byte tokenizer a token is one UTF-8 byte, so the loss in nats/token is nats/byte."""
        return self.config_value("data.tokenizer") == "byte"

    @property
    def last_train(self) -> Optional[dict]:
        return self.train_records[-1] if self.train_records else None

    @property
    def last_val(self) -> Optional[dict]:
        return self.val_records[-1] if self.val_records else None

    @property
    def final_val_loss_by_source(self) -> dict[str, float]:
        """{source name: loss in nats} of the newest validation; empty unless the run trains on a mixture."""
        return (self.last_val or {}).get("val_loss_by_source") or {}

    @property
    def diagnostics_records(self) -> list[dict]:
        """The validation records with hidden-state diagnostics, oldest first."""
        return [record for record in self.val_records if "sublayer_input_rms" in record]


def read_metrics(path: Path) -> list[dict]:
    """Records of a metrics.jsonl; a line not (yet) valid JSON is skipped."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError:
        return []
    records = []
    for line in text.splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict):
            records.append(record)
    return records


def is_run_dir(path: Path) -> bool:
    return any((path / name).exists() for name in RUN_MARKERS) or (path / ".hydra").is_dir()


def find_run_dirs(root: Path) -> list[Path]:
    """``root`` itself when it is a run, else every run directory below it (not inside another run)."""
    root = Path(root)
    if is_run_dir(root):
        return [root]
    found = []
    for child in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        found.extend(find_run_dirs(child))
    return found


def load_config(run_dir: Path) -> dict:
    """The run's resolved config, else the newest config Hydra saved for it (composed, unresolved)."""
    from omegaconf import OmegaConf

    candidates = [run_dir / RESOLVED_CONFIG_NAME]
    hydra_dir = run_dir / ".hydra"
    if hydra_dir.is_dir():
        candidates += sorted(hydra_dir.glob("*/config.yaml"), reverse=True) + [hydra_dir / "config.yaml"]
    for path in candidates:
        if path.is_file():
            try:
                return OmegaConf.to_container(OmegaConf.load(path), resolve=False)  # type: ignore[return-value]
            except Exception:  # noqa: BLE001 - a file being written: try the next source
                continue
    return {}


def load_run(run_dir: Path, root: Path) -> RunRecord:
    run_dir = Path(run_dir)
    records = read_metrics(run_dir / "metrics.jsonl")
    failed = failed_marker(run_dir)
    if finished_marker(run_dir) is not None:
        status = "finished"
    elif failed is not None:
        status = "failed"
    else:
        status = "running"
    name = run_dir.relative_to(root).as_posix() if run_dir != root else run_dir.name
    return RunRecord(
        path=run_dir,
        name=name,
        status=status,
        config=load_config(run_dir),
        summary=read_json(run_dir / "model_summary.json") or {},
        train_records=[r for r in records if "loss" in r],
        val_records=[r for r in records if "val_loss" in r],
        error=failed.get("error") if failed else None,
    )


def collect_runs(root: Path) -> list[RunRecord]:
    """Every run under ``root`` (a sweep directory or one run directory), in directory order."""
    root = Path(root).resolve()
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: not a directory (expected a sweep or run directory)")
    return [load_run(path, root) for path in find_run_dirs(root)]


def _flatten(node: Any, prefix: str = "") -> dict:
    if not isinstance(node, dict):
        return {prefix: node}
    out = {}
    for key, value in node.items():
        out.update(_flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return out


def differing_keys(runs: list[RunRecord]) -> list[str]:
    """The config keys whose value differs between runs (what was swept): ``PRIMARY_KEYS`` first, then sorted."""
    flat = [_flatten(run.config) for run in runs if run.config]
    keys = sorted({key for f in flat for key in f},
                  key=lambda key: (PRIMARY_KEYS.index(key) if key in PRIMARY_KEYS else len(PRIMARY_KEYS), key))
    return [
        key for key in keys
        if key not in IGNORED_KEYS and not key.startswith("hydra.")
        # Among the runs that have the key: a run that failed before its config was resolved lacks most keys.
        and len({json.dumps(f[key], sort_keys=True, default=str) for f in flat if key in f}) > 1
    ]


def swept_keys(runs: list[RunRecord]) -> list[str]:
    """``PRIMARY_KEYS`` (always, so every table names ratio and residual) then the other differing keys."""
    return [*PRIMARY_KEYS, *(key for key in differing_keys(runs) if key not in PRIMARY_KEYS)]


def arm_of(run: RunRecord, keys: list[str]) -> tuple:
    """The run's values of ``keys`` other than ``SEED_KEY``: runs with equal arms differ only by seed."""
    return tuple(json.dumps(run.config_value(key), sort_keys=True, default=str) for key in keys if key != SEED_KEY)


def source_names(runs: list[RunRecord]) -> list[str]:
    """Sorted names of the data sources any run reports a validation loss for (mixture runs only)."""
    return sorted({name for run in runs for name in run.final_val_loss_by_source})


def mean_throughput(run: RunRecord) -> Optional[float]:
    """Mean of the logged tokens/s, without the first record when there are several (it includes warm-up)."""
    values = [r.get("tokens_per_s") for r in run.train_records]
    values = [v for v in values if isinstance(v, (int, float)) and math.isfinite(v)]
    if len(values) > 1:
        values = values[1:]
    return sum(values) / len(values) if values else None


def run_flops(run: RunRecord) -> Optional[float]:
    """Training FLOPs spent so far: tokens x the model's exact train FLOPs per token."""
    last = run.last_train
    per_token = run.summary.get("train_flops_per_token")
    if last is None or per_token is None:
        return None
    return last.get("flops", last["tokens"] * per_token)


def cache_bytes(run: RunRecord) -> dict[str, Optional[int]]:
    """KV cache + recurrent state bytes (bf16) per sequence at each of ``CONTEXT_LENGTHS``."""
    from attnres_train.model.accounting import inference_cache_bytes
    from attnres_train.model.config import ModelConfig, ModelConfigError

    model = run.config.get("model")
    out: dict[str, Optional[int]] = {name: None for name in CONTEXT_LENGTHS}
    if not isinstance(model, dict):
        return out
    try:
        cfg = ModelConfig.from_mapping(model)
    except (ModelConfigError, TypeError, ValueError):
        return out
    for name, length in CONTEXT_LENGTHS.items():
        out[name] = inference_cache_bytes(cfg, length)["total"]
    return out
