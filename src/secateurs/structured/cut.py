"""The cut itself: remove kept-out positions from every layer, head counts and RNNs included.

`apply_keeps` maps each (parameter, dim) keep to its layer's role (output or input side),
and calls `surgery` once per layer and role; nn.MultiheadAttention loses whole heads,
RNNs lose hidden units in every gate. Tied parameters are tied again afterwards.
`apply_cut` adds what a cut model needs besides its layers: head-count attributes and,
for a Hugging Face model, a config that fits.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from .. import surgery
from ..errors import IncompatibleLayer
from ..graph.groups import Group
from ..hf_config import is_hf_model, update_config
from ..layers import is_conv1d

_CONV_LIKE = (nn.Linear, nn.modules.conv._ConvNd)


_NORMS = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.RMSNorm, nn.GroupNorm, nn.PReLU)


def _owner(model: nn.Module, name: str) -> tuple[nn.Module, str, nn.Module | None]:
    module_name, _, local = name.rpartition(".")
    module = model.get_submodule(module_name) if module_name else model
    parent_name = module_name.rpartition(".")[0]
    parent = model.get_submodule(parent_name) if module_name else None
    return module, local, parent


# Layer class -> (parameter name, dim) -> "out" / "in" / None, for a user's layers outside torch.nn
# (transformers' Conv1D is known natively: `layers.is_conv1d`).
ROLES: dict[type, Callable[[str, int], str | None]] = {}


def _role(module: nn.Module, local: str, dim: int) -> str | None:
    """"out" / "in" for the standard layers' weights and biases, None for free parameters."""
    for cls in type(module).__mro__:
        if cls in ROLES:
            return ROLES[cls](local, dim)
    if is_conv1d(module) and local in ("weight", "bias"):   # weight [in, out]
        return "out" if local == "bias" or dim == 1 else "in"
    if isinstance(module, nn.modules.conv._ConvTransposeNd) and local in ("weight", "bias"):
        return "out" if local == "bias" or dim == 1 else "in"
    if isinstance(module, _CONV_LIKE) and local in ("weight", "bias"):
        return "out" if local == "bias" or dim == 0 else "in"
    if isinstance(module, _NORMS) and local in ("weight", "bias"):
        return "out"
    if isinstance(module, nn.Embedding) and local == "weight":
        return "out" if dim == 1 else None
    return None


def _rnn_implied_keeps(rnn: nn.RNNBase, units: dict[tuple[int, str], torch.Tensor],
                       inputs: torch.Tensor) -> dict[tuple[str, int], torch.Tensor]:
    """Every (parameter, dim) keep of an RNN that its hidden units per (layer, direction) and
    its layer-0 input features imply: gate rows, recurrent columns, next-layer columns."""
    size = rnn.hidden_size
    gates = rnn.weight_ih_l0.shape[0] // size
    directions = ("", "_reverse") if rnn.bidirectional else ("",)
    implied = {}
    for (layer, suffix), kept in units.items():
        tag = f"l{layer}{suffix}"
        rows = (torch.arange(gates)[:, None] * size + kept).flatten()
        for name in (f"weight_ih_{tag}", f"weight_hh_{tag}", f"bias_ih_{tag}", f"bias_hh_{tag}"):
            implied[(name, 0)] = rows
        implied[(f"weight_hh_{tag}", 1)] = kept
        below = [units[(layer - 1, s)] + i * size for i, s in enumerate(directions)] if layer else [inputs]
        implied[(f"weight_ih_{tag}", 1)] = torch.cat(below)
    return implied


def _cut_rnn(rnn: nn.RNNBase, keeps: dict[tuple[str, int], torch.Tensor]) -> None:
    """Cut an nn.RNN / LSTM / GRU from its (local parameter, dim) keeps.

    Hidden units are read from weight_hh's columns and cut with surgery.keep_hidden_all,
    layer 0's input features from weight_ih_l0's columns; every other keep must be the one
    those imply, or the plan does not describe this RNN and nothing is cut.
    """
    name = type(rnn).__name__
    if rnn.proj_size:
        raise IncompatibleLayer(f"{name} with proj_size={rnn.proj_size}: projected hidden units cannot be pruned")
    directions = ("", "_reverse") if rnn.bidirectional else ("",)
    every = torch.arange(rnn.hidden_size)
    units = {(k, s): keeps.get((f"weight_hh_l{k}{s}", 1), every) for k in range(rnn.num_layers) for s in directions}
    inputs = keeps.get(("weight_ih_l0", 1), torch.arange(rnn.input_size))
    implied = _rnn_implied_keeps(rnn, units, inputs)
    for (local, dim), keep in keeps.items():
        expected = implied.get((local, dim))
        if expected is None or not torch.equal(expected, keep.to(expected.dtype)):
            raise IncompatibleLayer(f"{name}: the keep for {local}:{dim} does not match the hidden units and "
                                    "the input features kept (the columns of weight_hh and weight_ih_l0)")
    if any((f"weight_hh_l{k}{s}", 1) in keeps for k, s in units):
        forward = [units[(k, "")] for k in range(rnn.num_layers)]
        reverse = [units[(k, "_reverse")] for k in range(rnn.num_layers)] if rnn.bidirectional else None
        surgery.keep_hidden_all(rnn, forward, reverse)
    if ("weight_ih_l0", 1) in keeps:
        surgery.keep_in(rnn, inputs)


def apply_keeps(model: nn.Module, keeps: dict[tuple[str, int], torch.Tensor]) -> None:
    """Cut every (parameter, dim) down to its kept positions, module by module."""
    tied = _tied_parameters(model)
    calls: dict[tuple[int, str], tuple[nn.Module, str, torch.Tensor]] = {}
    heads: dict[int, tuple[nn.MultiheadAttention, torch.Tensor]] = {}
    recurrent: dict[int, tuple[nn.RNNBase, dict[tuple[str, int], torch.Tensor]]] = {}
    free = []
    for (name, dim), keep in keeps.items():
        module, local, parent = _owner(model, name)
        if isinstance(module, nn.RNNBase):
            recurrent.setdefault(id(module), (module, {}))[1][(local, dim)] = keep
            continue
        if isinstance(module, nn.MultiheadAttention) and local in ("in_proj_weight", "in_proj_bias") and dim == 0:
            head_dim = module.head_dim
            rows = keep[keep < module.embed_dim]
            heads[id(module)] = (module, torch.unique(rows // head_dim))
            continue
        if isinstance(module, nn.MultiheadAttention) and local == "in_proj_weight":
            calls[(id(module), "in")] = (module, "in", keep)
            continue
        if isinstance(parent, nn.MultiheadAttention) and module is parent.out_proj:
            if dim == 0 or local == "bias":
                calls[(id(parent), "out")] = (parent, "out", keep)
            continue  # out_proj columns follow the heads
        role = _role(module, local, dim)
        if role is None:
            free.append((module, local, dim, keep))
        else:
            calls[(id(module), role)] = (module, role, keep)
    for module, kept in heads.values():
        surgery.keep_heads(module, kept)
    for module, role, keep in calls.values():
        (surgery.keep_out if role == "out" else surgery.keep_in)(module, keep)
    for module, local, dim, keep in free:
        surgery.keep_param_dim(module, local, dim, keep)
    for module, module_keeps in recurrent.values():
        _cut_rnn(module, module_keeps)
    _retie(model, tied)
    surgery.turn_off_nested_tensors(model)


def _tied_parameters(model: nn.Module) -> list[tuple[list[str], nn.Parameter]]:
    """Parameters shared under two or more names (an LM head tied to its embedding)."""
    shared: dict[int, tuple[list[str], nn.Parameter]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        shared.setdefault(id(p), ([], p))[0].append(name)
    return [entry for entry in shared.values() if len(entry[0]) > 1]


def _retie(model: nn.Module, tied: list[tuple[list[str], nn.Parameter]]) -> None:
    """Share again a tied parameter that surgery replaced under one of its names."""
    for names, original in tied:
        owners = [_owner(model, n)[:2] for n in names]
        source = next((getattr(m, local) for m, local in owners if getattr(m, local) is not original), None)
        if source is None:
            continue
        for module, local in owners:
            setattr(module, local, source)
            if isinstance(module, nn.Linear) and local == "weight":
                module.out_features, module.in_features = source.shape
            elif isinstance(module, nn.Embedding) and local == "weight":
                module.num_embeddings, module.embedding_dim = source.shape


# Integer attributes hand-written attention modules keep for their head counts.
HEAD_COUNT_ATTRIBUTES = ("num_heads", "heads", "n_heads", "n_head", "num_attention_heads", "num_key_value_heads",
                         "n_kv_heads", "kv_heads", "num_kv_heads", "all_head_size", "inner_dim",
                         "split_size")


def update_head_counts(model: nn.Module, cut: list[tuple[Group, int]]) -> dict[str, dict[str, int]]:
    """Scale the head-count attributes of the attention module that owns each cut head group.

    A module that reshapes with `self.num_heads` would break after its projections lose
    heads; nn.MultiheadAttention is handled by surgery itself. Returns what changed.
    """
    changed: dict[str, dict[str, int]] = {}
    for group, removed in cut:
        kept = group.size - removed
        for prefix in _head_owners(group):
            owner = model.get_submodule(prefix) if prefix else model
            if isinstance(owner, (nn.MultiheadAttention, nn.ModuleList, nn.Sequential)):
                continue
            for attribute in HEAD_COUNT_ATTRIBUTES:
                value = getattr(owner, attribute, None)
                if isinstance(value, int) and not isinstance(value, bool) and value % group.size == 0:
                    setattr(owner, attribute, value // group.size * kept)
                    changed.setdefault(prefix, {})[attribute] = value // group.size * kept
    return changed


def _head_owners(group: Group) -> list[str]:
    """The modules that may count a head group's heads: the members' common ancestor and
    each projection's parent (a head group can span layers that share a per-head bias)."""
    names = [n.rpartition(".")[0] for n, _ in group.members]
    prefix = names[0]
    while prefix and not all(n == prefix or n.startswith(prefix + ".") for n in names):
        prefix = prefix.rpartition(".")[0]
    return list(dict.fromkeys([prefix] + [n.rpartition(".")[0] for n in names if n]))


def apply_cut(model: nn.Module, keeps: dict[tuple[str, int], torch.Tensor],
           heads: list[tuple[Group, int]]) -> dict[str, dict[str, int]]:
    """Cut `model` to `keeps`, update its head counts and, for a Hugging Face model, its config."""
    apply_keeps(model, keeps)
    attributes = update_head_counts(model, heads)
    if is_hf_model(model):
        update_config(model)
    return attributes


__all__ = ["HEAD_COUNT_ATTRIBUTES", "ROLES", "apply_cut", "apply_keeps", "update_head_counts"]
