"""``attnres-report`` on hand-written run directories: a single run, a sweep still running, a failed job.

No training here: the run files are written by the test, so every expected table value is known exactly.
"""

from __future__ import annotations

import colorsys
import csv
import json
import math
from pathlib import Path

import pytest

from attnres_train.report import plots
from attnres_train.report.cli import main, write_report
from attnres_train.report.collect import collect_runs, differing_keys, swept_keys
from attnres_train.report.plots import depth_weight_matrix, diagnostics_at_steps

MODEL = {"num_layers": 2, "hybrid_ratio": 1, "hidden_size": 32, "linear_num_heads": 2, "linear_head_dim": 16,
         "linear_conv_size": 4, "full_mixer": "mla", "mla_kv_lora_rank": 8, "mla_qk_rope_head_dim": 0,
         "attnres_block_size": 2}


def write_run(run_dir: Path, residual: str, ratio: int, steps: int, finished: bool, partial_line: bool = False,
              seed: int = 1234, val_offset: float = 0.0, tokenizer: str | None = None,
              loss_by_source: dict | None = None):
    """A run directory as the trainer leaves it: one train and one validation record per step.

    ``val_offset`` shifts the validation losses (replicates differ a little); ``tokenizer`` adds ``data.tokenizer`` to the config;
    ``loss_by_source`` ({name: final loss}) writes ``val_loss_by_source`` records as a mixture run does.
    """
    run_dir.mkdir(parents=True)
    model = {**MODEL, "hybrid_ratio": ratio, "residual": residual}
    config = {"run_dir": str(run_dir), "model": model, "train": {"max_steps": steps, "seed": seed}}
    if tokenizer is not None:
        config["data"] = {"tokenizer": tokenizer}
    (run_dir / "resolved_config.yaml").write_text(json.dumps(config))
    (run_dir / "model_summary.json").write_text(json.dumps(
        {"total_parameters": 1000 + ratio, "active_parameters": 800 + ratio, "train_flops_per_token": 10.0}))
    lines = []
    for step in range(1, steps + 1):
        lines.append({"step": step, "loss": 5.0 - 0.1 * step - 0.01 * ratio, "tokens": 100 * step,
                      "flops": 1000.0 * step, "tokens_per_s": 10.0 * step})
        val = {"step": step, "tokens": 100 * step, "flops": 1000.0 * step,
               "val_loss": 5.1 - 0.1 * step + val_offset,
               "sublayer_input_rms": [1.0, 1.5 * step, 2.0, 3.0 + ratio]}
        if residual != "standard":
            val["attnres_depth_weights"] = [[1.0], [0.4, 0.6], [0.3, 0.7], [0.2, 0.3, 0.5], [0.1, 0.2, 0.7]]
        if loss_by_source is not None:
            val["val_loss_by_source"] = {name: loss + 0.1 * (steps - step) for name, loss in loss_by_source.items()}
        lines.append(val)
    text = "".join(json.dumps(line) + "\n" for line in lines)
    if partial_line:
        text += '{"step": 99, "loss": 1.'  # a record being written right now
    (run_dir / "metrics.jsonl").write_text(text)
    if finished:
        (run_dir / "FINISHED").write_text(json.dumps({"step": steps}))


@pytest.fixture
def drawn_figures(monkeypatch) -> dict:
    """{PNG file name: matplotlib Figure} of every plot the report writes, to inspect what was drawn."""
    figures = {}
    save = plots._save

    def keep(fig, path):
        figures[Path(path).name] = fig
        return save(fig, path)

    monkeypatch.setattr(plots, "_save", keep)
    return figures


def legend_texts(fig) -> list[str]:
    """Every legend entry of the figure (on the figure or on an axes), wrapped lines joined."""
    legends = [*fig.legends, *(ax.get_legend() for ax in fig.axes if ax.get_legend() is not None)]
    return [text.get_text().replace("\n", " ") for legend in legends for text in legend.get_texts()]


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
    # a heatmap stands alone: its name says which ratio and residual it shows even when nothing was swept
    heatmap = run_dir / "report" / "depth_weights_00_model.hybrid_ratio=1_model.residual=block_attnres.png"
    assert heatmap.stat().st_size > 10_000


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


# --- what the plots draw -----------------------------------------------------------------------------------------


def hue(colour) -> float:
    return colorsys.rgb_to_hls(*colour[:3])[0]


def test_legends_name_only_what_was_swept_and_colours_follow_arms(tmp_path, drawn_figures):
    for residual in ("standard", "block_attnres"):
        for seed in (1, 2, 3):
            write_run(tmp_path / f"{residual}_s{seed}", residual, 3, steps=2, finished=True, seed=seed,
                      val_offset=0.01 * seed)
    runs = collect_runs(tmp_path)
    assert differing_keys(runs) == ["model.residual", "train.seed"]  # the ratio is 3 everywhere
    write_report(tmp_path)

    fig = drawn_figures["val_loss_vs_tokens.png"]
    assert legend_texts(fig) == [f"model.residual={residual}, train.seed={seed}"
                                 for residual in ("block_attnres", "standard") for seed in (1, 2, 3)]
    colours = {line.get_label().replace("\n", " "): line.get_color() for line in fig.axes[0].get_lines()}
    for residual in ("block_attnres", "standard"):
        arm = [colours[f"model.residual={residual}, train.seed={seed}"] for seed in (1, 2, 3)]
        assert len(set(arm)) == 3, "each seed is its own shade"
        assert max(hue(c) for c in arm) - min(hue(c) for c in arm) < 0.02, "shades of one colour"
    assert abs(hue(colours["model.residual=standard, train.seed=1"])
               - hue(colours["model.residual=block_attnres, train.seed=1"])) > 0.1, "arms differ in colour"
    # the heatmaps, which stand alone, still name the constant ratio
    assert sorted(path.name for path in (tmp_path / "report").glob("depth_weights_*.png")) == [
        f"depth_weights_{index:02d}_model.hybrid_ratio=3_model.residual=block_attnres_train.seed={seed}.png"
        for index, seed in enumerate((1, 2, 3))
    ]


@pytest.mark.parametrize("tokenizer", ["byte", "gpt2"])
def test_loss_unit_follows_the_tokenizer(tmp_path, drawn_figures, tokenizer):
    write_run(tmp_path / "a", "standard", 0, steps=2, finished=True, tokenizer=tokenizer)
    write_run(tmp_path / "b", "standard", 3, steps=2, finished=True, tokenizer=tokenizer)
    write_report(tmp_path)
    per_byte = tokenizer == "byte"
    for name, quantity in (("val_loss_vs_tokens.png", "validation loss"), ("val_loss_vs_flops.png", "validation loss"),
                           ("val_loss_vs_ratio.png", "final validation loss")):
        ax = drawn_figures[name].axes[0]
        assert ax.get_ylabel() == f"{quantity} (nats/{'byte' if per_byte else 'token'})", name
        # a bits/byte axis only where a token is a byte
        bits_axes = [child for child in ax.get_children() if type(child).__name__ == "SecondaryAxis"]
        assert [bits.get_ylabel() for bits in bits_axes] == (["bits/byte"] if per_byte else []), name
    rows = read_csv(tmp_path / "report" / "report.csv")
    for row in rows:
        expected = repr(float(row["final_val_loss"]) / math.log(2)) if per_byte else ""
        assert row["final_val_bpb"] == expected


def test_hidden_rms_is_drawn_at_the_first_middle_and_last_validation(tmp_path, drawn_figures):
    write_run(tmp_path / "run", "block_attnres", 1, steps=5, finished=True)
    write_report(tmp_path / "run")
    fig = drawn_figures["hidden_state_rms.png"]
    drawn = [list(line.get_ydata()) for line in fig.axes[0].get_lines()]
    # write_run logs a validation at every step; its second RMS is 1.5 x step
    assert drawn == [[1.0, 1.5 * step, 2.0, 4.0] for step in (1, 3, 5)]
    assert [line.get_linestyle() for line in fig.axes[0].get_lines()] == [":", "--", "-"]
    assert legend_texts(fig)[-3:] == ["first validation (step 1)", "middle validation (step 3)",
                                      "last validation (step 5)"]


def test_diagnostics_steps_with_fewer_than_three_validations(tmp_path):
    write_run(tmp_path / "one", "standard", 0, steps=1, finished=True)
    write_run(tmp_path / "two", "standard", 0, steps=2, finished=True)
    one, two = collect_runs(tmp_path)
    assert {position: r["step"] for position, r in diagnostics_at_steps(one).items()} == {"last": 1}
    assert {position: r["step"] for position, r in diagnostics_at_steps(two).items()} == {"first": 1, "last": 2}


def test_ratio_plot_marks_every_run_and_joins_only_two_or_more_ratios(tmp_path, drawn_figures):
    write_run(tmp_path / "std_r0", "standard", 0, steps=2, finished=True, val_offset=0.2)
    write_run(tmp_path / "std_r3", "standard", 3, steps=2, finished=True)
    write_run(tmp_path / "attnres_r3", "block_attnres", 3, steps=2, finished=True, val_offset=-0.1)
    write_report(tmp_path)
    ax = drawn_figures["val_loss_vs_ratio.png"].axes[0]
    # every run is a marker, whether drawn as a scatter or as a line's markers
    marked = [tuple(xy) for collection in ax.collections for xy in collection.get_offsets().tolist()]
    marked += [xy for line in ax.get_lines() if line.get_marker() not in ("None", "", None)
               for xy in zip(line.get_xdata(), line.get_ydata())]
    final = 5.1 - 0.2
    assert sorted(marked) == [(0, pytest.approx(final + 0.2)), (3, pytest.approx(final - 0.1)),
                              (3, pytest.approx(final))]
    # only the residual mode run at two ratios is joined by a line; a one-point "line" would show nothing
    lines = [line for line in ax.get_lines() if line.get_linestyle() not in ("None", "")]
    assert [list(zip(line.get_xdata(), line.get_ydata())) for line in lines] == [
        [(0, pytest.approx(final + 0.2)), (3, pytest.approx(final))]]
    assert sorted(legend_texts(drawn_figures["val_loss_vs_ratio.png"])) == [
        "model.residual=block_attnres", "model.residual=standard"]


# --- per-source validation losses of data mixtures ---------------------------------------------------------------


def test_per_source_validation_losses_are_columns(tmp_path):
    write_run(tmp_path / "mixture", "standard", 0, steps=2, finished=True, loss_by_source={"web": 2.5, "code": 1.25})
    write_run(tmp_path / "single", "standard", 3, steps=2, finished=True)
    report = write_report(tmp_path)

    with open(report.with_suffix(".csv"), newline="") as handle:
        reader = csv.DictReader(handle)
        columns = reader.fieldnames
        rows = {row["run"]: row for row in reader}
    assert columns[columns.index("final_val_loss"):columns.index("final_val_loss") + 4] == [
        "final_val_loss", "final_val_bpb", "val_loss[code]", "val_loss[web]"]
    # the newest validation record's values (write_run's earlier records are 0.1 higher)
    assert float(rows["mixture"]["val_loss[web]"]) == 2.5 and float(rows["mixture"]["val_loss[code]"]) == 1.25
    assert rows["single"]["val_loss[web]"] == "" and rows["single"]["val_loss[code]"] == ""

    header, _, mixture, single = [line for line in report.read_text().splitlines() if line.startswith("|")]
    cells = [cell.strip() for cell in header.strip("|").split("|")]
    assert cells.index("val_loss[web]") == cells.index("val_loss[code]") + 1
    mixture_cells = [cell.strip() for cell in mixture.strip("|").split("|")]
    single_cells = [cell.strip() for cell in single.strip("|").split("|")]
    assert mixture_cells[cells.index("val_loss[web]")] == "2.5000"
    assert single_cells[cells.index("val_loss[web]")] == "–"


def test_runs_without_sources_have_no_source_columns(tmp_path):
    write_run(tmp_path / "run", "standard", 0, steps=2, finished=True)
    report = write_report(tmp_path / "run")
    with open(report.with_suffix(".csv"), newline="") as handle:
        assert not [column for column in csv.DictReader(handle).fieldnames if column.startswith("val_loss[")]
