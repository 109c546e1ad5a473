"""How each aten op moves channels: links between the dimensions of its tensors.

A rule reads one recorded op and says which (tensor node, dim) pairs index the same
channels (`identity`), which dim is a slice of another (`segment`, for cat / split /
slice), which dims are a reshape of another (`reshape`), and which dims must not be
pruned (`block`, with the reason). An op without a rule blocks every dimension it
touches and is reported by name: an unknown op is never guessed to be element-wise.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from .trace import Graph, OpNode, Ref

Dim = tuple[int, int]  # (tensor node, dimension); virtual dims use negative node ids


@dataclass
class Links:
    identity: list[tuple[Dim, Dim]] = field(default_factory=list)
    segment: list[tuple[Dim, Dim, int]] = field(default_factory=list)      # (whole, part, offset)
    reshape: list[tuple[list[Dim], Dim]] = field(default_factory=list)     # (split dims, outer first; flat dim)
    blocked: list[tuple[Dim, str]] = field(default_factory=list)
    tags: list[tuple[Dim, str]] = field(default_factory=list)              # "head", "batched heads", "fixed"
    virtual: list[int] = field(default_factory=list)                       # sizes of virtual dims, ids -1, -2, ...


class Context:
    """What a rule may read: tensor shapes and the op's arguments."""

    def __init__(self, graph: Graph):
        self.graph = graph
        self.virtual_sizes: list[int] = []

    def shape(self, node: int) -> tuple[int, ...]:
        return self.graph.tensors[node].shape

    def virtual(self, links: Links, size: int) -> int:
        self.virtual_sizes.append(size)
        links.virtual.append(size)
        return -len(self.virtual_sizes)


def _node(value) -> int | None:
    return value.node if isinstance(value, Ref) else None


def _all_dims(ctx: Context, node: int) -> list[Dim]:
    return [(node, d) for d in range(len(ctx.shape(node)))]


def _same(links: Links, ctx: Context, a: int, b: int) -> None:
    """Every dim of a indexes the same channels as the matching dim of b (same rank)."""
    for d in range(min(len(ctx.shape(a)), len(ctx.shape(b)))):
        if ctx.shape(a)[d] == ctx.shape(b)[d]:
            links.identity.append(((a, d), (b, d)))


def _broadcast(links: Links, ctx: Context, inp: int, out: int) -> None:
    """Right-aligned broadcasting: dims of equal size are the same channels."""
    si, so = ctx.shape(inp), ctx.shape(out)
    for k in range(1, len(si) + 1):
        if k <= len(so) and si[-k] == so[-k]:
            links.identity.append(((inp, len(si) - k), (out, len(so) - k)))


def _dim(d: int, rank: int) -> int:
    return d + rank if d < 0 else d


def pointwise(op: OpNode, ctx: Context) -> Links:
    links = Links()
    for out in op.outputs:
        for node in op.inputs:
            _broadcast(links, ctx, node, out)
    return links


def fresh(op: OpNode, ctx: Context) -> Links:
    """Ops that create tensors from sizes alone (zeros, arange, empty): nothing to link."""
    return Links()


def convolution(op: OpNode, ctx: Context) -> Links:
    x, w, b = (_node(a) for a in op.args[:3])
    transposed, groups = op.args[6], op.args[8]
    out = op.outputs[0]
    links = Links(identity=[((x, 0), (out, 0))])
    in_ch, out_ch = ctx.shape(x)[1], ctx.shape(out)[1]
    w_in, w_out = (0, 1) if transposed else (1, 0)
    if groups == 1:
        links.identity += [((x, 1), (w, w_in)), ((w, w_out), (out, 1))]
    elif groups == in_ch == out_ch and not transposed:  # depthwise: a channel passes straight through
        links.identity += [((x, 1), (w, 0)), ((w, 0), (out, 1))]
        links.blocked.append(((w, 1), "depthwise kernel dim"))
    else:
        reason = f"grouped convolution (groups={groups}) keeps channels per group"
        links.blocked += [((x, 1), reason), ((out, 1), reason), ((w, 0), reason), ((w, 1), reason)]
    if b is not None:
        links.identity.append(((b, 0), (out, 1)))
    links.blocked += [((w, k), "kernel dim") for k in range(2, len(ctx.shape(w)))]
    return links


def addmm(op: OpNode, ctx: Context) -> Links:
    bias, x, w = (_node(a) for a in op.args[:3])
    out = op.outputs[0]
    links = Links(identity=[((x, 1), (w, 0)), ((w, 1), (out, 1)), ((x, 0), (out, 0))])
    _broadcast(links, ctx, bias, out)
    return links


def mm(op: OpNode, ctx: Context) -> Links:
    a, b = _node(op.args[0]), _node(op.args[1])
    out = op.outputs[0]
    return Links(identity=[((a, 1), (b, 0)), ((a, 0), (out, 0)), ((b, 1), (out, 1))])


def bmm(op: OpNode, ctx: Context) -> Links:
    a, b = _node(op.args[0]), _node(op.args[1])
    out = op.outputs[0]
    return Links(identity=[((a, 0), (b, 0)), ((a, 0), (out, 0)), ((a, 2), (b, 1)),
                           ((a, 1), (out, 1)), ((b, 2), (out, 2))])


def permute(op: OpNode, ctx: Context) -> Links:
    x, out = _node(op.args[0]), op.outputs[0]
    rank = len(ctx.shape(x))
    name = op.name.split(".")[1]
    if name in ("t", "t_"):
        order = [1, 0] if rank == 2 else list(range(rank))
    elif name in ("transpose", "transpose_", "swapaxes"):
        d0, d1 = _dim(op.args[1], rank), _dim(op.args[2], rank)
        order = list(range(rank))
        order[d0], order[d1] = order[d1], order[d0]
    else:
        order = [_dim(d, rank) for d in op.args[1]]
    return Links(identity=[((x, src), (out, dst)) for dst, src in enumerate(order)])


def _factor_blocks(a: tuple[int, ...], b: tuple[int, ...]) -> list[tuple[list[int], list[int]]] | None:
    """Group the dims of two shapes into consecutive blocks of equal products."""
    blocks, i, j = [], 0, 0
    while i < len(a) or j < len(b):
        bi, bj = [], []
        pa = pb = 1
        while True:
            if pa == pb and (bi or bj) and (pa != 1 or (i >= len(a) or a[i] != 1) and (j >= len(b) or b[j] != 1)):
                break
            if pa <= pb and i < len(a):
                pa *= a[i]; bi.append(i); i += 1
            elif j < len(b):
                pb *= b[j]; bj.append(j); j += 1
            elif i < len(a):
                pa *= a[i]; bi.append(i); i += 1
            else:
                break
        if pa != pb:
            return None
        blocks.append((bi, bj))
    return blocks


def view(op: OpNode, ctx: Context) -> Links:
    x, out = _node(op.args[0]), op.outputs[0]
    sa, sb = ctx.shape(x), ctx.shape(out)
    links = Links()
    blocks = _factor_blocks(sa, sb)
    if blocks is None:
        links.blocked += [(d, "reshape without a dim correspondence") for d in _all_dims(ctx, x) + _all_dims(ctx, out)]
        return links
    for bi, bj in blocks:
        bi = [d for d in bi if sa[d] != 1]
        bj = [d for d in bj if sb[d] != 1]
        if len(bi) == 1 and len(bj) == 1:
            links.identity.append(((x, bi[0]), (out, bj[0])))
        elif len(bi) == 1 and len(bj) > 1:
            links.reshape.append(([(out, d) for d in bj], (x, bi[0])))
        elif len(bi) > 1 and len(bj) == 1:
            links.reshape.append(([(x, d) for d in bi], (out, bj[0])))
        elif bi or bj:
            reason = "reshape that regroups several dims at once"
            links.blocked += [((x, d), reason) for d in bi] + [((out, d), reason) for d in bj]
    return links


def expand(op: OpNode, ctx: Context) -> Links:
    links = Links()
    _broadcast(links, ctx, _node(op.args[0]), op.outputs[0])
    return links


def unsqueeze(op: OpNode, ctx: Context) -> Links:
    x, out = _node(op.args[0]), op.outputs[0]
    d = _dim(op.args[1], len(ctx.shape(out)))
    kept = [k for k in range(len(ctx.shape(out))) if k != d]
    return Links(identity=[((x, i), (out, k)) for i, k in enumerate(kept)])


def squeeze(op: OpNode, ctx: Context) -> Links:
    x, out = _node(op.args[0]), op.outputs[0]
    sx = ctx.shape(x)
    if len(op.args) > 1:
        dims = op.args[1] if isinstance(op.args[1], (list, tuple)) else [op.args[1]]
        dims = {_dim(d, len(sx)) for d in dims if sx[_dim(d, len(sx))] == 1}
    else:
        dims = {k for k, s in enumerate(sx) if s == 1}
    kept = [k for k in range(len(sx)) if k not in dims]
    return Links(identity=[((x, k), (out, i)) for i, k in enumerate(kept)])


def _others(links: Links, x: int, out: int, rank: int, skip: int, removed: bool = False) -> None:
    for k in range(rank):
        if k == skip:
            continue
        links.identity.append(((x, k), (out, k - 1 if removed and k > skip else k)))


def slice_(op: OpNode, ctx: Context) -> Links:
    x, out = _node(op.args[0]), op.outputs[0]
    rank = len(ctx.shape(x))
    d = _dim(op.args[1] if len(op.args) > 1 else 0, rank)
    start = op.args[2] if len(op.args) > 2 and op.args[2] is not None else 0
    step = op.args[4] if len(op.args) > 4 else 1
    size = ctx.shape(x)[d]
    start = max(0, min(size, start + size if start < 0 else start))
    links = Links()
    _others(links, x, out, rank, d)
    if step == 1:
        links.segment.append(((x, d), (out, d), start))
    else:
        links.blocked.append(((x, d), "strided slice"))
    return links


def select(op: OpNode, ctx: Context) -> Links:
    x, out = _node(op.args[0]), op.outputs[0]
    rank = len(ctx.shape(x))
    d = _dim(op.args[1], rank)
    links = Links(blocked=[((x, d), "indexed by select")])
    _others(links, x, out, rank, d, removed=True)
    return links


def unbind(op: OpNode, ctx: Context) -> Links:
    x = _node(op.args[0])
    rank = len(ctx.shape(x))
    d = _dim(op.args[1] if len(op.args) > 1 else 0, rank)
    links = Links(blocked=[((x, d), "indexed by unbind")])
    for out in op.outputs:
        _others(links, x, out, rank, d, removed=True)
    return links


def gather(op: OpNode, ctx: Context) -> Links:
    """out[..., i, ...] = x[..., index[..., i, ...], ...] along one dim: that dim is data-chosen."""
    x, index, out = _node(op.args[0]), _node(op.args[2]), op.outputs[0]
    rank = len(ctx.shape(x))
    d = _dim(op.args[1], rank)
    links = Links(blocked=[((x, d), "indexed by gather"), ((out, d), "indexed by gather")])
    for k in range(rank):
        if k != d and ctx.shape(x)[k] == ctx.shape(out)[k]:
            links.identity.append(((x, k), (out, k)))
    if index is not None:
        _same(links, ctx, index, out)
    return links


def index(op: OpNode, ctx: Context) -> Links:
    """x[idx0, idx1, ...] with tensor indices: the indexed dims are data-chosen.

    Dims before the first and after the last indexed one keep their channels (at the
    front and the back of the output); everything else is blocked.
    """
    x, out = _node(op.args[0]), op.outputs[0]
    rank, out_rank = len(ctx.shape(x)), len(ctx.shape(out))
    indexed = [k for k, ref in enumerate(op.args[1]) if ref is not None]
    links = Links(blocked=[((x, k), "indexed by a tensor") for k in indexed])
    if not indexed:
        _same(links, ctx, x, out)
        return links
    first, last = indexed[0], indexed[-1]
    if last - first + 1 != len(indexed):  # torch moves separated index dims to the front
        links.blocked += [(d, "indexed by separated tensors") for d in _all_dims(ctx, x) + _all_dims(ctx, out)]
        return links
    for k in range(first):
        links.identity.append(((x, k), (out, k)))
    for k in range(last + 1, rank):
        links.identity.append(((x, k), (out, out_rank - (rank - k))))
    mixed = {first + j for j in range(out_rank - first - (rank - last - 1))}
    links.blocked += [((out, k), "indexed by a tensor") for k in mixed]
    return links


def scan(op: OpNode, ctx: Context) -> Links:
    """cumsum / cumprod mix entries along their dim; the others pass through."""
    x, out = _node(op.args[0]), op.outputs[0]
    rank = len(ctx.shape(x))
    d = _dim(op.args[1], rank) if rank else 0
    links = Links(blocked=[((x, d), "running total along this dim")] if rank else [])
    _others(links, x, out, rank, d)
    return links


def split(op: OpNode, ctx: Context) -> Links:
    x = _node(op.args[0])
    rank = len(ctx.shape(x))
    d = _dim(op.args[2] if len(op.args) > 2 else 0, rank)
    links, offset = Links(), 0
    for out in op.outputs:
        _others(links, x, out, rank, d)
        links.segment.append(((x, d), (out, d), offset))
        offset += ctx.shape(out)[d]
    return links


def cat(op: OpNode, ctx: Context) -> Links:
    out = op.outputs[0]
    rank = len(ctx.shape(out))
    d = _dim(op.args[1] if len(op.args) > 1 else 0, rank)
    links, offset = Links(), 0
    for ref in op.args[0]:
        x = _node(ref)
        if x is None or len(ctx.shape(x)) != rank:  # legacy empty tensors take no part
            continue
        _others(links, x, out, rank, d)
        links.segment.append(((out, d), (x, d), offset))
        offset += ctx.shape(x)[d]
    return links


def stack(op: OpNode, ctx: Context) -> Links:
    out = op.outputs[0]
    rank = len(ctx.shape(out))
    d = _dim(op.args[1] if len(op.args) > 1 else 0, rank)
    links = Links(blocked=[((out, d), "new dim of stack")])
    for ref in op.args[0]:
        x = _node(ref)
        for k in range(rank - 1):
            links.identity.append(((x, k), (out, k if k < d else k + 1)))
    return links


def batch_norm(op: OpNode, ctx: Context) -> Links:
    x, out = _node(op.args[0]), op.outputs[0]
    links = Links()
    _same(links, ctx, x, out)
    channels = ctx.shape(x)[1]
    for ref in op.args[1:5]:
        node = _node(ref)
        if node is not None and ctx.shape(node) == (channels,):
            links.identity.append(((node, 0), (x, 1)))
    for extra in op.outputs[1:]:
        if ctx.shape(extra) == (channels,):
            links.identity.append(((extra, 0), (x, 1)))
    return links


def layer_norm(op: OpNode, ctx: Context) -> Links:
    x, out = _node(op.args[0]), op.outputs[0]
    normalized = len(op.args[1])
    rank = len(ctx.shape(x))
    links = Links()
    _same(links, ctx, x, out)
    for ref in op.args[2:4]:
        node = _node(ref)
        if node is not None:
            for k in range(normalized):
                links.identity.append(((node, k), (x, rank - normalized + k)))
    for extra in op.outputs[1:]:
        for k in range(rank - normalized):
            links.identity.append(((extra, k), (x, k)))
    return links


def rms_norm(op: OpNode, ctx: Context) -> Links:
    x, out = _node(op.args[0]), op.outputs[0]
    normalized = len(op.args[1])
    rank = len(ctx.shape(x))
    links = Links()
    _same(links, ctx, x, out)
    weight = _node(op.args[2]) if len(op.args) > 2 else None
    if weight is not None:
        for k in range(normalized):
            links.identity.append(((weight, k), (x, rank - normalized + k)))
    for extra in op.outputs[1:]:
        _broadcast(links, ctx, extra, x)
    return links


def group_norm(op: OpNode, ctx: Context) -> Links:
    x, out = _node(op.args[0]), op.outputs[0]
    links = Links()
    _same(links, ctx, x, out)
    reason = "GroupNorm keeps channels per group"
    links.blocked.append(((x, 1), reason))
    for ref in op.args[1:3]:
        node = _node(ref)
        if node is not None:
            links.identity.append(((node, 0), (x, 1)))
    return links


def reduction(op: OpNode, ctx: Context) -> Links:
    """mean / sum / amax over some dims: the other dims pass through."""
    x, out = _node(op.args[0]), op.outputs[0]
    rank = len(ctx.shape(x))
    dims = op.args[1] if len(op.args) > 1 and op.args[1] is not None else list(range(rank))
    dims = {_dim(d, rank) for d in (dims if isinstance(dims, (list, tuple)) else [dims])}
    keepdim = len(op.args) > 2 and op.args[2] is True
    links, j = Links(), 0
    for k in range(rank):
        if k in dims:
            j += keepdim
            continue
        links.identity.append(((x, k), (out, j)))
        j += 1
    return links


def pool(op: OpNode, ctx: Context) -> Links:
    """Pools and upsampling: batch and channel dims pass, spatial dims are new."""
    x = _node(op.args[0])
    links = Links()
    lead = len(ctx.shape(x)) - (len(ctx.shape(x)) - 2 if len(ctx.shape(x)) > 2 else 0)
    for out in op.outputs:
        for k in range(min(lead, len(ctx.shape(out)))):
            links.identity.append(((x, k), (out, k)))
    return links


def pad(op: OpNode, ctx: Context) -> Links:
    x, out = _node(op.args[0]), op.outputs[0]
    rank = len(ctx.shape(x))
    padded = {rank - 1 - i // 2 for i, p in enumerate(op.args[1]) if p}
    links = Links()
    for k in range(rank):
        if k not in padded:
            links.identity.append(((x, k), (out, k)))
    return links


def embedding(op: OpNode, ctx: Context) -> Links:
    weight, indices = _node(op.args[0]), _node(op.args[1])
    out = op.outputs[0]
    links = Links(identity=[((weight, 1), (out, len(ctx.shape(out)) - 1))],
                  blocked=[((weight, 0), "embedding vocabulary")])
    _same(links, ctx, indices, out)
    return links


def sdpa(op: OpNode, ctx: Context) -> Links:
    q, k, v = (_node(a) for a in op.args[:3])
    out = op.outputs[0]
    links = Links(identity=[((q, 0), (out, 0)), ((k, 0), (q, 0)), ((v, 0), (q, 0)),
                            ((q, 2), (out, 2)), ((k, 2), (v, 2)), ((q, 1), (out, 1))])
    if ctx.shape(k)[1] == ctx.shape(q)[1]:
        links.identity += [((k, 1), (q, 1)), ((v, 1), (q, 1))]
    else:
        reason = "grouped-query attention heads (not yet prunable)"
        links.blocked += [((q, 1), reason), ((k, 1), reason), ((v, 1), reason)]
    links.tags += [((q, 1), "head"), ((k, 1), "head"), ((v, 1), "head"), ((out, 1), "head")]
    reason = "head dim (the attention scale depends on it)"
    links.blocked += [((q, 3), reason), ((k, 3), reason), ((v, 3), reason), ((out, 3), reason)]
    _attention_mask(links, ctx, op, q, k)
    return links


def _attention_mask(links: Links, ctx: Context, op: OpNode, q: int, k: int) -> None:
    """A mask or bias [batch, heads, queries, keys] (broadcast from the right) follows the scores.

    A per-head bias (T5's relative positions, ALiBi) must lose the heads the queries lose.
    """
    mask = op.kwargs.get("attn_mask")
    if mask is None and any(k in op.name for k in ("efficient", "cudnn", "overrideable")) and len(op.args) > 3:
        mask = op.args[3]
    mask = _node(mask)
    if mask is None:
        return
    scores = [(q, 0), (q, 1), (q, 2), (k, 2)]
    shape = ctx.shape(mask)
    for offset in range(1, min(len(shape), 4) + 1):
        partner = scores[-offset]
        if shape[-offset] == ctx.shape(partner[0])[partner[1]]:
            links.identity.append(((mask, len(shape) - offset), partner))


def native_mha(op: OpNode, ctx: Context) -> Links:
    """torch's fused MultiheadAttention: heads are units of in_proj rows and out_proj columns."""
    query, key, value = (_node(a) for a in op.args[:3])
    embed_dim, heads = op.args[3], op.args[4]
    qkv_w, qkv_b, proj_w, proj_b = (_node(a) for a in op.args[5:9])
    out = op.outputs[0]
    links = Links()
    rank = len(ctx.shape(query))
    for x in (query, key, value):
        links.identity.append(((x, rank - 1), (qkv_w, 1)))
        for k in range(rank - 1):
            links.identity.append(((x, k), (out, k)))
    links.identity += [((proj_w, 0), (out, rank - 1)), ((proj_b, 0), (out, rank - 1))]
    three, head, head_dim = (ctx.virtual(links, n) for n in (3, heads, embed_dim // heads))
    links.reshape += [([(three, 0), (head, 0), (head_dim, 0)], (qkv_w, 0)),
                      ([(three, 0), (head, 0), (head_dim, 0)], (qkv_b, 0)),
                      ([(head, 0), (head_dim, 0)], (proj_w, 1))]
    links.tags.append(((head, 0), "head"))
    links.blocked += [((three, 0), "q/k/v selector"), ((head_dim, 0), "head dim (the attention scale depends on it)")]
    for extra in op.outputs[1:]:
        links.blocked += [(d, "attention weights output") for d in _all_dims(ctx, extra)]
    return links


def copy_(op: OpNode, ctx: Context) -> Links:
    dst, src = _node(op.args[0]), _node(op.args[1])
    links = Links()
    _same(links, ctx, dst, op.outputs[0])
    if src is not None:
        _broadcast(links, ctx, src, dst)
    return links


POINTWISE = """abs add add_ sub sub_ mul mul_ div div_ neg relu relu_ gelu gelu_ silu silu_ sigmoid
sigmoid_ tanh tanh_ hardtanh hardtanh_ hardswish hardswish_ hardsigmoid leaky_relu leaky_relu_
elu elu_ mish softplus exp log sqrt rsqrt pow clamp clamp_ clamp_min clamp_max erf where
masked_fill masked_fill_ maximum minimum clone detach alias _to_copy lift_fresh_copy rsub
_softmax _log_softmax native_dropout dropout lt le gt ge eq ne logical_not bitwise_not
reciprocal square fill_ zero_ sign cos sin bitwise_and bitwise_or bitwise_xor
logical_and logical_or""".split()
FRESH = """device empty zeros ones full arange scalar_tensor empty_like zeros_like ones_like
full_like new_zeros new_ones new_empty new_full rand randn randint lift_fresh""".split()

RULES: dict[str, Callable[[OpNode, Context], Links]] = {
    **{name: pointwise for name in POINTWISE},
    **{name: fresh for name in FRESH},
    "convolution": convolution, "addmm": addmm, "mm": mm, "bmm": bmm,
    "t": permute, "transpose": permute, "permute": permute,
    "view": view, "_unsafe_view": view, "reshape": view,
    "expand": expand, "unsqueeze": unsqueeze, "squeeze": squeeze,
    "slice": slice_, "select": select, "unbind": unbind,
    "split": split, "split_with_sizes": split, "gather": gather, "index": index,
    "cumsum": scan, "cumprod": scan, "cat": cat, "stack": stack,
    "native_batch_norm": batch_norm, "_native_batch_norm_legit_no_training": batch_norm,
    "_native_batch_norm_legit": batch_norm,
    # the same op as traced for real on a GPU (a model whose forward cannot run on fake CPU tensors)
    "cudnn_batch_norm": batch_norm, "miopen_batch_norm": batch_norm,
    "native_layer_norm": layer_norm, "_fused_rms_norm": rms_norm, "native_group_norm": group_norm,
    "mean": reduction, "sum": reduction, "amax": reduction, "amin": reduction,
    "max_pool2d_with_indices": pool, "max_pool1d_with_indices": pool, "avg_pool2d": pool,
    "avg_pool1d": pool, "_adaptive_avg_pool2d": pool, "adaptive_max_pool2d": pool,
    "upsample_nearest2d": pool, "upsample_bilinear2d": pool,
    "constant_pad_nd": pad, "embedding": embedding,
    "_scaled_dot_product_flash_attention_for_cpu": sdpa,
    "_scaled_dot_product_flash_attention": sdpa, "_scaled_dot_product_efficient_attention": sdpa,
    "_scaled_dot_product_cudnn_attention": sdpa, "_scaled_dot_product_fused_attention_overrideable": sdpa,
    "_native_multi_head_attention": native_mha, "copy_": copy_,
}


# ------------------------------------------------------------------ recurrent modules
# nn.RNN / LSTM / GRU are recorded by trace.py as one "module.rnn" op. Unit i of the
# virtual hidden dim is hidden unit i of every layer and of both directions at once:
# torch keeps one hidden_size for all of them, so a cut that left layers or directions
# with different widths could not run. Each direction's gate rows (4 for LSTM, 3 for
# GRU, 1 for RNN, stacked in blocks of hidden_size), its recurrent columns, the next
# layer's input columns (both directions' halves) and the output's features (forward
# half then reverse half) all index that one dim, as do the last dims of h_0 / c_0 and
# h_n / c_n. Layer 0's input columns follow the input's feature dim.

RNN_GATES = {"LSTM": 4, "GRU": 3, "RNN_TANH": 1, "RNN_RELU": 1}


def _rnn_block_all(op: OpNode, ctx: Context, reason: str) -> Links:
    nodes = [*op.inputs, *op.outputs]
    return Links(blocked=[(d, reason) for node in nodes for d in _all_dims(ctx, node)])


def _rnn_state(links: Links, ctx: Context, state: int, hidden: int, batch: Dim | None) -> None:
    """h / c of shape (layers * directions, [batch,] hidden): last dim is the hidden units."""
    rank = len(ctx.shape(state))
    links.identity.append(((state, rank - 1), (hidden, 0)))
    links.blocked.append(((state, 0), "RNN layer and direction index"))
    if rank == 3 and batch is not None:
        links.identity.append(((state, 1), batch))


def _rnn_weights(links: Links, params: dict, config: dict, hidden: int, features: Dim) -> None:
    """Gate rows, recurrent columns and input columns of every layer and direction."""
    size, gates = config["hidden_size"], RNN_GATES[config["mode"]]
    directions = ("", "_reverse") if config["bidirectional"] else ("",)
    for layer in range(config["num_layers"]):
        for suffix in directions:
            tag = f"l{layer}{suffix}"
            for name in (f"weight_ih_{tag}", f"weight_hh_{tag}", f"bias_ih_{tag}", f"bias_hh_{tag}"):
                if name in params:
                    links.segment += [((params[name].node, 0), (hidden, 0), g * size) for g in range(gates)]
            links.identity.append(((params[f"weight_hh_{tag}"].node, 1), (hidden, 0)))
            w_ih = params[f"weight_ih_{tag}"].node
            if layer == 0:
                links.identity.append(((w_ih, 1), features))
            else:
                links.segment += [((w_ih, 1), (hidden, 0), d * size) for d in range(len(directions))]


def rnn_module(op: OpNode, ctx: Context) -> Links:
    """nn.RNN / LSTM / GRU: hidden units shared by every layer and direction (see above)."""
    config, params = op.kwargs["config"], op.kwargs["parameters"]
    x = _node(op.args[0])
    if x is None:
        return _rnn_block_all(op, ctx, f"{config['mode']} called on a {op.args[0]} (only plain tensors are followed)")
    if config["proj_size"]:
        return _rnn_block_all(op, ctx, f"{config['mode']} with proj_size={config['proj_size']} "
                                       "(projected hidden units are not prunable yet)")
    directions = 2 if config["bidirectional"] else 1
    expected = [f"weight_{kind}_l{k}{s}" for k in range(config["num_layers"]) for kind in ("ih", "hh")
                for s in (("", "_reverse") if directions == 2 else ("",))]
    missing = [name for name in expected if name not in params]
    if missing:
        return _rnn_block_all(op, ctx, f"{config['mode']} parameter {missing[0]} not found in the graph")
    links = Links()
    hidden = ctx.virtual(links, config["hidden_size"])
    rank = len(ctx.shape(x))
    _rnn_weights(links, params, config, hidden, (x, rank - 1))
    out = op.outputs[0]
    for d in range(rank - 1):
        links.identity.append(((x, d), (out, d)))
    links.segment += [((out, rank - 1), (hidden, 0), d * config["hidden_size"]) for d in range(directions)]
    batch = (x, 0 if config["batch_first"] else 1) if rank == 3 else None
    given = [_node(v) for arg in op.args[1:] for v in (arg if isinstance(arg, tuple) else (arg,))]
    for state in [*given, *op.outputs[1:]]:
        if state is not None:
            _rnn_state(links, ctx, state, hidden, batch)
    return links


RULES["rnn"] = rnn_module


# ------------------------------------------------------------------ attention written by hand
# `q @ k.transpose(-2, -1)` on [batch, heads, tokens, head_dim] runs as a bmm over
# [batch * heads, ...]: the bmm's batch dim is tagged "batched heads", so the reshape that merged
# batch and heads carries the heads (not the batch, nor window counts folded into it),
# and the q/k/v projection loses whole heads as with scaled_dot_product_attention.

def bmm_heads(op: OpNode, ctx: Context) -> Links:
    links = bmm(op, ctx)
    a, b = _node(op.args[0]), _node(op.args[1])
    links.tags += [((a, 0), "batched heads"), ((b, 0), "batched heads"), ((op.outputs[0], 0), "batched heads")]
    return links


RULES["bmm"] = bmm_heads


# ------------------------------------------------------------------ positions are not channels
# A convolution's output height and width follow the input's: flattened into tokens and
# mixed by a Linear (MLP-Mixer, ResMLP), they must never be cut.

def convolution_positions(op: OpNode, ctx: Context) -> Links:
    links = convolution(op, ctx)
    out = op.outputs[0]
    links.blocked += [((out, k), "spatial positions (tokens) of a convolution output")
                      for k in range(2, len(ctx.shape(out)))]
    return links


RULES["convolution"] = convolution_positions


def op_key(op: OpNode) -> str:
    return op.name.split(".")[1] if "." in op.name else op.name


def links_for(op: OpNode, ctx: Context) -> tuple[Links, bool]:
    """The op's links, and whether a rule knew the op."""
    rule = RULES.get(op_key(op))
    if rule is None:
        links = Links()
        reason = f"unknown op {op.name}"
        for node in [*op.inputs, *op.outputs]:
            links.blocked += [(d, reason) for d in _all_dims(ctx, node)]
        return links, False
    return rule(op, ctx), True


__all__ = ["Context", "Dim", "Links", "RULES", "links_for"]
