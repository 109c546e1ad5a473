"""Prune a whole model in memory, block by block: `prune_llm`.

The model stays where it is (the CPU, say). With `device` set, each block in turn moves
to the device, is pruned there from its calibration inputs, runs to give the next
block's inputs and moves back: the device holds one block, its statistics (kept in fp32
whatever the model's dtype) and the calibration activations, or with `offload_inputs`
one batch of them at a time. The modules outside the blocks (embeddings, rotary tables)
run once, where they are, to capture the first block's inputs.

A method that needs no statistics (magnitude) runs no forward pass at all unless the
per-layer error is measured or OWL's ratios are asked for.
"""
from __future__ import annotations

import dataclasses
import time
from typing import Any, Iterable

from torch import nn

from ..errors import InvalidArgument, MissingData
from .blocks import BlockLayout, find_block_layout
from .engine import (
    BlockInputs,
    LayerReport,
    LLMConfig,
    LLMPlan,
    as_batch_list,
    cache_off,
    capture_inputs,
    make_config,
    needs_inputs,
    place_inputs,
    prune_block,
    walk_blocks,
)
from .owl import owl_sparsities


def _check_weights(layout: BlockLayout) -> None:
    """Raise when a block's weights are not loaded (an empty skeleton on the meta device)."""
    empty = next((n for n, p in layout.blocks.named_parameters() if p.device.type == "meta"), None)
    if empty is not None:
        raise InvalidArgument(f"parameter {layout.blocks_path}.{empty} is on the meta device (an empty skeleton): "
                              f"load the weights first, or prune the saved folder with "
                              f"secateurs.llm.stream.prune_pretrained (CLI: --stream)")


def block_ratios(model: nn.Module, layout: BlockLayout, batches: list[Any], config: LLMConfig) -> list[float]:
    """Each block's sparsity: uniform, or OWL's from a first pass over the dense blocks."""
    if config.owl is None:
        return [config.sparsity] * len(layout.blocks)
    return owl_sparsities(model, batches, config, layout)


def prune_llm(model: nn.Module, batches: Iterable[Any] | None, config: LLMConfig | None = None,
              **overrides: Any) -> LLMPlan:
    """Prune `model` block by block from calibration `batches`; block k+1 sees the pruned block k.

    `batches`: a list of LongTensor[B, L] token ids or of dict(input_ids=..., attention_mask=...);
    None (or empty) for magnitude, which needs none. Keyword `overrides` replace fields of
    `config` (see LLMConfig), e.g. `method="sparsegpt", device="cuda"`.
    """
    config = make_config(config, **overrides)
    if not isinstance(model, nn.Module):
        raise InvalidArgument(f"model must be a torch nn.Module, got {type(model).__name__}")
    batches = as_batch_list(batches)
    calibrated = needs_inputs(config) or config.owl is not None
    if calibrated and not batches:
        raise MissingData(f"prune_llm with method {config.method!r} needs at least one calibration batch, "
                          f"got none")
    start = time.perf_counter()
    layout = find_block_layout(model)
    _check_weights(layout)
    ratios = block_ratios(model, layout, batches, config)
    reports: list[LayerReport] = []

    def prune(i: int, block: nn.Module, inputs: BlockInputs | None) -> None:
        block_config = dataclasses.replace(config, sparsity=ratios[i])
        reports.extend(prune_block(block, inputs, block_config, prefix=f"{layout.blocks_path}.{i}."))

    with cache_off(model):
        inputs = place_inputs(capture_inputs(model, layout, batches), config) if needs_inputs(config) else None
        seconds = walk_blocks(layout, inputs, prune, config.device)
    block_sparsity = ratios if config.pattern is None else [config.target] * len(ratios)
    return LLMPlan(config, reports, time.perf_counter() - start, block_sparsity, seconds)


__all__ = ["prune_llm", "block_ratios"]
