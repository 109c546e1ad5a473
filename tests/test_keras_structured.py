"""secateurs.keras structured: groups from the layer graph, the cut equals zeroing, budgets, the digits model."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

from tests.test_keras_common import BACKEND, _one_torch_thread, fresh, keras, layers, np, sk, to_numpy  # noqa: F401

from secateurs.errors import InvalidArgument  # noqa: E402
from secateurs.keras.examples import accuracy, compile_digits, digits_model, load_digits  # noqa: E402


def coupled(with_norms: bool = True) -> keras.Model:
    """Conv -> BN -> ReLU, a residual Add, depthwise, Concatenate, pooling, Flatten, attention heads, GQA."""
    fresh()
    inputs = keras.Input((8, 8, 3))
    x = layers.Conv2D(8, 3, padding="same", name="stem")(inputs)
    if with_norms:
        x = layers.BatchNormalization(name="bn")(x)
    x = layers.ReLU()(x)
    y = layers.Conv2D(8, 3, padding="same", activation="relu", name="branch")(x)
    x = layers.Add()([x, y])
    z = layers.DepthwiseConv2D(3, padding="same", depth_multiplier=2, name="depthwise")(x)
    z = layers.Conv2D(6, 1, name="pointwise")(z)
    x = layers.Concatenate()([x, z])
    x = layers.SeparableConv2D(12, 3, padding="same", name="separable")(x)
    x = layers.MaxPooling2D()(x)
    x = layers.Reshape((16, 12))(x)
    x = layers.Dense(16, name="embed")(x)
    a = layers.MultiHeadAttention(num_heads=4, key_dim=4, name="mha")(x, x)
    x = layers.Add()([x, a])
    if with_norms:
        x = layers.LayerNormalization(name="ln")(x)
    g = layers.GroupQueryAttention(head_dim=4, num_query_heads=4, num_key_value_heads=2, name="gqa")(x, x)
    x = layers.Add()([x, g])
    x = layers.Dense(32, activation="relu", name="fc")(layers.Flatten()(x))
    return keras.Model(inputs, layers.Dense(10, name="head")(x))


def images(n=4, seed=0):
    return np.random.default_rng(seed).standard_normal((n, 8, 8, 3)).astype("float32")


def members(group):
    return {path for path, _ in group.members}


def test_groups_follow_the_layer_graph():
    analysis = sk.analyze(coupled())
    by_first = {g.members[0]: g for g in analysis.groups}
    residual = by_first[("stem/kernel", 3)]
    # stem -> BN -> ReLU -> Add <- branch, on into the depthwise, the concat's first segment and the separable
    assert {"stem/bias", "bn/gamma", "bn/moving_variance", "branch/kernel", "branch/bias", "depthwise/kernel",
            "separable/depthwise_kernel"} <= members(residual) and residual.size == 8 and residual.reason is None
    # the pointwise conv's channels are the concat's second segment
    assert "separable/depthwise_kernel" in members(by_first[("pointwise/kernel", 3)])
    # Reshape keeps the channels last; the stream couples embed's output, the attention inputs and outputs
    stream = by_first[("embed/kernel", 1)]
    assert {"mha/query/kernel", "mha/attention_output/kernel", "ln/gamma", "gqa/query/kernel", "fc/kernel"} <= members(stream)
    heads = [g for g in analysis.groups if g.kind == "head"]
    assert sorted(g.size for g in heads) == [2, 4]       # GQA: a key/value head carries its 2 query heads
    assert by_first[("stem/kernel", 2)].prunable == [False] * 3 and by_first[("head/kernel", 1)].reason
    assert analysis.unknown == []


def test_unknown_layers_block_their_channels_and_are_reported():
    fresh()
    inputs = keras.Input((6,))
    x = layers.Dense(8, name="a")(inputs)
    x = layers.RepeatVector(2)(x)
    x = layers.Flatten()(x)
    x = layers.Dense(8, name="b")(x)
    model = keras.Model(inputs, layers.Dense(2, name="c")(x))
    analysis = sk.analyze(model)
    assert analysis.unknown == ["repeat_vector (RepeatVector)"]
    a = next(g for g in analysis.groups if g.members[0] == ("a/kernel", 1))
    assert not any(a.prunable) and "RepeatVector has no rule" in a.reason
    b = next(g for g in analysis.groups if g.members[0] == ("b/kernel", 1))
    assert all(b.prunable)


def _zeroed(model: keras.Model, plan) -> keras.Model:
    """A copy of `model` with every member slice of every removed unit set to zero."""
    copy = keras.models.clone_model(model)
    copy.set_weights(model.get_weights())
    variables = {v.path: v for v in copy.weights}
    for key, kept in plan.keeps.items():
        path, axis = key.rsplit(":", 1)
        array = to_numpy(variables[path].value).copy()
        gone = np.setdiff1d(np.arange(array.shape[int(axis)]), kept)
        index = [slice(None)] * array.ndim
        index[int(axis)] = gone
        array[tuple(index)] = 0
        variables[path].assign(array)
    return copy


def test_the_cut_gives_what_zeroing_the_units_gives():
    model = coupled(with_norms=False)
    smaller, plan = sk.prune_structured(model, 0.5, method="l1")
    assert plan.attributes["stem"] == {"filters": 4} and plan.attributes["mha"] == {"num_heads": 2}
    assert plan.attributes["gqa"] == {"num_query_heads": 2, "num_key_value_heads": 1}
    assert plan.attributes["reshape"] == {"target_shape": (16, 6)}
    x = images()
    np.testing.assert_allclose(to_numpy(smaller(x)), to_numpy(_zeroed(model, plan)(x)), rtol=1e-4, atol=1e-5)
    assert plan.params_after == smaller.count_params() < plan.params_before == model.count_params()
    assert plan.macs_after == sk.count_macs(smaller, x[:1])[0] < plan.macs_before
    assert len(model.get_layer("mha").get_weights()[0].shape) == 3 and model.get_layer("stem").filters == 8  # untouched


def test_targets_are_met_and_predicted_costs_are_measured():
    model = coupled()
    for target, key in (("macs=0.5", "macs"), ("params=0.4", "params")):
        smaller, plan = sk.prune_structured(model, target=target)
        budget = plan.budget
        assert budget["predicted"] == budget["measured"] <= budget["limit"]
        after = plan.macs_after / plan.macs_before if key == "macs" else plan.params_after / plan.params_before
        assert 0.3 < after <= float(target.split("=")[1])
    with pytest.raises(InvalidArgument, match="latency_ms tables|use macs=, params=, bytes="):
        sk.prune_structured(model, target="latency_ms=3")
    with pytest.raises(InvalidArgument, match="cannot be met"):
        sk.prune_structured(model, target="macs=0.01")


def test_sequential_ignore_units_round_to_and_bn_scale():
    fresh()
    model = keras.Sequential([keras.Input((8, 8, 1)), layers.Conv2D(16, 3, name="c1"),
                              layers.BatchNormalization(name="n1"), layers.ReLU(), layers.Conv2D(16, 3, name="c2"),
                              layers.BatchNormalization(name="n2"), layers.ReLU(), layers.Flatten(),
                              layers.Dense(12, name="d1"), layers.Dense(2, name="out")])
    # a group is left whole when one of its members is ignored: c2's output feeds d1, d1's feeds out
    smaller, plan = sk.prune_structured(model, 0.4, method="bn_scale", ignore=["d1"], round_to=4)
    widths = {layer.name: getattr(layer, "filters", getattr(layer, "units", None)) for layer in smaller.layers}
    assert widths == {"c1": 12, "n1": None, "re_lu": None, "c2": 16, "n2": None, "re_lu_1": None, "flatten": None,
                      "d1": 12, "out": 2}
    smaller, _ = sk.prune_structured(model, 0.5, method="bn_scale")     # d1 has no BatchNorm: squared weights
    assert smaller.get_layer("d1").units == 6
    assert isinstance(smaller, keras.Sequential) and smaller.output_shape == (None, 2)
    _, heads_only = sk.prune_structured(coupled(), 0.5, units=["head"])
    assert {g.kind for g in heads_only.groups} == {"head"}
    with pytest.raises(InvalidArgument, match="round_to must be a positive integer"):
        sk.prune_structured(model, 0.4, round_to=0)


def test_compiled_model_comes_back_compiled_and_trains():
    model = coupled()
    model.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    smaller, _ = sk.prune_structured(model, 0.5, method="taylor", data=(images(8), np.arange(8) % 10))
    assert smaller.compiled
    smaller.fit(images(8), np.arange(8) % 10, epochs=1, verbose=0)


def test_subclassed_is_refused_in_one_line():
    class Net(keras.Model):
        def __init__(self):
            super().__init__()
            self.dense = layers.Dense(4)

        def call(self, x):
            return self.dense(x)

    net = Net()
    net(np.zeros((1, 3), dtype="float32"))
    with pytest.raises(InvalidArgument, match=r"^structured pruning needs a Sequential or Functional Keras model; "
                                              r"Net is subclassed .* use secateurs.keras.prune for unstructured"):
        sk.prune_structured(net, 0.5)


RELOAD = textwrap.dedent("""
    import os, sys
    os.environ["KERAS_BACKEND"] = sys.argv[3]
    sys.modules["secateurs"] = None          # plain Keras: importing secateurs would fail
    if sys.argv[3] == "torch":
        import torch
        torch.set_num_threads(1)             # the test's thread count: the same summation order, bit for bit
    import numpy as np, keras
    model = keras.saving.load_model(sys.argv[1])
    x = np.load(sys.argv[2])
    np.save(sys.argv[2] + ".out.npy", keras.ops.convert_to_numpy(model.predict(x, verbose=0)))
""")


def test_digits_half_the_macs_fine_tuned_saved_and_reloaded_with_plain_keras(tmp_path):
    """The issue's end-to-end check: train, cut to half the MACs, model.fit, save, reload without secateurs."""
    data = load_digits()
    keras.backend.clear_session(free_memory=False)
    model = compile_digits(digits_model(width=8))
    model.fit(data.train_x, data.train_y, batch_size=128, epochs=6, verbose=0)
    dense_accuracy = accuracy(model, data)
    calibration = (data.train_x[:256], data.train_y[:256])
    smaller, plan = sk.prune_structured(model, target="macs=0.5", method="taylor", data=calibration)
    assert plan.macs_after <= 0.5 * plan.macs_before and smaller.count_params() < model.count_params()
    smaller.fit(data.train_x, data.train_y, batch_size=64, epochs=2, verbose=0)
    pruned_accuracy = accuracy(smaller, data)
    assert dense_accuracy > 0.9 and pruned_accuracy > dense_accuracy - 0.08, (dense_accuracy, pruned_accuracy)
    path = tmp_path / "digits-half.keras"
    smaller.save(path)
    expected = to_numpy(smaller.predict(data.test_x, verbose=0))
    np.save(tmp_path / "x.npy", data.test_x)
    subprocess.run([sys.executable, "-c", RELOAD, str(path), str(tmp_path / "x.npy"), BACKEND], check=True,
                   timeout=120)
    np.testing.assert_array_equal(np.load(tmp_path / "x.npy.out.npy"), expected)
    json.dumps(plan.to_dict())                         # the plan is plain JSON
