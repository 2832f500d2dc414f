"""Shared helpers of the end-to-end trainer tests: launch ``attnres-train`` in a subprocess and read its outputs.

Every launch runs in a fresh process, exactly as a user would start it, so these tests see the real command-line
behaviour (Hydra composition, exit codes, stderr) and the real files a run leaves in its ``run_dir``.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Optional, Sequence

REPO_ROOT = Path(__file__).resolve().parents[2]
BIN_DIR = Path(sys.executable).parent

# Small, fast runs: the tiny model on short rows, fp32 on CPU, no progress bar (its carriage returns would
# clutter captured output). Tests add run_dir, max_steps and whatever they exercise.
TINY_ARGS = (
    "model=tiny",
    "train.device=cpu",
    "data.seq_len=64",
    "train.micro_batch_size=2",
    "train.val_batches=1",
    "train.log_every=1",
    "optim.warmup_steps=1",
    "train.progress_bar=false",
)


def train_env(**extra: str) -> dict[str, str]:
    """The environment of a training subprocess: DeepSpeed's op cache shared across runs, unbuffered output,
    Hydra's short error messages (HYDRA_FULL_ERROR would turn them into tracebacks)."""
    env = dict(os.environ)
    env.setdefault("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "attnres_train" / "torch_extensions"))
    env["PYTHONUNBUFFERED"] = "1"
    env.pop("HYDRA_FULL_ERROR", None)
    # Other tests in this process may have joined a process group; a child must start its own rendezvous.
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "GROUP_RANK"):
        env.pop(name, None)
    env.update(extra)
    return env


def train_command(args: Sequence[str]) -> list[str]:
    """``attnres-train ARGS`` through the installed console script (``python -m`` if it is not installed)."""
    script = BIN_DIR / "attnres-train"
    if script.exists():
        return [str(script), *args]
    return [sys.executable, "-m", "attnres_train.train", *args]


def torchrun_command(nproc: int, args: Sequence[str]) -> list[str]:
    """``torchrun --standalone --nproc_per_node N -m attnres_train.train ARGS`` (free rendezvous port)."""
    return [str(BIN_DIR / "torchrun"), "--standalone", f"--nproc_per_node={nproc}", "-m", "attnres_train.train",
            *args]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run(command: Sequence[str], cwd: Path, timeout: float = 240.0, **env: str) -> subprocess.CompletedProcess:
    """Run a command to completion with stdout and stderr captured as text."""
    return subprocess.run(list(command), cwd=cwd, env=train_env(**env), capture_output=True, text=True,
                          timeout=timeout)


def run_train(args: Sequence[str], cwd: Path, timeout: float = 240.0, **env: str) -> subprocess.CompletedProcess:
    return run(train_command(args), cwd, timeout, **env)


def describe(result: subprocess.CompletedProcess, tail: int = 4000) -> str:
    """Exit code and the end of both streams, for assertion messages."""
    return (f"exit code {result.returncode}\n--- stdout (tail) ---\n{result.stdout[-tail:]}"
            f"\n--- stderr (tail) ---\n{result.stderr[-tail:]}")


def check_ok(result: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert result.returncode == 0, describe(result)
    return result


# --- run_dir contents ------------------------------------------------------------------------------------------


def read_metrics(run_dir: Path, name: str = "metrics.jsonl") -> list[dict]:
    path = Path(run_dir) / name
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def train_records(run_dir: Path, name: str = "metrics.jsonl") -> list[dict]:
    """The per-step training records (those with a loss), in file order."""
    return [r for r in read_metrics(run_dir, name) if "loss" in r]


def val_records(run_dir: Path) -> list[dict]:
    return [r for r in read_metrics(run_dir) if "val_loss" in r]


def complete_checkpoints(run_dir: Path) -> list[str]:
    """Tags of the checkpoints with a COMPLETE marker, oldest first."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    return sorted(p.parent.name for p in root.glob("step_*/COMPLETE"))


def snapshot(directory: Path, ignore: Callable[[Path], bool] = lambda rel: False) -> dict[str, tuple[int, str]]:
    """Relative path -> (size, sha256) of every file under ``directory`` not ignored."""
    directory = Path(directory)
    out = {}
    for path in sorted(directory.rglob("*")):
        rel = path.relative_to(directory)
        if path.is_file() and not ignore(rel):
            out[rel.as_posix()] = (path.stat().st_size, hashlib.sha256(path.read_bytes()).hexdigest())
    return out


def hydra_bookkeeping(rel: Path) -> bool:
    """Files Hydra itself (re)writes at every launch, before the app runs: ``.hydra/*.yaml`` and ``cli.log``."""
    return rel.parts[0] == ".hydra" or (len(rel.parts) == 1 and rel.suffix == ".log")


def copy_run(source: Path, destination: Path) -> Path:
    shutil.copytree(source, destination)
    return destination


# --- interrupting a running process ---------------------------------------------------------------------------


class Launched:
    """A training process started in the background; output goes to files so it can never block on a pipe."""

    def __init__(self, command: Sequence[str], cwd: Path, log_dir: Path, **env: str):
        log_dir.mkdir(parents=True, exist_ok=True)
        self.stdout_path = log_dir / "stdout.txt"
        self.stderr_path = log_dir / "stderr.txt"
        self._stdout = open(self.stdout_path, "w")
        self._stderr = open(self.stderr_path, "w")
        self.process = subprocess.Popen(list(command), cwd=cwd, env=train_env(**env), stdout=self._stdout,
                                        stderr=self._stderr)

    def wait_until(self, condition: Callable[[], bool], timeout: float, poll_s: float = 0.01) -> None:
        """Poll ``condition`` until it holds; fails if the process exits first or time runs out."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if condition():
                return
            if self.process.poll() is not None:
                raise AssertionError(f"training process exited (code {self.process.returncode}) before the "
                                     f"awaited state was reached\n{self.output()}")
            time.sleep(poll_s)
        self.kill()
        raise AssertionError(f"awaited state not reached within {timeout}s\n{self.output()}")

    def send(self, sig: signal.Signals) -> None:
        assert self.process.poll() is None, f"process already exited before {sig.name}\n{self.output()}"
        self.process.send_signal(sig)

    def wait(self, timeout: float) -> int:
        try:
            return self.process.wait(timeout=timeout)
        finally:
            self._stdout.close()
            self._stderr.close()

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()

    def output(self) -> str:
        for handle in (self._stdout, self._stderr):
            if not handle.closed:
                handle.flush()
        return (f"--- stdout ---\n{self.stdout_path.read_text()[-4000:]}\n"
                f"--- stderr ---\n{self.stderr_path.read_text()[-4000:]}")


def last_logged_step(run_dir: Path) -> Optional[int]:
    """The step of the newest training record; tolerates a line being written right now."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return None
    step = None
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # the writer is mid-line
        if "loss" in record:
            step = int(record["step"])
    return step
