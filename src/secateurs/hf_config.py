"""A Hugging Face model's config after structured pruning: read the cut widths, write a config that fits.

`fit_config` rewrites the model's config (hidden size, heads, key/value heads,
intermediate size) from the pruned shapes, and checks that a model built from that
config has exactly the pruned parameter shapes. It returns None when the layers were
cut differently (one intermediate width per layer, say): a single config cannot describe
such a model. transformers is never imported here: the model in hand carries its config.
"""
from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from .errors import InvalidArgument
from .layers import out_features

# (module attribute path inside a layer, config key, how to read the value)
_WIDTH_SOURCES: list[tuple[tuple[str, ...], str]] = [
    (("mlp.gate_proj", "mlp.up_proj", "mlp.fc1", "intermediate.dense", "mlp.c_fc"), "intermediate"),
    (("self_attn.q_proj", "attention.q_proj", "attention.self.query", "attn.q_proj"), "q"),
    (("self_attn.k_proj", "attention.k_proj", "attention.self.key", "attn.k_proj"), "kv"),
    (("attn.c_attn",), "qkv"),
]
_CONFIG_KEYS = {
    "intermediate": ("intermediate_size", "n_inner", "ffn_dim"),
    "heads": ("num_attention_heads", "n_head"),
    "kv_heads": ("num_key_value_heads",),
    "hidden": ("hidden_size", "n_embd", "d_model"),
}


def is_hf_model(model: nn.Module) -> bool:
    return hasattr(model, "config") and hasattr(model, "save_pretrained")


def _out_features(module: nn.Module) -> int:
    return out_features(module)


def _layers(model: nn.Module) -> list[nn.Module]:
    """The repeated transformer layers: the longest ModuleList in the model."""
    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList)]
    return max(lists, key=len) if lists else []


def _read_widths(layer: nn.Module, head_dim: int) -> dict[str, int]:
    widths = {}
    for paths, what in _WIDTH_SOURCES:
        for path in paths:
            try:
                module = layer.get_submodule(path)
            except AttributeError:
                continue
            n = _out_features(module)
            if what == "intermediate":
                widths["intermediate"] = n
            elif what == "q":
                widths["heads"] = n // head_dim
            elif what == "kv":
                widths["kv_heads"] = n // head_dim
            else:
                widths["heads"] = n // (3 * head_dim)
            break
    return widths


def _head_dim(config: Any) -> int | None:
    explicit = getattr(config, "head_dim", None)
    if isinstance(explicit, int):
        return explicit
    hidden = next((getattr(config, k) for k in _CONFIG_KEYS["hidden"] if isinstance(getattr(config, k, None), int)), None)
    heads = next((getattr(config, k) for k in _CONFIG_KEYS["heads"] if isinstance(getattr(config, k, None), int)), None)
    return hidden // heads if hidden and heads else None


def _hidden_width(model: nn.Module) -> int | None:
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    return embeddings.embedding_dim if isinstance(embeddings, nn.Embedding) else None


def _set(config: Any, what: str, value: int) -> None:
    for key in _CONFIG_KEYS[what]:
        if isinstance(getattr(config, key, None), int) or (what == "intermediate" and hasattr(config, key)):
            setattr(config, key, value)
            return


def _shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def fit_config(model: nn.Module) -> Any | None:
    """A copy of `model.config` describing the pruned shapes, or None if no config can."""
    if not is_hf_model(model):
        raise InvalidArgument(f"fit_config needs a Hugging Face model, got {type(model).__name__}")
    config = copy.deepcopy(model.config)
    head_dim = _head_dim(config)
    layers = _layers(model)
    if head_dim is None or not len(layers):
        return None
    per_layer = [_read_widths(layer, head_dim) for layer in layers]
    fitted: dict[str, int] = {}
    for what in ("intermediate", "heads", "kv_heads"):
        values = {w[what] for w in per_layer if what in w}
        if len(values) > 1:
            return None
        if values:
            fitted[what] = values.pop()
    hidden = _hidden_width(model)
    if hidden is not None:
        fitted["hidden"] = hidden
    if hasattr(config, "head_dim"):
        config.head_dim = head_dim  # keep it explicit: hidden / heads no longer gives it
    for what, value in fitted.items():
        _set(config, what, value)
    if "kv_heads" not in fitted and hasattr(config, "num_key_value_heads") and "heads" in fitted:
        config.num_key_value_heads = fitted["heads"]
    if missing_biases(model, config) is None and _shapes(model).keys() > _shapes_of(model, config).keys():
        for flag in _BIAS_FLAGS:  # compensation gave layers a bias: ask the config for biases there
            if getattr(config, flag, None) is False:
                setattr(config, flag, True)
    return config if missing_biases(model, config) is not None else None


def update_config(model: nn.Module) -> bool:
    """Rewrite `model.config` in place to the pruned sizes, where one config can describe them; returns whether it did.

    Some models read widths from their config at run time (Phi-3 slices its fused q/k/v
    projection by `num_attention_heads * head_dim`), and a config that tells the truth is
    what `save_pretrained` writes.
    """
    fitted = fit_config(model)
    if fitted is None:
        return False
    for key, value in fitted.to_dict().items():
        if key != "transformers_version" and getattr(model.config, key, None) != value:
            setattr(model.config, key, value)
    return True


_BIAS_FLAGS = ("mlp_bias", "attention_bias")


def _shapes_of(model: nn.Module, config: Any) -> dict[str, tuple[int, ...]]:
    try:
        with torch.device("meta"):
            return _shapes(type(model)(config))
    except (ValueError, RuntimeError, TypeError, AssertionError):
        return {}


def missing_biases(model: nn.Module, config: Any) -> list[str] | None:
    """Biases a model built from `config` has and `model` lacks (zeros, added on save); None if anything else differs."""
    own, fresh = _shapes(model), _shapes_of(model, config)
    if not fresh or any(fresh.get(k) != v for k, v in own.items()):
        return None
    extra = [k for k in fresh if k not in own]
    return extra if all(k.endswith(".bias") for k in extra) else None


def add_zero_biases(model: nn.Module, names: list[str]) -> None:
    for name in names:
        module = model.get_submodule(name.rpartition(".")[0])
        rows = module.weight.shape[0]
        module.bias = nn.Parameter(torch.zeros(rows, dtype=module.weight.dtype, device=module.weight.device))


__all__ = ["add_zero_biases", "fit_config", "is_hf_model", "missing_biases", "update_config"]
