"""``attnres-train`` / ``python -m attnres_train.train``: the Hydra app that launches a pretraining run.

Works as one plain process, under ``torchrun`` and under the ``deepspeed`` launcher (whose ``--local_rank=N``
argument is taken off argv before Hydra parses it).
"""

from __future__ import annotations

import hashlib
import os
import sys
from pathlib import Path

CONFIG_DIR_ENV = "ATTNRES_TRAIN_CONFIG_DIR"
# The OmegaConf resolver that names a sweep job's directory: ``hydra.sweep.subdir`` in configs/train.yaml.
JOB_DIRNAME_RESOLVER = "flat_job_dirname"


def config_dir() -> Path:
    """The packaged presets: ``configs/`` at the repository root (editable installs and source checkouts)."""
    override = os.environ.get(CONFIG_DIR_ENV)
    path = Path(override) if override else Path(__file__).resolve().parents[2] / "configs"
    if not (path / "train.yaml").exists():
        raise SystemExit(
            f"error: config directory {path} has no train.yaml; install attnres-train from a source checkout "
            f"(pip install -e .) or set {CONFIG_DIR_ENV}"
        )
    return path


def flat_job_dirname(override_dirname: str) -> str:
    """A sweep job's directory name: Hydra's ``override_dirname`` with path separators in override values
    (``data.path=/data/web``) replaced by '_', so every job is one directory directly under the sweep directory.

    Flattening alone could give two jobs one name (``/a/b`` and ``/a_b``), and the second would then resume the
    first one's checkpoints; so a name that had separators ends in '~' and a short hash of the unflattened name.
    Names without separators stay as Hydra made them, so existing sweep directories keep resuming.
    """
    flat = override_dirname
    for separator in {"/", os.sep, os.altsep} - {None}:
        flat = flat.replace(separator, "_")
    if flat == override_dirname:
        return override_dirname
    return f"{flat}~{hashlib.sha256(override_dirname.encode()).hexdigest()[:8]}"


def register_job_dirname_resolver() -> None:
    from omegaconf import OmegaConf

    if not OmegaConf.has_resolver(JOB_DIRNAME_RESOLVER):
        OmegaConf.register_new_resolver(JOB_DIRNAME_RESOLVER, flat_job_dirname)


# At import rather than in main(): a launcher that runs sweep jobs in other processes (submitit's SLURM jobs)
# resolves hydra.sweep.subdir there without calling main(); unpickling this module's ``run`` imports it.
register_job_dirname_resolver()


def strip_local_rank_argument(argv: list[str]) -> list[str]:
    """Remove the ``--local_rank=N`` / ``--local_rank N`` the deepspeed launcher appends (Hydra rejects it)."""
    out, skip_next = [], False
    for i, arg in enumerate(argv):
        if skip_next:
            skip_next = False
            continue
        if arg.startswith("--local_rank=") or arg.startswith("--local-rank="):
            os.environ.setdefault("LOCAL_RANK", arg.split("=", 1)[1])
            continue
        if arg in ("--local_rank", "--local-rank") and i + 1 < len(argv):
            os.environ.setdefault("LOCAL_RANK", argv[i + 1])
            skip_next = True
            continue
        out.append(arg)
    return out


def run(cfg) -> dict:
    """Run one training job from a composed config.

    Single run: user errors become one line on stderr and exit 2; bugs raise with their traceback.
    Multirun (``-m``, one call per sweep job): the job trains in its own sweep subdirectory; a job already
    finished with the same config is skipped; a job that raises is recorded in a ``FAILED`` marker, reported
    in one line, and the sweep goes on; a job stopped by SIGTERM/SIGINT ends the whole sweep (exit 0), which
    the same command resumes.
    """
    if is_multirun():
        return run_sweep_job(cfg)
    return _train(cfg, exit_on_user_error=True)


def _train(cfg, exit_on_user_error: bool) -> dict:
    from attnres_train.data import DataStateError
    from attnres_train.data.config import DataConfigError
    from attnres_train.model.config import ModelConfigError

    from .checkpoint import CheckpointError, no_space_left
    from .config import RunConfigError
    from .divergence import TrainingDivergedError
    from .optim import OptimConfigError
    from .resume_config import ResumeConfigError
    from .run_lock import RunDirLockedError
    from .trainer import Trainer

    from attnres_train.interop.kimi_linear import InteropError

    user_errors = (RunConfigError, ModelConfigError, DataConfigError, OptimConfigError, CheckpointError,
                   DataStateError, ResumeConfigError, RunDirLockedError, TrainingDivergedError, InteropError)
    try:
        return Trainer(cfg).run()
    except user_errors as exc:
        if not exit_on_user_error:
            raise
        prefix = "error: resume: " if isinstance(exc, DataStateError) else "error: "
        print(f"{prefix}{exc}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None
    except OSError as exc:
        full = no_space_left(exc, Path(str(cfg.run_dir)))
        if full is None or not exit_on_user_error:
            raise
        print(f"error: {full}: {exc.strerror or exc}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None


def is_multirun() -> bool:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def run_sweep_job(cfg) -> dict:
    """One job of a Hydra multirun; never raises for a failed job, so the sweep continues."""
    import traceback

    from hydra.core.hydra_config import HydraConfig
    from omegaconf import OmegaConf

    from .run_state import FAILED_NAME, config_key, finished_marker, is_finished_with, write_json_atomic

    # Hydra computed the job's directory (sweep dir / override_dirname) identically on every rank, before any
    # rank ran; the trainer puts checkpoints and metrics in cfg.run_dir, so that is where it must point.
    job_dir = Path(HydraConfig.get().runtime.output_dir).resolve()
    cfg.run_dir = str(job_dir)
    is_main = int(os.environ.get("RANK", "0")) == 0
    job_name = HydraConfig.get().job.override_dirname or job_dir.name
    try:
        resolved = OmegaConf.to_container(cfg, resolve=True)
        if cfg.train.resume == "auto" and is_finished_with(job_dir, config_key(resolved)):
            print(f"skipped (already finished): {job_name}", flush=True)
            return {**(finished_marker(job_dir) or {}), "skipped": True}
        result = _train(cfg, exit_on_user_error=False)
    except Exception as exc:  # noqa: BLE001 - any failure of one job is recorded, the sweep goes on
        message = f"{type(exc).__name__}: {exc}"
        if is_main:
            write_json_atomic(
                job_dir / FAILED_NAME,
                {"error": message, "job": job_name, "traceback": traceback.format_exc()},
            )
        print(f"error: job {job_name} failed: {message} (details in {job_dir / FAILED_NAME})",
              file=sys.stderr, flush=True)
        return {"failed": True, "error": message}
    if result.get("stopped_by"):
        print(f"sweep stopped by {result['stopped_by']} in job {job_name}; run the same command again to resume",
              flush=True)
        raise SystemExit(0)
    return result


def check_run_dir_override(argv: list[str]) -> None:
    """Hydra creates ``run_dir`` before the app runs and reports a failure with its own traceback; a run_dir given
    on the command line is checked first, so an impossible one is one line."""
    values = [arg.split("=", 1)[1] for arg in argv if arg.lstrip("+").startswith("run_dir=")]
    if not values or "${" in values[-1]:
        return
    path = Path(values[-1]).expanduser()
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise SystemExit(f"error: run_dir={values[-1]}: cannot create the directory ({error.strerror or error})")
    if not os.access(path, os.W_OK):
        raise SystemExit(f"error: run_dir={values[-1]}: the directory is not writable")


def main() -> None:
    import hydra

    from .config import register_schema

    sys.argv = strip_local_rank_argument(sys.argv)
    if "-m" not in sys.argv and "--multirun" not in sys.argv:
        check_run_dir_override(sys.argv[1:])
    register_schema()
    app = hydra.main(version_base="1.3", config_path=str(config_dir()), config_name="train")(run)
    try:
        app()
    finally:
        shut_down_process_group()


def shut_down_process_group() -> None:
    """Tear the process group down before the interpreter exits: left to static destruction, gloo's worker
    threads can abort a rank ("terminate called without an active exception") after the run has finished."""
    import torch.distributed

    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
