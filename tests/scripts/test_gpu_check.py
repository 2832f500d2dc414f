"""scripts/gpu_check.sh: every step runs, output goes under --out-dir, and any failed step makes it exit non-zero.

The Python it drives is replaced by a stand-in that logs its arguments (the benchmarks' own dry runs are tested in
test_benchmark_scripts.py; ``scripts/gpu_check.sh --dry-run`` runs them for real in ~40 s on CPU)."""

import os
import subprocess
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "gpu_check.sh"


def _run(tmp_path, fail_on=""):
    log = tmp_path / "calls.log"
    fake = tmp_path / "python"
    fake.write_text(f'#!/usr/bin/env bash\necho "$*" >> {log}\n'
                    f'case "$*" in *"{fail_on or "never-matches"}"*) exit 3 ;; esac\nexit 0\n')
    fake.chmod(0o755)
    result = subprocess.run(["bash", str(SCRIPT), "--dry-run", "--out-dir", str(tmp_path / "out")],
                            env={**os.environ, "PYTHON": str(fake)}, capture_output=True, text=True, timeout=60)
    return result, log.read_text().splitlines()


def test_dry_run_runs_every_step_into_the_out_dir(tmp_path):
    result, calls = _run(tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    scripts = [next(arg for arg in call.split() if arg.endswith(".py")) for call in calls]
    assert scripts == ["scripts/bench_attnres_kernels.py", "scripts/bench_attnres_kernels.py",
                       "scripts/bench_layers.py", "scripts/bench_train.py"]
    assert all(f"--out {tmp_path / 'out'}/" in call for call in calls)
    assert "block_attnres:fused" in calls[-1] and "standard" in calls[-1]


def test_a_failed_step_fails_the_check_after_the_others_ran(tmp_path):
    result, calls = _run(tmp_path, fail_on="bench_layers")
    assert result.returncode == 1
    assert "FAILED steps: layer-benchmark" in result.stdout
    assert any("bench_train.py" in call for call in calls)
