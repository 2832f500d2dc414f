"""The one way this package replaces a file: write a temporary beside it, fsync, rename over it, fsync the folder.

A reader (another rank, a resumed run, a report) then sees either the old file or the whole new one, never a
prefix, and after a power loss the rename is durable because its directory entry was synced too. Markers, the
resolved config, metrics rewrites, checkpoint pointers, dataset manifests and shards all go through here.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, BinaryIO, Callable, Optional


def fsync_path(path: Path) -> None:
    """fsync a file or a directory (a rename is durable only once its directory entry is)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:  # some file systems refuse fsync on directories; the data files were synced already
        pass
    finally:
        os.close(fd)


def atomic_write(path: Path, write: Callable[[BinaryIO], None], temp_path: Optional[Path] = None) -> None:
    """Write ``path`` through ``write(binary_file)``. ``temp_path``: where the temporary goes (default: a hidden
    name beside ``path`` carrying this process's pid, so concurrent writers never share one); it is removed when
    ``write`` or the rename fails, so a failed write (a full disk) leaves nothing behind."""
    path = Path(path)
    temp_path = Path(temp_path) if temp_path is not None else path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(temp_path, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temp_path, path)
    except BaseException:
        temp_path.unlink(missing_ok=True)
        raise
    fsync_path(path.parent)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    atomic_write(path, lambda handle: handle.write(data))


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def finite_or_none(value: Any) -> Any:
    """``value`` with every non-finite float (NaN, inf) replaced by None, recursively: strict JSON has no NaN."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: finite_or_none(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_or_none(item) for item in value]
    return value


def atomic_write_json(path: Path, payload: Any, indent: Optional[int] = 2, sort_keys: bool = False) -> None:
    """Strict JSON (non-finite floats become null, so every reader can parse it), written atomically."""
    text = json.dumps(finite_or_none(payload), indent=indent, sort_keys=sort_keys, allow_nan=False, default=str)
    atomic_write_text(path, text + "\n")
