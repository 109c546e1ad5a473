"""The structured plan: what a cut removed, how it is recorded on the model, and its replay.

A plan records, per (parameter, dim), the kept positions; `replay` cuts a fresh model
exactly so, which is how saved weights load into the architecture they were cut from.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from .. import compensate as bias_compensation
from ..errors import WeightsMismatch
from ..hf_config import is_hf_model, update_config
from ..measure import total_parameters
from ..plans import PlanRecord, fraction
from .cut import apply_keeps


@dataclass
class GroupPlan:
    index: int
    kind: str
    members: list[str]
    units: int
    removed: list[int]          # positions (in group unit order) that were cut


@dataclass
class StructuredPlan(PlanRecord):
    """What was removed: per group, which units; with costs before and after."""

    method: str
    ratio: float | dict[str, float]         # a dict: glob on member names -> fraction (scope "local")
    groups: list[GroupPlan] = field(default_factory=list)
    params_before: int = 0
    params_after: int = 0
    macs_before: int = 0
    macs_after: int = 0
    keeps: dict[str, list[int]] = field(default_factory=dict)            # "param:dim" -> kept positions
    attributes: dict[str, dict[str, int]] = field(default_factory=dict)  # module -> changed int attributes
    compensated: list[str] = field(default_factory=list)   # linear layers whose bias absorbed removed inputs
    added_biases: list[str] = field(default_factory=list)  # of those, the ones that had no bias before
    budget: dict[str, Any] = field(default_factory=dict)   # a target search: the target, predicted and measured cost
    frozen: list[dict[str, Any]] = field(default_factory=list)  # groups kept whole: the cut would break the model

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> dict[str, str]:
        cut = [g for g in self.groups if g.removed]
        rows = {"method": self.method, "ratio": f"{self.ratio:.4g}" if isinstance(self.ratio, float) else str(self.ratio),
                "groups cut": f"{len(cut)} of {len(self.groups)}",
                "units removed": f"{sum(len(g.removed) for g in cut):,} of {sum(g.units for g in self.groups):,}",
                "params": fraction(self.params_after, self.params_before),
                "MACs": fraction(self.macs_after, self.macs_before)}
        if self.budget:
            rows["budget"] = f"{self.budget.get('target')}: measured {self.budget.get('measured'):.4g}"
        return rows


# A model's own record of the structured plans cut into it, in order (a plain attribute, so
# copies carry it): `io.save` given only the last plan still writes every one.
PLANS_ATTRIBUTE = "_secateurs_structured_plans"


def applied_plans(model: nn.Module) -> list[StructuredPlan | dict[str, Any]]:
    """The structured plans pruned or replayed into `model`, oldest first."""
    return list(model.__dict__.get(PLANS_ATTRIBUTE, []))


def remember(model: nn.Module, plan: StructuredPlan | dict[str, Any]) -> None:
    model.__dict__.setdefault(PLANS_ATTRIBUTE, []).append(plan)


def replay(model: nn.Module, plan: StructuredPlan | dict[str, Any]) -> nn.Module:
    """Cut a fresh `model` exactly as `plan` records, so saved weights load into it.

    A plan.json of several cuts ("steps", as `io.save` writes a list) is replayed in order.
    Raises WeightsMismatch when the plan was made on a model of another size (one of
    several cuts saved alone), InvalidArgument when the plan is malformed or does not fit
    this model (checked before anything is cut, see `plan_schema`).
    """
    from ..plan_schema import check_attributes, check_keeps, check_modules, parse_plan

    record = plan.to_dict() if isinstance(plan, StructuredPlan) else plan
    parse_plan(record)
    if "steps" in record:
        for step in record["steps"]:
            if step.get("keeps"):
                replay(model, step)
        return model
    before, params = record.get("params_before"), total_parameters(model)
    if before and record.get("keeps") and before != params:
        raise WeightsMismatch(f"the plan cuts a model of {before:,} parameters but this one has {params:,}: was it "
                              "pruned more than once? save every plan, in order: save(model, dir, [first, second])")
    check_keeps(model, record.get("keeps", {}))
    check_attributes(model, record.get("attributes", {}))
    check_modules(model, record.get("added_biases", []), "added_biases")
    keeps = {}
    for key, kept in record.get("keeps", {}).items():
        name, _, dim = key.rpartition(":")
        keeps[(name, int(dim))] = torch.as_tensor(kept, dtype=torch.long)
    apply_keeps(model, keeps)
    for module_name, changes in record.get("attributes", {}).items():
        owner = model.get_submodule(module_name) if module_name else model
        for attribute, value in changes.items():
            setattr(owner, attribute, value)
    for name in record.get("added_biases", []):
        # compensation created these biases: zeros here, their values come with the weights
        module = model.get_submodule(name)
        bias_compensation.add_bias(module, torch.zeros(bias_compensation.out_in(module).shape[0]))
    if is_hf_model(model):
        update_config(model)
    remember(model, record)
    return model


__all__ = ["PLANS_ATTRIBUTE", "GroupPlan", "StructuredPlan", "applied_plans", "remember", "replay"]
