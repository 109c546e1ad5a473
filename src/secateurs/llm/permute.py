"""Input-channel permutation for N:M sparsity, the channel reallocation of RIA (Zhang et al.,
ICLR 2024, "Plug-and-Play: An Efficient Post-training Pruning Method for Large Language Models").

N:M keeps N of every M consecutive inputs, so two important input channels that share a
group of M compete. Before pruning a consumer linear (LLaMA's down_proj, o_proj) we reorder
its input channels so the important ones are spread over the groups: channels are sorted by
importance (the column sums of the Wanda score |W_ij| * ||X_j||, or of |W_ij| without
statistics) and dealt round-robin into the groups. The producer's output channels (the rows
of gate/up_proj, of v_proj within each head, with their biases) get the same permutation, so
the block computes exactly what it did: nothing is permuted at run time and a saved
checkpoint loads in plain transformers.

The producer -> consumer pairs are known per architecture (PAIRS, names inside one block);
only element-wise operations (activations, the gate product, per-head attention mixing) may
sit between a producer and its consumer, which is what makes the permutation exact.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..criteria.wanda import wanda_scores
from ..layers import is_linear_like, weight_out_in
from .stats import LayerStats


@dataclass(frozen=True)
class Pair:
    """Linears inside one block whose outputs feed `consumer`'s inputs channel for channel."""

    producers: tuple[str, ...]
    consumer: str
    attention: str | None = None  # the attention module when channels are per head (v -> o)


PAIRS = (
    Pair(("mlp.gate_proj", "mlp.up_proj"), "mlp.down_proj"),       # LLaMA, Mistral, Qwen
    Pair(("self_attn.v_proj",), "self_attn.o_proj", "self_attn"),  # LLaMA
    Pair(("self_attn.v_proj",), "self_attn.out_proj", "self_attn"),  # OPT
    Pair(("fc1",), "fc2"),                                          # OPT
    Pair(("mlp.c_fc",), "mlp.c_proj"),                              # GPT-2 (Conv1D)
    Pair(("intermediate.dense",), "output.dense"),                  # BERT, MiniLM
    Pair(("attention.self.value",), "attention.output.dense", "attention.self"),  # BERT, MiniLM
)


def round_robin(importance: torch.Tensor, m: int) -> torch.Tensor:
    """The order of channels after dealing them, most important first, into width/m groups of m.

    Position g*m + p of the result holds the channel ranked p*groups + g, so every group of
    m gets one channel from each tier of the ranking.
    """
    groups = importance.numel() // m
    ranked = importance.argsort(descending=True, stable=True)
    return ranked.reshape(m, groups).t().reshape(-1)


def channel_importance(weight: torch.Tensor, stats: LayerStats | None) -> torch.Tensor:
    """Per input channel, the sum over rows of the Wanda score (|W| without statistics)."""
    scores = weight.abs().float() if stats is None or stats.sumsq is None else wanda_scores(weight.float(), stats.norms)
    return scores.sum(0)


def _head_dim(attention: nn.Module) -> int | None:
    for attr in ("head_dim", "attention_head_size", "head_size"):
        value = getattr(attention, attr, None)
        if isinstance(value, int):
            return value
    return None


def pair_permutation(pair: Pair, block: nn.Module, consumer: nn.Module, stats: LayerStats | None,
                     m: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(consumer column order, producer row order) for `pair`, or None when it cannot be dealt.

    Per head for attention: each value head's channels are dealt among themselves, and every
    query head that reads that value head (grouped-query attention) gets the same order.
    """
    importance = channel_importance(weight_out_in(consumer).detach(), stats)
    width = importance.numel()
    if pair.attention is None:
        if width % m:
            return None
        order = round_robin(importance, m)
        return order, order
    head = _head_dim(block.get_submodule(pair.attention))
    producer_rows = weight_out_in(block.get_submodule(pair.producers[0])).shape[0]
    if head is None or head % m or width % head or producer_rows % head:
        return None
    kv_heads, heads = producer_rows // head, width // head
    if heads % kv_heads:
        return None
    per_query = importance.reshape(kv_heads, heads // kv_heads, head).sum(1)  # query heads of one kv head
    local = torch.stack([round_robin(per_query[g], m) for g in range(kv_heads)])  # [kv_heads, head]
    rows = (local + torch.arange(kv_heads).unsqueeze(1) * head).reshape(-1)
    columns = (local.repeat_interleave(heads // kv_heads, 0) + torch.arange(heads).unsqueeze(1) * head).reshape(-1)
    return columns, rows


def _permute_rows(module: nn.Module, order: torch.Tensor) -> None:
    rows = weight_out_in(module)
    with torch.no_grad():
        rows.copy_(rows[order.to(rows.device)])
        if getattr(module, "bias", None) is not None:
            module.bias.copy_(module.bias[order.to(module.bias.device)])


def _permute_columns(module: nn.Module, stats: LayerStats | None, order: torch.Tensor) -> None:
    rows = weight_out_in(module)
    with torch.no_grad():
        rows.copy_(rows[:, order.to(rows.device)])
    if stats is not None and stats.sumsq is not None:
        on = order.to(stats.sumsq.device)
        stats.sumsq = stats.sumsq[on]
        if stats.hessian is not None:
            stats.hessian = stats.hessian[on][:, on]


def permute_pair(pair: Pair, block: nn.Module, stats: LayerStats | None, m: int) -> bool:
    """Permute the consumer's inputs (and its statistics) and the producers' outputs alike.

    Returns whether the pair was permuted (False when its widths do not deal into groups of m).
    """
    consumer = block.get_submodule(pair.consumer)
    orders = pair_permutation(pair, block, consumer, stats, m)
    if orders is None:
        return False
    columns, rows = orders
    _permute_columns(consumer, stats, columns)
    for name in pair.producers:
        _permute_rows(block.get_submodule(name), rows)
    return True


def _present(block: nn.Module, pair: Pair) -> bool:
    names = [*pair.producers, pair.consumer, *([pair.attention] if pair.attention else [])]
    try:
        modules = [block.get_submodule(n) for n in names]
    except AttributeError:
        return False
    return all(is_linear_like(mod) for mod in modules[:len(pair.producers) + 1])


def block_pairs(block: nn.Module) -> list[Pair]:
    """The PAIRS present in `block`."""
    return [p for p in PAIRS if _present(block, p)]


def permute_consumers(block: nn.Module, prefix: str, group: list[str], stats: dict[str, LayerStats],
                      pattern: tuple[int, int] | None) -> list[str]:
    """Permute every pair of `block` whose consumer is in `group` (full names); the names permuted."""
    if pattern is None:
        return []
    done = []
    for pair in block_pairs(block):
        name = prefix + pair.consumer
        if name in group and permute_pair(pair, block, stats.get(name), pattern[1]):
            done.append(name)
    return done


__all__ = ["PAIRS", "Pair", "block_pairs", "channel_importance", "permute_consumers", "permute_pair",
           "round_robin"]
