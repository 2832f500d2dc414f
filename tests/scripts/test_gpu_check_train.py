"""``scripts/gpu_check_train.py``: its CPU dry run goes through every part (bf16/fp32 parity, training through the
CLI, SIGTERM and relaunch, export loaded on the CPU) and writes the JSON the GPU run will; without a GPU and
without the flag it refuses in one line; a spent time budget fails what it cannot start, and the report is still
written."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "scripts" / "gpu_check_train.py"


def run_script(*args, timeout=400):
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, cwd=REPO,
                          timeout=timeout)


@pytest.mark.slow
def test_cpu_dry_run_passes_every_part_and_writes_the_report(tmp_path):
    out = tmp_path / "report.json"
    result = run_script("--cpu-dry-run", "--out", str(out), "--work-dir", str(tmp_path / "work"))
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    report = json.loads(out.read_text())
    assert report["dry_run"] and {"device", "versions", "driver", "train_preset"} <= report.keys()
    parts = report["parts"]
    assert list(parts) == ["parity", "training", "preemption", "flash_attention"]
    assert all(part["passed"] for part in parts.values()), parts

    variants = parts["parity"]["variants"]
    assert set(variants) == {"kda+standard", "kda+block_attnres", "gdn+standard", "gdn+block_attnres"}
    for figures in variants.values():  # bf16 really ran: not bitwise the fp32 result, yet within the bounds
        assert 0 < figures["loss_rel_err"] <= parts["parity"]["tolerances"]["loss_rel"]
        assert figures["grad_cosine"] < 1

    eager = parts["training"]["variants"]["eager"]
    losses = list(eager["losses"].values())
    assert losses[-1] < losses[0] and eager["tokens_per_s"] > 0
    assert report["tokens_per_s"] == {"eager": eager["tokens_per_s"]} and report["mfu"] == {"eager": None}
    assert "not_run" in parts["training"]["config"]  # the compiled variant, CUDA-only, is said not to have run

    preemption = parts["preemption"]
    steps = preemption["config"]["steps"]
    assert preemption["config"]["stop_after"] <= preemption["stopped_at_step"] < steps
    # fp32 on the CPU: the resumed run is the uninterrupted one exactly
    assert preemption["max_loss_rel_diff"] == 0
    assert sorted(map(int, preemption["losses_resumed"])) == list(range(preemption["stopped_at_step"] + 1, steps + 1))
    export = preemption["export"]
    assert export["checkpoint"] == f"step_{steps:08d}" and export["loss_rel_diff"] <= export["tolerance_rel"]

    assert parts["flash_attention"]["skipped"] == "no CUDA device"


def test_without_a_gpu_it_asks_for_the_dry_run():
    result = run_script(timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip() == "gpu_check_train.py: no CUDA device (use --cpu-dry-run on a CPU machine)"


def test_a_spent_time_budget_fails_the_parts_it_cannot_start_and_still_writes_the_report(tmp_path):
    out = tmp_path / "report.json"
    result = run_script("--cpu-dry-run", "--budget-s", "1", "--parts", "training,preemption", "--out", str(out),
                        "--work-dir", str(tmp_path / "work"))
    assert result.returncode == 1, result.stdout[-3000:] + result.stderr[-3000:]
    assert "FAILED parts: training, preemption" in result.stdout
    parts = json.loads(out.read_text())["parts"]
    assert parts["training"]["variants"]["eager"]["error"].startswith("not run: the time budget")
    assert parts["preemption"]["error"].startswith("not run: the time budget")
