"""Saving and loading: safetensors, the sparse form, pickle refusal, clear mismatches."""
from __future__ import annotations

import os
import sys

import pytest
import torch
from torch import nn

import secateurs as sc
from secateurs.errors import FileProblem, InvalidArgument, WeightsMismatch
from secateurs.io import (check_output_dir, import_factory, load_into, load_state, save_weights,
                          staged_output, weights_state)
from tests.conftest import tiny_cnn


class NotATensor:
    pass


def test_sparse_file_round_trips_exactly(tmp_path):
    model = tiny_cnn()
    sc.prune(model, "l1", 0.7)
    save_weights(model, tmp_path / "w.safetensors", sparse=True)
    loaded = load_state(tmp_path / "w.safetensors")
    state = weights_state(model)
    assert loaded.keys() == state.keys()
    for k in state:
        assert torch.equal(loaded[k], state[k]), k
    assert loaded["bn1.num_batches_tracked"].dtype == torch.int64


def test_tied_weights_are_stored_once_and_restored(tmp_path):
    emb = nn.Embedding(10, 4)
    head = nn.Linear(4, 10, bias=False)
    head.weight = emb.weight
    model = nn.Sequential(emb, head)
    save_weights(model, tmp_path / "tied.safetensors")
    loaded = load_state(tmp_path / "tied.safetensors")
    assert torch.equal(loaded["0.weight"], loaded["1.weight"])


def test_torch_file_with_pickled_objects_is_refused_unless_trusted(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"w": torch.ones(2), "obj": NotATensor()}, path)
    with pytest.raises(FileProblem, match="refusing to unpickle"):
        load_state(path)
    with pytest.raises(FileProblem, match="state dict of tensors"):
        load_state(path, trust_pickle=True)  # unpickled, but still not tensors only


def test_plain_torch_state_dict_loads_without_trust(tmp_path):
    model = tiny_cnn()
    torch.save(model.state_dict(), tmp_path / "plain.pt")
    assert set(load_state(tmp_path / "plain.pt")) == set(model.state_dict())


def test_missing_and_corrupt_files_are_named(tmp_path):
    with pytest.raises(FileProblem, match="not found: .*nope.safetensors"):
        load_state(tmp_path / "nope.safetensors")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a safetensors file")
    with pytest.raises(FileProblem, match="cannot read weights file"):
        load_state(bad)


def test_mismatched_weights_name_the_keys():
    small, other = tiny_cnn(), nn.Sequential(nn.Linear(3, 3))
    with pytest.raises(WeightsMismatch, match="missing: conv1.weight.*unexpected: 0.weight"):
        load_into(small, other.state_dict())
    state = small.state_dict()
    state["fc1.weight"] = torch.zeros(3, 3)
    with pytest.raises(WeightsMismatch, match=r"shape mismatch: fc1.weight \(3, 3\) vs model \(32, 256\)"):
        load_into(tiny_cnn(), state)


def test_masks_in_a_state_dict_are_reattached_to_a_fresh_model():
    model = tiny_cnn()
    sc.prune(model, "l1", 0.5)
    fresh = tiny_cnn(seed=3)
    load_into(fresh, model.state_dict())
    assert {mp.name for mp in sc.masked_params(fresh)} == {mp.name for mp in sc.masked_params(model)}


def test_output_dir_never_holds_an_input(tmp_path):
    weights = tmp_path / "in" / "w.safetensors"
    weights.parent.mkdir()
    weights.write_bytes(b"x")
    with pytest.raises(FileProblem, match="would overwrite input"):
        check_output_dir(tmp_path / "in", [weights], overwrite=True)
    with pytest.raises(FileProblem, match="not empty"):
        check_output_dir(tmp_path, [tmp_path.parent / "elsewhere"])
    assert check_output_dir(tmp_path / "new", [weights]) == (tmp_path / "new").resolve()


def test_staged_output_writes_nothing_when_the_block_fails(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(RuntimeError):
        with staged_output(out) as stage:
            (stage / "half.json").write_text("{}")
            raise RuntimeError("boom")
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("spec,message", [
    ("no_colon", "must look like"),
    ("surely_missing_pkg_xyz:build", "cannot import module"),
    ("tests.conftest:no_such_factory", "has no attribute"),
])
def test_factory_errors_name_the_problem(spec, message):
    with pytest.raises(InvalidArgument, match=message):
        import_factory(spec)


def test_factory_resolves():
    assert import_factory("tests.conftest:tiny_cnn")() is not None


def test_two_structured_cuts_saved_with_only_the_last_plan_replay_both(tmp_path):
    from secateurs.examples import zoo
    from secateurs.structured import PLANS_ATTRIBUTE

    model, x = zoo.ZOO["resnet18"]()
    first = sc.prune_structured(model.eval(), x, 0.3)
    second = sc.prune_structured(model, x, {"stages.0.*": 0.5})     # cuts fewer groups than the first
    assert second.keeps and set(second.keeps) != set(first.keeps)
    sc.save(model, tmp_path / "last", second)                      # the model remembers the first cut
    fresh = sc.load(zoo.ZOO["resnet18"]()[0], tmp_path / "last").eval()
    with torch.no_grad():
        assert torch.equal(fresh(*x), model(*x))
    sc.save(fresh, tmp_path / "again", sc.prune_structured(fresh, x, 0.2))   # replayed cuts count too
    assert len(sc.load(zoo.ZOO["resnet18"]()[0], tmp_path / "again").__dict__[PLANS_ATTRIBUTE]) == 3
    del model.__dict__[PLANS_ATTRIBUTE]                                 # a plan saved alone, without its history
    sc.save(model, tmp_path / "alone", second)
    with pytest.raises(WeightsMismatch, match="pruned more than once"):
        sc.load(zoo.ZOO["resnet18"]()[0], tmp_path / "alone")


@pytest.mark.skipif(sys.platform == "win32", reason="no flock: abandoned staging folders are not swept")
def test_staging_folders_of_killed_runs_are_swept_and_nothing_else(tmp_path):
    import fcntl

    from secateurs.io import OWNER_SUFFIX, staged_output

    def stage(name, record=True):
        folder = tmp_path / name
        folder.mkdir()
        (folder / "half-written.bin").write_bytes(b"x" * 10)
        if record:
            (tmp_path / (name + OWNER_SUFFIX)).write_text("{}")
        return folder

    killed = stage(".secateurs-killed")                   # nobody holds its lock: its process died a moment ago
    running = stage(".secateurs-live")                    # its owner (here: this test) holds the lock
    holder = os.open(tmp_path / (".secateurs-live" + OWNER_SUFFIX), os.O_RDONLY)
    fcntl.flock(holder, fcntl.LOCK_EX)
    users = stage(".secateurs-users-own", record=False)   # no owner record: not ours to touch
    try:
        with staged_output(tmp_path / "out") as folder:
            assert list(folder.iterdir()) == []           # empty: a nested output may check that
            (folder / "model.safetensors").write_bytes(b"weights")
    finally:
        os.close(holder)
    assert not killed.exists() and not (tmp_path / (".secateurs-killed" + OWNER_SUFFIX)).exists()
    assert running.exists() and users.exists()
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["model.safetensors"]
    assert sorted(p.name for p in tmp_path.glob(".*") if not p.is_dir()) == [
        ".secateurs-live" + OWNER_SUFFIX]   # ours (record and lock) cleaned up after itself
