"""The comparison table: one row per run, written as CSV (full precision) and Markdown (readable)."""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Any, Optional

from .collect import CONTEXT_LENGTHS, RunRecord, cache_bytes, mean_throughput, run_flops, source_names, swept_keys

# Column name -> Markdown header. Swept columns come first, named by their config key; the per-source
# validation losses of mixture runs (``source_column``) follow the aggregate ones.
METRIC_COLUMNS = {
    "status": "status",
    "total_parameters": "params",
    "active_parameters": "active params",
    "tokens": "tokens",
    "flops": "train FLOPs",
    "final_train_loss": "train loss",
    "final_val_loss": "val loss",
    "final_val_bpb": "val bits/byte",
    "tokens_per_s": "tokens/s",
    **{f"cache_bytes_{name}": f"cache/seq @{name.upper()}" for name in CONTEXT_LENGTHS},
    "run": "run dir",
}


def source_column(source: str) -> str:
    return f"val_loss[{source}]"


def table_rows(runs: list[RunRecord]) -> tuple[list[str], list[dict[str, Any]]]:
    """(columns, rows): the swept config values, then ``METRIC_COLUMNS`` with one validation-loss column per data
    source of the mixture runs, taken as-is from each run's files."""
    swept = swept_keys(runs)
    sources = source_names(runs)
    rows = []
    for run in runs:
        last_train, last_val = run.last_train, run.last_val
        final_val_loss = last_val.get("val_loss") if last_val else None
        # Bits/byte only where a token is a byte; other tokenizers would need the corpus' bytes per token.
        per_byte = run.loss_is_per_byte and final_val_loss is not None
        row: dict[str, Any] = {key: run.config_value(key) for key in swept}
        row.update(
            status=run.status,
            total_parameters=run.summary.get("total_parameters"),
            active_parameters=run.summary.get("active_parameters"),
            tokens=last_train["tokens"] if last_train else None,
            flops=run_flops(run),
            final_train_loss=last_train.get("loss") if last_train else None,
            final_val_loss=final_val_loss,
            final_val_bpb=final_val_loss / math.log(2) if per_byte else None,
            tokens_per_s=mean_throughput(run),
            run=run.name,
        )
        row.update({source_column(name): loss for name, loss in run.final_val_loss_by_source.items()})
        row.update({f"cache_bytes_{name}": value for name, value in cache_bytes(run).items()})
        rows.append(row)
    metrics = list(METRIC_COLUMNS)
    after_val = metrics.index("final_val_bpb") + 1
    metrics[after_val:after_val] = [source_column(name) for name in sources]
    return [*swept, *metrics], rows


def write_csv(path: Path, columns: list[str], rows: list[dict]) -> None:
    """Values as logged (floats via repr, so they round-trip exactly); empty cells for missing values."""
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        for row in rows:
            writer.writerow({c: "" if row.get(c) is None else _csv_value(row[c]) for c in columns})


def _csv_value(value: Any) -> str:
    return repr(value) if isinstance(value, float) else str(value)


def human_count(value: Optional[float], unit: str = "") -> str:
    """1234567 -> '1.23M' (SI prefixes; bytes use binary prefixes)."""
    if value is None:
        return "–"
    if unit == "B":
        for prefix in ("B", "KiB", "MiB", "GiB", "TiB"):
            if abs(value) < 1024 or prefix == "TiB":
                return f"{value:.0f} {prefix}" if prefix == "B" else f"{value:.2f} {prefix}"
            value /= 1024
    for threshold, suffix in ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= threshold:
            return f"{value / threshold:.3g}{suffix}"
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _markdown_cell(column: str, value: Any) -> str:
    if value is None:
        return "–"
    if column.startswith("cache_bytes_"):
        return human_count(value, "B")
    if column in ("total_parameters", "active_parameters", "tokens", "flops", "tokens_per_s"):
        return human_count(value)
    if column in ("final_train_loss", "final_val_loss", "final_val_bpb") or column.startswith("val_loss["):
        return f"{value:.4f}" if math.isfinite(value) else str(value)
    return str(value).replace("|", "\\|")


def markdown_table(columns: list[str], rows: list[dict]) -> str:
    headers = [METRIC_COLUMNS.get(c, c).replace("|", "\\|") for c in columns]  # source names are free text
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    for row in rows:
        lines.append("| " + " | ".join(_markdown_cell(c, row.get(c)) for c in columns) + " |")
    return "\n".join(lines)
