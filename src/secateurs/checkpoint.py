"""A pruned model on disk: weights (dense and sparse safetensors) plus plan.json, and loading it back.

`save` writes what `load` needs to rebuild the model from its original factory: every
structured or block plan cut into it, in order (replayed first, so the weights fit), and
the names of the masked parameters (masked again from their zeros). Nothing is unpickled.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from torch import nn

from .blocks import replay_blocks
from .errors import FileProblem
from .io import (
    PLAN_FILE,
    SPARSE_WEIGHTS_FILE,
    WEIGHTS_FILE,
    check_output_dir,
    load_into,
    load_state,
    save_weights,
    staged_output,
)
from .sparsity import masked_params, set_mask
from .structured.plan import applied_plans, replay


def _plan_record(plan: Any | None) -> dict[str, Any]:
    """plan.json's content; a sequence of plans (blocks, then channels, say) becomes "steps", in order."""
    if isinstance(plan, (list, tuple)):
        return {"steps": [_plan_record(step) for step in plan]}
    return plan.to_dict() if hasattr(plan, "to_dict") else dict(plan or {})


def _replay_blocks(model: nn.Module, record: dict[str, Any]) -> None:
    replay_blocks(model, record["blocks"])


def _replay_keeps(model: nn.Module, record: dict[str, Any]) -> None:
    from .structured import replay

    replay(model, record)


# What load replays from each step of a plan (a BlockPlan records "blocks", a StructuredPlan "keeps").
_REPLAYS = {"blocks": _replay_blocks, "keeps": replay}


def _with_earlier_plans(model: nn.Module, plan: Any | None) -> Any | None:
    """Every structured plan cut into `model` when `plan` is the last of several: saved alone,
    the first cuts' keeps would be lost and the weights would not fit a fresh model."""
    history = applied_plans(model)
    if isinstance(plan, (list, tuple)) or len(history) < 2 or history[-1] is not plan:
        return plan
    return history


def save(model: nn.Module, out_dir: str | os.PathLike, plan: Any | None = None, overwrite: bool = False) -> Path:
    """Write the pruned model to `out_dir`: dense and sparse safetensors plus plan.json.

    `plan` is a StructuredPlan, a BlockPlan, or a list of them in the order they were
    applied (load replays them in that order, so the names each one recorded fit).
    A folder that already holds files is refused unless `overwrite` (as `prune` does);
    the files are written beside it and moved in only once all are complete.
    """
    out = check_output_dir(out_dir, [], overwrite=overwrite)
    plan = _with_earlier_plans(model, plan)
    record = _plan_record(plan)
    record = {**record, "masked": [mp.name for mp in masked_params(model)]}
    with staged_output(out) as stage:
        save_weights(model, stage / WEIGHTS_FILE)
        save_weights(model, stage / SPARSE_WEIGHTS_FILE, sparse=True)
        (stage / PLAN_FILE).write_text(json.dumps(record, indent=2))
    return Path(out_dir)


def load(model: nn.Module, in_dir: str | os.PathLike, keep_masks: bool = True) -> nn.Module:
    """Load what `save` wrote into a fresh `model` built by the original factory.

    Structured plans are replayed first (the same blocks removed, the same channels and
    heads cut, in the order they were applied), so the weights fit. With `keep_masks`, the layers that were masked get masks again from
    their zeros, so fine-tuning the loaded model keeps them pruned.
    """
    from .plan_schema import read_plan   # pydantic loads on first use, not with the package

    src = Path(in_dir)
    record = read_plan(src / PLAN_FILE)
    weights = src / WEIGHTS_FILE
    if not weights.is_file():
        weights = src / SPARSE_WEIGHTS_FILE
    state = load_state(weights)   # read before anything is cut: a bad file leaves the model as it was
    for name in record.get("masked", []) if keep_masks else []:
        if name not in state:
            raise FileProblem(f"{src / PLAN_FILE}: masked names {name!r}, which {weights.name} does not hold")
    for step in record.get("steps", [record]):
        for kind, replay_step in _REPLAYS.items():
            if step.get(kind):
                replay_step(model, step)
    load_into(model, state, source=str(weights))
    if keep_masks:
        for name in record.get("masked", []):
            module_name, _, param_name = name.rpartition(".")
            module = model.get_submodule(module_name)
            set_mask(module, param_name, getattr(module, param_name) != 0)
    return model


__all__ = ["load", "save"]
