"""Reference architectures for structured-pruning tests and benchmarks, in plain torch.

Each architecture is a few small modules plus a factory whose keyword arguments set its
size; the defaults build the published layout (ResNet-50, ResNet-18, DenseNet-121,
MobileNetV2, ViT-S/16, ResNeXt-50 32x4d, ConvNeXt-T, ...). Each one is here because it
exercises a feature a channel-pruning graph must get right: residual adds, projection
shortcuts, concatenation, depthwise and grouped convolutions, transposed convolutions,
parameters used outside a layer (cls token, positional embedding, layer scale), fused
projections that are split by chunk or reshape, recurrent layers and grouped-query heads.

`ZOO` maps a name to a zero-argument builder returning `(model, example_inputs)` at a
test size whose forward takes milliseconds on CPU; `OUTPUT_SHAPES` gives the shape of
`model(*example_inputs)` for each entry.

    from secateurs.examples.zoo import ZOO
    model, inputs = ZOO["mobilenet_v2"]()
    logits = model(*inputs)
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import InvalidArgument

# --------------------------------------------------------------------------- helpers


def _require(ok: bool, name: str, value: object, expected: str) -> None:
    if not ok:
        raise InvalidArgument(f"{name}={value!r}: expected {expected}")


def _require_positive(**values: int | float) -> None:
    for name, value in values.items():
        _require(value > 0, name, value, "a positive number")


def conv_bn(in_ch: int, out_ch: int, kernel: int, stride: int = 1, groups: int = 1,
            act: type[nn.Module] | None = nn.ReLU) -> nn.Sequential:
    """Conv (no bias: the BatchNorm shift replaces it), BatchNorm and an optional activation."""
    layers: list[nn.Module] = [
        nn.Conv2d(in_ch, out_ch, kernel, stride, padding=kernel // 2, groups=groups, bias=False),
        nn.BatchNorm2d(out_ch),
    ]
    if act is not None:
        layers.append(act())
    return nn.Sequential(*layers)


class ClassifierHead(nn.Module):
    """Global average pool, flatten and a Linear layer: (N, C, H, W) -> (N, num_classes)."""

    def __init__(self, in_ch: int, num_classes: int):
        super().__init__()
        self.fc = nn.Linear(in_ch, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.mean((2, 3)))


# --------------------------------------------------------------------------- ResNet family


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers and a residual add; a 1x1 strided projection when shapes change."""

    def __init__(self, in_ch: int, out_ch: int, stride: int = 1):
        super().__init__()
        self.body = nn.Sequential(conv_bn(in_ch, out_ch, 3, stride), conv_bn(out_ch, out_ch, 3, act=None))
        self.shortcut = _shortcut(in_ch, out_ch, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.body(x) + self.shortcut(x))


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (strided, optionally grouped), 1x1 expand, each with BN; residual add."""

    def __init__(self, in_ch: int, mid_ch: int, out_ch: int, stride: int = 1, groups: int = 1):
        super().__init__()
        self.body = nn.Sequential(
            conv_bn(in_ch, mid_ch, 1),
            conv_bn(mid_ch, mid_ch, 3, stride, groups=groups),
            conv_bn(mid_ch, out_ch, 1, act=None),
        )
        self.shortcut = _shortcut(in_ch, out_ch, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.body(x) + self.shortcut(x))


def _shortcut(in_ch: int, out_ch: int, stride: int) -> nn.Module:
    """Identity when shapes match, else a strided 1x1 projection with BN."""
    if stride == 1 and in_ch == out_ch:
        return nn.Identity()
    return conv_bn(in_ch, out_ch, 1, stride, act=None)


class ResNet(nn.Module):
    """ImageNet stem (7x7/2 conv, 3x3/2 max pool), a sequence of stages, pooled Linear head."""

    def __init__(self, stem_ch: int, stages: list[nn.Sequential], out_ch: int, num_classes: int):
        super().__init__()
        self.stem = nn.Sequential(conv_bn(3, stem_ch, 7, 2), nn.MaxPool2d(3, 2, padding=1))
        self.stages = nn.Sequential(*stages)
        self.head = ClassifierHead(out_ch, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.stages(self.stem(x)))


def _stages(make_block: Callable[[int, int, int, int], nn.Module], in_ch: int,
            out_chs: list[int], layers: tuple[int, ...]) -> list[nn.Sequential]:
    """Stages of `layers[i]` blocks; every stage after the first halves the resolution.

    `make_block(in_ch, out_ch, stride, stage_index)` builds one block.
    """
    stages = []
    for i, (out_ch, n) in enumerate(zip(out_chs, layers)):
        blocks = []
        for j in range(n):
            stride = 2 if i > 0 and j == 0 else 1
            blocks.append(make_block(in_ch, out_ch, stride, i))
            in_ch = out_ch
        stages.append(nn.Sequential(*blocks))
    return stages


def _check_layers(layers: tuple[int, ...]) -> None:
    _require(len(layers) > 0 and all(n > 0 for n in layers), "layers", layers,
             "a non-empty tuple of positive block counts")


def resnet18(num_classes: int = 1000, width: int = 64) -> ResNet:
    """ResNet-18 (He et al., 2016): basic blocks [2, 2, 2, 2] at widths width*(1, 2, 4, 8).

    Exercises residual adds and strided projection shortcuts. 11.7M parameters at the defaults.
    """
    _require_positive(num_classes=num_classes, width=width)
    out_chs = [width * 2 ** i for i in range(4)]
    stages = _stages(lambda i, o, s, _: BasicBlock(i, o, s), width, out_chs, (2, 2, 2, 2))
    return ResNet(width, stages, out_chs[-1], num_classes)


def resnet_bottleneck(layers: tuple[int, ...] = (3, 4, 6, 3), width: int = 64,
                      num_classes: int = 1000) -> ResNet:
    """ResNet with bottleneck blocks (1x1-3x3-1x1, expansion 4); the defaults are ResNet-50.

    Exercises BN after every conv, residual adds and strided 1x1 projection shortcuts.
    """
    _check_layers(layers)
    _require_positive(width=width, num_classes=num_classes)
    out_chs = [4 * width * 2 ** i for i in range(len(layers))]
    stages = _stages(lambda i, o, s, _: Bottleneck(i, o // 4, o, s), width, out_chs, layers)
    return ResNet(width, stages, out_chs[-1], num_classes)


def grouped_conv(layers: tuple[int, ...] = (3, 4, 6, 3), cardinality: int = 32, group_width: int = 4,
                 width: int = 64, num_classes: int = 1000) -> ResNet:
    """ResNeXt (Xie et al., 2017): bottlenecks whose 3x3 conv has `cardinality` groups.

    The defaults are ResNeXt-50 32x4d. Exercises grouped convolutions, whose channels can
    only be removed in a way that keeps every group the same size, inside residual blocks.
    """
    _check_layers(layers)
    _require_positive(cardinality=cardinality, group_width=group_width, width=width, num_classes=num_classes)
    out_chs = [4 * width * 2 ** i for i in range(len(layers))]

    def block(in_ch: int, out_ch: int, stride: int, stage: int) -> Bottleneck:
        mid = cardinality * group_width * 2 ** stage
        return Bottleneck(in_ch, mid, out_ch, stride, groups=cardinality)

    return ResNet(width, _stages(block, width, out_chs, layers), out_chs[-1], num_classes)


# --------------------------------------------------------------------------- DenseNet


class DenseLayer(nn.Module):
    """BN-ReLU-1x1 conv to bn_size*growth, BN-ReLU-3x3 conv to growth; output concatenated to input."""

    def __init__(self, in_ch: int, growth: int, bn_size: int):
        super().__init__()
        mid = bn_size * growth
        self.body = nn.Sequential(
            nn.BatchNorm2d(in_ch), nn.ReLU(), nn.Conv2d(in_ch, mid, 1, bias=False),
            nn.BatchNorm2d(mid), nn.ReLU(), nn.Conv2d(mid, growth, 3, padding=1, bias=False),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x, self.body(x)], dim=1)


class Transition(nn.Sequential):
    """BN-ReLU-1x1 conv (compresses channels) and 2x2 average pooling."""

    def __init__(self, in_ch: int, out_ch: int):
        super().__init__(nn.BatchNorm2d(in_ch), nn.ReLU(), nn.Conv2d(in_ch, out_ch, 1, bias=False),
                         nn.AvgPool2d(2))


class DenseNet(nn.Module):
    """ImageNet stem, dense blocks separated by transitions, BN-ReLU and a pooled Linear head."""

    def __init__(self, growth: int, blocks: tuple[int, ...], stem_ch: int, bn_size: int,
                 compression: float, num_classes: int):
        super().__init__()
        self.stem = nn.Sequential(conv_bn(3, stem_ch, 7, 2), nn.MaxPool2d(3, 2, padding=1))
        features: list[nn.Module] = []
        ch = stem_ch
        for i, n in enumerate(blocks):
            for _ in range(n):
                features.append(DenseLayer(ch, growth, bn_size))
                ch += growth
            if i < len(blocks) - 1:
                features.append(Transition(ch, int(ch * compression)))
                ch = int(ch * compression)
        self.features = nn.Sequential(*features, nn.BatchNorm2d(ch), nn.ReLU())
        self.head = ClassifierHead(ch, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(self.stem(x)))


def densenet(growth: int = 32, blocks: tuple[int, ...] = (6, 12, 24, 16), stem_ch: int = 64,
             bn_size: int = 4, compression: float = 0.5, num_classes: int = 1000) -> DenseNet:
    """DenseNet (Huang et al., 2017); the defaults are DenseNet-121.

    Exercises torch.cat of feature maps: each layer's input channels are the stem's and
    every earlier layer's outputs, so one removed channel touches many later convs.
    """
    _check_layers(blocks)
    _require_positive(growth=growth, stem_ch=stem_ch, bn_size=bn_size, num_classes=num_classes)
    _require(0 < compression <= 1, "compression", compression, "a fraction in (0, 1]")
    return DenseNet(growth, blocks, stem_ch, bn_size, compression, num_classes)


# --------------------------------------------------------------------------- MobileNetV2

# (expansion t, output channels c, repeats n, first stride s), from the paper's Table 2
MOBILENET_V2_SETTINGS = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2),
                         (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1))


def _round_channels(value: float, divisor: int = 8) -> int:
    """Nearest multiple of `divisor` that loses at most 10% of `value`."""
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    return rounded + divisor if rounded < 0.9 * value else rounded


class InvertedResidual(nn.Module):
    """1x1 expand, 3x3 depthwise (groups = channels), linear 1x1 project; residual when shapes match."""

    def __init__(self, in_ch: int, out_ch: int, stride: int, expansion: int):
        super().__init__()
        hidden = in_ch * expansion
        expand = [conv_bn(in_ch, hidden, 1, act=nn.ReLU6)] if expansion != 1 else []
        self.body = nn.Sequential(
            *expand,
            conv_bn(hidden, hidden, 3, stride, groups=hidden, act=nn.ReLU6),
            conv_bn(hidden, out_ch, 1, act=None),
        )
        self.use_residual = stride == 1 and in_ch == out_ch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x) if self.use_residual else self.body(x)


class MobileNetV2(nn.Module):
    """3x3/2 stem, inverted residual blocks, 1x1 conv to `last_ch`, pooled Linear head."""

    def __init__(self, settings: tuple[tuple[int, int, int, int], ...], width_mult: float,
                 last_ch: int, num_classes: int):
        super().__init__()
        ch = _round_channels(32 * width_mult)
        blocks: list[nn.Module] = [conv_bn(3, ch, 3, 2, act=nn.ReLU6)]
        for t, c, n, s in settings:
            out_ch = _round_channels(c * width_mult)
            for j in range(n):
                blocks.append(InvertedResidual(ch, out_ch, s if j == 0 else 1, t))
                ch = out_ch
        blocks.append(conv_bn(ch, last_ch, 1, act=nn.ReLU6))
        self.features = nn.Sequential(*blocks)
        self.head = ClassifierHead(last_ch, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def mobilenet_v2(num_classes: int = 1000, width_mult: float = 1.0,
                 settings: tuple[tuple[int, int, int, int], ...] = MOBILENET_V2_SETTINGS,
                 last_ch: int | None = None) -> MobileNetV2:
    """MobileNetV2 (Sandler et al., 2018); the defaults are the 3.5M-parameter ImageNet model.

    Exercises depthwise convolutions (groups = channels, so a removed channel must leave
    the expand conv, the depthwise conv and its BN together), ReLU6 and residual adds
    only where input and output shapes match.
    """
    _require_positive(num_classes=num_classes, width_mult=width_mult)
    _require(len(settings) > 0 and all(len(s) == 4 and min(s) > 0 for s in settings), "settings", settings,
             "a non-empty tuple of (expansion, channels, repeats, stride) with positive entries")
    if last_ch is None:
        last_ch = _round_channels(1280 * max(1.0, width_mult))
    _require_positive(last_ch=last_ch)
    return MobileNetV2(settings, width_mult, last_ch, num_classes)


# --------------------------------------------------------------------------- UNet


def double_conv(in_ch: int, out_ch: int) -> nn.Sequential:
    """Two 3x3 conv-BN-ReLU layers at one resolution."""
    return nn.Sequential(conv_bn(in_ch, out_ch, 3), conv_bn(out_ch, out_ch, 3))


class UpBlock(nn.Module):
    """2x2/2 transposed conv halving channels, concatenation with the skip, double conv."""

    def __init__(self, in_ch: int, out_ch: int):
        super().__init__()
        self.up = nn.ConvTranspose2d(in_ch, out_ch, 2, stride=2)
        self.conv = double_conv(2 * out_ch, out_ch)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return self.conv(torch.cat([skip, self.up(x)], dim=1))


class UNet(nn.Module):
    """Encoder of double convs and max pools, bottleneck, decoder of UpBlocks, 1x1 conv head."""

    def __init__(self, in_ch: int, out_ch: int, base: int, depth: int):
        super().__init__()
        widths = [base * 2 ** i for i in range(depth + 1)]
        self.down = nn.ModuleList(double_conv(c_in, c_out)
                                  for c_in, c_out in zip([in_ch, *widths[:-2]], widths[:-1]))
        self.bottleneck = double_conv(widths[-2], widths[-1])
        self.up = nn.ModuleList(UpBlock(widths[i + 1], widths[i]) for i in reversed(range(depth)))
        self.head = nn.Conv2d(base, out_ch, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        for down in self.down:
            x = down(x)
            skips.append(x)
            x = F.max_pool2d(x, 2)
        x = self.bottleneck(x)
        for up, skip in zip(self.up, reversed(skips)):
            x = up(x, skip)
        return self.head(x)


def unet(in_channels: int = 3, out_channels: int = 2, base: int = 64, depth: int = 4) -> UNet:
    """UNet (Ronneberger et al., 2015) with BN; input sides must be divisible by 2**depth.

    Exercises ConvTranspose2d (weight laid out (in, out, k, k), the opposite of Conv2d)
    and skip concatenations that join encoder and decoder channels.
    """
    _require_positive(in_channels=in_channels, out_channels=out_channels, base=base, depth=depth)
    return UNet(in_channels, out_channels, base, depth)


# --------------------------------------------------------------------------- Vision Transformers


class PatchEmbed(nn.Module):
    """Non-overlapping patches by a strided conv: (N, C, H, W) -> (N, patches, dim)."""

    def __init__(self, in_ch: int, dim: int, patch: int):
        super().__init__()
        self.proj = nn.Conv2d(in_ch, dim, patch, stride=patch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class TorchSelfAttention(nn.Module):
    """Self-attention by nn.MultiheadAttention (batch_first): packed in_proj_weight, out_proj."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.attn(x, x, x, need_weights=False)[0]


class FusedSelfAttention(nn.Module):
    """Self-attention by hand: one fused qkv Linear, reshape to heads, SDPA, output projection."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads, self.head_dim = heads, dim // heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # (N, T, 3*dim) -> (3, N, heads, T, head_dim); unflatten keeps this traceable
        qkv = self.qkv(x).unflatten(-1, (3, self.heads, self.head_dim)).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).flatten(2))


ATTENTIONS: dict[str, type[nn.Module]] = {"mha": TorchSelfAttention, "sdpa": FusedSelfAttention}
NORMS: dict[str, type[nn.Module]] = {"layernorm": nn.LayerNorm, "rmsnorm": nn.RMSNorm}


class MLP(nn.Sequential):
    """Linear, GELU, Linear: the transformer feed-forward layer."""

    def __init__(self, dim: int, hidden: int):
        super().__init__(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))


class EncoderBlock(nn.Module):
    """Pre-norm transformer block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, dim: int, heads: int, hidden: int, attention: str, norm: str):
        super().__init__()
        self.norm1, self.attn = NORMS[norm](dim), ATTENTIONS[attention](dim, heads)
        self.norm2, self.mlp = NORMS[norm](dim), MLP(dim, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class VisionTransformer(nn.Module):
    """Patch embedding, learnable cls token and positional embedding, encoder blocks, head on cls."""

    def __init__(self, img: int, patch: int, in_ch: int, dim: int, depth: int, heads: int,
                 hidden: int, num_classes: int, attention: str, norm: str):
        super().__init__()
        self.patch_embed = PatchEmbed(in_ch, dim, patch)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, (img // patch) ** 2 + 1, dim))
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        self.blocks = nn.Sequential(*(EncoderBlock(dim, heads, hidden, attention, norm) for _ in range(depth)))
        self.norm = NORMS[norm](dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        return self.head(self.norm(self.blocks(x))[:, 0])


def _vision_transformer(img: int, patch: int, dim: int, depth: int, heads: int, mlp_ratio: float,
                        num_classes: int, in_chans: int, attention: str, norm: str) -> VisionTransformer:
    _require_positive(img=img, patch=patch, dim=dim, depth=depth, heads=heads, mlp_ratio=mlp_ratio,
                      num_classes=num_classes, in_chans=in_chans)
    _require(img % patch == 0, "img", img, f"a multiple of patch={patch}")
    _require(dim % heads == 0, "dim", dim, f"a multiple of heads={heads}")
    return VisionTransformer(img, patch, in_chans, dim, depth, heads, int(dim * mlp_ratio),
                             num_classes, attention, norm)


def vit(img: int = 224, patch: int = 16, dim: int = 384, depth: int = 12, heads: int = 6,
        mlp_ratio: float = 4, num_classes: int = 1000, in_chans: int = 3) -> VisionTransformer:
    """Vision Transformer (Dosovitskiy et al., 2021) on nn.MultiheadAttention; defaults: ViT-S/16.

    ViT-B/16 is dim=768, heads=12. Exercises a patch-embedding conv, parameters used
    outside any layer (cls token joined by torch.cat, positional embedding added), the
    packed q/k/v weight of nn.MultiheadAttention, LayerNorm and a head on one token.
    """
    return _vision_transformer(img, patch, dim, depth, heads, mlp_ratio, num_classes, in_chans,
                               "mha", "layernorm")


def vit_sdpa(img: int = 224, patch: int = 16, dim: int = 384, depth: int = 12, heads: int = 6,
             mlp_ratio: float = 4, num_classes: int = 1000, in_chans: int = 3,
             rms_norm: bool = False) -> VisionTransformer:
    """The ViT of `vit` with hand-written attention: fused qkv Linear, head reshape, SDPA.

    Exercises a Linear whose output is split three ways and then into heads (pruning must
    cut whole heads or matching q/k/v columns) and, with rms_norm=True, nn.RMSNorm.
    """
    return _vision_transformer(img, patch, dim, depth, heads, mlp_ratio, num_classes, in_chans,
                               "sdpa", "rmsnorm" if rms_norm else "layernorm")


# --------------------------------------------------------------------------- ConvNeXt


class ChannelsLastNorm(nn.Module):
    """LayerNorm over the channels of an (N, C, H, W) tensor, by permuting to channels-last."""

    def __init__(self, ch: int):
        super().__init__()
        self.norm = nn.LayerNorm(ch, eps=1e-6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class ConvNeXtBlock(nn.Module):
    """7x7 depthwise conv, channels-last LayerNorm, Linear-GELU-Linear, layer scale, residual."""

    def __init__(self, dim: int, layer_scale_init: float):
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, 7, padding=3, groups=dim)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.pwconv1 = nn.Linear(dim, 4 * dim)
        self.pwconv2 = nn.Linear(4 * dim, dim)
        self.gamma = nn.Parameter(torch.full((dim,), layer_scale_init))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.norm(self.dwconv(x).permute(0, 2, 3, 1))
        y = self.gamma * self.pwconv2(F.gelu(self.pwconv1(y)))
        return x + y.permute(0, 3, 1, 2)


class ConvNeXt(nn.Module):
    """4x4/4 patchify stem, stages of ConvNeXt blocks with LN + 2x2/2 conv downsampling, LN head."""

    def __init__(self, depths: tuple[int, ...], dims: tuple[int, ...], num_classes: int,
                 layer_scale_init: float):
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(3, dims[0], 4, stride=4), ChannelsLastNorm(dims[0])]
        for i, (depth, dim) in enumerate(zip(depths, dims)):
            if i > 0:
                layers += [ChannelsLastNorm(dims[i - 1]), nn.Conv2d(dims[i - 1], dim, 2, stride=2)]
            layers += [ConvNeXtBlock(dim, layer_scale_init) for _ in range(depth)]
        self.features = nn.Sequential(*layers)
        self.norm = nn.LayerNorm(dims[-1], eps=1e-6)
        self.fc = nn.Linear(dims[-1], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.norm(self.features(x).mean((2, 3))))


def convnext_like(depths: tuple[int, ...] = (3, 3, 9, 3), dims: tuple[int, ...] = (96, 192, 384, 768),
                  num_classes: int = 1000, layer_scale_init: float = 1e-6) -> ConvNeXt:
    """ConvNeXt (Liu et al., 2022); the defaults are ConvNeXt-T.

    Exercises a 7x7 depthwise conv, LayerNorm over channels through permutes to
    channels-last, Linear layers used as 1x1 convs on (N, H, W, C) tensors and a
    layer-scale parameter `gamma` multiplied into the residual branch.
    """
    _check_layers(depths)
    _require(len(dims) == len(depths) and min(dims) > 0, "dims", dims,
             f"{len(depths)} positive widths, one per entry of depths")
    _require_positive(num_classes=num_classes, layer_scale_init=layer_scale_init)
    return ConvNeXt(depths, dims, num_classes, layer_scale_init)


# --------------------------------------------------------------------------- recurrent


def _last_step(seq: torch.Tensor) -> torch.Tensor:
    return seq[:, -1]


def _mean_over_time(seq: torch.Tensor) -> torch.Tensor:
    return seq.mean(1)


POOLS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {"last": _last_step, "mean": _mean_over_time}


class LSTMClassifier(nn.Module):
    """Embedding, bidirectional multi-layer LSTM (batch_first), pooled over time, Linear head."""

    def __init__(self, vocab: int, embed: int, hidden: int, layers: int, num_classes: int, pool: str):
        super().__init__()
        self.embed = nn.Embedding(vocab, embed)
        self.lstm = nn.LSTM(embed, hidden, layers, batch_first=True, bidirectional=True)
        self.pool = pool
        self.head = nn.Linear(2 * hidden, num_classes)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(POOLS[self.pool](self.lstm(self.embed(tokens))[0]))


def lstm_classifier(vocab: int = 1000, embed: int = 128, hidden: int = 256, layers: int = 2,
                    num_classes: int = 2, pool: str = "mean") -> LSTMClassifier:
    """Token classifier on a bidirectional LSTM; `pool` is "mean" or "last" (the last step).

    Exercises nn.Embedding and nn.LSTM, whose weights stack the four gates along dim 0
    (4*hidden rows) and whose later layers read both directions (2*hidden inputs).
    """
    _require_positive(vocab=vocab, embed=embed, hidden=hidden, layers=layers, num_classes=num_classes)
    _require(pool in POOLS, "pool", pool, f"one of {sorted(POOLS)}")
    return LSTMClassifier(vocab, embed, hidden, layers, num_classes, pool)


class GRUModel(nn.Module):
    """Multi-layer GRU (batch_first) over float sequences, Linear head on the last step."""

    def __init__(self, input_size: int, hidden: int, layers: int, out_features: int):
        super().__init__()
        self.gru = nn.GRU(input_size, hidden, layers, batch_first=True)
        self.head = nn.Linear(hidden, out_features)

    def forward(self, seq: torch.Tensor) -> torch.Tensor:
        return self.head(self.gru(seq)[0][:, -1])


def gru_model(input_size: int = 16, hidden: int = 64, layers: int = 2, out_features: int = 4) -> GRUModel:
    """Sequence regressor on nn.GRU: (N, T, input_size) -> (N, out_features).

    Exercises nn.GRU, whose weights stack three gates (3*hidden rows) per layer.
    """
    _require_positive(input_size=input_size, hidden=hidden, layers=layers, out_features=out_features)
    return GRUModel(input_size, hidden, layers, out_features)


# --------------------------------------------------------------------------- LLaMA-style blocks


def llama_hidden(dim: int, multiple_of: int = 8) -> int:
    """The LLaMA feed-forward width: 2/3 of 4*dim, rounded up to a multiple of `multiple_of`."""
    hidden = int(2 * 4 * dim / 3)
    return -(-hidden // multiple_of) * multiple_of


class GatedMLPBlock(nn.Module):
    """x + down(silu(gate) * up) on RMSNorm(x), with gate and up from one fused Linear."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.norm = nn.RMSNorm(dim)
        self.gate_up = nn.Linear(dim, 2 * hidden, bias=False)
        self.down = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up(self.norm(x)).chunk(2, dim=-1)
        return x + self.down(F.silu(gate) * up)


class GatedMLPStack(nn.Module):
    """Gated MLP blocks and a final RMSNorm: (N, T, dim) -> (N, T, dim)."""

    def __init__(self, dim: int, hidden: int, depth: int):
        super().__init__()
        self.blocks = nn.Sequential(*(GatedMLPBlock(dim, hidden) for _ in range(depth)))
        self.norm = nn.RMSNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.blocks(x))


def gated_mlp(dim: int = 512, hidden: int | None = None, depth: int = 2) -> GatedMLPStack:
    """LLaMA-style SwiGLU feed-forward blocks (Shazeer, 2020); hidden defaults to llama_hidden(dim).

    Exercises a fused gate/up Linear split by chunk: hidden channel i of the gate and
    hidden channel i of the up half (row hidden + i) must be removed together, along with
    column i of the down projection. Also RMSNorm and residual adds.
    """
    hidden = llama_hidden(dim) if hidden is None else hidden
    _require_positive(dim=dim, hidden=hidden, depth=depth)
    return GatedMLPStack(dim, hidden, depth)


class GroupedQueryAttention(nn.Module):
    """Causal attention with n_heads query heads sharing n_kv_heads key/value heads (no RoPE)."""

    def __init__(self, dim: int, n_heads: int, n_kv_heads: int, head_dim: int):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = n_heads, n_kv_heads, head_dim
        self.q_proj = nn.Linear(dim, n_heads * head_dim, bias=False)
        self.k_proj = nn.Linear(dim, n_kv_heads * head_dim, bias=False)
        self.v_proj = nn.Linear(dim, n_kv_heads * head_dim, bias=False)
        self.o_proj = nn.Linear(n_heads * head_dim, dim, bias=False)

    def _heads(self, x: torch.Tensor, n: int) -> torch.Tensor:
        return x.unflatten(-1, (n, self.head_dim)).transpose(1, 2)  # (N, n, T, head_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        repeats = self.n_heads // self.n_kv_heads
        q = self._heads(self.q_proj(x), self.n_heads)
        k = self._heads(self.k_proj(x), self.n_kv_heads).repeat_interleave(repeats, dim=1)
        v = self._heads(self.v_proj(x), self.n_kv_heads).repeat_interleave(repeats, dim=1)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o_proj(out.transpose(1, 2).flatten(2))


class DecoderBlock(nn.Module):
    """x + attn(RMSNorm(x)), then a GatedMLPBlock (its own norm and residual)."""

    def __init__(self, dim: int, n_heads: int, n_kv_heads: int, head_dim: int, hidden: int):
        super().__init__()
        self.attn_norm = nn.RMSNorm(dim)
        self.attn = GroupedQueryAttention(dim, n_heads, n_kv_heads, head_dim)
        self.mlp = GatedMLPBlock(dim, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(x + self.attn(self.attn_norm(x)))


class GQADecoder(nn.Module):
    """Decoder blocks and a final RMSNorm: (N, T, dim) -> (N, T, dim)."""

    def __init__(self, dim: int, n_heads: int, n_kv_heads: int, head_dim: int, hidden: int, depth: int):
        super().__init__()
        self.blocks = nn.Sequential(*(DecoderBlock(dim, n_heads, n_kv_heads, head_dim, hidden)
                                      for _ in range(depth)))
        self.norm = nn.RMSNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.blocks(x))


def gqa_attention(dim: int = 512, n_heads: int = 8, n_kv_heads: int = 2, head_dim: int | None = None,
                  hidden: int | None = None, depth: int = 1) -> GQADecoder:
    """LLaMA-style decoder with grouped-query attention (Ainslie et al., 2023) written by hand.

    Exercises k/v projections narrower than q, expanded by repeat_interleave so each kv
    head serves n_heads // n_kv_heads query heads (pruning a kv head removes its whole
    query group), causal SDPA and the output projection.
    """
    _require_positive(dim=dim, n_heads=n_heads, n_kv_heads=n_kv_heads, depth=depth)
    _require(n_heads % n_kv_heads == 0, "n_kv_heads", n_kv_heads, f"a divisor of n_heads={n_heads}")
    head_dim = dim // n_heads if head_dim is None else head_dim
    hidden = llama_hidden(dim) if hidden is None else hidden
    _require_positive(head_dim=head_dim, hidden=hidden)
    return GQADecoder(dim, n_heads, n_kv_heads, head_dim, hidden, depth)


# --------------------------------------------------------------------------- registry

BATCH = 2
SEED = 0


def _image(channels: int = 3, side: int = 32) -> tuple[torch.Tensor]:
    return (torch.randn(BATCH, channels, side, side, generator=torch.Generator().manual_seed(SEED)),)


def _sequence(length: int, features: int) -> tuple[torch.Tensor]:
    return (torch.randn(BATCH, length, features, generator=torch.Generator().manual_seed(SEED)),)


def _tokens(length: int, vocab: int) -> tuple[torch.Tensor]:
    return (torch.randint(0, vocab, (BATCH, length), generator=torch.Generator().manual_seed(SEED)),)


def _randomize_norms(model: nn.Module, generator: torch.Generator) -> None:
    """Give every norm layer non-trivial affine parameters and running statistics.

    Fresh norms hold weight 1, bias 0, mean 0 and variance 1: ties for every BN-scale
    score, and an eval-mode forward that would hide a running statistic left unsliced.
    """
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (nn.BatchNorm2d, nn.LayerNorm, nn.RMSNorm)) and module.weight is not None:
                module.weight.uniform_(0.5, 1.5, generator=generator)
            if isinstance(module, (nn.BatchNorm2d, nn.LayerNorm)) and module.bias is not None:
                module.bias.normal_(0.0, 0.1, generator=generator)
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.normal_(0.0, 0.1, generator=generator)
                module.running_var.uniform_(0.5, 1.5, generator=generator)


def _seeded(build: Callable[[], nn.Module], inputs: Callable[[], tuple]) -> Callable[[], tuple[nn.Module, tuple]]:
    """A zero-argument builder: the same weights on every call, global RNG state left as it was."""

    def builder() -> tuple[nn.Module, tuple]:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(SEED)
            model = build()
        _randomize_norms(model, torch.Generator().manual_seed(SEED))
        return model, inputs()

    return builder


ZOO: dict[str, Callable[[], tuple[nn.Module, tuple]]] = {
    "resnet_bottleneck": _seeded(lambda: resnet_bottleneck(layers=(1, 1, 1, 1), width=8, num_classes=10), _image),
    "resnet18": _seeded(lambda: resnet18(num_classes=10, width=8), _image),
    "densenet": _seeded(lambda: densenet(growth=8, blocks=(2, 2, 2), stem_ch=16, bn_size=2, num_classes=10),
                        _image),
    "mobilenet_v2": _seeded(lambda: mobilenet_v2(num_classes=10, width_mult=0.5, last_ch=64,
                                                 settings=((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 2, 2))), _image),
    "unet": _seeded(lambda: unet(in_channels=3, out_channels=2, base=8, depth=2), _image),
    "vit": _seeded(lambda: vit(img=32, patch=8, dim=32, depth=2, heads=4, num_classes=10), _image),
    "vit_sdpa": _seeded(lambda: vit_sdpa(img=32, patch=8, dim=32, depth=2, heads=4, num_classes=10), _image),
    "vit_sdpa_rmsnorm": _seeded(lambda: vit_sdpa(img=32, patch=8, dim=32, depth=2, heads=4, num_classes=10,
                                                 rms_norm=True), _image),
    "lstm_classifier": _seeded(lambda: lstm_classifier(vocab=50, embed=16, hidden=16, num_classes=3),
                               lambda: _tokens(12, 50)),
    "gru_model": _seeded(lambda: gru_model(input_size=8, hidden=16, out_features=4), lambda: _sequence(12, 8)),
    "grouped_conv": _seeded(lambda: grouped_conv(layers=(1, 1), cardinality=4, group_width=4, width=16,
                                                 num_classes=10), _image),
    "gated_mlp": _seeded(lambda: gated_mlp(dim=32, hidden=48, depth=2), lambda: _sequence(8, 32)),
    # layer scale 0.5 rather than ConvNeXt's 1e-6, so each block's branch visibly moves the output
    "convnext_like": _seeded(lambda: convnext_like(depths=(1, 1), dims=(16, 32), num_classes=10,
                                                   layer_scale_init=0.5), _image),
    "gqa_attention": _seeded(lambda: gqa_attention(dim=32, n_heads=4, n_kv_heads=2, hidden=48, depth=2),
                             lambda: _sequence(8, 32)),
}

OUTPUT_SHAPES: dict[str, tuple[int, ...]] = {
    "resnet_bottleneck": (BATCH, 10), "resnet18": (BATCH, 10), "densenet": (BATCH, 10),
    "mobilenet_v2": (BATCH, 10), "unet": (BATCH, 2, 32, 32), "vit": (BATCH, 10), "vit_sdpa": (BATCH, 10),
    "vit_sdpa_rmsnorm": (BATCH, 10), "lstm_classifier": (BATCH, 3), "gru_model": (BATCH, 4),
    "grouped_conv": (BATCH, 10), "gated_mlp": (BATCH, 8, 32), "convnext_like": (BATCH, 10),
    "gqa_attention": (BATCH, 8, 32),
}

__all__ = [
    "OUTPUT_SHAPES", "ZOO", "convnext_like", "densenet", "gated_mlp", "gqa_attention", "grouped_conv",
    "gru_model", "lstm_classifier", "mobilenet_v2", "resnet18", "resnet_bottleneck", "unet", "vit", "vit_sdpa",
]
