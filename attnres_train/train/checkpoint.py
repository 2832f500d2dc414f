"""Crash-safe checkpoints on top of DeepSpeed's ``engine.save_checkpoint`` / ``engine.load_checkpoint``.

DeepSpeed alone is not crash-safe: it ``torch.save``s straight into the final paths and rank 0 rewrites
``latest`` before the other ranks have necessarily finished their shards, so a crash mid-save can leave
``latest`` pointing at a half-written checkpoint. This module adds a commit protocol around it.

Layout under ``root_dir``::

    latest_complete             text file naming the newest complete tag, replaced atomically
    step_00000120/              one tag directory per save (``tag_for_step``)
        mp_rank_00_model_states.pt, zero_pp_rank_*_optim_states.pt, ...   DeepSpeed's files
        rank_state_00000.pt     optional per-rank state (RNG, data position); one file per rank
        COMPLETE                JSON marker, written last, by rank 0, once every rank has finished
    superseded/step_.../        complete checkpoints moved aside when a run went back to an earlier step

Rules:

* A tag directory without a valid ``COMPLETE`` marker is never loaded; the next save deletes it.
* A complete checkpoint is never rewritten in place. Saving a step whose complete checkpoint this manager
  wrote or loaded itself (the final save landing on a periodic one, or a save right after resuming) is
  skipped: the state on disk is the state in memory. Any other complete checkpoint at that step or later
  belongs to another trajectory (the run was restarted from an earlier tag, or from scratch), so the save
  moves it to ``superseded/`` (never deletes it) before writing: "newest step" then always means "latest
  written", and ``latest()`` cannot resume an abandoned trajectory.
* ``keep_last`` counts complete checkpoints in ``root_dir``; older ones are deleted marker-first, so a crash
  while deleting leaves an incomplete directory, never a complete-looking damaged one.
* ``root_dir`` must be on a file system every rank sees (DeepSpeed loads rely on that too). The save sequence
  is collective: every rank must call ``save`` / ``load`` with the same arguments, in the same order.
* The marker records every file's size and SHA-256 (each rank hashes a share of the files, so a checkpoint of
  many ranks is hashed in parallel). ``load`` checks sizes, then contents, before DeepSpeed reads anything: a
  truncated, missing or altered shard fails the same way on every rank with the file named, and
  ``newest_verified`` lets a resume fall back to the previous checkpoint that passes.
* Files are unpickled with ``weights_only=True`` (tensors, containers and a short allow-list of DeepSpeed data
  classes), here and, through ``WeightsOnlyCheckpointEngine`` in ``engine.py``, inside DeepSpeed's own load: a
  planted pickle payload raises instead of running. The hashes guard against damage, not against someone who
  can rewrite both a file and its marker; the README states this trust model.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import pickle
import re
import shutil
import sys
import time
import zipfile
from datetime import datetime, timezone
from hashlib import sha256
from pathlib import Path
from typing import Any, Callable, Mapping, Optional

import torch

from attnres_train.atomic_files import atomic_write, atomic_write_json, atomic_write_text, fsync_path

logger = logging.getLogger(__name__)

MARKER_NAME = "COMPLETE"
POINTER_NAME = "latest_complete"
SUPERSEDED_DIR_NAME = "superseded"
MARKER_FORMAT_VERSION = 2  # 2: per-file SHA-256 ("sha256") and the launch's resolved config ("run_config")
# The caller's client state travels under one key of DeepSpeed's model-states dict: DeepSpeed merges client
# state into that dict, so a caller key such as "module" or "optimizer" would otherwise overwrite its data.
CLIENT_STATE_KEY = "attnres_client_state"
MODEL_CONFIG_KEY = "model_config"
FINGERPRINT_KEY = "model_config_fingerprint"
RUN_CONFIG_KEY = "run_config"  # the resolved config of the launch that wrote the checkpoint
TAG_PATTERN = re.compile(r"^step_(\d+)$")
_TEMP_INFIX = ".tmp-"


class CheckpointError(RuntimeError):
    """A checkpoint cannot be written, found or loaded; the message names the path and what is wrong."""


# --- tags -------------------------------------------------------------------------------------------------


def tag_for_step(step: int) -> str:
    """The tag (directory name) of the checkpoint taken after ``step`` optimizer steps, e.g. ``step_00000120``."""
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ValueError(f"checkpoint step must be an int >= 0, got {step!r}")
    return f"step_{step:08d}"


def step_of_tag(tag: str) -> Optional[int]:
    """The step encoded in a tag, or None when ``tag`` is not a checkpoint tag."""
    match = TAG_PATTERN.match(tag)
    return int(match.group(1)) if match else None


# --- model config fingerprint -------------------------------------------------------------------------------


def _canonical_json(value: Any, field: str) -> Any:
    """A JSON-ready copy of ``value`` (tuples become lists); raises naming the field that cannot be encoded."""
    if isinstance(value, Mapping):
        return {str(key): _canonical_json(item, f"{field}.{key}" if field else str(key)) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_canonical_json(item, f"{field}[{index}]") for index, item in enumerate(value)]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(
        f"model config field '{field}' has a {type(value).__name__} value {value!r}; "
        "a fingerprinted config may hold only None, bool, int, float, str, lists and dicts"
    )


def config_fingerprint(model_cfg: Mapping[str, Any]) -> str:
    """A stable hash of a model config dict: sha256 of its key-sorted JSON, first 16 hex digits.

    Equal configs give equal fingerprints regardless of key order; tuples and lists hash alike.
    """
    if not isinstance(model_cfg, Mapping):
        raise TypeError(f"config_fingerprint: expected a dict of model config fields, got {type(model_cfg).__name__}")
    encoded = json.dumps(_canonical_json(model_cfg, ""), sort_keys=True, separators=(",", ":"))
    return sha256(encoded.encode()).hexdigest()[:16]


def _flatten(value: Any, prefix: str, out: dict[str, Any]) -> dict[str, Any]:
    if isinstance(value, Mapping) and value:
        for key, item in value.items():
            _flatten(item, f"{prefix}.{key}" if prefix else str(key), out)
    else:
        out[prefix] = value
    return out


_MISSING = "<missing>"


def diff_configs(saved: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    """One line per field that differs, ``"name: saved X, current Y"``; nested dicts give dotted names.

    A field present on one side only shows ``<missing>`` on the other. Sorted by field name.
    """
    saved_flat = _flatten(_canonical_json(saved, ""), "", {})
    current_flat = _flatten(_canonical_json(current, ""), "", {})
    lines = []
    for field in sorted(set(saved_flat) | set(current_flat)):
        saved_value = saved_flat.get(field, _MISSING)
        current_value = current_flat.get(field, _MISSING)
        if saved_value != current_value or type(saved_value) is not type(current_value):
            lines.append(f"{field}: saved {saved_value!r}, current {current_value!r}")
    return lines


def model_config_state(model_cfg: Mapping[str, Any]) -> dict[str, Any]:
    """The client-state entries ``validate_fingerprint`` reads: the config dict and its fingerprint."""
    return {MODEL_CONFIG_KEY: _canonical_json(model_cfg, ""), FINGERPRINT_KEY: config_fingerprint(model_cfg)}


def validate_fingerprint(
    client_state: Mapping[str, Any],
    expected_fingerprint: str,
    current_model_config: Optional[Mapping[str, Any]] = None,
) -> None:
    """Raise CheckpointError when the checkpoint's model config is not the one being trained now.

    ``client_state`` is what ``CheckpointManager.load`` returned (saved with ``model_config_state``).
    Pass ``current_model_config`` to have the message name the differing fields.
    """
    if FINGERPRINT_KEY not in client_state:
        raise CheckpointError(
            f"checkpoint client state has no '{FINGERPRINT_KEY}': it was saved without model_config_state(...), "
            "so it cannot be checked against the current model config"
        )
    saved_fingerprint = client_state[FINGERPRINT_KEY]
    if saved_fingerprint == expected_fingerprint:
        return
    saved_config = client_state.get(MODEL_CONFIG_KEY)
    if current_model_config is None:
        detail = "pass current_model_config to list the differing fields"
    elif not isinstance(saved_config, Mapping):
        detail = f"the checkpoint holds no '{MODEL_CONFIG_KEY}' dict to compare fields with"
    else:
        differences = diff_configs(saved_config, current_model_config)
        detail = ("differing fields: " + "; ".join(differences) if differences
                  else "all fields are equal, so the fingerprint was computed differently")
    raise CheckpointError(
        f"checkpoint was saved for a different model config (fingerprint {saved_fingerprint}, current "
        f"{expected_fingerprint}): {detail}"
    )


# --- durable file operations --------------------------------------------------------------------------------


def _atomic_write_text(path: Path, text: str) -> None:
    atomic_write_text(path, text)


def safe_unpickle_globals(with_deepspeed: bool) -> list:
    """Classes a checkpoint file may contain besides tensors and containers: numpy's array reconstruction (RNG
    state) and, ``with_deepspeed``, DeepSpeed's plain data records (loss scaler settings, the ZeRO stage enum,
    fragment addresses of flat partitions). None of them runs code when rebuilt."""
    import numpy as np

    multiarray = np._core.multiarray if hasattr(np, "_core") else np.core.multiarray
    allowed = [multiarray._reconstruct, np.ndarray, np.dtype, type(np.dtype(np.uint32))]
    if not with_deepspeed:
        return allowed
    try:
        from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
        from deepspeed.runtime.zero.config import ZeroStageEnum
        from deepspeed.utils.tensor_fragment import fragment_address
    except ImportError:
        return allowed
    return allowed + [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


def load_weights_only(path, map_location="cpu", mmap: bool = False) -> Any:
    """``torch.load`` restricted to tensors, containers and ``safe_unpickle_globals``; a file that needs anything
    else (a planted payload) raises CheckpointError naming the file and the refused object. DeepSpeed is imported
    only for a file that holds its records (generation and export of model weights never need it)."""
    with_deepspeed = "deepspeed" in sys.modules
    while True:
        try:
            with torch.serialization.safe_globals(safe_unpickle_globals(with_deepspeed)):
                return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
        except pickle.UnpicklingError as error:
            refused = re.search(r"Unsupported global: GLOBAL (\S+)", str(error))
            if refused and refused.group(1).startswith("deepspeed.") and not with_deepspeed:
                with_deepspeed = True
                continue
            what = f"an object of type {refused.group(1)}" if refused else "a non-tensor object"
            raise CheckpointError(
                f"checkpoint file {path} holds {what}, which is not loaded (only tensors, containers and known "
                f"DeepSpeed records are): the file was altered or written by other code") from None


def read_checkpoint_file(path: Path, mmap: bool = False) -> Any:
    """A checkpoint file onto the CPU, weights-only (``load_weights_only``); a truncated or foreign file raises
    CheckpointError naming it. ``mmap``: tensors are read from disk only when touched."""
    try:
        return load_weights_only(path, mmap=mmap)
    except CheckpointError:
        raise
    except Exception as error:
        raise CheckpointError(
            f"checkpoint file {path} could not be read ({type(error).__name__}: {error})") from error


def sha256_of_file(path: Path) -> str:
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def no_space_left(error: BaseException, directory: Path) -> Optional[str]:
    """A one-line explanation when ``error`` (or its cause) comes from a full disk, else None. torch's zip writer
    reports ENOSPC as "unexpected pos", so the free space is checked too."""
    seen: set[int] = set()
    current: Optional[BaseException] = error
    full = False
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, OSError) and current.errno == errno.ENOSPC:
            full = True
        if "No space left" in str(current) or "unexpected pos" in str(current):
            full = True
        current = current.__cause__ or current.__context__
    try:
        free = shutil.disk_usage(directory).free
    except OSError:
        free = None
    if not full and (free is None or free > 1 << 20):
        return None
    free_text = f"{free / 2**20:.1f} MiB free" if free is not None else "free space unknown"
    return f"no space left on the device holding {directory} ({free_text})"


def process_group_all_gather() -> Callable[[Any], list]:
    """Every rank's object, in rank order (``all_gather_object``), or ``[obj]`` in a single process."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        def gather(obj: Any) -> list:
            out: list = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(out, obj)
            return out

        return gather
    return lambda obj: [obj]


def process_group_barrier() -> Callable[[], None]:
    """``torch.distributed.barrier`` when a process group is initialised, else a no-op (single process)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.barrier
    return lambda: None


# --- the manager --------------------------------------------------------------------------------------------


class CheckpointManager:
    """Crash-safe save / resume of a DeepSpeed engine under ``root_dir`` (see the module docstring for the rules).

    Args:
        root_dir: directory holding the tag directories; created on first save.
        keep_last: complete checkpoints kept in ``root_dir`` (>= 1), or 0 to keep every one.
        rank, world_size: this process's global rank and the number of ranks.
        barrier: blocks until every rank reached it (``process_group_barrier()``).
        all_gather: every rank's object in rank order (``process_group_all_gather()``); default: that of the
            initialised process group, else a single process.
    """

    def __init__(
        self, root_dir: str | os.PathLike, keep_last: int, rank: int, world_size: int, barrier: Callable[[], None],
        all_gather: Optional[Callable[[Any], list]] = None,
    ):
        if isinstance(keep_last, bool) or not isinstance(keep_last, int) or keep_last < 0:
            raise ValueError(f"keep_last must be an int >= 0 (0 keeps every checkpoint), got {keep_last!r}")
        if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
            raise ValueError(f"world_size must be an int >= 1, got {world_size!r}")
        if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < world_size:
            raise ValueError(f"rank must be an int in [0, world_size={world_size}), got {rank!r}")
        if not callable(barrier):
            raise TypeError(f"barrier must be a callable taking no arguments, got {type(barrier).__name__}")
        self.root_dir = Path(root_dir)
        self.keep_last = keep_last
        self.rank = rank
        self.world_size = world_size
        self.barrier = barrier
        self.all_gather = all_gather if all_gather is not None else process_group_all_gather()
        self.loaded_tag: Optional[str] = None
        # Tags whose on-disk state is this run's own state: written by this manager or resumed from.
        self._own_tags: set[str] = set()

    # --- inspection -----------------------------------------------------------------------------------------

    def read_marker(self, tag: str) -> Optional[dict[str, Any]]:
        """The completion marker of ``tag`` as a dict, or None when the tag is missing or incomplete."""
        step = step_of_tag(tag)
        marker_path = self.root_dir / tag / MARKER_NAME
        if step is None or not marker_path.is_file():
            return None
        try:
            marker = json.loads(marker_path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
            # The marker is written atomically, so a bad one means outside damage: treat the tag as incomplete.
            logger.warning("ignoring checkpoint %s: unreadable completion marker (%s)", marker_path.parent, error)
            return None
        if not (isinstance(marker, dict) and marker.get("tag") == tag and marker.get("step") == step
                and isinstance(marker.get("files"), dict)):
            logger.warning("ignoring checkpoint %s: completion marker does not describe this tag", marker_path.parent)
            return None
        return marker

    def _scan_tags(self) -> list[tuple[int, str]]:
        """Every tag directory in root_dir (complete or not) as (step, tag), ascending by step."""
        if not self.root_dir.is_dir():
            return []
        found = []
        for entry in self.root_dir.iterdir():
            step = step_of_tag(entry.name)
            if step is not None and entry.is_dir():
                found.append((step, entry.name))
        return sorted(found)

    def complete_tags(self) -> list[str]:
        """Tags of the complete checkpoints in root_dir, oldest step first."""
        return [tag for _, tag in self._scan_tags() if self.read_marker(tag) is not None]

    def latest(self) -> Optional[tuple[str, Path]]:
        """The newest complete checkpoint as (tag, directory), or None when there is none.

        The pointer file is trusted when it names a complete tag; when it is missing, unreadable or names an
        incomplete or missing directory, the complete tag with the highest step wins.
        """
        pointer_path = self.root_dir / POINTER_NAME
        try:
            pointed_tag = pointer_path.read_text().strip()
        except (OSError, UnicodeDecodeError):
            pointed_tag = None
        if pointed_tag is not None and self.read_marker(pointed_tag) is not None:
            return pointed_tag, self.root_dir / pointed_tag
        complete = self.complete_tags()
        if pointer_path.exists() or complete:
            logger.info("checkpoint pointer %s is missing or stale (%r); scanned tag directories instead",
                        pointer_path, pointed_tag)
        if not complete:
            return None
        return complete[-1], self.root_dir / complete[-1]

    # --- save -----------------------------------------------------------------------------------------------

    def save(self, engine: Any, step: int, client_state: dict, rank_state: Optional[dict] = None,
             rank_files: Optional[Mapping[str, dict]] = None) -> Path:
        """Write a checkpoint of ``engine`` after ``step`` steps and commit it; returns its tag directory.

        Collective: every rank calls it. ``client_state`` (rank 0's is the one stored, as in DeepSpeed) comes
        back from ``load``; ``rank_state`` is stored per rank and comes back from ``load_rank_state`` -- use it
        for state that differs between ranks, such as ``capture_rng_state()``. ``rank_files`` ({file name:
        state}) are further files this rank writes into the tag directory (expert-parallel weight slices).

        If the write fails on a rank, that rank raises CheckpointError (the tag stays incomplete, the previous
        checkpoint stays the newest) and the other ranks wait in the next barrier until the process group's
        timeout, as with any failed collective.
        """
        tag = tag_for_step(step)
        if not isinstance(client_state, dict):
            raise TypeError(f"client_state must be a dict, got {type(client_state).__name__}")
        if rank_state is not None and not isinstance(rank_state, dict):
            raise TypeError(f"rank_state must be a dict or None, got {type(rank_state).__name__}")
        tag_dir = self.root_dir / tag
        # Every rank reaches the same decision: _own_tags evolves identically and markers are on a shared disk.
        already_saved = tag in self._own_tags and self.read_marker(tag) is not None

        if self.rank == 0:
            self.root_dir.mkdir(parents=True, exist_ok=True)
            self._clear_from_step(step, keep_tag=tag if already_saved else None)
        self.barrier()

        if already_saved:
            logger.info("checkpoint %s already holds this run's state at step %d: not rewritten", tag_dir, step)
            if self.rank == 0:
                _atomic_write_text(self.root_dir / POINTER_NAME, tag + "\n")
            self.barrier()
            return tag_dir

        try:
            engine.save_checkpoint(str(self.root_dir), tag=tag, client_state={CLIENT_STATE_KEY: client_state},
                                   save_latest=False)
            if rank_state is not None:
                tag_dir.mkdir(parents=True, exist_ok=True)
                atomic_write(self._rank_state_path(tag_dir, self.rank), lambda handle: torch.save(rank_state, handle))
            for name, state in (rank_files or {}).items():
                tag_dir.mkdir(parents=True, exist_ok=True)
                atomic_write(tag_dir / name, lambda handle, state=state: torch.save(state, handle))
        except Exception as error:
            previous = self.latest()
            # Incomplete, so never loadable; removing it now gives the space back and leaves no partial file.
            shutil.rmtree(tag_dir, ignore_errors=True)
            reason = no_space_left(error, self.root_dir) or f"{type(error).__name__}: {error}"
            raise CheckpointError(
                f"saving checkpoint {tag_dir} failed on rank {self.rank}: {reason}; the partial checkpoint was "
                f"removed; the newest complete checkpoint is {previous[1] if previous else 'none'}"
            ) from error
        self.barrier()

        hashes = self._hash_share(tag_dir)
        if self.rank == 0:
            self._commit(tag, step, client_state, hashes)
            self._prune()
        self.barrier()
        self._own_tags.add(tag)
        return tag_dir

    @staticmethod
    def _rank_state_path(tag_dir: Path, rank: int) -> Path:
        return tag_dir / f"rank_state_{rank:05d}.pt"

    def _clear_from_step(self, step: int, keep_tag: Optional[str]) -> None:
        """Rank 0, before a save at ``step``: delete incomplete tags, move other trajectories' tags >= step aside."""
        for tag_step, tag in self._scan_tags():
            tag_dir = self.root_dir / tag
            if self.read_marker(tag) is None:
                shutil.rmtree(tag_dir)  # a crashed save: never loadable, and it may block this tag's directory
                logger.info("removed incomplete checkpoint %s", tag_dir)
            elif tag_step >= step and tag != keep_tag:
                destination = self._move_aside(tag)
                logger.warning(
                    "checkpoint %s is from another trajectory (this run is at step %d and did not write or resume "
                    "from it): moved to %s", tag_dir, step, destination)
        fsync_path(self.root_dir)

    def _files_of(self, tag_dir: Path) -> list[str]:
        return sorted(path.relative_to(tag_dir).as_posix() for path in tag_dir.rglob("*")
                      if path.is_file() and path.name != MARKER_NAME)

    def _hash_share(self, tag_dir: Path) -> dict[str, str]:
        """Collective: each rank hashes every world_size-th file of the tag; every rank gets all hashes."""
        files = self._files_of(tag_dir) if tag_dir.is_dir() else []
        mine = {name: sha256_of_file(tag_dir / name) for name in files[self.rank::self.world_size]}
        merged: dict[str, str] = {}
        for share in self.all_gather(mine):
            merged.update(share)
        return merged

    def _commit(self, tag: str, step: int, client_state: Mapping[str, Any], hashes: Mapping[str, str]) -> None:
        """Rank 0, after every rank finished writing: make the files durable, write the marker, move the pointer."""
        tag_dir = self.root_dir / tag
        file_sizes = {}
        for path in sorted(tag_dir.rglob("*")):
            if path.is_file() and path.name != MARKER_NAME:
                fsync_path(path)
                file_sizes[path.relative_to(tag_dir).as_posix()] = path.stat().st_size
        for directory in sorted({path.parent for path in tag_dir.rglob("*")} | {tag_dir}):
            fsync_path(directory)
        now = time.time()
        marker = {
            "format_version": MARKER_FORMAT_VERSION,
            "tag": tag,
            "step": step,
            "saved_at_unix": now,
            "saved_at": datetime.fromtimestamp(now, timezone.utc).isoformat(),
            "world_size": self.world_size,
            "pipeline_stages": client_state.get("pipeline_stages", 1),
            "zero_stage": client_state.get("zero_stage"),
            "precision": client_state.get("precision"),
            "pipeline_parts": client_state.get("pipeline_parts"),
            "expert_parallel": client_state.get("expert_parallel"),
            "optimizer": client_state.get("optimizer"),
            "config_fingerprint": client_state.get(FINGERPRINT_KEY),
            # Lets a resume name the differing fields before DeepSpeed reads any tensor (no shape traceback).
            MODEL_CONFIG_KEY: client_state.get(MODEL_CONFIG_KEY),
            # Lets a resume compare the launch's config with the one that produced this state, field by field.
            RUN_CONFIG_KEY: client_state.get(RUN_CONFIG_KEY),
            "files": file_sizes,
            "sha256": {name: hashes[name] for name in file_sizes if name in hashes},
        }
        atomic_write_json(tag_dir / MARKER_NAME, marker)
        _atomic_write_text(self.root_dir / POINTER_NAME, tag + "\n")

    def _prune(self) -> None:
        """Rank 0: keep the newest ``keep_last`` complete checkpoints; drop incomplete tags and stray temp files."""
        complete = []
        for _, tag in self._scan_tags():
            if self.read_marker(tag) is None:
                shutil.rmtree(self.root_dir / tag)
            else:
                complete.append(tag)
        expired = complete[: -self.keep_last] if self.keep_last else []
        for tag in expired:
            tag_dir = self.root_dir / tag
            # Marker first: a crash mid-delete then leaves an incomplete directory, which nothing loads.
            (tag_dir / MARKER_NAME).unlink()
            fsync_path(tag_dir)
            shutil.rmtree(tag_dir)
            logger.info("pruned checkpoint %s (keep_last=%d)", tag_dir, self.keep_last)
        for stray in self.root_dir.glob(f".{POINTER_NAME}{_TEMP_INFIX}*"):
            stray.unlink(missing_ok=True)

    # --- load -----------------------------------------------------------------------------------------------

    def _resolve_complete_tag(self, tag: Optional[str]) -> Optional[tuple[str, dict[str, Any]]]:
        if tag is None:
            newest = self.latest()
            if newest is None:
                return None
            tag = newest[0]
        marker = self.read_marker(tag)
        if marker is None:
            tag_dir = self.root_dir / tag
            reason = "does not exist" if not tag_dir.exists() else f"is incomplete (no valid {MARKER_NAME} marker)"
            raise CheckpointError(
                f"checkpoint {tag_dir} {reason}; complete checkpoints: {self.complete_tags() or 'none'}")
        return tag, marker

    def _check_files(self, tag_dir: Path, marker: Mapping[str, Any]) -> None:
        for relative_path, expected_size in marker["files"].items():
            path = tag_dir / relative_path
            if not path.is_file():
                raise CheckpointError(f"checkpoint file {path} is missing (listed in {tag_dir / MARKER_NAME})")
            actual_size = path.stat().st_size
            if actual_size != expected_size:
                raise CheckpointError(
                    f"checkpoint file {path} is damaged: {actual_size} bytes, {expected_size} when it was saved "
                    f"(truncated or overwritten)")

    def verify(self, tag: str) -> Optional[str]:
        """Collective: None when every file of the complete checkpoint ``tag`` has its recorded size and SHA-256,
        else one line naming the first bad file (the same on every rank). Each rank hashes a share of the files.
        A checkpoint written before hashes were recorded is checked by size only (with a warning)."""
        tag_dir = self.root_dir / tag
        marker = self.read_marker(tag)
        if marker is None:
            return f"{tag_dir} has no valid {MARKER_NAME} marker"
        try:
            self._check_files(tag_dir, marker)
        except CheckpointError as error:
            return str(error)
        recorded = marker.get("sha256")
        if not isinstance(recorded, dict):
            logger.warning("checkpoint %s records no content hashes (written by an older version): only file "
                           "sizes were checked", tag_dir)
            return None
        names = sorted(recorded)
        mine = []
        for name in names[self.rank::self.world_size]:
            if sha256_of_file(tag_dir / name) != recorded[name]:
                mine.append(f"checkpoint file {tag_dir / name} is damaged: its content differs from the SHA-256 "
                            "recorded when it was saved")
        problems = sorted(problem for share in self.all_gather(mine) for problem in share)
        return problems[0] if problems else None

    def newest_verified(self) -> tuple[Optional[str], list[str]]:
        """Collective: the newest complete checkpoint whose files verify, and one line per newer one that did not
        (newest first). The pointer's tag is tried first, then the other complete tags by descending step."""
        latest = self.latest()
        if latest is None:
            return None, []
        order = [latest[0]] + [tag for tag in reversed(self.complete_tags()) if tag != latest[0]]
        rejected = []
        for tag in order:
            problem = self.verify(tag)
            if problem is None:
                return tag, rejected
            rejected.append(problem)
        return None, rejected

    def supersede_all(self) -> list[Path]:
        """Rank 0, for a fresh start in a run_dir that has checkpoints: move every complete one to
        ``superseded/`` (kept, never loaded or pruned again). Returns their new paths."""
        moved = []
        for tag in self.complete_tags():
            moved.append(self._move_aside(tag))
        return moved

    def _move_aside(self, tag: str) -> Path:
        superseded_dir = self.root_dir / SUPERSEDED_DIR_NAME
        superseded_dir.mkdir(exist_ok=True)
        destination = superseded_dir / f"{tag}.{time.strftime('%Y%m%d-%H%M%S')}.{time.time_ns() % 10**9:09d}"
        os.replace(self.root_dir / tag, destination)
        return destination

    @staticmethod
    def _find_unreadable_file(tag_dir: Path, marker: Mapping[str, Any]) -> Optional[str]:
        """After a failed load: name the first file whose zip structure or CRCs are broken (torch.save's format)."""
        for relative_path in marker["files"]:
            path = tag_dir / relative_path
            try:
                with zipfile.ZipFile(path) as archive:
                    bad_member = archive.testzip()
            except (OSError, zipfile.BadZipFile, EOFError) as error:
                return f"{path} ({error})"
            if bad_member is not None:
                return f"{path} (corrupt entry {bad_member})"
        return None

    def load(self, engine: Any, tag: Optional[str] = None,
             restore: Optional[Callable[[Any, Path], dict]] = None, verify: bool = True) -> Optional[dict]:
        """Load the given (or newest) complete checkpoint into ``engine``, with optimizer and LR scheduler state.

        ``restore(engine, tag_dir)`` replaces DeepSpeed's own load and returns the client state (used to resume
        under another parallel layout, see ``reshard``); the file checks and error reporting stay the same.
        Returns the ``client_state`` passed to ``save``, or None when root_dir holds no complete checkpoint.
        Raises CheckpointError naming the path when the tag is incomplete, or a file is missing, corrupt or (with
        ``verify``, a collective) differs from its recorded hash; the engine may then be partly loaded and should
        not be trained further.
        """
        resolved = self._resolve_complete_tag(tag)
        if resolved is None:
            logger.info("no complete checkpoint in %s", self.root_dir)
            return None
        tag, marker = resolved
        tag_dir = self.root_dir / tag
        self._check_files(tag_dir, marker)
        if verify:
            problem = self.verify(tag)
            if problem is not None:
                raise CheckpointError(
                    f"{problem}; other complete checkpoints: "
                    f"{[other for other in self.complete_tags() if other != tag] or 'none'}")
        try:
            if restore is not None:
                client_state = restore(engine, tag_dir)
                load_path, saved_state = tag_dir, {CLIENT_STATE_KEY: client_state}
            else:
                load_path, saved_state = engine.load_checkpoint(
                    str(self.root_dir), tag=tag, load_optimizer_states=True, load_lr_scheduler_states=True)
        except CheckpointError:
            raise
        except Exception as error:
            culprit = self._find_unreadable_file(tag_dir, marker)
            reason = "restoring it by parameter name failed" if restore is not None else "DeepSpeed rejected it"
            raise CheckpointError(
                f"checkpoint {tag_dir} could not be loaded: "
                f"{'unreadable file ' + culprit if culprit else reason} "
                f"[{type(error).__name__}: {str(error).splitlines()[0] if str(error) else 'no message'}]; "
                f"the engine may be partly loaded; other complete checkpoints: "
                f"{[other for other in self.complete_tags() if other != tag] or 'none'}"
            ) from error
        if load_path is None or saved_state is None:
            raise CheckpointError(f"checkpoint {tag_dir}: DeepSpeed found no model states file to load")
        if CLIENT_STATE_KEY not in saved_state:
            raise CheckpointError(
                f"checkpoint {tag_dir} was not written by CheckpointManager (no '{CLIENT_STATE_KEY}' entry)")
        if marker.get("world_size") != self.world_size:
            logger.warning("checkpoint %s was saved by %s rank(s), loading on %d",
                           tag_dir, marker.get("world_size"), self.world_size)
        self.loaded_tag = tag
        # The engine now holds this tag's trajectory: checkpoints this manager wrote before are no longer its own.
        self._own_tags = {tag}
        logger.info("resumed from checkpoint %s (step %d)", tag_dir, marker["step"])
        return saved_state[CLIENT_STATE_KEY]

    def load_rank_state(self, tag: Optional[str] = None) -> Optional[dict]:
        """This rank's ``rank_state`` from ``save`` (default tag: the one ``load`` loaded, else the newest).

        None when there is no checkpoint, it was saved without rank state, or by a different world size
        (rank r's state then belongs to no rank in particular).
        """
        resolved = self._resolve_complete_tag(tag if tag is not None else self.loaded_tag)
        if resolved is None:
            return None
        tag, marker = resolved
        tag_dir = self.root_dir / tag
        if marker.get("world_size") != self.world_size:
            logger.warning("checkpoint %s was saved by %s rank(s), this run has %d: per-rank state not restored",
                           tag_dir, marker.get("world_size"), self.world_size)
            return None
        path = self._rank_state_path(tag_dir, self.rank)
        relative_path = path.relative_to(tag_dir).as_posix()
        if relative_path not in marker["files"]:
            return None
        self._check_files(tag_dir, {"files": {relative_path: marker["files"][relative_path]}})
        return read_checkpoint_file(path)
