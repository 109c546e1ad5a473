"""The repeated blocks of a transformer: where they live and which linears they hold.

Hugging Face models keep their blocks at well-known paths (LLaMA `model.layers`, GPT-2
`transformer.h`, BERT / MiniLM / ViT `encoder.layer`, possibly under a task wrapper such
as `bert.` or `vit.`); any other model uses its longest nn.ModuleList of same-class
modules that hold weights.
"""
from __future__ import annotations

import fnmatch
from dataclasses import dataclass

from torch import nn

from ..errors import IncompatibleLayer
from ..layers import is_linear_like

# Suffixes of dotted paths, tried in order: the known layouts before the generic search.
_KNOWN_PATHS = ("model.layers", "transformer.h", "encoder.layer", "decoder.layers", "layers", "h")


@dataclass
class BlockLayout:
    """Where the repeated blocks are: the dotted path of their ModuleList, and the list."""

    blocks_path: str
    blocks: nn.ModuleList


def _is_block_list(module: nn.Module) -> bool:
    children = list(module.children()) if isinstance(module, nn.ModuleList) else []
    if not children or len({type(c) for c in children}) != 1:
        return False
    return any(True for _ in children[0].parameters())


def find_block_layout(model: nn.Module) -> BlockLayout:
    """The ModuleList of repeated blocks of `model` (HF LLaMA/GPT-2/BERT/ViT/MiniLM, else the longest).

    Found by path suffix, not by probing a forward pass (that is `secateurs.blocks.find_blocks`).
    """
    lists = {name: m for name, m in model.named_modules() if name and _is_block_list(m)}
    for suffix in _KNOWN_PATHS:
        # the shortest matching path is the outer one (a wrapper's own model, not a nested list);
        # at a known path a single block counts, so one-layer models prune too
        hits = sorted((n for n in lists if n == suffix or n.endswith("." + suffix)), key=len)
        if hits:
            return BlockLayout(hits[0], lists[hits[0]])
    lists = {n: m for n, m in lists.items() if len(m) >= 2}
    if not lists:
        raise IncompatibleLayer(
            f"model {type(model).__name__} has no nn.ModuleList of two or more same-class blocks "
            f"with weights; the LLM engine prunes transformers block by block")
    name = max(lists, key=lambda n: len(lists[n]))  # first of the longest, in module order
    return BlockLayout(name, lists[name])


def block_linears(block: nn.Module, prefix: str = "", ignore: tuple[str, ...] = ()) -> dict[str, nn.Module]:
    """Full name -> linear of every prunable linear in `block`, minus those matching `ignore` globs."""
    found = {}
    for local, module in block.named_modules():
        if not is_linear_like(module):
            continue
        full = prefix + local
        if any(fnmatch.fnmatchcase(full, p) or fnmatch.fnmatchcase(local, p) for p in ignore):
            continue
        found[full] = module
    return found
