"""build_report(): runs -> report.html (self-contained, inline SVG plots), report.md, report.json.

Both pages are rendered from the jinja2 templates in `templates/` (the HTML one with
autoescaping on, so run and layer names are escaped) from the same tables and figures.
"""
from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jinja2

from ..io import check_output_dir, staged_output
from ..measure import MAX_SECONDS, PRECISION, Timing, budget_text
from . import plots
from .collect import COLUMNS, RunRecord, read_runs


@dataclass
class Table:
    header: list[str]
    rows: list[list[str]]


@dataclass
class Figure:
    stem: str           # the file name in plots/ and the HTML id
    caption: str        # says what to read in the plot; the title inside names it
    svg: str


def percent(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{100 * value:.{digits}f}%"


def _format(key: str, value: Any) -> str:
    if value is None:
        return "-"
    if key == "accuracy":
        return percent(value)
    if isinstance(value, float):
        return f"{value:.4g}"
    return f"{value:,}" if isinstance(value, int) else str(value)


def _kept(value: Any, dense: Any) -> float | None:
    return value / dense if value is not None and dense else None


def stage_table(run: RunRecord) -> Table:
    """Per stage: quality and costs, with MACs and bytes as a % of dense (columns no stage has are left out)."""
    columns = [(k, title) for k, title in COLUMNS if any(r.measurement.get(k) is not None for r in run.rows)]
    rows = []
    for row in run.rows:
        m = row.measurement
        label = row.label + (" (int8)" if row.quantized else "")
        rows.append([label] + [_format(k, m.get(k)) for k, _ in columns]
                    + [percent(_kept(m.get(k), run.dense.get(k)), 1) for k in ("macs", "size_bytes")])
    return Table(["stage"] + [title for _, title in columns] + ["MACs, % of dense", "bytes, % of dense"], rows)


def timing_table(runs: list[RunRecord]) -> Table:
    """Per run and stage: the median, its spread, how it was timed, and the speedup over the run's dense model."""
    rows = []
    for run in runs:
        dense = Timing.of(run.dense)
        for row in run.rows_shown():
            timing = Timing.of(row.measurement)
            if timing is None:
                continue
            rows.append([run.name, row.label, f"{timing.median_ms:.4g}", f"{timing.iqr_ms:.2g}",
                         str(timing.runs or "-"), str(timing.threads),
                         "-" if row.index < 0 or dense is None else timing.speedup(dense)])
    return Table(["run", "stage", "median ms", "IQR ms", "timed blocks", "threads", "speedup"], rows)


def summary_table(runs: list[RunRecord]) -> Table:
    """One row per run: accuracy dense and final, the final costs as a % of dense, the speedup (spreads: latency table)."""
    rows = []
    for run in runs:
        d, f = run.dense, run.final
        accuracy = (f"{percent(d.get('accuracy'))} → {percent(f.get('accuracy'))}"
                    if d.get("accuracy") is not None or f.get("accuracy") is not None else "-")
        dense_t, final_t = Timing.of(d), Timing.of(f)
        rows.append([f"{run.name} · {run.rows[-1].label}", accuracy,
                     percent(_kept(f.get("params"), d.get("params")), 1),
                     percent(_kept(f.get("nonzeros"), d.get("nonzeros")), 1),
                     percent(_kept(f.get("macs"), d.get("macs")), 1),
                     percent(_kept(f.get("size_bytes"), d.get("size_bytes")), 1),
                     final_t.speedup(dense_t) if dense_t and final_t else "-"])
    return Table(["run · final stage", "accuracy (dense → final)", "params", "non-zeros", "MACs", "bytes",
                  "speedup"], rows)


def _figures(runs: list[RunRecord]) -> tuple[list[Figure], dict[int, list[Figure]], list[str]]:
    """The plots across runs, the plots of each run (by index), and notes on plots left out."""
    shared, notes = [], []
    quality = plots.quality_key(runs)
    if quality is not None:
        shared.append(Figure("pareto", f"{quality[1].split(' (')[0].capitalize()} against the cost of every run "
                             "and stage, relative to the run's dense model; up and left is better. Colour: run; "
                             "shape: stage; ringed: on the Pareto front of its panel.", plots.pareto(runs)))
    else:
        notes.append("No run records accuracy or a loss, so there is no accuracy-against-cost plot.")
    if plots.has_latency(runs):
        shared.append(Figure("latency", "Median milliseconds per forward pass; the error bar spans the "
                             "interquartile range of the timed blocks.", plots.latency_plot(runs)))
    per_run: dict[int, list[Figure]] = {}
    for i, run in enumerate(runs):
        figures = per_run.setdefault(i, [])
        if plots.widths_changed(run):
            figures.append(Figure(f"run{i}_widths", "Output channels or features each layer kept (kept/dense).",
                                  plots.layer_widths(run)))
        if plots.sparsity_changed(run):
            figures.append(Figure(f"run{i}_sparsity", "Share of each layer's weights that are zero.",
                                  plots.layer_sparsity(run)))
        if run.sensitivity:
            figures.append(Figure(f"run{i}_sensitivity", f"{run.sensitivity_metric.capitalize()} with one group "
                                  "pruned at a time, the rest of the model dense, before any recovery.",
                                  plots.sensitivity_plot(run)))
    return shared, per_run, notes


_ENVIRONMENT = jinja2.Environment(loader=jinja2.PackageLoader("secateurs.report", "templates"),
                                  autoescape=jinja2.select_autoescape(enabled_extensions=("html",), default=False),
                                  trim_blocks=True, lstrip_blocks=True, undefined=jinja2.StrictUndefined,
                                  keep_trailing_newline=True)
# text in Markdown: no HTML a viewer would render, and no "|" to end a table cell
_ENVIRONMENT.filters["md"] = lambda text: (str(text).replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
                                           .replace("|", "\\|"))


def _context(runs: list[RunRecord], shared: list[Figure], per_run: dict[int, list[Figure]],
             notes: list[str]) -> dict[str, Any]:
    sections = []
    for i, run in enumerate(runs):
        layers_note = None
        if not (plots.widths_changed(run) or plots.sparsity_changed(run)):
            layers_note = ("No per-layer record of this run." if not run.final_layers else
                           "Every layer kept its full width and has no zero weights: nothing to plot per layer.")
        budgets = [f"{row.label}: {budget_text(row.budget, row.measurement, run.dense)}"
                   for row in run.rows if row.budget]
        sections.append({"run": run, "table": stage_table(run), "figures": per_run.get(i, []),
                         "layers_note": layers_note, "budgets": budgets})
    return {"runs": runs, "summary": summary_table(runs), "latency": timing_table(runs), "shared": shared,
            "sections": sections, "notes": notes, "precision": f"{PRECISION:.0%}",
            "max_seconds": f"{MAX_SECONDS:g}"}


def render_html(runs: list[RunRecord], shared: list[Figure], per_run: dict[int, list[Figure]],
                notes: list[str]) -> str:
    """One self-contained HTML page: tables and inline SVG plots, no script, no external resource."""
    return _ENVIRONMENT.get_template("report.html").render(_context(runs, shared, per_run, notes))


def render_markdown(runs: list[RunRecord], shared: list[Figure], per_run: dict[int, list[Figure]],
                    notes: list[str]) -> str:
    """The same report in Markdown; plots are linked from plots/."""
    return _ENVIRONMENT.get_template("report.md").render(_context(runs, shared, per_run, notes))


def build_report(run_dirs: list[str | os.PathLike], out_dir: str | os.PathLike, overwrite: bool = False) -> Path:
    """Write report.html, report.md, report.json and plots/ for the runs in `run_dirs` to `out_dir`.

    A run is any folder with a metrics.json that `secateurs run`, `prune` or `demo` wrote.
    """
    out = check_output_dir(out_dir, list(run_dirs), overwrite=overwrite)
    runs = read_runs(list(run_dirs))
    shared, per_run, notes = _figures(runs)
    figures = shared + [f for i in sorted(per_run) for f in per_run[i]]
    with staged_output(out) as stage:
        (stage / "report.html").write_text(render_html(runs, shared, per_run, notes))
        (stage / "report.md").write_text(render_markdown(runs, shared, per_run, notes))
        (stage / "report.json").write_text(json.dumps({"runs": [r.to_dict() for r in runs],
                                                        "plots": [f.stem for f in figures]}, indent=2))
        (stage / "plots").mkdir()
        for figure in figures:
            (stage / "plots" / f"{figure.stem}.svg").write_text(figure.svg)
        if (out / "plots").is_dir():   # an earlier report's (overwrite): its plots are not this one's
            shutil.rmtree(out / "plots")
    return out / "report.html"
