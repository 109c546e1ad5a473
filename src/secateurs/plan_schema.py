"""plan.json read as a schema before any of it touches a model.

A plan file is data a user may have edited or been sent, and replaying it cuts and sets
attributes on a live model. So every field is checked first: keeps are sorted, unique,
in-range integers that agree wherever two of them cut the same layer; attributes may only
lower public integer (or integer-list) width fields a module already has (head counts,
`hidden_dim`, split sizes: what the cut or its rehearsal changed), never `forward`,
`training`, a submodule or anything not an integer. Anything else is one line naming the field.
"""
from __future__ import annotations

import json
from itertools import pairwise
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StrictInt, StrictStr, ValidationError
from torch import nn

from .errors import FileProblem, InvalidArgument
from .structured.cut import _owner, _role


def _sorted_unique(kept: list[int]) -> list[int]:
    if not kept:
        raise ValueError("keeps no position (a cut keeps at least one)")
    if kept[0] < 0:
        raise ValueError(f"position {kept[0]} is negative")
    if any(b <= a for a, b in pairwise(kept)):
        raise ValueError("positions must be sorted and unique")
    return kept


def _keep_key(key: str) -> str:
    name, sep, dim = key.rpartition(":")
    if not sep or not name or not dim.isdigit():
        raise ValueError(f"keep key {key!r} must look like 'module.parameter:dim'")
    return key


def _known_attribute(name: str) -> str:
    if not name.isidentifier() or name.startswith("_") or hasattr(nn.Module, name) or name == "training":
        raise ValueError(f"attribute {name!r} is not a width field a cut sets (a public integer attribute "
                         "of the module, not one of nn.Module's own)")
    return name


Name = Annotated[StrictStr, Field(min_length=1)]   # a module or parameter name: never empty
Keep = Annotated[list[Annotated[StrictInt, Field(ge=0)]], AfterValidator(_sorted_unique)]
KeepKey = Annotated[StrictStr, AfterValidator(_keep_key)]
Attribute = Annotated[StrictStr, AfterValidator(_known_attribute)]
Width = Annotated[StrictInt, Field(ge=1)]


class _Record(BaseModel):
    # plan.json carries more (scores, costs, groups) for people to read: only what replay uses is checked
    model_config = ConfigDict(extra="allow", strict=True)


def _unique(names: list[str]) -> list[str]:
    if len(set(names)) < len(names):
        raise ValueError("names must be unique")
    return names


class BlocksRecord(_Record):
    removed: Annotated[list[Name], AfterValidator(_unique)] = []
    how: dict[Name, Literal["delete", "identity"]] = {}
    returns: dict[Name, Annotated[StrictInt, Field(ge=0)] | None] = {}


class Step(_Record):
    keeps: dict[KeepKey, Keep] = {}
    # "" is the model itself (an attention module at the root), so module names here may be empty
    attributes: dict[StrictStr, dict[Attribute, Width | list[Width]]] = {}
    added_biases: list[Name] = []
    params_before: Annotated[StrictInt, Field(ge=0)] = 0
    blocks: BlocksRecord | None = None


class PlanDocument(Step):
    steps: list[Step] = []
    masked: list[Name] = []


def _where(error: dict[str, Any]) -> str:
    return ".".join(str(part) for part in error["loc"]) or "plan"


def parse_plan(record: Any, model_cls: type[BaseModel] = PlanDocument) -> BaseModel:
    """`record` (plan.json's content) checked against the schema; InvalidArgument names the first bad field."""
    if not isinstance(record, dict):
        raise InvalidArgument(f"a plan is a JSON object, got {type(record).__name__}")
    try:
        return model_cls.model_validate(record)
    except ValidationError as exc:
        first = exc.errors()[0]
        raise InvalidArgument(f"plan field {_where(first)}: {first['msg']}") from None


def read_plan(path: Path) -> dict[str, Any]:
    """plan.json's content, checked against the schema ({} when there is none); FileProblem otherwise."""
    if not path.is_file():
        return {}
    try:
        record = json.loads(path.read_text())
        parse_plan(record)
    except (OSError, UnicodeDecodeError, ValueError) as exc:   # InvalidArgument and JSONDecodeError included
        raise FileProblem(f"{path}: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None
    return record


def _parameter(model: nn.Module, name: str) -> Any:
    found = dict(model.named_parameters(remove_duplicate=False)) | dict(model.named_buffers(remove_duplicate=False))
    if name not in found:
        raise InvalidArgument(f"the plan keeps positions of {name!r}, which this model does not have")
    return found[name]


def check_keeps(model: nn.Module, keeps: dict[str, list[int]]) -> None:
    """Every keep names a tensor of `model`, stays inside its size, and agrees with any other keep
    that cuts the same layer on the same side (the cut would silently use only one)."""
    sides: dict[tuple[int, str], tuple[str, list[int]]] = {}
    for key, kept in keeps.items():
        name, _, dim_text = key.rpartition(":")
        tensor, dim = _parameter(model, name), int(dim_text)
        if dim >= tensor.dim():
            raise InvalidArgument(f"plan keep {key!r}: {name} has {tensor.dim()} dimensions")
        if kept[-1] >= tensor.shape[dim]:
            raise InvalidArgument(f"plan keep {key!r}: position {kept[-1]} is outside size {tensor.shape[dim]}")
        module, local, _ = _owner(model, name)
        role = _role(module, local, dim)
        if role is None:
            continue
        other = sides.setdefault((id(module), role), (key, kept))
        if other[1] != kept:
            raise InvalidArgument(f"plan keeps {other[0]!r} and {key!r} cut the same layer differently")


def check_attributes(model: nn.Module, attributes: dict[str, dict[str, int]]) -> None:
    """Each attribute exists on its module as an integer and the plan only lowers it."""
    for module_name, changes in attributes.items():
        try:
            owner = model.get_submodule(module_name) if module_name else model
        except AttributeError:
            raise InvalidArgument(f"plan attributes name module {module_name!r}, which this model does not have") from None
        for attribute, value in changes.items():
            where = f"plan attribute {module_name or '<model>'}.{attribute}"
            current = getattr(owner, attribute, None)
            ints = [current] if isinstance(value, int) else list(current) if isinstance(current, (list, tuple)) else []
            values = [value] if isinstance(value, int) else list(value)
            if not ints or len(ints) != len(values) or any(not isinstance(c, int) or isinstance(c, bool) for c in ints):
                raise InvalidArgument(f"{where}: the module has no integer attribute of that name and shape")
            if any(v > c for v, c in zip(values, ints)):
                raise InvalidArgument(f"{where}: {value} is more than the model's {current} (a cut only lowers widths)")


def check_modules(model: nn.Module, names: list[str], what: str) -> None:
    for name in names:
        try:
            model.get_submodule(name)
        except AttributeError:
            raise InvalidArgument(f"plan {what} names module {name!r}, which this model does not have") from None


__all__ = ["BlocksRecord", "PlanDocument", "Step", "check_attributes", "check_keeps", "check_modules", "parse_plan",
           "read_plan"]
