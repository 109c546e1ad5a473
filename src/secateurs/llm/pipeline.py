"""Prune a Hugging Face model folder end to end: the road behind `secateurs prune --hf`.

folder -> tokenizer and model (offline) -> calibration windows -> quality before ->
prune -> quality after -> a `save_pretrained` folder, `metrics.json` and `report.md`.

Three ways to prune, picked by the options:

- **unstructured** (default): `prune_llm` block by block with magnitude, Wanda or
  SparseGPT, unstructured or N:M, optionally with OWL block ratios. Weights are zeroed
  in place, so the folder is an ordinary checkpoint of the same shapes.
- **stream**: the same, but through `stream.prune_pretrained`: the weights stream from
  the safetensors shards one block at a time, for models larger than memory.
- **structured**: attention heads (whole key/value groups under GQA) and MLP channels
  of the repeated blocks removed by `prune_structured`, optionally with FLAP's bias
  compensation, and/or whole layers dropped by block influence (ShortGPT,
  `secateurs.blocks`). The residual stream (hidden size), the embeddings and the heads
  are never cut. A model whose layers end up with one width is saved for plain
  transformers; otherwise a secateurs folder that `hf.load_pretrained` rebuilds.

Nothing is written unless the whole run succeeds, and the input folder is only read.
"""
from __future__ import annotations

import dataclasses
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from torch import nn

from ..api import resolve_sparsity
from ..criteria import get_criterion
from ..errors import FileProblem, InvalidArgument, MissingData
from ..io import check_output_dir, staged_output
from ..provenance import versions
from ..structured import UNIT_KINDS
from ..structured.options import check_options
from .blocks import find_block_layout
from .engine import LLMConfig, make_config, needs_inputs
from .records import config_summary, config_summary_of, report_markdown, write_records
from .sequential import prune_llm

DEFAULT_STRUCTURED_METHOD = "l2"
DEFAULT_METHOD = "wanda"
Stage = Callable[[str], None]


@dataclass
class CheckpointOptions:
    """Everything `prune_checkpoint` does besides the folders; recorded in metrics.json as "config"."""

    method: str | None = None          # wanda / magnitude / sparsegpt / ria / alps; structured: a criterion (default l2)
    sparsity: float | None = None      # fraction of each pruned linear's weights zeroed
    pattern: str | None = None         # "2:4", "4:8"
    calib_windows: int = 128           # N calibration windows ...
    seqlen: int = 512                  # ... of L tokens each
    seed: int = 0                      # which windows are drawn
    owl: float | None = None           # OWL lambda: non-uniform block sparsities, same mean
    eval_file: str | None = None       # held-out text: perplexity (causal LM) or embedding cosine (encoder)
    stream: bool = False               # stream the weights from the shards (llm.stream)
    device: str | None = None          # unstructured: prune each block on this device ("cuda"), onloaded in turn
    offload_inputs: bool = False       # unstructured: calibration activations stay on the CPU, a batch at a time
    true_sequential: bool = False      # unstructured: re-collect statistics after each group of a block
    measure_error: bool = False        # unstructured: report ||WX - W'X||^2 per layer (one more pass per block)
    refine: str | None = None          # unstructured: "dsnot" swaps pruned/kept weights after the method
    permute: bool = False              # unstructured N:M: permute input channels before pruning
    structured: bool = False           # remove heads / channels / layers instead of zeroing weights
    ratio: float | None = None         # structured: fraction of each head / channel group removed
    target: str | None = None          # structured: "macs=0.5" or "params=0.7"
    units: tuple[str, ...] = UNIT_KINDS
    compensate: bool = False           # structured: fold removed inputs' means into the biases (FLAP)
    drop_layers: int = 0               # structured: whole layers dropped, lowest block influence first
    ignore: tuple[str, ...] = ()       # globs of linear names left alone
    overwrite: bool = False            # replace files in a non-empty output folder

    @property
    def mode(self) -> str:
        """Which way to prune: "structured", "stream" or "unstructured"."""
        return "structured" if self.structured else "stream" if self.stream else "unstructured"


def make_options(options: CheckpointOptions | None = None, **overrides: Any) -> CheckpointOptions:
    """`options` (or the defaults) with `overrides` applied, checked, with the method filled in."""
    names = {f.name for f in dataclasses.fields(CheckpointOptions)}
    unknown = sorted(set(overrides) - names)
    if unknown:
        raise InvalidArgument(f"unknown option(s) {unknown}; expected some of {sorted(names)}")
    options = dataclasses.replace(options or CheckpointOptions(), **overrides)
    options.units = tuple(options.units)
    options.ignore = tuple(options.ignore)
    if options.eval_file is not None:
        options.eval_file = str(options.eval_file)
    _check_counts(options)
    CHECKS[options.mode](options)
    return options


# ------------------------------------------------------------------ checking the options

def _check_counts(options: CheckpointOptions) -> None:
    for name in ("calib_windows", "seqlen"):
        value = getattr(options, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise InvalidArgument(f"{name} must be a positive integer, got {value!r}")
    if isinstance(options.seed, bool) or not isinstance(options.seed, int):
        raise InvalidArgument(f"seed must be an integer, got {options.seed!r}")


def _refuse(options: CheckpointOptions, names: Sequence[str], why: str) -> None:
    """InvalidArgument if any of `names` differs from its default."""
    defaults = CheckpointOptions()
    given = [n for n in names if getattr(options, n) != getattr(defaults, n)]
    if given:
        raise InvalidArgument(f"{given[0]}={getattr(options, given[0])!r} {why}")


_STRUCTURED_ONLY = ("ratio", "target", "units", "compensate", "drop_layers")
_UNSTRUCTURED_ONLY = ("sparsity", "pattern", "owl", "device", "offload_inputs", "true_sequential", "measure_error",
                      "refine", "permute")


def _check_unstructured(options: CheckpointOptions) -> None:
    _refuse(options, _STRUCTURED_ONLY, "needs structured=True (CLI: --structured)")
    options.method = options.method or DEFAULT_METHOD
    if options.sparsity is None and options.pattern is None:
        raise InvalidArgument("give a sparsity in [0, 1) or an N:M pattern (e.g. sparsity=0.5 or pattern='2:4')")
    sparsity, _ = resolve_sparsity(options.sparsity, options.pattern)
    make_config(llm_config(options, sparsity))  # the engine's own checks: method, pattern, owl


def _check_stream(options: CheckpointOptions) -> None:
    _check_unstructured(options)
    if options.eval_file is not None:
        raise InvalidArgument(f"eval_file={options.eval_file!r}: evaluation loads the whole model, which "
                              "stream=True (CLI: --stream) avoids; evaluate the output folder separately")


def _check_structured(options: CheckpointOptions) -> None:
    _refuse(options, _UNSTRUCTURED_ONLY, "does not apply to structured pruning (use ratio or target)")
    if options.stream:
        raise InvalidArgument("stream=True streams weights for unstructured pruning; structured pruning "
                              "(--structured) needs the whole model in memory")
    drop = options.drop_layers
    if isinstance(drop, bool) or not isinstance(drop, int) or drop < 0:
        raise InvalidArgument(f"drop_layers must be an integer >= 0, got {drop!r}")
    if options.ratio is None and options.target is None and not drop:
        raise InvalidArgument("structured pruning needs ratio (e.g. 0.25), target (e.g. 'macs=0.6') "
                              "or drop_layers (e.g. 2)")
    check_options(ratio=options.ratio, target=options.target, units=options.units, require_one=False)
    if options.compensate and options.ratio is None and options.target is None:
        raise InvalidArgument("compensate=True folds the inputs of removed heads / channels into biases; "
                              "it needs ratio or target")
    options.method = options.method or DEFAULT_STRUCTURED_METHOD
    if get_criterion(options.method).needs_loss:
        from ..criteria import CRITERIA

        lossless = sorted(n for n, c in CRITERIA.items() if not c.needs_loss and not c.scores_norms)
        raise InvalidArgument(f"method={options.method!r} needs a loss function; structured pruning of a Hugging "
                              f"Face folder scores units with one of {lossless}")


CHECKS: dict[str, Callable[[CheckpointOptions], None]] = {
    "unstructured": _check_unstructured, "stream": _check_stream, "structured": _check_structured}


def llm_config(options: CheckpointOptions, sparsity: float | None = None) -> LLMConfig:
    """The engine config the unstructured options describe."""
    sparsity = resolve_sparsity(options.sparsity, options.pattern)[0] if sparsity is None else sparsity
    return LLMConfig(method=options.method or DEFAULT_METHOD, sparsity=sparsity, pattern=options.pattern,
                     owl=options.owl, ignore=options.ignore, device=options.device,
                     offload_inputs=options.offload_inputs, true_sequential=options.true_sequential,
                     measure_error=options.measure_error, refine=options.refine, permute=options.permute)


def needs_calibration(options: CheckpointOptions) -> bool:
    """Whether the run uses calibration windows at all (magnitude alone needs none)."""
    if options.mode == "structured":
        return True
    config = llm_config(options)
    return needs_inputs(config) or config.owl is not None


# ------------------------------------------------------------------ checking the files

def _check_folders(path: str | Path, out: str | Path, options: CheckpointOptions,
                   calib: str | Path | None) -> tuple[Path, Path]:
    """The model folder and the output folder, checked; raises before anything is loaded."""
    source = Path(path)
    if not source.is_dir():
        raise FileProblem(f"model folder {str(path)!r} does not exist or is not a directory")
    if not (source / "config.json").is_file():
        raise FileProblem(f"{str(path)!r} has no config.json: not a Hugging Face model folder")
    target = Path(out).resolve()
    if target == source.resolve() or source.resolve() in target.parents:
        raise FileProblem(f"output directory {str(out)!r} is the model folder or inside it; write it elsewhere")
    inputs = [source] + ([calib] if calib is not None else []) + ([options.eval_file] if options.eval_file else [])
    return source, check_output_dir(target, inputs, overwrite=options.overwrite)


def _check_calib(calib: str | Path | None, options: CheckpointOptions) -> None:
    """Raise unless the calibration file is given and has text, when the run uses it."""
    if calib is None:
        if needs_calibration(options):
            raise MissingData(f"method {options.method!r} needs calibration text (CLI: --calib FILE); only "
                              f"magnitude pruning, without owl or measure_error, runs without")
        return
    _check_text(calib, "calibration")


def _check_text(path: str | Path, what: str) -> None:
    """Raise unless `path` is a readable text / JSONL file with at least one line of text."""
    from .data import read_lines

    if not read_lines(path):
        raise MissingData(f"{what} file {str(path)!r} is empty: it needs text (plain lines or JSONL with 'text')")


# ------------------------------------------------------------------ loading

@dataclass
class Loaded:
    """A model folder in memory: the model (eval mode), its tokenizer and what kind of model it is."""

    model: nn.Module
    tokenizer: Any
    causal: bool          # a causal LM (perplexity); otherwise an encoder (embedding cosine)


def load_tokenizer(source: Path) -> Any:
    """The folder's tokenizer, offline, or FileProblem."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(source, local_files_only=True)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise FileProblem(f"cannot load a tokenizer from {str(source)!r} (calibration needs the model's own "
                          f"tokenizer files): {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None


def load_model(source: Path) -> tuple[nn.Module, bool]:
    """The folder's model (offline, eval mode) and whether it is a causal LM."""
    import transformers
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    from ..hf import _model_class

    try:
        config = transformers.AutoConfig.from_pretrained(source, local_files_only=True)
        cls = _model_class(config)
        cls = cls if isinstance(cls, type) else transformers.AutoModel
        model = cls.from_pretrained(source, local_files_only=True)
    except (OSError, ValueError, KeyError, TypeError, RuntimeError, SafetensorError) as exc:   # a corrupt weights file too
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise FileProblem(f"cannot load a Hugging Face model from {str(source)!r}: {first}") from None
    return model.eval(), type(model).__name__ in set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values())


def calibration(tokenizer: Any, calib: str | Path | None, options: CheckpointOptions,
                max_positions: int | None) -> list[dict[str, torch.Tensor]]:
    """The seeded calibration windows, checked against the model's context length (none when unused)."""
    from .data import calibration_windows

    if not needs_calibration(options):
        return []
    if max_positions and options.seqlen > max_positions:
        raise InvalidArgument(f"seqlen={options.seqlen} is longer than the model's context "
                              f"(max_position_embeddings={max_positions})")
    return calibration_windows(tokenizer, calib, n=options.calib_windows, length=options.seqlen, seed=options.seed)


# ------------------------------------------------------------------ quality

@dataclass
class Quality:
    """How the model does on the held-out file, before and after pruning."""

    metric: str                  # "perplexity" (lower is better) or "embedding_cosine" (to the dense model)
    file: str
    before: float
    after: float | None = None
    details: dict[str, Any] = field(default_factory=dict)


class _Evaluation:
    """Measures `Quality` of a model before pruning, then again after, on the same held-out file."""

    def __init__(self, loaded: Loaded, path: str) -> None:
        self.loaded, self.path = loaded, path
        if loaded.causal:
            from .data import heldout_tokens

            self.tokens = heldout_tokens(loaded.tokenizer, path)
        else:
            from .data import read_lines

            self.sentences = read_lines(path)

    def _embeddings(self, model: nn.Module) -> torch.Tensor:
        from .evaluate import sentence_embeddings

        # the base model gives last_hidden_state for any head (BertModel, BertForMaskedLM ...);
        # sentences are cut at 128 tokens (evaluate's default) or the model's context if shorter
        length = min(128, _max_positions(model.config) or 128)
        return sentence_embeddings(model.base_model, self.loaded.tokenizer, self.sentences, max_length=length)

    def before(self, model: nn.Module) -> Quality:
        if self.loaded.causal:
            from .evaluate import strided_perplexity

            ppl = strided_perplexity(model, self.tokens)
            return Quality("perplexity", self.path, ppl.value,
                           details={"tokens": ppl.tokens, "window": ppl.window, "stride": ppl.stride})
        self.dense = self._embeddings(model)
        return Quality("embedding_cosine", self.path, 1.0, details={"sentences": len(self.sentences)})

    def after(self, model: nn.Module, quality: Quality) -> Quality:
        if self.loaded.causal:
            from .evaluate import strided_perplexity

            quality.after = strided_perplexity(model, self.tokens, quality.details["window"],
                                               quality.details["stride"]).value
        else:
            quality.after = F.cosine_similarity(self.dense, self._embeddings(model), dim=-1).mean().item()
        return quality


# ------------------------------------------------------------------ counting weights

def weight_counts(tensors: Iterable[tuple[str, torch.Tensor]], layers: Sequence[str]) -> dict[str, Any]:
    """Parameters and non-zeros of `tensors`, and the sparsity of the pruned `layers`' weights."""
    wanted = {f"{name}.weight" for name in layers}
    params = nonzeros = layer_params = layer_zeros = 0
    for name, tensor in tensors:
        count, nonzero = tensor.numel(), int(torch.count_nonzero(tensor))
        params, nonzeros = params + count, nonzeros + nonzero
        if name in wanted:
            layer_params, layer_zeros = layer_params + count, layer_zeros + count - nonzero
    return {"params": params, "nonzeros": nonzeros, "pruned_layer_params": layer_params,
            "pruned_layer_sparsity": layer_zeros / layer_params if layer_params else 0.0}


def _model_tensors(model: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    for name, param in model.named_parameters():   # tied weights once
        yield name, param.detach()


def _folder_tensors(folder: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """Every tensor of the safetensors files in `folder`, one at a time (a streamed model never fits)."""
    from safetensors import safe_open

    for shard in sorted(folder.glob("*.safetensors")):
        with safe_open(str(shard), framework="pt") as handle:
            for name in handle.keys():
                yield name, handle.get_tensor(name)


# ------------------------------------------------------------------ the three ways to prune

@dataclass
class Pruned:
    """What one way of pruning did, for metrics.json."""

    record: dict[str, Any]              # mode-specific: per-layer reports, removed units, dropped layers
    layers: list[str] = field(default_factory=list)   # linears whose weights were zeroed (unstructured)
    plan: Any = None                    # the structured plan, for hf.save_pretrained


def _prune_unstructured(model: nn.Module, windows: list[dict[str, torch.Tensor]],
                        options: CheckpointOptions) -> Pruned:
    plan = prune_llm(model, windows, llm_config(options))
    return Pruned(_llm_record(plan), [layer.name for layer in plan.layers])


def _llm_record(plan: Any) -> dict[str, Any]:
    layers = {r.name: {"sparsity": r.sparsity, "error": None if r.error != r.error else r.error,
                       "seconds": round(r.seconds, 4)} for r in plan.layers}
    return {"engine_seconds": round(plan.seconds, 3), "block_sparsity": list(plan.block_sparsity),
            "block_seconds": [round(s, 3) for s in plan.block_seconds], "layers": layers}


def _block_names(model: nn.Module) -> tuple[str, list[str]]:
    layout = find_block_layout(model)
    return layout.blocks_path, [f"{layout.blocks_path}.{i}" for i in range(len(layout.blocks))]


def _prune_structured(model: nn.Module, windows: list[dict[str, torch.Tensor]],
                      options: CheckpointOptions) -> Pruned:
    """Drop whole layers (block influence), then cut heads and MLP channels inside the remaining blocks."""
    from ..measure import count_macs

    record: dict[str, Any] = {"macs": {"before": count_macs(model, windows[0])[0]}}
    if options.drop_layers:
        record["dropped_layers"] = _drop_layers(model, windows, options.drop_layers)
    plan = None
    if options.ratio is not None or options.target is not None:
        plan = _cut_units(model, windows, options)
        record["units"] = _units_record(plan)
    record["macs"]["after"] = count_macs(model, windows[0])[0]
    return Pruned(record, plan=plan)


def _drop_layers(model: nn.Module, windows: list[dict[str, torch.Tensor]], count: int) -> dict[str, Any]:
    """Delete the `count` blocks that turn their input least (ShortGPT); the config and layer_idx follow."""
    from ..blocks import prune_blocks

    _, names = _block_names(model)
    if count >= len(names):
        raise InvalidArgument(f"drop_layers={count}: the model has {len(names)} layers; at least one must stay")
    plan = prune_blocks(model, windows[0], n=count, candidates=names, data=windows, how="delete")
    return {"removed": plan.removed, "block_influence": plan.scores,
            "num_hidden_layers": len(names) - count}


def _cut_units(model: nn.Module, windows: list[dict[str, torch.Tensor]], options: CheckpointOptions) -> Any:
    """Remove heads / MLP channels of the blocks only: every group touching a tensor outside them is kept."""
    from ..structured import prune_structured

    blocks_path, _ = _block_names(model)
    # the residual stream reaches the embeddings, norms and head: naming them keeps the hidden size
    outside = [n for n, _ in model.named_parameters() if not n.startswith(blocks_path + ".")]
    return prune_structured(model, windows[0], options.ratio, target=options.target, method=options.method,
                            scope="local" if options.target is None else "global", units=options.units,
                            data=windows, ignore=[*outside, *options.ignore], compensate=options.compensate,
                            seed=options.seed)


def _units_record(plan: Any) -> dict[str, Any]:
    removed = {kind: sum(len(g.removed) for g in plan.groups if g.kind == kind) for kind in UNIT_KINDS}
    total = {kind: sum(g.units for g in plan.groups if g.kind == kind) for kind in UNIT_KINDS}
    return {"removed": removed, "of": total, "ratio": plan.ratio, "method": plan.method,
            "compensated_layers": len(plan.compensated)}


PRUNERS: dict[str, Callable[[nn.Module, list[dict[str, torch.Tensor]], CheckpointOptions], Pruned]] = {
    "unstructured": _prune_unstructured, "structured": _prune_structured}


def _max_positions(config: Any) -> int | None:
    value = getattr(config, "max_position_embeddings", None)
    return value if isinstance(value, int) else None


def prune_hf_model(model: nn.Module, tokenizer: Any, calib: str | Path | None, options: CheckpointOptions | None = None,
                   **overrides: Any) -> Pruned:
    """Prune a Hugging Face model already in memory, in place, from a calibration text file; returns what was done.

    The pruning half of `prune_checkpoint` (same options, same result), without loading,
    evaluating or saving.
    """
    options = make_options(options, **overrides)
    if options.stream:
        raise InvalidArgument("stream=True streams a checkpoint from its folder: use prune_checkpoint")
    _check_calib(calib, options)
    windows = calibration(tokenizer, calib, options, _max_positions(model.config))
    return PRUNERS[options.mode](model, windows, options)


# ------------------------------------------------------------------ the front door

class _Clock:
    """Seconds spent in each named stage; reports the stage to `on_stage` as it starts."""

    def __init__(self, on_stage: Stage | None) -> None:
        self.seconds: dict[str, float] = {}
        self.on_stage = on_stage or (lambda message: None)
        self.start = time.perf_counter()

    @contextmanager
    def stage(self, name: str, message: str) -> Iterator[None]:
        self.on_stage(message)
        begin = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = round(self.seconds.get(name, 0.0) + time.perf_counter() - begin, 3)

    def total(self) -> dict[str, float]:
        return {**self.seconds, "total": round(time.perf_counter() - self.start, 3)}


def prune_checkpoint(path: str | Path, out: str | Path, calib: str | Path | None,
                     options: CheckpointOptions | None = None, *, on_stage: Stage | None = None,
                     **overrides: Any) -> dict[str, Any]:
    """Prune the Hugging Face model folder `path` into `out`; returns the metrics (also in out/metrics.json).

    `calib` is a plain text or JSONL file, tokenized with the folder's tokenizer into
    `calib_windows` seeded windows of `seqlen` tokens. Keyword `overrides` set fields
    of `options` (see CheckpointOptions), e.g. `method="sparsegpt", pattern="2:4"` or
    `structured=True, ratio=0.25, compensate=True, drop_layers=1`; `device="cuda"` prunes
    each block there in turn while the model stays on the CPU (or streams, `stream=True`).
    Magnitude needs no calibration: `calib` may be None. Everything runs offline
    (`local_files_only`). `out` gets the pruned model and tokenizer as a `save_pretrained`
    folder, `metrics.json` and `report.md`, all or nothing.
    """
    options = make_options(options, **overrides)
    source, target = _check_folders(path, out, options, calib)
    _check_calib(calib, options)
    if options.eval_file is not None:
        _check_text(options.eval_file, "evaluation")
    clock = _Clock(on_stage)
    if options.stream:
        metrics = _run_stream(source, target, calib, options, clock)
    else:
        metrics = _run_in_memory(source, target, calib, options, clock)
    return metrics


def _run_in_memory(source: Path, target: Path, calib: str | Path | None, options: CheckpointOptions,
                   clock: _Clock) -> dict[str, Any]:
    with clock.stage("load", f"loading {source}"):
        tokenizer = load_tokenizer(source)
        model, causal = load_model(source)
        loaded = Loaded(model, tokenizer, causal)
    if needs_calibration(options):
        with clock.stage("calibration", "tokenizing the calibration text"):
            windows = calibration(tokenizer, calib, options, _max_positions(model.config))
    else:
        windows = []
    evaluation = quality = None
    if options.eval_file is not None:
        with clock.stage("eval", "evaluating the dense model"):
            evaluation = _Evaluation(loaded, str(options.eval_file))
            quality = evaluation.before(model)
    before = weight_counts(_model_tensors(model), [])
    with clock.stage("prune", f"pruning ({options.mode}, {options.method})"):
        pruned = PRUNERS[options.mode](model, windows, options)
    if evaluation is not None:
        with clock.stage("eval", "evaluating the pruned model"):
            evaluation.after(model, quality)
    after = weight_counts(_model_tensors(model), pruned.layers)
    with staged_output(target) as stage:
        with clock.stage("save", f"saving to {target}"):
            saved_as = _save(loaded, stage, pruned, options)
        metrics = _metrics(source, target, calib, options, type(model).__name__, causal, saved_as, before, after,
                           pruned, quality, clock, config_summary(model))
        write_records(stage, metrics)
    return metrics


def _save(loaded: Loaded, stage: Path, pruned: Pruned, options: CheckpointOptions) -> str:
    """Write model and tokenizer into `stage`; returns "transformers" or "secateurs" (how to load it)."""
    if options.structured:
        from ..hf import save_pretrained

        return save_pretrained(loaded.model, stage, pruned.plan, tokenizer=loaded.tokenizer, overwrite=True)
    loaded.model.save_pretrained(stage)
    loaded.tokenizer.save_pretrained(stage)
    return "transformers"


def _run_stream(source: Path, target: Path, calib: str | Path | None, options: CheckpointOptions,
                clock: _Clock) -> dict[str, Any]:
    import transformers

    from .stream import prune_pretrained

    with clock.stage("load", f"reading the config and tokenizer of {source}"):
        tokenizer = load_tokenizer(source)
        config = transformers.AutoConfig.from_pretrained(source, local_files_only=True)
    windows = []
    if needs_calibration(options):
        with clock.stage("calibration", "tokenizing the calibration text"):
            windows = calibration(tokenizer, calib, options, _max_positions(config))
    with staged_output(target) as stage:
        with clock.stage("prune", f"pruning block by block from the shards ({options.method})"):
            # the stage is empty and ours: prune_pretrained writes the model folder into it
            plan = prune_pretrained(source, stage, windows, llm_config(options))
        pruned = Pruned(_llm_record(plan), [layer.name for layer in plan.layers])
        with clock.stage("count", "counting the pruned weights"):
            after = weight_counts(_folder_tensors(stage), pruned.layers)
        before = {"params": after["params"], "nonzeros": None}
        architecture = (config.architectures or [type(config).__name__])[0]
        metrics = _metrics(source, target, calib, options, architecture, None, "transformers", before, after,
                           pruned, None, clock, config_summary_of(config))
        write_records(stage, metrics)
    return metrics


# ------------------------------------------------------------------ metrics

def _metrics(source: Path, target: Path, calib: str | Path | None, options: CheckpointOptions, architecture: str,
             causal: bool | None, saved_as: str, before: dict[str, Any], after: dict[str, Any], pruned: Pruned,
             quality: Quality | None, clock: _Clock, sizes: dict[str, Any]) -> dict[str, Any]:
    layers = pruned.record.get("layers", {})
    return {
        "model": {"path": str(source), "architecture": architecture,
                  "kind": None if causal is None else "causal-lm" if causal else "encoder"},
        "out": str(target),
        "mode": options.mode,
        "saved_as": saved_as,
        "config": {**dataclasses.asdict(options), "calib": None if calib is None else str(calib)},
        "calibrated": needs_calibration(options),
        "params": {"before": before["params"], "after": after["params"]},
        "nonzeros": {"before": before["nonzeros"], "after": after["nonzeros"]},
        "sparsity": {"pruned_layers": after["pruned_layer_sparsity"],
                     "model": 1 - after["nonzeros"] / after["params"] if after["params"] else 0.0,
                     "layers": {name: r["sparsity"] for name, r in layers.items()}},
        "model_config_after": sizes,
        "pruning": pruned.record,
        "eval": dataclasses.asdict(quality) if quality is not None else None,
        "seconds": clock.total(),
        "threads": torch.get_num_threads(),
        "versions": versions("transformers", "tokenizers", "safetensors"),
    }


__all__ = ["CheckpointOptions", "Pruned", "Quality", "make_options", "prune_checkpoint", "prune_hf_model",
           "report_markdown", "weight_counts"]
