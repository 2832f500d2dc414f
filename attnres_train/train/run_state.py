"""Run-state markers of a run directory, which make sweeps resumable and their reports honest.

- ``FINISHED``: JSON written by rank 0 when a run reached its target step count (not when it was stopped by a
  signal). It records the final step, tokens, FLOPs, losses and ``config_key``, a hash of the resolved config
  without the keys that do not change what is trained (``NON_TRAINING_KEYS``). A sweep re-run skips a job whose
  ``FINISHED`` marker carries the current config key, before any model or engine is built.
- ``FAILED``: JSON written when a sweep job raised; it holds the error message and the traceback. A re-run tries
  the job again (the marker is removed when training starts).
- ``resolved_config.yaml``: the job's fully resolved config, with ``run_dir`` being the job's own directory.
A directory with neither marker is unfinished: still running, interrupted, or never started.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Optional

from attnres_train.atomic_files import atomic_write_json

FINISHED_NAME = "FINISHED"
FAILED_NAME = "FAILED"
RESOLVED_CONFIG_NAME = "resolved_config.yaml"

# Dotted keys that do not change what a run trains: a finished run is still finished when only these differ.
NON_TRAINING_KEYS = (
    "run_dir",
    "train.progress_bar",
    "train.num_threads",
    "train.log_every",
    "train.resume",
    "train.checkpoint_every",
    "train.keep_checkpoints",
    "train.verify_checkpoints",
    "logger",
)


def config_key(resolved_config: dict) -> str:
    """Hash of the resolved config without ``NON_TRAINING_KEYS`` (stable across key order)."""
    trimmed = json.loads(json.dumps(resolved_config, default=str))
    for dotted in NON_TRAINING_KEYS:
        *parents, leaf = dotted.split(".")
        node = trimmed
        for part in parents:
            node = node.get(part, {}) if isinstance(node, dict) else {}
        if isinstance(node, dict):
            node.pop(leaf, None)
    blob = json.dumps(trimmed, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def write_json_atomic(path: Path, payload: dict) -> None:
    """Write ``payload`` as strict JSON (NaN becomes null) atomically, so a reader never sees half a marker."""
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, payload)


def read_json(path: Path) -> Optional[dict[str, Any]]:
    """The JSON object in ``path``, or None when it is missing or unreadable."""
    try:
        value = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return value if isinstance(value, dict) else None


def finished_marker(run_dir: Path) -> Optional[dict[str, Any]]:
    return read_json(Path(run_dir) / FINISHED_NAME)


def failed_marker(run_dir: Path) -> Optional[dict[str, Any]]:
    return read_json(Path(run_dir) / FAILED_NAME)


def is_finished_with(run_dir: Path, key: str) -> bool:
    """True when ``run_dir`` holds a FINISHED marker written for a config with this ``config_key``."""
    marker = finished_marker(run_dir)
    return marker is not None and marker.get("config_key") == key


def clear_marker(run_dir: Path, name: str) -> None:
    try:
        (Path(run_dir) / name).unlink()
    except FileNotFoundError:
        pass
