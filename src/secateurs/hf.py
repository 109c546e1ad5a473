"""Hugging Face models after structured pruning: Conv1D surgery, a config that fits, saving.

transformers is an optional extra: nothing here imports it until a Hugging Face model is
in hand. Three things make a pruned transformers model shippable:

- GPT-2's `Conv1D` stores its weight as [in, out]; `register_conv1d` teaches surgery and
  the structured engine which side is which.
- `fit_config` rewrites the model's config (hidden size, heads, key/value heads,
  intermediate size) from the pruned shapes, and checks that a model built from that
  config has exactly the pruned parameter shapes. It returns None when the layers were
  cut differently (one intermediate width per layer, say): a single config cannot
  describe such a model.
- `save_pretrained` writes a folder plain `from_pretrained` loads when the config fits,
  and otherwise the original config plus the structured plan, which `load_pretrained`
  replays on a fresh model (no pickle either way).
"""
from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from .errors import FileProblem, InvalidArgument, MissingData
from .io import (
    WEIGHTS_FILE,
    check_output_dir,
    load_into,
    load_state,
    save_weights,
    staged_output,
)
from .layers import out_features

PLAN_FILE = "secateurs_plan.json"

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


# ------------------------------------------------------------------------ GPT-2 Conv1D

def register_conv1d() -> None:
    """Kept for compatibility: surgery and the structured cut know transformers' Conv1D natively
    (`secateurs.layers.is_conv1d`), so there is nothing left to register."""


# --------------------------------------------------------------------- config fitting

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
    if _missing_biases(model, config) is None and _shapes(model).keys() > _shapes_of(model, config).keys():
        for flag in _BIAS_FLAGS:  # compensation gave layers a bias: ask the config for biases there
            if getattr(config, flag, None) is False:
                setattr(config, flag, True)
    return config if _missing_biases(model, config) is not None else None


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


def _missing_biases(model: nn.Module, config: Any) -> list[str] | None:
    """Biases a model built from `config` has and `model` lacks (zeros, added on save); None if anything else differs."""
    own, fresh = _shapes(model), _shapes_of(model, config)
    if not fresh or any(fresh.get(k) != v for k, v in own.items()):
        return None
    extra = [k for k in fresh if k not in own]
    return extra if all(k.endswith(".bias") for k in extra) else None


def _add_zero_biases(model: nn.Module, names: list[str]) -> None:
    for name in names:
        module = model.get_submodule(name.rpartition(".")[0])
        rows = module.weight.shape[0]
        module.bias = nn.Parameter(torch.zeros(rows, dtype=module.weight.dtype, device=module.weight.device))


# ------------------------------------------------------------------------ save / load

def save_pretrained(model: nn.Module, out_dir: str | Path, plan: Any | None = None, *,
                    tokenizer: Any | None = None, overwrite: bool = False,
                    inputs: list[str | Path] | None = None) -> str:
    """Write a pruned Hugging Face model; returns "transformers" or "secateurs" (how to load it).

    "transformers": the config fits, so plain `AutoModel*.from_pretrained(out_dir)` loads
    it. "secateurs": the layers differ in width, so the folder keeps the original config and
    the plan, and `load_pretrained(out_dir)` rebuilds the model and replays the cut.
    """
    if not is_hf_model(model):
        raise InvalidArgument(f"save_pretrained needs a Hugging Face model, got {type(model).__name__}")
    out = check_output_dir(out_dir, list(inputs or []), overwrite=overwrite)
    fitted = fit_config(model)
    with staged_output(out) as stage:
        if fitted is not None:
            _add_zero_biases(model, _missing_biases(model, fitted) or [])
            original = model.config
            model.config = fitted
            try:
                model.save_pretrained(stage)
            finally:
                model.config = original
            how = "transformers"
        else:
            if plan is None:
                raise MissingData("this model's layers were cut to different widths, so no config describes it; "
                                  "pass the structured plan so load_pretrained can replay it")
            # our own names, not transformers' on-disk renaming: load_pretrained reads them back
            config = copy.deepcopy(model.config)
            config.architectures = [type(model).__name__]
            config.save_pretrained(stage)
            save_weights(model, stage / WEIGHTS_FILE)
            record = plan.to_dict() if hasattr(plan, "to_dict") else dict(plan)
            (stage / PLAN_FILE).write_text(json.dumps(record, indent=2))
            how = "secateurs"
        if tokenizer is not None:
            tokenizer.save_pretrained(stage)
    return how


def _model_class(config: Any) -> Callable[..., nn.Module]:
    import transformers

    for name in getattr(config, "architectures", None) or []:
        cls = getattr(transformers, name, None)
        if cls is not None:
            return cls
    return transformers.AutoModel.from_config


def load_pretrained(in_dir: str | Path) -> nn.Module:
    """Load what `save_pretrained` wrote, replaying the plan when the folder has one."""
    src = Path(in_dir)
    if not (src / "config.json").is_file():
        raise FileProblem(f"{in_dir} has no config.json: not a saved Hugging Face model")
    import transformers

    plan_path = src / PLAN_FILE
    if not plan_path.is_file():
        config = transformers.AutoConfig.from_pretrained(src)
        return _model_class(config).from_pretrained(src)
    from .structured import replay

    config = transformers.AutoConfig.from_pretrained(src)
    cls = _model_class(config)
    model = cls(config) if isinstance(cls, type) else cls(config)
    replay(model, json.loads(plan_path.read_text()))
    weights = src / WEIGHTS_FILE
    if not weights.is_file():
        raise FileProblem(f"{in_dir} has a plan but no {WEIGHTS_FILE}")
    load_into(model, load_state(weights), source=str(weights))
    return model.eval()


__all__ = ["fit_config", "is_hf_model", "load_pretrained", "register_conv1d", "save_pretrained"]
