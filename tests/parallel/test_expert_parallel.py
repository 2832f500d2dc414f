"""Expert parallelism on CPU (gloo): the all-to-all dispatch against one process, the trainer under
``parallel.expert_parallel`` against one process (ZeRO 0-2, EP x DP), resume across expert-parallel degrees,
export, and the one-line refusals of impossible layouts."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "train"))
from cli_helpers import (  # noqa: E402
    BIN_DIR,
    check_ok,
    complete_checkpoints,
    describe,
    free_port,
    run,
    run_train,
    torchrun_command,
    train_records,
)

pytestmark = pytest.mark.slow
HERE = Path(__file__).resolve().parent
ARGS = ("model=tiny", "data.seq_len=64", "train.device=cpu", "train.precision=fp32", "train.val_batches=1",
        "train.log_every=1", "train.progress_bar=false", "optim.warmup_steps=1", "optim.schedule=constant")
REL_TOL = 1e-5


def assert_same_trajectory(actual: list[dict], expected: list[dict]) -> None:
    assert [r["step"] for r in actual] == [r["step"] for r in expected]
    for a, e in zip(actual, expected):
        assert math.isclose(a["loss"], e["loss"], rel_tol=REL_TOL), (a["step"], a["loss"], e["loss"])
        assert math.isclose(a["grad_norm"], e["grad_norm"], rel_tol=10 * REL_TOL), (a["step"], a, e)
        assert a["moe"]["max_violation_per_layer"] == e["moe"]["max_violation_per_layer"], (a["step"], a, e)


def test_dispatch_gives_the_one_process_losses_gradients_and_loads(tmp_path):
    command = [str(BIN_DIR / "torchrun"), "--nproc_per_node", "2", "--master_port", str(free_port()),
               str(HERE / "_expert_parallel_worker.py"), str(tmp_path)]
    check_ok(run(command, cwd=HERE))
    for rank in range(2):
        records = torch.load(tmp_path / f"rank{rank}.pt", weights_only=False)
        for record in records:
            assert math.isclose(record["loss"], record["reference_loss"], rel_tol=1e-12)
            assert record["worst_relative_grad_difference"] < 1e-5  # parts of the model run fp32 inside
            assert record["all_to_all_bytes"] > 0
            for stats, reference in zip(record["stats"], record["reference_stats"]):
                assert torch.equal(stats["tokens_per_expert"], reference["tokens_per_expert"])
                assert torch.equal(stats["expert_bias"], reference["expert_bias"])


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    root = tmp_path_factory.mktemp("ep_single")
    check_ok(run_train([*ARGS, f"run_dir={root}/run", "train.max_steps=4", "train.micro_batch_size=4"], cwd=root))
    return train_records(root / "run")


@pytest.mark.parametrize("ranks,stage", [(2, 0), (4, 1)])
def test_trainer_matches_one_process(tmp_path, single, ranks, stage):
    """EP=2 alone (ZeRO-0, own clipping) and EP=2 x DP=2 (ZeRO-1, DeepSpeed's expert groups)."""
    run_dir = tmp_path / "run"
    result = run(torchrun_command(ranks, [*ARGS, f"parallel=zero{stage}", "parallel.expert_parallel=2",
                                          f"run_dir={run_dir}", "train.max_steps=4",
                                          f"train.micro_batch_size={4 // ranks}"]), cwd=tmp_path, timeout=400)
    check_ok(result)
    records = train_records(run_dir)
    assert_same_trajectory(records, single)
    assert all(r["expert_all_to_all_bytes_per_step"] > 0 for r in records)


def test_resume_across_expert_parallel_degrees_and_export(tmp_path, single):
    """EP=2 (ZeRO-2) for 2 steps, EP=1 to 3, EP=2 (ZeRO-0) to 4: the straight one-process trajectory."""
    run_dir = tmp_path / "run"
    for steps, stage, experts in ((2, 2, 2), (3, 1, 1), (4, 0, 2)):
        check_ok(run(torchrun_command(2, [*ARGS, f"parallel=zero{stage}", f"parallel.expert_parallel={experts}",
                                          f"run_dir={run_dir}", f"train.max_steps={steps}",
                                          "train.micro_batch_size=2"]), cwd=tmp_path))
    assert_same_trajectory(train_records(run_dir), single)
    tag = run_dir / "checkpoints" / complete_checkpoints(run_dir)[-1]
    assert (tag / "expert_shard_001_of_002.pt").is_file()
    exported = tmp_path / "model.pt"
    check_ok(run([sys.executable, "-m", "attnres_train.train.export", str(tag), str(exported)], cwd=tmp_path))
    from attnres_train.train.export import load_exported

    model = load_exported(exported)
    assert model.moe_layers()[0].w_gate.shape[0] == model.config.num_experts


@pytest.mark.parametrize("override,named", [
    (("parallel.expert_parallel=3",), "must divide model.num_experts=4"),
    (("parallel.expert_parallel=2",), "must divide the data-parallel degree (1 ranks)"),
    (("parallel.expert_parallel=2", "parallel=zero3"), "parallel.zero_stage=3"),
    (("parallel.expert_parallel=2", "model.mlp=dense"), "no MoE layers"),
])
def test_impossible_layouts_fail_with_one_line(tmp_path, override, named):
    result = run_train([*ARGS, f"run_dir={tmp_path}/run", "train.max_steps=1", *override], cwd=tmp_path)
    assert result.returncode == 2, describe(result)
    assert "Traceback" not in result.stderr, describe(result)
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and named in errors[0] and "parallel.expert_parallel" in errors[0], describe(result)
