"""Prune Keras 3 models on any backend: TensorFlow, JAX or PyTorch. See docs/keras.md.

The backend only runs the model; selection, scores, counts and masks are numpy and
`keras.ops`, so a model is pruned the same way whichever backend runs it.

- `prune(model, method, sparsity | pattern="2:4", ...)`: unstructured and N:M masks
  (kernel constraints, so `model.fit` keeps the zeros); every criterion of the PyTorch
  side, the gradient ones where the backend gives gradients.
- `GradualPruning(PolynomialDecay(...) | ConstantSparsity(...))`: a `fit` callback with
  TF-MOT's schedules. `strip` / `finalize`: a plain Keras model again.
- `prune_structured(model, ratio | target="macs=0.5")` -> `(smaller, plan)`: channels,
  neurons and attention heads removed from a Sequential or Functional model, rebuilt
  from its config; `smaller.save("x.keras")` loads with plain Keras.
- `analyze`, `measure`, `count_macs`; `io.save` / `io.load_model` / `io.load_weights`.
"""
from __future__ import annotations

from ._backend import Calibration, backend, default_backend
from . import io
from .costs import count_macs, measure
from .graph import KerasAnalysis, KerasGroup, StructuredUnsupported, analyze
from .masks import PruningMask, apply_masks, finalize, masked_variables, restore_masks, sparsity_of, strip
from .prune import prune
from .schedule import ConstantSparsity, GradualPruning, PolynomialDecay, PruningSchedule, overall_sparsity
from .structured import prune_structured
from .targets import KerasTarget, select_targets

__all__ = ["Calibration", "ConstantSparsity", "GradualPruning", "KerasAnalysis", "KerasGroup", "KerasTarget",
           "PolynomialDecay", "PruningMask", "PruningSchedule", "StructuredUnsupported", "analyze", "apply_masks",
           "backend", "count_macs", "default_backend", "finalize", "io", "masked_variables", "measure",
           "overall_sparsity", "prune", "prune_structured", "restore_masks", "select_targets", "sparsity_of",
           "strip"]
