"""The records of a `prune --hf` run: metrics.json and its short human version, report.md."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from rich.table import Table
from torch import nn

METRICS_FILE = "metrics.json"
REPORT_FILE = "report.md"
_CONFIG_KEYS = ("num_hidden_layers", "hidden_size", "num_attention_heads", "num_key_value_heads",
                "intermediate_size", "head_dim")


def config_summary_of(config: Any) -> dict[str, Any]:
    """The model's sizes (layers, widths, heads) as a config states them."""
    return {k: getattr(config, k) for k in _CONFIG_KEYS if isinstance(getattr(config, k, None), int)}


def config_summary(model: nn.Module) -> dict[str, Any]:
    """The model's sizes as a config states them (the fitted config after a uniform structured cut)."""
    from ..hf import fit_config

    fitted = fit_config(model) if hasattr(model, "save_pretrained") else None
    return config_summary_of(fitted if fitted is not None else model.config)


def write_records(stage: Path, metrics: dict[str, Any]) -> None:
    """Write metrics.json and report.md into `stage`."""
    (stage / METRICS_FILE).write_text(json.dumps(metrics, indent=2) + "\n")
    (stage / REPORT_FILE).write_text(report_markdown(metrics))


def _what(metrics: dict[str, Any]) -> str:
    """One line: what was done."""
    config = metrics["config"]
    if metrics["mode"] == "structured":
        parts = []
        if config["drop_layers"]:
            parts.append(f"{config['drop_layers']} layer(s) dropped by block influence")
        if config["ratio"] is not None or config["target"] is not None:
            how = f"ratio {config['ratio']}" if config["ratio"] is not None else f"target {config['target']}"
            parts.append(f"{' and '.join(config['units'])} units removed ({how}, scored by {config['method']}"
                         f"{', bias compensation' if config['compensate'] else ''})")
        return "; ".join(parts)
    amount = f"{config['pattern']} pattern" if config["pattern"] else f"{config['sparsity']:.0%} unstructured"
    owl = f", OWL lambda {config['owl']}" if config["owl"] is not None else ""
    where = f", blocks pruned on {config['device']}" if config["device"] else ""
    sequential = ", true-sequential" if config["true_sequential"] else ""
    return (f"{config['method']}, {amount}{owl}{sequential}{where}"
            f"{', streamed from the shards' if metrics['mode'] == 'stream' else ''}")


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    return f"{value:,}" if isinstance(value, int) else f"{value:.4g}"


def report_markdown(metrics: dict[str, Any]) -> str:
    """A short Markdown report of one run, from its metrics."""
    model = metrics["model"]
    rows = [("parameters", metrics["params"]["before"], metrics["params"]["after"]),
            ("non-zero parameters", metrics["nonzeros"]["before"], metrics["nonzeros"]["after"])]
    macs = metrics["pruning"].get("macs")
    if macs:
        rows.append(("MACs of one calibration window", macs["before"], macs["after"]))
    quality = metrics["eval"]
    if quality:
        name = "perplexity" if quality["metric"] == "perplexity" else "embedding cosine to the dense model"
        rows.append((f"{name} on {Path(quality['file']).name}", quality["before"], quality["after"]))
    lines = [f"# Pruned {model['architecture']}", "",
             f"- source: `{model['path']}`", f"- pruning: {_what(metrics)}",
             _calibration_line(metrics),
             f"- saved for: {_loader(metrics)}", "",
             "| | before | after |", "|---|---:|---:|"]
    lines += [f"| {label} | {_fmt(b)} | {_fmt(a)} |" for label, b, a in rows]
    lines.append("")
    if metrics["mode"] != "structured":
        lines.append(f"Sparsity of the pruned linears: {metrics['sparsity']['pruned_layers']:.2%}; "
                     f"of all parameters: {metrics['sparsity']['model']:.2%}.")
    dropped = metrics["pruning"].get("dropped_layers")
    if dropped:
        lines.append(f"Layers dropped: {', '.join(dropped['removed'])}.")
    if metrics["model_config_after"]:
        sizes = ", ".join(f"{k} {v}" for k, v in metrics["model_config_after"].items())
        lines.append(f"Sizes after: {sizes}.")
    seconds = metrics["seconds"]
    lines += ["", "Time: " + ", ".join(f"{k} {v:.1f} s" for k, v in seconds.items()) + ".",
              "Versions: " + ", ".join(f"{k} {v}" for k, v in metrics["versions"].items()) + ".", ""]
    return "\n".join(lines)


def _calibration_line(metrics: dict[str, Any]) -> str:
    config = metrics["config"]
    if not metrics["calibrated"]:
        return "- calibration: none (magnitude needs none; no forward pass was run)"
    return (f"- calibration: {config['calib_windows']} windows of {config['seqlen']} tokens from "
            f"`{Path(config['calib']).name}` (seed {config['seed']})")


def _loader(metrics: dict[str, Any]) -> str:
    if metrics["saved_as"] == "secateurs":
        return "secateurs (layers of different widths): `secateurs.hf.load_pretrained(out)`"
    return "plain transformers: `AutoModel...from_pretrained(out)`"


def metrics_table(metrics: dict[str, Any]) -> Table:
    """Before / after of a `prune --hf` run: parameters, non-zeros, MACs and quality where measured."""
    rows = {"params": metrics["params"], "nonzeros": metrics["nonzeros"], **(
        {"macs": metrics["pruning"]["macs"]} if "macs" in metrics["pruning"] else {})}
    if metrics["eval"]:
        rows[metrics["eval"]["metric"]] = metrics["eval"]
    table = Table(title=f"{metrics['model']['architecture']}: {metrics['mode']}, {metrics['config']['method']}")
    for column in ("", "before", "after"):
        table.add_column(column, justify="right" if column else "left")
    for key, row in rows.items():
        table.add_row(key, *(("-" if v is None else f"{v:,}" if isinstance(v, int) else f"{v:.4f}")
                             for v in (row["before"], row["after"])))
    table.add_row("seconds", "", f"{metrics['seconds']['total']:.1f}")
    return table


__all__ = ["metrics_table", "METRICS_FILE", "REPORT_FILE", "config_summary", "config_summary_of", "report_markdown",
           "write_records"]
