"""Read run directories (what run_recipe wrote) into plain records for plots and tables."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..errors import FileProblem

# Columns of the per-stage table: (key in a measurement, header).
COLUMNS = (("accuracy", "accuracy"), ("params", "params"), ("nonzeros", "non-zeros"), ("macs", "MACs"),
           ("size_bytes", "bytes"), ("dense_size_bytes", "dense bytes"), ("latency_ms", "latency ms"))


@dataclass
class StageRow:
    """The model's costs after one stage (or the dense model, index -1)."""

    index: int
    stage: str
    quantized: bool
    measurement: dict[str, Any]

    @property
    def label(self) -> str:
        return self.stage if self.index < 0 else f"{self.index}:{self.stage}"


@dataclass
class RunRecord:
    """One run: its identity, a row per stage, its layers before and after, its sensitivity curves."""

    name: str
    path: str
    config_hash: str
    seed: int
    versions: dict[str, str]
    rows: list[StageRow]
    dense_layers: list[dict[str, Any]]
    final_layers: list[dict[str, Any]]
    sensitivity: dict[str, list[list[float]]] = field(default_factory=dict)

    @property
    def dense(self) -> dict[str, Any]:
        return self.rows[0].measurement

    @property
    def final(self) -> dict[str, Any]:
        return self.rows[-1].measurement

    def to_dict(self) -> dict[str, Any]:
        record = asdict(self)
        for row, out in zip(self.rows, record["rows"]):
            out["label"] = row.label
        return record


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise FileProblem(f"cannot read {path}: {exc}") from None


def read_run(path: str | Path, name: str | None = None) -> RunRecord:
    """The run at `path` (a directory run_recipe wrote) as a RunRecord."""
    path = Path(path)
    if not (path / "metrics.json").is_file():
        raise FileProblem(f"{path} is not a run directory: it has no metrics.json (make one with `secateurs run`)")
    metrics = _read_json(path / "metrics.json")
    run = _read_json(path / "run.json") if (path / "run.json").is_file() else {}
    dense = metrics.get("dense") or {}
    if "measurement" not in dense:
        raise FileProblem(f"{path}/metrics.json has no dense measurement; was it written by `secateurs run`?")
    rows = [StageRow(-1, "dense", False, dense["measurement"])]
    rows += [StageRow(s["index"], s["stage"], bool(s.get("quantized")), s["measurement"])
             for s in metrics.get("stages", [])]
    stages = metrics.get("stages") or [dense]
    return RunRecord(
        name=name or path.resolve().name, path=str(path.resolve()), config_hash=metrics.get("config_hash", ""),
        seed=metrics.get("seed", run.get("seed", 0)), versions=run.get("versions", {}), rows=rows,
        dense_layers=dense.get("layers", []), final_layers=stages[-1].get("layers", []),
        sensitivity=metrics.get("sensitivity") or {})


def read_runs(paths: list[str | Path]) -> list[RunRecord]:
    """Every run, named by its folder (with its parent's name too where two folders share a name)."""
    records = [read_run(p) for p in paths]
    names = [r.name for r in records]
    for record in records:
        if names.count(record.name) > 1:
            record.name = f"{Path(record.path).parent.name}/{record.name}"
    return records
