"""One writer per run directory: an exclusive lock held by rank 0 of a run for the run's whole lifetime.

Two launches on one ``run_dir`` would interleave metrics, supersede each other's checkpoints and race on the
markers. The lock is an ``flock`` on ``run_dir/.lock``: the kernel releases it when the holding process exits,
however it exits (SIGKILL, OOM kill, node reboot of a local disk), so a lock left by a dead process is stale by
construction and the next launch takes it, saying whose it was. The file also records the holder (host, pid,
start time, command) so a refused launch can name it.

File systems without ``flock`` support (some network mounts answer ENOLCK / EOPNOTSUPP) give a warning and no
lock rather than a run that cannot start.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import socket
import sys
import time
from pathlib import Path
from typing import Optional

_log = logging.getLogger(__name__)

LOCK_NAME = ".lock"


class RunDirLockedError(RuntimeError):
    """Another live process holds the run directory; the message names it."""


def _holder_description(info: Optional[dict]) -> str:
    if not info:
        return "another process (holder unknown)"
    started = info.get("started_at", "?")
    return f"pid {info.get('pid', '?')} on host {info.get('host', '?')} (started {started})"


def _read_holder(path: Path) -> Optional[dict]:
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return info if isinstance(info, dict) else None


class RunDirLock:
    """``acquire()`` takes ``run_dir/.lock`` or raises RunDirLockedError naming the holder; ``release()`` (also on
    exit of the ``with`` block) drops it. The lock file stays in place: deleting it would let a process that
    opened the old file think it holds the lock while another locks a new one."""

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / LOCK_NAME
        self._handle = None

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            handle = open(self.path, "a+", encoding="utf-8")
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                handle.close()
                raise RunDirLockedError(
                    f"run_dir {self.path.parent} is in use by {_holder_description(_read_holder(self.path))}; "
                    f"wait for it to finish, stop it, or choose another run_dir (lock file {self.path})"
                ) from None
            except OSError as error:
                handle.close()
                if error.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                    _log.warning("the file system of %s does not support locks (%s): a second launch on this "
                                 "run_dir would not be refused", self.path.parent, error)
                    return
                raise
            # Locked; but if the path was replaced meanwhile, this lock guards a file nobody else will open.
            try:
                same_file = os.fstat(handle.fileno()).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same_file = False
            if same_file:
                break
            handle.close()
        previous = _read_holder(self.path)
        if previous and previous.get("pid") is not None:
            _log.info("run_dir lock %s was left by %s, which is no longer running: taking it over",
                      self.path, _holder_description(previous))
        info = {"host": socket.gethostname(), "pid": os.getpid(), "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "command": " ".join(sys.argv)}
        handle.seek(0)
        handle.truncate()
        handle.write(json.dumps(info) + "\n")
        handle.flush()
        self._handle = handle

    def release(self) -> None:
        if self._handle is None:
            return
        try:
            self._handle.seek(0)
            self._handle.truncate()  # an empty file: nobody holds it
            self._handle.flush()
        except OSError:
            pass
        fcntl.flock(self._handle, fcntl.LOCK_UN)
        self._handle.close()
        self._handle = None

    def __enter__(self) -> "RunDirLock":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()
