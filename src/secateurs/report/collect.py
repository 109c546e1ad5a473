"""Read output folders into plain records for plots and tables.

Any folder with a metrics.json that secateurs wrote is a run:

- `secateurs run`: the dense model, then one row per stage (`dense`, `stages`);
- `secateurs prune`: the model before and after (`before`, `after`);
- `secateurs prune --hf`: parameters, non-zeros, MACs and the held-out quality before and
  after (`params`, `nonzeros`, `eval`, ... each with `before` / `after`);
- `secateurs demo`: the dense model and, per variant (structured, unstructured, 2:4),
  the model right after the cut and after recovery (`variants`), each read as a run of
  its own named `folder/variant`.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..errors import FileProblem

# Columns of the per-stage table: (key in a measurement, header).
COLUMNS = (("accuracy", "accuracy"), ("loss", "loss"), ("perplexity", "perplexity"),
           ("embedding_cosine", "embedding cosine"), ("params", "params"), ("nonzeros", "non-zeros"),
           ("macs", "MACs"), ("size_bytes", "bytes"), ("dense_size_bytes", "dense bytes"))


@dataclass
class StageRow:
    """The model's costs after one stage (or the dense model, index -1)."""

    index: int
    stage: str
    quantized: bool
    measurement: dict[str, Any]
    budget: dict[str, Any] | None = None     # the structured budget this stage's cut was searched for

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
    sensitivity_metric: str = "metric"
    kind: str = "run"                  # what wrote it: "run", "prune" or "demo"
    dense_shared: bool = False         # its dense row is an earlier record's (a demo's variants share one)

    def rows_shown(self) -> list[StageRow]:
        """The rows to plot and list across runs: a dense row shared with an earlier record is left out."""
        return self.rows[1:] if self.dense_shared else self.rows

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


def _sensitivity_metric(path: Path, metrics: dict[str, Any]) -> str:
    """What the run's sensitivity curves measure: as recorded, else the recipe's loss on the calibration batches."""
    if metrics.get("sensitivity_metric"):
        return str(metrics["sensitivity_metric"])
    try:
        loss = (yaml.safe_load((path / "config.yaml").read_text()) or {}).get("data", {}).get("loss")
    except (OSError, yaml.YAMLError, AttributeError):
        loss = None
    return f"mean {loss or 'cross_entropy'} loss on the calibration batches"


def _recipe_run(path: Path, name: str, metrics: dict[str, Any]) -> RunRecord:
    """A folder `secateurs run` wrote."""
    run = _read_json(path / "run.json") if (path / "run.json").is_file() else {}
    dense = metrics["dense"]
    if "measurement" not in dense:
        raise FileProblem(f"{path}/metrics.json has no dense measurement; was it written by `secateurs run`?")
    rows = [StageRow(-1, "dense", False, dense["measurement"])]
    rows += [StageRow(s["index"], s["stage"], bool(s.get("quantized")), s["measurement"],
                      (s.get("result") or {}).get("budget")) for s in metrics.get("stages", [])]
    stages = metrics.get("stages") or [dense]
    return RunRecord(
        name=name, path=str(path.resolve()), config_hash=metrics.get("config_hash", ""),
        seed=metrics.get("seed", run.get("seed", 0)), versions=run.get("versions", {}), rows=rows,
        dense_layers=dense.get("layers", []), final_layers=stages[-1].get("layers", []),
        sensitivity=metrics.get("sensitivity") or {}, sensitivity_metric=_sensitivity_metric(path, metrics))


def _before_after(path: Path, name: str, metrics: dict[str, Any]) -> list[RunRecord]:
    """A folder `secateurs prune` or `secateurs demo` wrote: one record, or one per demo variant."""
    layers = metrics.get("layers") or {}
    dense_row = StageRow(-1, "dense", False, metrics["before"])
    common = {"path": str(path.resolve()), "config_hash": "", "seed": int(metrics.get("seed", 0)), "versions": {},
              "dense_layers": layers.get("before", [])}
    variants = metrics.get("variants")
    budget = (metrics.get("plan") or {}).get("budget")
    if not variants:
        rows = [dense_row, StageRow(0, metrics.get("stage", "prune"), False, metrics["after"], budget)]
        return [RunRecord(name=name, rows=rows, final_layers=layers.get("after", []), kind="prune", **common)]
    records = []
    for variant in variants:
        rows = [dense_row] + [StageRow(i, s["stage"], False, s["measurement"], variant.get("budget"))
                              for i, s in enumerate(variant["stages"])]
        records.append(RunRecord(name=f"{name}/{variant['name']}", rows=rows, final_layers=variant.get("layers", []),
                                 kind="demo", dense_shared=bool(records), **common))
    return records


def _hf_prune(path: Path, name: str, metrics: dict[str, Any]) -> list[RunRecord]:
    """A folder `secateurs prune --hf` wrote: the checkpoint before and after, per-layer sparsity."""
    def side(which: str) -> dict[str, Any]:
        measurement = {key: (metrics.get(key) or {}).get(which) for key in ("params", "nonzeros")}
        macs = (metrics.get("pruning") or {}).get("macs")
        if isinstance(macs, dict):
            measurement["macs"] = macs.get(which)
        if metrics.get("eval"):
            measurement[metrics["eval"]["metric"]] = metrics["eval"].get(which)
        return measurement

    layers = [{"name": layer, "sparsity": value}
              for layer, value in ((metrics.get("sparsity") or {}).get("layers") or {}).items()]
    rows = [StageRow(-1, "dense", False, side("before")), StageRow(0, str(metrics.get("mode", "prune")), False,
                                                                   side("after"))]
    return [RunRecord(name=name, path=str(path.resolve()), config_hash="",
                      seed=int((metrics.get("config") or {}).get("seed") or 0), versions=metrics.get("versions", {}),
                      rows=rows, dense_layers=[], final_layers=layers, kind="prune --hf")]


def read_folder(path: str | Path, name: str | None = None) -> list[RunRecord]:
    """The runs in the output folder at `path`: one, or one per variant of a demo folder."""
    path = Path(path)
    if not (path / "metrics.json").is_file():
        raise FileProblem(f"{path} is not a run directory: it has no metrics.json (make one with `secateurs run`, "
                          "`secateurs prune` or `secateurs demo`)")
    metrics = _read_json(path / "metrics.json")
    name = name or path.resolve().name
    if isinstance(metrics, dict) and isinstance(metrics.get("dense"), dict):
        return [_recipe_run(path, name, metrics)]
    if isinstance(metrics, dict) and isinstance(metrics.get("before"), dict) and isinstance(metrics.get("after"), dict):
        return _before_after(path, name, metrics)
    if isinstance(metrics, dict) and "saved_as" in metrics and isinstance(metrics.get("params"), dict):
        return _hf_prune(path, name, metrics)
    raise FileProblem(f"{path}/metrics.json has neither a dense measurement (`secateurs run`) nor before/after "
                      "(`secateurs prune`, `secateurs demo`)")


def read_run(path: str | Path, name: str | None = None) -> RunRecord:
    """The run at `path` as a RunRecord (the first variant of a demo folder)."""
    return read_folder(path, name)[0]


def read_runs(paths: list[str | Path]) -> list[RunRecord]:
    """Every run, named by its folder (with its parent's name too where two folders share a name)."""
    records = [record for p in paths for record in read_folder(p)]
    names = [r.name for r in records]
    for record in records:
        if names.count(record.name) > 1:
            record.name = f"{Path(record.path).parent.name}/{record.name}"
    return records
