"""Saving a pruned Keras model: a plain `.keras` file, the sparse weights, and the plan.

`model.keras` is what `model.save` writes: any Keras 3 installation loads it with
`keras.saving.load_model`, no secateurs needed (masks are kernel constraints, which
Keras does not serialize; the zeros are in the weights). `model.sparse.safetensors`
holds the same weights by variable path in secateurs' sparse form (non-zeros plus a
1-bit mask), the size `metrics.json` reports as `size_bytes`.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import FileProblem, WeightsMismatch
from ..io import PLAN_FILE, SPARSE_WEIGHTS_FILE, _encode, load_state
from ._backend import keras
from .costs import unique_weights, weight_arrays

KERAS_FILE = "model.keras"


def save_sparse_weights(model: Any, path: str | os.PathLike) -> None:
    import torch
    from safetensors.torch import save_file

    tensors = {name: torch.from_numpy(np.ascontiguousarray(a if a.dtype.kind != "V" else a.astype(np.float32)))
               for name, a in weight_arrays(model).items()}
    encoded, metadata = _encode(tensors, sparse=True)
    save_file(encoded, str(path), metadata=metadata)


def load_weights(model: Any, path: str | os.PathLike) -> Any:
    """Weights of a (sparse or dense) safetensors file, by variable path, into `model`. Returns `model`."""
    state = load_state(path)
    variables = {v.path: v for v in unique_weights(model)}
    missing = sorted(set(variables) - set(state))
    extra = sorted(set(state) - set(variables))
    if missing or extra:
        raise WeightsMismatch(f"weights {path} do not fit the model: missing {missing[:3]}, unexpected {extra[:3]}")
    for name, v in variables.items():
        array = state[name].numpy()
        if tuple(array.shape) != tuple(v.shape):
            raise WeightsMismatch(f"weights {path}: {name} has shape {tuple(array.shape)}, the model {tuple(v.shape)}")
        v.assign(array.astype(str(v.dtype)) if "float" in str(v.dtype) else array)
    return model


def save(model: Any, directory: str | os.PathLike, plan: Any = None) -> Path:
    """Write `model.keras`, `model.sparse.safetensors` and (with a plan) `plan.json` into `directory`."""
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    model.save(out / KERAS_FILE)
    save_sparse_weights(model, out / SPARSE_WEIGHTS_FILE)
    if plan is not None:
        (out / PLAN_FILE).write_text(json.dumps(plan.to_dict(), indent=2))
    return out


def load_model(path: str | os.PathLike, compile: bool = True) -> Any:
    """`keras.saving.load_model` in safe mode, its errors turned into one-line FileProblems."""
    path = Path(path)
    if not path.is_file():
        raise FileProblem(f"Keras model file {path} does not exist")
    if path.suffix != ".keras":
        raise FileProblem(f"{path} is not a .keras file (save Keras 3 models with model.save('name.keras'))")
    try:
        return keras.saving.load_model(path, compile=compile, safe_mode=True)
    except Exception as exc:   # noqa: BLE001 - Keras raises many kinds for a bad file
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise FileProblem(f"cannot load Keras model {path}: {first}") from None
