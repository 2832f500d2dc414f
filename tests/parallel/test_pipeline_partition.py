"""Pipeline-aware partitioner and boundary traffic accounting (issue 4 groundwork; no pipeline engine yet)."""

import itertools

import pytest

from attnres_train.model import build_model
from attnres_train.parallel.pipeline_partition import (
    StageCosts,
    boundary_bytes,
    boundary_tensor_count,
    is_block_boundary,
    partition_stages,
    stage_costs,
)

TINY_MOE = dict(
    vocab_size=64, hidden_size=32, num_layers=8, hybrid_ratio=3, linear_num_heads=2, linear_head_dim=16,
    mla_num_heads=2, mla_kv_lora_rank=16, mla_qk_nope_head_dim=16, mla_v_head_dim=16, num_experts=64, top_k=2,
    expert_ffn_dim=32, attnres_block_size=4, residual="block_attnres",
)


def _brute_force_bottleneck(costs: StageCosts, stages: int) -> float:
    n = len(costs.layer_flops)
    best = float("inf")
    for cuts in itertools.combinations(range(1, n), stages - 1):
        edges = (0, *cuts, n)
        loads = [sum(costs.layer_flops[edges[i] : edges[i + 1]]) for i in range(stages)]
        loads[0] += costs.first_stage_extra
        loads[-1] += costs.last_stage_extra
        best = min(best, max(loads))
    return best


def test_stage_costs_add_up_to_the_model_forward_flops():
    model = build_model(TINY_MOE, device="meta")
    costs = stage_costs(model, 512)
    total = sum(costs.layer_flops) + costs.first_stage_extra + costs.last_stage_extra
    assert total == pytest.approx(model.flops_per_token(512, training=False), rel=1e-12)


def test_balances_by_flops_not_parameters():
    # 64 experts make the MoE layers parameter-heavy; only top_k=2 run, so FLOPs stay modest.
    model = build_model(TINY_MOE, device="meta")
    costs = stage_costs(model, 512)
    part = partition_stages(costs, 2, "block_attnres", 4, tolerance=0.0)
    assert part.bottleneck == pytest.approx(_brute_force_bottleneck(costs, 2))


@pytest.mark.parametrize("stages", [2, 3, 4])
def test_prefers_block_boundaries_within_tolerance(stages):
    costs = StageCosts(layer_flops=(1.0,) * 12, first_stage_extra=0.0, last_stage_extra=0.0)
    # block_size 4 sublayers = 2 layers: every even layer count is a block boundary.
    part = partition_stages(costs, stages, "block_attnres", 4, tolerance=0.5)
    assert all(part.on_block_boundary)
    assert part.bottleneck <= 1.5 * _brute_force_bottleneck(costs, stages)


def test_tight_tolerance_may_leave_a_block_boundary():
    costs = StageCosts(layer_flops=(1.0,) * 9, first_stage_extra=0.0, last_stage_extra=0.0)
    part = partition_stages(costs, 3, "block_attnres", 4, tolerance=0.0)
    assert part.boundaries == (3, 6) and part.on_block_boundary == (False, True)


def test_explicit_boundaries_are_used_and_validated():
    costs = StageCosts(layer_flops=(1.0,) * 8, first_stage_extra=0.0, last_stage_extra=2.0)
    part = partition_stages(costs, 2, "block_attnres", 4, boundaries=[3])
    assert part.boundaries == (3,) and part.stage_flops == (3.0, 7.0)
    with pytest.raises(ValueError, match="pipeline_boundaries"):
        partition_stages(costs, 3, "block_attnres", 4, boundaries=[5, 2])
    with pytest.raises(ValueError, match="pipeline_stages"):
        partition_stages(costs, 9, "block_attnres", 4)


@pytest.mark.parametrize(
    "residual,layers_before,expected",
    [("standard", 5, 1), ("full_attnres", 5, 11), ("block_attnres", 4, 3), ("block_attnres", 5, 4)],
)
def test_tensor_counts(residual, layers_before, expected):
    # block_size 4 sublayers: after 4 layers = 8 sublayers -> b_0, b_1, b_2; after 5 -> plus the partial sum
    assert boundary_tensor_count(residual, 4, layers_before) == expected
    assert is_block_boundary(residual, 4, layers_before) == (residual != "block_attnres" or layers_before % 2 == 0)


def test_bytes_are_tensors_times_b_t_d_times_element_size():
    assert boundary_bytes("block_attnres", 6, 7, micro_batch=2, seq_len=128, hidden=64, bytes_per_element=2) == (
        boundary_tensor_count("block_attnres", 6, 7) * 2 * 128 * 64 * 2
    )


def test_comm_report_script_runs_for_the_48b_preset(tmp_path):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "scripts" / "pipeline_comm_report.py"
    spec = importlib.util.spec_from_file_location("pipeline_comm_report", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    rep = module.main(["--preset", "kimi_linear_48b_a3b", "--stages", "4", "--json", str(tmp_path / "r.json")])
    by_mode = {run["residual"]: run for run in rep["runs"]}
    assert by_mode["standard"]["max_boundary_bytes"] < by_mode["block_attnres"]["max_boundary_bytes"]
    assert by_mode["block_attnres"]["max_boundary_bytes"] < by_mode["full_attnres"]["max_boundary_bytes"]
    assert (tmp_path / "r.json").exists()
