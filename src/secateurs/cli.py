"""The command line, thin: parse, call the library, print a table. Errors: one line, exit 2."""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from .allocate import NORMALIZERS, SCOPES
from .api import prune, resolve_sparsity
from .criteria import CRITERIA, get_criterion
from .batches import LOSSES
from .errors import FileProblem, InvalidArgument, SecateursError
from .io import (build_model, check_output_dir, dense_bytes, load, load_into, load_state, save, sparse_bytes,
                 staged_output)
from .measure import count_parameters, measure
from .structured import BUDGETS, UNIT_KINDS, Target, parse_target, prune_structured

ROWS = ("accuracy", "params", "nonzeros", "macs", "nonzero_macs", "size_bytes", "dense_size_bytes", "latency_ms")


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage mistake is one line on stderr and exit status 2."""

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


def _add_selection(p: argparse.ArgumentParser) -> None:
    p.add_argument("--method", default=None, help=f"criterion: {', '.join(sorted(CRITERIA))}")
    p.add_argument("--sparsity", type=_ratio, default=None, help="fraction of selected weights set to zero, in [0, 1)")
    p.add_argument("--pattern", default=None, help="N:M pattern, e.g. 2:4 (keep N of every M inputs)")
    p.add_argument("--scope", choices=SCOPES, default="global", help="compare scores per layer, globally, or per row")
    p.add_argument("--normalize", choices=sorted(NORMALIZERS), default="none", help="per-layer score normalisation (global scope)")
    p.add_argument("--max-ratio", type=_ratio, default=1.0, help="at most this fraction of any one layer is pruned")
    p.add_argument("--min-ratio", type=_ratio, default=0.0, help="at least this fraction of every layer is pruned")
    p.add_argument("--ignore", nargs="*", default=[], metavar="GLOB", help="module or parameter names to leave alone")
    p.add_argument("--seed", type=int, default=0)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="secateurs", description="Prune trained PyTorch models.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    demo = sub.add_parser("demo", help="train a CNN on digits, prune it, fine-tune, compare")
    _add_selection(demo)
    demo.add_argument("--structured", action="store_true", help="remove whole channels (default target macs=0.5)")
    demo.add_argument("--target", default=None, help="structured budget: macs=0.5, params=0.3, bytes=0.5 (fractions) or latency_ms=5 (at --threads)")
    demo.add_argument("--out", default="runs/demo", help="directory for metrics.json and the pruned model")
    demo.add_argument("--finetune-epochs", type=int, default=3)
    demo.add_argument("--threads", type=_positive_int, default=1, help="CPU threads for latency measurement")

    p = sub.add_parser("prune", help="prune your own model, or a Hugging Face model folder (--hf)")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", metavar="MODULE:FACTORY", help="e.g. mypkg.models:build (with --weights)")
    source.add_argument("--hf", metavar="PATH", help="a Hugging Face causal LM or encoder folder, loaded offline")
    source.add_argument("--keras", metavar="FILE", help="a Keras 3 model file (.keras), on the current Keras backend")
    p.add_argument("--weights", default=None, help="with --model: .safetensors, or a torch file of plain tensors")
    p.add_argument("--trust-pickle", action="store_true", help="allow unpickling a torch weights file (only files you trust)")
    _add_selection(p)
    p.add_argument("--calib", default=None, help="calibration: with --model a .safetensors or .pt file with 'inputs' "
                   "(and 'targets'); with --hf a plain text or JSONL file")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-batches", type=int, default=None)
    p.add_argument("--loss", choices=sorted(LOSSES), default="cross_entropy")
    p.add_argument("--include", nargs="*", default=None, metavar="GLOB", help="prune only these modules")
    p.add_argument("--types", nargs="*", default=None, help="layer types to prune, e.g. linear conv2d")
    p.add_argument("--prune-last", action="store_true", help="also prune the final classifier layer")
    p.add_argument("--skip-incompatible", action="store_true", help="with --pattern, skip layers whose width does not divide")
    p.add_argument("--structured", action="store_true", help="remove whole channels / heads instead of masking weights")
    p.add_argument("--ratio", type=_ratio, default=None, help="structured: fraction of each group's channels removed")
    p.add_argument("--target", default=None, help="structured budget: macs=0.5, params=0.3, bytes=0.5 (fractions) or latency_ms=5 (at --threads)")
    p.add_argument("--input-shape", default=None, help="example input shape, e.g. 1,3,224,224 (else the first calib input)")
    p.add_argument("--out", required=True, help="output directory (created; never an input)")
    p.add_argument("--overwrite", action="store_true", help="replace files in a non-empty output directory")
    p.add_argument("--threads", type=_positive_int, default=None,
                   help="CPU threads of the latency measurement (default 1); with --hf, of the whole run "
                        "(default: torch's own count)")
    _add_hf_options(p)

    a = sub.add_parser("analyze", help="show every group of coupled channels and what blocks it")
    a.add_argument("--model", required=True, metavar="MODULE:FACTORY")
    a.add_argument("--weights", default=None, help="optional weights (shapes come from the factory)")
    a.add_argument("--trust-pickle", action="store_true")
    a.add_argument("--input-shape", required=True, help="example input shape, e.g. 1,3,224,224")
    a.add_argument("--input-dtype", choices=("float", "long"), default="float", help="long for token ids")

    r = sub.add_parser("run", help="run a YAML recipe: prune, recover, quantize, evaluate, save")
    r.add_argument("recipe", help="recipe file (see examples/recipe.yaml)")
    r.add_argument("--out", required=True, help="run directory (created; never an input)")
    r.add_argument("--resume", action="store_true", help="continue after the last finished stage of --out")

    rep = sub.add_parser("report", help="turn run directories into report.html, report.md and report.json")
    rep.add_argument("runs", nargs="+", metavar="RUN_DIR")
    rep.add_argument("--out", required=True, help="report directory (created; never a run directory)")
    rep.add_argument("--overwrite", action="store_true", help="replace files in a non-empty report directory")
    _add_sensitivity(sub)

    e = sub.add_parser("export", help="write a pruned model folder as ONNX, checked against torch with onnxruntime")
    e.add_argument("folder", help="what `secateurs prune` or a recipe's save stage wrote (weights + plan.json); "
                                  "with --hf, what `prune --hf` or save_pretrained wrote")
    source = e.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", metavar="MODULE:FACTORY", help="the factory of the original model")
    source.add_argument("--hf", action="store_true", help="the folder is a Hugging Face model folder")
    e.add_argument("--input-shape", default=None, help="example input shape, e.g. 1,3,224,224 (needed with --model)")
    e.add_argument("--seqlen", type=_positive_int, default=16, help="--hf: tokens in the example input (default 16)")
    e.add_argument("--input-dtype", choices=("float", "long"), default="float", help="long for token ids")
    e.add_argument("--out", required=True, help="the .onnx file to write (never inside the input folder)")
    e.add_argument("--static-batch", action="store_true", help="fix the batch size to the example's")
    e.add_argument("--opset", type=int, default=None, help="ONNX opset (default: the exporter's)")
    e.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    return parser


def _add_hf_options(p: argparse.ArgumentParser) -> None:
    """The options of `prune --hf` (see docs/llm.md); all default to None / False so a stray one is caught."""
    hf = p.add_argument_group("Hugging Face models (--hf)")
    hf.add_argument("--calib-windows", type=int, default=None, metavar="N", help="calibration windows (default 128)")
    hf.add_argument("--seqlen", type=int, default=None, metavar="L", help="tokens per calibration window (default 512)")
    hf.add_argument("--owl", type=_ratio, default=None, metavar="LAMBDA", help="outlier-weighted block sparsities (OWL)")
    hf.add_argument("--eval", default=None, metavar="FILE", help="held-out text: perplexity (causal LM) or "
                    "embedding cosine to the dense model (encoder), before and after")
    hf.add_argument("--stream", action="store_true", help="stream weights from the safetensors shards, one block at a time")
    hf.add_argument("--units", nargs="+", choices=UNIT_KINDS, default=None, help="structured: what to remove")
    hf.add_argument("--compensate", action="store_true", help="structured: fold removed inputs' means into biases")
    hf.add_argument("--drop-layers", type=int, default=None, metavar="K", help="structured: drop K whole layers")


# argparse dests of the options that belong to one source only
_HF_ONLY = ("calib_windows", "seqlen", "owl", "eval", "stream", "units", "compensate", "drop_layers")
_MODEL_ONLY = ("weights", "trust_pickle", "input_shape", "types", "include", "prune_last", "skip_incompatible",
               "max_batches")


def _refuse_given(args: argparse.Namespace, names: Sequence[str], source: str) -> None:
    given = [n for n in names if getattr(args, n) not in (None, False)]
    if given:
        raise InvalidArgument(f"--{given[0].replace('_', '-')} does not apply with {source}")


def _check_common(args: argparse.Namespace) -> None:
    get_criterion(args.method or "magnitude")
    resolve_sparsity(args.sparsity, args.pattern)


def _table(title: str, before: dict[str, Any], after: dict[str, Any]) -> Table:
    table = Table(title=title)
    for column in ("", "before", "after", "after / before"):
        table.add_column(column, justify="right" if column else "left")
    for key in ROWS:
        b, a = before.get(key), after.get(key)
        if b is None or a is None:
            continue
        fmt = (lambda v: f"{v:.2%}") if key == "accuracy" else (lambda v: f"{v:.3f}" if isinstance(v, float) else f"{v:,}")
        table.add_row(key, fmt(b), fmt(a), f"{a / b:.3f}" if b else "-")
    return table


def run_demo(args: argparse.Namespace, console: Console) -> int:
    from .examples.digits import accuracy, dense_model, load_digits
    from .recover.finetune import finetune

    args.method = args.method or "taylor"
    if args.sparsity is None and args.pattern is None:
        args.sparsity = 0.7
    _check_common(args)
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise FileProblem(f"output path {out} exists and is not a directory")
    torch.manual_seed(args.seed)
    with Progress(console=console, transient=True) as progress:
        task = progress.add_task("training the dense CNN on digits (cached after the first run)", total=None)
        data = load_digits()
        model = dense_model(data, on_epoch=lambda done, total: progress.update(task, completed=done, total=total))
    example = data.test_x[:1]
    evaluate = lambda m: accuracy(m, data)  # noqa: E731
    before = measure(model, example, threads=args.threads, evaluate=evaluate)
    with console.status(f"pruning with {args.method}"):
        if args.structured:
            plan = prune_structured(model, example, target=_at_threads(args.target or "macs=0.5", args.threads),
                                    method=args.method,
                                    data=data.train_batches()[:8], loss_fn=F.cross_entropy, ignore=args.ignore,
                                    seed=args.seed)
        else:
            plan = prune(model, args.method, args.sparsity, pattern=args.pattern, scope=args.scope,
                         data=data.train_batches()[:8], loss_fn=F.cross_entropy, ignore=args.ignore,
                         min_ratio=args.min_ratio, max_ratio=args.max_ratio, normalize=args.normalize,
                         skip_incompatible=args.pattern is not None, seed=args.seed)
    pruned_accuracy = evaluate(model)
    with Progress(console=console, transient=True) as progress:
        for epoch in progress.track(range(args.finetune_epochs), description="fine-tuning"):
            finetune(model, data.train_batches(seed=100 + epoch), epochs=1, lr=1e-3)
    after = measure(model, example, threads=args.threads, evaluate=evaluate)
    metrics = {"before": before.to_dict(), "after": after.to_dict(), "pruned_before_finetune": {"accuracy": pruned_accuracy},
               "plan": plan.to_dict()}
    with staged_output(out) as stage:
        save(model, stage, plan)
        (stage / "metrics.json").write_text(json.dumps(metrics, indent=2))
    what = (f"channels removed to {after.macs / before.macs:.0%} of the MACs" if args.structured
            else f"{plan.achieved:.0%} of prunable weights removed")
    console.print(_table(f"digits CNN, {args.method}, {what}", metrics["before"], metrics["after"]))
    console.print(f"accuracy right after pruning, before fine-tuning: {pruned_accuracy:.2%}")
    console.print(f"wrote {out / 'metrics.json'} and the pruned model to {out}/")
    return 0


def _calibration(path: str | None, batch_size: int, trust_pickle: bool) -> list[Any] | None:
    if path is None:
        return None
    tensors = load_state(path, trust_pickle=trust_pickle)
    if "inputs" not in tensors:
        raise FileProblem(f"calibration file {path} has no 'inputs' tensor (found: {', '.join(sorted(tensors)) or 'nothing'})")
    if batch_size < 1:
        raise InvalidArgument(f"--batch-size must be at least 1, got {batch_size}")
    inputs = tensors["inputs"]
    targets = tensors.get("targets", tensors.get("labels"))
    if targets is not None and len(targets) != len(inputs):
        raise FileProblem(f"calibration file {path}: {len(inputs)} inputs but {len(targets)} targets")
    if targets is None:
        return list(inputs.split(batch_size))
    return list(zip(inputs.split(batch_size), targets.split(batch_size)))


def _example_input(shape: str | None, dtype: str = "float") -> torch.Tensor | None:
    if shape is None:
        return None
    try:
        dims = [int(d) for d in shape.split(",")]
    except ValueError:
        dims = []
    if not dims or any(d < 1 for d in dims):
        raise InvalidArgument(f"--input-shape must be positive integers separated by commas, e.g. 1,3,224,224; got {shape!r}")
    generator = torch.Generator().manual_seed(0)
    if dtype == "long":
        return torch.randint(0, 2, dims, generator=generator)
    return torch.randn(dims, generator=generator)


def _check_structured(args: argparse.Namespace) -> None:
    if args.pattern is not None or args.sparsity is not None:
        raise InvalidArgument("--structured takes --ratio or --target, not --sparsity / --pattern")
    if (args.ratio is None) == (args.target is None):
        raise InvalidArgument("--structured needs exactly one of --ratio (fraction of channels) or --target (e.g. macs=0.5)")
    if args.target is not None:
        parse_target(args.target)
    elif not 0.0 <= args.ratio < 1.0:
        raise InvalidArgument(f"--ratio must be in [0, 1), got {args.ratio}")
    get_criterion(args.method or "l2")


def _at_threads(target: str | None, threads: int) -> str | None:
    """A latency target without a thread count of its own is timed at --threads, as the measurements are."""
    if target is None:
        return None
    budget = parse_target(target)
    if not BUDGETS[budget.key].absolute or budget.threads is not None:
        return target
    return str(Target(budget.key, budget.value, threads))


def run_prune(args: argparse.Namespace, console: Console) -> int:
    if args.hf is not None:
        return run_prune_hf(args, console)
    if args.keras is not None:   # secateurs.keras.cli: the same options and outputs for Keras 3 models
        from .keras.cli import run_prune_keras
        return run_prune_keras(args, console)
    _refuse_given(args, _HF_ONLY, "--model (it is for --hf)")
    args.threads = args.threads or 1
    if args.weights is None:
        raise InvalidArgument("--model needs --weights (a .safetensors file or a torch file of plain tensors)")
    if args.structured:
        _check_structured(args)
        args.method = args.method or "l2"
    else:
        args.method = args.method or "magnitude"
        _check_common(args)
    inputs = [args.weights] + ([args.calib] if args.calib else [])
    check_output_dir(args.out, inputs, overwrite=args.overwrite)
    model = build_model(args.model)
    load_into(model, load_state(args.weights, trust_pickle=args.trust_pickle), source=f"weights {args.weights}")
    model.eval()
    data = _calibration(args.calib, args.batch_size, args.trust_pickle)
    example = _example_input(args.input_shape)
    if example is None and data:
        first = data[0][0] if isinstance(data[0], tuple) else data[0]
        example = first[:1]
    if args.structured and example is None:
        raise InvalidArgument("--structured needs an example input: pass --input-shape or --calib")
    measured = (lambda m: measure(m, example, threads=args.threads).to_dict()) if example is not None else _static_costs
    try:
        before = measured(model)
    except RuntimeError as exc:
        raise InvalidArgument(f"the model does not run on the calibration inputs: {str(exc).splitlines()[0]}") from None
    if args.structured:
        with console.status(f"removing channels ({args.method})"):
            plan = prune_structured(model, example, args.ratio, target=_at_threads(args.target, args.threads),
                                    method=args.method, data=data,
                                    loss_fn=LOSSES[args.loss], ignore=args.ignore, seed=args.seed)
        return _finish_prune(args, console, model, plan, before, measured(model),
                             f"{args.model}, structured {plan.method}: MACs {plan.macs_after / plan.macs_before:.1%} of before")
    with Progress(console=console, transient=True) as progress:
        if data is not None:
            data = progress.track(data, description=f"scoring with {args.method}")
        plan = prune(model, args.method, args.sparsity, pattern=args.pattern, scope=args.scope, data=data,
                     loss_fn=LOSSES[args.loss], max_batches=args.max_batches, types=args.types,
                     include=args.include, ignore=args.ignore, prune_last=args.prune_last,
                     min_ratio=args.min_ratio, max_ratio=args.max_ratio, normalize=args.normalize,
                     skip_incompatible=args.skip_incompatible, seed=args.seed)
    return _finish_prune(args, console, model, plan, before, measured(model),
                         f"{args.model}, {plan.method}, {plan.achieved:.1%} of selected weights removed")


def _finish_prune(args, console, model, plan, before, after, title: str) -> int:
    with staged_output(args.out) as stage:
        save(model, stage, plan)
        (stage / "metrics.json").write_text(json.dumps({"before": before, "after": after, "plan": plan.to_dict()}, indent=2))
    console.print(_table(title, before, after))
    console.print(f"wrote the pruned model, plan.json and metrics.json to {args.out}/")
    return 0


def run_prune_hf(args: argparse.Namespace, console: Console) -> int:
    """`prune --hf`: the whole run is `llm.pipeline.prune_checkpoint`; this prints its metrics."""
    _refuse_given(args, _MODEL_ONLY, "--hf (it is for --model)")
    if args.calib is None:
        raise InvalidArgument("--hf needs --calib FILE: plain text or JSONL, tokenized into calibration windows")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before transformers is imported: nothing may download
    import transformers

    from .llm.pipeline import prune_checkpoint

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    given = {"method": args.method, "sparsity": args.sparsity, "pattern": args.pattern, "seed": args.seed,
             "calib_windows": args.calib_windows, "seqlen": args.seqlen, "owl": args.owl, "eval_file": args.eval,
             "stream": args.stream, "structured": args.structured, "ratio": args.ratio, "target": args.target,
             "units": args.units, "compensate": args.compensate, "drop_layers": args.drop_layers,
             "ignore": args.ignore, "overwrite": args.overwrite}
    with console.status("pruning") as status:
        metrics = prune_checkpoint(args.hf, args.out, args.calib, on_stage=status.update,
                                   **{k: v for k, v in given.items() if v is not None})
    console.print(_hf_table(metrics))
    how = ("plain transformers loads it" if metrics["saved_as"] == "transformers"
           else "secateurs.hf.load_pretrained loads it")
    console.print(f"wrote the pruned model, tokenizer, metrics.json and report.md to {args.out}/ ({how})")
    return 0


def _hf_table(metrics: dict[str, Any]) -> Table:
    """Before / after of a `prune --hf` run: parameters, non-zeros, MACs and quality where measured."""
    rows = {"params": metrics["params"], "nonzeros": metrics["nonzeros"], **(
        {"macs": metrics["pruning"]["macs"]} if "macs" in metrics["pruning"] else {})}
    if metrics["eval"]:
        rows[metrics["eval"]["metric"]] = metrics["eval"]
    table = Table(title=f"{metrics['model']['architecture']}: {metrics['mode']}, {metrics['config']['method']}")
    for column in ("", "before", "after"):
        table.add_column(column, justify="right" if column else "left")
    for key, row in rows.items():
        table.add_row(key, *(("-" if v is None else f"{v:,}" if isinstance(v, int) else f"{v:.4f}")
                             for v in (row["before"], row["after"])))
    table.add_row("seconds", "", f"{metrics['seconds']['total']:.1f}")
    return table


def run_analyze(args: argparse.Namespace, console: Console) -> int:
    from .graph.groups import analyze

    example = _example_input(args.input_shape, args.input_dtype)
    model = build_model(args.model)
    if args.weights:
        load_into(model, load_state(args.weights, trust_pickle=args.trust_pickle), source=f"weights {args.weights}")
    try:
        analysis = analyze(model.eval(), example)
    except RuntimeError as exc:
        raise InvalidArgument(f"the model does not run on an input of shape {args.input_shape}: {str(exc).splitlines()[0]}") from None
    table = Table(title=f"{args.model}: {len(analysis.groups)} groups of coupled channels")
    for column in ("group", "kind", "units", "prunable", "members", "blocked by"):
        table.add_column(column)
    for g in analysis.groups:
        members = ", ".join(f"{n}[{d}]" for n, d in g.members[:4]) + (f" +{len(g.members) - 4}" if len(g.members) > 4 else "")
        table.add_row(str(g.index), g.kind, str(g.size), str(len(g.prunable_units)), members, g.reason or "")
    console.print(table)
    if analysis.unknown_ops:
        console.print(f"ops without a rule (their channels are left intact): {', '.join(sorted(set(analysis.unknown_ops)))}")
    return 0


def _static_costs(model: torch.nn.Module) -> dict[str, Any]:
    """Costs that need no input: parameters, non-zeros and bytes."""
    params, nonzeros = count_parameters(model)
    return {"params": params, "nonzeros": nonzeros, "size_bytes": sparse_bytes(model), "dense_size_bytes": dense_bytes(model)}


def run_run(args: argparse.Namespace, console: Console) -> int:
    from .run import run_recipe

    def finished(index: int, name: str, record: dict[str, Any]) -> None:
        m = record["measurement"]
        console.print(f"stage {index} {name}: accuracy {_fmt('accuracy', m.get('accuracy'))}, MACs {m['macs']:,}, "
                      f"{m['size_bytes']:,} bytes, {m['latency_ms']:.3f} ms ({record['seconds']:.1f} s)")

    result = run_recipe(args.recipe, args.out, resume=args.resume, on_stage=finished)
    if args.resume:
        console.print(f"resumed {args.out}: {len(result.ran)} stage(s) run, {result.resumed_from} already done")
    dense, final = result.metrics["dense"]["measurement"], result.metrics["final"]
    console.print(_table(f"{args.recipe}: dense vs after the last stage ({final['stage']})", dense, final))
    console.print(f"wrote config.yaml, run.json, metrics.json and checkpoints to {args.out}/")
    return 0


def _fmt(key: str, value: Any) -> str:
    return "-" if value is None else f"{value:.2%}" if key == "accuracy" else f"{value:,}"


def run_report(args: argparse.Namespace, console: Console) -> int:
    from .report import build_report

    page = build_report(args.runs, args.out, overwrite=args.overwrite)
    console.print(f"wrote {page}, report.md, report.json and plots/ for {len(args.runs)} run(s)")
    return 0


def _add_sensitivity(sub: Any) -> None:
    from .sensitivity import DEFAULT_RATIOS, METRICS, MODES

    s = sub.add_parser("sensitivity", help="per group, the metric against the pruning ratio: table, plot, cache")
    s.add_argument("--model", required=True, metavar="MODULE:FACTORY", help="e.g. mypkg.models:build")
    s.add_argument("--weights", required=True, help=".safetensors, or a torch file of plain tensors")
    s.add_argument("--trust-pickle", action="store_true", help="allow unpickling a torch weights file (only files you trust)")
    s.add_argument("--calib", required=True, help="tensors 'inputs' and 'targets' the metric is measured on")
    s.add_argument("--metric", choices=sorted(METRICS), default="loss", help="mean loss (lower is better) or accuracy")
    s.add_argument("--loss", choices=sorted(LOSSES), default="cross_entropy")
    s.add_argument("--ratios", type=_ratio, nargs="+", default=list(DEFAULT_RATIOS), help="fractions in (0, 1)")
    s.add_argument("--method", default="l2", help=f"criterion ranking the units: {', '.join(sorted(CRITERIA))}")
    s.add_argument("--mode", choices=sorted(MODES), default="zero", help="zero units in place (fast) or cut a copy")
    s.add_argument("--batch-size", type=int, default=64)
    s.add_argument("--max-batches", type=int, default=None)
    s.add_argument("--input-shape", default=None, help="example input shape (else the first calib input)")
    s.add_argument("--ignore", nargs="*", default=[], metavar="GLOB", help="module or parameter names to leave alone")
    s.add_argument("--out", required=True, help="folder for sensitivity.json/.png/.svg and the cache (reused)")
    s.add_argument("--overwrite", action="store_true", help="write into a non-empty folder that holds other files")


def run_sensitivity(args: argparse.Namespace, console: Console) -> int:
    from .sensitivity import METRICS, data_digest, save_plot, sensitivity

    inputs = [args.weights, args.calib]
    # a folder this command wrote before is reused: its cache makes the second call instant
    out = check_output_dir(args.out, inputs, overwrite=args.overwrite or (Path(args.out) / "sensitivity.json").is_file())
    model = build_model(args.model)
    load_into(model, load_state(args.weights, trust_pickle=args.trust_pickle), source=f"weights {args.weights}")
    data = (_calibration(args.calib, args.batch_size, args.trust_pickle) or [])[: args.max_batches]
    if not data or not isinstance(data[0], tuple):
        raise FileProblem(f"calibration file {args.calib} needs 'inputs' and 'targets': the metric compares with labels")
    example = _example_input(args.input_shape)
    example = data[0][0][:1] if example is None else example
    evaluate, higher_is_better = METRICS[args.metric]
    name = f"{args.loss} loss" if args.metric == "loss" else args.metric
    with Progress(console=console, transient=True) as progress:
        task = progress.add_task(f"sensitivity ({args.method}, {args.mode})", total=None)
        curves = sensitivity(model.eval(), example, evaluate(data, LOSSES[args.loss]), args.ratios, method=args.method,
                             ignore=args.ignore, data=data, loss_fn=LOSSES[args.loss], higher_is_better=higher_is_better,
                             metric_name=name, mode=args.mode, cache_dir=out / "cache",
                             data_key=f"{args.metric}:{args.loss}:{data_digest(data)}",
                             on_point=lambda done, total: progress.update(task, completed=done, total=total))
    with staged_output(out) as stage:
        (stage / "sensitivity.json").write_text(json.dumps(curves.to_dict(), indent=1))
        for suffix in ("png", "svg"):
            save_plot(curves, stage / f"sensitivity.{suffix}", f"{args.model}: sensitivity ({curves.method})")
    table = Table(title=f"{args.model}: {name} with one group pruned (dense {curves.baseline:.4g})")
    for column in ["group", "kind", "units"] + [f"{r:g}" for r in curves.ratios]:
        table.add_column(column, justify="left" if column == "group" else "right")
    for c in curves.curves:
        table.add_row(c.label, c.kind, str(c.units), *(f"{m:.4g}" for m in c.metric))
    console.print(table)
    how = "read from the cache" if curves.cached else f"measured in {curves.seconds:.1f} s"
    console.print(f"{how}; wrote sensitivity.json, sensitivity.png and sensitivity.svg to {args.out}/")
    return 0


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
        example = _example_input(args.input_shape, args.input_dtype)
        model = load(build_model(args.model), folder).eval()
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
