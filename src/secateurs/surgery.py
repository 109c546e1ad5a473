"""Physical removal of channels: one small function per layer type slices the weights in
place and updates the attributes, so the module stays an ordinary, smaller ``nn.Module``
whose forward, backward, ``repr`` and ``state_dict`` all agree.

This is the bottom of structured pruning. The graph engine decides which indices each
coupled group keeps and calls these functions; surgery only edits modules.

- `keep_out` / `keep_in` dispatch through `OUT_SURGERY` / `IN_SURGERY`, dicts from layer
  class to function, looked up along the class MRO so subclasses work. Add an entry to
  teach surgery a new layer type; `supports` asks whether one exists.
- `keep_heads` removes whole heads of ``nn.MultiheadAttention`` (the module becomes a
  `PrunedMultiheadAttention`, see there); `keep_hidden` / `keep_hidden_all` remove hidden
  units of ``nn.RNN`` / ``nn.LSTM`` / ``nn.GRU``; `keep_param_dim` slices any free
  parameter or buffer (cls tokens, positional embeddings, layer-scale gammas).

Every ``keep`` is a 1-D integer tensor (or sequence) of indices into the layer's current
size. It must be non-empty, in range and free of repeats; it is sorted, so kept channels
keep their order. Everything is validated before any tensor changes, so a call that
raises leaves the module as it was. Parameters stay ``nn.Parameter`` with their
``requires_grad``, dtype and device; their ``.grad`` is dropped because its shape no
longer fits. A mask buffer ``<param>_prune_mask`` (`secateurs.sparsity`) is sliced with
its parameter. A cut parameter is a new ``nn.Parameter``: one shared by two modules (tied
weights) must be cut in both and tied again, and optimizers built before must be rebuilt.

Channel-wise layers whose inputs and outputs are the same channels (norms, PReLU) are in
`OUT_SURGERY` only, so a group is never cut twice. A depthwise convolution is the one
layer in both registries; for it `keep_out` and `keep_in` are the same cut: call one.
"""
from __future__ import annotations

import math
from typing import Callable, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from .errors import IncompatibleLayer, InvalidArgument
from .layers import is_conv1d
from .sparsity import MASK_SUFFIX

Keep = Union[torch.Tensor, Sequence[int]]
Surgery = Callable[[nn.Module, Keep], None]


# ---------------------------------------------------------------- validation and slicing

def _checked_keep(module: nn.Module, keep: Keep, size: Optional[int], what: str) -> torch.Tensor:
    """Return `keep` as a sorted CPU long tensor, or raise InvalidArgument saying why not.

    `what` names the indexed things in the plural ("output channels"); `size` is their
    count, or None where any count fits (a PReLU with one shared slope).
    """
    layer = type(module).__name__
    if not isinstance(keep, torch.Tensor):
        try:
            keep = torch.as_tensor(keep)
        except (TypeError, ValueError, RuntimeError) as err:
            raise InvalidArgument(f"{layer}: keep must be a 1-D tensor of indices of {what}, "
                                  f"got {keep!r}") from err
    if keep.dim() != 1:
        raise InvalidArgument(f"{layer}: keep must be a 1-D tensor of indices of {what}, "
                              f"got shape {tuple(keep.shape)}")
    if keep.numel() == 0:
        raise InvalidArgument(f"{layer}: keep is empty; at least one of its {what} must stay")
    if keep.dtype == torch.bool or keep.is_floating_point() or keep.is_complex():
        raise InvalidArgument(f"{layer}: keep must hold integer indices of {what}, got dtype {keep.dtype}")
    keep = keep.detach().to("cpu", torch.long).sort().values
    low, high = int(keep[0]), int(keep[-1])
    if low < 0:
        raise InvalidArgument(f"{layer}: keep index {low} is negative; indices of {what} start at 0")
    if size is not None and high >= size:
        raise InvalidArgument(f"{layer}: keep index {high} is out of range for its {size} {what} "
                              f"(valid: 0..{size - 1})")
    repeats = keep[1:][keep[1:] == keep[:-1]]
    if repeats.numel():
        raise InvalidArgument(f"{layer}: keep repeats index {int(repeats[0])} of its {what}; "
                              f"indices must be unique")
    return keep


def _check_editable(module: nn.Module) -> None:
    """Raise IncompatibleLayer when `module` holds weights that surgery cannot slice."""
    layer = type(module).__name__
    for sub in module.modules():
        if isinstance(sub, nn.modules.lazy.LazyModuleMixin) and sub.has_uninitialized_params():
            raise IncompatibleLayer(f"{layer} has uninitialized (lazy) parameters; run one forward "
                                    f"pass to materialize them before removing channels")
        if parametrize.is_parametrized(sub):
            raise IncompatibleLayer(f"{layer} has a parametrization (e.g. weight_norm); remove it with "
                                    f"torch.nn.utils.parametrize.remove_parametrizations first")


def _replace(module: nn.Module, name: str, cut: Callable[[torch.Tensor], torch.Tensor]) -> None:
    """Set ``module.<name>`` to ``cut(old)``, keeping it a parameter (same requires_grad) or
    buffer (same persistence); its mask buffer, if any, is cut the same way."""
    old = getattr(module, name)
    with torch.no_grad():
        new = cut(old.detach()).contiguous()
    if isinstance(old, nn.Parameter):
        setattr(module, name, nn.Parameter(new, requires_grad=old.requires_grad))
    else:
        setattr(module, name, new)
    mask = getattr(module, name + MASK_SUFFIX, None)
    if isinstance(mask, torch.Tensor) and mask.shape == old.shape:
        setattr(module, name + MASK_SUFFIX, cut(mask).contiguous())


def _take(module: nn.Module, name: str, dim: int, keep: torch.Tensor) -> None:
    """Keep entries `keep` of ``module.<name>`` along `dim`; a missing (None) tensor is skipped."""
    if getattr(module, name, None) is None:
        return
    _replace(module, name, lambda t: t.index_select(dim, keep.to(t.device)))


def _per_group(module: nn.Module, keep: torch.Tensor, size: int, groups: int, what: str) -> torch.Tensor:
    """Return `keep` as local indices, shape [groups, kept per group], inside `groups` equal
    blocks of `size`; raise IncompatibleLayer unless every block keeps the same count."""
    block = size // groups
    counts = torch.bincount(keep // block, minlength=groups)
    if bool((counts != counts[0]).any()):
        raise IncompatibleLayer(
            f"{type(module).__name__} has groups={groups}: every group must keep the same number of "
            f"{what}, but this keep leaves {counts.tolist()} per group")
    return (keep % block).view(groups, -1)


def _take_grouped(module: nn.Module, name: str, local: torch.Tensor) -> None:
    """Keep, in block g of dim 0 of ``module.<name>``, entries ``local[g]`` of dim 1.

    This is how a grouped weight loses the channels it sees per group: dim 0 is split
    into one block per group and each block keeps its own slice of dim 1.
    """
    groups, per = local.shape
    if groups == 1:   # an ordinary conv: one index_select, cheaper than the general gather
        _take(module, name, 1, local[0])
        return

    def cut(t: torch.Tensor) -> torch.Tensor:
        blocked = t.reshape(groups, t.shape[0] // groups, *t.shape[1:])
        index = local.to(t.device).view(groups, 1, per, *([1] * (t.dim() - 2)))
        index = index.expand(groups, blocked.shape[1], per, *t.shape[2:])
        return blocked.gather(2, index).reshape(t.shape[0], per, *t.shape[2:])

    _replace(module, name, cut)


# ---------------------------------------------------------------------------- Linear

def _linear_keep_out(linear: nn.Linear, keep: Keep) -> None:
    """Keep output features `keep`: rows of weight and bias."""
    keep = _checked_keep(linear, keep, linear.out_features, "output features")
    _take(linear, "weight", 0, keep)
    _take(linear, "bias", 0, keep)
    linear.out_features = len(keep)


def _linear_keep_in(linear: nn.Linear, keep: Keep) -> None:
    """Keep input features `keep`: columns of weight."""
    keep = _checked_keep(linear, keep, linear.in_features, "input features")
    _take(linear, "weight", 1, keep)
    linear.in_features = len(keep)


# ---------------------------------------------------------------------- convolutions
# Conv weight is [out, in/groups, *k]; ConvTranspose weight is [in, out/groups, *k]. The
# global-channel side (dim 0) is sliced directly; the per-group side (dim 1) per group.

def _is_depthwise(conv: nn.modules.conv._ConvNd) -> bool:
    return conv.groups == conv.in_channels == conv.out_channels


def _depthwise_keep(conv: nn.modules.conv._ConvNd, keep: torch.Tensor) -> None:
    """Keep channels `keep` of a depthwise conv, whose input and output channels are one set."""
    _take(conv, "weight", 0, keep)
    _take(conv, "bias", 0, keep)
    conv.in_channels = conv.out_channels = conv.groups = len(keep)


def _conv_keep_out(conv: nn.modules.conv._ConvNd, keep: Keep) -> None:
    """Keep output channels `keep`; for a depthwise conv the input channels and groups go too."""
    keep = _checked_keep(conv, keep, conv.out_channels, "output channels")
    if _is_depthwise(conv):
        return _depthwise_keep(conv, keep)
    _per_group(conv, keep, conv.out_channels, conv.groups, "output channels")
    _take(conv, "weight", 0, keep)
    _take(conv, "bias", 0, keep)
    conv.out_channels = len(keep)


def _conv_keep_in(conv: nn.modules.conv._ConvNd, keep: Keep) -> None:
    """Keep input channels `keep`; for a depthwise conv this is the same cut as `_conv_keep_out`."""
    keep = _checked_keep(conv, keep, conv.in_channels, "input channels")
    if _is_depthwise(conv):
        return _depthwise_keep(conv, keep)
    local = _per_group(conv, keep, conv.in_channels, conv.groups, "input channels")
    _take_grouped(conv, "weight", local)
    conv.in_channels = len(keep)


def _conv_transpose_keep_out(conv: nn.modules.conv._ConvTransposeNd, keep: Keep) -> None:
    """Keep output channels `keep` of a transposed conv (dim 1 of its weight, per group)."""
    keep = _checked_keep(conv, keep, conv.out_channels, "output channels")
    if _is_depthwise(conv):
        return _depthwise_keep(conv, keep)
    local = _per_group(conv, keep, conv.out_channels, conv.groups, "output channels")
    _take_grouped(conv, "weight", local)
    _take(conv, "bias", 0, keep)
    conv.out_channels = len(keep)


def _conv_transpose_keep_in(conv: nn.modules.conv._ConvTransposeNd, keep: Keep) -> None:
    """Keep input channels `keep` of a transposed conv (dim 0 of its weight)."""
    keep = _checked_keep(conv, keep, conv.in_channels, "input channels")
    if _is_depthwise(conv):
        return _depthwise_keep(conv, keep)
    _per_group(conv, keep, conv.in_channels, conv.groups, "input channels")
    _take(conv, "weight", 0, keep)
    conv.in_channels = len(keep)


# ----------------------------------------------------------------------------- norms
# Batch and instance norms act on each channel alone, so removing channels leaves the
# others' outputs exactly as they were. GroupNorm, LayerNorm and RMSNorm pool statistics
# over channels: only removing whole GroupNorm groups is exact; any other cut changes the
# statistics of the channels that stay (the engine's criteria decide whether that is ok).

def _channel_norm_keep(norm: nn.modules.batchnorm._NormBase, keep: Keep) -> None:
    """Keep features `keep` of a batch or instance norm: affine parameters and running stats."""
    keep = _checked_keep(norm, keep, norm.num_features, "features")
    for name in ("weight", "bias", "running_mean", "running_var"):
        _take(norm, name, 0, keep)
    norm.num_features = len(keep)


def _group_norm_keep(norm: nn.GroupNorm, keep: Keep) -> None:
    """Keep channels `keep` of a GroupNorm.

    Either whole groups go (num_groups shrinks; exact for the groups that stay) or every
    group keeps the same number of channels (num_groups stays). Anything else raises
    IncompatibleLayer, since GroupNorm needs equal groups.
    """
    keep = _checked_keep(norm, keep, norm.num_channels, "channels")
    block = norm.num_channels // norm.num_groups
    counts = torch.bincount(keep // block, minlength=norm.num_groups)
    if bool(((counts == 0) | (counts == block)).all()):
        num_groups = int((counts == block).sum())
    else:
        _per_group(norm, keep, norm.num_channels, norm.num_groups, "channels")
        num_groups = norm.num_groups
    _take(norm, "weight", 0, keep)
    _take(norm, "bias", 0, keep)
    norm.num_channels = len(keep)
    norm.num_groups = num_groups


def _last_dim_norm_keep(norm: Union[nn.LayerNorm, nn.RMSNorm], keep: Keep) -> None:
    """Keep features `keep` of the last normalized dim of a LayerNorm or RMSNorm."""
    shape = tuple(norm.normalized_shape)
    keep = _checked_keep(norm, keep, shape[-1], "features")
    _take(norm, "weight", -1, keep)
    _take(norm, "bias", -1, keep)
    norm.normalized_shape = (*shape[:-1], len(keep))


def _prelu_keep(prelu: nn.PReLU, keep: Keep) -> None:
    """Keep the slopes of channels `keep`; a single shared slope fits any width and stays."""
    if prelu.num_parameters == 1:
        _checked_keep(prelu, keep, None, "channels")
        return
    keep = _checked_keep(prelu, keep, prelu.num_parameters, "channels")
    _take(prelu, "weight", 0, keep)
    prelu.num_parameters = len(keep)


def _embedding_keep_out(embedding: Union[nn.Embedding, nn.EmbeddingBag], keep: Keep) -> None:
    """Keep embedding features `keep` (columns of weight); the vocabulary and padding_idx stay."""
    keep = _checked_keep(embedding, keep, embedding.embedding_dim, "embedding features")
    _take(embedding, "weight", 1, keep)
    embedding.embedding_dim = len(keep)


# ------------------------------------------------------------------ multi-head attention

def _additive_mask(mask: Optional[torch.Tensor], dtype: torch.dtype, name: str) -> Optional[torch.Tensor]:
    """Return `mask` as a float mask to add to attention scores (bool True means masked out)."""
    if mask is None:
        return None
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(mask, float("-inf"))
    if mask.is_floating_point():
        return mask.to(dtype)
    raise InvalidArgument(f"{name} must be a bool or float tensor, got dtype {mask.dtype}")


class PrunedMultiheadAttention(nn.MultiheadAttention):
    """``nn.MultiheadAttention`` whose widths no longer need to be equal.

    Torch's attention requires ``embed_dim == num_heads * head_dim`` and one width for
    query, projections and output. Removing heads breaks that (the projections narrow,
    the residual stream does not), so surgery turns the module into this class in place
    (its ``__class__`` changes; parameters, hooks and its place in the model stay). Here:

    - ``embed_dim``: width of the query input (columns of the query projection);
    - ``num_heads * head_dim``: width of the q/k/v projections and of ``out_proj``'s input;
    - ``out_proj.out_features``: width of the output.

    The call signature, ``batch_first`` handling, unbatched inputs, masks, ``bias_k`` /
    ``bias_v``, ``add_zero_attn``, dropout and the returned weights follow torch's
    module, ``is_causal`` included: a hint that needs ``attn_mask``, used as the causal
    kernel flag in its place when there is no padding mask and no weights are asked for.
    A 3-D ``attn_mask`` holds one mask per remaining head.

    ``_qkv_same_embed_dim`` is set False whatever the packing (the forward reads
    ``in_proj_weight is None`` instead) because ``nn.TransformerEncoderLayer`` checks that
    flag before calling a fused kernel that assumes the unpruned shapes. An
    ``nn.TransformerEncoder`` holding it must not pack inputs into nested tensors either:
    `turn_off_nested_tensors` sees to that.
    """

    def extra_repr(self) -> str:
        return (f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, head_dim={self.head_dim}, "
                f"kdim={self.kdim}, vdim={self.vdim}, batch_first={self.batch_first}")

    def _project(self, query: torch.Tensor, key: torch.Tensor,
                 value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Return q, k, v projections, each (sequence, batch, num_heads * head_dim)."""
        if self.in_proj_weight is not None:
            weights = self.in_proj_weight.chunk(3)
        else:
            weights = (self.q_proj_weight, self.k_proj_weight, self.v_proj_weight)
        biases = self.in_proj_bias.chunk(3) if self.in_proj_bias is not None else (None, None, None)
        return tuple(F.linear(x, w, b) for x, w, b in zip((query, key, value), weights, biases))

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                key_padding_mask: Optional[torch.Tensor] = None, need_weights: bool = True,
                attn_mask: Optional[torch.Tensor] = None, average_attn_weights: bool = True,
                is_causal: bool = False) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Attention as ``nn.MultiheadAttention.forward`` computes it, with pruned widths."""
        if is_causal and attn_mask is None:
            raise InvalidArgument("is_causal is a hint that needs attn_mask, as in nn.MultiheadAttention")
        batched = query.dim() == 3
        if not batched:
            query, key, value = (x.unsqueeze(1) for x in (query, key, value))
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        elif self.batch_first:
            query, key, value = (x.transpose(0, 1) for x in (query, key, value))
        if is_causal and key_padding_mask is None and not need_weights:
            attn_mask = None   # as torch does: the kernel's causal flag replaces the mask
        else:
            is_causal = False
        out, weights = self._attend(query, key, value, key_padding_mask, attn_mask, need_weights, is_causal)
        if weights is not None and average_attn_weights:
            weights = weights.mean(dim=1)
        if not batched:
            return out.squeeze(1), None if weights is None else weights.squeeze(0)
        return (out.transpose(0, 1) if self.batch_first else out), weights

    def _attend(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                key_padding_mask: Optional[torch.Tensor], attn_mask: Optional[torch.Tensor],
                need_weights: bool, is_causal: bool) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Sequence-first attention: output (L, N, out) and per-head weights (N, H, L, S) or None."""
        length, batch = query.shape[0], query.shape[1]
        heads, head_dim = self.num_heads, self.head_dim
        q, k, v = self._project(query, key, value)
        attn_mask = _additive_mask(attn_mask, q.dtype, "attn_mask")
        key_padding_mask = _additive_mask(key_padding_mask, q.dtype, "key_padding_mask")
        if self.bias_k is not None:
            k = torch.cat([k, self.bias_k.expand(1, batch, -1)])
            v = torch.cat([v, self.bias_v.expand(1, batch, -1)])
            attn_mask, key_padding_mask = _pad_key(attn_mask), _pad_key(key_padding_mask)
        q, k, v = (x.reshape(x.shape[0], batch, heads, head_dim).permute(1, 2, 0, 3) for x in (q, k, v))
        if self.add_zero_attn:
            k = torch.cat([k, k.new_zeros(batch, heads, 1, head_dim)], dim=2)
            v = torch.cat([v, v.new_zeros(batch, heads, 1, head_dim)], dim=2)
            attn_mask, key_padding_mask = _pad_key(attn_mask), _pad_key(key_padding_mask)
        mask = _merged_mask(attn_mask, key_padding_mask, batch, heads)
        dropout = self.dropout if self.training else 0.0
        weights = None
        if need_weights:
            scores = (q * math.sqrt(1.0 / head_dim)) @ k.transpose(-2, -1)
            weights = torch.softmax(scores if mask is None else scores + mask, dim=-1)
            if dropout > 0.0:
                weights = F.dropout(weights, p=dropout)
            out = weights @ v
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout,
                                                 is_causal=is_causal)
        out = out.permute(2, 0, 1, 3).reshape(length, batch, heads * head_dim)
        return F.linear(out, self.out_proj.weight, self.out_proj.bias), weights


def _pad_key(mask: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """Let a float mask admit one more key (a bias_k or zero-attention slot)."""
    return None if mask is None else F.pad(mask, (0, 1))


def _merged_mask(attn_mask: Optional[torch.Tensor], key_padding_mask: Optional[torch.Tensor],
                 batch: int, heads: int) -> Optional[torch.Tensor]:
    """Sum both float masks into one that broadcasts against scores (N, H, L, S)."""
    if attn_mask is not None:
        if attn_mask.dim() == 2 or attn_mask.shape[0] == 1:
            attn_mask = attn_mask.view(1, 1, *attn_mask.shape[-2:])
        else:
            attn_mask = attn_mask.view(batch, heads, *attn_mask.shape[-2:])
    if key_padding_mask is not None:
        key_padding_mask = key_padding_mask.view(batch, 1, 1, -1)
        attn_mask = key_padding_mask if attn_mask is None else attn_mask + key_padding_mask
    return attn_mask


def _check_mha(mha: nn.MultiheadAttention) -> None:
    """Raise IncompatibleLayer for an attention subclass whose own forward surgery would replace."""
    if type(mha) not in (nn.MultiheadAttention, PrunedMultiheadAttention):
        raise IncompatibleLayer(
            f"{type(mha).__name__} subclasses nn.MultiheadAttention; surgery replaces its forward "
            f"with PrunedMultiheadAttention's and would lose the subclass's own behaviour")


def _to_pruned(mha: nn.MultiheadAttention) -> None:
    """Turn `mha` into a `PrunedMultiheadAttention` in place (see that class for why)."""
    mha.__class__ = PrunedMultiheadAttention
    mha._qkv_same_embed_dim = False


def keep_heads(mha: nn.MultiheadAttention, heads: Keep) -> None:
    """Keep attention heads `heads` of `mha`, in place; the residual width stays.

    Removes each dropped head's rows of the q, k and v projections (and of their biases,
    ``bias_k`` and ``bias_v``) and its columns of ``out_proj``. The module becomes a
    `PrunedMultiheadAttention`.
    """
    _check_mha(mha)
    _check_editable(mha)
    heads = _checked_keep(mha, heads, mha.num_heads, "heads")
    head_dim, width = mha.head_dim, mha.num_heads * mha.head_dim
    rows = (heads[:, None] * head_dim + torch.arange(head_dim)).flatten()
    qkv_rows = torch.cat([part * width + rows for part in range(3)])
    _take(mha, "in_proj_weight", 0, qkv_rows)
    for name in ("q_proj_weight", "k_proj_weight", "v_proj_weight"):
        _take(mha, name, 0, rows)
    _take(mha, "in_proj_bias", 0, qkv_rows)
    _take(mha, "bias_k", 2, rows)
    _take(mha, "bias_v", 2, rows)
    _linear_keep_in(mha.out_proj, rows)
    mha.num_heads = len(heads)
    _to_pruned(mha)


def turn_off_nested_tensors(model: nn.Module) -> int:
    """Stop every ``nn.TransformerEncoder`` in `model` that holds a pruned attention from
    packing padded batches into nested tensors (a fused path built for unpruned shapes);
    return how many were changed. Surgery sees one module, not its holder, so the caller
    runs this once after cutting heads."""
    changed = 0
    for module in model.modules():
        if (isinstance(module, nn.TransformerEncoder) and getattr(module, "use_nested_tensor", False)
                and any(isinstance(m, PrunedMultiheadAttention) for m in module.modules())):
            module.use_nested_tensor = False
            changed += 1
    return changed


def _mha_keep_in(mha: nn.MultiheadAttention, keep: Keep) -> None:
    """Keep query input features `keep` (the residual stream entering attention).

    With one packed ``in_proj_weight`` (torch packs when kdim == vdim == embed_dim) the key
    and value inputs lose the same features, as they must in self-attention; with separate
    projections only the query projection changes.
    """
    _check_mha(mha)
    keep = _checked_keep(mha, keep, mha.embed_dim, "query input features")
    if mha.in_proj_weight is not None:
        _take(mha, "in_proj_weight", 1, keep)
        mha.kdim = mha.vdim = len(keep)
    else:
        _take(mha, "q_proj_weight", 1, keep)
    mha.embed_dim = len(keep)
    _to_pruned(mha)


def _mha_keep_out(mha: nn.MultiheadAttention, keep: Keep) -> None:
    """Keep output features `keep` (rows of ``out_proj``)."""
    _check_mha(mha)
    keep = _checked_keep(mha, keep, mha.out_proj.out_features, "output features")
    _linear_keep_out(mha.out_proj, keep)
    _to_pruned(mha)


# ---------------------------------------------------------------------------- RNNs
# Torch RNN weights are weight_ih_l{k}[_reverse] [gates*H, in_k], weight_hh [gates*H, H],
# biases [gates*H], gates stacked in row blocks; layer k+1 reads [forward H, reverse H].
# hidden_size is one attribute for every layer and direction, so a pruned RNN is only
# usable once every layer keeps the same number of units.

_GATE_BLOCKS = {"LSTM": 4, "GRU": 3, "RNN_TANH": 1, "RNN_RELU": 1}


def _check_rnn(rnn: nn.Module) -> None:
    if not isinstance(rnn, nn.RNNBase) or rnn.mode not in _GATE_BLOCKS:
        raise IncompatibleLayer(f"{type(rnn).__name__} is not an nn.RNN, nn.LSTM or nn.GRU")
    _check_editable(rnn)


def _directions(rnn: nn.RNNBase) -> tuple[str, ...]:
    return ("", "_reverse") if rnn.bidirectional else ("",)


def _layer_width(rnn: nn.RNNBase, layer: int) -> int:
    """Number of hidden units layer `layer` has now (it may differ mid-surgery)."""
    return getattr(rnn, f"weight_ih_l{layer}").shape[0] // _GATE_BLOCKS[rnn.mode]


def rnn_output_features(hidden_size: int, keep: torch.Tensor,
                        keep_reverse: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Return the indices, in an RNN layer's output features, of the hidden units kept.

    Torch concatenates directions, so reverse unit i is feature ``hidden_size + i``. Use
    it for the consumer's `keep_in` after cutting the last layer (without ``proj_size``).
    """
    if keep_reverse is None:
        return keep
    return torch.cat([keep, keep_reverse + hidden_size])


def _hidden_keeps(rnn: nn.RNNBase, layer: int, keep: Keep,
                  keep_reverse: Optional[Keep]) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Validate the units layer `layer` keeps in each direction (reverse defaults to forward's)."""
    if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < rnn.num_layers:
        raise InvalidArgument(f"{type(rnn).__name__}: layer must be an int in 0..{rnn.num_layers - 1}, "
                              f"got {layer!r}")
    width = _layer_width(rnn, layer)
    keep = _checked_keep(rnn, keep, width, f"hidden units of layer {layer}")
    if not rnn.bidirectional:
        if keep_reverse is not None:
            raise InvalidArgument(f"{type(rnn).__name__}: keep_reverse is only for bidirectional RNNs")
        return keep, None
    if keep_reverse is None:
        return keep, keep
    keep_reverse = _checked_keep(rnn, keep_reverse, width, f"reverse hidden units of layer {layer}")
    if len(keep_reverse) != len(keep):
        raise IncompatibleLayer(
            f"{type(rnn).__name__}: both directions share hidden_size, so layer {layer} must keep as "
            f"many reverse units as forward units (got {len(keep_reverse)} and {len(keep)})")
    return keep, keep_reverse


def _cut_hidden(rnn: nn.RNNBase, layer: int, keep: torch.Tensor,
                keep_reverse: Optional[torch.Tensor]) -> None:
    """Remove the hidden units of one layer: its gate rows, its recurrent columns (or, with
    proj_size, its projection columns) and the next layer's input columns."""
    gates, width = _GATE_BLOCKS[rnn.mode], _layer_width(rnn, layer)
    for suffix, units in zip(_directions(rnn), (keep, keep_reverse)):
        rows = (torch.arange(gates)[:, None] * width + units).flatten()
        tag = f"l{layer}{suffix}"
        for name in (f"weight_ih_{tag}", f"weight_hh_{tag}", f"bias_ih_{tag}", f"bias_hh_{tag}"):
            _take(rnn, name, 0, rows)
        if rnn.proj_size:
            _take(rnn, f"weight_hr_{tag}", 1, units)
        else:
            _take(rnn, f"weight_hh_{tag}", 1, units)
    if not rnn.proj_size and layer + 1 < rnn.num_layers:
        columns = rnn_output_features(width, keep, keep_reverse)
        for suffix in _directions(rnn):
            _take(rnn, f"weight_ih_l{layer + 1}{suffix}", 1, columns)


def _sync_hidden_size(rnn: nn.RNNBase) -> None:
    """Set hidden_size once every layer has the same number of units."""
    widths = {_layer_width(rnn, layer) for layer in range(rnn.num_layers)}
    if len(widths) == 1:
        rnn.hidden_size = widths.pop()
        rnn.flatten_parameters()


def keep_hidden(rnn: nn.RNNBase, layer: int, keep: Keep, keep_reverse: Optional[Keep] = None) -> None:
    """Keep hidden units `keep` of layer `layer` of an RNN, LSTM or GRU, in place.

    For a bidirectional RNN, `keep_reverse` chooses the reverse direction's units (default:
    the same indices as `keep`); both directions must keep the same count. With several
    layers, torch's single hidden_size means the RNN only runs again once every layer is
    cut to the same count: until then hidden_size keeps its old value, and cutting a layer
    to a count another already-cut layer does not have raises IncompatibleLayer.
    `keep_hidden_all` does every layer in one validated step.
    """
    _check_rnn(rnn)
    keep, keep_reverse = _hidden_keeps(rnn, layer, keep, keep_reverse)
    for other in range(rnn.num_layers):
        width = _layer_width(rnn, other)
        if other != layer and width not in (rnn.hidden_size, len(keep)):
            raise IncompatibleLayer(
                f"{type(rnn).__name__}: layer {other} already has {width} hidden units and torch "
                f"shares hidden_size across layers, so layer {layer} must keep {width} too, not {len(keep)}")
    _cut_hidden(rnn, layer, keep, keep_reverse)
    _sync_hidden_size(rnn)


def keep_hidden_all(rnn: nn.RNNBase, keeps: Sequence[Keep],
                    keeps_reverse: Optional[Sequence[Optional[Keep]]] = None) -> None:
    """Keep hidden units ``keeps[k]`` of every layer k (and ``keeps_reverse[k]`` backwards).

    Every layer must keep the same number of units, because torch stores one hidden_size
    for all layers and directions. All keeps are validated before anything is cut.
    """
    _check_rnn(rnn)
    layers = rnn.num_layers
    if keeps_reverse is None:
        keeps_reverse = [None] * layers
    if len(keeps) != layers or len(keeps_reverse) != layers:
        raise InvalidArgument(f"{type(rnn).__name__} has {layers} layers: give one keep per layer "
                              f"(got {len(keeps)} keeps and {len(keeps_reverse)} reverse keeps)")
    checked = [_hidden_keeps(rnn, k, keeps[k], keeps_reverse[k]) for k in range(layers)]
    counts = [len(keep) for keep, _ in checked]
    if len(set(counts)) > 1:
        raise IncompatibleLayer(f"{type(rnn).__name__}: torch shares hidden_size across layers, so "
                                f"every layer must keep the same number of hidden units (got {counts})")
    for layer, (keep, keep_reverse) in enumerate(checked):
        _cut_hidden(rnn, layer, keep, keep_reverse)
    _sync_hidden_size(rnn)


def _rnn_keep_in(rnn: nn.RNNBase, keep: Keep) -> None:
    """Keep input features `keep` of the first layer (both directions)."""
    _check_rnn(rnn)
    keep = _checked_keep(rnn, keep, rnn.input_size, "input features")
    for suffix in _directions(rnn):
        _take(rnn, f"weight_ih_l0{suffix}", 1, keep)
    rnn.input_size = len(keep)


# ------------------------------------------------------------------ free parameters

def keep_param_dim(module: nn.Module, param_name: str, dim: int, keep: Keep) -> None:
    """Keep entries `keep` along `dim` of ``module.<param_name>``, a parameter or buffer.

    For tensors no layer type owns: cls tokens, positional embeddings, layer-scale
    gammas, norm weights held as plain parameters. No attribute is updated; a mask
    buffer follows as everywhere else.
    """
    tensor = getattr(module, param_name, None)
    if not isinstance(tensor, torch.Tensor):
        raise InvalidArgument(f"{type(module).__name__} has no parameter or buffer named {param_name!r}")
    if isinstance(dim, bool) or not isinstance(dim, int) or not -tensor.dim() <= dim < tensor.dim():
        raise InvalidArgument(f"{type(module).__name__}.{param_name} has {tensor.dim()} dims; "
                              f"dim {dim!r} is out of range")
    keep = _checked_keep(module, keep, tensor.shape[dim], f"entries along dim {dim} of {param_name}")
    _check_editable(module)
    _take(module, param_name, dim, keep)


def _conv1d_keep_out(conv: nn.Module, keep: Keep) -> None:
    """transformers' Conv1D (weight [in, out]): keep output features."""
    keep = _checked_keep(conv, keep, conv.weight.shape[1], "output features")
    _take(conv, "weight", 1, keep)
    _take(conv, "bias", 0, keep)
    conv.nf = len(keep)


def _conv1d_keep_in(conv: nn.Module, keep: Keep) -> None:
    keep = _checked_keep(conv, keep, conv.weight.shape[0], "input features")
    _take(conv, "weight", 0, keep)
    if hasattr(conv, "nx"):
        conv.nx = len(keep)


# ------------------------------------------------------------------------ registries

OUT_SURGERY: dict[type, Surgery] = {
    nn.Linear: _linear_keep_out,
    nn.Conv1d: _conv_keep_out, nn.Conv2d: _conv_keep_out, nn.Conv3d: _conv_keep_out,
    nn.ConvTranspose1d: _conv_transpose_keep_out, nn.ConvTranspose2d: _conv_transpose_keep_out,
    nn.ConvTranspose3d: _conv_transpose_keep_out,
    nn.modules.batchnorm._NormBase: _channel_norm_keep,   # BatchNorm*, SyncBatchNorm, InstanceNorm*
    nn.GroupNorm: _group_norm_keep,
    nn.LayerNorm: _last_dim_norm_keep, nn.RMSNorm: _last_dim_norm_keep,
    nn.PReLU: _prelu_keep,
    nn.Embedding: _embedding_keep_out, nn.EmbeddingBag: _embedding_keep_out,
    nn.MultiheadAttention: _mha_keep_out,
}
"""Layer class -> function removing output channels; looked up along the MRO."""

IN_SURGERY: dict[type, Surgery] = {
    nn.Linear: _linear_keep_in,
    nn.Conv1d: _conv_keep_in, nn.Conv2d: _conv_keep_in, nn.Conv3d: _conv_keep_in,
    nn.ConvTranspose1d: _conv_transpose_keep_in, nn.ConvTranspose2d: _conv_transpose_keep_in,
    nn.ConvTranspose3d: _conv_transpose_keep_in,
    nn.MultiheadAttention: _mha_keep_in,
    nn.RNNBase: _rnn_keep_in,
}
"""Layer class -> function removing input channels; looked up along the MRO."""

_REGISTRIES = {"out": OUT_SURGERY, "in": IN_SURGERY}
# Layer types recognised by a predicate rather than a class known at import (transformers' Conv1D).
_RECOGNISED: tuple[tuple[Callable[[nn.Module], bool], dict[str, Surgery]], ...] = (
    (is_conv1d, {"out": _conv1d_keep_out, "in": _conv1d_keep_in}),
)


def _lookup(registry: dict[type, Surgery], module: nn.Module) -> Optional[Surgery]:
    """The registry's function for the nearest class in `module`'s MRO, or None."""
    role = "out" if registry is OUT_SURGERY else "in"
    for recognise, by_role in _RECOGNISED:
        if recognise(module):
            return by_role[role]
    for cls in type(module).__mro__:
        if cls in registry:
            return registry[cls]
    return None


def supports(module: nn.Module, role: str) -> bool:
    """Whether surgery can remove `role` ("out" or "in") channels of `module`'s type."""
    if role not in _REGISTRIES:
        raise InvalidArgument(f"role must be 'out' or 'in', got {role!r}")
    return _lookup(_REGISTRIES[role], module) is not None


def _dispatch(role: str, module: nn.Module, keep: Keep) -> None:
    surgery = _lookup(_REGISTRIES[role], module)
    if surgery is None:
        known = sorted({cls.__name__ for cls in _REGISTRIES[role]})
        raise IncompatibleLayer(f"secateurs cannot remove {role}put channels of {type(module).__name__}; "
                                f"it knows {', '.join(known)} (add an entry to "
                                f"secateurs.surgery.{role.upper()}_SURGERY for a custom layer)")
    _check_editable(module)
    surgery(module, keep)


def keep_out(module: nn.Module, keep: Keep) -> None:
    """Keep only output channels (features) `keep` of `module`, in place."""
    _dispatch("out", module, keep)


def keep_in(module: nn.Module, keep: Keep) -> None:
    """Keep only input channels (features) `keep` of `module`, in place."""
    _dispatch("in", module, keep)
