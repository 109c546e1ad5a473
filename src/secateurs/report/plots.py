"""The report's figures as inline SVG text (matplotlib, no display needed).

Costs are shown relative to each run's dense model and accuracy in %, as in the tables.
Points are never joined by lines: the stages of a run are separate models, not a path.
"""
from __future__ import annotations

import io
from pathlib import Path
from typing import Any, Sequence

import matplotlib

matplotlib.use("Agg")   # no display: render to files only
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import PercentFormatter  # noqa: E402

from ..measure import Timing
from .collect import RunRecord, StageRow  # noqa: E402

# Fixed ids and no date, so the same runs give byte-identical SVG.
_SVG_STYLE = {"svg.hashsalt": "secateurs", "svg.fonttype": "none", "font.size": 10}
# Wide enough to fill a laptop-width page at its natural size.
WIDTH = 11.0
MARKERS = "osD^vP*Xh<>p"
# The costs of the Pareto plot: (measurement key, axis label).
PARETO_COSTS = (("macs", "MACs"), ("size_bytes", "bytes"), ("latency_ms", "measured latency"))


def _svg(fig: Any) -> str:
    buffer = io.StringIO()
    with plt.rc_context(_SVG_STYLE):
        fig.savefig(buffer, format="svg", bbox_inches="tight", metadata={"Date": None})
    plt.close(fig)
    text = buffer.getvalue()
    return text[text.index("<svg"):]    # drop the XML prolog and doctype: the SVG goes inline in HTML


# What a report can plot a model's quality as, in order of preference:
# (measurement key, axis label, whether higher is better, scale shown).
QUALITIES = (("accuracy", "accuracy (%)", True, 100.0), ("loss", "loss (lower is better)", False, 1.0),
             ("perplexity", "perplexity (lower is better)", False, 1.0),
             ("embedding_cosine", "embedding cosine to the dense model", True, 1.0))


def quality_key(runs: Sequence[RunRecord]) -> tuple[str, str, bool, float] | None:
    """The first of QUALITIES some row records, or None: accuracy where there is one, else the loss, ..."""
    rows = [row.measurement for run in runs for row in run.rows]
    return next((q for q in QUALITIES if any(m.get(q[0]) is not None for m in rows)), None)


def _relative(run: RunRecord, row: StageRow, key: str) -> float | None:
    value, dense = row.measurement.get(key), run.dense.get(key)
    return value / dense if value is not None and dense else None


def _pareto_front(points: list[tuple[float, float]], higher_is_better: bool) -> set[int]:
    """Indices of the points no other point beats on both cost (lower) and quality."""
    sign = 1 if higher_is_better else -1
    return {i for i, (x, y) in enumerate(points)
            if not any((x2 <= x and sign * y2 >= sign * y) and (x2 < x or sign * y2 > sign * y)
                       for x2, y2 in points)}


def pareto(runs: Sequence[RunRecord]) -> str:
    """Quality against MACs, bytes and measured latency relative to dense, one point per run and stage.

    Colour names the run, marker shape the stage; points on the Pareto front of a panel
    are ringed. Latency points carry their spread (IQR) as a horizontal bar.
    """
    key, label, higher, scale = quality_key(runs)
    stages = list(dict.fromkeys(row.stage for run in runs for row in run.rows_shown()))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    with plt.rc_context(_SVG_STYLE):
        fig, axes = plt.subplots(1, len(PARETO_COSTS), figsize=(WIDTH, 3.8), sharey=True, layout="constrained")
        for ax, (cost, title) in zip(axes, PARETO_COSTS):
            points = []
            for r, run in enumerate(runs):
                for row in run.rows_shown():
                    x, y = _relative(run, row, cost), row.measurement.get(key)
                    if x is None or y is None:
                        continue
                    y = scale * y
                    points.append((x, y))
                    spread = (row.measurement.get("latency_iqr_ms") or 0) / 2 / run.dense["latency_ms"] \
                        if cost == "latency_ms" else 0
                    ax.errorbar([x], [y], xerr=[spread] if spread else None, fmt=MARKERS[stages.index(row.stage) % len(MARKERS)],
                                color=colours[r % len(colours)], markersize=7, capsize=3, linestyle="none",
                                label=f"{run.name} · {row.label}")
            for i in _pareto_front(points, higher):
                ax.plot(*points[i], marker="o", markersize=14, markerfacecolor="none", markeredgecolor="0.35",
                        linestyle="none", label="_front")
            ax.set_xlabel(f"{title}, fraction of dense")
            ax.xaxis.set_major_formatter(PercentFormatter(1.0, decimals=0))
            ax.grid(alpha=0.3)
            ax.set_title(f"{label.split(' (')[0]} vs {title}")
        axes[0].set_ylabel(label)
        handles, labels = axes[0].get_legend_handles_labels()
        unique = {lab: h for h, lab in zip(handles, labels) if not lab.startswith("_")}
        ring = plt.Line2D([], [], marker="o", markersize=10, markerfacecolor="none", markeredgecolor="0.35",
                          linestyle="none")
        fig.legend(list(unique.values()) + [ring], list(unique) + ["on the Pareto front"], loc="outside lower center",
                   ncol=min(4, len(unique) + 1), fontsize=8, frameon=False)
    return _svg(fig)


def _barh(names: list[str], values: list[float], texts: list[str], xlabel: str, title: str, colour: str,
          xlim: tuple[float, float] | None = None) -> str:
    with plt.rc_context(_SVG_STYLE):
        fig, ax = plt.subplots(figsize=(WIDTH, 0.32 * len(names) + 1.3), layout="constrained")
        bars = ax.barh(names, values, color=colour)
        ax.bar_label(bars, texts, padding=3, fontsize=8)
        ax.invert_yaxis()
        if xlim:
            ax.set_xlim(*xlim)
        ax.set_xlabel(xlabel)
        ax.grid(axis="x", alpha=0.3)
        ax.set_title(title)
    return _svg(fig)


def widths_changed(run: RunRecord) -> bool:
    """Whether the run removed whole channels somewhere: a layer's output width shrank or a layer is gone."""
    final = {layer["name"]: layer.get("width", 0) for layer in run.final_layers}
    return any(final.get(layer["name"], 0) < layer["width"] for layer in run.dense_layers)


def sparsity_changed(run: RunRecord) -> bool:
    """Whether some layer of the final model holds zeros in its weights."""
    return any(layer.get("sparsity", 0) > 0 for layer in run.final_layers)


def layer_widths(run: RunRecord) -> str:
    """Per layer, the fraction of its output channels / features kept, labelled kept/dense."""
    final = {layer["name"]: layer["width"] for layer in run.final_layers}
    names = [layer["name"] for layer in run.dense_layers]
    kept = [final.get(layer["name"], 0) for layer in run.dense_layers]
    dense = [layer["width"] for layer in run.dense_layers]
    return _barh(names, [k / d for k, d in zip(kept, dense)], [f"{k}/{d}" for k, d in zip(kept, dense)],
                 "output channels / features kept, fraction of dense", f"{run.name}: kept width per layer",
                 "tab:blue", (0, 1.12))


def layer_sparsity(run: RunRecord) -> str:
    """Per layer of the final model, the fraction of its weights that are zero."""
    names = [layer["name"] for layer in run.final_layers]
    values = [layer["sparsity"] for layer in run.final_layers]
    return _barh(names, values, [f"{v:.0%}" for v in values], "weights that are zero, fraction of the layer",
                 f"{run.name}: sparsity per layer (final model)", "tab:red", (0, 1.12))


def latency_plot(runs: Sequence[RunRecord]) -> str:
    """Measured latency of every run and stage: the median as a bar, the IQR as an error bar."""
    labels, medians, spreads, texts, colours = [], [], [], [], []
    cycle = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for r, run in enumerate(runs):
        for row in run.rows_shown():
            m = row.measurement
            if m.get("latency_ms") is None:
                continue
            labels.append(f"{run.name} · {row.label}")
            medians.append(m["latency_ms"])
            spreads.append((m.get("latency_iqr_ms") or 0) / 2)
            texts.append(Timing.of(m).text)
            colours.append(cycle[r % len(cycle)])
    threads = sorted({row.measurement.get("threads") for run in runs for row in run.rows} - {None})
    with plt.rc_context(_SVG_STYLE):
        fig, ax = plt.subplots(figsize=(WIDTH, 0.32 * len(labels) + 1.3), layout="constrained")
        bars = ax.barh(labels, medians, xerr=spreads, color=colours, capsize=3, error_kw={"elinewidth": 1})
        ax.bar_label(bars, texts, padding=6, fontsize=8)
        ax.invert_yaxis()
        ax.set_xlim(0, max(medians) * 1.25)
        ax.set_xlabel(f"milliseconds per forward pass (median; bar: half the interquartile range; "
                      f"{', '.join(map(str, threads))} thread(s))")
        ax.grid(axis="x", alpha=0.3)
        ax.set_title("measured latency")
    return _svg(fig)


def has_latency(runs: Sequence[RunRecord]) -> bool:
    return any(row.measurement.get("latency_ms") is not None for run in runs for row in run.rows)


def sensitivity_plot(run: RunRecord) -> str:
    """The metric against the pruning ratio, one curve per layer or group."""
    return _svg(sensitivity_figure(run.sensitivity, f"{run.name}: sensitivity (no recovery)", run.sensitivity_metric))


def sensitivity_figure(curves: dict[str, list[list[float]]], title: str, metric: str = "metric") -> Any:
    """A matplotlib figure of `curves` ({label: [[ratio, metric], ...]}), one line per label, `metric` on the y axis."""
    with plt.rc_context(_SVG_STYLE):
        fig, ax = plt.subplots(figsize=(WIDTH, 4.2), layout="constrained")
        for layer, points in curves.items():
            ratios, values = zip(*points)
            ax.plot(ratios, values, marker=".", label=layer)
        ax.set_xlabel("fraction of the group's units removed")
        ax.xaxis.set_major_formatter(PercentFormatter(1.0, decimals=0))
        if "accuracy" in metric:    # a fraction, shown in % as everywhere else
            ax.yaxis.set_major_formatter(PercentFormatter(1.0))
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, ncol=1 + len(curves) // 12, loc="center left", bbox_to_anchor=(1.01, 0.5))
        ax.set_title(title)
    return fig


def save_figure(fig: Any, path: str | Path) -> Path:
    """Write `fig` to `path` (the suffix picks PNG, SVG, PDF...) with fixed ids and no date, and close it."""
    path = Path(path)
    with plt.rc_context(_SVG_STYLE):
        metadata = {"Date": None} if path.suffix.lower() in (".svg", ".pdf") else {}
        fig.savefig(path, bbox_inches="tight", metadata=metadata)
    plt.close(fig)
    return path
