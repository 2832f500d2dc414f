"""Interrupting a real training process: SIGKILL then exact resume, and SIGTERM's clean checkpoint-and-exit.

Exactness is checked against an uninterrupted run of the same config: every per-step loss, grad norm and
learning rate logged after the resume must equal the straight run's bit for bit (metrics.jsonl stores floats
with repr, which round-trips exactly).
"""

from __future__ import annotations

import json
import signal

import pytest
from cli_helpers import (
    Launched,
    check_ok,
    complete_checkpoints,
    describe,
    last_logged_step,
    read_metrics,
    run_train,
    train_command,
    train_records,
    val_records,
)

pytestmark = pytest.mark.slow

# seq_len 128 x 4 rows keeps a step around 0.1 s: long enough to interrupt the process between two steps.
RESUME_ARGS = (
    "model=tiny",
    "train.device=cpu",
    "data.seq_len=128",
    "train.micro_batch_size=4",
    "train.val_batches=1",
    "train.log_every=1",
    "optim.warmup_steps=1",
    "train.progress_bar=false",
)
COMPARED_FIELDS = ("step", "loss", "aux_loss", "lr", "grad_norm", "tokens", "moe")


def trajectory(records: list[dict]) -> list[dict]:
    return [{field: r.get(field) for field in COMPARED_FIELDS} for r in records]


def test_sigkill_mid_training_then_resume_is_bitwise_exact(tmp_path):
    total_steps = 8
    common = [*RESUME_ARGS, f"train.max_steps={total_steps}"]

    straight_dir = tmp_path / "straight"
    check_ok(run_train([*common, f"run_dir={straight_dir}", "train.checkpoint_every=1000"], cwd=tmp_path))
    straight = train_records(straight_dir)
    assert [r["step"] for r in straight] == list(range(1, total_steps + 1))

    killed_dir = tmp_path / "killed"
    killed_args = [*common, f"run_dir={killed_dir}", "train.checkpoint_every=4"]
    launched = Launched(train_command(killed_args), cwd=tmp_path, log_dir=tmp_path / "killed_logs")
    try:
        # A complete checkpoint at step 4, and training already past it.
        launched.wait_until(
            lambda: "step_00000004" in complete_checkpoints(killed_dir) and (last_logged_step(killed_dir) or 0) >= 5,
            timeout=180,
        )
        launched.send(signal.SIGKILL)
        assert launched.wait(timeout=30) == -signal.SIGKILL
    finally:
        launched.kill()
    killed_at = last_logged_step(killed_dir)
    assert 5 <= killed_at < total_steps, f"the kill should land mid-run, it landed after step {killed_at}"
    assert complete_checkpoints(killed_dir) == ["step_00000004"]

    resumed = check_ok(run_train(killed_args, cwd=tmp_path))
    assert "resumed_from=step_00000004 step=4" in resumed.stdout, describe(resumed)

    # The abandoned steps 5.. were moved aside; metrics.jsonl holds one consistent history.
    superseded = train_records(killed_dir, "metrics.superseded.jsonl")
    assert [r["step"] for r in superseded] == list(range(5, killed_at + 1))
    after = train_records(killed_dir)
    assert trajectory(after) == trajectory(straight)
    assert [r["val_loss"] for r in val_records(killed_dir)] == [r["val_loss"] for r in val_records(straight_dir)]
    # What the killed process logged before dying was on the same trajectory too.
    assert trajectory(superseded) == trajectory(straight[4:killed_at])


def test_sigterm_saves_a_checkpoint_exits_zero_and_resumes(tmp_path):
    run_dir = tmp_path / "run"
    common = [*RESUME_ARGS, f"run_dir={run_dir}", "train.checkpoint_every=0"]
    launched = Launched(train_command([*common, "train.max_steps=10000"]), cwd=tmp_path,
                        log_dir=tmp_path / "logs")
    try:
        launched.wait_until(lambda: (last_logged_step(run_dir) or 0) >= 2, timeout=180)
        launched.send(signal.SIGTERM)
        exit_code = launched.wait(timeout=120)
    finally:
        launched.kill()
    output = launched.output()
    assert exit_code == 0, output

    stopped_at = last_logged_step(run_dir)
    assert stopped_at is not None and stopped_at >= 2
    assert complete_checkpoints(run_dir) == [f"step_{stopped_at:08d}"], output
    assert (run_dir / "checkpoints" / "latest_complete").read_text().strip() == f"step_{stopped_at:08d}"
    assert f"received SIGTERM: checkpoint saved at step {stopped_at}" in output
    marker = json.loads((run_dir / "checkpoints" / f"step_{stopped_at:08d}" / "COMPLETE").read_text())
    assert marker["step"] == stopped_at

    resumed = check_ok(run_train([*common, f"train.max_steps={stopped_at + 2}"], cwd=tmp_path))
    assert f"resumed_from=step_{stopped_at:08d} step={stopped_at}" in resumed.stdout, describe(resumed)
    steps = [r["step"] for r in train_records(run_dir)]
    assert steps == list(range(1, stopped_at + 3))
    tokens = [r["tokens"] for r in read_metrics(run_dir) if "loss" in r]
    assert tokens == [step * 4 * 128 for step in steps]  # the token count continues from the checkpoint
    assert complete_checkpoints(run_dir)[-1] == f"step_{stopped_at + 2:08d}"
