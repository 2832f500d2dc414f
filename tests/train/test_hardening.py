"""The trainer refuses to let a bad run or a bad file through silently: divergence, damaged checkpoints, two
writers on one run_dir, config changes on resume, planted pickles, and user errors that must be one line.

Every case runs the real ``attnres-train`` command on ``model=tiny`` (see cli_helpers.py).
"""

from __future__ import annotations

import errno
import hashlib
import json
import math
import signal
from pathlib import Path

import pytest
import torch

from attnres_train.train.checkpoint import CheckpointError, CheckpointManager
from attnres_train.train.run_lock import RunDirLock, RunDirLockedError

from cli_helpers import (
    TINY_ARGS,
    Launched,
    check_ok,
    complete_checkpoints,
    copy_run,
    describe,
    hydra_bookkeeping,
    last_logged_step,
    read_metrics,
    run,
    run_train,
    snapshot,
    train_command,
    train_records,
)

pytestmark = pytest.mark.slow


def strict_json_lines(path: Path) -> list[dict]:
    """Every line parsed as strict JSON: NaN / Infinity are not JSON and fail here."""
    def refuse(constant):
        raise ValueError(f"{path}: non-standard JSON constant {constant}")

    return [json.loads(line, parse_constant=refuse) for line in path.read_text().splitlines() if line.strip()]


def assert_one_line_error(result, *must_name: str) -> str:
    assert result.returncode != 0, describe(result)
    assert "Traceback" not in result.stderr, describe(result)
    errors = [line for line in result.stderr.splitlines() if line.startswith("error")]
    assert len(errors) == 1, describe(result)
    for name in must_name:
        assert name in errors[0], f"the error line does not name {name!r}\n{describe(result)}"
    return errors[0]


def module_weights(tag_dir: Path) -> dict:
    return torch.load(tag_dir / "mp_rank_00_model_states.pt", weights_only=True)["module"]


def flip_bytes(path: Path, at_fraction: float = 0.5, count: int = 64) -> None:
    data = bytearray(path.read_bytes())
    start = int(len(data) * at_fraction)
    for i in range(start, min(start + count, len(data))):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.fixture(scope="module")
def four_step_run(tmp_path_factory):
    """A finished 4-step run with checkpoints at steps 2 and 4 and a constant lr after one warmup step."""
    root = tmp_path_factory.mktemp("four")
    run_dir = root / "run"
    check_ok(run_train([*TINY_ARGS, f"run_dir={run_dir}", "train.max_steps=4", "train.checkpoint_every=2",
                        "optim.schedule=constant"], cwd=root))
    assert complete_checkpoints(run_dir) == ["step_00000002", "step_00000004"]
    return run_dir


# --- divergence ------------------------------------------------------------------------------------------------


def test_a_diverging_run_stops_naming_the_step_and_keeps_only_finite_checkpoints(tmp_path):
    run_dir = tmp_path / "run"
    result = run_train([*TINY_ARGS, f"run_dir={run_dir}", "train.max_steps=12", "train.checkpoint_every=1",
                        "train.keep_checkpoints=2", "optim.lr=1e4", "optim.grad_clip=0", "train.val_every=0"],
                       cwd=tmp_path)
    line = assert_one_line_error(result, "diverged at step", "train.skip_nonfinite_steps=3")
    records = strict_json_lines(run_dir / "metrics.jsonl")
    skipped = [r for r in records if r.get("skipped_update")]
    assert len(skipped) == 4 and all(r["loss"] is None or not math.isfinite(r["loss"]) for r in skipped), records
    stopped_at = skipped[-1]["step"]
    assert f"step {stopped_at}" in line
    assert not (run_dir / "FINISHED").exists()
    tags = complete_checkpoints(run_dir)
    assert tags, "the checkpoints written before the divergence must survive"
    for tag in tags:
        for name, tensor in module_weights(run_dir / "checkpoints" / tag).items():
            assert torch.isfinite(tensor).all(), f"{tag}: {name} holds non-finite values"
    # A skipped update leaves the weights exactly as they were.
    if len(tags) == 2 and int(tags[0][5:]) >= skipped[0]["step"] - 1:
        first, second = (module_weights(run_dir / "checkpoints" / tag) for tag in tags)
        assert [name for name in first if not torch.equal(first[name], second[name])] == []


# --- damaged checkpoints ---------------------------------------------------------------------------------------


def test_flipped_bytes_are_detected_and_the_resume_falls_back_loudly(four_step_run, tmp_path):
    run_dir = copy_run(four_step_run, tmp_path / "run")
    damaged = run_dir / "checkpoints" / "step_00000004" / "mp_rank_00_model_states.pt"
    size = damaged.stat().st_size
    flip_bytes(damaged)
    assert damaged.stat().st_size == size
    result = check_ok(run_train([*TINY_ARGS, f"run_dir={run_dir}", "train.max_steps=5", "train.checkpoint_every=2",
                                 "optim.schedule=constant"], cwd=tmp_path))
    assert "WARNING" in result.stderr and str(damaged) in result.stderr, describe(result)
    assert "falling back to" in result.stderr and "step_00000002" in result.stderr, describe(result)
    assert "resumed_from=step_00000002 step=2" in result.stdout, describe(result)
    # Steps 3-4 are retrained from step 2 and reproduce the original trajectory exactly.
    original = {r["step"]: r["loss"] for r in train_records(four_step_run)}
    again = {r["step"]: r["loss"] for r in train_records(run_dir)}
    assert again[3] == original[3] and again[4] == original[4]
    # The damaged checkpoint was moved aside, not deleted.
    assert list((run_dir / "checkpoints" / "superseded").glob("step_00000004.*"))


def test_no_verifiable_checkpoint_stops_without_starting_over(four_step_run, tmp_path):
    run_dir = copy_run(four_step_run, tmp_path / "run")
    for tag in complete_checkpoints(run_dir):
        flip_bytes(run_dir / "checkpoints" / tag / "mp_rank_00_model_states.pt")
    before = snapshot(run_dir, ignore=hydra_bookkeeping)
    result = run_train([*TINY_ARGS, f"run_dir={run_dir}", "train.max_steps=6"], cwd=tmp_path)
    assert_one_line_error(result, "passes verification")
    assert snapshot(run_dir, ignore=hydra_bookkeeping) == before


def _rewrite_marker_for(path: Path) -> None:
    """What someone who can rewrite a checkpoint file and its marker would do: record the new size and hash."""
    marker_path = path.parent / "COMPLETE"
    marker = json.loads(marker_path.read_text())
    marker["files"][path.name] = path.stat().st_size
    marker["sha256"][path.name] = hashlib.sha256(path.read_bytes()).hexdigest()
    marker_path.write_text(json.dumps(marker))


class _Payload:
    def __init__(self, sentinel: str):
        self.sentinel = sentinel

    def __reduce__(self):
        return (Path.touch, (Path(self.sentinel),))


@pytest.mark.parametrize("planted_in", ["mp_rank_00_model_states.pt", "rank_state_00000.pt"])
def test_a_planted_pickle_payload_does_not_run(four_step_run, tmp_path, planted_in):
    run_dir = copy_run(four_step_run, tmp_path / "run")
    target = run_dir / "checkpoints" / "step_00000004" / planted_in
    sentinel = tmp_path / "payload_ran"
    payload = torch.load(target, weights_only=False)
    payload["planted"] = _Payload(str(sentinel))
    torch.save(payload, target)
    _rewrite_marker_for(target)
    result = run_train([*TINY_ARGS, f"run_dir={run_dir}", "train.max_steps=6", "train.checkpoint_every=2"],
                       cwd=tmp_path)
    assert not sentinel.exists(), "the planted payload ran"
    assert_one_line_error(result, str(target), "not loaded")


# --- one writer per run_dir -------------------------------------------------------------------------------------


def test_a_second_launch_is_refused_while_the_first_completes_undisturbed(tmp_path):
    run_dir = tmp_path / "run"
    # Long enough that it is still running when the second launch arrives, however loaded the machine is; it is
    # stopped with SIGTERM afterwards (checkpoint, exit 0), as a scheduler would.
    args = [*TINY_ARGS, f"run_dir={run_dir}", "train.max_steps=100000", "train.checkpoint_every=0"]
    first = Launched(train_command(args), tmp_path, tmp_path / "first")
    try:
        first.wait_until(lambda: (last_logged_step(run_dir) or 0) >= 1, timeout=180)
        second = run_train(args, cwd=tmp_path)
        line = assert_one_line_error(second, "is in use by pid", str(first.process.pid))
        assert str(run_dir) in line
        first.send(signal.SIGTERM)
        assert first.wait(timeout=300) == 0, first.output()
    finally:
        first.kill()
    steps = [r["step"] for r in train_records(run_dir)]
    assert steps == list(range(1, len(steps) + 1)) and steps, steps  # no duplicated or interleaved records
    assert not (run_dir / "checkpoints" / "superseded").exists()
    assert complete_checkpoints(run_dir) == [f"step_{steps[-1]:08d}"]


def test_run_dir_lock_is_exclusive_and_a_dead_holder_is_taken_over(tmp_path):
    stale = tmp_path / ".lock"
    stale.write_text(json.dumps({"host": "elsewhere", "pid": 999999, "started_at": "long ago"}))
    first = RunDirLock(tmp_path)
    first.acquire()  # the previous holder's record is there, but no process holds the lock
    try:
        with pytest.raises(RunDirLockedError, match=r"in use by pid \d+ on host"):
            RunDirLock(tmp_path).acquire()
    finally:
        first.release()
    with RunDirLock(tmp_path):
        pass


# --- config changes on resume -----------------------------------------------------------------------------------


def test_a_changed_peak_lr_on_resume_is_applied_and_logged(four_step_run, tmp_path):
    run_dir = copy_run(four_step_run, tmp_path / "run")
    saved_lr = train_records(four_step_run)[-1]["lr"]
    result = check_ok(run_train([*TINY_ARGS, f"run_dir={run_dir}", "train.max_steps=6", "optim.schedule=constant",
                                 "optim.lr=0.004"], cwd=tmp_path))
    assert "applying the changed config" in result.stdout and "optim.lr" in result.stdout, describe(result)
    new_records = [r for r in train_records(run_dir) if r["step"] > 4]
    assert saved_lr != pytest.approx(0.004)
    assert [r["lr"] for r in new_records] == pytest.approx([0.004, 0.004])
    resolved = (run_dir / "resolved_config.yaml").read_text()
    assert "lr: 0.004" in resolved


REFUSED_RESUMES = {
    # what the checkpoint's data order depends on
    "changed_seed_and_data": (["train.max_steps=6", "train.seed=7", "data.seq_len=32"],
                              ["train.seed", "data.seq_len"]),
    # fewer steps than the checkpoint already took: FINISHED (and its loss) must stay
    "max_steps_below_the_checkpoint": (["train.max_steps=2", "train.checkpoint_every=2", "optim.schedule=constant"],
                                       ["train.max_steps=2", "step 4"]),
}


@pytest.mark.parametrize("case", list(REFUSED_RESUMES))
def test_a_resume_that_cannot_continue_is_refused_naming_why_and_changes_nothing(four_step_run, tmp_path, case):
    overrides, names = REFUSED_RESUMES[case]
    run_dir = copy_run(four_step_run, tmp_path / "run")
    before = snapshot(run_dir, ignore=hydra_bookkeeping)
    result = run_train([*TINY_ARGS, f"run_dir={run_dir}", *overrides], cwd=tmp_path)
    assert_one_line_error(result, *names)
    assert snapshot(run_dir, ignore=hydra_bookkeeping) == before
    assert math.isfinite(json.loads((run_dir / "FINISHED").read_text(), parse_constant=float)["loss"])


def test_resume_never_starts_fresh_files_and_keeps_the_old_ones(four_step_run, tmp_path):
    run_dir = copy_run(four_step_run, tmp_path / "run")
    old_metrics = (run_dir / "metrics.jsonl").read_text()
    check_ok(run_train([*TINY_ARGS, f"run_dir={run_dir}", "train.max_steps=2", "train.resume=never",
                        "optim.schedule=constant"], cwd=tmp_path))
    assert [r["step"] for r in train_records(run_dir)] == [1, 2]
    kept = [p for p in run_dir.glob("metrics.*.jsonl") if p.name != "metrics.superseded.jsonl"]
    assert len(kept) == 1 and kept[0].read_text() == old_metrics
    superseded = sorted(p.name.split(".")[0] for p in (run_dir / "checkpoints" / "superseded").iterdir())
    assert superseded == ["step_00000002", "step_00000004"]
    assert complete_checkpoints(run_dir) == ["step_00000002"]


# --- one clear line for each user error ---------------------------------------------------------------------------


def test_a_run_dir_that_cannot_be_created_is_one_line(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    result = run_train([*TINY_ARGS, f"run_dir={blocker}/run", "train.max_steps=1"], cwd=tmp_path)
    assert_one_line_error(result, "run_dir", "cannot create")


def test_an_empty_dataset_is_one_line(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    result = run_train([*TINY_ARGS, f"run_dir={tmp_path / 'run'}", "train.max_steps=1", "data=hf",
                        f"data.hf_data_files={empty}"], cwd=tmp_path)
    assert_one_line_error(result, str(empty))


def test_export_to_a_missing_directory_is_one_line(four_step_run, tmp_path):
    import sys

    target = tmp_path / "missing" / "model.pt"
    result = run([sys.executable, "-m", "attnres_train.train.export",
                  str(four_step_run / "checkpoints" / "step_00000004"), str(target)], cwd=tmp_path)
    assert_one_line_error(result, str(target.parent))
    assert not target.parent.exists()


class _DiskFullEngine:
    """Writes half a shard, then fails the way a full disk does inside torch.save."""

    def save_checkpoint(self, save_dir, tag, client_state, save_latest):
        tag_dir = Path(save_dir) / tag
        tag_dir.mkdir(parents=True, exist_ok=True)
        (tag_dir / "mp_rank_00_model_states.pt").write_bytes(b"\0" * 1000)
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError as error:
            raise RuntimeError("[enforce fail at inline_container.cc:603] . unexpected pos 64 vs 0") from error


def test_a_full_disk_during_a_save_is_named_and_leaves_no_partial_checkpoint(tmp_path):
    manager = CheckpointManager(tmp_path, keep_last=2, rank=0, world_size=1, barrier=lambda: None)
    with pytest.raises(CheckpointError, match="no space left on the device") as excinfo:
        manager.save(_DiskFullEngine(), 3, {"step": 3})
    assert "unexpected pos" not in str(excinfo.value).split(";")[0]
    assert not (tmp_path / "step_00000003").exists()
    assert manager.latest() is None


def test_metrics_and_markers_are_strict_json(four_step_run):
    strict_json_lines(four_step_run / "metrics.jsonl")
    json.loads((four_step_run / "FINISHED").read_text(), parse_constant=lambda c: pytest.fail(c))
    assert read_metrics(four_step_run)
