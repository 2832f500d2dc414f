"""The benchmark scripts' CPU dry runs: they run end to end, measure every implementation they name, and
write the JSON they promise. (Their real figures come from a GPU; see benchmarks/results/.)"""

import importlib.util
import json
from pathlib import Path

import pytest

SCRIPTS = Path(__file__).resolve().parents[2] / "scripts"


def _script(name):
    spec = importlib.util.spec_from_file_location(name, SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_attnres_kernel_benchmark_dry_run(tmp_path):
    out = tmp_path / "kernels.json"
    report = _script("bench_attnres_kernels").main(["--dry-run", "--out", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(report))
    assert report["dry_run"] and {"device", "versions", "config"} <= report.keys()
    for row in report["results"]:
        assert row["torch"]["ms_median"] > 0 and row["two_phase_torch"]["ms_median"] > 0
        assert row["two_phase_torch"]["max_relative_error_vs_first"] < 1e-5  # the two phases equal the plain mix


def test_attnres_traffic_model_runs_without_a_gpu(tmp_path):
    """``--model-only`` prints and saves the traffic model, labelled as a model. The issue's accounting of one block
    at N = 8, S = 6 gives a floor of 101 X (the issue's idealised 51 X beside it); the fused design is within
    1.3x of the floor and moves less than the previous design and fla's per-sublayer calls."""
    report = _script("bench_attnres_kernels").main(["--model-only", "--hidden", "4096", "--out",
                                                      str(tmp_path / "model.json")])
    (model,) = report["traffic_model"]
    assert "not a measurement" in model["kind"]
    designs = model["designs"]
    assert designs["floor"]["total_X"] == 101 and designs["issue_floor"]["total_X"] == 51
    assert designs["floor"]["launches"] == 12
    assert 1 < designs["fused"]["vs_floor"] <= 1.3
    assert designs["fused"]["vs_floor"] < designs["previous"]["vs_floor"] < designs["fla"]["vs_floor"]
    assert designs["fused"]["bytes"] == round(designs["fused"]["total_X"] * model["X_bytes"])


def test_attnres_kernel_benchmark_refuses_to_run_without_a_gpu_outside_dry_run(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(SystemExit, match="needs a CUDA GPU"):
        _script("bench_attnres_kernels").main(["--out", str(tmp_path / "x.json")])


def test_layer_benchmark_dry_run(tmp_path):
    report = _script("bench_layers").main(["--dry-run", "--out", str(tmp_path / "layers.json")])
    rows = {(r["mixer"], r["tokens"]) for r in report["results"]}
    assert rows == {(m, t) for m in ("kda", "gdn", "mla") for t in (64, 128)}
    assert all(r["tokens_per_s"] > 0 and r["tflops"] > 0 for r in report["results"])


def test_training_benchmark_dry_run_with_impl_variants(tmp_path):
    report = _script("bench_train").main([
        "--preset", "tiny", "--seq-len", "64", "--micro-batch", "1", "--rounds", "1", "--steps", "1",
        "--warmup", "1", "--variants", "standard,block_attnres:torch,block_attnres:fused", "--profile",
        "--out", str(tmp_path / "train.json")])
    results = report["results"]
    for variant in ("standard", "block_attnres:torch", "block_attnres:fused"):
        assert results[variant]["tokens_per_s"] > 0 and results[variant]["profile_top"]
    assert "block_attnres:fused_overhead" in results and "block_attnres:torch_overhead" in results


def test_data_benchmark_dry_run(tmp_path):
    out = tmp_path / "data.json"
    report = _script("bench_data").main(["--dry-run", "--out", str(out), "--work-dir", str(tmp_path / "work")])
    assert json.loads(out.read_text()) == json.loads(json.dumps(report))
    for key in ("prepare_mb_per_s_per_worker", "loader_tokens_per_s", "peak_rss_mb_small", "peak_rss_mb_large",
                "startup_s_small", "startup_s_large", "resume_s_start", "resume_s_end"):
        assert report[key] > 0, key
    assert report["corpus_tokens_large"] > 5 * report["corpus_tokens_small"]
    assert {(r["tokenizer"], r["workers"]) for r in report["prepare"]} == {("byte", 1), ("byte", 2), ("bpe", 1), ("bpe", 2)}


def test_expert_gemm_benchmark_dry_run(tmp_path):
    out = tmp_path / "expert_gemm.json"
    report = _script("bench_expert_gemm").main(["--dry-run", "--out", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(report))
    assert [row["tokens_per_expert"] for row in report["results"]] == [4, 32]
    for row in report["results"]:
        assert row["rows"] == report["config"]["local_experts"] * row["tokens_per_expert"]
        assert row["tokens_per_s"] > 0 and row["tflops"] > 0
