"""End-to-end tests of the ``attnres-train`` command: a default run, idempotent rerun, and bad inputs.

Every case launches the installed console script in a subprocess and judges it by what a user sees: the exit
code, stderr, and the files in ``run_dir``. Bad inputs must fail with one line naming the field or path, a
non-zero exit, no traceback, and an existing run left untouched.
"""

from __future__ import annotations

import json
import math
import os

import pytest
from cli_helpers import (
    TINY_ARGS,
    check_ok,
    complete_checkpoints,
    copy_run,
    describe,
    hydra_bookkeeping,
    read_metrics,
    run_train,
    snapshot,
    train_records,
    val_records,
)

from attnres_train.train.cli import strip_local_rank_argument

pytestmark = pytest.mark.slow


# --- the default configuration ----------------------------------------------------------------------------------


def test_default_config_runs_end_to_end_and_rerun_is_a_no_op(tmp_path):
    """`attnres-train` with the default model (small) and data (stdlib) groups, only shortened."""
    run_dir = tmp_path / "run"
    max_steps, micro_batch, seq_len = 3, 2, 64
    args = [f"run_dir={run_dir}", f"train.max_steps={max_steps}", f"data.seq_len={seq_len}",
            f"train.micro_batch_size={micro_batch}", "train.val_batches=1", "train.log_every=1",
            "optim.warmup_steps=1", "train.progress_bar=false"]
    first = check_ok(run_train(args, cwd=tmp_path))
    assert "Traceback" not in first.stderr, describe(first)

    on_cpu = "device=cpu" in first.stdout
    summary = json.loads((run_dir / "model_summary.json").read_text())
    num_layers = len(summary["layer_pattern"])
    records = train_records(run_dir)
    assert [r["step"] for r in records] == [1, 2, 3]
    for r in records:
        assert math.isfinite(r["loss"]) and 0 < r["loss"] < 20, r
        assert r["lr"] > 0, r
        assert r["grad_norm"] is not None and math.isfinite(r["grad_norm"]) and r["grad_norm"] > 0, r
        assert r["tokens"] == r["step"] * micro_batch * seq_len, r
        assert r["tokens_per_s"] > 0, r
        if on_cpu:
            assert r["mfu"] is None, r  # no peak FLOP/s is known for a CPU
        else:
            assert r["mfu"] is None or 0 < r["mfu"] < 1, r
        moe = r["moe"]
        # small: every layer but the first (dense) has an MoE MLP
        assert len(moe["max_violation_per_layer"]) == num_layers - 1, moe
        assert math.isfinite(moe["max_violation_mean"]), moe

    (val,) = val_records(run_dir)
    assert val["step"] == max_steps and math.isfinite(val["val_loss"]), val
    depth_weights = val["attnres_depth_weights"]
    assert len(depth_weights) == 2 * num_layers + 1  # one AttnRes mix per sublayer plus the output mix
    for weights in depth_weights:
        assert abs(sum(weights) - 1.0) < 1e-4, weights  # a softmax over the sources of that mix

    assert complete_checkpoints(run_dir) == [f"step_{max_steps:08d}"]
    marker = json.loads((run_dir / "checkpoints" / f"step_{max_steps:08d}" / "COMPLETE").read_text())
    assert marker["step"] == max_steps
    assert (run_dir / "checkpoints" / "latest_complete").read_text().strip() == f"step_{max_steps:08d}"

    # The same command again: resumes at max_steps, trains nothing, changes nothing.
    before = snapshot(run_dir, ignore=hydra_bookkeeping)
    again = check_ok(run_train(args, cwd=tmp_path))
    assert f"resumed_from=step_{max_steps:08d} step={max_steps}" in again.stdout, describe(again)
    assert snapshot(run_dir, ignore=hydra_bookkeeping) == before


# --- the deepspeed launcher's argument --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "argv, local_rank",
    [
        (["prog", "--local_rank=1", "model=tiny"], "1"),
        (["prog", "--local_rank", "1", "model=tiny"], "1"),
        (["prog", "--local-rank=3", "model=tiny"], "3"),
        (["prog", "model=tiny", "--local_rank", "2"], "2"),
    ],
)
def test_strip_local_rank_argument(argv, local_rank, monkeypatch):
    monkeypatch.setenv("LOCAL_RANK", "unset")  # recorded, so the value the function sets is undone afterwards
    monkeypatch.delenv("LOCAL_RANK")
    assert strip_local_rank_argument(argv) == ["prog", "model=tiny"]
    assert os.environ["LOCAL_RANK"] == local_rank


def test_strip_local_rank_argument_keeps_other_arguments_and_an_existing_local_rank(monkeypatch):
    monkeypatch.setenv("LOCAL_RANK", "0")  # set by the launcher's environment: it wins
    argv = ["prog", "train.max_steps=3", "--local_rank=1", "run_dir=/x"]
    assert strip_local_rank_argument(argv) == ["prog", "train.max_steps=3", "run_dir=/x"]
    assert os.environ["LOCAL_RANK"] == "0"
    assert strip_local_rank_argument(["prog", "a=1"]) == ["prog", "a=1"]


# --- bad inputs -------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A finished 2-step tiny run; tests copy it before pointing a bad command at it."""
    root = tmp_path_factory.mktemp("finished")
    run_dir = root / "run"
    check_ok(run_train([*TINY_ARGS, f"run_dir={run_dir}", "train.max_steps=2"], cwd=root))
    assert complete_checkpoints(run_dir) == ["step_00000002"]
    return run_dir


def assert_clean_failure(result, *must_name: str) -> str:
    """Non-zero exit; stderr is a short message naming every string in must_name, not a traceback."""
    assert result.returncode != 0, describe(result)
    assert "Traceback" not in result.stderr, describe(result)
    for name in must_name:
        assert name in result.stderr, f"stderr does not name {name!r}\n{describe(result)}"
    return result.stderr


BAD_INPUTS = {
    # mistyped keys: rejected by the typed schema while Hydra composes the config
    "mistyped_model_key": (["model.hidden_sise=3"], ["model.hidden_sise"]),
    "mistyped_train_key": (["train.max_step=3"], ["train.max_step"]),
    # impossible values
    "negative_hybrid_ratio": (["model.hybrid_ratio=-1"], ["model.hybrid_ratio"]),
    "zero_micro_batch": (["train.micro_batch_size=0"], ["train.micro_batch_size"]),
    "attnres_block_too_large": (["model.attnres_block_size=1000"], ["model.attnres_block_size"]),
    "zero_stage_5": (["parallel.zero_stage=5"], ["parallel.zero_stage"]),
    "muon_with_zero": (["optim=muon", "parallel=zero1"], ["parallel.zero_stage", "muon"]),
    "wrong_type": (["train.max_steps=many"], ["train.max_steps"]),
    # data that does not exist
    "missing_dataset": (["data=hf", "data.hf_dataset=/nonexistent/x.jsonl"],
                        ["data.hf_dataset", "/nonexistent/x.jsonl"]),
    "missing_tokenizer": (["data.tokenizer=/nonexistent/tokenizer_dir"],
                          ["data.tokenizer", "/nonexistent/tokenizer_dir"]),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_fails_cleanly_and_leaves_the_run_untouched(case, finished_run, tmp_path):
    overrides, names = BAD_INPUTS[case]
    run_dir = copy_run(finished_run, tmp_path / "run")
    before = snapshot(run_dir, ignore=hydra_bookkeeping)
    result = run_train([*TINY_ARGS, f"run_dir={run_dir}", "train.max_steps=4", *overrides], cwd=tmp_path)
    assert_clean_failure(result, *names)
    assert snapshot(run_dir, ignore=hydra_bookkeeping) == before


def test_a_world_size_without_a_launcher_is_one_line_and_leaves_the_run_untouched(finished_run, tmp_path):
    run_dir = copy_run(finished_run, tmp_path / "run")
    before = snapshot(run_dir, ignore=hydra_bookkeeping)
    result = run_train([*TINY_ARGS, f"run_dir={run_dir}", "train.max_steps=4"], cwd=tmp_path, RANK="1",
                       WORLD_SIZE="2")
    assert_clean_failure(result, "WORLD_SIZE=2", "MASTER_ADDR and MASTER_PORT", "torchrun")
    assert snapshot(run_dir, ignore=hydra_bookkeeping) == before


@pytest.mark.parametrize("env,single", [
    ({}, True),  # no launcher
    ({"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0"}, True),  # left over by an in-process group: no address
    ({"RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "h", "MASTER_PORT": "1"}, False),  # torchrun, one rank
    ({"RANK": "3", "WORLD_SIZE": "8", "MASTER_ADDR": "h", "MASTER_PORT": "1"}, False),
])
def test_one_process_or_a_launchers_rank(env, single):
    from attnres_train.train.engine import is_single_process

    assert is_single_process(env) is single


def test_bad_input_for_a_new_run_dir_writes_no_run_files(tmp_path):
    run_dir = tmp_path / "fresh"
    result = run_train([*TINY_ARGS, f"run_dir={run_dir}", "train.micro_batch_size=0"], cwd=tmp_path)
    assert_clean_failure(result, "train.micro_batch_size")
    assert not (run_dir / "checkpoints").exists()
    assert not (run_dir / "metrics.jsonl").exists()


def test_corrupt_checkpoint_is_named_and_left_untouched(finished_run, tmp_path):
    run_dir = copy_run(finished_run, tmp_path / "run")
    model_file = run_dir / "checkpoints" / "step_00000002" / "mp_rank_00_model_states.pt"
    with open(model_file, "r+b") as handle:
        handle.truncate(model_file.stat().st_size // 2)
    before = snapshot(run_dir, ignore=hydra_bookkeeping)
    result = run_train([*TINY_ARGS, f"run_dir={run_dir}", "train.max_steps=4"], cwd=tmp_path)
    assert_clean_failure(result, str(model_file))
    assert snapshot(run_dir, ignore=hydra_bookkeeping) == before


def test_incompatible_checkpoint_names_the_changed_field(finished_run, tmp_path):
    run_dir = copy_run(finished_run, tmp_path / "run")
    before = snapshot(run_dir, ignore=hydra_bookkeeping)
    result = run_train([*TINY_ARGS, f"run_dir={run_dir}", "train.max_steps=4", "model.hidden_size=32"],
                       cwd=tmp_path)
    stderr = assert_clean_failure(result, "model.hidden_size")
    assert "size mismatch" not in stderr  # not DeepSpeed's / torch's shape error
    assert snapshot(run_dir, ignore=hydra_bookkeeping) == before
    assert len(read_metrics(run_dir)) == len(read_metrics(finished_run))
