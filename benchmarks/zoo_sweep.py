"""Real architectures nobody here wrote: cut each torchvision / timm classifier to a MACs target.

Each model is built with random weights (no download), seed 0, and cut in its own
subprocess under a time limit by `prune_structured(model, x, target="macs=0.5")`.
Per model it reports:

- status: "ok" (the target met, nothing frozen), "partial" (groups frozen because
  cutting them would break the model, or the target missed: the plan says how close),
  "refused" (the library's one-line error) or "timeout" / "crashed";
- the MACs reached (fraction of the dense model's), the prune time;
- "pruned equals zeroed": the cut model's output against the dense model's with the
  same channels zeroed (every removed slice of every parameter set to 0). Where a
  normalisation runs over cut channels (LayerNorm, GroupNorm) the two legitimately
  differ, so such models are marked `norm_over_cut` and their difference is reported,
  not judged.

torchvision and timm are not dependencies of secateurs. Install them for the sweep only,
into a folder of their own (`--packages`), so nothing else in the environment sees them:

    .venv/bin/python -m pip install --constraint constraints.txt --no-deps \\
        --target /tmp/sweep-pkgs torchvision==0.28.0 timm==1.0.31

The torchvision wheel on PyPI is a CUDA build whose C++ ops do not load with CPU torch;
the sweep defines the two operator schemas its Python code registers fakes for
(`torchvision::nms`, `torchvision::qnms`) with `torch.library` first, and then the model
constructors work. Prints one JSON object (a list of rows and a summary).

    python benchmarks/zoo_sweep.py --packages /tmp/sweep-pkgs --suite torchvision --timeout 120
"""
from __future__ import annotations

import argparse
import copy
import json
import subprocess
import sys
import time
import warnings

# One small model per timm family (the smallest variant that timm builds from a name).
TIMM_SAMPLE = [
    "resnet18", "resnet18d", "resnext26ts", "seresnext26d_32x4d", "resnest14d", "res2net50_14w_8s", "skresnet18",
    "dpn48b", "cspresnet50", "cspdarknet53", "darknet17", "dla34", "regnetx_002", "regnety_002", "rexnet_100",
    "ghostnet_100", "mobilenetv3_small_050", "mobilenetv4_conv_small", "efficientnet_b0", "efficientnet_lite0",
    "mnasnet_050", "fbnetc_100", "hardcorenas_a", "lcnet_050", "tinynet_e", "mixnet_s", "densenet121",
    "dm_nfnet_f0", "nf_resnet26", "repvgg_a0", "vgg11", "hrnet_w18_small", "inception_next_atto",
    "convnext_atto", "convnextv2_atto", "edgenext_xx_small", "efficientformer_l1", "efficientformerv2_s0",
    "efficientvit_b0", "efficientvit_m0", "fastvit_t8", "mobileone_s0", "mobilevit_xxs", "mobilevitv2_050",
    "levit_128s", "tiny_vit_5m_224", "poolformer_s12", "poolformerv2_s12", "mambaout_femto", "focalnet_tiny_srf",
    "vit_tiny_patch16_224", "deit_tiny_patch16_224", "beit_base_patch16_224", "eva02_tiny_patch14_224",
    "cait_xxs24_224", "xcit_nano_12_p16_224", "crossvit_tiny_240", "pvt_v2_b0", "twins_pcpvt_small",
    "swin_tiny_patch4_window7_224", "swinv2_cr_tiny_224", "maxvit_nano_rw_256", "coatnet_nano_rw_224",
    "davit_tiny", "gcvit_xxtiny", "mixer_s32_224", "resmlp_12_224", "gmlp_ti16_224", "sequencer2d_s",
    "hiera_tiny_224", "nextvit_small", "ghostnetv2_100", "visformer_tiny", "tresnet_m", "selecsls42b",
    "vovnet39a", "ese_vovnet19b_dw", "hgnet_tiny", "hgnetv2_b0", "rdnet_tiny", "starnet_s1", "vitamin_small_224",
]


def _import_torchvision():
    """torchvision without its C++ ops: the schemas its Python code needs are defined first."""
    import torch
    if "_TORCHVISION_LIBRARY" in globals():
        import torchvision
        return torchvision
    library = torch.library.Library("torchvision", "DEF")   # noqa: F841 - kept alive for the process
    library.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    library.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    globals()["_TORCHVISION_LIBRARY"] = library
    import torchvision
    return torchvision


def model_names(suite: str) -> list[str]:
    if suite == "torchvision":
        tv = _import_torchvision()
        return [f"tv:{n}" for n in tv.models.list_models(module=tv.models)]
    return [f"timm:{n}" for n in TIMM_SAMPLE]


def build(name: str, size: int):
    """(model, example input) with random weights, seed 0."""
    import torch
    torch.manual_seed(0)
    source, _, arch = name.partition(":")
    if source == "tv":
        tv = _import_torchvision()
        kwargs = {"image_size": size} if arch.startswith("vit_") else {}
        model = tv.models.get_model(arch, weights=None, num_classes=10, **kwargs)
    else:
        _import_torchvision()    # timm imports torchvision where it is installed
        import timm
        try:
            model = timm.create_model(arch, pretrained=False, num_classes=10, img_size=size)
        except TypeError:
            model = timm.create_model(arch, pretrained=False, num_classes=10)
    return model.eval(), torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(1))


def norm_over_cut(dense, keeps: dict[str, list[int]]) -> bool:
    """Whether a LayerNorm / GroupNorm (statistics over channels) loses channels."""
    from torch import nn
    modules = dict(dense.named_modules())
    norms = (nn.LayerNorm, nn.GroupNorm, getattr(nn, "RMSNorm", nn.LayerNorm))
    return any(isinstance(modules.get(key.rpartition(":")[0].rpartition(".")[0]), norms) for key in keeps)


def one(name: str, sizes: list[int], target: str) -> dict:
    """Cut one model; the row of the report."""
    import torch
    from secateurs.errors import SecateursError
    from secateurs.structured import prune_structured
    from secateurs.structured.apply import zero_removed
    torch.set_num_threads(1)
    row: dict = {"model": name}
    for size in sizes:
        model, x = build(name, size)
        try:
            with torch.no_grad():
                expected_shape = model(x).shape
            break
        except Exception as exc:   # the architecture needs another input size: try the next one
            row["size_error"] = str(exc).splitlines()[0][:160] if str(exc) else type(exc).__name__
    else:
        return {**row, "status": "unbuildable"}
    row["size"] = size
    dense = copy.deepcopy(model)
    start = time.perf_counter()
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            plan = prune_structured(model, x, target=target)
    except SecateursError as exc:
        return {**row, "status": "refused", "seconds": round(time.perf_counter() - start, 2), "reason": str(exc)}
    row["seconds"] = round(time.perf_counter() - start, 2)
    row["macs_reached"] = round(plan.macs_after / plan.macs_before, 4) if plan.macs_before else None
    row["params_reached"] = round(plan.params_after / plan.params_before, 4) if plan.params_before else None
    met = plan.budget.get("measured", 0) <= plan.budget.get("limit", 0) * (1 + 1e-9)
    row["status"] = "ok" if met and not plan.frozen else "partial"
    row["frozen"] = [f"{f['kind']} {f['module']}: {f['error'][:120]}" for f in plan.frozen]
    row["attributes"] = plan.attributes
    row["warnings"] = [str(w.message)[:300] for w in caught if "secateurs" in str(w.message)]
    with torch.no_grad():
        out = model(x)
        reference = zero_removed(copy.deepcopy(dense), plan.keeps)(x)
    row["shape_ok"] = tuple(out.shape) == tuple(expected_shape)
    diff = (out - reference).abs().max().item()
    scale = reference.abs().max().item() or 1.0
    row["zeroed_rel_diff"] = diff / scale
    row["norm_over_cut"] = norm_over_cut(dense, plan.keeps)
    row["equals_zeroed"] = diff <= 1e-3 * scale
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--suite", choices=["torchvision", "timm"], action="append")
    parser.add_argument("--models", nargs="*", help="names such as tv:resnet18 timm:vit_tiny_patch16_224")
    parser.add_argument("--packages", help="folder holding torchvision and timm (pip --target)")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds per model")
    parser.add_argument("--target", default="macs=0.5")
    parser.add_argument("--sizes", default="64,224", help="input sizes tried in order, the first that runs is used")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.packages:
        sys.path.insert(0, args.packages)
    sizes = [int(s) for s in args.sizes.split(",")]
    if args.one:
        print(json.dumps(one(args.one, sizes, args.target)))
        return
    names = args.models or [n for suite in (args.suite or ["torchvision", "timm"]) for n in model_names(suite)]
    rows = []
    for name in names:
        command = [sys.executable, __file__, "--one", name, "--target", args.target, "--sizes", args.sizes]
        if args.packages:
            command += ["--packages", args.packages]
        start = time.perf_counter()
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=args.timeout)
            lines = done.stdout.strip().splitlines()
            row = json.loads(lines[-1]) if done.returncode == 0 and lines else \
                {"model": name, "status": "crashed", "reason": (done.stderr.strip().splitlines() or ["?"])[-1][:300]}
        except subprocess.TimeoutExpired:
            row = {"model": name, "status": "timeout", "seconds": args.timeout}
        row["wall_seconds"] = round(time.perf_counter() - start, 1)
        rows.append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)
    summary: dict = {}
    for row in rows:
        summary[row["status"]] = summary.get(row["status"], 0) + 1
    wrong = [r["model"] for r in rows if "equals_zeroed" in r and not r["equals_zeroed"] and not r["norm_over_cut"]]
    print(json.dumps({"target": args.target, "summary": summary, "differs_from_zeroed": wrong, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
