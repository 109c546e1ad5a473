"""Coupled channels: which slices of which parameters must be cut together.

Every element of every tensor dimension in the graph is an atom. The rules' identity and
segment links join atoms; a reshape joins the flat dim's atoms to one chosen "carrier"
dim among the split dims (the head axis where an attention op marks one, else a dim
that reaches a parameter) and blocks the others. Connected components of atoms are the
pruning units (a channel, a neuron, a head); the parameter dims a unit touches say
what surgery removes. A unit is prunable unless one of its atoms is blocked (a model
input or output, an index, an unknown op...), and the reason is kept for `analyze`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components
from torch import nn

from .rules import Context, Dim, Links, links_for
from .trace import Graph, trace


@dataclass
class Group:
    """Channels coupled across layers; each unit is removed from every member at once."""

    index: int
    members: list[tuple[str, int]]        # (parameter name, dim)
    units: list[int]                      # component ids, in order of first appearance
    prunable: list[bool]                  # per unit
    reason: str | None                    # why (some) units are blocked
    kind: str                             # "channel" or "head"

    @property
    def size(self) -> int:
        return len(self.units)

    @property
    def prunable_units(self) -> list[int]:
        return [u for u, ok in zip(self.units, self.prunable) if ok]

    def members_text(self, limit: int = 4) -> str:
        """The first `limit` members as `param[dim]`, weights first, and how many more there are."""
        ordered = sorted(self.members, key=lambda m: not m[0].endswith("weight"))   # stable: weights first
        shown = ", ".join(f"{name}[{dim}]" for name, dim in ordered[:limit])
        return shown + (f" +{len(ordered) - limit}" if len(ordered) > limit else "")


@dataclass
class Analysis:
    graph: Graph
    groups: list[Group]
    unit_of: dict[tuple[str, int], np.ndarray]   # (param, dim) -> component id per position
    unknown_ops: list[str] = field(default_factory=list)
    # every (tensor node, dim)'s atoms and their component ids: what cutting units does to
    # each tensor's shape, so a cost can be computed without cutting
    dims: "_DimTable | None" = None
    component: np.ndarray | None = None

    # Groups `str()` lists before summing up the rest.
    SHOWN = 12

    def __repr__(self) -> str:
        prunable = sum(1 for g in self.groups if g.prunable_units)
        return f"<Analysis: {len(self.graph.ops)} ops, {len(self.groups)} groups, {prunable} prunable>"

    def __str__(self) -> str:
        """A short summary: one line per prunable group (the first SHOWN), the blocked ones counted by reason;
        kernel and table-row axes (`is_channel_axis`) are counted, not listed."""
        channels = [g for g in self.groups if is_channel_axis(g)]
        prunable = [g for g in channels if g.prunable_units]
        units = sum(len(g.prunable_units) for g in prunable)
        lines = [f"{len(channels)} groups of coupled channels in {len(self.graph.ops)} ops; "
                 f"{len(prunable)} can be cut ({units} units):"]
        width = max((len(str(g.size)) for g in prunable), default=1)
        for g in prunable[:self.SHOWN]:
            partly = "" if len(g.prunable_units) == g.size else f" ({len(g.prunable_units)} prunable)"
            lines.append(f"  group {g.index:<3} {g.size:>{width}} {g.kind}s{partly}  {g.members_text(3)}")
        if len(prunable) > self.SHOWN:
            lines.append(f"  ... {len(prunable) - self.SHOWN} more (see .groups, or table(analysis))")
        reasons: dict[str, int] = {}
        for g in channels:
            if not g.prunable_units:
                reasons[g.reason or "blocked"] = reasons.get(g.reason or "blocked", 0) + 1
        if reasons:
            lines.append("blocked: " + ", ".join(f"{n} by {reason}" for reason, n in reasons.items()))
        if len(channels) < len(self.groups):
            lines.append(f"({len(self.groups) - len(channels)} kernel / table-row axes left out: they are not channels)")
        if self.unknown_ops:
            lines.append(f"ops without a rule (their channels are left intact): {', '.join(sorted(set(self.unknown_ops)))}")
        return "\n".join(lines)


class _DimTable:
    """Dense ids, sizes and atom offsets for every (node, dim), virtual ones included."""

    def __init__(self, graph: Graph, virtual_sizes: list[int]):
        self.ids: dict[Dim, int] = {}
        sizes = []
        for t in graph.tensors:
            for d, n in enumerate(t.shape):
                self.ids[(t.index, d)] = len(sizes)
                sizes.append(n)
        for i, n in enumerate(virtual_sizes):
            self.ids[(-(i + 1), 0)] = len(sizes)
            sizes.append(n)
        self.sizes = np.array(sizes, dtype=np.int64)
        self.offsets = np.concatenate([[0], np.cumsum(self.sizes)])

    def atoms(self, dim: Dim) -> np.ndarray:
        i = self.ids[dim]
        return np.arange(self.offsets[i], self.offsets[i + 1])

    def size(self, dim: Dim) -> int:
        return int(self.sizes[self.ids[dim]])


class _UnionFind:
    def __init__(self, n: int):
        self.parent = list(range(n))

    def find(self, x: int) -> int:
        while self.parent[x] != x:
            self.parent[x] = self.parent[self.parent[x]]
            x = self.parent[x]
        return x

    def union(self, a: int, b: int) -> None:
        self.parent[self.find(a)] = self.find(b)


def _choose_carriers(links: list[Links], table: _DimTable, graph: Graph, io_dims: set[Dim]) -> dict[int, Dim | None]:
    """For each reshape (by position in a flat list), the split dim that carries the units."""
    reshapes = [r for l in links for r in l.reshape]
    param_dims = {(t.index, d) for t in graph.tensors if t.kind == "parameter" for d, n in enumerate(t.shape) if n > 1}
    tagged = {dim: tag for l in links for dim, tag in l.tags}
    blocked = {dim for l in links for dim, _ in l.blocked} | io_dims
    carriers: dict[int, Dim | None] = {}
    for _ in range(3):  # carriers join components, which can change later choices
        uf = _UnionFind(len(table.sizes))
        for l in links:
            for a, b in l.identity:
                uf.union(table.ids[a], table.ids[b])
            for whole, part, _off in l.segment:
                uf.union(table.ids[whole], table.ids[part])
        for i, carrier in carriers.items():
            if carrier is not None:
                uf.union(table.ids[carrier], table.ids[reshapes[i][1]])
        def roots(dims):
            return {uf.find(table.ids[d]) for d in dims if d in table.ids}
        param_roots, blocked_roots = roots(param_dims), roots(blocked)
        head_roots = roots([d for d, tag in tagged.items() if tag in ("head", "batched heads")])
        batched_roots = roots([d for d, tag in tagged.items() if tag == "batched heads"])
        changed = False
        for i, (split_dims, flat) in enumerate(reshapes):
            candidates = [d for d in split_dims if table.size(d) > 1]
            free = [d for d in candidates if uf.find(table.ids[d]) not in blocked_roots]
            if uf.find(table.ids[flat]) in batched_roots:
                # batch * heads folded for a bmm: the leading (batch, window) dim is not the heads
                free = [d for d in free if d[1] != 0] + [d for d in free if d[1] == 0]
            ranked = ([d for d in free if uf.find(table.ids[d]) in head_roots]
                      + [d for d in free if uf.find(table.ids[d]) in param_roots] + free)
            choice = ranked[0] if ranked else None
            if carriers.get(i, "unset") != choice:
                carriers[i] = choice
                changed = True
        if not changed:
            break
    return carriers


def _reshape_edges(split_dims: list[Dim], flat: Dim, carrier: Dim, table: _DimTable) -> tuple[np.ndarray, np.ndarray]:
    sizes = [table.size(d) for d in split_dims]
    k = split_dims.index(carrier)
    inner = int(np.prod(sizes[k + 1:])) if k + 1 < len(sizes) else 1
    positions = (np.arange(table.size(flat)) // inner) % sizes[k]
    return table.atoms(flat), table.atoms(carrier)[positions]


def analyze_graph(graph: Graph) -> Analysis:
    """Group the parameters of a traced graph into coupled, prunable units."""
    ctx = Context(graph)
    links, unknown = [], []
    for op in graph.ops:
        op_links, known = links_for(op, ctx)
        links.append(op_links)
        if not known:
            unknown.append(op.name)
    table = _DimTable(graph, ctx.virtual_sizes)
    io_dims = {(t.index, d) for t in graph.tensors if t.kind == "input" for d in range(len(t.shape))}
    io_dims |= {(o, d) for o in graph.outputs for d in range(len(graph.tensors[o].shape))}
    buffers = _fixed_buffer_dims(graph)
    carriers = _choose_carriers(links, table, graph, io_dims | buffers)

    sources, targets = [], []
    blocked_atoms: dict[int, str] = {}

    def block(dim: Dim, reason: str) -> None:
        for a in table.atoms(dim):
            blocked_atoms.setdefault(int(a), reason)

    reshape_index = 0
    for l in links:
        for a, b in l.identity:
            sources.append(table.atoms(a)); targets.append(table.atoms(b))
        for whole, part, offset in l.segment:
            n = table.size(part)
            sources.append(table.atoms(whole)[offset:offset + n]); targets.append(table.atoms(part))
        for split_dims, flat in l.reshape:
            carrier = carriers[reshape_index]
            reshape_index += 1
            if carrier is None:
                block(flat, "reshape with no dim that can carry channels")
                continue
            s, t = _reshape_edges(split_dims, flat, carrier, table)
            sources.append(s); targets.append(t)
            for d in split_dims:
                if d != carrier and table.size(d) > 1:
                    block(d, "split dim that cannot carry channels")
        for dim, reason in l.blocked:
            block(dim, reason)
    for dim in io_dims:
        block(dim, "model input or output")
    for dim in buffers:
        block(dim, "buffer the cut cannot follow")

    n_atoms = int(table.offsets[-1])
    src = np.concatenate(sources) if sources else np.zeros(0, dtype=np.int64)
    dst = np.concatenate(targets) if targets else np.zeros(0, dtype=np.int64)
    matrix = coo_matrix((np.ones(len(src), dtype=np.int8), (src, dst)), shape=(n_atoms, n_atoms))
    _, component = connected_components(matrix, directed=False)

    blocked_reason: dict[int, str] = {}
    for atom, reason in blocked_atoms.items():
        blocked_reason.setdefault(int(component[atom]), reason)

    unit_of: dict[tuple[str, int], np.ndarray] = {}
    owner: dict[int, str] = {}
    for name, node in graph.parameters.items():
        if owner.get(node) is not None:
            continue  # tied parameter: one name speaks for the node
        owner[node] = name
        for d, n in enumerate(graph.tensors[node].shape):
            if n > 1:
                unit_of[(name, d)] = component[table.atoms((node, d))]
    head_components = {int(component[a]) for l in links for dim, tag in l.tags if tag in ("head", "batched heads")
                       for a in table.atoms(dim)}
    groups = _collect_groups(unit_of, blocked_reason, head_components)
    return Analysis(graph, groups, unit_of, unknown, table, component)


# Buffers that surgery cuts with their module (a batch norm's statistics); any other buffer
# (a coordinate table, a fixed positional code) keeps its shape, so nothing may cut across it.
_CUT_BUFFERS = ("running_mean", "running_var")


def _fixed_buffer_dims(graph: Graph) -> set[Dim]:
    return {(t.index, d) for t in graph.tensors if t.kind == "buffer" and t.name
            and not t.name.endswith(_CUT_BUFFERS) for d, n in enumerate(t.shape) if n > 1}


def _collect_groups(unit_of: dict[tuple[str, int], np.ndarray], blocked: dict[int, str],
                    heads: set[int]) -> list[Group]:
    """Units that share a parameter dim form one group."""
    # members and units as the nodes of one bipartite graph: its components are the groups
    members_in_order = list(unit_of)
    arrays = [unit_of[m] for m in members_in_order]
    all_units = np.concatenate(arrays) if arrays else np.zeros(0, dtype=np.int64)
    n_members, n_nodes = len(arrays), len(arrays) + (int(all_units.max()) + 1 if all_units.size else 0)
    rows = np.repeat(np.arange(n_members), [len(a) for a in arrays])
    edges = coo_matrix((np.ones(len(rows), dtype=np.int8), (rows, n_members + all_units)), shape=(n_nodes, n_nodes))
    _, label = connected_components(edges, directed=False)
    by_root: dict[int, list[tuple[str, int]]] = {}
    for i, m in enumerate(members_in_order):
        by_root.setdefault(int(label[i]), []).append(m)
    groups = []
    for members in by_root.values():
        joined = np.concatenate([unit_of[m] for m in members])
        values, first = np.unique(joined, return_index=True)
        units = values[np.argsort(first)].tolist()          # in order of first appearance
        prunable = [u not in blocked for u in units]
        reasons = [blocked[u] for u in units if u in blocked]
        kind = "head" if any(u in heads for u in units) else "channel"
        groups.append(Group(len(groups), members, units, prunable, reasons[0] if reasons else None, kind))
    return groups


def analyze(model: nn.Module, example_inputs: Any) -> Analysis:
    """Trace `model` on `example_inputs` and find its coupled channel groups."""
    return analyze_graph(trace(model, example_inputs))


# Reasons that mark an axis that is not a channel axis at all: a conv kernel's height and
# width, the rows of a table looked up by index (relative-position bias, vocabulary).
NON_CHANNEL_REASONS = ("kernel dim", "depthwise kernel dim", "embedding vocabulary", "indexed by a tensor",
                       "indexed by gather")


def is_channel_axis(group: Group) -> bool:
    """False for a group of kernel or table-row positions: no unit of it could ever be cut."""
    return bool(group.prunable_units) or group.reason not in NON_CHANNEL_REASONS


def table(analysis: Analysis, every_axis: bool = False) -> str:
    """The groups as a plain-text table (kernel and table-row axes left out unless `every_axis`)."""
    shown = [g for g in analysis.groups if every_axis or is_channel_axis(g)]
    rows = [("group", "kind", "units", "prunable", "members", "blocked by")]
    for g in shown:
        rows.append((str(g.index), g.kind, str(g.size), str(len(g.prunable_units)), g.members_text(), g.reason or ""))
    widths = [max(len(r[c]) for r in rows) for c in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip() for r in rows]
    hidden = len(analysis.groups) - len(shown)
    if hidden:
        lines.append(f"({hidden} kernel / table-row axes hidden: they are not channels)")
    if analysis.unknown_ops:
        lines.append(f"ops without a rule (their channels are left intact): {', '.join(sorted(set(analysis.unknown_ops)))}")
    return "\n".join(lines)


