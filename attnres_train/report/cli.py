"""``attnres-report SWEEP_DIR``: the comparison report of a sweep (or of one run), also while it still runs.

Writes into ``SWEEP_DIR/report`` (or ``--out``): ``report.md`` (table + plots), ``report.csv`` and the PNGs.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path
from typing import Optional

from .collect import collect_runs, differing_keys, swept_keys
from .plots import run_label, plot_depth_weights, plot_final_val_vs_ratio, plot_hidden_rms, plot_val_loss
from .table import markdown_table, table_rows, write_csv


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.=-]+", "_", name).strip("_")[:120] or "run"


def write_report(root: Path, out_dir: Optional[Path] = None) -> Path:
    """Collect the runs under ``root``, write table, CSV and plots into ``out_dir``; returns report.md's path."""
    root = Path(root).resolve()
    runs = collect_runs(root)
    out_dir = Path(out_dir) if out_dir is not None else root / "report"
    out_dir.mkdir(parents=True, exist_ok=True)
    columns, rows = table_rows(runs)
    write_csv(out_dir / "report.csv", columns, rows)
    # Legends name what was swept; a heatmap stands alone, so it also names the ratio and residual it shows.
    legend_keys, heatmap_keys = differing_keys(runs), swept_keys(runs)

    plots = [
        ("Validation loss against tokens",
         plot_val_loss(runs, legend_keys, out_dir / "val_loss_vs_tokens.png", "tokens")),
        ("Validation loss against FLOPs", plot_val_loss(runs, legend_keys, out_dir / "val_loss_vs_flops.png", "flops")),
        ("Final validation loss against hybrid ratio",
         plot_final_val_vs_ratio(runs, legend_keys, out_dir / "val_loss_vs_ratio.png")),
        ("Hidden-state RMS across depth", plot_hidden_rms(runs, legend_keys, out_dir / "hidden_state_rms.png")),
    ]
    for index, run in enumerate(runs):
        if run.residual not in (None, "standard"):
            name = f"depth_weights_{index:02d}_{_slug(run_label(run, heatmap_keys))}.png"
            path = plot_depth_weights(run, out_dir / name, heatmap_keys)
            plots.append((f"AttnRes depth weights: {run.name}", path))

    counts = {status: sum(r.status == status for r in runs) for status in ("finished", "running", "failed")}
    lines = [
        f"# Sweep report: {root}",
        "",
        f"{len(runs)} runs: {counts['finished']} finished, {counts['running']} unfinished (running, interrupted "
        f"or not started), {counts['failed']} failed. Tokens, FLOPs and losses are the latest logged values; "
        "losses are in nats per token of the run's tokenizer, which with `data.tokenizer=byte` is nats per byte "
        "(val bits/byte = nats / ln 2); `val_loss[SOURCE]` is the validation loss on one source of a data mixture. "
        "tokens/s is the mean of the logged windows after the first. FLOPs = tokens x the model's exact training "
        "FLOPs per token. Cache/seq: KV cache + recurrent state of one sequence in bf16 at that context.",
        "",
        markdown_table(columns, rows),
        "",
    ]
    failed = [r for r in runs if r.status == "failed"]
    if failed:
        lines += ["## Failed runs", ""] + [f"- `{r.name}`: {r.error}" for r in failed] + [""]
    lines += ["## Plots", ""]
    for title, path in plots:
        if path is not None:
            lines += [f"### {title}", "", f"![{title}]({path.name})", ""]
    report = out_dir / "report.md"
    report.write_text("\n".join(lines), encoding="utf-8")
    return report


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(
        prog="attnres-report",
        description="Compare the runs of a sweep directory (or one run directory): Markdown + CSV table, PNG plots.",
    )
    parser.add_argument("sweep_dir", type=Path, help="sweep directory (the run_dir of attnres-train -m) or a run dir")
    parser.add_argument("--out", type=Path, default=None, help="output directory (default: SWEEP_DIR/report)")
    args = parser.parse_args(argv)
    if not args.sweep_dir.is_dir():
        print(f"error: SWEEP_DIR {args.sweep_dir}: no such directory", file=sys.stderr)
        raise SystemExit(2)
    report = write_report(args.sweep_dir, args.out)
    print(f"wrote {report} and {report.with_suffix('.csv')}")


if __name__ == "__main__":
    main()
