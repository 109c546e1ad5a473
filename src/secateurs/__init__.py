"""secateurs: prune trained PyTorch models and keep what they learned.

    import secateurs as sc
    plan = sc.prune(model, "taylor", 0.7, data=batches, loss_fn=F.cross_entropy)
    sc.finetune(model, batches, epochs=2)      # pruned weights stay exactly zero
    sc.finalize(model)                          # drop the masks, keep the zeros
"""
from .api import LayerPlan, Plan, prune
from .checkpoint import load, save
from .criteria import CRITERIA, Calibration, Criterion
from .errors import (
    FileProblem,
    IncompatibleLayer,
    InvalidArgument,
    MissingData,
    SecateursError,
    WeightsMismatch,
)
from .graph.groups import analyze
from .io import load_state
from .measure import Measurement, count_macs, count_parameters, latency_ms, measure
from .recover import (
    AGPSchedule,
    Callback,
    DistillHistory,
    GuardReport,
    GuardStep,
    IterativeSchedule,
    PruningCallback,
    SparsityPenalty,
    distill,
    evaluate_accuracy,
    finetune,
    guarded_prune,
    kd_loss,
    lightning_callback,
    recalibrate_bn,
    threshold_prune,
    trainer_callback,
)
from .schedule import AGP, agp_sparsity, iterative_prune
from .select import select_targets
from .sparsity import apply_masks, finalize, keep_sparse, masked_params, sparsity_of
from .structured import StructuredPlan, prune_structured

__version__ = "0.1.0"

# The pipeline's names load on first use: recipes bring pydantic and YAML, reports matplotlib,
# the LLM path transformers. (The functions `sensitivity` and `allocate` stay in their modules,
# whose names they share.)
_LAZY = {"run_recipe": ".run", "load_recipe": ".recipe", "build_report": ".report",
         "prune_by_sensitivity": ".sensitivity", "latency_table": ".latency", "quantize_int8": ".quantize",
         "prune_checkpoint": ".llm.pipeline", "export_onnx": ".export"}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "AGP", "CRITERIA", "StructuredPlan", "analyze", "prune_structured", "Calibration", "Criterion", "FileProblem", "IncompatibleLayer", "InvalidArgument",
    "LayerPlan", "Measurement", "MissingData", "Plan", "SecateursError", "SparsityPenalty", "WeightsMismatch",
    "agp_sparsity", "apply_masks", "count_macs", "count_parameters", "evaluate_accuracy", "finalize",
    "finetune", "iterative_prune", "keep_sparse", "latency_ms", "load", "load_state", "masked_params",
    "measure", "prune", "save", "select_targets", "sparsity_of", "threshold_prune",
    # recovery and the pipeline
    "AGPSchedule", "Callback", "DistillHistory", "GuardReport", "GuardStep", "IterativeSchedule", "PruningCallback",
    "build_report", "distill", "guarded_prune", "kd_loss", "load_recipe", "recalibrate_bn", "run_recipe",
    "trainer_callback", "lightning_callback", "prune_by_sensitivity", "latency_table", "quantize_int8", "prune_checkpoint", "export_onnx",
]
