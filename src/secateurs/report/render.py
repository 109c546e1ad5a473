"""build_report(): runs -> report.html (self-contained, inline SVG plots), report.md, report.json."""
from __future__ import annotations

import html
import json
import os
from pathlib import Path
from typing import Any, Callable

from ..io import check_output_dir, staged_output
from . import plots
from .collect import COLUMNS, RunRecord, read_runs

_CSS = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 60em; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: right; }
th:first-child, td:first-child { text-align: left; }
figure { margin: 1em 0; } figure svg { max-width: 100%; height: auto; }
code { background: #f4f4f4; padding: 0 0.2em; }
"""


def _format(key: str, value: Any) -> str:
    if value is None:
        return "-"
    if key == "accuracy":
        return f"{value:.2%}"
    if isinstance(value, float):
        return f"{value:.3f}"
    return f"{value:,}" if isinstance(value, int) else str(value)


def stage_table(run: RunRecord) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the per-stage cost table, with MACs and bytes relative to dense."""
    header = ["stage"] + [title for _, title in COLUMNS] + ["MACs / dense", "bytes / dense"]
    rows = []
    for row in run.rows:
        m = row.measurement
        relative = [m.get(k) / run.dense[k] if m.get(k) is not None and run.dense.get(k) else None
                    for k in ("macs", "size_bytes")]
        label = row.label + (" (int8)" if row.quantized else "")
        rows.append([label] + [_format(k, m.get(k)) for k, _ in COLUMNS] + [_format("ratio", r) for r in relative])
    return header, rows


def summary_table(runs: list[RunRecord]) -> tuple[list[str], list[list[str]]]:
    """One row per run: dense and final accuracy, and the final costs relative to dense."""
    header = ["run", "seed", "config", "dense accuracy", "final accuracy", "MACs / dense", "bytes / dense",
              "latency ms (dense -> final)"]
    rows = []
    for run in runs:
        d, f = run.dense, run.final
        rows.append([run.name, str(run.seed), run.config_hash[:12], _format("accuracy", d.get("accuracy")),
                     _format("accuracy", f.get("accuracy")), _format("r", f["macs"] / d["macs"] if d.get("macs") else None),
                     _format("r", f["size_bytes"] / d["size_bytes"] if d.get("size_bytes") else None),
                     f"{_format('l', d.get('latency_ms'))} -> {_format('l', f.get('latency_ms'))}"])
    return header, rows


def _figures(runs: list[RunRecord]) -> list[tuple[str, str, str]]:
    """(file stem, caption, svg) of every plot, in report order."""
    figures = [("accuracy_vs_macs", "Accuracy against MACs across runs", plots.accuracy_vs(runs, "macs", "MACs")),
               ("accuracy_vs_bytes", "Accuracy against model bytes across runs",
                plots.accuracy_vs(runs, "size_bytes", "bytes on disk"))]
    for i, run in enumerate(runs):
        if run.dense_layers:
            figures.append((f"run{i}_widths", f"{run.name}: width per layer", plots.layer_widths(run)))
        if run.final_layers:
            figures.append((f"run{i}_sparsity", f"{run.name}: sparsity per layer", plots.layer_sparsity(run)))
        if run.sensitivity:
            figures.append((f"run{i}_sensitivity", f"{run.name}: sensitivity curves", plots.sensitivity_plot(run)))
    return figures


def _html_table(header: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _md_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _sections(runs: list[RunRecord], figures: list[tuple[str, str, str]],
              table: Callable[[list[str], list[list[str]]], str], figure: Callable[[str, str, str], str],
              heading: Callable[[int, str], str]) -> list[str]:
    """The report's parts in order, written with the given table / figure / heading writers."""
    by_stem = {stem: (caption, svg) for stem, caption, svg in figures}
    parts = [heading(1, "secateurs report"), table(*summary_table(runs))]
    for stem in ("accuracy_vs_macs", "accuracy_vs_bytes"):
        parts.append(figure(stem, *by_stem[stem]))
    for i, run in enumerate(runs):
        parts += [heading(2, f"Run {run.name}"), table(*stage_table(run))]
        parts += [figure(stem, *by_stem[stem]) for stem in (f"run{i}_widths", f"run{i}_sparsity", f"run{i}_sensitivity")
                  if stem in by_stem]
    return parts


def render_html(runs: list[RunRecord], figures: list[tuple[str, str, str]]) -> str:
    """One self-contained HTML page: tables and inline SVG plots, no external resource."""
    parts = _sections(
        runs, figures, _html_table,
        lambda stem, caption, svg: f'<figure id="{stem}">{svg}<figcaption>{html.escape(caption)}</figcaption></figure>',
        lambda level, text: f"<h{level}>{html.escape(text)}</h{level}>")
    body = "\n".join(parts)
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>secateurs report</title>'
            f"<style>{_CSS}</style></head>\n<body>\n{body}\n</body></html>\n")


def render_markdown(runs: list[RunRecord], figures: list[tuple[str, str, str]]) -> str:
    """The same report in Markdown; plots are linked from plots/."""
    parts = _sections(runs, figures, _md_table,
                      lambda stem, caption, svg: f"![{caption}](plots/{stem}.svg)",
                      lambda level, text: "#" * level + " " + text)
    return "\n\n".join(parts) + "\n"


def build_report(run_dirs: list[str | os.PathLike], out_dir: str | os.PathLike, overwrite: bool = False) -> Path:
    """Write report.html, report.md, report.json and plots/ for the runs in `run_dirs` to `out_dir`."""
    out = check_output_dir(out_dir, list(run_dirs), overwrite=overwrite)
    runs = read_runs(list(run_dirs))
    figures = _figures(runs)
    with staged_output(out) as stage:
        (stage / "report.html").write_text(render_html(runs, figures))
        (stage / "report.md").write_text(render_markdown(runs, figures))
        (stage / "report.json").write_text(json.dumps({"runs": [r.to_dict() for r in runs],
                                                        "plots": [stem for stem, _, _ in figures]}, indent=2))
        (stage / "plots").mkdir()
        for stem, _, svg in figures:
            (stage / "plots" / f"{stem}.svg").write_text(svg)
    return out / "report.html"
