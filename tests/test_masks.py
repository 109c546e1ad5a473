"""Masks that last: pruned weights stay exactly zero through training, copies, files,
torch.compile, DDP and finalize."""
from __future__ import annotations

import copy
import os

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import secateurs as sc
from secateurs.io import load_into
from secateurs.sparsity import MASK_SUFFIX


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(12, 32)
        self.bn = nn.BatchNorm1d(32)
        self.fc2 = nn.Linear(32, 24)
        self.head = nn.Linear(24, 3)

    def forward(self, x):
        return self.head(torch.relu(self.fc2(torch.relu(self.bn(self.fc1(x))))))


class CNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8 * 4 * 4, 16)
        self.head = nn.Linear(16, 3)

    def forward(self, x):
        x = torch.relu(self.conv2(torch.relu(self.bn1(self.conv1(x)))))
        return self.head(torch.relu(self.fc(x.flatten(1))))


def make(kind: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return MLP() if kind == "mlp" else CNN()


def batches(kind: str, n: int, seed: int = 0, size: int = 16) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    shape = (size, 12) if kind == "mlp" else (size, 3, 4, 4)
    return [(torch.randn(shape, generator=g), torch.randint(0, 3, (size,), generator=g)) for _ in range(n)]


def train(model: nn.Module, optimizer: torch.optim.Optimizer, data) -> None:
    model.train()
    for x, y in data:
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


def pruned_positions(model: nn.Module) -> dict[str, torch.Tensor]:
    """Name -> bool tensor of pruned positions, copied out of the model."""
    return {mp.name: (~mp.mask).clone() for mp in sc.masked_params(model)}


def pruned_values(model: nn.Module, positions: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    params = dict(model.named_parameters())
    return {name: params[name].detach()[where] for name, where in positions.items()}


def assert_zeros_kept(model: nn.Module, positions: dict[str, torch.Tensor]) -> None:
    assert positions, "the model has no masks; the test would prove nothing"
    for name, values in pruned_values(model, positions).items():
        assert values.numel() > 0, name
        assert torch.count_nonzero(values) == 0, f"{name}: {torch.count_nonzero(values)} pruned weights moved"


def state_of(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


OPTIMIZERS = {
    "sgd_momentum": lambda params: torch.optim.SGD(params, lr=0.05, momentum=0.9, weight_decay=1e-2),
    "adam": lambda params: torch.optim.Adam(params, lr=1e-2, weight_decay=1e-2),
    "adamw": lambda params: torch.optim.AdamW(params, lr=1e-2, weight_decay=1e-2),
}


# --- a plain user loop -------------------------------------------------------------------

@pytest.mark.parametrize("optimizer", sorted(OPTIMIZERS))
@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_zeros_stay_exact_through_training_with_keep_sparse(optimizer, kind):
    model = make(kind)
    sc.prune(model, "magnitude", 0.6)
    positions = pruned_positions(model)
    opt = OPTIMIZERS[optimizer](model.parameters())
    sc.keep_sparse(opt, model)
    before = state_of(model)
    train(model, opt, batches(kind, 20))
    assert_zeros_kept(model, positions)
    # the surviving weights did train
    for mp in sc.masked_params(model):
        assert not torch.equal(mp.param.detach()[mp.mask], before[mp.name][mp.mask]), mp.name
    # gradients were masked before the step, so no optimizer state built up at pruned positions
    params = dict(model.named_parameters())
    for name, where in positions.items():
        for key, value in opt.state[params[name]].items():
            if torch.is_tensor(value) and value.shape == where.shape:
                assert torch.count_nonzero(value[where]) == 0, f"{name} state {key}"


@pytest.mark.parametrize("optimizer", sorted(OPTIMIZERS))
def test_keep_sparse_holds_zeros_when_optimizer_state_predates_pruning(optimizer):
    """Momentum and Adam moments built before pruning push pruned weights off zero;
    keep_sparse holds them, and without it they visibly move (so the check is not vacuous)."""
    results = {}
    for keep in (True, False):
        model = make("mlp")
        opt = OPTIMIZERS[optimizer](model.parameters())
        train(model, opt, batches("mlp", 3, seed=1))   # momentum / moments everywhere
        sc.prune(model, "magnitude", 0.6)
        positions = pruned_positions(model)
        if keep:
            sc.keep_sparse(opt, model)
        train(model, opt, batches("mlp", 20))
        results[keep] = (model, positions)
    assert_zeros_kept(*results[True])
    moved = pruned_values(*results[False])
    assert sum(int(torch.count_nonzero(v)) for v in moved.values()) > 0


def test_keep_sparse_remove_stops_masking():
    model = make("mlp")
    sc.prune(model, "magnitude", 0.5)
    positions = pruned_positions(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    keeper = sc.keep_sparse(opt, model)
    train(model, opt, batches("mlp", 3))
    assert_zeros_kept(model, positions)
    keeper.remove()
    train(model, opt, batches("mlp", 3, seed=2))
    assert sum(int(torch.count_nonzero(v)) for v in pruned_values(model, positions).values()) > 0


def test_keep_sparse_rejects_a_non_optimizer():
    with pytest.raises(sc.InvalidArgument, match="torch.optim.Optimizer, got object"):
        sc.keep_sparse(object(), make("mlp"))


# --- copies ------------------------------------------------------------------------------

def test_masks_survive_deepcopy_and_copies_are_independent():
    model = make("cnn")
    sc.prune(model, "magnitude", 0.5)
    original = state_of(model)
    positions = pruned_positions(model)

    twin = copy.deepcopy(model)
    twin_masks = {mp.name: mp.mask for mp in sc.masked_params(twin)}
    assert twin_masks.keys() == positions.keys()
    for mp in sc.masked_params(model):
        assert torch.equal(twin_masks[mp.name], mp.mask)
        assert twin_masks[mp.name].data_ptr() != mp.mask.data_ptr()

    opt = torch.optim.SGD(twin.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-2)
    sc.keep_sparse(opt, twin)
    train(twin, opt, batches("cnn", 10))
    assert_zeros_kept(twin, positions)
    sc.prune(twin, "magnitude", 0.8)            # the copy's masks grow, the original's do not

    after = state_of(model)
    assert after.keys() == original.keys()
    for key in original:
        assert torch.equal(after[key], original[key]), key
    assert pruned_positions(model).keys() == positions.keys()
    for name, where in pruned_positions(model).items():
        assert torch.equal(where, positions[name])


# --- state_dict and files ------------------------------------------------------------------

def _same_outputs(a: nn.Module, b: nn.Module, kind: str) -> None:
    a.eval()
    b.eval()
    x = batches(kind, 1, seed=9)[0][0]
    with torch.no_grad():
        assert torch.equal(a(x), b(x))


def _train_kept(model: nn.Module, kind: str, steps: int = 10) -> None:
    opt = torch.optim.Adam(model.parameters(), lr=1e-2, weight_decay=1e-2)
    sc.keep_sparse(opt, model)
    train(model, opt, batches(kind, steps, seed=5))


def test_state_dict_round_trip_through_torch_save_into_another_masked_model(tmp_path):
    source = make("cnn", seed=0)
    sc.prune(source, "magnitude", 0.6)
    positions = pruned_positions(source)
    torch.save(source.state_dict(), tmp_path / "state.pt")

    target = make("cnn", seed=1)
    sc.prune(target, "random", 0.3)             # different masks that must be replaced
    target.load_state_dict(torch.load(tmp_path / "state.pt", weights_only=True))
    assert pruned_positions(target).keys() == positions.keys()
    for name, where in pruned_positions(target).items():
        assert torch.equal(where, positions[name]), name
    _same_outputs(source, target, "cnn")
    _train_kept(target, "cnn")
    assert_zeros_kept(target, positions)


def test_state_dict_into_a_fresh_unpruned_model_via_load_into(tmp_path):
    source = make("mlp", seed=0)
    sc.prune(source, "magnitude", 0.7)
    positions = pruned_positions(source)
    torch.save(source.state_dict(), tmp_path / "state.pt")

    fresh = make("mlp", seed=3)
    assert not list(sc.masked_params(fresh))
    state = torch.load(tmp_path / "state.pt", weights_only=True)
    with pytest.raises(RuntimeError, match="Unexpected key"):   # plain torch refuses the masks
        make("mlp").load_state_dict(state)
    load_into(fresh, state)
    assert pruned_positions(fresh).keys() == positions.keys()
    for name, where in pruned_positions(fresh).items():
        assert torch.equal(where, positions[name]), name
    _same_outputs(source, fresh, "mlp")
    _train_kept(fresh, "mlp")
    assert_zeros_kept(fresh, positions)


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_save_then_load_into_a_fresh_model(tmp_path, kind):
    model = make(kind)
    plan = sc.prune(model, "magnitude", 0.6)
    _train_kept(model, kind, steps=3)               # saved weights are trained, not just pruned
    positions = pruned_positions(model)
    sc.save(model, tmp_path / "out", plan)

    fresh = sc.load(make(kind, seed=7), tmp_path / "out")
    assert pruned_positions(fresh).keys() == positions.keys()
    for name, where in pruned_positions(fresh).items():
        assert torch.equal(where, positions[name]), name
    _same_outputs(model, fresh, kind)
    _train_kept(fresh, kind)
    assert_zeros_kept(fresh, positions)


# --- torch.compile -------------------------------------------------------------------------

def _compiled_matches_eager(backend: str, steps: int) -> None:
    torch._dynamo.reset()
    eager = make("cnn")
    sc.prune(eager, "magnitude", 0.6)
    positions = pruned_positions(eager)
    twin = copy.deepcopy(eager)
    compiled = torch.compile(twin, backend=backend)

    opt_eager = torch.optim.SGD(eager.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-2)
    opt_compiled = torch.optim.SGD(compiled.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-2)
    sc.keep_sparse(opt_eager, eager)
    sc.keep_sparse(opt_compiled, compiled)      # the wrapper: masks are found under _orig_mod
    data = batches("cnn", steps)
    train(eager, opt_eager, data)
    train(compiled, opt_compiled, data)

    assert_zeros_kept(twin, positions)
    for (name, p), (_, q) in zip(eager.named_parameters(), twin.named_parameters()):
        torch.testing.assert_close(q, p, rtol=1e-4, atol=1e-5, msg=name)
    x = batches("cnn", 1, seed=9)[0][0]
    with torch.no_grad():       # train mode, the graph already compiled: no recompilation
        torch.testing.assert_close(compiled(x), eager(x), rtol=1e-4, atol=1e-5)
    torch._dynamo.reset()


def test_compiled_model_keeps_zeros_and_matches_eager():
    _compiled_matches_eager("aot_eager", steps=20)


@pytest.mark.slow
def test_inductor_compiled_model_keeps_zeros_and_matches_eager():
    _compiled_matches_eager("inductor", steps=20)


# --- DDP ---------------------------------------------------------------------------------

def _ddp_worker(rank: int, world: int, init_method: str, out_dir: str) -> None:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=world)
    try:
        # each rank starts from its own weights and masks: DDP must broadcast rank 0's,
        # masks included, and keep_sparse must hold them on every rank
        model = make("mlp", seed=rank)
        sc.prune(model, "random" if rank else "magnitude", 0.6)
        ddp = DistributedDataParallel(model)
        opt = torch.optim.SGD(ddp.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-2)
        sc.keep_sparse(opt, ddp)
        start = state_of(model)
        train(ddp, opt, batches("mlp", 15, seed=100 + rank))
        torch.save({"start": start, "end": state_of(model)}, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_ddp_two_ranks_keep_zeros_and_agree(tmp_path):
    import torch.distributed as dist
    import torch.multiprocessing as mp

    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    init = f"file://{tmp_path / 'rendezvous'}"
    mp.spawn(_ddp_worker, args=(2, init, str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]

    reference = make("mlp", seed=0)
    sc.prune(reference, "magnitude", 0.6)
    positions = pruned_positions(reference)
    masks = {name + MASK_SUFFIX: ~where for name, where in positions.items()}
    for r, result in enumerate(ranks):
        end = result["end"]
        for key, mask in masks.items():                # rank 0's masks everywhere
            assert torch.equal(end[key], mask), f"rank {r} {key}"
        for name, where in positions.items():
            assert torch.count_nonzero(end[name][where]) == 0, f"rank {r} {name}"
            assert not torch.equal(end[name], result["start"][name]), f"rank {r} {name} did not train"
    # parameters agree; BatchNorm running statistics legitimately differ, since each rank
    # updates them from its own last batch after DDP's broadcast at the start of forward
    for name, _ in reference.named_parameters():
        assert torch.equal(ranks[0]["end"][name], ranks[1]["end"][name]), name


# --- finalize and growing masks -------------------------------------------------------------

def _held_bytes(model: nn.Module) -> int:
    tensors = list(model.parameters()) + list(model.buffers())
    return sum(t.numel() * t.element_size() for t in tensors)


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_finalize_drops_masks_keeps_zeros_and_memory_is_dense(kind):
    model = make(kind)
    dense = make(kind)
    sc.prune(model, "magnitude", 0.6)
    positions = pruned_positions(model)
    assert _held_bytes(model) > _held_bytes(dense)     # masks cost memory until finalize

    assert sc.finalize(model) == len(positions)
    assert not [n for n, _ in model.named_buffers() if n.endswith(MASK_SUFFIX)]
    assert not list(sc.masked_params(model))
    assert_zeros_kept(model, positions)
    assert list(model.state_dict()) == list(dense.state_dict())
    assert _held_bytes(model) == _held_bytes(dense)
    dense.load_state_dict(model.state_dict())          # strict load into an unpruned instance
    _same_outputs(model, dense, kind)


def test_masks_only_grow():
    model = make("cnn")
    first = sc.prune(model, "random", 0.3, seed=0)
    positions = pruned_positions(model)
    _train_kept(model, "cnn", steps=3)
    # a different random ranking would pick other weights; earlier zeros must stay anyway
    second = sc.prune(model, "random", 0.6, seed=1)
    for layer_first, layer_second in zip(first.layers, second.layers):
        assert layer_first.zeros == int(0.3 * layer_first.numel + 1e-9)  # floor: the one rounding rule
        assert layer_second.zeros == int(0.6 * layer_second.numel + 1e-9)
    grown = pruned_positions(model)
    for name, where in positions.items():
        assert torch.all(grown[name][where]), f"{name}: a weight pruned at 0.3 came back"
    assert_zeros_kept(model, grown)


def test_every_step_masks_weights_again_after_each_step():
    import secateurs as sc_
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    sc_.prune(model, "l1", 0.5)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    keeper = sc_.keep_sparse(opt, model, every_step=True)
    for _ in range(3):
        opt.zero_grad(); model(torch.randn(4, 8)).sum().backward(); opt.step()
        with torch.no_grad():
            model[0].weight.add_(1.0)  # an edit behind the optimizer's back
    # every_step re-masks on the next step, so only the last edit is still visible
    assert (model[0].weight[~model[0].weight_prune_mask] == 1.0).all()
    opt.zero_grad(); model(torch.randn(4, 8)).sum().backward(); opt.step()
    assert (model[0].weight[~model[0].weight_prune_mask] == 0).all()
    keeper.remove()
