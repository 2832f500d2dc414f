"""`attnres-train` with `parallel.pipeline_stages=2` under torchrun on CPU (gloo): the trainer drives DeepSpeed's
pipeline engine, matches one process on the same global batch, and resumes exactly under pipelining."""

import json
import math
import shutil
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "train"))
from cli_helpers import check_ok, complete_checkpoints, run, run_train, torchrun_command, train_records  # noqa: E402

pytestmark = pytest.mark.slow

ARGS = (
    "model=tiny",
    "model.moe_aux_loss_coef=0.0",
    "data.seq_len=64",
    "train.device=cpu",
    "train.precision=fp32",
    "train.micro_batch_size=2",
    "train.grad_accum_steps=2",
    "train.val_batches=1",
    "train.val_every=2",
    "train.log_every=1",
    "train.progress_bar=false",
    "optim.warmup_steps=1",
    "optim.schedule=constant",
    "parallel=zero1",
)


def _close(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=1e-5, abs_tol=0.0)


@pytest.fixture(scope="module")
def single_process_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipe_single")
    run_dir = root / "run"
    check_ok(run_train([*ARGS, f"run_dir={run_dir}", "train.max_steps=4"], cwd=root))
    return run_dir


def _pipeline(root: Path, run_dir: Path, steps: int, *extra: str):
    return run(torchrun_command(2, [*ARGS, "parallel.pipeline_stages=2", f"run_dir={run_dir}",
                                    f"train.max_steps={steps}", *extra]), cwd=root)


def test_two_stage_pipeline_matches_one_process_and_resumes_exactly(single_process_run, tmp_path):
    expected = train_records(single_process_run)
    straight_dir = tmp_path / "straight"
    check_ok(_pipeline(tmp_path, straight_dir, 4))
    straight = train_records(straight_dir)
    assert [r["step"] for r in straight] == [1, 2, 3, 4]
    for got, want in zip(straight, expected):
        assert got["tokens"] == want["tokens"] and got["lr"] == want["lr"]
        assert _close(got["loss"], want["loss"]), (got["step"], got["loss"], want["loss"])
    val = [r for r in (straight_dir / "metrics.jsonl").read_text().splitlines() if "val_loss" in r]
    assert len(val) == 2
    traffic = json.loads((straight_dir / "model_summary.json").read_text())["pipeline"]
    assert traffic["stages"] == 2 and sum(traffic["stage_layers"]) == 4
    (boundary,) = traffic["boundaries"]
    # fp32, micro-batch 2 x 64 tokens, hidden 64: tensors x B x T x D x 4 bytes
    assert boundary["bytes_per_micro_batch"] == boundary["tensors"] * 2 * 64 * 64 * 4

    # Exported, the pipeline checkpoint is the plain model the single process trained (same trajectory).
    from attnres_train.train.export import exported_state

    pipe_cfg, pipe_state = exported_state(straight_dir / "checkpoints" / "step_00000004")
    plain_cfg, plain_state = exported_state(single_process_run / "checkpoints" / "step_00000004")
    assert pipe_cfg == plain_cfg and pipe_state.keys() == plain_state.keys()
    for key, value in plain_state.items():
        torch.testing.assert_close(pipe_state[key], value, rtol=1e-4, atol=1e-6, msg=key)

    resumed_dir = tmp_path / "resumed"
    check_ok(_pipeline(tmp_path, resumed_dir, 2))
    assert complete_checkpoints(resumed_dir) == ["step_00000002"]
    result = check_ok(_pipeline(tmp_path, resumed_dir, 4))
    assert "resumed_from=step_00000002" in result.stdout
    assert [r["loss"] for r in train_records(resumed_dir)] == [r["loss"] for r in straight]


def test_pipeline_checkpoint_resumes_with_one_stage_and_back(single_process_run, tmp_path):
    """P=2 (ZeRO-1) -> P=1 (ZeRO-0) -> P=2: weights, Adam moments and the schedule carry over by name."""
    expected = {r["step"]: r for r in train_records(single_process_run)}
    run_dir = tmp_path / "run"
    check_ok(_pipeline(tmp_path, run_dir, 2))
    one_stage = check_ok(run_train([*ARGS, "parallel=zero0", f"run_dir={run_dir}", "train.max_steps=4"], cwd=tmp_path))
    assert "resumed_from=step_00000002" in one_stage.stdout
    output = one_stage.stdout + one_stage.stderr  # Hydra's log handler writes to stdout
    assert "parallel.pipeline_stages: 2 -> 1" in output and "by parameter name" in output
    records = {r["step"]: r for r in train_records(run_dir)}
    assert sorted(records) == [1, 2, 3, 4]
    for step in (3, 4):  # step 4's loss depends on the Adam moments restored at step 2
        assert records[step]["lr"] == expected[step]["lr"]
        assert _close(records[step]["loss"], expected[step]["loss"]), (step, records[step], expected[step])

    # Back to two stages from the one-stage checkpoint, against one stage continuing natively.
    native_dir = tmp_path / "native"
    shutil.copytree(run_dir, native_dir)
    check_ok(run_train([*ARGS, "parallel=zero0", f"run_dir={native_dir}", "train.max_steps=5"], cwd=tmp_path))
    check_ok(_pipeline(tmp_path, run_dir, 5))
    got, want = train_records(run_dir)[-1], train_records(native_dir)[-1]
    assert got["step"] == want["step"] == 5 and _close(got["loss"], want["loss"]), (got, want)


def test_fp32_zero0_pipeline_clips_by_the_norm_of_all_stages(single_process_run, tmp_path):
    """DeepSpeed's own fp32 ZeRO-0 pipeline clipping counts only the first stage's gradients; the trainer clips
    by the global norm instead, so the trajectory (clipping active: norms of 3-6 against 1.0) is the same."""
    run_dir = tmp_path / "zero0"
    check_ok(_pipeline(tmp_path, run_dir, 4, "parallel=zero0"))
    expected = train_records(single_process_run)
    got = train_records(run_dir)
    assert [r["step"] for r in got] == [1, 2, 3, 4]
    for a, e in zip(got, expected):
        assert e["grad_norm"] > 1.0 and _close(a["grad_norm"], e["grad_norm"]), (a, e)
        assert _close(a["loss"], e["loss"]), (a["step"], a["loss"], e["loss"])


def test_pipeline_rejects_zero2_and_stage_counts_that_do_not_divide(tmp_path):
    bad_zero = run_train([*ARGS, "parallel=zero2", "parallel.pipeline_stages=2", f"run_dir={tmp_path / 'a'}"],
                         cwd=tmp_path)
    assert bad_zero.returncode != 0 and "parallel.zero_stage" in bad_zero.stderr
    bad_split = run_train([*ARGS, "parallel.pipeline_stages=2", f"run_dir={tmp_path / 'b'}"], cwd=tmp_path)
    assert bad_split.returncode != 0 and "parallel.pipeline_stages=2" in bad_split.stderr


def test_moved_stage_cut_and_pipelined_bf16_resume_by_parameter_name(single_process_run, tmp_path):
    """The same stage count with another cut is another layout too; DeepSpeed's pipelined bf16 optimizer without
    ZeRO cannot read back its own shards, so such checkpoints always resume by name."""
    expected = {r["step"]: r for r in train_records(single_process_run)}
    run_dir = tmp_path / "cut"
    check_ok(_pipeline(tmp_path, run_dir, 2, "parallel.pipeline_boundaries=[1]"))
    moved = check_ok(_pipeline(tmp_path, run_dir, 4, "parallel.pipeline_boundaries=[3]"))
    assert "pipeline stage cuts: [0, 2, 6] -> [0, 4, 6]" in moved.stdout + moved.stderr
    records = {r["step"]: r for r in train_records(run_dir)}
    for step in (3, 4):
        assert _close(records[step]["loss"], expected[step]["loss"]), (step, records[step], expected[step])

    bf16_dir = tmp_path / "bf16"
    bf16 = ("train.precision=bf16", "parallel=zero0")
    check_ok(_pipeline(tmp_path, bf16_dir, 2, *bf16))
    again = check_ok(_pipeline(tmp_path, bf16_dir, 3, *bf16))
    assert "resumed_from=step_00000002" in again.stdout and "by parameter name" in again.stdout + again.stderr
    check_ok(run_train([*ARGS, *bf16, f"run_dir={bf16_dir}", "train.max_steps=4"], cwd=tmp_path))
    losses = [r["loss"] for r in train_records(bf16_dir)]
    assert len(losses) == 4 and all(math.isfinite(x) for x in losses) and losses[3] < losses[0]
