"""Hugging Face models after structured pruning: Conv1D surgery, a config that fits, saving.

transformers is an optional extra: nothing here imports it until a Hugging Face model is
in hand. Three things make a pruned transformers model shippable:

- GPT-2's `Conv1D` stores its weight as [in, out]; `secateurs.layers` recognises it for
  surgery and the structured cut.
- `fit_config` (in `hf_config`) rewrites the model's config (hidden size, heads, key/value heads,
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

from torch import nn

from .errors import FileProblem, InvalidArgument, MissingData
from .hf_config import add_zero_biases, fit_config, is_hf_model, missing_biases, update_config

from .io import (
    WEIGHTS_FILE,
    check_output_dir,
    load_into,
    load_state,
    save_weights,
    staged_output,
)
from .structured.plan import replay


def register_conv1d() -> None:
    """Kept for compatibility: surgery and the structured cut know transformers' Conv1D natively
    (`secateurs.layers.is_conv1d`), so there is nothing left to register."""


PLAN_FILE = "secateurs_plan.json"

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
            add_zero_biases(model, missing_biases(model, fitted) or [])
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

    from .plan_schema import read_plan

    plan_path = src / PLAN_FILE
    if not plan_path.is_file():
        config = transformers.AutoConfig.from_pretrained(src)
        return _model_class(config).from_pretrained(src)
    config = transformers.AutoConfig.from_pretrained(src)
    cls = _model_class(config)
    model = cls(config) if isinstance(cls, type) else cls(config)
    replay(model, read_plan(plan_path))
    weights = src / WEIGHTS_FILE
    if not weights.is_file():
        raise FileProblem(f"{in_dir} has a plan but no {WEIGHTS_FILE}")
    load_into(model, load_state(weights), source=str(weights))
    return model.eval()


__all__ = ["fit_config", "is_hf_model", "load_pretrained", "register_conv1d", "save_pretrained", "update_config"]
