"""Recovery: distillation, BatchNorm recalibration, pruning callbacks and guard rails."""
from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import secateurs as sc
from secateurs.errors import IncompatibleLayer, InvalidArgument, MissingData
from secateurs.recover import (AGPSchedule, IterativeSchedule, PruningCallback, distill, distillation_gap,
                               guarded_prune, kd_loss, recalibrate_bn, trainer_callback)
from secateurs.structured import prune_structured

from tests.conftest import tiny_batches, tiny_cnn

pytestmark = pytest.mark.usefixtures("one_thread")


def hooks_left(*models: nn.Module) -> int:
    return sum(len(m._forward_hooks) for model in models for m in model.modules())


def pruned_pair(seed: int = 0, ratio: float = 0.5) -> tuple[nn.Module, nn.Module]:
    """(teacher, student): the student is the teacher with half of its channels cut."""
    teacher = tiny_cnn(seed).eval()
    student = copy.deepcopy(teacher)
    prune_structured(student, tiny_batches(1)[0][0], ratio)
    return teacher, student


# --- distillation ------------------------------------------------------------------------

def test_kd_loss_is_t_squared_times_the_kl_of_the_softened_distributions():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(5, 7, generator=g), torch.randn(5, 7, generator=g)
    temperature = 3.0
    p_t, p_s = torch.softmax(t / temperature, 1), torch.softmax(s / temperature, 1)
    by_hand = temperature ** 2 * (p_t * (p_t.log() - p_s.log())).sum(1).mean()
    assert kd_loss(s, t, temperature).item() == pytest.approx(by_hand.item(), rel=1e-5)
    assert kd_loss(t, t, temperature).item() == pytest.approx(0.0, abs=1e-6)


def test_kd_loss_over_tokens_averages_the_positions_the_mask_keeps():
    g = torch.Generator().manual_seed(1)
    s, t = torch.randn(2, 3, 5, generator=g), torch.randn(2, 3, 5, generator=g)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    rows = mask.bool()
    assert kd_loss(s, t, 2.0, mask).item() == pytest.approx(kd_loss(s[rows], t[rows], 2.0).item(), rel=1e-6)


def test_distill_loss_is_alpha_kd_plus_one_minus_alpha_task_loss():
    teacher, student = pruned_pair()
    batch = tiny_batches(1)[0]
    x, y = batch
    with torch.no_grad():
        s, t = student.train()(x), teacher(x)   # train mode as inside distill (the student has a BatchNorm)
    alpha, temperature = 0.7, 2.5
    by_hand = alpha * kd_loss(s, t, temperature) + (1 - alpha) * F.cross_entropy(s, y)
    history = distill(student, teacher, [batch], epochs=1, lr=1e-3, temperature=temperature, alpha=alpha)
    # one batch: the recorded loss is the one before the only optimizer step
    assert history.loss[0] == pytest.approx(by_hand.item(), rel=1e-5)
    assert history.kd[0] == pytest.approx(kd_loss(s, t, temperature).item(), rel=1e-5)
    assert history.task[0] == pytest.approx(F.cross_entropy(s, y).item(), rel=1e-5)


def test_distill_brings_the_student_closer_to_the_teacher_and_leaves_the_teacher_alone():
    teacher, student = pruned_pair()
    teacher.train()   # distill must run it in eval mode and give the mode back
    data = tiny_batches(4)
    teacher_state = copy.deepcopy(teacher.state_dict())
    before = distillation_gap(student, teacher, data)
    history = distill(student, teacher, data, epochs=15, lr=3e-3, alpha=1.0)
    after = distillation_gap(student, teacher, data)
    assert after < 0.5 * before
    assert history.loss[-1] < history.loss[0]
    assert teacher.training and all(torch.equal(v, teacher.state_dict()[k]) for k, v in teacher_state.items())
    assert all(p.grad is None for p in teacher.parameters())


def test_hidden_matching_projects_pruned_channels_and_removes_its_hooks():
    teacher, student = pruned_pair()
    assert student.conv2.out_channels < teacher.conv2.out_channels
    history = distill(student, teacher, tiny_batches(3), epochs=8, lr=3e-3,
                      hidden=[("conv2", "conv2"), ("fc1", "fc1")], hidden_weight=1.0)
    assert hooks_left(student, teacher) == 0
    projection = history.projections["conv2->conv2"]
    assert projection.dim == 1    # channels of a [N, C, H, W] output
    assert projection.linear.weight.shape == (teacher.conv2.out_channels, student.conv2.out_channels)
    assert history.hidden[-1] < history.hidden[0]
    assert not any(p is q for p in projection.parameters() for q in student.parameters())


def test_hidden_matching_of_equal_widths_needs_no_projection():
    teacher = tiny_cnn(0)
    student = tiny_cnn(1)
    history = distill(student, teacher, tiny_batches(2), epochs=1, hidden=[("fc1", "fc1")])
    assert history.projections == {"fc1->fc1": None} and history.hidden[0] > 0


def test_distill_keeps_pruned_weights_at_zero():
    teacher = tiny_cnn(0)
    student = copy.deepcopy(teacher)
    sc.prune(student, "magnitude", 0.6)
    distill(student, teacher, tiny_batches(3), epochs=2, lr=1e-2)
    for mp in sc.masked_params(student):
        assert torch.count_nonzero(mp.param.detach()[~mp.mask]) == 0


def tiny_bert_classifier(seed: int = 0) -> nn.Module:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(seed)
    config = transformers.BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=48, max_position_embeddings=32, num_labels=3)
    return transformers.BertForSequenceClassification(config)


def text_batches(n: int, seed: int = 0, size: int = 4, length: int = 8) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(0, 50, (size, length), generator=g),
             "attention_mask": torch.ones(size, length, dtype=torch.long),
             "labels": torch.randint(0, 3, (size,), generator=g)} for _ in range(n)]


def test_distill_a_pruned_hugging_face_model_from_dict_batches_with_labels():
    teacher = tiny_bert_classifier(0).eval()
    with torch.no_grad():
        teacher.classifier.weight.mul_(300)   # a confident teacher: a random one is near uniform
    data = text_batches(3)
    with torch.no_grad():
        for batch in data:   # labels the teacher agrees with, as for a trained teacher
            batch["labels"] = teacher(input_ids=batch["input_ids"]).logits.argmax(-1)
    student = copy.deepcopy(teacher)
    prune_structured(student, {"input_ids": data[0]["input_ids"]}, 0.5)
    torch.manual_seed(0)
    student.classifier.reset_parameters()   # a student that starts far from its teacher
    before = distillation_gap(student, teacher, data)
    layer = "bert.encoder.layer.1.intermediate"
    history = distill(student, teacher, data, epochs=10, lr=3e-3, alpha=0.8, hidden=[(layer, layer)])
    assert distillation_gap(student, teacher, data) < 0.5 * before
    assert all(v > 0 for v in history.task)   # the model's own loss on the labels
    projection = history.projections[f"{layer}->{layer}"]
    assert projection.dim == 2 and projection.linear.weight.shape == (48, 24)   # [batch, tokens, features]
    assert hooks_left(student, teacher) == 0


def test_distill_rejects_bad_arguments():
    teacher, student = pruned_pair()
    data = tiny_batches(1)
    with pytest.raises(InvalidArgument, match="same module"):
        distill(teacher, teacher, data)
    with pytest.raises(InvalidArgument, match="temperature"):
        distill(student, teacher, data, temperature=0)
    with pytest.raises(InvalidArgument, match="alpha"):
        distill(student, teacher, data, alpha=1.5)
    with pytest.raises(InvalidArgument, match="optimizer"):
        distill(student, teacher, data, optimizer="lion")
    with pytest.raises(InvalidArgument, match="pairs"):
        distill(student, teacher, data, hidden=["conv1"])
    with pytest.raises(InvalidArgument, match="teacher has no module 'nope'"):
        distill(student, teacher, data, hidden=[("conv1", "nope")])
    assert hooks_left(student, teacher) == 0
    student.unused = nn.Linear(2, 2)
    with pytest.raises(IncompatibleLayer, match="'unused' did not run"):
        distill(student, teacher, data, hidden=[("unused", "fc1")])
    assert hooks_left(student, teacher) == 0
    with pytest.raises(MissingData, match="labels"):
        distill(student, teacher, [x for x, _ in data], alpha=0.5)
    with pytest.raises(InvalidArgument, match="same shape"):
        kd_loss(torch.zeros(2, 3), torch.zeros(2, 4))


# --- BatchNorm recalibration --------------------------------------------------------------

class BNNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(6, 5)
        self.drop = nn.Dropout(0.5)
        self.bn = nn.BatchNorm1d(5, momentum=0.3)
        self.head = nn.Linear(5, 2)

    def forward(self, x):
        return self.head(self.bn(self.drop(self.fc(x))))


def test_recalibrate_bn_gives_the_batch_statistics_of_the_data_and_restores_modes():
    torch.manual_seed(0)
    model = BNNet()
    model.train()
    model.head.eval()
    g = torch.Generator().manual_seed(0)
    data = [torch.randn(16, 6, generator=g) * 3 + 1 for _ in range(3)]
    assert recalibrate_bn(model, data) == 3
    with torch.no_grad():
        acts = [model.fc(x) for x in data]   # dropout runs in eval mode: the activations as at inference
    expected_mean = torch.stack([a.mean(0) for a in acts]).mean(0)
    expected_var = torch.stack([a.var(0, unbiased=True) for a in acts]).mean(0)
    torch.testing.assert_close(model.bn.running_mean, expected_mean)
    torch.testing.assert_close(model.bn.running_var, expected_var)
    assert int(model.bn.num_batches_tracked) == 3
    assert model.bn.momentum == 0.3
    assert model.training and model.fc.training and model.bn.training and not model.head.training

    one = torch.cat(data)   # one batch: exactly the data's mean and unbiased variance
    recalibrate_bn(model, [one])
    with torch.no_grad():
        a = model.fc(one)
    torch.testing.assert_close(model.bn.running_mean, a.mean(0))
    torch.testing.assert_close(model.bn.running_var, a.var(0, unbiased=True))


def test_recalibrate_bn_reads_at_most_the_given_batches_and_restores_a_pruned_cnn():
    teacher, student = pruned_pair()
    data = tiny_batches(5)
    assert recalibrate_bn(student, data, batches=2) == 2
    assert int(student.bn1.num_batches_tracked) == 2
    assert not student.training and student.bn1.momentum == 0.1


def test_recalibrate_bn_rejects_bad_input_and_keeps_old_statistics():
    model = BNNet()
    model.bn.running_mean.fill_(2.0)
    with pytest.raises(MissingData, match="no batches"):
        recalibrate_bn(model, [])
    assert torch.equal(model.bn.running_mean, torch.full((5,), 2.0)) and model.bn.momentum == 0.3
    with pytest.raises(InvalidArgument, match="batches"):
        recalibrate_bn(model, [torch.randn(4, 6)], batches=0)
    with pytest.raises(InvalidArgument, match="no BatchNorm"):
        recalibrate_bn(nn.Linear(3, 3), [torch.randn(2, 3)])


# --- pruning callbacks -------------------------------------------------------------------

def test_iterative_schedule_prunes_in_rounds_from_a_user_loop():
    model = tiny_cnn(0)
    schedule = IterativeSchedule(0.75, rounds=2, every=3)
    assert [schedule(s) for s in range(8)] == [None, None, None, pytest.approx(0.5), None, None,
                                               pytest.approx(0.75), None]
    callback = PruningCallback(model, schedule)
    sc.finetune(model, tiny_batches(4), epochs=2, lr=1e-2, optimizer="sgd", on_step=callback.on_step_end)
    assert [step for step, _ in callback.plans] == [3, 6]
    for name, sparsity in sc.sparsity_of(model).items():
        assert sparsity == pytest.approx(0.75, abs=1e-3), name


def test_agp_schedule_matches_the_cubic_ramp():
    schedule = AGPSchedule(0.8, end_step=10, start_step=2, frequency=4)
    due = {s: schedule(s) for s in range(13) if schedule(s) is not None}
    assert list(due) == [2, 6, 10]
    assert due[6] == pytest.approx(sc.agp_sparsity(6, 0.0, 0.8, 2, 10)) and due[10] == 0.8


def test_trainer_callback_applies_the_schedule_inside_a_real_trainer(tmp_path):
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    model = tiny_bert_classifier(0)
    examples = [{k: v[i] for k, v in batch.items()} for batch in text_batches(5) for i in range(4)]
    pruning = PruningCallback(model, AGPSchedule(0.5, end_step=4, start_step=0, frequency=2),
                              {"types": [nn.Linear]})
    args = transformers.TrainingArguments(output_dir=str(tmp_path), max_steps=5, per_device_train_batch_size=4,
                                          learning_rate=1e-2, save_strategy="no", report_to=[], use_cpu=True,
                                          logging_strategy="no", disable_tqdm=True, seed=0)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=examples,
                                   callbacks=[trainer_callback(pruning)])
    trainer.train()
    assert trainer.state.global_step == 5
    assert [step for step, _ in pruning.plans] == [2, 4]
    assert pruning.plans[0][1].sparsity == pytest.approx(sc.agp_sparsity(2, 0.0, 0.5, 0, 4))
    sparsities = sc.sparsity_of(model)
    assert sparsities and all(s == pytest.approx(0.5, abs=1e-3) for s in sparsities.values())
    for mp in sc.masked_params(model):   # step 5 trained on: the pruned weights are still zero
        assert torch.count_nonzero(mp.param.detach()[~mp.mask]) == 0


def test_lightning_callback_applies_the_schedule_inside_a_real_trainer(tmp_path):
    pl = pytest.importorskip("lightning.pytorch")
    from secateurs.recover import lightning_callback

    class Module(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = tiny_cnn()

        def training_step(self, batch, batch_idx):
            x, y = batch
            return F.cross_entropy(self.net(x), y)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)

    torch.manual_seed(0)
    module = Module()
    pruning = PruningCallback(module.net, AGPSchedule(0.5, end_step=4, start_step=0, frequency=2),
                              {"types": [nn.Conv2d, nn.Linear]})
    x, y = (torch.cat(parts) for parts in zip(*tiny_batches(6)))
    wrapped = lightning_callback(pruning)
    trainer = pl.Trainer(max_steps=5, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
                         callbacks=[wrapped])
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=8)
    trainer.fit(module, loader)
    assert trainer.global_step == 5
    assert [step for step, _ in pruning.plans] == [2, 4]
    sparsities = sc.sparsity_of(module.net)
    assert sparsities and all(s == pytest.approx(0.5, abs=0.02) for s in sparsities.values())
    for mp in sc.masked_params(module.net):   # step 5 trained on, with momentum: pruned weights stay zero
        assert torch.count_nonzero(mp.param.detach()[~mp.mask]) == 0
    # a second fit with the same callback (a new Trainer counts steps from 0 again) keeps the zeros too
    seen = []
    module.net.register_forward_pre_hook(lambda m, a: seen.append(float((m.conv1.weight == 0).float().mean())))
    again = pl.Trainer(max_steps=3, accelerator="cpu", logger=False, enable_checkpointing=False,
                       enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
                       callbacks=[wrapped])
    again.fit(module, loader)
    assert len(seen) == 3 and all(z == pytest.approx(0.5, abs=0.02) for z in seen)


def test_callbacks_reject_bad_input():
    with pytest.raises(InvalidArgument, match="end_step"):
        AGPSchedule(0.5, end_step=3, start_step=3)
    with pytest.raises(InvalidArgument, match="final_sparsity"):
        AGPSchedule(1.5, end_step=3)
    with pytest.raises(InvalidArgument, match="every"):
        IterativeSchedule(0.5, rounds=2, every=0)
    with pytest.raises(InvalidArgument, match="schedule"):
        PruningCallback(tiny_cnn(), 0.5)
    with pytest.raises(InvalidArgument, match="sparsity"):
        PruningCallback(tiny_cnn(), AGPSchedule(0.5, end_step=3), {"sparsity": 0.2})
    with pytest.raises(InvalidArgument, match="callback"):
        trainer_callback(object())
    with pytest.raises(InvalidArgument, match="callback"):
        sc.lightning_callback(object())


# --- guard rails -------------------------------------------------------------------------

class Recorder:
    """A structured prune step that keeps a deep copy of the model as it was before each call."""

    def __init__(self):
        self.before: list[nn.Module] = []
        self.x = tiny_batches(1)[0][0]

    def __call__(self, model: nn.Module, ratio: float):
        self.before.append(copy.deepcopy(model))
        return prune_structured(model, self.x, ratio)


def same_model(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return str(a) == str(b) and sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_guard_rolls_back_exactly_the_step_that_crossed_the_tolerance():
    model = tiny_cnn(0)
    metrics = iter([0.90, 0.89, 0.86, 0.84, 0.99])    # dense, then one per step
    recovered = []
    prune_step = Recorder()
    report = guarded_prune(model, [0.2, 0.2, 0.3, 0.3], prune_step, lambda m, s: recovered.append(s),
                           lambda m: next(metrics), tolerance=0.05)
    assert len(prune_step.before) == 3 and recovered == [0.2, 0.2, 0.3]   # step 4 never ran
    assert [s.accepted for s in report.steps] == [True, True, False]
    assert report.rolled_back.index == 2 and report.rolled_back.drop == pytest.approx(0.06)
    assert report.final_metric == 0.86
    assert same_model(model, prune_step.before[2])
    assert model.conv1.out_channels < 8    # the two accepted prunings stay
    x = tiny_batches(1)[0][0]
    torch.testing.assert_close(model.eval()(x), prune_step.before[2].eval()(x))


def test_guard_for_a_lower_is_better_metric_and_a_broken_model():
    model = tiny_cnn(0)
    before = copy.deepcopy(model)
    losses = iter([1.0, 1.05, float("nan")])
    report = guarded_prune(model, [0.1, 0.1], Recorder(), None, lambda m: next(losses), tolerance=0.1,
                           higher_is_better=False)
    assert [s.accepted for s in report.steps] == [True, False]
    assert not same_model(model, before)   # first step kept

    model = tiny_cnn(0)
    report = guarded_prune(model, ["macs=0.5"], lambda m, s: prune_structured(m, tiny_batches(1)[0][0], target=s),
                           None, lambda m: 0.0, tolerance=0.5, dense_metric=1.0)
    assert report.rolled_back is not None and same_model(model, before)


def test_guard_restores_the_model_when_a_step_raises():
    model = tiny_cnn(0)
    before = copy.deepcopy(model)

    def failing_recover(m, step):
        raise RuntimeError("out of memory")

    with pytest.raises(RuntimeError):
        guarded_prune(model, [0.5], Recorder(), failing_recover, lambda m: 1.0, tolerance=0.1)
    assert same_model(model, before)


def test_guard_rejects_bad_input():
    model = tiny_cnn(0)
    ok = dict(prune_step=Recorder(), recover_step=None, evaluate=lambda m: 1.0)
    with pytest.raises(InvalidArgument, match="steps"):
        guarded_prune(model, [], tolerance=0.1, **ok)
    with pytest.raises(InvalidArgument, match="step"):
        guarded_prune(model, [1.5], tolerance=0.1, **ok)
    with pytest.raises(InvalidArgument, match="tolerance"):
        guarded_prune(model, [0.5], tolerance=-1, **ok)
    with pytest.raises(InvalidArgument, match="evaluate"):
        guarded_prune(model, [0.5], Recorder(), None, 0.9, tolerance=0.1)
    with pytest.raises(InvalidArgument, match="evaluate must return a number"):
        guarded_prune(model, [0.5], Recorder(), None, lambda m: "good", tolerance=0.1)
    assert math.isfinite(guarded_prune(model, (0.1,), tolerance=1.0, **ok).final_metric)
