"""``attnres-train`` / ``python -m attnres_train.train``: the Hydra app that launches a pretraining run.

Works as one plain process, under ``torchrun`` and under the ``deepspeed`` launcher (whose ``--local_rank=N``
argument is taken off argv before Hydra parses it).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

CONFIG_DIR_ENV = "ATTNRES_TRAIN_CONFIG_DIR"


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
    """Run one training job from a composed config; user errors become one line on stderr and exit 2."""
    from attnres_train.data.config import DataConfigError
    from attnres_train.model.config import ModelConfigError

    from .checkpoint import CheckpointError
    from .config import RunConfigError
    from .optim import OptimConfigError
    from .trainer import Trainer

    user_errors = (RunConfigError, ModelConfigError, DataConfigError, OptimConfigError, CheckpointError)
    try:
        return Trainer(cfg).run()
    except user_errors as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None


def main() -> None:
    import hydra

    from .config import register_schema

    sys.argv = strip_local_rank_argument(sys.argv)
    register_schema()
    app = hydra.main(version_base="1.3", config_path=str(config_dir()), config_name="train")(run)
    app()


if __name__ == "__main__":
    main()
