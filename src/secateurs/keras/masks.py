"""Masks that survive `model.fit`: a constraint on the kernel variable.

Keras applies a variable's `constraint` after every optimizer step, on every backend and
in custom loops that call `optimizer.apply`, so a `PruningMask` set as the kernel's
constraint puts the pruned weights back to exactly zero after each update: momentum,
Adam moments and weight decay cannot move them. Nothing is added to the layer's config
or weights: `model.save` writes a plain Keras model with the zeros in place, and `strip`
only takes the constraints off again. A constraint the layer already had (MaxNorm, say)
keeps running, before the mask.

The mask's values live in a Keras variable of their own, which a traced TensorFlow step
reads at every call, so a mask that grows during `fit` needs no re-tracing there (nor on
PyTorch, which runs eagerly). A jit-compiled JAX step holds the values it was traced
with; `GradualPruning` masks the weights again after each step until the next `fit`.
"""
from __future__ import annotations

from typing import Any, Iterator

import numpy as np

from ..errors import InvalidArgument
from ._backend import keras, ops, to_numpy


class PruningMask(keras.constraints.Constraint):
    """`w -> previous_constraint(w) * mask`; `mask` is a bool numpy array, True = keep."""

    def __init__(self, mask: np.ndarray, dtype: str, previous: Any = None):
        self.mask = np.asarray(mask, dtype=bool)
        self.dtype = dtype
        self.previous = previous
        self.values = keras.Variable(self.mask.astype(dtype), trainable=False, dtype=dtype, name="prune_mask")

    def update(self, mask: np.ndarray) -> None:
        self.mask = np.asarray(mask, dtype=bool)
        self.values.assign(self.mask.astype(self.dtype))

    def __call__(self, w: Any) -> Any:
        if self.previous is not None:
            w = self.previous(w)
        return ops.multiply(w, ops.cast(self.values.value, w.dtype))

    def get_config(self) -> dict[str, Any]:   # never serialized: the layer's own kernel_constraint is
        return {}


def mask_of(variable: Any) -> PruningMask | None:
    constraint = variable.constraint
    return constraint if isinstance(constraint, PruningMask) else None


def masked_variables(model: Any) -> Iterator[Any]:
    """Every variable of `model` that carries a pruning mask."""
    seen: set[int] = set()
    for v in model.variables:
        if id(v) not in seen and mask_of(v) is not None:
            seen.add(id(v))
            yield v


def set_mask(variable: Any, mask: np.ndarray) -> PruningMask:
    """Attach `mask` (True = keep) to `variable` and zero what it removes. Masks only grow."""
    mask = np.asarray(mask, dtype=bool)
    if mask.shape != tuple(variable.shape):
        raise InvalidArgument(f"mask shape {mask.shape} does not match {variable.path} {tuple(variable.shape)}")
    constraint = mask_of(variable)
    if constraint is None:
        constraint = PruningMask(mask, str(variable.dtype), variable.constraint)
        variable.constraint = constraint
    else:
        constraint.update(mask & constraint.mask)
    variable.assign(ops.multiply(variable.value, ops.cast(constraint.values.value, variable.dtype)))
    return constraint


def apply_masks(model: Any) -> None:
    """Zero every masked weight again (after loading or editing weights by hand)."""
    for v in masked_variables(model):
        v.assign(mask_of(v)(v.value))


# ids of the models a GradualPruning callback is training: it keeps their train step in step with the masks
IN_FIT: set[int] = set()


def refresh_training(model: Any) -> None:
    """Make a fresh train step (traced lazily, at its first call), so it holds the current masks.

    `fit` reads the step anew for every batch, so this is safe inside it too (a callback of
    the user's that prunes); `GradualPruning` keeps the masks current without re-tracing.
    """
    if id(model) not in IN_FIT and getattr(model, "train_function", None) is not None:
        model.make_train_function(force=True)


def sync_for_edit(model: Any) -> None:
    """Inside `fit` on JAX: copy the trainer's state back into the variables before reading or editing them."""
    sync = getattr(model, "jax_state_sync", None)
    if sync is not None:
        sync()


def strip(model: Any) -> Any:
    """Remove the masks, leaving plain zeroed weights and the layers' own constraints. Returns `model`.

    The result is an ordinary Keras model (nothing of secateurs left in it); saving it
    before or after gives the same `.keras` file. TF-MOT's `strip_pruning` counterpart.
    """
    sync_for_edit(model)
    for v in list(masked_variables(model)):
        constraint = mask_of(v)
        v.assign(constraint(v.value))
        v.constraint = constraint.previous
    refresh_training(model)
    return model


finalize = strip


def restore_masks(model: Any, targets: list[Any] | None = None) -> int:
    """Masks from the zeros already in the kernels (a pruned model loaded from a `.keras` file).

    After this, fine-tuning keeps those weights at zero. `targets` defaults to every
    kernel `select_targets` finds, the head included. Returns how many masks were set.
    """
    from .targets import select_targets

    count = 0
    for t in targets if targets is not None else select_targets(model, prune_last=True):
        weights = to_numpy(t.variable.value)
        if (weights == 0).any():
            set_mask(t.variable, weights != 0)
            count += 1
    refresh_training(model)
    return count


def sparsity_of(model: Any) -> dict[str, float]:
    """Fraction of zeros in each masked kernel, by variable path."""
    return {v.path: float(1.0 - mask_of(v).mask.mean()) for v in masked_variables(model)}
