"""``attnres-report`` on hand-written run directories: a single run, a sweep still running, a failed job.

No training here: the run files are written by the test, so every expected table value is known exactly.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from attnres_train.report.cli import main, write_report
from attnres_train.report.collect import collect_runs, swept_keys
from attnres_train.report.plots import depth_weight_matrix

MODEL = {"num_layers": 2, "hybrid_ratio": 1, "hidden_size": 32, "linear_num_heads": 2, "linear_head_dim": 16,
         "linear_conv_size": 4, "full_mixer": "mla", "mla_kv_lora_rank": 8, "mla_qk_rope_head_dim": 0,
         "attnres_block_size": 2}


def write_run(run_dir: Path, residual: str, ratio: int, steps: int, finished: bool, partial_line: bool = False):
    run_dir.mkdir(parents=True)
    model = {**MODEL, "hybrid_ratio": ratio, "residual": residual}
    (run_dir / "resolved_config.yaml").write_text(json.dumps({"run_dir": str(run_dir), "model": model,
                                                              "train": {"max_steps": steps}}))
    (run_dir / "model_summary.json").write_text(json.dumps(
        {"total_parameters": 1000 + ratio, "active_parameters": 800 + ratio, "train_flops_per_token": 10.0}))
    lines = []
    for step in range(1, steps + 1):
        lines.append({"step": step, "loss": 5.0 - 0.1 * step - 0.01 * ratio, "tokens": 100 * step,
                      "flops": 1000.0 * step, "tokens_per_s": 10.0 * step})
        val = {"step": step, "tokens": 100 * step, "flops": 1000.0 * step, "val_loss": 5.1 - 0.1 * step,
               "sublayer_input_rms": [1.0, 1.5 * step, 2.0, 3.0 + ratio]}
        if residual != "standard":
            val["attnres_depth_weights"] = [[1.0], [0.4, 0.6], [0.3, 0.7], [0.2, 0.3, 0.5], [0.1, 0.2, 0.7]]
        lines.append(val)
    text = "".join(json.dumps(line) + "\n" for line in lines)
    if partial_line:
        text += '{"step": 99, "loss": 1.'  # a record being written right now
    (run_dir / "metrics.jsonl").write_text(text)
    if finished:
        (run_dir / "FINISHED").write_text(json.dumps({"step": steps}))


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def test_single_run_directory(tmp_path):
    run_dir = tmp_path / "run"
    write_run(run_dir, "block_attnres", 1, steps=3, finished=True)
    report = write_report(run_dir)
    (row,) = read_csv(report.with_suffix(".csv"))
    assert row["status"] == "finished" and row["model.residual"] == "block_attnres"
    assert float(row["final_train_loss"]) == 5.0 - 0.3 - 0.01
    assert float(row["final_val_loss"]) == 5.1 - 0.3
    assert int(row["tokens"]) == 300 and float(row["flops"]) == 3000.0
    assert float(row["tokens_per_s"]) == 25.0  # mean of 20 and 30: the first window is warm-up
    # 1 KDA layer: 2*16*16 state + 3*(2*32+32) conv = 800 values; 1 MLA layer: 8 per token; bf16
    assert int(row["cache_bytes_4k"]) == (800 + 8 * 4096) * 2
    assert int(row["cache_bytes_1m"]) == (800 + 8 * 1048576) * 2
    assert (run_dir / "report" / "depth_weights_00_ratio=1_block_attnres.png").stat().st_size > 10_000


def test_sweep_in_progress_with_a_failed_and_an_unstarted_job(tmp_path, capsys):
    sweep = tmp_path / "sweep"
    write_run(sweep / "a", "standard", 0, steps=3, finished=True)
    write_run(sweep / "b", "block_attnres", 0, steps=2, finished=False, partial_line=True)
    failed = sweep / "c"
    failed.mkdir()
    (failed / ".hydra" / "2026-01-01_00-00-00").mkdir(parents=True)
    (failed / ".hydra" / "2026-01-01_00-00-00" / "config.yaml").write_text(
        "run_dir: x\nmodel:\n  hybrid_ratio: 3\n  residual: standard\n")
    (failed / "FAILED").write_text(json.dumps({"error": "ValueError: boom", "traceback": "..."}))

    main([str(sweep)])
    assert "wrote" in capsys.readouterr().out
    rows = {row["run"]: row for row in read_csv(sweep / "report" / "report.csv")}
    assert {name: row["status"] for name, row in rows.items()} == {"a": "finished", "b": "running", "c": "failed"}
    assert int(rows["b"]["tokens"]) == 200  # the half-written line is ignored
    assert rows["c"]["final_val_loss"] == "" and rows["c"]["model.hybrid_ratio"] == "3"
    markdown = (sweep / "report" / "report.md").read_text()
    assert "- `c`: ValueError: boom" in markdown
    assert "1 unfinished" in markdown and "1 failed" in markdown
    for name in ("val_loss_vs_tokens", "val_loss_vs_flops", "val_loss_vs_ratio", "hidden_state_rms"):
        assert (sweep / "report" / f"{name}.png").stat().st_size > 10_000


def test_swept_keys_are_the_primary_axes_plus_what_differs(tmp_path):
    write_run(tmp_path / "a", "standard", 0, steps=1, finished=True)
    write_run(tmp_path / "b", "standard", 0, steps=2, finished=True)
    assert swept_keys(collect_runs(tmp_path)) == ["model.hybrid_ratio", "model.residual", "train.max_steps"]


def test_depth_weight_matrix_pads_missing_sources_with_nan():
    matrix = depth_weight_matrix([[1.0], [0.25, 0.75]])
    assert matrix.shape == (2, 2)
    assert matrix[0, 0] == 1.0 and matrix[1, 1] == 0.75
    assert matrix[1, 0] != matrix[1, 0]  # NaN


def test_missing_directory_is_an_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([str(tmp_path / "nope")])
    assert exit_info.value.code == 2
    assert "SWEEP_DIR" in capsys.readouterr().err
