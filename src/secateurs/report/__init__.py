"""Reports over one or more runs: a self-contained HTML page, Markdown and JSON."""
from .collect import RunRecord, read_run, read_runs
from .render import build_report

__all__ = ["RunRecord", "build_report", "read_run", "read_runs"]
