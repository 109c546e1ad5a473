"""Fuzzing the files secateurs reads: tampered plan.json documents, lying sparse safetensors
headers, hostile recipes and command lines. Whatever hypothesis draws, the answer is success
or one SecateursError line (exit 2 on the command line): never a traceback, never a partial
output, never a changed input. About half a minute in all.
"""
from __future__ import annotations

import copy
import hashlib
import json
import os
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import secateurs as sc
from secateurs.errors import SecateursError

FUZZ = settings(max_examples=60, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])

JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=False) | st.text(max_size=6),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=6)


def digest(folder: Path) -> str:
    h = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        h.update(str(path.relative_to(folder)).encode() + path.read_bytes())
    return h.hexdigest()


def one_line(exc: BaseException) -> None:
    assert isinstance(exc, SecateursError), f"{type(exc).__name__}: {exc}"
    assert str(exc) and "\n" not in str(exc), repr(str(exc))


def mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 2))


# ------------------------------------------------------------------ plan.json

@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> tuple[Path, dict[str, Any]]:
    folder = tmp_path_factory.mktemp("fuzz") / "pruned"
    model = mlp()
    sc.save(model, folder, sc.prune_structured(model, torch.randn(2, 4), 0.5))
    return folder, json.loads((folder / "plan.json").read_text())


def _paths(value: Any, prefix: tuple = ()) -> list[tuple]:
    """Every place in a JSON document, containers included."""
    found = [prefix]
    if isinstance(value, dict):
        for key, item in value.items():
            found += _paths(item, prefix + (key,))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            found += _paths(item, prefix + (index,))
    return found


def _replace(document: Any, path: tuple, value: Any) -> Any:
    if not path:
        return value
    document[path[0]] = _replace(document[path[0]], path[1:], value)
    return document


KEYS = st.sampled_from(["keeps", "attributes", "masked", "steps", "blocks", "added_biases", "params_before"])


@st.composite
def tampered_plans(draw, record: dict[str, Any]) -> Any:
    """A valid plan with a few places replaced by arbitrary JSON, or a new top-level key, or junk."""
    kind = draw(st.sampled_from(["edit", "edit", "edit", "key", "junk"]))
    if kind == "junk":
        return draw(JSON)
    document = copy.deepcopy(record)
    if kind == "key":
        document[draw(KEYS)] = draw(JSON)
        return document
    for _ in range(draw(st.integers(1, 3))):
        path = draw(st.sampled_from(_paths(document)[1:]))
        small = st.integers(-3, 12) | st.just(1.0) | st.just(True) | st.just("") | st.just(":0")
        document = _replace(document, path, draw(small | JSON))
    return document


@FUZZ
@given(data=st.data())
def test_fuzzed_plan_json_loads_or_is_one_line(saved, data):
    folder, record = saved
    document = data.draw(tampered_plans(record))
    (folder / "plan.json").write_text(json.dumps(document))
    before, weights = digest(folder), (folder / "model.safetensors").read_bytes()
    fresh = mlp()
    state = copy.deepcopy(fresh.state_dict())
    try:
        sc.load(fresh, folder)
    except Exception as exc:   # noqa: BLE001 - the assertion is that it is a SecateursError
        one_line(exc)
        after = fresh.state_dict()   # refused before any cut: the model is as it was
        assert after.keys() == state.keys() and all(torch.equal(after[k], state[k]) for k in state)
    assert digest(folder) == before and (folder / "model.safetensors").read_bytes() == weights


# ------------------------------------------------------------------ sparse safetensors headers

SHAPES = st.lists(st.integers(-2, 2**45) | st.just(2.0) | st.just("4") | st.integers(0, 9), max_size=4)


@FUZZ
@given(shapes=st.dictionaries(st.sampled_from(["w", "b", ""]), SHAPES, max_size=2) | JSON,
       aliases=st.dictionaries(st.sampled_from(["v", "w", ""]), st.sampled_from(["w", "b", "x"]) | JSON, max_size=2)
       | st.none(),
       values=st.integers(0, 12), bitmask=st.lists(st.integers(0, 255), max_size=3))
def test_fuzzed_sparse_headers_load_or_are_one_line(tmp_path_factory, shapes, aliases, values, bitmask):
    from safetensors.torch import save_file

    path = tmp_path_factory.mktemp("sparse") / "w.safetensors"
    metadata = {"secateurs.sparse": json.dumps(shapes)}
    if aliases is not None:
        metadata["secateurs.aliases"] = json.dumps(aliases)
    tensors = {"w/values": torch.ones(values), "w/bitmask": torch.tensor(bitmask, dtype=torch.uint8),
               "b": torch.ones(3)}
    save_file(tensors, str(path), metadata=metadata)
    written = path.read_bytes()
    try:
        state = sc.load_state(path)
    except Exception as exc:   # noqa: BLE001
        one_line(exc)
    else:
        assert all(isinstance(t, torch.Tensor) for t in state.values())
        assert sum(t.numel() for t in state.values()) <= 8 * len(bitmask) * 2 + 3 + values
    assert path.read_bytes() == written


# ------------------------------------------------------------------ recipes

BASE_RECIPE = {"model": {"demo": "digits"}, "seed": 0,
               "stages": [{"prune": {"sparsity": 0.5}}, {"finetune": {"epochs": 1, "lr": 0.001}}, "evaluate"]}
YAML_SCALARS = st.sampled_from([".inf", "-.inf", ".nan", "1e400", str(2**64), str(2**80), "-1", "0", "yes", "null",
                                "~", "'2:4'", "2:4", "0x10", "[]", "{}", "*x", "&x 1", "!!python/object:os.system",
                                "\"\\u0000\"", "1_000", "0.5", "true"])


def _yaml(value: Any) -> str:
    return json.dumps(value)   # JSON is YAML: the document is built as data, then scalars spliced in as text


@st.composite
def recipes(draw) -> str:
    text = _yaml(BASE_RECIPE)
    for _ in range(draw(st.integers(1, 3))):
        target = draw(st.sampled_from(["0.5", "0.001", "1", '"digits"', '"evaluate"', "0}"]))
        if target in text:
            text = text.replace(target, draw(YAML_SCALARS), 1)
    if draw(st.booleans()):   # an alias bomb of drawn depth and width in front
        width, depth = draw(st.integers(1, 12)), draw(st.integers(1, 8))
        lines = [f"a0: &a0 [{', '.join(['1'] * width)}]"]
        lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * width)}]" for i in range(1, depth)]
        text = "\n".join(lines) + "\n" + "\n".join(f"{k}: {json.dumps(v)}" for k, v in BASE_RECIPE.items())
    return text


@FUZZ
@given(text=recipes())
def test_fuzzed_recipes_parse_or_are_one_line(text):
    from secateurs.recipe import parse_recipe

    try:
        recipe = parse_recipe(text, source="fuzz.yaml")
    except Exception as exc:   # noqa: BLE001
        one_line(exc)
    else:
        assert recipe.stages and 0 <= recipe.seed < 2**64


# ------------------------------------------------------------------ command lines

OPTIONS = ["--sparsity", "--ratio", "--target", "--method", "--input-shape", "--batch-size", "--pattern", "--out",
           "--calib", "--weights", "--threads", "--seqlen", "--units"]
VALUES = st.sampled_from(["0.5", "1.5", "-1", "nan", "inf", "0", "2:4", "macs=0.5", "flops=2", "l1", "taylor",
                          "3,32,32", "1,1000000,1000000,1000000", "", "x" * 30, "../etc", "/proc/x", "99999999999999999999999"])


@settings(FUZZ, max_examples=30)
@given(options=st.lists(st.tuples(st.sampled_from(OPTIONS), VALUES), max_size=4), structured=st.booleans())
def test_fuzzed_command_lines_exit_cleanly(tmp_path_factory, capsys, options, structured):
    """`prune` of a factory that does not exist: every vector must end in argparse's usage error or one line."""
    from secateurs.cli import main

    root = tmp_path_factory.mktemp("cli")
    argv = ["prune", "--model", "secateurs_no_such_module:build", "--weights", str(root / "w.safetensors")]
    argv += ["--structured"] * structured + [part for pair in options for part in pair]
    if "--out" not in argv:
        argv += ["--out", str(root / "out")]
    here = os.getcwd()
    os.chdir(root)   # relative --out values land in the example's own folder
    try:
        code = main(argv)
    except SystemExit as exit:   # argparse's own usage errors
        code = exit.code
    finally:
        os.chdir(here)
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err and (err.startswith("usage:") or len(err.strip().splitlines()) == 1), err
    assert [p.name for p in root.iterdir()] == []
