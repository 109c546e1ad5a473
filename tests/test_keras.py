"""secateurs.keras, unstructured and N:M: selection, criteria, exact counts, masks through fit, schedules, strip."""
from __future__ import annotations

import re
import zipfile
from pathlib import Path

import pytest

from tests.test_keras_common import _one_torch_thread, fresh, keras, layers, mlp, np, sk, weights, zoo, zoo_inputs  # noqa: F401

from secateurs.errors import IncompatibleLayer, InvalidArgument, MissingData  # noqa: E402
from secateurs.keras.criteria import _patch_sumsq  # noqa: E402
from secateurs.keras.targets import rows  # noqa: E402


def xy(n=64, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, 12)).astype("float32")
    return x, (x[:, 0] > 0).astype("int64") + (x[:, 1] > 1).astype("int64")


def compiled(model, optimizer="adam"):
    model.compile(optimizer, keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    return model


def test_selects_every_kernel_kind_with_its_axes():
    model = zoo()
    targets = {t.name: t for t in sk.select_targets(model, types=None)}
    kinds = {t.kind for t in targets.values()}
    assert kinds == {"Conv2D", "DepthwiseConv2D", "SeparableConv2D", "Conv2DTranspose", "Conv1D",
                     "MultiHeadAttention", "Conv3D", "Dense"}
    assert "embedding/embeddings" not in targets                      # opt-in, as on the PyTorch side
    assert "head/kernel" not in targets                               # the classifier head is left alone
    depthwise = targets["depthwise_conv2d/kernel"]
    assert (depthwise.out_axes, depthwise.in_axes, depthwise.in_width) == ((2, 3), (0, 1), 9)
    out = targets["multi_head_attention/attention_output/kernel"]
    assert (out.out_axes, out.in_axes, out.in_width) == ((2,), (0, 1), 8)
    assert targets["conv2d_transpose/kernel"].in_axes == (3,)
    with_embedding = sk.select_targets(model, types=["embedding", "dense"], prune_last=True)
    assert [t.name for t in with_embedding] == ["embedding/embeddings", "hidden/kernel", "head/kernel"]
    only = sk.select_targets(model, include=["conv*"], ignore=["conv1d"])
    assert [t.kind for t in only] == ["Conv2D", "Conv2DTranspose", "Conv3D"]
    with pytest.raises(InvalidArgument, match="unknown layer type 'lstm'"):
        sk.select_targets(model, types=["lstm"])


@pytest.mark.parametrize("scope", ["layer", "row", "global"])
def test_exact_counts_per_scope(scope):
    model = zoo()
    plan = sk.prune(model, "magnitude", 0.6, scope=scope)
    if scope == "global":
        assert sum(layer.zeros for layer in plan.layers) == round(0.6 * sum(layer.numel for layer in plan.layers))
    else:
        assert all(layer.zeros == round(0.6 * layer.numel) for layer in plan.layers if scope == "layer")
    for t in sk.select_targets(model):
        w = weights(t.variable)
        assert (w == 0).sum() == next(layer.zeros for layer in plan.layers if layer.name == t.name)
        if scope == "row":
            zeros = (rows(w, t) == 0).sum(1)
            assert (zeros == round(0.6 * t.in_width)).all()


def test_magnitude_removes_the_smallest_and_global_bounds_hold():
    model = mlp()
    before = {t.name: weights(t.variable) for t in sk.select_targets(model)}
    sk.prune(model, "l1", 0.5, scope="global", min_ratio=0.2, max_ratio=0.6)
    for t in sk.select_targets(model):
        kept = weights(t.variable) != 0
        assert 0.4 - 1e-9 <= 1 - kept.mean() <= 0.6 + 1e-9
        assert np.abs(before[t.name][kept]).min() >= np.abs(before[t.name][~kept]).max()
    with pytest.raises(InvalidArgument, match="cannot be met with min_ratio=0.9"):
        sk.prune(mlp(), "l1", 0.5, scope="global", min_ratio=0.9)


def test_nm_pattern_on_dense_conv_and_attention():
    model = zoo()
    plan = sk.prune(model, "magnitude", pattern="2:4", skip_incompatible=True)
    names = [layer.name for layer in plan.layers]
    assert "depthwise_conv2d/kernel" not in names                     # 3x3 taps: width 9, skipped
    for t in sk.select_targets(model):
        if t.name in names:
            blocks = rows(weights(t.variable), t).reshape(-1, 4)
            assert ((blocks != 0).sum(1) <= 2).all() and plan.pattern == "2:4"
    with pytest.raises(IncompatibleLayer, match=r"depthwise_conv2d/kernel \(width 9\)"):
        sk.prune(zoo(), pattern="2:4")


@pytest.mark.parametrize("method", ["magnitude", "l2", "random", "gradient", "taylor", "obd", "activation",
                                    "apoz", "wanda"])
def test_every_criterion_prunes_exactly(method):
    model = compiled(zoo())
    x = zoo_inputs(4 if method == "obd" else 16)
    y = np.arange(len(x[0])) % 3
    ignore = ["separable_conv2d", "conv2d_transpose"] if method in ("wanda", "activation", "apoz") else []
    plan = sk.prune(model, method, 0.5, data=(x, y) if method != "obd" else [(x, y)], ignore=ignore,
                    batch_size=8)
    assert plan.method == {"magnitude": "l1"}.get(method, method)
    assert all(layer.zeros == round(0.5 * layer.numel) for layer in plan.layers)


def test_random_is_seeded_and_data_criteria_say_what_is_missing():
    a, b = mlp(), mlp()
    sk.prune(a, "random", 0.5, seed=3)
    sk.prune(b, "random", 0.5, seed=3)
    assert all(np.array_equal(weights(u) == 0, weights(v) == 0) for u, v in zip(a.weights, b.weights))
    with pytest.raises(MissingData, match="criterion 'taylor' needs calibration data"):
        sk.prune(mlp(), "taylor", 0.5)
    with pytest.raises(MissingData, match="needs a loss"):
        sk.prune(mlp(), "taylor", 0.5, data=xy())
    with pytest.raises(MissingData, match="needs targets"):
        compiled(model := mlp())
        sk.prune(model, "gradient", 0.5, data=xy()[0])
    with pytest.raises(InvalidArgument, match="use prune_structured"):
        sk.prune(mlp(), "bn_scale", 0.5)
    with pytest.raises(InvalidArgument, match="unknown method 'nope'"):
        sk.prune(mlp(), "nope", 0.5)
    with pytest.raises(IncompatibleLayer, match="criterion 'wanda' scores Dense"):
        sk.prune(zoo(), "wanda", 0.5, data=zoo_inputs(), types=["embedding"])


def test_taylor_uses_the_loss_gradient():
    model = compiled(mlp())
    x, y = xy()
    t = sk.select_targets(model)[0]
    w = weights(t.variable)
    scores = sk.criteria.score(model, "taylor", [t], sk.Calibration((x, y), batch_size=64))[t.name]
    import torch

    kernel = t.variable.value
    out = model(x, training=False)
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)(y, out)
    (grad,) = torch.autograd.grad(loss, [kernel]) if sk.backend() == "torch" else (None,)
    if grad is not None:
        np.testing.assert_allclose(scores, np.abs(w * grad.numpy()), rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("padding,strides,dilation", [("same", 1, 1), ("valid", 2, 1), ("same", 2, 1), ("valid", 1, 2)])
def test_wanda_conv_columns_are_the_layer_s_own(padding, strides, dilation):
    """Column (i, j, c) of the im2col matrix is what a kernel with a single 1 at (i, j, c) outputs."""
    fresh()
    conv = layers.Conv2D(1, 3, padding=padding, strides=strides, dilation_rate=dilation, use_bias=False)
    x = np.random.default_rng(0).standard_normal((5, 9, 9, 2)).astype("float32")
    conv.build(x.shape)
    sums = _patch_sumsq(conv, x)
    for i, j, c in [(0, 0, 0), (1, 2, 1), (2, 1, 0)]:
        kernel = np.zeros((3, 3, 2, 1), dtype="float32")
        kernel[i, j, c, 0] = 1
        conv.kernel.assign(kernel)
        np.testing.assert_allclose(sums[i, j, c], np.square(sk._backend.to_numpy(conv(x))).sum(), rtol=1e-5)


def test_masks_survive_fit_custom_steps_and_only_grow():
    model = compiled(mlp(), keras.optimizers.AdamW(1e-2, weight_decay=0.1))
    x, y = xy()
    sk.prune(model, "magnitude", 0.5)
    first = {v.path: weights(v) == 0 for v in sk.masked_variables(model)}
    model.fit(x, y, epochs=2, batch_size=16, verbose=0)
    # a custom loop through optimizer.apply keeps them too
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    grads = sk._backend.gradient_fn(model, model.trainable_variables, loss, "test")(x, y)
    model.optimizer.apply([keras.ops.convert_to_tensor(g) for g in grads], model.trainable_variables)
    for v in sk.masked_variables(model):
        assert (weights(v)[first[v.path]] == 0).all()
        assert (weights(v)[~first[v.path]] != 0).all()       # the kept weights trained
    sk.prune(model, "magnitude", 0.8)
    for v in sk.masked_variables(model):
        w = weights(v)
        assert (w[first[v.path]] == 0).all() and (w == 0).sum() == round(0.8 * w.size)


def test_a_layer_s_own_constraint_keeps_running_and_strip_restores_it():
    fresh()
    model = keras.Sequential([keras.Input((12,)), layers.Dense(16, kernel_constraint=keras.constraints.MaxNorm(0.5)),
                              layers.Dense(3)])
    compiled(model, keras.optimizers.SGD(0.5))
    sk.prune(model, "magnitude", 0.5)
    model.fit(*xy(), epochs=1, verbose=0)
    kernel = model.layers[0].kernel
    assert np.linalg.norm(weights(kernel), axis=0).max() <= 0.5 + 1e-5
    sk.strip(model)
    assert isinstance(kernel.constraint, keras.constraints.MaxNorm) and not list(sk.masked_variables(model))


def test_schedules_match_tfmot_and_reach_the_final_sparsity():
    decay = sk.PolynomialDecay(0.2, 0.8, begin_step=10, end_step=45, power=3, frequency=10)
    # TF-MOT's formula: final + (initial - final) * (1 - (t - begin) / (end - begin)) ** power
    for step in (10, 20, 30, 40):
        assert decay(step) == (True, pytest.approx(0.8 + (0.2 - 0.8) * (1 - (step - 10) / 35) ** 3))
    assert decay(45) == (True, pytest.approx(0.8))        # TF-MOT stops at step 40, below 0.8
    assert not decay(15)[0] and not decay(50)[0] and not decay(5)[0]
    constant = sk.ConstantSparsity(0.5, begin_step=0, frequency=4)
    assert [constant.due(s) for s in (0, 3, 4, 1000)] == [True, False, True, True]
    with pytest.raises(InvalidArgument, match="end_step"):
        sk.PolynomialDecay(0.0, 0.5, begin_step=5, end_step=5)
    with pytest.raises(InvalidArgument, match="initial_sparsity"):
        sk.PolynomialDecay(0.9, 0.5, begin_step=0, end_step=5)


def test_gradual_pruning_during_fit_continues_across_fit_calls():
    model = compiled(mlp())
    x, y = xy(64)
    callback = sk.GradualPruning(sk.PolynomialDecay(0.0, 0.75, begin_step=2, end_step=11, frequency=4),
                                 method="magnitude", scope="global")
    history = model.fit(x, y, batch_size=16, epochs=2, verbose=0, callbacks=[callback])    # steps 0..7
    assert [round(p.sparsity, 4) for p in callback.plans] == [round(0.75 - 0.75 * (1 - 4 / 9) ** 3, 4)]
    assert history.history["sparsity"][-1] == pytest.approx(callback.plans[-1].achieved, abs=1e-3)
    model.fit(x, y, batch_size=16, epochs=2, verbose=0, callbacks=[callback])               # steps 8..15
    assert [p.sparsity for p in callback.plans][-1] == pytest.approx(0.75)
    assert sk.overall_sparsity(model) == pytest.approx(0.75, abs=1e-3)
    for v in sk.masked_variables(model):
        assert (weights(v)[~v.constraint.mask] == 0).all()


def test_gradual_nm_pattern():
    model = compiled(mlp())
    callback = sk.GradualPruning(sk.ConstantSparsity(0.5, begin_step=3), pattern="2:4")
    model.fit(*xy(), batch_size=16, epochs=1, verbose=0, callbacks=[callback])
    assert len(callback.plans) == 1 and callback.plans[0].pattern == "2:4"
    assert sk.overall_sparsity(model) == pytest.approx(0.5)


def test_strip_leaves_a_plain_keras_model(tmp_path):
    model = compiled(mlp())
    sk.prune(model, "magnitude", 0.7)
    expected = sk._backend.to_numpy(model(xy()[0]))
    assert sk.strip(model) is model and not list(sk.masked_variables(model))
    path = tmp_path / "pruned.keras"
    model.save(path)
    with zipfile.ZipFile(path) as archive:
        config = archive.read("config.json").decode()
    assert "secateurs" not in config and "PruningMask" not in config
    loaded = keras.saving.load_model(path)
    np.testing.assert_array_equal(sk._backend.to_numpy(loaded(xy()[0])), expected)
    assert sk.restore_masks(loaded) == 2                      # masks from the zeros: fine-tuning keeps them
    compiled(loaded).fit(*xy(), epochs=1, verbose=0)
    assert sk.overall_sparsity(loaded) == pytest.approx(0.7, abs=5e-3)


class Subclassed(keras.Model):
    def __init__(self):
        super().__init__()
        self.hidden = layers.Dense(16, activation="relu")
        self.out = layers.Dense(3)

    def call(self, x):
        return self.out(self.hidden(x))


def test_subclassed_models_prune_unstructured_and_refuse_structured_in_one_line():
    fresh()
    model = compiled(Subclassed())
    model(xy()[0])
    plan = sk.prune(model, "taylor", 0.5, data=xy())
    assert [layer.name for layer in plan.layers] == ["dense/kernel"] or len(plan.layers) == 1
    model.fit(*xy(), epochs=1, verbose=0)
    assert sk.overall_sparsity(model) == pytest.approx(0.5)
    with pytest.raises(sk.StructuredUnsupported) as error:
        sk.prune_structured(model, 0.5)
    assert "\n" not in str(error.value) and "Subclassed is subclassed" in str(error.value)


def test_unbuilt_model_and_bad_arguments_are_one_line_errors():
    with pytest.raises(InvalidArgument, match="not built"):
        sk.prune(keras.Sequential([layers.Dense(3)]), "magnitude", 0.5)
    with pytest.raises(InvalidArgument, match=r"sparsity must be in \[0, 1\)"):
        sk.prune(mlp(), "magnitude", 1.5)
    with pytest.raises(InvalidArgument, match="unknown scope"):
        sk.prune(mlp(), "magnitude", 0.5, scope="tensor")
    with pytest.raises(InvalidArgument, match="no layer matches"):
        sk.prune(mlp(), "magnitude", 0.5, include=["nothing*"])


DOC = Path(__file__).resolve().parents[1] / "docs" / "keras.md"


@pytest.mark.parametrize("index", range(len(re.findall(r"```python\n", DOC.read_text()))))
def test_docs_keras_examples_run(index, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    block = re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S)[index]
    exec(compile(block, f"docs/keras.md block {index}", "exec"), {"__name__": "docs"})
