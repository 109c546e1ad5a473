"""Optional experiment logging of recipe runs: TensorBoard event files and MLflow runs.

A recipe's `logging: {tensorboard: DIR, mlflow: URI}` sends the dense model's costs
(step 0), every stage's costs and numeric results (step = stage index + 1), and the
per-epoch series of finetune / distill (`loss`, `kd`; step = epoch) to each logger
named. Both libraries are optional: `pip install 'secateurs[logging]'`.
"""
from __future__ import annotations

import importlib
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from .errors import SecateursError

EXTRA = "pip install 'secateurs[logging]'"


def _require(module: str, logger: str) -> Any:
    """Import `module`, or raise one line naming the extra that brings it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise SecateursError(f"logging: {logger} needs the {module.split('.')[0]} package: {EXTRA}") from None


def scalars(record: Any, prefix: str = "") -> Iterator[tuple[str, float]]:
    """(tag, value) for every finite number in a nested record, tags joined with '/'; lists are left out."""
    if isinstance(record, dict):
        for key, value in record.items():
            yield from scalars(value, f"{prefix}/{key}" if prefix else str(key))
    elif isinstance(record, (int, float)) and not isinstance(record, bool) and math.isfinite(record):
        yield prefix, float(record)


def series(record: dict[str, Any]) -> Iterator[tuple[str, list[float]]]:
    """(tag, values) for every top-level list of numbers (a per-epoch loss)."""
    for key, value in record.items():
        if isinstance(value, list) and value and all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                                     for v in value):
            yield key, [float(v) for v in value]


class TensorBoardLog:
    """Scalars written as TensorBoard event files under `folder`."""

    module = "torch.utils.tensorboard"

    def __init__(self, folder: str, out_dir: Path, run_name: str, config: dict[str, Any]):
        tensorboard = _require("torch.utils.tensorboard", "tensorboard")
        self.folder = out_dir / os.path.expanduser(folder)   # relative: inside the run directory
        self.writer = tensorboard.SummaryWriter(log_dir=str(self.folder))
        self.writer.add_text("config", "\n".join(f"    {line}" for line in _lines(config)))

    def log(self, tag: str, value: float, step: int) -> None:
        self.writer.add_scalar(tag, value, step)

    def close(self) -> None:
        self.writer.close()


class MlflowLog:
    """One MLflow run in experiment "secateurs" at tracking URI `uri`, the recipe's settings as its params."""

    module = "mlflow"

    def __init__(self, uri: str, out_dir: Path, run_name: str, config: dict[str, Any]):
        mlflow = _require("mlflow", "mlflow")
        if "://" not in uri and not uri.startswith(("databricks", "file:")):   # a plain folder: a file store
            uri = (out_dir / os.path.expanduser(uri)).resolve().as_uri()
        try:
            self.client = mlflow.MlflowClient(tracking_uri=uri)
            experiment = self.client.get_experiment_by_name("secateurs")
            experiment_id = experiment.experiment_id if experiment else self.client.create_experiment("secateurs")
            self.run_id = self.client.create_run(experiment_id, run_name=run_name).info.run_id
        except mlflow.exceptions.MlflowException as exc:
            # MLflow 3 refuses a plain-folder store unless MLFLOW_ALLOW_FILE_STORE=true: say so in one line
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise SecateursError(f"logging: mlflow cannot use {uri}: {first[:300]}") from None
        for key, value in _flat(config):
            self.client.log_param(self.run_id, key[:250], str(value)[:6000])

    def log(self, tag: str, value: float, step: int) -> None:
        self.client.log_metric(self.run_id, tag, value, step=step)

    def close(self) -> None:
        self.client.set_terminated(self.run_id)


# recipe `logging` key -> the logger it opens: (target, run directory, run name, resolved config)
LOGGERS: dict[str, type] = {
    "tensorboard": TensorBoardLog, "mlflow": MlflowLog,
}


def _flat(config: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    if isinstance(config, dict):
        for key, value in config.items():
            yield from _flat(value, f"{prefix}.{key}" if prefix else str(key))
    elif isinstance(config, list):
        for i, value in enumerate(config):
            yield from _flat(value, f"{prefix}.{i}")
    else:
        yield prefix, config


def _lines(config: dict[str, Any]) -> list[str]:
    return [f"{key}: {value}" for key, value in _flat(config)]


@dataclass
class RunLog:
    """The loggers a recipe asks for: each stage's record goes to every one of them."""

    loggers: list[Any] = field(default_factory=list)

    def dense(self, record: dict[str, Any]) -> None:
        """The dense model's costs, at step 0."""
        self._costs(record, 0)

    def stage(self, index: int, name: str, record: dict[str, Any]) -> None:
        """A finished stage: its costs at step index + 1, its numeric results, its per-epoch series."""
        self._costs(record, index + 1)
        result = record.get("result", {})
        for tag, value in scalars(result, f"{index:02d}-{name}"):
            self._log(tag, value, index + 1)
        for key, values in series(result):
            for epoch, value in enumerate(values):
                self._log(f"{index:02d}-{name}/{key}", value, epoch)

    def close(self) -> None:
        for logger in self.loggers:
            logger.close()

    def _costs(self, record: dict[str, Any], step: int) -> None:
        for tag, value in scalars(record.get("measurement", {}), "model"):
            self._log(tag, value, step)

    def _log(self, tag: str, value: float, step: int) -> None:
        for logger in self.loggers:
            logger.log(tag, value, step)


def require_loggers(spec: dict[str, str] | None) -> None:
    """Import the library of every logger `spec` names now, before a run writes anything."""
    for key in spec or {}:
        _require(LOGGERS[key].module, key)


def open_run_log(spec: dict[str, str] | None, out_dir: Path, run_name: str, config: dict[str, Any]) -> RunLog:
    """A RunLog with one logger per key of the recipe's `logging` mapping (none: logs nothing)."""
    log = RunLog()
    try:
        for key, target in (spec or {}).items():
            log.loggers.append(LOGGERS[key](target, Path(out_dir), run_name, config))
    except BaseException:
        log.close()
        raise
    return log


__all__ = ["EXTRA", "LOGGERS", "MlflowLog", "RunLog", "TensorBoardLog", "open_run_log", "require_loggers",
           "scalars", "series"]
