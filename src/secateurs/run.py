"""run_recipe(): walk a recipe's stages, checkpointing after each, so a run can resume and repeat.

A run directory holds:

    config.yaml        the resolved recipe (defaults filled in, paths absolute)
    run.json           config hash, inputs digest, seed, library versions
    dense.json         the dense model's costs and layers, measured before the first stage
    metrics.json       per stage: its own results, the model's costs and its layers
    checkpoints/NN-stage/   state.safetensors (weights and masks), plans.json, stage.json
    model/             what a save stage wrote

Every stage runs under its own seed (derived from the recipe's seed and the stage
index), so resuming at stage k gives what an unbroken run gives, and the same recipe
and seed give bit-identical masks and metrics (timing fields aside) on the same
machine and thread count.
"""
from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
import yaml
from torch import nn

from .api import prune
from .batches import LOSSES, check_class_labels, check_data_tensors
from .checkpoint import save
from .errors import FileProblem, InvalidArgument
from .io import _encode as encode_state
from .io import build_model, check_output_dir, load_into, load_state, output_lock, staged_output
from .measure import TIMING_FIELDS, measure
from .provenance import versions
from .quantize import measure_int8, quantize_int8, quantized_layers, save_int8
from .recipe import Recipe, load_recipe
from .recover.distributed import is_distributed, rank_output_dir, world
from .recover.finetune import evaluate_accuracy, finetune
from .structured import prune_structured, replay
from .tracking import open_run_log, require_loggers

# Keys whose values are wall-clock times: they differ between two runs of the same recipe.
TIMING_KEYS = (*TIMING_FIELDS, "seconds")
CHECKPOINTS = "checkpoints"
CHECKPOINT_FILES = ("state.safetensors", "plans.json", "stage.json")


@dataclass
class RunResult:
    """What one call of run_recipe did: where, which stages, and the metrics so far."""

    out_dir: Path
    config_hash: str
    metrics: dict[str, Any]
    ran: list[int] = field(default_factory=list)          # stage indices run by this call
    resumed_from: int | None = None                        # first stage index run when resuming


@dataclass
class Data:
    """Batches for scoring and training, batches for evaluation, and one example input."""

    train: list[Any]
    evaluation: list[Any]
    example: torch.Tensor
    loss_fn: Callable[..., torch.Tensor]

    def shuffled(self, seed: int) -> list[Any]:
        order = torch.randperm(len(self.train), generator=torch.Generator().manual_seed(seed)).tolist()
        return [self.train[i] for i in order]


@dataclass
class Pipeline:
    """What the stages share: the model being pruned, the dense teacher, the data and the records."""

    recipe: Recipe
    model: nn.Module
    teacher: nn.Module
    data: Data
    out_dir: Path
    plans: list[dict[str, Any]] = field(default_factory=list)   # {"kind": "structured" | "masks", "plan": ...}
    quantized: nn.Module | None = None

    @property
    def current(self) -> nn.Module:
        """The model as it stands: the int8 one once quantized."""
        return self.quantized if self.quantized is not None else self.model


# ------------------------------------------------------------------------ inputs

def _tensors(path: str, batch_size: int, trust_pickle: bool) -> list[Any]:
    tensors = load_state(path, trust_pickle=trust_pickle)
    if "inputs" not in tensors:
        raise FileProblem(f"data file {path} has no 'inputs' tensor (found: {', '.join(sorted(tensors)) or 'nothing'})")
    inputs, targets = tensors["inputs"], tensors.get("targets", tensors.get("labels"))
    if targets is None:
        raise FileProblem(f"data file {path} has no 'targets' tensor: training and evaluation need labels")
    check_data_tensors(f"data file {path}", inputs, targets)
    return list(zip(inputs.split(batch_size), targets.split(batch_size)))


def _dense_model(recipe: Recipe) -> nn.Module:
    """The trained dense model: the digits CNN (cached) or the factory's model with its weights."""
    spec = recipe.model
    if spec.demo:
        from .examples.digits import dense_model, load_digits

        return dense_model(load_digits())
    model = build_model(spec.factory)
    load_into(model, load_state(spec.weights, trust_pickle=spec.trust_pickle), source=f"weights {spec.weights}")
    return model


def _data(recipe: Recipe) -> Data:
    spec, loss_fn = recipe.data, LOSSES[recipe.data.loss]
    if spec.demo:
        from .examples.digits import load_digits

        digits = load_digits()
        return Data(digits.train_batches(spec.batch_size), digits.test_batches(), digits.test_x[:1], loss_fn)
    train = _tensors(spec.calibration, spec.batch_size, recipe.model.trust_pickle)
    evaluation = _tensors(spec.evaluation, spec.batch_size, recipe.model.trust_pickle) if spec.evaluation else train
    return Data(train, evaluation, train[0][0][:1], loss_fn)


def _inputs(recipe: Recipe) -> tuple[nn.Module, Data]:
    """The dense model and the data the recipe names, read and tried before anything is written."""
    model, data = _dense_model(recipe).eval(), _data(recipe)
    if recipe.model.input_shape:
        data.example = torch.randn(recipe.model.input_shape, generator=torch.Generator().manual_seed(0))
    try:
        with torch.no_grad():
            model(data.example)
            if recipe.data.loss == "cross_entropy" and not recipe.data.demo:
                for source, batches in (("calibration", data.train), ("evaluation", data.evaluation)):
                    check_class_labels(f"{source} data", torch.cat([t for _, t in batches]), model(batches[0][0]))
    except RuntimeError as exc:
        raise InvalidArgument(f"the model does not run on the example input {tuple(data.example.shape)}: "
                              f"{str(exc).splitlines()[0]}") from None
    return model, data


def _digest(model: nn.Module, data: Data) -> str:
    """sha256 of the dense weights and the data: a resumed run must start from the same ones."""
    digest = hashlib.sha256()
    for key, value in sorted(model.state_dict().items()):
        digest.update(key.encode())
        digest.update(value.detach().cpu().contiguous().numpy().tobytes())
    for batch in data.train + data.evaluation:
        for tensor in batch:
            digest.update(tensor.contiguous().numpy().tobytes())
    return digest.hexdigest()


def config_hash(recipe: Recipe) -> str:
    """sha256 of the resolved config as canonical JSON."""
    return hashlib.sha256(json.dumps(recipe.to_config(), sort_keys=True).encode()).hexdigest()


# ------------------------------------------------------------------------ stages

def _prune(p: Pipeline, options: Any, seed: int) -> dict[str, Any]:
    batches = p.data.shuffled(seed)[: options.batches]
    if options.structured:
        plans, curves = _prune_channels(p, options, batches, seed)
        first, plan = plans[0], plans[-1]
        result = {"method": plan.method, "ratio": plan.ratio if len(plans) == 1 else [q.ratio for q in plans],
                  "macs_before": first.macs_before, "macs_after": plan.macs_after,
                  "params_before": first.params_before, "params_after": plan.params_after}
        if curves is not None:
            result["sensitivity"] = curves
        if plan.budget:    # a target search: the target, and the cost predicted and measured
            result["budget"] = plan.budget
        p.plans += [{"kind": "structured", "plan": q.to_dict()} for q in plans[:-1]]
    else:
        plan = prune(p.model, options.method or "magnitude", options.sparsity, pattern=options.pattern,
                     scope=options.scope or "layer", data=batches, loss_fn=p.data.loss_fn, ignore=options.ignore,
                     skip_incompatible=options.pattern is not None, seed=seed)
        result = {"method": plan.method, "sparsity": plan.sparsity, "achieved_sparsity": plan.achieved}
    p.plans.append({"kind": "structured" if options.structured else "masks", "plan": plan.to_dict()})
    if options.recalibrate_bn:
        from .recover.batchnorm import recalibrate_bn

        result["bn_batches"] = recalibrate_bn(p.model, p.data.train)
    return result


def _prune_channels(p: Pipeline, options: Any, batches: list[Any],
                    seed: int) -> tuple[list[Any], dict[str, Any] | None]:
    """Remove channels to the stage's ratio or target; returns the plans (one per cut) and,
    with allocation: sensitivity, the curves that chose each group's ratio (the first round's).

    The curves' metric is the mean loss on the stage's calibration batches (accuracy on
    training data saturates); they are cached in the run's sensitivity/ folder.
    """
    method = options.method or "l2"
    if options.allocation is None:
        return [prune_structured(p.model, p.data.example, options.ratio, target=options.target, method=method,
                                 scope=options.scope, units=options.units, data=batches,
                                 loss_fn=p.data.loss_fn, round_to=options.round_to, max_ratio=options.max_ratio,
                                 ignore=options.ignore, seed=seed)], None
    from .sensitivity import (
        data_digest,
        mean_loss_metric,
        prune_by_sensitivity_rounds,
        sensitivity,
    )

    measured = []

    def measure(model: nn.Module) -> Any:
        measured.append(sensitivity(model, p.data.example, mean_loss_metric(batches, p.data.loss_fn), method=method,
                                    ignore=options.ignore, units=options.units, round_to=options.round_to,
                                    data=batches, loss_fn=p.data.loss_fn,
                                    higher_is_better=False, metric_name=f"{p.recipe.data.loss} loss",
                                    cache_dir=p.out_dir / "sensitivity",
                                    data_key=f"{p.recipe.data.loss}:{data_digest(batches)}", seed=seed))
        return measured[-1]

    plans = prune_by_sensitivity_rounds(p.model, p.data.example, measure, options.target, options.rounds)
    return plans, measured[0].report_curves()


def _finetune(p: Pipeline, options: Any, seed: int) -> dict[str, Any]:
    losses = []
    for epoch in range(options.epochs):   # a fresh order each epoch, fixed by the stage seed
        losses += finetune(p.model, p.data.shuffled(seed + epoch), epochs=1, lr=options.lr, loss_fn=p.data.loss_fn,
                           optimizer=options.optimizer, weight_decay=options.weight_decay,
                           parallel=options.parallel or "auto")
    return {"loss": losses}


def _distill(p: Pipeline, options: Any, seed: int) -> dict[str, Any]:
    from .recover.distill import distill

    losses, kd = [], []
    for epoch in range(options.epochs):
        history = distill(p.model, p.teacher, p.data.shuffled(seed + epoch), epochs=1, lr=options.lr,
                          temperature=options.temperature, alpha=options.alpha, loss_fn=p.data.loss_fn,
                          parallel=options.parallel or "auto")
        losses += history.loss
        kd += history.kd
    return {"loss": losses, "kd": kd}


def _quantize(p: Pipeline, options: Any, seed: int) -> dict[str, Any]:
    p.quantized = quantize_int8(p.model)
    return {"dtype": options.dtype, "layers": quantized_layers(p.quantized),
            "engine": torch.backends.quantized.engine}


def _evaluate(p: Pipeline, options: Any, seed: int) -> dict[str, Any]:
    return {"accuracy": evaluate_accuracy(p.current, p.data.evaluation)}


def _save(p: Pipeline, options: Any, seed: int) -> dict[str, Any]:
    target = p.out_dir / options.path
    with staged_output(target) as stage:
        save(p.model, stage, [entry["plan"] for entry in p.plans])
        if p.quantized is not None:
            save_int8(p.quantized, stage / "model.int8.safetensors")
        if options.onnx:   # the float model: int8 dynamic quantization does not export
            from .export import export_onnx

            exported = export_onnx(p.model, p.data.example, stage / "model.onnx")
    files = sorted(f.name for f in target.iterdir())
    result = {"path": options.path, "files": files,
              "bytes": {name: (target / name).stat().st_size for name in files}}
    if options.onnx:
        result["onnx"] = {"opset": exported.opset, "dynamic_batch": exported.dynamic_batch,
                          "max_abs_diff": exported.max_abs_diff}
    return result


STAGE_RUNNERS: dict[str, Callable[[Pipeline, Any, int], dict[str, Any]]] = {
    "prune": _prune, "finetune": _finetune, "distill": _distill,
    "quantize": _quantize, "evaluate": _evaluate, "save": _save,
}


def _stage_seed(seed: int, index: int) -> int:
    return seed * 1_000 + index


@contextlib.contextmanager
def _seeded(seed: int, threads: int) -> Iterator[None]:
    """Torch's global RNG seeded and the thread count fixed inside; both restored after."""
    previous = torch.get_num_threads()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        torch.set_num_threads(threads)
        try:
            yield
        finally:
            torch.set_num_threads(previous)


# ------------------------------------------------------------------------ measuring

def layer_table(model: nn.Module) -> list[dict[str, Any]]:
    """Per weighted layer (Linear, conv, ...): its shape, width and fraction of zero weights."""
    rows = []
    for name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        if isinstance(weight, torch.Tensor) and weight.dim() >= 2 and not any(True for _ in module.children()):
            rows.append({"name": name, "kind": type(module).__name__, "shape": list(weight.shape),
                         "width": int(weight.shape[0]), "params": weight.numel(),
                         "sparsity": 1.0 - int(torch.count_nonzero(weight)) / weight.numel()})
    return rows


def _measure(p: Pipeline) -> dict[str, Any]:
    evaluate = lambda m: evaluate_accuracy(m, p.data.evaluation)  # noqa: E731
    threads = p.recipe.threads
    if p.quantized is not None:
        cost = measure_int8(p.quantized, p.model, p.data.example, threads=threads, evaluate=evaluate)
    else:
        cost = measure(p.model, p.data.example, threads=threads, evaluate=evaluate)
    return {"measurement": cost.to_dict(), "layers": layer_table(p.model), "quantized": p.quantized is not None}


# ------------------------------------------------------------------------ checkpoints

def _check_finite(model: nn.Module, index: int, name: str) -> None:
    """Stop the run when a stage left NaN or infinite weights (a diverged loss), before they are saved."""
    for param_name, param in model.named_parameters():
        if param.is_floating_point() and not torch.isfinite(param).all():
            raise InvalidArgument(f"stage {index} ({name}): the loss diverged and left NaN or infinite weights in "
                                  f"{param_name}; lower the learning rate (nothing of this stage was saved)")


def _write_json(path: Path, record: Any) -> None:
    """Write JSON atomically: a crash leaves the old file or the new one, never half of one."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(record, indent=2))
    os.replace(tmp, path)


def _checkpoint(p: Pipeline, index: int, name: str, record: dict[str, Any]) -> None:
    from safetensors.torch import save_file

    target = p.out_dir / CHECKPOINTS / f"{index:02d}-{name}"
    if target.exists():   # a crash between staging and the metrics update can leave one behind
        shutil.rmtree(target)
    with staged_output(target) as stage:
        tensors, metadata = encode_state(p.model.state_dict(), sparse=False)   # masks included
        save_file(tensors, str(stage / "state.safetensors"), metadata=metadata)
        (stage / "plans.json").write_text(json.dumps(p.plans, indent=2))
        (stage / "stage.json").write_text(json.dumps(record, indent=2))


def _finished(out: Path, stages: int) -> list[dict[str, Any]]:
    """Records of the finished stages, in order, up to the first one missing."""
    records = []
    for index in range(stages):
        found = [d for d in sorted((out / CHECKPOINTS).glob(f"{index:02d}-*"))
                 if all((d / f).is_file() for f in CHECKPOINT_FILES)]   # a half-moved one is not finished
        if not found:
            break
        records.append(json.loads((found[0] / "stage.json").read_text()))
    return records


def _restore(p: Pipeline, index: int, name: str) -> None:
    """Bring the pipeline to its state after stage `index` from that stage's checkpoint."""
    source = p.out_dir / CHECKPOINTS / f"{index:02d}-{name}"
    p.plans = json.loads((source / "plans.json").read_text())
    for entry in p.plans:    # cut the fresh dense model exactly as the recorded plans did
        if entry["kind"] == "structured":
            replay(p.model, entry["plan"])
    load_into(p.model, load_state(source / "state.safetensors"), source=f"checkpoint {source}")
    if json.loads((source / "stage.json").read_text()).get("quantized"):
        p.quantized = quantize_int8(p.model)


# ------------------------------------------------------------------------ the run

def _metrics(recipe: Recipe, digest: str, dense: dict[str, Any], records: list[dict[str, Any]]) -> dict[str, Any]:
    final = records[-1] if records else dense
    metrics = {"config_hash": config_hash(recipe), "inputs_digest": digest, "seed": recipe.seed,
               "dense": dense, "stages": records,
               "final": {"stage": final.get("stage", "dense"), **final["measurement"]}}
    # the report plots one set of sensitivity curves per run: the last prune stage's that computed some
    curves = [r["result"]["sensitivity"] for r in records if "sensitivity" in r.get("result", {})]
    if curves:
        metrics["sensitivity"] = curves[-1]
    return metrics


def _check_resume(out: Path, recipe: Recipe, digest: str) -> dict[str, Any]:
    run_file = out / "run.json"
    if not run_file.is_file():
        raise FileProblem(f"cannot resume: {out} holds no run.json (start the run without --resume)")
    run = json.loads(run_file.read_text())
    if run.get("config_hash") != config_hash(recipe):
        raise InvalidArgument(f"cannot resume {out}: the recipe's resolved config hash {config_hash(recipe)[:12]} "
                              f"differs from the run's {str(run.get('config_hash'))[:12]}; start a new run directory")
    if run.get("inputs_digest") != digest:
        raise InvalidArgument(f"cannot resume {out}: the dense weights or the data differ from those the run "
                              "started with; start a new run directory")
    return run


def _start(out: Path, recipe: Recipe, digest: str, dense: dict[str, Any], source: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(yaml.safe_dump(recipe.to_config(), sort_keys=False))
    _write_json(out / "dense.json", dense)
    _write_json(out / "run.json", {"config_hash": config_hash(recipe), "inputs_digest": digest, "seed": recipe.seed,
                                   "recipe": str(source), "versions": versions(),
                                   "stages": [s.name for s in recipe.stages]})


def run_recipe(recipe_path: str | os.PathLike, out_dir: str | os.PathLike, resume: bool = False,
               on_stage: Callable[[int, str, dict[str, Any]], Any] | None = None) -> RunResult:
    """Run the recipe at `recipe_path` into `out_dir`; with `resume`, go on after its last finished stage.

    Nothing is written until the recipe, the model and the data have been read and
    checked; `out_dir` is locked for the whole run, so a second run into it stops at once
    (FileProblem). `on_stage(index, name, record)` is called after each finished stage.
    """
    recipe_path = Path(recipe_path)
    recipe = load_recipe(recipe_path)
    spec = recipe.logging.model_dump(exclude_none=True) if recipe.logging else None
    require_loggers(spec)
    out = Path(out_dir)
    # rank 0 alone writes `out` (the other ranks of a torchrun write a private copy)
    with output_lock(out) if world()[0] == 0 else contextlib.nullcontext():
        return _run_locked(recipe, recipe_path, out, spec, resume, on_stage)


def _run_locked(recipe: Recipe, recipe_path: Path, out: Path, spec: dict[str, Any] | None, resume: bool,
                on_stage: Callable[[int, str, dict[str, Any]], Any] | None) -> RunResult:
    """run_recipe's work, with `out` locked against a second writer."""
    inputs = [recipe_path] + [f for f in (recipe.model.weights, recipe.data.calibration, recipe.data.evaluation) if f]
    check_output_dir(out, inputs, overwrite=True)
    if not resume and out.is_dir() and any(out.iterdir()):   # run has no --overwrite: a run folder is resumed or new
        raise FileProblem(f"run directory {out} is not empty: choose a new folder, or pass --resume to continue "
                          "the run in it")
    if is_distributed():   # torchrun: every rank runs the stages, rank 0 alone writes `out` and logs
        out, spec = rank_output_dir(out, resume), spec if world()[0] == 0 else None
    with _seeded(_stage_seed(recipe.seed, 0), recipe.threads):
        model, data = _inputs(recipe)
    digest = _digest(model, data)
    pipeline = Pipeline(recipe, model, copy.deepcopy(model).eval(), data, out)
    records: list[dict[str, Any]] = []
    if resume:
        _check_resume(out, recipe, digest)
        records = _finished(out, len(recipe.stages))
        dense = json.loads((out / "dense.json").read_text())
        if records:
            _restore(pipeline, records[-1]["index"], records[-1]["stage"])
    else:
        with _seeded(_stage_seed(recipe.seed, 0), recipe.threads):
            dense = _measure(pipeline)
        _start(out, recipe, digest, dense, recipe_path.resolve())
    first = len(records)
    ran = []
    with contextlib.closing(open_run_log(spec, out, out.resolve().name, recipe.to_config())) as log:
        if not resume:
            log.dense(dense)
        for index in range(first, len(recipe.stages)):
            stage = recipe.stages[index]
            started = time.perf_counter()
            with _seeded(_stage_seed(recipe.seed, index + 1), recipe.threads):
                result = STAGE_RUNNERS[stage.name](pipeline, stage.options, _stage_seed(recipe.seed, index + 1))
                _check_finite(pipeline.model, index, stage.name)
                record = {"index": index, "stage": stage.name, "result": result, **_measure(pipeline)}
            record["seconds"] = time.perf_counter() - started
            _checkpoint(pipeline, index, stage.name, record)
            records.append(record)
            _write_json(out / "metrics.json", _metrics(recipe, digest, dense, records))
            ran.append(index)
            log.stage(index, stage.name, record)
            if on_stage is not None:
                on_stage(index, stage.name, record)
    metrics = _metrics(recipe, digest, dense, records)
    if not ran:
        _write_json(out / "metrics.json", metrics)
    return RunResult(out, config_hash(recipe), metrics, ran, first if resume else None)


def without_timing(record: Any) -> Any:
    """`record` with every timing field left out: what two runs of one recipe must agree on."""
    if isinstance(record, dict):
        return {k: without_timing(v) for k, v in record.items() if k not in TIMING_KEYS}
    if isinstance(record, list):
        return [without_timing(v) for v in record]
    return record


__all__ = ["RunResult", "STAGE_RUNNERS", "config_hash", "layer_table", "run_recipe", "without_timing"]
