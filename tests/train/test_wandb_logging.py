"""logger=wandb: offline without an API key, the resolved config and metrics logged, the key never printed."""

import pytest
from cli_helpers import check_ok, run_train

from attnres_train.train.config import LoggerConfig
from attnres_train.train.metrics import wandb_mode

pytest.importorskip("wandb")


def test_auto_mode_is_offline_without_a_key_and_online_with_one(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    assert wandb_mode(LoggerConfig(backend="wandb")) == "offline"
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert wandb_mode(LoggerConfig(backend="wandb")) == "online"
    assert wandb_mode(LoggerConfig(backend="wandb", wandb_mode="disabled")) == "disabled"


@pytest.mark.slow
def test_wandb_offline_run_logs_config_and_metrics(tmp_path):
    run_dir = tmp_path / "run"
    secret = "s3cr3t" * 7
    result = check_ok(run_train(
        [f"run_dir={run_dir}", "model=tiny", "logger=wandb", "logger.wandb_mode=offline", "train.max_steps=2",
         "data.seq_len=64", "train.micro_batch_size=2", "train.val_batches=1", "train.log_every=1",
         "optim.warmup_steps=1", "train.progress_bar=false", "train.device=cpu"],
        cwd=tmp_path, WANDB_API_KEY=secret, WANDB_SILENT="true", HOME=str(tmp_path),
    ))
    assert secret not in result.stdout and secret not in result.stderr
    runs = list((run_dir / "wandb").glob("offline-run-*"))
    assert len(runs) == 1, list((run_dir / "wandb").iterdir())
    files = {p.name for p in runs[0].rglob("*")}
    assert any(name.endswith(".wandb") for name in files), files
