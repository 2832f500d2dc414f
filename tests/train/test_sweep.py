"""End-to-end Hydra multirun sweeps of ``attnres-train -m``, then ``attnres-report`` on the sweep directory.

A 2 x 2 sweep (hybrid ratio x residual) of the tiny preset trains a few steps per job; the report's table must
hold exactly the values in each run's own files. Re-running the same command skips finished jobs and resumes
an interrupted one from its checkpoint; a job that fails is marked FAILED and the sweep goes on.
"""

from __future__ import annotations

import csv
import json
import math
import shutil
import sys
from pathlib import Path

import pytest
from cli_helpers import (
    BIN_DIR,
    TINY_ARGS,
    check_ok,
    complete_checkpoints,
    describe,
    read_metrics,
    run,
    run_train,
    train_records,
    val_records,
)

from attnres_train.model.accounting import inference_cache_bytes
from attnres_train.model.config import ModelConfig
from attnres_train.train.cli import flat_job_dirname

pytestmark = pytest.mark.slow

SWEEP = ("model.hybrid_ratio=0,3", "model.residual=standard,block_attnres")
MAX_STEPS = 3
SWEEP_ARGS = (*TINY_ARGS, f"train.max_steps={MAX_STEPS}", "train.val_every=2", "train.checkpoint_every=2")
JOB_NAMES = sorted(
    f"data.seq_len=64,model.hybrid_ratio={ratio},model.residual={residual},model=tiny,optim.warmup_steps=1,"
    f"train.device=cpu,train.max_steps={MAX_STEPS},train.micro_batch_size=2,train.val_batches=1,train.val_every=2"
    for ratio in (0, 3) for residual in ("standard", "block_attnres")
)


def sweep_command(sweep_dir: Path, *extra: str) -> list[str]:
    return ["-m", *SWEEP, *SWEEP_ARGS, f"run_dir={sweep_dir}", *extra]


def report_command(*args: str) -> list[str]:
    script = BIN_DIR / "attnres-report"
    if script.exists():
        return [str(script), *args]
    return [sys.executable, "-m", "attnres_train.report", *args]


def job_dirs(sweep_dir: Path) -> list[Path]:
    return sorted(p for p in sweep_dir.iterdir() if p.is_dir() and not p.name.startswith(".") and p.name != "report")


def resolved_model(job_dir: Path) -> dict:
    from omegaconf import OmegaConf

    return OmegaConf.to_container(OmegaConf.load(job_dir / "resolved_config.yaml"))["model"]


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    root = tmp_path_factory.mktemp("sweep")
    sweep_dir = root / "sweep"
    result = check_ok(run_train(sweep_command(sweep_dir), cwd=root, timeout=300))
    return sweep_dir, result


def png_is_non_trivial(path: Path) -> None:
    import matplotlib.image as mpimg
    import numpy as np

    assert path.is_file() and path.stat().st_size > 10_000, path
    pixels = mpimg.imread(path)
    assert pixels.shape[0] > 200 and pixels.shape[1] > 200, (path, pixels.shape)
    assert float(np.var(pixels[..., :3])) > 1e-3, f"{path} looks blank"


def test_sweep_runs_every_combination_in_its_own_directory(sweep):
    sweep_dir, result = sweep
    assert "Traceback" not in result.stderr, describe(result)
    assert (sweep_dir / "multirun.yaml").is_file()
    dirs = job_dirs(sweep_dir)
    assert [d.name for d in dirs] == JOB_NAMES  # run_dir / progress bar are excluded from the names
    for job_dir in dirs:
        finished = json.loads((job_dir / "FINISHED").read_text())
        assert finished["step"] == MAX_STEPS and finished["tokens"] == MAX_STEPS * 2 * 64
        assert complete_checkpoints(job_dir)[-1] == f"step_{MAX_STEPS:08d}"
        assert [r["step"] for r in train_records(job_dir)] == list(range(1, MAX_STEPS + 1))
        assert [r["step"] for r in val_records(job_dir)] == [2, 3]
        # the job's resolved config names its own directory as run_dir and holds the swept values
        from omegaconf import OmegaConf

        resolved = OmegaConf.load(job_dir / "resolved_config.yaml")
        assert Path(resolved.run_dir) == job_dir.resolve()
        assert f"model.hybrid_ratio={resolved.model.hybrid_ratio}," in job_dir.name
        assert f"model.residual={resolved.model.residual}," in job_dir.name
        assert list(job_dir.glob(".hydra/*/config.yaml")), "Hydra's composed config record is missing"
    assert not list(sweep_dir.glob("metrics.jsonl")), "nothing trains in the sweep directory itself"


def test_report_table_equals_each_runs_metrics_and_plots_are_drawn(sweep, tmp_path):
    sweep_dir, _ = sweep
    out_dir = tmp_path / "report"
    result = run(report_command(str(sweep_dir), "--out", str(out_dir)), cwd=tmp_path)
    assert result.returncode == 0, describe(result)
    with open(out_dir / "report.csv", newline="") as handle:
        rows = {row["run"]: row for row in csv.DictReader(handle)}
    assert sorted(rows) == JOB_NAMES
    for job_dir in job_dirs(sweep_dir):
        row = rows[job_dir.name]
        records = train_records(job_dir)
        summary = json.loads((job_dir / "model_summary.json").read_text())
        model = resolved_model(job_dir)
        assert row["status"] == "finished"
        assert int(row["model.hybrid_ratio"]) == model["hybrid_ratio"]
        assert row["model.residual"] == model["residual"]
        assert int(row["total_parameters"]) == summary["total_parameters"]
        assert int(row["active_parameters"]) == summary["active_parameters"]
        assert int(row["tokens"]) == records[-1]["tokens"]
        assert float(row["flops"]) == records[-1]["tokens"] * summary["train_flops_per_token"]
        assert float(row["final_train_loss"]) == records[-1]["loss"]
        assert float(row["final_val_loss"]) == val_records(job_dir)[-1]["val_loss"]
        throughput = [r["tokens_per_s"] for r in records[1:]]
        assert math.isclose(float(row["tokens_per_s"]), sum(throughput) / len(throughput), rel_tol=1e-12)
        cfg = ModelConfig.from_mapping(model)
        for name, length in (("4k", 4096), ("128k", 131072), ("1m", 1048576)):
            assert int(row[f"cache_bytes_{name}"]) == inference_cache_bytes(cfg, length)["total"]
    # more linear layers, smaller cache at long context
    by_ratio = {int(r["model.hybrid_ratio"]): int(r["cache_bytes_1m"]) for r in rows.values()}
    assert by_ratio[3] < by_ratio[0]

    markdown = (out_dir / "report.md").read_text()
    assert markdown.count("| finished |") == 4
    for name in ("val_loss_vs_tokens", "val_loss_vs_flops", "val_loss_vs_ratio", "hidden_state_rms"):
        png_is_non_trivial(out_dir / f"{name}.png")
        assert f"({name}.png)" in markdown
    heatmaps = sorted(out_dir.glob("depth_weights_*.png"))
    assert len(heatmaps) == 2  # the two block_attnres runs
    for path in heatmaps:
        png_is_non_trivial(path)


def test_rerun_skips_finished_jobs_and_resumes_interrupted_ones(sweep, tmp_path):
    original_dir, _ = sweep
    sweep_dir = tmp_path / "sweep"
    shutil.copytree(original_dir, sweep_dir)
    dirs = job_dirs(sweep_dir)
    interrupted, never_started = dirs[0], dirs[1]
    final_loss = train_records(interrupted)[-1]["loss"]
    # interrupted after the step-2 checkpoint: no final checkpoint, no FINISHED marker
    shutil.rmtree(interrupted / "checkpoints" / f"step_{MAX_STEPS:08d}")
    (interrupted / "checkpoints" / "latest_complete").write_text("step_00000002\n")
    (interrupted / "FINISHED").unlink()
    shutil.rmtree(never_started)

    result = check_ok(run_train(sweep_command(sweep_dir), cwd=tmp_path, timeout=300))
    assert result.stdout.count("skipped (already finished)") == 2, describe(result)
    assert "resumed_from=step_00000002 step=2" in result.stdout, describe(result)
    for job_dir in job_dirs(sweep_dir):
        assert (job_dir / "FINISHED").is_file(), job_dir
    assert [d.name for d in job_dirs(sweep_dir)] == JOB_NAMES
    # exact resume: the re-trained last step logs the same loss as the uninterrupted run did
    assert [r["step"] for r in train_records(interrupted)] == [1, 2, 3]
    assert train_records(interrupted)[-1]["loss"] == final_loss
    assert [r["step"] for r in train_records(never_started)] == [1, 2, 3]
    # the skipped jobs were not touched
    for job_dir in dirs[2:]:
        assert len(read_metrics(job_dir)) == len(read_metrics(original_dir / job_dir.name))


def test_failing_job_is_marked_failed_and_compute_matched_runs_spend_the_budget(tmp_path):
    sweep_dir = tmp_path / "sweep"
    budget = 4.0e8
    args = ["-m", "model.hybrid_ratio=-1,0,3", *TINY_ARGS, f"train.flops_budget={budget}",
            "train.max_steps=1000", f"run_dir={sweep_dir}"]
    result = check_ok(run_train(args, cwd=tmp_path, timeout=300))
    assert "Traceback" not in result.stderr, describe(result)
    failed_lines = [line for line in result.stderr.splitlines() if line.startswith("error: job ")]
    assert len(failed_lines) == 1 and "model.hybrid_ratio=-1" in failed_lines[0], describe(result)
    dirs = {d.name.split("model.hybrid_ratio=")[1].split(",")[0]: d for d in job_dirs(sweep_dir)}
    failed = json.loads((dirs["-1"] / "FAILED").read_text())
    assert "model.hybrid_ratio" in failed["error"] and "Traceback" in failed["traceback"]
    assert not (dirs["-1"] / "FINISHED").exists()

    tokens_per_step = 2 * 64
    for ratio in ("0", "3"):
        summary = json.loads((dirs[ratio] / "model_summary.json").read_text())
        flops_per_step = summary["train_flops_per_token"] * tokens_per_step
        records = train_records(dirs[ratio])
        spent = records[-1]["tokens"] * summary["train_flops_per_token"]
        assert summary["total_steps"] == math.ceil(budget / flops_per_step) == len(records)
        assert budget <= spent < budget + flops_per_step  # max_steps=1000 is ignored under a budget
        assert records[-1]["flops"] == spent

    out_dir = tmp_path / "report"
    report = run(report_command(str(sweep_dir), "--out", str(out_dir)), cwd=tmp_path)
    assert report.returncode == 0, describe(report)
    with open(out_dir / "report.csv", newline="") as handle:
        status = {row["model.hybrid_ratio"]: row["status"] for row in csv.DictReader(handle)}
    assert status == {"-1": "failed", "0": "finished", "3": "finished"}
    assert "## Failed runs" in (out_dir / "report.md").read_text()


def test_flat_job_dirname_replaces_path_separators_deterministically():
    plain = "model.hybrid_ratio=3,model.residual=standard"
    assert flat_job_dirname(plain) == plain  # names without paths stay as Hydra made them: old sweeps resume
    flat = flat_job_dirname("data.path=/data/web,model.hybrid_ratio=3")
    assert "/" not in flat and flat.startswith("data.path=_data_web,model.hybrid_ratio=3")
    assert flat == flat_job_dirname("data.path=/data/web,model.hybrid_ratio=3")
    # paths that flatten to the same text still get different directories
    assert flat_job_dirname("data.path=/a/b") != flat_job_dirname("data.path=/a_b")


def test_path_valued_override_gives_flat_job_directories_that_a_rerun_finds(tmp_path):
    sweep_dir = tmp_path / "sweep"
    caches = [tmp_path / "caches" / "a", tmp_path / "caches" / "b"]
    args = ["-m", f"data.cache_dir={caches[0]},{caches[1]}", *TINY_ARGS, "train.max_steps=1", f"run_dir={sweep_dir}"]
    check_ok(run_train(args, cwd=tmp_path, timeout=300))
    # Hydra's override_dirname of each job: the sorted overrides less the keys excluded in configs/train.yaml
    named = [arg for arg in TINY_ARGS if not arg.startswith(("train.log_every=", "train.progress_bar="))]
    expected = sorted(flat_job_dirname(",".join(sorted([f"data.cache_dir={cache}", *named, "train.max_steps=1"])))
                      for cache in caches)
    assert [d.name for d in job_dirs(sweep_dir)] == expected, sorted(p.name for p in sweep_dir.iterdir())
    for job_dir in job_dirs(sweep_dir):
        assert (job_dir / "FINISHED").is_file(), job_dir

    rerun = check_ok(run_train(args, cwd=tmp_path, timeout=300))
    assert rerun.stdout.count("skipped (already finished)") == 2, describe(rerun)
    assert [d.name for d in job_dirs(sweep_dir)] == expected
