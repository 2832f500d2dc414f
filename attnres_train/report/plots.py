"""PNG plots of a sweep: validation loss curves, loss against hybrid ratio, AttnRes depth weights, hidden RMS.

Every function draws from ``RunRecord``s only, returns the written path, or None when the runs hold no data for
that plot yet (a sweep that just started, a single standard-residual run, ...). ``keys`` are the config keys that
differ between the runs (``collect.differing_keys``): legends name a run by its values of those, colours follow
its arm (the values other than the seed) and the seeds of one arm are shades of the arm's colour.
"""

from __future__ import annotations

import json
import math
import textwrap
from pathlib import Path
from typing import Any, Optional

import matplotlib

matplotlib.use("Agg")  # files only, never a display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.colors import to_rgb  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402
from matplotlib.ticker import MaxNLocator, ScalarFormatter  # noqa: E402

from .collect import SEED_KEY, RunRecord, arm_of  # noqa: E402

Colour = tuple[float, float, float]

# How far the seeds of one arm spread from the arm's colour: the extremes mix in this much black / white.
SEED_SHADE_SPREAD = 0.45
# Hidden-RMS curves at the first, middle and last validation: line style, and how much white is mixed in, so
# earlier steps read as fainter versions of the run's final curve.
DIAGNOSTIC_STEP_STYLES = {"first": (":", 0.55), "middle": ("--", 0.3), "last": ("-", 0.0)}


def run_label(run: RunRecord, keys: list[str]) -> str:
    """The run's values of ``keys``, e.g. 'model.hybrid_ratio=3, model.residual=block_attnres'; its directory
    name when ``keys`` is empty (nothing differs, e.g. a single run)."""
    return ", ".join(f"{key}={run.config_value(key)}" for key in keys) or run.name


def _wrapped(text: str, width: int = 48) -> str:
    # Long labels wrap instead of being cut: a cut label could hide exactly the value that tells two runs apart.
    return "\n".join(textwrap.wrap(text, width, break_long_words=False)) or text


def _sort_value(value: Any) -> tuple:
    """Numbers in numeric order (seed 2 before seed 10), anything else after them by its text."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return (0, value, "")
    return (1, 0, json.dumps(value, sort_keys=True, default=str))


def _palette(count: int):
    """A qualitative colour map with ``count`` distinct colours where it can (it repeats past 20)."""
    return plt.get_cmap("tab10" if count <= 10 else "tab20")


def shade(colour: Colour, amount: float) -> Colour:
    """``colour`` mixed with white (``amount`` > 0) or black (< 0) by ``|amount|``."""
    target = 1.0 if amount > 0 else 0.0
    return tuple(c + abs(amount) * (target - c) for c in colour)  # type: ignore[return-value]


def coloured_runs(runs: list[RunRecord], keys: list[str]) -> list[tuple[RunRecord, Colour]]:
    """Every run with its colour, grouped by arm (first-seen order) and by seed within an arm.

    An arm gets one palette colour; its seeds range from darker to lighter shades of it, so replicates read as
    one family in a legend and a plot.
    """
    arms: dict[tuple, list[RunRecord]] = {}
    for run in runs:
        arms.setdefault(arm_of(run, keys), []).append(run)
    palette = _palette(len(arms))
    out = []
    for index, members in enumerate(arms.values()):
        base = to_rgb(palette(index % palette.N))
        members = sorted(members, key=lambda run: _sort_value(run.config_value(SEED_KEY)))
        amounts = np.linspace(-SEED_SHADE_SPREAD, SEED_SHADE_SPREAD, len(members)) if len(members) > 1 else [0.0]
        out.extend((run, shade(base, float(amount))) for run, amount in zip(members, amounts))
    return out


def loss_unit(runs: list[RunRecord]) -> str:
    """'byte' when every run whose tokenizer is known uses the byte tokenizer (a token is a byte), else 'token'."""
    known = [run for run in runs if run.config_value("data.tokenizer") is not None]
    return "byte" if known and all(run.loss_is_per_byte for run in known) else "token"


def _label_loss_axis(ax, quantity: str, unit: str) -> None:
    """'<quantity> (nats/<unit>)'; per byte also a right-hand axis in bits per byte (nats / ln 2)."""
    ax.set_ylabel(f"{quantity} (nats/{unit})")
    if unit == "byte":
        bits = ax.secondary_yaxis("right", functions=(lambda n: n / math.log(2), lambda b: b * math.log(2)))
        bits.set_ylabel("bits/byte")


def _legend(fig, handles=None) -> None:
    # Outside the axes: sweep labels are long, and inside they would cover the curves.
    fig.legend(handles=handles, loc="outside right upper", fontsize=8)


def _save(fig, path: Path) -> Path:
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_val_loss(runs: list[RunRecord], keys: list[str], path: Path, x: str = "tokens") -> Optional[Path]:
    """Validation loss against training tokens (``x='tokens'``) or training FLOPs (``x='flops'``), per run."""
    curves = []
    for run, colour in coloured_runs(runs, keys):
        points = [(r.get(x), r["val_loss"]) for r in run.val_records]
        if x == "flops" and run.summary.get("train_flops_per_token"):
            per_token = run.summary["train_flops_per_token"]
            points = [(r.get("flops", r["tokens"] * per_token), r["val_loss"]) for r in run.val_records]
        points = [(a, b) for a, b in points if a is not None and b is not None]
        if points:
            curves.append((run, colour, points))
    if not curves:
        return None
    fig, ax = plt.subplots(figsize=(10.0, 4.8), layout="constrained")
    for run, colour, points in curves:
        xs, ys = zip(*points)
        label = run_label(run, keys) + ("" if run.status == "finished" else f" ({run.status})")
        ax.plot(xs, ys, marker="o", color=colour, linestyle="-" if run.residual != "standard" else "--",
                label=_wrapped(label))
    ax.set_xlabel("training tokens" if x == "tokens" else "training FLOPs (forward + backward)")
    _label_loss_axis(ax, "validation loss", loss_unit([run for run, _, _ in curves]))
    ax.set_title(f"Validation loss against training {'tokens' if x == 'tokens' else 'compute'}")
    ax.grid(alpha=0.3)
    _legend(fig)
    return _save(fig, path)


def plot_final_val_vs_ratio(runs: list[RunRecord], keys: list[str], path: Path) -> Optional[Path]:
    """Final validation loss against hybrid ratio, one series per arm apart from the ratio (per residual mode in
    a ratio x residual sweep). Every run is a marker; a line joins the series' per-ratio means (over seeds) only
    where the series has two or more ratios, since a line through one point would not be drawn at all."""
    series_keys = [key for key in keys if key not in ("model.hybrid_ratio", SEED_KEY)] or ["model.residual"]
    series: dict[str, list[tuple[int, float]]] = {}
    for run in runs:
        if run.last_val is None or run.hybrid_ratio is None:
            continue
        series.setdefault(run_label(run, series_keys), []).append((int(run.hybrid_ratio), run.last_val["val_loss"]))
    if not series:
        return None
    fig, ax = plt.subplots(figsize=(9.0, 4.5), layout="constrained")
    palette = _palette(len(series))
    for index, (label, points) in enumerate(series.items()):
        colour = palette(index % palette.N)
        ax.scatter([p[0] for p in points], [p[1] for p in points], color=colour, zorder=3, label=_wrapped(label))
        ratios = sorted({ratio for ratio, _ in points})
        if len(ratios) > 1:
            means = [np.mean([loss for r, loss in points if r == ratio]) for ratio in ratios]
            ax.plot(ratios, means, color=colour)
    ax.set_xticks(sorted({ratio for points in series.values() for ratio, _ in points}))
    ax.set_xlabel("hybrid ratio (linear-attention layers per full-attention layer)")
    _label_loss_axis(ax, "final validation loss", loss_unit([run for run in runs if run.last_val is not None]))
    ax.set_title("Final validation loss against hybrid ratio")
    ax.grid(alpha=0.3)
    _legend(fig)
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
    ax.set_title(_wrapped(f"AttnRes depth weights at step {record['step']}: {run_label(run, keys)}", 70),
                 fontsize=10)
    return _save(fig, path)


def diagnostics_at_steps(run: RunRecord) -> dict[str, dict]:
    """The run's first, middle and last validation records with hidden-state RMS, by position ('first',
    'middle', 'last'); fewer when the run has fewer (a single one is 'last')."""
    records = run.diagnostics_records
    indices = {"first": 0, "middle": (len(records) - 1) // 2, "last": len(records) - 1}
    # With fewer than three records the positions coincide: each record is drawn once, in its latest role.
    if indices["middle"] in (indices["first"], indices["last"]):
        del indices["middle"]
    if indices["first"] == indices["last"]:
        del indices["first"]
    return {position: records[index] for position, index in indices.items()} if records else {}


def plot_hidden_rms(runs: list[RunRecord], keys: list[str], path: Path) -> Optional[Path]:
    """RMS of each sublayer's input across depth at the first, middle and last validation of each run: the
    run's colour, fainter and dotted / dashed for the earlier steps."""
    curves = [(run, colour, diagnostics_at_steps(run)) for run, colour in coloured_runs(runs, keys)]
    curves = [curve for curve in curves if curve[2]]
    if not curves:
        return None
    fig, ax = plt.subplots(figsize=(10.0, 4.8), layout="constrained")
    run_handles = []
    for run, colour, by_position in curves:
        for position, record in by_position.items():
            linestyle, whiten = DIAGNOSTIC_STEP_STYLES[position]
            rms = record["sublayer_input_rms"]
            ax.plot(range(len(rms)), rms, marker=".", linestyle=linestyle, color=shade(colour, whiten))
        run_handles.append(Line2D([], [], color=colour, marker=".", label=_wrapped(run_label(run, keys))))
    step_handles = []
    for position, (linestyle, whiten) in DIAGNOSTIC_STEP_STYLES.items():
        steps = {by_position[position]["step"] for _, _, by_position in curves if position in by_position}
        if steps:
            when = f"step {steps.pop()}" if len(steps) == 1 else "each run's own step"
            step_handles.append(Line2D([], [], color=shade((0.3, 0.3, 0.3), whiten), linestyle=linestyle,
                                       label=f"{position} validation ({when})"))
    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(ScalarFormatter())  # plain numbers: RMS values span a decade or two at most
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("sublayer index (2 per decoder layer: mixer, MLP)")
    ax.set_ylabel("RMS of sublayer input (log scale)")
    ax.set_title("Hidden-state RMS across depth during training")
    ax.grid(alpha=0.3, which="both")
    _legend(fig, handles=run_handles + step_handles)
    return _save(fig, path)
