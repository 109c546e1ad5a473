"""The reference architectures: every registry entry runs, trains, repeats itself, and the
full-size factories build the published layouts (parameter counts exact)."""
from __future__ import annotations


import pytest
import torch

from secateurs.errors import InvalidArgument
from secateurs.examples import zoo

NAMES = sorted(zoo.ZOO)


pytestmark = pytest.mark.usefixtures("one_thread")


def test_every_entry_documents_its_output_shape():
    assert set(zoo.OUTPUT_SHAPES) == set(zoo.ZOO)


@pytest.mark.parametrize("name", NAMES)
def test_forward_gives_documented_shape(name):
    model, inputs = zoo.ZOO[name]()
    assert isinstance(inputs, tuple)
    with torch.no_grad():
        out = model.eval()(*inputs)
    assert tuple(out.shape) == zoo.OUTPUT_SHAPES[name]
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", NAMES)
def test_backward_reaches_every_parameter(name):
    model, inputs = zoo.ZOO[name]()
    out = model.train()(*inputs)
    # a random projection, not out.sum(): a sum is blind to anything a final norm re-centres
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
    (out * weights).sum().backward()
    for param_name, param in model.named_parameters():
        assert param.grad is not None, f"{name}.{param_name} got no gradient"
        assert torch.isfinite(param.grad).all(), f"{name}.{param_name} has a non-finite gradient"
        assert param.grad.abs().sum() > 0, f"{name}.{param_name} has an all-zero gradient"


@pytest.mark.parametrize("name", NAMES)
def test_builder_is_deterministic_and_leaves_global_rng_alone(name):
    rng_before = torch.random.get_rng_state()
    (model_a, inputs_a), (model_b, inputs_b) = zoo.ZOO[name](), zoo.ZOO[name]()
    assert torch.equal(torch.random.get_rng_state(), rng_before)
    state_a, state_b = model_a.state_dict(), model_b.state_dict()
    assert state_a.keys() == state_b.keys()
    for key in state_a:
        assert torch.equal(state_a[key], state_b[key]), key
    for a, b in zip(inputs_a, inputs_b):
        assert torch.equal(a, b)
    with torch.no_grad():
        assert torch.equal(model_a.eval()(*inputs_a), model_b.eval()(*inputs_b))


# Published parameter counts of the reference layouts (the torchvision / timm models)
FULL_SIZE = [
    ("vit_b_16", lambda: zoo.vit(dim=768, heads=12, depth=12, img=224, patch=16), 86_567_656),
    ("vit_s_16", lambda: zoo.vit(dim=384, heads=6, depth=12), 22_050_664),
    ("vit_b_16_sdpa", lambda: zoo.vit_sdpa(dim=768, heads=12, depth=12), 86_567_656),
    ("resnet18", lambda: zoo.resnet18(num_classes=1000), 11_689_512),
    ("resnet50", lambda: zoo.resnet_bottleneck(), 25_557_032),
    ("resnext50_32x4d", lambda: zoo.grouped_conv(), 25_028_904),
    ("densenet121", lambda: zoo.densenet(), 7_978_856),
    ("mobilenet_v2", lambda: zoo.mobilenet_v2(), 3_504_872),
    ("convnext_tiny", lambda: zoo.convnext_like(), 28_589_128),
]


@pytest.mark.parametrize("build, expected", [(b, n) for _, b, n in FULL_SIZE],
                         ids=[name for name, _, _ in FULL_SIZE])
def test_full_size_factories_match_published_parameter_counts(build, expected):
    with torch.device("meta"):  # counts need shapes only, not 86M initialised weights
        model = build()
    assert sum(p.numel() for p in model.parameters()) == expected


def test_resnet18_runs_at_benchmark_size():
    model = zoo.resnet18(num_classes=1000).eval()
    with torch.no_grad():
        out = model(torch.randn(1, 3, 128, 128))
    assert out.shape == (1, 1000)


@pytest.mark.parametrize("build, parameter", [
    (lambda: zoo.vit(img=30, patch=16), "img"),
    (lambda: zoo.vit_sdpa(dim=100, heads=6), "dim"),
    (lambda: zoo.gqa_attention(n_heads=8, n_kv_heads=3), "n_kv_heads"),
    (lambda: zoo.lstm_classifier(pool="max"), "pool"),
    (lambda: zoo.resnet_bottleneck(layers=()), "layers"),
    (lambda: zoo.convnext_like(depths=(1, 1), dims=(16,)), "dims"),
    (lambda: zoo.densenet(compression=0.0), "compression"),
])
def test_bad_sizes_fail_naming_the_parameter(build, parameter):
    with pytest.raises(InvalidArgument, match=f"^{parameter}="):
        build()
