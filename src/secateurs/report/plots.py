"""The report's figures as inline SVG text (matplotlib, no display needed)."""
from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")   # no display: render to files only
import matplotlib.pyplot as plt  # noqa: E402

from .collect import RunRecord  # noqa: E402

# Fixed ids and no date, so the same runs give byte-identical SVG.
_SVG_STYLE = {"svg.hashsalt": "secateurs", "svg.fonttype": "none", "font.size": 9}


def _svg(fig: Any) -> str:
    buffer = io.StringIO()
    with plt.rc_context(_SVG_STYLE):
        fig.savefig(buffer, format="svg", bbox_inches="tight", metadata={"Date": None})
    plt.close(fig)
    text = buffer.getvalue()
    return text[text.index("<svg"):]    # drop the XML prolog and doctype: the SVG goes inline in HTML


def accuracy_vs(runs: list[RunRecord], key: str, label: str) -> str:
    """Accuracy against a cost (`key` of the measurements), one line per run through its stages."""
    with plt.rc_context(_SVG_STYLE):
        fig, ax = plt.subplots(figsize=(6.4, 3.6))
        for run in runs:
            points = [(r.measurement.get(key), r.measurement.get("accuracy"), r.label) for r in run.rows
                      if r.measurement.get(key) is not None and r.measurement.get("accuracy") is not None]
            if not points:
                continue
            xs, ys, labels = zip(*points)
            ax.plot(xs, ys, marker="o", label=run.name)
            ax.annotate(labels[-1], (xs[-1], ys[-1]), textcoords="offset points", xytext=(4, 4), fontsize=7)
            ax.annotate("dense", (xs[0], ys[0]), textcoords="offset points", xytext=(4, -10), fontsize=7)
        ax.set_xlabel(label)
        ax.set_ylabel("accuracy")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        ax.set_title(f"accuracy vs {label}, stage by stage")
    return _svg(fig)


def layer_widths(run: RunRecord) -> str:
    """Output width of every layer, dense next to final."""
    final = {layer["name"]: layer for layer in run.final_layers}
    names = [layer["name"] for layer in run.dense_layers]
    with plt.rc_context(_SVG_STYLE):
        fig, ax = plt.subplots(figsize=(6.4, 0.4 * len(names) + 1.2))
        ys = range(len(names))
        ax.barh([y + 0.2 for y in ys], [layer["width"] for layer in run.dense_layers], height=0.4, label="dense")
        ax.barh([y - 0.2 for y in ys], [final.get(n, {}).get("width", 0) for n in names], height=0.4, label="final")
        ax.set_yticks(list(ys), names)
        ax.invert_yaxis()
        ax.set_xlabel("output channels / features")
        ax.legend(fontsize=7)
        ax.set_title(f"{run.name}: width per layer")
    return _svg(fig)


def layer_sparsity(run: RunRecord) -> str:
    """Fraction of zero weights in every layer of the final model."""
    names = [layer["name"] for layer in run.final_layers]
    with plt.rc_context(_SVG_STYLE):
        fig, ax = plt.subplots(figsize=(6.4, 0.3 * len(names) + 1.2))
        ax.barh(names, [layer["sparsity"] for layer in run.final_layers], color="tab:red")
        ax.invert_yaxis()
        ax.set_xlim(0, 1)
        ax.set_xlabel("fraction of weights that are zero")
        ax.set_title(f"{run.name}: sparsity per layer (final model)")
    return _svg(fig)


def sensitivity_plot(run: RunRecord) -> str:
    """The metric against the pruning ratio, one curve per layer or group."""
    return _svg(sensitivity_figure(run.sensitivity, f"{run.name}: sensitivity (no recovery)"))


def sensitivity_figure(curves: dict[str, list[list[float]]], title: str, metric: str = "metric") -> Any:
    """A matplotlib figure of `curves` ({label: [[ratio, metric], ...]}), one line per label."""
    with plt.rc_context(_SVG_STYLE):
        fig, ax = plt.subplots(figsize=(6.4, 3.6))
        for layer, points in curves.items():
            ratios, values = zip(*points)
            ax.plot(ratios, values, marker=".", label=layer)
        ax.set_xlabel("ratio pruned")
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6, ncol=2)
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
