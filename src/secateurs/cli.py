"""The command line, thin: parse, call the library, print a table. Errors: one line, exit 2.

Two spellings say which way a fraction runs: `--remove F` is the fraction taken away
(weights with unstructured pruning, each group's channels with --structured) and
`--keep COST=F` the fraction of a cost kept (macs, params, bytes; or a latency_ms
budget). The older `--sparsity` / `--ratio` (removed) and `--target` (kept) still work.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch
from rich.console import Console
from rich.table import Table

from .allocate import NORMALIZERS, SCOPES
from .api import prune, resolve_sparsity
from .batches import LOSSES
from .checkpoint import load, save
from .criteria import get_criterion
from .errors import FileProblem, InvalidArgument, SecateursError
from .inputs import (HF_ONLY, MODEL_ONLY, calibration_batches, check_common, check_structured, check_unstructured,
                     example_for, quality_on, refuse_given, resolve_spellings)
from .io import build_model, check_output_dir, dense_bytes, load_into, load_state, sparse_bytes, staged_output
from .measure import Timing, budget_text, count_parameters, measure
from .progress import Steps, before_after_table, cell
from .structured import BUDGETS, UNIT_KINDS, Budget, parse_target, prune_structured


class _HelpFormatter(argparse.HelpFormatter):
    """One line per option, its default appended where it has one (None and False are no default)."""

    def __init__(self, prog: str) -> None:
        super().__init__(prog, max_help_position=32)

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        no_default = action.default is None or action.default is False or action.default in ([], argparse.SUPPRESS)
        if action.option_strings and "%(default)" not in text and "default" not in text and not no_default:
            default = "%(default)s"
            if isinstance(action.default, list):   # a long list by its ends
                shown = action.default if len(action.default) <= 4 else [*action.default[:2], "...", action.default[-1]]
                default = " ".join(map(str, shown))
            text += f" (default: {default})"
        return text


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage mistake is one line on stderr and exit status 2; help shows defaults."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", _HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> None:  # type: ignore[override]
        sys.stderr.write(f"{self.prog}: error: {message}\n")
        raise SystemExit(2)


def _ratio(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None


def _positive_int(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return int(text)


def _round_to(text: str) -> int | str:
    return text if text == "auto" else _positive_int(text)


def _add_remove_keep(p: argparse.ArgumentParser, remove: str, keep: str) -> None:
    p.add_argument("--remove", type=_ratio, default=None, metavar="F", help=remove)
    p.add_argument("--keep", default=None, metavar="COST=F", help=keep)


def _add_selection(p: argparse.ArgumentParser, method_default: str) -> None:
    p.add_argument("--method", default=None, metavar="NAME",
                   help=f"criterion, e.g. magnitude, taylor, wanda, l2 (default: {method_default})")
    p.add_argument("--sparsity", type=_ratio, default=None, metavar="F", help="same as --remove, unstructured")
    p.add_argument("--pattern", default=None, metavar="N:M", help="N:M sparsity, e.g. 2:4 (keep N of every M inputs)")
    p.add_argument("--scope", choices=SCOPES, default="global", metavar="S",
                   help=f"compare scores per {', '.join(SCOPES)}")
    p.add_argument("--normalize", choices=sorted(NORMALIZERS), default="none", metavar="NORM",
                   help=f"per-layer score normalisation, global scope: {', '.join(sorted(NORMALIZERS))}")
    p.add_argument("--max-ratio", type=_ratio, default=1.0, metavar="F",
                   help="at most this fraction of any one layer is pruned")
    p.add_argument("--min-ratio", type=_ratio, default=0.0, metavar="F",
                   help="at least this fraction of every layer is pruned")
    p.add_argument("--ignore", nargs="*", default=[], metavar="GLOB", help="module or parameter names to leave alone")
    p.add_argument("--seed", type=int, default=0, metavar="N", help="seed of random scores and data order")


def build_parser() -> argparse.ArgumentParser:
    from .examples.demo import (
        DEMO_EPOCHS,
        DEMO_LATENCY_BATCH,
        DEMO_METHOD,
        DEMO_PATTERN,
        DEMO_SPARSITY,
        DEMO_TARGET,
    )

    parser = _Parser(prog="secateurs", description="Prune trained PyTorch models.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    demo = sub.add_parser("demo", help="the digits CNN cut three ways, recovered, measured: a table and a report",
                          description="Train (once, cached) a CNN on digits; remove channels to a MAC budget and, "
                                      "beside it, zero 70% of the weights and apply 2:4; recover each by "
                                      "distillation; time all four; write the model, metrics.json and a report.")
    demo.add_argument("--method", default=DEMO_METHOD, metavar="NAME",
                      help="criterion of all three cuts, e.g. taylor, l2, magnitude")
    _add_remove_keep(demo, "fraction of the weights zeroed in the unstructured model (default: 0.7)",
                     f"the structured model's share of a cost: macs=0.5, params=, bytes= (default: {DEMO_TARGET})")
    demo.add_argument("--sparsity", type=_ratio, default=DEMO_SPARSITY, metavar="F", help="same as --remove")
    demo.add_argument("--pattern", default=DEMO_PATTERN, metavar="N:M", help="the N:M model's pattern")
    demo.add_argument("--target", default=None, metavar="COST=F", help="same as --keep")
    demo.add_argument("--structured", action="store_true", help="only the structured model (quicker)")
    demo.add_argument("--epochs", type=_positive_int, default=DEMO_EPOCHS, metavar="N",
                      help="epochs of distillation for each pruned model")
    demo.add_argument("--finetune-epochs", type=_positive_int, dest="epochs", default=argparse.SUPPRESS,
                      help=argparse.SUPPRESS)   # the old spelling
    demo.add_argument("--latency-batch", type=_positive_int, default=DEMO_LATENCY_BATCH, metavar="N",
                      help="test images per timed forward pass")
    demo.add_argument("--threads", type=_positive_int, default=1, metavar="N", help="CPU threads for latency")
    demo.add_argument("--seed", type=int, default=0, metavar="N", help="seed of the scoring batches and training")
    demo.add_argument("--out", default="runs/demo", metavar="DIR", help="folder for the model, metrics.json, report/")

    p = sub.add_parser("prune", help="prune your own model, or a Hugging Face model folder (--hf)")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", metavar="MODULE:FACTORY", help="e.g. mypkg.models:build (with --weights)")
    source.add_argument("--hf", metavar="PATH", help="a Hugging Face causal LM or encoder folder, loaded offline")
    source.add_argument("--keras", metavar="FILE", help="a Keras 3 model file (.keras), on the current Keras backend")
    p.add_argument("--weights", default=None, metavar="FILE", help="with --model: .safetensors, or torch plain tensors")
    p.add_argument("--trust-pickle", action="store_true", help="allow unpickling a torch weights file you trust")
    _add_remove_keep(p, "fraction removed: of the weights, or with --structured of each group's channels",
                     "with --structured: share of a cost kept, e.g. macs=0.5, bytes=0.5; or latency_ms=5")
    _add_selection(p, "magnitude; l2 with --structured")
    p.add_argument("--calib", default=None, metavar="FILE",
                   help="'inputs' (+ 'targets': accuracy/loss measured); --hf: text or JSONL")
    p.add_argument("--batch-size", type=_positive_int, default=32, metavar="N", help="calibration samples per batch")
    p.add_argument("--max-batches", type=_positive_int, default=None, metavar="N",
                   help="score on at most N calibration batches (default: all)")
    p.add_argument("--loss", choices=sorted(LOSSES), default="cross_entropy", metavar="LOSS",
                   help=f"loss of gradient criteria and evaluation: {', '.join(sorted(LOSSES))}")
    p.add_argument("--include", nargs="*", default=None, metavar="GLOB", help="prune only these modules")
    p.add_argument("--types", nargs="*", default=None, metavar="TYPE", help="layer types to prune, e.g. linear conv2d")
    p.add_argument("--prune-last", action="store_true", help="also prune the final classifier layer")
    p.add_argument("--skip-incompatible", action="store_true", help="with --pattern, skip layers it does not divide")
    p.add_argument("--structured", action="store_true", help="remove whole channels / heads instead of masking")
    p.add_argument("--ratio", type=_ratio, default=None, metavar="F", help="same as --remove, with --structured")
    p.add_argument("--target", default=None, metavar="COST=F", help="same as --keep")
    p.add_argument("--round-to", type=_round_to, default="auto", metavar="N|auto",
                   help="--structured: kept widths a multiple of N; auto: by device and dtype")
    p.add_argument("--input-shape", default=None, metavar="SHAPE",
                   help="example input, e.g. 1,3,224,224 (default: first calib input)")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder (created; never an input)")
    p.add_argument("--overwrite", action="store_true", help="replace files in a non-empty output folder")
    p.add_argument("--threads", type=_positive_int, default=None, metavar="N",
                   help="latency threads (default 1); --hf: of the whole run (default: torch's)")
    _add_hf_options(p)

    a = sub.add_parser("analyze", help="show every group of coupled channels and what blocks it")
    a.add_argument("--model", required=True, metavar="MODULE:FACTORY", help="e.g. mypkg.models:build")
    a.add_argument("--weights", default=None, metavar="FILE", help="optional weights (shapes come from the factory)")
    a.add_argument("--trust-pickle", action="store_true", help="allow unpickling a torch weights file you trust")
    a.add_argument("--input-shape", required=True, metavar="SHAPE", help="example input shape, e.g. 1,3,224,224")
    a.add_argument("--input-dtype", choices=("float", "long"), default="float", help="long for token ids")

    r = sub.add_parser("run", help="run a YAML recipe: prune, recover, quantize, evaluate, save")
    r.add_argument("recipe", help="recipe file (see examples/recipe.yaml)")
    r.add_argument("--out", required=True, metavar="DIR", help="run folder (created; never an input)")
    r.add_argument("--resume", action="store_true", help="continue after the last finished stage of --out")

    rep = sub.add_parser("report", help="turn output folders into report.html, report.md and report.json")
    rep.add_argument("runs", nargs="+", metavar="DIR",
                     help="folders with a metrics.json: from `run`, `prune` or `demo`")
    rep.add_argument("--out", required=True, metavar="DIR", help="report folder (created; never an input)")
    rep.add_argument("--overwrite", action="store_true", help="replace files in a non-empty report folder")
    _add_sensitivity(sub)

    e = sub.add_parser("export", help="write a pruned model folder as ONNX, checked against torch with onnxruntime")
    e.add_argument("folder", help="what `prune` or a recipe's save stage wrote (weights + plan.json); with --hf, "
                                  "what `prune --hf` or save_pretrained wrote")
    source = e.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", metavar="MODULE:FACTORY", help="the factory of the original model")
    source.add_argument("--hf", action="store_true", help="the folder is a Hugging Face model folder")
    e.add_argument("--input-shape", default=None, metavar="SHAPE", help="example input, e.g. 1,3,224,224 (with --model)")
    e.add_argument("--seqlen", type=_positive_int, default=16, metavar="L", help="--hf: tokens in the example input")
    e.add_argument("--input-dtype", choices=("float", "long"), default="float", help="long for token ids")
    e.add_argument("--out", required=True, metavar="FILE", help="the .onnx file to write (never inside the input folder)")
    e.add_argument("--static-batch", action="store_true", help="fix the batch size to the example's")
    e.add_argument("--opset", type=int, default=None, metavar="N", help="ONNX opset (default: the exporter's)")
    e.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    return parser


def _add_hf_options(p: argparse.ArgumentParser) -> None:
    """The options of `prune --hf` (see docs/llm.md); all default to None / False so a stray one is caught."""
    hf = p.add_argument_group("Hugging Face models (--hf)")
    hf.add_argument("--calib-windows", type=int, default=None, metavar="N", help="calibration windows (default 128)")
    hf.add_argument("--seqlen", type=int, default=None, metavar="L", help="tokens per calibration window (default 512)")
    hf.add_argument("--owl", type=_ratio, default=None, metavar="LAMBDA", help="outlier-weighted block sparsities (OWL)")
    hf.add_argument("--eval", default=None, metavar="FILE", help="held-out text: perplexity, or cosine (encoders)")
    hf.add_argument("--stream", action="store_true", help="stream weights from the shards, one block at a time")
    hf.add_argument("--units", nargs="+", choices=UNIT_KINDS, default=None, metavar="UNIT",
                    help=f"structured: what to remove, of {', '.join(UNIT_KINDS)}")
    hf.add_argument("--device", default=None, metavar="DEV",
                    help="prune each block on this device (cuda, cuda:1, cpu); the model stays on the CPU")
    hf.add_argument("--offload-inputs", action="store_true",
                    help="with --device: calibration activations stay on the CPU, one window moved at a time")
    hf.add_argument("--true-sequential", action="store_true",
                    help="re-collect statistics after each group of a block's linears (slower)")
    hf.add_argument("--measure-error", action="store_true",
                    help="report each linear's reconstruction error ||WX - W'X||^2 (one more pass per block)")
    hf.add_argument("--refine", default=None, metavar="NAME",
                    help="dsnot: after --method, swap pruned and kept weights to lower each row's error")
    hf.add_argument("--permute", action="store_true",
                    help="with --pattern: permute input channels (and their producers) before N:M pruning")
    hf.add_argument("--compensate", action="store_true", help="structured: fold removed inputs' means into biases")
    hf.add_argument("--drop-layers", type=int, default=None, metavar="K", help="structured: drop K whole layers")


def run_demo(args: argparse.Namespace, console: Console) -> int:
    from .examples.demo import DEMO_TARGET, demo

    resolve_spellings(args)
    get_criterion(args.method)
    resolve_sparsity(args.sparsity, None)
    resolve_sparsity(None, args.pattern)
    parse_target(args.target or DEMO_TARGET)
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise FileProblem(f"output path {out} exists and is not a directory")
    steps = Steps(console)
    result = demo(target=_at_threads(args.target or DEMO_TARGET, args.threads), sparsity=args.sparsity,
                  pattern=args.pattern, method=args.method, epochs=args.epochs, threads=args.threads, latency_batch=args.latency_batch,
                  seed=args.seed, only_structured=args.structured, step=steps)
    with steps("writing the structured model, metrics.json and the report"):
        page = result.write(out)
    console.print(result.table())
    for line in result.notes(args.method):
        console.print(line, highlight=False, soft_wrap=True)
    for what, where in (("model", f"{out / 'model.safetensors'} (+ plan.json; secateurs.load(DigitsCNN(), "
                                  f"'{out}') rebuilds it)"),
                        ("metrics", out / "metrics.json"), ("report", page)):
        console.print(f"{what + ':':<9}{where}", highlight=False, soft_wrap=True)
    console.print("your model: secateurs prune --model pkg.module:build --weights model.safetensors --structured "
                  "--keep macs=0.25 --input-shape 1,3,224,224 --out smaller/", highlight=False, soft_wrap=True)
    return 0


def _example(model: torch.nn.Module, shape: str, console: Console, dtype: str = "float") -> torch.Tensor:
    """`--input-shape`'s example, checked on the model; a note when a batch of 1 had to be put in front."""
    example, note = example_for(model, shape, dtype)
    if note:
        console.print(f"note: {note}", highlight=False, soft_wrap=True)
    return example


def _at_threads(target: str | None, threads: int) -> str | None:
    """A latency target without a thread count of its own is timed at --threads, as the measurements are."""
    if target is None:
        return None
    budget = parse_target(target)
    if not BUDGETS[budget.key].absolute or budget.threads is not None:
        return target
    return str(Budget(budget.key, budget.value, threads))


def run_prune(args: argparse.Namespace, console: Console) -> int:
    resolve_spellings(args)
    if args.hf is not None:
        return run_prune_hf(args, console)
    if args.keras is not None:   # secateurs.keras.cli: the same options and outputs for Keras 3 models
        from .keras.cli import run_prune_keras
        return run_prune_keras(args, console)
    refuse_given(args, HF_ONLY, "--model (it is for --hf)")
    args.threads = args.threads or 1
    if args.weights is None:
        raise InvalidArgument("--model needs --weights (a .safetensors file or a torch file of plain tensors)")
    if args.structured:
        check_structured(args)
        args.method = args.method or "l2"
    else:
        check_unstructured(args)
        args.method = args.method or "magnitude"
        check_common(args)
    inputs = [args.weights] + ([args.calib] if args.calib else [])
    check_output_dir(args.out, inputs, overwrite=args.overwrite)
    model = build_model(args.model)
    load_into(model, load_state(args.weights, trust_pickle=args.trust_pickle), source=f"weights {args.weights}")
    model.eval()
    data = calibration_batches(args.calib, args.batch_size, args.trust_pickle)
    example = _example(model, args.input_shape, console) if args.input_shape else None
    if example is None and data:
        first = data[0][0] if isinstance(data[0], tuple) else data[0]
        example = first[:1]
    if args.structured and example is None:
        raise InvalidArgument("--structured needs an example input: pass --input-shape or --calib")

    def measured(m: torch.nn.Module) -> dict[str, Any]:
        costs = measure(m, example, threads=args.threads).to_dict() if example is not None else _static_costs(m)
        return {**costs, **quality_on(m, data, args.loss)}

    try:
        before = measured(model)
    except RuntimeError as exc:
        raise InvalidArgument(f"the model does not run on the calibration inputs: {str(exc).splitlines()[0]}") from None
    from .run import layer_table

    dense_layers = layer_table(model)
    if args.structured:
        with Steps(console)(f"removing channels ({args.method})"):
            plan = prune_structured(model, example, args.ratio, target=_at_threads(args.target, args.threads),
                                    method=args.method, data=data, round_to=args.round_to,
                                    loss_fn=LOSSES[args.loss], ignore=args.ignore, seed=args.seed)
        return _finish_prune(args, console, model, plan, before, measured(model),
                             f"{args.model}, structured {plan.method}: MACs {plan.macs_after / plan.macs_before:.1%} "
                             "of before", dense_layers, data)
    with Steps(console)(f"scoring and masking with {args.method}", len(data or [])) as update:
        scored = data
        if data is not None:
            scored = _counting(data, update)
        plan = prune(model, args.method, args.sparsity, pattern=args.pattern, scope=args.scope, data=scored,
                     loss_fn=LOSSES[args.loss], max_batches=args.max_batches, types=args.types,
                     include=args.include, ignore=args.ignore, prune_last=args.prune_last,
                     min_ratio=args.min_ratio, max_ratio=args.max_ratio, normalize=args.normalize,
                     skip_incompatible=args.skip_incompatible, seed=args.seed)
    return _finish_prune(args, console, model, plan, before, measured(model),
                         f"{args.model}, {plan.method}, {plan.achieved:.1%} of selected weights removed",
                         dense_layers, data)


def _counting(batches: list[Any], update: Callable[[int, int], None]) -> Iterator[Any]:
    """`batches`, calling update(done, total) as each is taken."""
    for i, batch in enumerate(batches):
        yield batch
        update(i + 1, len(batches))


def _finish_prune(args: argparse.Namespace, console: Console, model: torch.nn.Module, plan: Any,
                  before: dict[str, Any], after: dict[str, Any], title: str, dense_layers: list[dict[str, Any]],
                  data: list[Any] | None) -> int:
    from .run import layer_table

    metrics = {"before": before, "after": after, "plan": plan.to_dict(),
               "layers": {"before": dense_layers, "after": layer_table(model)}}
    if "loss" in before:
        samples = sum(len(targets) for _, targets in data)
        metrics["evaluated_on"] = f"the calibration data ({samples} samples, not held out)"
    with staged_output(args.out) as stage:
        save(model, stage, plan)
        (stage / "metrics.json").write_text(json.dumps(metrics, indent=2))
    console.print(before_after_table(title, before, after))
    if "evaluated_on" in metrics:
        console.print(f"accuracy and loss: on {metrics['evaluated_on']}", highlight=False)
    if getattr(plan, "budget", None):
        console.print(budget_text(plan.budget, after, before), highlight=False, soft_wrap=True)
    console.print(f"wrote the pruned model, plan.json and metrics.json to {args.out}/ "
                  f"(`secateurs report {args.out} --out REPORT_DIR` plots them)", highlight=False, soft_wrap=True)
    return 0


def run_prune_hf(args: argparse.Namespace, console: Console) -> int:
    """`prune --hf`: the whole run is `llm.pipeline.prune_checkpoint`; this prints its metrics."""
    refuse_given(args, MODEL_ONLY, "--hf (it is for --model)")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before transformers is imported: nothing may download
    import transformers

    from .llm.pipeline import prune_checkpoint
    from .llm.records import metrics_table

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    given = {"method": args.method, "sparsity": args.sparsity, "pattern": args.pattern, "seed": args.seed,
             "calib_windows": args.calib_windows, "seqlen": args.seqlen, "owl": args.owl, "eval_file": args.eval,
             "stream": args.stream, "structured": args.structured, "ratio": args.ratio, "target": args.target,
             "units": args.units, "compensate": args.compensate, "drop_layers": args.drop_layers,
             "device": args.device, "offload_inputs": args.offload_inputs, "true_sequential": args.true_sequential,
             "measure_error": args.measure_error, "refine": args.refine, "permute": args.permute,
             "ignore": args.ignore, "overwrite": args.overwrite}
    with contextlib.ExitStack() as stack:
        # a live status line in a terminal; in a log, a line per stage
        on_stage = (stack.enter_context(console.status("pruning")).update if console.is_terminal
                    else lambda text: console.print(text, markup=False, highlight=False))
        metrics = prune_checkpoint(args.hf, args.out, args.calib, on_stage=on_stage,
                                   **{k: v for k, v in given.items() if v is not None})
    console.print(metrics_table(metrics))
    how = ("plain transformers loads it" if metrics["saved_as"] == "transformers"
           else "secateurs.hf.load_pretrained loads it")
    console.print(f"wrote the pruned model, tokenizer, metrics.json and report.md to {args.out}/ ({how})")
    return 0


def run_analyze(args: argparse.Namespace, console: Console) -> int:
    from .graph.groups import analyze, is_channel_axis

    model = build_model(args.model)
    if args.weights:
        load_into(model, load_state(args.weights, trust_pickle=args.trust_pickle), source=f"weights {args.weights}")
    example = _example(model.eval(), args.input_shape, console, args.input_dtype)
    try:
        analysis = analyze(model, example)
    except RuntimeError as exc:
        raise InvalidArgument(f"the model does not run on an input of shape {args.input_shape}: {str(exc).splitlines()[0]}") from None
    shown = [g for g in analysis.groups if is_channel_axis(g)]
    table = Table(title=f"{args.model}: {len(shown)} groups of coupled channels")
    for column in ("group", "kind", "units", "prunable", "members", "blocked by"):
        table.add_column(column)
    for g in shown:
        table.add_row(str(g.index), g.kind, str(g.size), str(len(g.prunable_units)), g.members_text(), g.reason or "")
    console.print(table)
    if len(shown) < len(analysis.groups):
        console.print(f"({len(analysis.groups) - len(shown)} kernel / table-row axes hidden: they are not channels)")
    if analysis.unknown_ops:
        console.print(f"ops without a rule (their channels are left intact): {', '.join(sorted(set(analysis.unknown_ops)))}")
    return 0


def _static_costs(model: torch.nn.Module) -> dict[str, Any]:
    """Costs that need no input: parameters, non-zeros and bytes."""
    params, nonzeros = count_parameters(model)
    return {"params": params, "nonzeros": nonzeros, "size_bytes": sparse_bytes(model), "dense_size_bytes": dense_bytes(model)}


def run_run(args: argparse.Namespace, console: Console) -> int:
    from .recover.distributed import torchrun_group

    with torchrun_group() as rank:   # under torchrun every rank runs the recipe; rank 0 writes and prints
        console.quiet = rank != 0
        return _run_recipe(args, console)


def _run_recipe(args: argparse.Namespace, console: Console) -> int:
    from .run import run_recipe

    def finished(index: int, name: str, record: dict[str, Any]) -> None:
        m = record["measurement"]
        console.print(f"stage {index} {name}: accuracy {cell('accuracy', m.get('accuracy'))}, MACs {m['macs']:,}, "
                      f"{m['size_bytes']:,} bytes, {Timing.of(m)} ({record['seconds']:.1f} s)", highlight=False)

    result = run_recipe(args.recipe, args.out, resume=args.resume, on_stage=finished)
    if args.resume:
        console.print(f"resumed {args.out}: {len(result.ran)} stage(s) run, {result.resumed_from} already done")
    dense, final = result.metrics["dense"]["measurement"], result.metrics["final"]
    console.print(before_after_table(f"{args.recipe}: dense vs after the last stage ({final['stage']})", dense, final))
    console.print(f"wrote config.yaml, run.json, metrics.json and checkpoints to {args.out}/")
    return 0


def run_report(args: argparse.Namespace, console: Console) -> int:
    from .report import build_report

    page = build_report(args.runs, args.out, overwrite=args.overwrite)
    console.print(f"wrote {page}, report.md, report.json and plots/ for {len(args.runs)} folder(s)",
                  highlight=False, soft_wrap=True)
    return 0


def _add_sensitivity(sub: Any) -> None:
    from .sensitivity import DEFAULT_RATIOS, METRICS, MODES

    s = sub.add_parser("sensitivity", help="per group, the metric against the pruning ratio: table, plot, cache")
    s.add_argument("--model", required=True, metavar="MODULE:FACTORY", help="e.g. mypkg.models:build")
    s.add_argument("--weights", required=True, metavar="FILE", help=".safetensors, or a torch file of plain tensors")
    s.add_argument("--trust-pickle", action="store_true", help="allow unpickling a torch weights file you trust")
    s.add_argument("--calib", required=True, metavar="FILE",
                   help="tensors 'inputs' and 'targets' the metric is measured on")
    s.add_argument("--metric", choices=sorted(METRICS), default="loss", help="mean loss (lower is better) or accuracy")
    s.add_argument("--loss", choices=sorted(LOSSES), default="cross_entropy", metavar="LOSS",
                   help=f"the loss: {', '.join(sorted(LOSSES))}")
    s.add_argument("--ratios", type=_ratio, nargs="+", default=list(DEFAULT_RATIOS), metavar="F",
                   help="fractions of each group's units removed, in (0, 1)")
    s.add_argument("--method", default="l2", metavar="NAME", help="criterion ranking the units")
    s.add_argument("--mode", choices=sorted(MODES), default="zero", help="zero units in place (fast) or cut a copy")
    s.add_argument("--batch-size", type=_positive_int, default=64, metavar="N", help="calibration samples per batch")
    s.add_argument("--max-batches", type=_positive_int, default=None, metavar="N",
                   help="measure on at most N batches (default: all)")
    s.add_argument("--input-shape", default=None, metavar="SHAPE", help="example input (default: first calib input)")
    s.add_argument("--ignore", nargs="*", default=[], metavar="GLOB", help="module or parameter names to leave alone")
    s.add_argument("--out", required=True, metavar="DIR", help="folder for sensitivity.json/.png/.svg and the cache")
    s.add_argument("--overwrite", action="store_true", help="write into a non-empty folder that holds other files")


def run_sensitivity(args: argparse.Namespace, console: Console) -> int:
    from .sensitivity import METRICS, data_digest, save_plot, sensitivity

    inputs = [args.weights, args.calib]
    # a folder this command wrote before is reused: its cache makes the second call instant
    out = check_output_dir(args.out, inputs, overwrite=args.overwrite or (Path(args.out) / "sensitivity.json").is_file())
    model = build_model(args.model)
    load_into(model, load_state(args.weights, trust_pickle=args.trust_pickle), source=f"weights {args.weights}")
    data = (calibration_batches(args.calib, args.batch_size, args.trust_pickle) or [])[: args.max_batches]
    if not data or not isinstance(data[0], tuple):
        raise FileProblem(f"calibration file {args.calib} needs 'inputs' and 'targets': the metric compares with labels")
    model.eval()
    example = data[0][0][:1] if args.input_shape is None else _example(model, args.input_shape, console)
    evaluate, higher_is_better = METRICS[args.metric]
    name = f"{args.loss} loss" if args.metric == "loss" else args.metric
    with Steps(console)(f"sensitivity ({args.method}, {args.mode}): one point per group and ratio") as update:
        curves = sensitivity(model, example, evaluate(data, LOSSES[args.loss]), args.ratios, method=args.method,
                             ignore=args.ignore, data=data, loss_fn=LOSSES[args.loss], higher_is_better=higher_is_better,
                             metric_name=name, mode=args.mode, cache_dir=out / "cache",
                             data_key=f"{args.metric}:{args.loss}:{data_digest(data)}", on_point=update)
    with staged_output(out) as stage:
        (stage / "sensitivity.json").write_text(json.dumps(curves.to_dict(), indent=1))
        for suffix in ("png", "svg"):
            save_plot(curves, stage / f"sensitivity.{suffix}", f"{args.model}: sensitivity ({curves.method})")
    console.print(_sensitivity_table(curves, f"{args.model}: {name} with one group pruned", args.metric == "accuracy"))
    how = "read from the cache" if curves.cached else f"measured in {curves.seconds:.1f} s"
    console.print(f"{how}; wrote sensitivity.json, sensitivity.png and sensitivity.svg to {args.out}/", highlight=False)
    return 0


def _sensitivity_table(curves: Any, title: str, percent: bool) -> Table:
    """Groups by ratios, every number with the same decimals so the columns line up."""
    values = [curves.baseline] + [m for c in curves.curves for m in c.metric]
    if percent:
        cell = lambda v: f"{100 * v:.2f}"  # noqa: E731
    else:   # enough decimals to tell the smallest values apart, the same for all
        scale = max((abs(v) for v in values if v == v and abs(v) != float("inf")), default=1.0)
        decimals = max(0, min(6, 3 - len(str(int(scale)))))
        cell = lambda v: f"{v:.{decimals + 1}f}"  # noqa: E731
    table = Table(title=f"{title} (dense: {cell(curves.baseline)}{'%' if percent else ''})")
    for column in ["group", "kind", "units"] + [f"{r:.0%} removed" for r in curves.ratios]:
        table.add_column(column, justify="left" if column == "group" else "right")
    for c in curves.curves:
        table.add_row(c.label, c.kind, str(c.units), *(cell(m) for m in c.metric))
    return table


def run_export(args: argparse.Namespace, console: Console) -> int:
    from .export import export_onnx

    folder, out = Path(args.folder), Path(args.out)
    if not folder.is_dir():
        raise FileProblem(f"model folder {args.folder} does not exist or is not a folder")
    if folder.resolve() in out.resolve().parents:
        raise FileProblem(f"--out {args.out} is inside the input folder {args.folder}: write it elsewhere")
    if args.hf:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")   # nothing may download
        from .hf import load_pretrained

        if args.input_shape is not None:
            raise InvalidArgument("--input-shape is for --model; with --hf the example is --seqlen token ids")
        model = load_pretrained(folder).eval()
        vocab = getattr(model.config, "vocab_size", 2)
        example = {"input_ids": torch.randint(0, vocab, (1, args.seqlen), generator=torch.Generator().manual_seed(0))}
    else:
        if args.input_shape is None:
            raise InvalidArgument("export --model needs --input-shape (e.g. 1,3,224,224)")
        model = load(build_model(args.model), folder).eval()
        example = _example(model, args.input_shape, console, args.input_dtype)
    with console.status("exporting to ONNX and checking it with onnxruntime"):
        report = export_onnx(model, example, out, dynamic_batch=not args.static_batch, opset=args.opset,
                             overwrite=args.overwrite)
    batch = "dynamic batch" if report.dynamic_batch else "static batch"
    console.print(f"wrote {report.path} ({report.bytes:,} bytes, opset {report.opset}, {batch}); onnxruntime "
                  f"matches torch to {report.max_abs_diff:.2g} at batch sizes {report.batches_checked}")
    return 0


COMMANDS = {"demo": run_demo, "prune": run_prune, "analyze": run_analyze, "run": run_run, "report": run_report,
            "sensitivity": run_sensitivity, "export": run_export}


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # piped output (logs, CI) gets wide tables instead of rich's 80-column default
    console = Console(width=None if sys.stdout.isatty() else 160)
    try:
        return COMMANDS[args.command](args, console)
    except SecateursError as exc:
        sys.stderr.write(f"secateurs: error: {exc}\n")
        return 2


if __name__ == "__main__":
    sys.exit(main())
