"""Expert parallelism on CPU (gloo): the all-to-all dispatch against one process, the trainer under
``parallel.expert_parallel`` against one process (ZeRO 0-2), resume across expert-parallel degrees, export, and
the one-line refusals of impossible layouts.

Cost on a 2-core machine: every trainer configuration of 2 ranks runs in ONE torchrun launch
(``_expert_parallel_trainer_worker.py``), started together with the one-process reference; the refusals are
checked on the validation function, with one launch for the one-line error path. Pipeline stages with expert
parallelism (P=2 x EP=2, 4 ranks) run as one more torchrun launch of the same worker. The 4-process EP=2 x DP=2
comparison and the P x EP resumes on another layout are marked ``long`` (``pytest --long``).
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "train"))
from cli_helpers import (  # noqa: E402
    BIN_DIR,
    check_ok,
    complete_checkpoints,
    describe,
    run,
    run_train,
    torchrun_command,
    train_command,
    train_env,
    train_records,
)

pytestmark = pytest.mark.slow
HERE = Path(__file__).resolve().parent
ARGS = ("model=tiny", "data.seq_len=64", "train.device=cpu", "train.precision=fp32", "train.val_batches=1",
        "train.log_every=1", "train.progress_bar=false", "optim.warmup_steps=1", "optim.schedule=constant")
STEPS = 3
REL_TOL = 1e-5


def assert_same_trajectory(actual: list[dict], expected: list[dict], first_stage_only: bool = False) -> None:
    """Losses, gradient norms and MoE loads; ``first_stage_only``: under pipelining rank 0 logs the loads of its
    own stage's layers, the first ones of the model."""
    assert [r["step"] for r in actual] == [r["step"] for r in expected]
    for a, e in zip(actual, expected):
        assert math.isclose(a["loss"], e["loss"], rel_tol=REL_TOL), (a["step"], a["loss"], e["loss"])
        assert math.isclose(a["grad_norm"], e["grad_norm"], rel_tol=10 * REL_TOL), (a["step"], a, e)
        loads, expected_loads = a["moe"]["max_violation_per_layer"], e["moe"]["max_violation_per_layer"]
        if first_stage_only:
            assert 0 < len(loads) < len(expected_loads), (a["step"], a, e)
            expected_loads = expected_loads[:len(loads)]
        assert loads == expected_loads, (a["step"], a, e)


def test_dispatch_gives_the_one_process_losses_gradients_and_loads(tmp_path):
    command = [str(BIN_DIR / "torchrun"), "--standalone", "--nproc_per_node", "2",
               str(HERE / "_expert_parallel_worker.py"), str(tmp_path)]
    check_ok(run(command, cwd=HERE))
    for rank in range(2):
        records = torch.load(tmp_path / f"rank{rank}.pt", weights_only=False)
        for record in records:
            assert math.isclose(record["loss"], record["reference_loss"], rel_tol=1e-7)  # fp64 but for fp32 parts
            assert record["worst_relative_grad_difference"] < 1e-5  # parts of the model run fp32 inside
            assert record["all_to_all_bytes"] > 0
            for stats, reference in zip(record["stats"], record["reference_stats"]):
                assert torch.equal(stats["tokens_per_expert"], reference["tokens_per_expert"])
                assert torch.equal(stats["expert_bias"], reference["expert_bias"])


def _launch(command: list[str], cwd: Path) -> subprocess.Popen:
    return subprocess.Popen(command, cwd=cwd, env=train_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def _finish(process: subprocess.Popen, timeout: float = 600.0) -> subprocess.CompletedProcess:
    stdout, stderr = process.communicate(timeout=timeout)
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


def _ep_args(run_dir: Path, stage: int, experts: int, steps: int, micro_batch: int, pipeline_stages: int = 1
             ) -> list[str]:
    return [*ARGS, f"parallel=zero{stage}", f"parallel.expert_parallel={experts}", f"run_dir={run_dir}",
            f"train.max_steps={steps}", f"train.micro_batch_size={micro_batch}",
            f"parallel.pipeline_stages={pipeline_stages}"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The one-process reference (4 rows per step) and, at the same time, one 2-rank launch running:
    ``straight``: EP=2 with ZeRO-1 (DeepSpeed's expert groups) for all steps; ``resumed``: EP=2 (ZeRO-2) for 1
    step, then EP=1 (ZeRO-1) to step 2, then EP=2 (ZeRO-0, the trainer's own clipping) to the end."""
    root = tmp_path_factory.mktemp("ep")
    single = _launch(train_command([*ARGS, f"run_dir={root}/single", f"train.max_steps={STEPS}",
                                    "train.micro_batch_size=4"]), root)
    launches = [_ep_args(root / "straight", 1, 2, STEPS, 2)]
    launches += [_ep_args(root / "resumed", stage, experts, steps, 2)
                 for steps, stage, experts in ((1, 2, 2), (2, 1, 1), (STEPS, 0, 2))]
    parallel = _launch([str(BIN_DIR / "torchrun"), "--standalone", "--nproc_per_node=2",
                        str(HERE / "_expert_parallel_trainer_worker.py"), json.dumps(launches)], root)
    check_ok(_finish(single))
    check_ok(_finish(parallel))
    return root


def test_trainer_matches_one_process(runs):
    """EP=2 with ZeRO-1: the one-process losses, gradient norms and MoE loads at every step."""
    records = train_records(runs / "straight")
    assert_same_trajectory(records, train_records(runs / "single"))
    assert all(r["expert_all_to_all_bytes_per_step"] > 0 for r in records)


def test_resume_across_expert_parallel_degrees_and_export(runs, tmp_path):
    """EP=2 -> EP=1 -> EP=2 (ZeRO 2, 1, 0): the straight one-process trajectory; export merges the shards."""
    run_dir = runs / "resumed"
    assert_same_trajectory(train_records(run_dir), train_records(runs / "single"))
    tag = run_dir / "checkpoints" / complete_checkpoints(run_dir)[-1]
    assert (tag / "expert_shard_001_of_002.pt").is_file()
    exported = tmp_path / "model.pt"
    check_ok(run([sys.executable, "-m", "attnres_train.train.export", str(tag), str(exported)], cwd=tmp_path))
    from attnres_train.train.export import load_exported

    model = load_exported(exported)
    assert model.moe_layers()[0].w_gate.shape[0] == model.config.num_experts


def assert_planner_all_to_all_matches(records: list[dict], layout, stage: int = 0) -> None:
    """The run planner's all-to-all model (balanced routing) for the layers of ``stage`` against the bytes a run
    logged (rank 0, which holds stage 0); the balancing bias keeps the loads near even, so the two agree to
    within the routing imbalance."""
    from attnres_train.model import ModelConfig
    from attnres_train.parallel.pipeline import describe_partition
    from attnres_train.plan.layouts import expert_all_to_all_bytes
    from attnres_train.plan.model_facts import model_facts
    from attnres_train.train.cli import config_dir

    config = ModelConfig.from_mapping(yaml.safe_load((config_dir() / "model" / "tiny.yaml").read_text()))
    facts = model_facts(config, 64)
    layers = describe_partition(facts.model, layout.pipeline_stages, 64).stage_layers(config.num_layers)[stage]
    predicted = expert_all_to_all_bytes(facts, layout, layers, element=4)
    assert predicted > 0
    for record in records:
        logged = record["expert_all_to_all_bytes_per_step"]
        assert abs(logged - predicted) <= 0.2 * predicted, (record["step"], logged, predicted)


def test_planner_all_to_all_bytes_match_the_logged_bytes(runs):
    from attnres_train.plan.memory import Layout

    assert_planner_all_to_all_matches(train_records(runs / "straight"), Layout(1, 2, 2, 1, 2, False))


def _run_four_ranks(launches: list[list[str]], cwd: Path) -> str:
    result = check_ok(run([str(BIN_DIR / "torchrun"), "--standalone", "--nproc_per_node=4",
                           str(HERE / "_expert_parallel_trainer_worker.py"), json.dumps(launches)], cwd=cwd,
                          timeout=600))
    return result.stdout + result.stderr


def _pipelined_ep_args(run_dir: Path, stage: int, experts: int, steps: int, pipeline_stages: int) -> list[str]:
    # 4 rows per step as in the reference: micro-batch 2 over DP=2 with two stages, 1 over DP=4 with one.
    return _ep_args(run_dir, stage, experts, steps, pipeline_stages, pipeline_stages=pipeline_stages)


def test_pipeline_stages_with_expert_parallelism_match_one_process_and_resume(runs, tmp_path):
    """P=2 x EP=2 on 4 ranks (one torchrun launch): ``straight`` ZeRO-0 (the trainer's clipping over stages and
    expert slices) for all steps; ``resumed`` ZeRO-1 for 1 step, then again on the same layout to the end. Every
    step is the one-process step; export merges the per-stage expert shards into the plain model."""
    output = _run_four_ranks([_pipelined_ep_args(tmp_path / "straight", 0, 2, STEPS, 2),
                              _pipelined_ep_args(tmp_path / "resumed", 1, 2, 1, 2),
                              _pipelined_ep_args(tmp_path / "resumed", 1, 2, STEPS, 2)], tmp_path)
    assert "resumed_from=step_00000001" in output and "saved under another parallel layout" not in output
    expected = train_records(runs / "single")
    straight = train_records(tmp_path / "straight")
    assert_same_trajectory(straight, expected, first_stage_only=True)
    from attnres_train.plan.memory import Layout

    assert_planner_all_to_all_matches(straight, Layout(2, 2, 2, 0, 2, False), stage=0)  # what the planner lists
    assert_same_trajectory(train_records(tmp_path / "resumed"), expected, first_stage_only=True)

    tag = tmp_path / "straight" / "checkpoints" / complete_checkpoints(tmp_path / "straight")[-1]
    assert {path.name for path in tag.glob("expert_shard_*")} == {
        f"expert_shard_{rank:03d}_of_002_stage_{stage:02d}.pt" for rank in range(2) for stage in range(2)}
    from attnres_train.train.export import exported_state

    pipe_cfg, pipe_state = exported_state(tag)
    plain_cfg, plain_state = exported_state(runs / "single" / "checkpoints" / complete_checkpoints(runs / "single")[-1])
    assert pipe_cfg == plain_cfg and pipe_state.keys() == plain_state.keys()
    for key, value in plain_state.items():
        torch.testing.assert_close(pipe_state[key], value, rtol=1e-4, atol=1e-5, msg=key)


@pytest.mark.long
def test_pipeline_stages_with_expert_parallelism_resume_on_another_layout(runs, tmp_path):
    """``one_stage``: P=2 x EP=2 (ZeRO-1) for 2 steps, then P=1 x EP=1 x DP=4 (ZeRO-0, read by name) to the end;
    ``two_stages``: P=1 x EP=2 x DP=4 (ZeRO-0) for 1 step, then P=2 x EP=2. Every step is the one-process step."""
    output = _run_four_ranks([_pipelined_ep_args(tmp_path / "one_stage", 1, 2, 2, 2),
                              _pipelined_ep_args(tmp_path / "one_stage", 0, 1, STEPS, 1),
                              _pipelined_ep_args(tmp_path / "two_stages", 0, 2, 1, 1),
                              _pipelined_ep_args(tmp_path / "two_stages", 0, 2, STEPS, 2)], tmp_path)
    for change in ("parallel.expert_parallel: 2 -> 1", "parallel.pipeline_stages: 1 -> 2"):
        assert change in output, output[-4000:]
    expected = train_records(runs / "single")
    one_stage = train_records(tmp_path / "one_stage")
    assert_same_trajectory(one_stage[:2], expected[:2], first_stage_only=True)
    assert_same_trajectory(one_stage[2:], expected[2:])  # one stage again: every layer's loads
    two_stages = train_records(tmp_path / "two_stages")
    assert_same_trajectory(two_stages[:1], expected[:1])
    assert_same_trajectory(two_stages[1:], expected[1:], first_stage_only=True)


@pytest.mark.long
def test_expert_and_data_parallel_match_one_process(runs, tmp_path):
    """EP=2 x DP=2 on 4 ranks (ZeRO-1: expert gradients reduced over their expert-data-parallel pair)."""
    run_dir = tmp_path / "run"
    check_ok(run(torchrun_command(4, _ep_args(run_dir, 1, 2, STEPS, 1)), cwd=tmp_path, timeout=600))
    records = train_records(run_dir)
    assert_same_trajectory(records, train_records(runs / "single"))
    assert all(r["expert_all_to_all_bytes_per_step"] > 0 for r in records)


def test_per_stage_expert_shards_merge_in_expert_order_and_a_missing_stage_is_named(tmp_path):
    from attnres_train.parallel.expert_parallel import merge_expert_shards, shard_file_name

    whole = {f"layers.{i}.mlp.w_up": torch.arange(4 * 3, dtype=torch.float32).view(4, 3) + 100 * i for i in range(4)}
    for stage, layers in enumerate(((0, 1), (2, 3))):
        for rank in range(2):
            torch.save({f"layers.{i}.mlp.w_up": whole[f"layers.{i}.mlp.w_up"][2 * rank:2 * rank + 2] for i in layers},
                       tmp_path / shard_file_name(rank, 2, stage))
    dense = {"embed_tokens.weight": torch.ones(2)}
    merged = merge_expert_shards(tmp_path, {**dense, **{name: value[:2] for name, value in whole.items()}}, torch.load)
    assert merged.keys() == {*dense, *whole}
    for name, value in whole.items():
        assert torch.equal(merged[name], value), name
    (tmp_path / shard_file_name(1, 2, 1)).unlink()
    with pytest.raises(FileNotFoundError, match="expert shard 1 of 2 is missing for some of the 2 pipeline stages"):
        merge_expert_shards(tmp_path, dense, torch.load)


def _configs(*overrides: str):
    from attnres_train.model import ModelConfig
    from attnres_train.train.config import ParallelConfig

    fields = dict(override.split("=", 1) for override in overrides)
    model = ModelConfig(num_experts=4, top_k=2, mlp=fields.get("model.mlp", "moe"))
    model.validate()
    parallel = ParallelConfig(expert_parallel=int(fields["parallel.expert_parallel"]),
                              zero_stage=int(fields.get("parallel.zero_stage", 0)))
    return parallel, model


@pytest.mark.parametrize("overrides,dp_world,precision,named", [
    (("parallel.expert_parallel=3",), 6, "fp32", "must divide model.num_experts=4"),
    (("parallel.expert_parallel=2",), 3, "fp32", "must divide the data-parallel degree (3 ranks)"),
    (("parallel.expert_parallel=2", "parallel.zero_stage=3"), 2, "fp32", "parallel.zero_stage=3"),
    (("parallel.expert_parallel=2", "model.mlp=dense"), 2, "fp32", "no MoE layers"),
    (("parallel.expert_parallel=2",), 2, "bf16", "parallel.zero_stage=0"),
])
def test_impossible_layouts_are_refused_naming_the_field(overrides, dp_world, precision, named):
    from attnres_train.train.config import RunConfigError, validate_expert_parallel, validate_parallel

    parallel, model = _configs(*overrides)
    with pytest.raises(RunConfigError) as refused:
        validate_parallel(parallel)
        validate_expert_parallel(parallel, model, dp_world, precision)
    assert named in str(refused.value) and "parallel.expert_parallel" in str(refused.value)
    assert "\n" not in str(refused.value)


def test_impossible_layout_fails_with_one_line(tmp_path):
    """The refusal reaches the user as one ``error:`` line and exit code 2 (here: EP=2 on one rank)."""
    result = run_train([*ARGS, f"run_dir={tmp_path}/run", "train.max_steps=1", "parallel.expert_parallel=2"],
                       cwd=tmp_path)
    assert result.returncode == 2, describe(result)
    assert "Traceback" not in result.stderr, describe(result)
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, describe(result)
    assert "parallel.expert_parallel=2: must divide the data-parallel degree (1 ranks)" in errors[0]
