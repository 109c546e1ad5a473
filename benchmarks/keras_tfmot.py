"""Gradual magnitude pruning, TF-MOT vs secateurs.keras, from the same dense weights.

TF-MOT (`tensorflow_model_optimization` 0.8) runs on Keras 2 (`tf_keras`) only;
secateurs.keras runs the same schedule on Keras 3 (here its TensorFlow backend). Both
start from the same trained dense digits CNN (`secateurs.keras.examples`, width 16:
stem conv, a residual block, a Dense head; the weights are copied across), train 6
epochs of Adam (2e-3, batch 64, the same data order) while pruning every Conv2D and
Dense kernel, the classifier included, to 80% by magnitude, layer by layer:

- `aligned`: PolynomialDecay(0 -> 0.8, begin 0, end 90, frequency 10);
- `tf-mot default frequency`: the same with frequency=100 (TF-MOT's default);
- `2:4`: TF-MOT `sparsity_m_by_n=(2, 4)` vs secateurs `pattern="2:4"` on the kernels
  whose input width divides by 4 (the 1-channel stem is left dense by both).

Each arm runs once per seed (`--seeds`, default 3: the seed sets the batch order, which
Keras 2 and Keras 3 draw differently, so single runs differ by a few test images).
Reported: the median and the range of the test accuracy (359 images, one image is 0.28
points), the sparsity of the pruned kernels after stripping, and seconds per epoch. Each arm runs in its own process (TF-MOT switches
TensorFlow to legacy Keras at import). Needs tensorflow, tf_keras and
tensorflow-model-optimization next to secateurs[keras]:

    pip install --constraint constraints.txt tensorflow-cpu tf_keras tensorflow-model-optimization
    python benchmarks/keras_tfmot.py
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

EPOCHS, BATCH, END, FINAL = 6, 64, 90, 0.8


def _data():
    from secateurs.keras.examples import load_digits

    return load_digits()


def _sparsity(kernels: list[Any]) -> float:
    total = sum(k.size for k in kernels)
    return float(sum((k == 0).sum() for k in kernels) / total)


def dense(folder: Path) -> dict[str, Any]:
    """Keras 3 (TensorFlow backend): train the dense model, save its weights for both arms."""
    import numpy as np

    from secateurs.keras.examples import accuracy, train_digits

    data = _data()
    model = train_digits(data, epochs=8)
    np.savez(folder / "dense.npz", *model.get_weights())
    return {"accuracy": accuracy(model, data), "params": model.count_params()}


def _weights(folder: Path) -> list[Any]:
    import numpy as np

    with np.load(folder / "dense.npz") as f:
        return [f[f"arr_{i}"] for i in range(len(f.files))]


def tfmot(folder: Path, arm: str, seed: int) -> dict[str, Any]:
    import tensorflow_model_optimization as tfmot_  # switches tf to tf_keras (Keras 2)
    import tf_keras as k2

    from secateurs.keras import examples

    data = _data()
    examples.keras = k2            # the same architecture, built with Keras 2 layers
    examples.L = k2.layers
    k2.utils.set_random_seed(0)
    model = examples.digits_model(16)
    model.set_weights(_weights(folder))
    sparsity = tfmot_.sparsity.keras
    if arm == "2:4":
        def clone(layer):
            fits = isinstance(layer, (k2.layers.Conv2D, k2.layers.Dense)) and layer.kernel.shape[-2] % 4 == 0
            return sparsity.prune_low_magnitude(layer, sparsity_m_by_n=(2, 4)) if fits else layer
        pruned = k2.models.clone_model(model, clone_function=clone)
    else:
        schedule = sparsity.PolynomialDecay(0.0, FINAL, begin_step=0, end_step=END,
                                            frequency=10 if arm == "aligned" else 100)
        pruned = sparsity.prune_low_magnitude(model, pruning_schedule=schedule)
    pruned.compile(k2.optimizers.Adam(2e-3), k2.losses.SparseCategoricalCrossentropy(from_logits=True))
    k2.utils.set_random_seed(seed)
    start = time.perf_counter()
    pruned.fit(data.train_x, data.train_y, batch_size=BATCH, epochs=EPOCHS, verbose=0, shuffle=True,
               callbacks=[sparsity.UpdatePruningStep()])
    seconds = (time.perf_counter() - start) / EPOCHS
    final = sparsity.strip_pruning(pruned)
    kernels = [layer.kernel.numpy() for layer in final.layers if isinstance(layer, (k2.layers.Conv2D, k2.layers.Dense))
               and (arm != "2:4" or layer.kernel.shape[-2] % 4 == 0)]
    logits = final.predict(data.test_x, verbose=0)
    return {"accuracy": float((logits.argmax(-1) == data.test_y).mean()), "sparsity": _sparsity(kernels),
            "s_per_epoch": seconds}


def secateurs_arm(folder: Path, arm: str, seed: int) -> dict[str, Any]:
    import keras

    import secateurs.keras as sk
    from secateurs.keras._backend import to_numpy
    from secateurs.keras.examples import accuracy, compile_digits, digits_model

    data = _data()
    model = compile_digits(digits_model(16))
    model.set_weights(_weights(folder))
    if arm == "2:4":
        callback = sk.GradualPruning(sk.ConstantSparsity(0.5, begin_step=0), pattern="2:4", prune_last=True,
                                     skip_incompatible=True)
    else:
        callback = sk.GradualPruning(sk.PolynomialDecay(0.0, FINAL, begin_step=0, end_step=END,
                                                        frequency=10 if arm == "aligned" else 100), prune_last=True)
    keras.utils.set_random_seed(seed)
    start = time.perf_counter()
    model.fit(data.train_x, data.train_y, batch_size=BATCH, epochs=EPOCHS, verbose=0, shuffle=True,
              callbacks=[callback])
    seconds = (time.perf_counter() - start) / EPOCHS
    sk.strip(model)
    kernels = [to_numpy(layer.kernel.value) for layer in model.layers
               if isinstance(layer, (keras.layers.Conv2D, keras.layers.Dense))
               and (arm != "2:4" or layer.kernel.shape[-2] % 4 == 0)]
    return {"accuracy": accuracy(model, data), "sparsity": _sparsity(kernels), "s_per_epoch": seconds}


ARMS = ("aligned", "tf-mot default frequency", "2:4")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3, help="runs per arm and tool")
    parser.add_argument("--one", nargs=4, help=argparse.SUPPRESS)    # tool arm seed folder: one run in this process
    args = parser.parse_args()
    if args.one:
        tool, arm, seed, folder = args.one
        run = {"dense": lambda: dense(Path(folder)), "tfmot": lambda: tfmot(Path(folder), arm, int(seed)),
               "secateurs": lambda: secateurs_arm(Path(folder), arm, int(seed))}[tool]
        print(json.dumps(run()))
        return
    env = dict(os.environ, KERAS_BACKEND="tensorflow", TF_CPP_MIN_LOG_LEVEL="3", CUDA_VISIBLE_DEVICES="")

    def one(tool: str, arm: str, seed: int, folder: str) -> dict[str, Any]:
        done = subprocess.run([sys.executable, __file__, "--one", tool, arm, str(seed), folder], env=env,
                              capture_output=True, text=True)
        if done.returncode:
            raise SystemExit(f"{tool} {arm} failed:\n{done.stderr[-4000:]}")
        return json.loads(done.stdout.strip().splitlines()[-1])

    with tempfile.TemporaryDirectory() as folder:
        results: dict[str, Any] = {"dense": one("dense", "-", 0, folder)}
        for arm in ARMS:
            results[arm] = {tool: [] for tool in ("tfmot", "secateurs")}
            for seed in range(args.seeds):
                for tool in ("tfmot", "secateurs"):     # interleaved, so machine load hits both alike
                    results[arm][tool].append(one(tool, arm, seed, folder))
    print(json.dumps(results))
    print(f"dense: {results['dense']['accuracy']:.2%}\n")
    print("| schedule | tool | accuracy, median (min - max) | sparsity of the pruned kernels | s / epoch, median |")
    print("|---|---|--:|--:|--:|")
    for arm in ARMS:
        for tool, name in (("tfmot", "TF-MOT (Keras 2)"), ("secateurs", "secateurs.keras (Keras 3, TF backend)")):
            runs = results[arm][tool]
            acc = sorted(r["accuracy"] for r in runs)
            print(f"| {arm} | {name} | {statistics.median(acc):.2%} ({acc[0]:.2%} - {acc[-1]:.2%}) | "
                  f"{statistics.median(r['sparsity'] for r in runs):.3f} | "
                  f"{statistics.median(r['s_per_epoch'] for r in runs):.2f} |")


if __name__ == "__main__":
    main()
