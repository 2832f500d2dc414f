"""PNG plots of a sweep: validation loss curves, loss against hybrid ratio, AttnRes depth weights, hidden RMS.

Every function draws from ``RunRecord``s only, returns the written path, or None when the runs hold no data for
that plot yet (a sweep that just started, a single standard-residual run, ...).
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import matplotlib

matplotlib.use("Agg")  # files only, never a display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from .collect import RunRecord  # noqa: E402


def run_label(run: RunRecord, keys: list[str]) -> str:
    """Short legend label from the swept values, e.g. 'ratio=3, block_attnres'."""
    parts = []
    for key in keys:
        value = run.config_value(key)
        if key == "model.hybrid_ratio":
            parts.append(f"ratio={value}")
        elif key == "model.residual":
            parts.append(str(value))
        else:
            parts.append(f"{key.rsplit('.', 1)[-1]}={value}")
    label = ", ".join(parts) or run.name
    return label if len(label) <= 60 else label[:57] + "..."  # a legend entry must not squeeze the axes away


def _save(fig, path: Path) -> Path:
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_val_loss(runs: list[RunRecord], keys: list[str], path: Path, x: str = "tokens") -> Optional[Path]:
    """Validation loss against training tokens (``x='tokens'``) or training FLOPs (``x='flops'``), per run."""
    curves = []
    for run in runs:
        points = [(r.get(x), r["val_loss"]) for r in run.val_records]
        if x == "flops" and run.summary.get("train_flops_per_token"):
            per_token = run.summary["train_flops_per_token"]
            points = [(r.get("flops", r["tokens"] * per_token), r["val_loss"]) for r in run.val_records]
        points = [(a, b) for a, b in points if a is not None and b is not None]
        if points:
            curves.append((run, points))
    if not curves:
        return None
    fig, ax = plt.subplots(figsize=(7.5, 4.8), layout="constrained")
    for run, points in curves:
        xs, ys = zip(*points)
        ax.plot(xs, ys, marker="o", linestyle="-" if run.residual != "standard" else "--",
                label=run_label(run, keys) + ("" if run.status == "finished" else f" ({run.status})"))
    ax.set_xlabel("training tokens" if x == "tokens" else "training FLOPs (forward + backward)")
    ax.set_ylabel("validation loss (nats/token)")
    ax.set_title(f"Validation loss against training {'tokens' if x == 'tokens' else 'compute'}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def plot_final_val_vs_ratio(runs: list[RunRecord], path: Path) -> Optional[Path]:
    """Final validation loss against hybrid ratio, one line per residual mode."""
    by_residual: dict[str, list[tuple[int, float]]] = {}
    for run in runs:
        if run.last_val is None or run.hybrid_ratio is None:
            continue
        by_residual.setdefault(str(run.residual), []).append((int(run.hybrid_ratio), run.last_val["val_loss"]))
    if not by_residual:
        return None
    fig, ax = plt.subplots(figsize=(6.5, 4.5), layout="constrained")
    ratios = sorted({ratio for points in by_residual.values() for ratio, _ in points})
    for residual, points in sorted(by_residual.items()):
        points.sort()
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=residual)
    ax.set_xticks(ratios)
    ax.set_xlabel("hybrid ratio (linear-attention layers per full-attention layer)")
    ax.set_ylabel("final validation loss (nats/token)")
    ax.set_title("Final validation loss against hybrid ratio")
    ax.grid(alpha=0.3)
    ax.legend(title="residual")
    return _save(fig, path)


def depth_weight_matrix(depth_weights: list[list[float]]) -> np.ndarray:
    """[sources, mixes] matrix of the per-mix source weights; NaN where a mix has fewer sources."""
    num_sources = max(len(w) for w in depth_weights)
    matrix = np.full((num_sources, len(depth_weights)), np.nan)
    for j, weights in enumerate(depth_weights):
        matrix[: len(weights), j] = weights
    return matrix


def plot_depth_weights(run: RunRecord, path: Path, keys: list[str]) -> Optional[Path]:
    """Heatmap of the AttnRes depth weights of the run's newest validation: source x sublayer."""
    record = next((r for r in reversed(run.val_records) if r.get("attnres_depth_weights")), None)
    if record is None:
        return None
    matrix = depth_weight_matrix(record["attnres_depth_weights"])
    num_sources, num_mixes = matrix.shape
    fig, ax = plt.subplots(figsize=(max(6.0, 0.45 * num_mixes + 3.0), max(4.0, 0.4 * num_sources + 2.0)),
                           layout="constrained")
    image = ax.imshow(np.ma.masked_invalid(matrix), aspect="auto", origin="lower", cmap="viridis", vmin=0.0)
    fig.colorbar(image, ax=ax, label="mean softmax weight")
    ax.set_xticks(range(num_mixes))
    ax.set_xticklabels([str(j) for j in range(num_mixes - 1)] + ["out"], fontsize=8)
    ax.set_yticks(range(num_sources))
    ax.set_yticklabels(["emb"] + [str(i) for i in range(1, num_sources)], fontsize=8)
    ax.set_xlabel("sublayer whose input is mixed (index; 'out' = final mix)")
    ax.set_ylabel("source (embedding, then block / sublayer outputs)")
    ax.set_title(f"AttnRes depth weights at step {record['step']}: {run_label(run, keys)}", fontsize=10)
    return _save(fig, path)


def plot_hidden_rms(runs: list[RunRecord], keys: list[str], path: Path) -> Optional[Path]:
    """RMS of each sublayer's input across depth (newest validation), standard dashed vs AttnRes solid."""
    curves = [(run, run.last_diagnostics) for run in runs]
    curves = [(run, rec["sublayer_input_rms"]) for run, rec in curves if rec is not None]
    if not curves:
        return None
    fig, ax = plt.subplots(figsize=(7.5, 4.8), layout="constrained")
    for run, rms in curves:
        ax.plot(range(len(rms)), rms, marker=".", linestyle="--" if run.residual == "standard" else "-",
                label=run_label(run, keys))
    ax.set_yscale("log")
    ax.set_xlabel("sublayer index (2 per decoder layer: mixer, MLP)")
    ax.set_ylabel("RMS of sublayer input (log scale)")
    ax.set_title("Hidden-state RMS across depth: standard (dashed) vs AttnRes (solid)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    return _save(fig, path)
