"""Schedules, the update, pruning, the update log and exact replay."""

from __future__ import annotations

import copy
from collections import OrderedDict

import pytest
import torch
from torch import nn

from conftest import make_task
from seedtune.common.pruning import synflow_mask, synflow_scores
from seedtune.common.schedule import ConstantSchedule, StagewiseSchedule
from seedtune.common import trainable as trainable_module
from seedtune.common.trainable import DirectionField, TrainableSet
from seedtune.common.update import apply_update
from seedtune.common.updatelog import Checkpoint, StepRecord, UpdateApplier, UpdateLog


# -- schedules ---------------------------------------------------------------------------------
def test_stagewise_schedule_at_its_boundaries():
    schedule = StagewiseSchedule(steps=700, stages=3, lr=0.4, beta_start=1e-3, beta_end=1e-1, prox=0.5)
    assert schedule.stage_starts() == [0, 100, 300]  # lengths 100, 200, 400: doubling, summing to T
    expected = {0: (0, 0.4, 1e-3, 0), 99: (0, 0.4, 1e-3, 0), 100: (1, 0.2, 1e-2, 100),
                299: (1, 0.2, 1e-2, 100), 300: (2, 0.1, 1e-1, 300), 699: (2, 0.1, 1e-1, 300)}
    for step, (stage, lr, beta, anchor) in expected.items():
        plan = schedule.plan(step)
        assert (plan.stage, plan.lr, plan.anchor_step) == (stage, lr, anchor)
        assert plan.beta == pytest.approx(beta, rel=1e-12)
        assert plan.resets_anchor == (step in (0, 100, 300))
    with pytest.raises(IndexError):
        schedule.plan(700)


def test_stage_lengths_double_for_any_total():
    for steps in (7, 10, 999, 1000):
        starts = StagewiseSchedule(steps, 3, 1.0, 1.0, 1.0, 0.0).stage_starts() + [steps]
        lengths = [b - a for a, b in zip(starts, starts[1:])]
        assert sum(lengths) == steps and all(n > 0 for n in lengths)
        assert all(abs(b - 2 * a) <= 2 for a, b in zip(lengths, lengths[1:]))


def test_constant_schedule_is_dpzero():
    plan = ConstantSchedule(10, 0.1, 1e-3).plan(9)
    assert (plan.lr, plan.beta, plan.prox, plan.resets_anchor) == (0.1, 1e-3, 0.0, False)


# -- the update --------------------------------------------------------------------------------
def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Embedding(20, 6), nn.Linear(6, 4), nn.Linear(4, 2))


def test_proximal_step_without_data_gradient_moves_theta_toward_its_anchor():
    model = _model()
    trainable = TrainableSet.everything(model)
    field = DirectionField(trainable, "rademacher")
    anchor = [values - 1.0 for values in trainable.snapshot()]  # anchor one unit below theta
    before = trainable.snapshot()
    apply_update(trainable, field, [1], [0.0], lr=0.1, prox=0.5, anchor=anchor)
    for old, new, a in zip(before, trainable.snapshot(), anchor):
        assert torch.allclose(new - a, (1 - 0.1 * 0.5) * (old - a))  # contracted by 1 - lr * lambda


def test_the_update_follows_the_directions_exactly():
    model = _model()
    trainable = TrainableSet(model, {"1.weight": torch.tensor([0, 5, 7]), "2.bias": None})
    field = DirectionField(trainable, "gaussian")
    before = trainable.snapshot()
    apply_update(trainable, field, [11, 12], [2.0, -4.0], lr=0.5)
    for entry, old in zip(trainable, before):
        z11 = field.fill(entry, 11, torch.empty(entry.size))
        z12 = field.fill(entry, 12, torch.empty(entry.size))
        assert torch.allclose(entry.values(), old - 0.5 * (2.0 * z11 - 4.0 * z12) / 2)


@pytest.mark.parametrize("distribution", ["rademacher", "gaussian"])
def test_the_update_does_not_depend_on_how_tensors_are_chunked(monkeypatch, distribution):
    results = []
    for chunk in (1 << 20, 37):
        monkeypatch.setattr(trainable_module, "CHUNK", chunk)
        model = _model()
        trainable = TrainableSet(model, {"0.weight": torch.arange(0, 120, 2), "1.weight": None, "2.bias": None})
        field = DirectionField(trainable, distribution, sphere=True)
        anchor = [v - 0.5 for v in trainable.snapshot()]
        apply_update(trainable, field, [3, 4], [0.7, -1.1], lr=0.2, prox=0.3, anchor=anchor)
        results.append(model.state_dict())
    assert all(torch.equal(results[0][k], results[1][k]) for k in results[0])


def test_unmasked_coordinates_never_change():
    model = _model()
    everything = {name: p.detach().clone() for name, p in model.named_parameters()}
    mask = {"0.weight": torch.tensor([3, 50, 119]), "1.bias": torch.tensor([1])}
    trainable = TrainableSet(model, mask)
    field = DirectionField(trainable, "rademacher")
    anchor = trainable.snapshot()
    for seed in range(20):
        apply_update(trainable, field, [seed, seed + 100], [1.5, -0.7], lr=0.3, prox=0.2, anchor=anchor)
    for name, param in model.named_parameters():
        changed = (param.detach() != everything[name]).reshape(-1).nonzero().flatten()
        allowed = set(mask[name].tolist()) if name in mask else set()
        assert set(changed.tolist()) <= allowed
        if name in mask:
            assert len(changed) == len(allowed)


# -- pruning -----------------------------------------------------------------------------------
def test_synflow_scores_match_the_closed_form_of_a_linear_chain():
    model = nn.Sequential(nn.Linear(3, 4, bias=False), nn.Linear(4, 2, bias=False))
    scores = synflow_scores(model, lambda m: m(torch.ones(1, 3, dtype=torch.float64)))
    w1, w2 = model[0].weight.detach().double().abs(), model[1].weight.detach().double().abs()
    # R = 1^T |W2| |W1| 1  =>  score(W1_ij) = |W1_ij| (1^T |W2|)_i,  score(W2_ki) = |W2_ki| (|W1| 1)_i
    assert torch.allclose(scores["0.weight"], (w1 * w2.sum(0).unsqueeze(1)).reshape(-1))
    assert torch.allclose(scores["1.weight"], (w2 * w1.sum(1).unsqueeze(0)).reshape(-1))


def test_synflow_mask_is_deterministic_sized_and_keeps_forced_tensors():
    task = make_task("sequence-classification")
    before = {k: v.clone() for k, v in task.module.state_dict().items()}
    first = synflow_mask(task.module, task.synflow_output, 0.01, ("classifier.*",))
    second = synflow_mask(task.module, task.synflow_output, 0.01, ("classifier.*",))
    assert list(first) == list(second)
    assert all((a is None and b is None) or torch.equal(a, b) for a, b in zip(first.values(), second.values()))
    assert first["classifier.weight"] is None and first["classifier.bias"] is None
    total = sum(p.numel() for p in task.module.parameters())
    chosen = sum(index.numel() for index in first.values() if index is not None)
    assert chosen == round(0.01 * total)
    assert "bert.embeddings.word_embeddings.weight" not in first  # scores zero: never reached
    assert all(torch.equal(before[k], v) for k, v in task.module.state_dict().items())  # untouched


# -- the log and replay ------------------------------------------------------------------------
def _record(step, **changes):
    values = dict(step=step, stage=0, probe_seeds=(step * 2 + 1, step * 2 + 2),
                  projected_grads=(0.1 * step - 0.3, 1 / 3), lr=0.05, beta=1e-3, prox=0.0, anchor_step=0)
    values.update(changes)
    return StepRecord(**values)


def test_log_round_trips_steps_mask_and_metrics_exactly(tmp_path):
    mask = OrderedDict([("a", torch.tensor([0, 3, 4, 1000, 99_999])), ("b", None)])
    log = UpdateLog.create(tmp_path / "log.sqlite", config={"x": 1}, base={"fingerprint": "f"}, mask=mask,
                           numels={"a": 100_000, "b": 7})
    records = [_record(i) for i in range(4)]
    for record in records:
        log.append(record)
    with pytest.raises(ValueError, match="appended"):
        log.append(_record(7))
    log.record_metrics(3, {"train_loss": 0.25})
    log.close()
    reopened = UpdateLog.open(tmp_path / "log.sqlite")
    assert list(reopened.steps()) == records
    assert torch.equal(reopened.mask()["a"], mask["a"]) and reopened.mask()["b"] is None
    assert reopened.config == {"x": 1} and reopened.metrics() == {"train_loss": [(3, 0.25)]}


def test_extending_the_log_commits_all_steps_or_none(tmp_path):
    log = UpdateLog.create(tmp_path / "log.sqlite", config={}, base={}, mask=OrderedDict([("b", None)]),
                           numels={"b": 7})
    log.extend([_record(0), _record(1)])
    with pytest.raises(ValueError, match="appended"):
        log.extend([_record(2), _record(4)])  # a gap: nothing of the batch is written
    assert log.next_step == 2
    log.extend([_record(i) for i in range(2, 1002)])
    assert log.next_step == 1002 and list(log.steps(1000)) == [_record(1000), _record(1001)]


@pytest.mark.parametrize("distribution", ["rademacher", "gaussian"])
def test_replaying_the_log_reproduces_the_live_model_bit_for_bit(tmp_path, distribution):
    task = make_task("sequence-classification")
    base = copy.deepcopy(task.module)
    mask = OrderedDict([("bert.encoder.layer.0.attention.self.query.weight", torch.arange(0, 1024, 5)),
                        ("classifier.weight", None), ("bert.embeddings.position_embeddings.weight", None)])
    schedule = StagewiseSchedule(steps=12, stages=2, lr=0.01, beta_start=1e-3, beta_end=1e-2, prox=0.3)

    def run(module):
        trainable = TrainableSet(module, mask)
        return UpdateApplier(trainable, DirectionField(trainable, distribution))

    live = run(task.module)
    log = UpdateLog.create(tmp_path / "log.sqlite", config={}, base={}, mask=mask,
                           numels={n: p.numel() for n, p in task.module.named_parameters()})
    for step in range(12):
        plan = schedule.plan(step)
        record = StepRecord(step, plan.stage, (step + 10,), (float(torch.randn(1)),), plan.lr, plan.beta,
                            plan.prox, plan.anchor_step)
        log.append(record)
        live.apply(record)
    replay = run(base)
    for record in UpdateLog.open(tmp_path / "log.sqlite").steps():
        replay.apply(record)
    live_state, replay_state = task.module.state_dict(), base.state_dict()
    assert all(torch.equal(live_state[k], replay_state[k]) for k in live_state)
    assert not torch.equal(live_state["classifier.weight"], make_task("sequence-classification").module.state_dict()["classifier.weight"])


@pytest.mark.parametrize("distribution", ["rademacher", "gaussian"])
def test_applying_many_steps_piece_by_piece_equals_one_at_a_time_bit_for_bit(monkeypatch, distribution):
    monkeypatch.setattr(trainable_module, "CHUNK", 1000)  # many pieces per tensor
    task = make_task("sequence-classification")
    other = copy.deepcopy(task.module)
    mask = OrderedDict([("bert.encoder.layer.0.attention.self.query.weight", torch.arange(0, 1024, 3)),
                        ("bert.encoder.layer.1.intermediate.dense.weight", None), ("classifier.weight", None)])
    schedule = StagewiseSchedule(steps=40, stages=3, lr=0.01, beta_start=1e-3, beta_end=1e-2, prox=0.3)
    records = []
    for step in range(40):
        plan = schedule.plan(step)
        records.append(StepRecord(step, plan.stage, (step + 10, step + 99), tuple(torch.randn(2).tolist()),
                                  plan.lr, plan.beta, plan.prox, plan.anchor_step))

    def applier(module):
        trainable = TrainableSet(module, mask)
        return UpdateApplier(trainable, DirectionField(trainable, distribution))

    one, many = applier(task.module), applier(other)
    for record in records:
        one.apply(record)
    many.apply_all(records[:7])  # the first stage's anchor is set inside a batch ...
    many.apply_all(records[7:23])  # ... then used by one that starts mid-stage, and reset
    many.apply_all(records[23:])
    assert many.step == one.step == 40
    assert all(torch.equal(a, b) for a, b in zip(task.module.state_dict().values(), other.state_dict().values()))
    assert many.anchor[1] == one.anchor[1] and all(torch.equal(a, b) for a, b in zip(many.anchor[0], one.anchor[0]))


def test_a_batch_of_steps_with_a_bad_one_changes_nothing():
    trainable = TrainableSet.everything(_model())
    applier = UpdateApplier(trainable, DirectionField(trainable, "rademacher"))
    before = trainable.snapshot()
    with pytest.raises(ValueError, match="step 3 applied to a model after 2 steps"):
        applier.apply_all([_record(0), _record(1), _record(3)])
    with pytest.raises(ValueError, match="anchor"):
        applier.apply_all([_record(0), _record(1, prox=0.1, anchor_step=0)])  # step 0 set no anchor
    assert applier.step == 0 and all(torch.equal(a, b) for a, b in zip(before, trainable.snapshot()))


def test_a_step_cannot_be_applied_out_of_order_or_without_its_anchor():
    trainable = TrainableSet.everything(_model())
    applier = UpdateApplier(trainable, DirectionField(trainable, "rademacher"))
    with pytest.raises(ValueError, match="step 1 applied to a model after 0 steps"):
        applier.apply(_record(1))
    with pytest.raises(ValueError, match="anchor"):
        applier.apply(_record(0, prox=0.1, anchor_step=5))


def test_a_checkpoint_saved_before_the_step_rename_restores_at_its_step(tmp_path):
    trainable = TrainableSet.everything(_model())
    applier = UpdateApplier(trainable, DirectionField(trainable, "rademacher"))
    applier.apply_all([_record(0), _record(1)])
    Checkpoint.of(trainable, applier).save(tmp_path / "new.pt")
    saved = torch.load(tmp_path / "new.pt", weights_only=True)
    saved["version"] = saved.pop("step")  # what a silo wrote before the rename
    torch.save(saved, tmp_path / "old.pt")
    for name in ("new.pt", "old.pt"):
        restored = Checkpoint.load(tmp_path / name).restore(trainable, DirectionField(trainable, "rademacher"))
        assert restored.step == 2
        restored.apply(_record(2))  # it continues from the step it holds
