"""A pipeline in one YAML file: the schema, and a loader whose errors name the place in the file.

    model: {demo: digits}                 # or {factory: "pkg.module:build", weights: w.safetensors}
    data: {demo: digits}                  # or {calibration: calib.safetensors, evaluation: test.safetensors}
    seed: 0
    stages:
      - prune: {structured: true, method: l2, target: macs=0.25}
      - distill: {epochs: 6, lr: 1.0e-3, temperature: 4.0, alpha: 0.9}
      - quantize: {}
      - evaluate: {}
      - save: {}

Relative paths are read from the recipe's folder. Every mistake is one line:
`recipe.yaml:7: stages[0].prune.sparsity: must be in [0, 1), got 1.5`.
"""
from __future__ import annotations

import os
import re
import types
import typing
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import (AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, ValidationError,
                      ValidationInfo, field_validator, model_validator)

from .api import resolve_sparsity
from .criteria import get_criterion
from .errors import FileProblem, InvalidArgument
from .structured import UNIT_KINDS
from .structured.options import check_options


def _no_bool(value: Any) -> Any:
    # YAML reads `yes` / `true` as booleans, which pydantic would quietly turn into 1.0
    if isinstance(value, bool):
        raise ValueError(f"expected a number, got {value!r}")
    return value


def _fraction(value: float) -> float:
    if not 0.0 <= value < 1.0:
        raise ValueError(f"must be in [0, 1), got {value:g}")
    return value


def _positive(value: float) -> float:
    if not value > 0:
        raise ValueError(f"must be > 0, got {value:g}")
    return value


def _unit_interval(value: float) -> float:
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"must be in [0, 1], got {value:g}")
    return value


# `.inf` and `.nan` are YAML floats; a learning rate of inf trains to NaN weights and "succeeds"
Finite = Annotated[float, BeforeValidator(_no_bool), Field(allow_inf_nan=False)]
Number = Finite
Fraction = Annotated[Finite, AfterValidator(_fraction)]
Weight = Annotated[Finite, AfterValidator(_unit_interval)]
PositiveNumber = Annotated[Finite, AfterValidator(_positive)]
Count = Annotated[int, BeforeValidator(_no_bool), Field(ge=0)]
PositiveCount = Annotated[int, BeforeValidator(_no_bool), Field(ge=1)]


class _Spec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _input_file(value: str, info: ValidationInfo) -> str:
    """An input path, made absolute against the recipe's folder; it must exist."""
    base = Path((info.context or {}).get("base", "."))
    path = (base / os.path.expanduser(value)).resolve()
    if not path.is_file():
        raise ValueError(f"file not found: {path}")
    return str(path)


class ModelSpec(_Spec):
    """The dense model: the embedded digits CNN, or your factory plus a weights file."""

    demo: Literal["digits"] | None = None
    factory: str | None = None
    weights: str | None = None
    input_shape: list[PositiveCount] | None = None
    trust_pickle: bool = False

    @field_validator("weights")
    @classmethod
    def _exists(cls, value: str | None, info: ValidationInfo) -> str | None:
        return None if value is None else _input_file(value, info)

    @model_validator(mode="after")
    def _one_source(self) -> ModelSpec:
        if (self.demo is None) == (self.factory is None):
            raise ValueError("give either demo: digits, or factory: 'package.module:function' with weights: FILE")
        if self.factory is not None and self.weights is None:
            raise ValueError("a factory needs weights: FILE (.safetensors, or a torch file of plain tensors)")
        if self.factory is not None and ":" not in self.factory:
            raise ValueError(f"factory must look like 'package.module:function', got {self.factory!r}")
        return self


class DataSpec(_Spec):
    """Batches for scoring and training (`calibration`) and for evaluation."""

    demo: Literal["digits"] | None = None
    calibration: str | None = None
    evaluation: str | None = None
    batch_size: PositiveCount = 64
    loss: Literal["cross_entropy", "mse"] = "cross_entropy"

    @field_validator("calibration", "evaluation")
    @classmethod
    def _exists(cls, value: str | None, info: ValidationInfo) -> str | None:
        return None if value is None else _input_file(value, info)

    @model_validator(mode="after")
    def _one_source(self) -> DataSpec:
        if (self.demo is None) == (self.calibration is None):
            raise ValueError("give either demo: digits, or calibration: FILE (tensors 'inputs' and 'targets')")
        if self.demo is not None and self.evaluation is not None:
            raise ValueError("demo: digits brings its own test split; leave out evaluation")
        return self


class PruneStage(_Spec):
    """Mask single weights (sparsity / pattern) or remove channels (structured: ratio / target)."""

    method: str | None = None
    structured: bool = False
    sparsity: Fraction | None = None
    pattern: str | None = None
    scope: str | None = None
    ratio: Fraction | None = None
    target: str | None = None
    ignore: list[str] = []
    batches: PositiveCount = 8              # calibration batches for data-aware scoring
    recalibrate_bn: bool = False            # re-estimate BatchNorm statistics right after the cut
    units: list[str] = list(UNIT_KINDS)     # structured: "channel", "head"
    round_to: PositiveCount | None = None   # structured: every kept width a multiple of this
    max_ratio: Fraction | None = None       # structured: at most this fraction of any group removed
    allocation: Literal["sensitivity"] | None = None   # per-group ratios from sensitivity curves (a target)
    rounds: PositiveCount = 1               # allocation: sensitivity in this many cuts, curves re-measured before each

    @field_validator("method")
    @classmethod
    def _known_method(cls, method: str | None) -> str | None:
        if method is not None:
            get_criterion(method)
        return method

    @model_validator(mode="after")
    def _consistent(self) -> PruneStage:
        if self.structured:
            if self.sparsity is not None or self.pattern is not None:
                raise ValueError("structured pruning takes ratio or target, not sparsity / pattern")
            if (self.ratio is None) == (self.target is None):
                raise ValueError("structured pruning needs exactly one of ratio (fraction of channels) "
                                 "or target (e.g. macs=0.25)")
            check_options(ratio=self.ratio, target=self.target, scope=self.scope or "local", units=self.units,
                          round_to=self.round_to, max_ratio=self.max_ratio)
            if self.allocation is not None and (self.target is None or self.scope is not None):
                raise ValueError("allocation: sensitivity picks each group's ratio to meet a target: give target "
                                 "(e.g. macs=0.25), not ratio or scope")
            if self.rounds > 1 and self.allocation is None:
                raise ValueError("rounds is for allocation: sensitivity (the curves are measured again before "
                                 "each round's cut)")
        else:
            if self.allocation is not None or self.rounds > 1:
                raise ValueError("allocation and rounds are for structured: true (with a target)")
            if self.ratio is not None or self.target is not None:
                raise ValueError("ratio and target are for structured: true; unstructured pruning takes sparsity or pattern")
            resolve_sparsity(self.sparsity, self.pattern)
            if self.scope not in (None, "layer", "global", "row"):
                raise ValueError(f"scope must be 'layer', 'global' or 'row', got {self.scope!r}")
        return self


# Under torchrun, how a recovery stage trains on all processes (unset: DDP; see secateurs.recover.distributed).
Parallel = Literal["ddp", "fsdp"] | None


class FinetuneStage(_Spec):
    """Train on the calibration data with the masks kept."""

    epochs: Count = 1
    lr: PositiveNumber = 1e-3
    optimizer: Literal["adam", "adamw", "sgd"] = "adam"
    weight_decay: Annotated[Finite, Field(ge=0)] = 0.0
    parallel: Parallel = None


class DistillStage(_Spec):
    """Train against the dense model's temperature-scaled logits (and the labels, weighted 1 - alpha)."""

    epochs: Count = 1
    lr: PositiveNumber = 1e-3
    temperature: PositiveNumber = 4.0
    alpha: Weight = 0.9
    parallel: Parallel = None


class QuantizeStage(_Spec):
    """int8 dynamic quantization of the Linear layers (see secateurs.quantize)."""

    dtype: Literal["int8"] = "int8"


class EvaluateStage(_Spec):
    """Accuracy on the evaluation data."""

    metric: Literal["accuracy"] = "accuracy"


class SaveStage(_Spec):
    """Write the model (dense and sparse safetensors, plan.json; model.int8.safetensors once quantized;
    model.onnx, the float model checked with onnxruntime, with onnx: true)."""

    path: str = "model"
    onnx: bool = False

    @field_validator("path")
    @classmethod
    def _inside_run(cls, path: str) -> str:
        if Path(path).is_absolute() or ".." in Path(path).parts or not Path(path).parts or not path.strip():
            raise ValueError(f"must be a folder name inside the run directory, got {path!r}")
        return path


STAGES: dict[str, type[_Spec]] = {
    "prune": PruneStage, "finetune": FinetuneStage, "distill": DistillStage,
    "quantize": QuantizeStage, "evaluate": EvaluateStage, "save": SaveStage,
}
# Stages that change weights through training or scoring: a quantized model cannot take them.
_NEEDS_FLOAT = ("prune", "finetune", "distill")


class Stage(_Spec):
    """One step of the pipeline: a mapping with a single key, the stage's name."""

    prune: PruneStage | None = None
    finetune: FinetuneStage | None = None
    distill: DistillStage | None = None
    quantize: QuantizeStage | None = None
    evaluate: EvaluateStage | None = None
    save: SaveStage | None = None

    @model_validator(mode="before")
    @classmethod
    def _single_key(cls, value: Any) -> Any:
        if isinstance(value, str):       # "- evaluate" with no options
            value = {value: None}
        if not isinstance(value, dict) or len(value) != 1:
            got = list(value) if isinstance(value, dict) else repr(value)
            raise ValueError(f"a stage is a mapping with one key, one of {', '.join(STAGES)}; got {got}")
        (name, options), = value.items()
        if name not in STAGES:
            raise ValueError(f"unknown stage {name!r}; expected one of {', '.join(STAGES)}")
        return {name: {} if options is None else options}

    @property
    def name(self) -> str:
        return next(name for name in STAGES if getattr(self, name) is not None)

    @property
    def options(self) -> _Spec:
        return getattr(self, self.name)


class LoggingSpec(_Spec):
    """Optional experiment logging (pip install 'secateurs[logging]'); relative paths are inside the run directory."""

    tensorboard: str | None = None     # folder for TensorBoard event files
    mlflow: str | None = None          # MLflow tracking URI (a plain folder: a local file store)


class Recipe(_Spec):
    """A whole pipeline: the model, its data, the seed and the stages in order."""

    model: ModelSpec
    data: DataSpec
    seed: Annotated[Count, Field(le=2**64 - 1)] = 0    # what torch.manual_seed takes
    threads: PositiveCount = 1
    stages: list[Stage] = Field(min_length=1)
    logging: LoggingSpec | None = None

    @model_validator(mode="before")
    @classmethod
    def _demo_data(cls, value: Any) -> Any:
        """A demo model brings its own data unless the recipe names some."""
        model = value.get("model") if isinstance(value, dict) else None
        if not isinstance(model, dict) or "data" in value:
            return value
        if model.get("demo") is not None:
            return {**value, "data": {"demo": model["demo"]}}
        if model.get("factory") is not None:
            raise ValueError("a model from a factory needs data: {calibration: FILE} (tensors 'inputs' and 'targets')")
        return value

    def misplaced_stage(self) -> int | None:
        """Index of the first stage that needs float weights but comes after quantize."""
        quantized = False
        for index, stage in enumerate(self.stages):
            if quantized and stage.name in _NEEDS_FLOAT:
                return index
            quantized = quantized or stage.name == "quantize"
        return None

    def to_config(self) -> dict[str, Any]:
        """The resolved recipe as plain data: every default filled in, paths absolute."""
        config = self.model_dump(mode="json", exclude_none=True)
        config["stages"] = [{stage.name: stage.options.model_dump(mode="json", exclude_none=True)}
                            for stage in self.stages]
        return config


class _UniqueKeyLoader(yaml.SafeLoader):
    """Safe YAML whose mappings refuse a repeated key (PyYAML would keep the last silently).

    YAML 1.1 also reads `2:4` as the base-60 integer 124; here it stays the string "2:4",
    so an N:M pattern can be written without quotes.
    """

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"key {key!r} appears twice", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


_INT = "tag:yaml.org,2002:int"
_UniqueKeyLoader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != _INT]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}
_UniqueKeyLoader.add_implicit_resolver(
    _INT, re.compile(r"^(?:[-+]?0b[0-1_]+|[-+]?0[0-7_]+|[-+]?(?:0|[1-9][0-9_]*)|[-+]?0x[0-9a-fA-F_]+)$"),
    list("-+0123456789"))


def _line_of(root: yaml.Node | None, loc: tuple[Any, ...]) -> int | None:
    """The 1-based line of the deepest node on `loc` (a pydantic error location)."""
    node, line = root, root.start_mark.line + 1 if root is not None else None
    for part in loc:
        if isinstance(node, yaml.MappingNode):
            match = next(((k, v) for k, v in node.value if k.value == part), None)
            if match is None:
                break
            node, line = match[1], match[0].start_mark.line + 1
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) and part < len(node.value):
            node = node.value[part]
            line = node.start_mark.line + 1
        else:
            break
    return line


def _path(loc: tuple[Any, ...]) -> str:
    """("stages", 1, "prune", "sparsity") -> "stages[1].prune.sparsity"."""
    text = ""
    for part in loc:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text


def _model_at(loc: tuple[Any, ...]) -> type[BaseModel] | None:
    """The schema class that owns the field at `loc`, for listing the keys it allows."""
    cls: Any = Recipe
    for part in loc[:-1]:
        if isinstance(part, int):
            continue
        field = cls.model_fields.get(part) if isinstance(cls, type) and issubclass(cls, BaseModel) else None
        if field is None:
            return None
        cls = _inner_model(field.annotation)
    return cls if isinstance(cls, type) and issubclass(cls, BaseModel) else None


def _inner_model(annotation: Any) -> Any:
    """The BaseModel inside `X | None` or `list[X]`, else None."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    if typing.get_origin(annotation) in (Union, types.UnionType, list):
        return next((m for m in map(_inner_model, typing.get_args(annotation)) if m is not None), None)
    return None


def _describe(error: dict[str, Any]) -> str:
    """What was wrong and what was expected, in one phrase."""
    kind, message, loc = error["type"], error["msg"], error["loc"]
    if kind == "extra_forbidden":
        owner = _model_at(loc)
        allowed = f"; expected one of {', '.join(owner.model_fields)}" if owner is not None else ""
        return f"unknown key{allowed}"
    if kind == "missing":
        return "required key is missing"
    if message.startswith("Value error, "):
        return message[len("Value error, "):]
    message = message[0].lower() + message[1:]
    return f"{message}, got {error['input']!r}" if "input" in error else message


def _fail(source: str, line: int | None, where: str, what: str) -> InvalidArgument:
    place = f"{source}:{line}" if line is not None else source
    return InvalidArgument(f"{place}: {where + ': ' if where else ''}{what}")


# A recipe is a page of YAML: anything far larger is a mistake or an attack (a "billion laughs"
# document of nested aliases is small on disk but expands to billions of nodes when walked).
MAX_RECIPE_BYTES = 1 << 20
MAX_RECIPE_NODES = 100_000


def _children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    if isinstance(node, yaml.MappingNode):
        return [part for pair in node.value for part in pair]
    return []


def _expanded_nodes(root: yaml.Node | None) -> int:
    """How many nodes the document has once every alias is expanded; counted on the shared
    graph (memoised, post-order), so a billion-laughs document is measured without being expanded."""
    started = -1
    sizes: dict[int, int] = {}
    stack = [(root, False)] if root is not None else []
    while stack:   # an explicit stack: a deep document must not exhaust Python's recursion
        node, finished = stack.pop()
        if finished:
            total = 1 + sum(sizes[id(child)] for child in _children(node))
            sizes[id(node)] = min(total, MAX_RECIPE_NODES + 1)
        elif sizes.get(id(node)) == started:   # entered and not left: an ancestor of itself
            raise ValueError("an alias refers to a node that contains it")
        elif id(node) not in sizes:
            sizes[id(node)] = started
            stack.append((node, True))
            stack.extend((child, False) for child in _children(node))
    return sizes[id(root)] if root is not None else 0


def _read_yaml(text: str, source: str) -> tuple[yaml.Node | None, Any]:
    """The composed document and its data, refused when it would expand past MAX_RECIPE_NODES."""
    if len(text) > MAX_RECIPE_BYTES:
        raise _fail(source, None, "", f"a recipe is at most {MAX_RECIPE_BYTES:,} characters, this one has {len(text):,}")
    loader = _UniqueKeyLoader(text)
    try:
        try:
            root = loader.get_single_node()
        except RecursionError:   # PyYAML composes recursively
            raise _fail(source, None, "", "the YAML is nested too deep") from None
        try:
            nodes = _expanded_nodes(root)
        except ValueError as exc:
            raise _fail(source, None, "", str(exc)) from None
        if nodes > MAX_RECIPE_NODES:
            raise _fail(source, None, "", f"the YAML expands to more than {MAX_RECIPE_NODES:,} values "
                                          "(anchors and aliases nested too deep)")
        return root, loader.construct_document(root) if root is not None else None
    finally:
        loader.dispose()


def parse_recipe(text: str, source: str = "recipe", base: str | os.PathLike = ".") -> Recipe:
    """Validate YAML `text` as a Recipe; relative paths are read from `base`."""
    try:
        root, data = _read_yaml(text, source)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = f"{mark.line + 1}:{mark.column + 1}" if mark is not None else None
        raise _fail(source, line, "", f"YAML syntax error: {exc.problem or exc.context}") from None
    if not isinstance(data, dict):
        raise _fail(source, None, "", f"expected a mapping with keys {', '.join(Recipe.model_fields)}, "
                                      f"got {type(data).__name__}")
    try:
        recipe = Recipe.model_validate(data, context={"base": str(base)})
    except ValidationError as exc:
        # an unknown key usually explains the "missing" error that comes with it: report it first
        errors = sorted(exc.errors(include_url=False), key=lambda e: e["type"] != "extra_forbidden")
        first, more = errors[0], len(errors) - 1
        what = _describe(first) + (f" (and {more} more problem{'s' if more > 1 else ''})" if more else "")
        raise _fail(source, _line_of(root, first["loc"]), _path(first["loc"]), what) from None
    index = recipe.misplaced_stage()
    if index is not None:
        raise _fail(source, _line_of(root, ("stages", index)), f"stages[{index}]",
                    f"{recipe.stages[index].name} cannot follow quantize (an int8 model is not trained or pruned "
                    "further); move quantize after it")
    return recipe


def load_recipe(path: str | os.PathLike) -> Recipe:
    """Read and validate the recipe at `path`; any mistake is one InvalidArgument line naming its place."""
    path = Path(path)
    if not path.is_file():
        raise FileProblem(f"recipe file not found: {path}")
    try:
        if path.stat().st_size > 4 * MAX_RECIPE_BYTES:   # bytes, before reading: parse_recipe counts characters
            raise FileProblem(f"recipe {path} is {path.stat().st_size:,} bytes; a recipe is at most "
                              f"{MAX_RECIPE_BYTES:,} characters")
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise FileProblem(f"cannot read recipe {path}: {exc}") from None
    return parse_recipe(text, source=str(path), base=path.resolve().parent)


__all__ = ["Recipe", "Stage", "STAGES", "load_recipe", "parse_recipe"]
