"""The same Keras digits pipeline on each Keras 3 backend: TensorFlow, JAX, PyTorch.

For each backend (a fresh subprocess each, since Keras fixes its backend at import):
train the Functional digits CNN (`secateurs.keras.examples`, width 16, 8 epochs of
Adam), then from copies of it:

- `magnitude 70%`: unstructured, layer by layer, then 2 epochs of `model.fit`;
- `taylor 70% global`: unstructured from the backend's gradients, then 2 epochs;
- `2:4`: magnitude N:M on every kernel whose input width divides by 4, then 2 epochs;
- `structured macs=0.5`: channels removed (Taylor) to half the MACs, then 3 epochs;
- `gradual 80%`: `GradualPruning(PolynomialDecay(0, 0.8, 0, 4 epochs, frequency=10))`
  during 6 epochs of `fit` from the dense model.

Each arm checks that the pruned weights are still zero after `fit`, strips the masks,
saves a `.keras` file, reloads it with `keras.saving.load_model` and checks the outputs
are identical (bit for bit). Accuracy is on the held-out 20% (359 images). Prints one
JSON object per backend and a Markdown table.

    .venv/bin/python benchmarks/keras_backends.py                         # the backends installed here
    .venv/bin/python benchmarks/keras_backends.py --backends jax torch    # just these
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

BACKENDS = ("torch", "jax", "tensorflow")


def run_backend(backend: str, epochs: int, threads: int) -> dict[str, Any]:
    os.environ["KERAS_BACKEND"] = backend
    if backend == "torch":
        import torch

        torch.set_num_threads(threads)
    import numpy as np

    import keras
    import secateurs.keras as sk
    from secateurs.keras._backend import to_numpy
    from secateurs.keras.examples import accuracy, compile_digits, digits_model, load_digits

    data = load_digits()
    fit = lambda m, n, **kw: m.fit(data.train_x, data.train_y, batch_size=64, epochs=n, verbose=0, **kw)  # noqa: E731
    start = time.perf_counter()
    dense = compile_digits(digits_model(16))
    fit(dense, epochs)
    result: dict[str, Any] = {"backend": backend, "keras": keras.__version__, "dense_accuracy": accuracy(dense, data),
                              "dense_train_s": round(time.perf_counter() - start, 1),
                              "macs": sk.count_macs(dense, data.test_x[:1])[0], "params": dense.count_params(),
                              "arms": {}}

    def copy() -> Any:
        model = keras.models.clone_model(dense)
        model.set_weights(dense.get_weights())
        return compile_digits(model)

    def finish(name: str, model: Any, start: float, pruned_accuracy: float, **extra: Any) -> None:
        masks = {v.path: v.constraint.mask for v in sk.masked_variables(model)}
        zeros_kept = all((to_numpy(v.value)[~masks[v.path]] == 0).all() for v in sk.masked_variables(model))
        sparsity = sk.overall_sparsity(model)
        sk.strip(model)
        with tempfile.TemporaryDirectory() as folder:
            path = Path(folder) / "model.keras"
            model.save(path)
            reloaded = keras.saving.load_model(path)
            same = bool(np.array_equal(to_numpy(reloaded.predict(data.test_x, verbose=0)),
                                       to_numpy(model.predict(data.test_x, verbose=0))))
        result["arms"][name] = {"pruned_accuracy": pruned_accuracy, "accuracy": accuracy(model, data),
                                "sparsity": round(sparsity, 4), "zeros_kept_through_fit": zeros_kept,
                                "reloaded_identical": same, "seconds": round(time.perf_counter() - start, 1), **extra}

    calibration = (data.train_x[:256], data.train_y[:256])
    for name, kwargs in (("magnitude 70%", {"method": "magnitude", "sparsity": 0.7}),
                         ("taylor 70% global", {"method": "taylor", "sparsity": 0.7, "scope": "global",
                                                "data": calibration}),
                         ("2:4", {"method": "magnitude", "pattern": "2:4", "skip_incompatible": True})):
        start, model = time.perf_counter(), copy()
        sk.prune(model, **kwargs)
        pruned = accuracy(model, data)
        fit(model, 2)
        finish(name, model, start, pruned)

    start, model = time.perf_counter(), copy()
    smaller, plan = sk.prune_structured(model, target="macs=0.5", method="taylor", data=calibration)
    pruned = accuracy(smaller, data)
    fit(smaller, 3)
    finish("structured macs=0.5", smaller, start, pruned, macs=plan.macs_after, params=smaller.count_params())

    start, model = time.perf_counter(), copy()
    steps = -(-len(data.train_x) // 64)
    callback = sk.GradualPruning(sk.PolynomialDecay(0.0, 0.8, begin_step=0, end_step=4 * steps, frequency=10))
    fit(model, 6, callbacks=[callback])
    finish("gradual 80%", model, start, accuracy(model, data), prunes=len(callback.plans))
    return result


def table(results: list[dict[str, Any]]) -> str:
    lines = ["| backend | arm | accuracy right after pruning | after fit | sparsity | MACs | zeros kept | "
             "reload identical | s |", "|---|---|--:|--:|--:|--:|---|---|--:|"]
    for r in results:
        lines.append(f"| {r['backend']} | dense (8 epochs) |  | {r['dense_accuracy']:.2%} | 0 | {r['macs']:,} |  |  | "
                     f"{r['dense_train_s']} |")
        for name, arm in r["arms"].items():
            lines.append(f"| {r['backend']} | {name} | {arm['pruned_accuracy']:.2%} | {arm['accuracy']:.2%} | "
                         f"{arm['sparsity']:.3f} | {arm.get('macs', r['macs']):,} | {arm['zeros_kept_through_fit']} | "
                         f"{arm['reloaded_identical']} | {arm['seconds']} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backends", nargs="+", choices=BACKENDS, default=list(BACKENDS))
    parser.add_argument("--epochs", type=int, default=8, help="dense training epochs")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (the torch backend)")
    parser.add_argument("--one", choices=BACKENDS, help=argparse.SUPPRESS)   # the subprocess of one backend
    args = parser.parse_args()
    if args.one:
        print(json.dumps(run_backend(args.one, args.epochs, args.threads)))
        return
    results = []
    for backend in args.backends:
        if importlib.util.find_spec(backend) is None:
            print(f"{backend}: not installed, skipped", file=sys.stderr)
            continue
        env = dict(os.environ, KERAS_BACKEND=backend, TF_CPP_MIN_LOG_LEVEL="3")
        done = subprocess.run([sys.executable, __file__, "--one", backend, "--epochs", str(args.epochs),
                               "--threads", str(args.threads)], env=env, capture_output=True, text=True)
        if done.returncode != 0:
            print(f"{backend}: failed\n{done.stderr[-3000:]}", file=sys.stderr)
            continue
        result = json.loads(done.stdout.strip().splitlines()[-1])
        print(json.dumps(result))
        results.append(result)
    print(table(results))


if __name__ == "__main__":
    main()
