"""``seedtune bench utility``: every method runs through its real path and the table adds up."""

from __future__ import annotations

import json

import pytest
import torch

from seedtune.bench.utility import FULL, METHODS, QUICK, grid, method_config, summarize
from seedtune.cli.main import main
from seedtune.common.config import load_config

HEAD = ["prune.enabled=true", "prune.ratio=0.0"]  # the cosine head alone (prune.always keeps it)


def test_each_method_is_the_configuration_it_claims():
    base = load_config("default")
    mezo = method_config(base, "mezo", None, 1)
    assert not mezo.privacy.enabled and mezo.schedule.kind == "constant" and mezo.seed == 1
    assert mezo.prune == base.prune  # the same trainable subset as DP-ZOSO
    dpzero = method_config(base, "dpzero", 2.0, 0)
    assert dpzero.privacy.epsilon == 2.0 and dpzero.schedule.kind == "constant"
    assert dpzero.prune == base.prune and dpzero.zo.probes == 1  # one direction, on the same set
    assert dpzero.zo.distribution == "rademacher" and dpzero.schedule.lr == FULL.dpzero_lr
    zoso = method_config(base, "dp-zoso", 6.0, 2)
    assert zoso.schedule.kind == "stagewise" and zoso.prune == base.prune and zoso.privacy.epsilon == 6.0
    assert method_config(base, "federated", 6.0, 0, QUICK).federation.silos == 3
    alone = method_config(base, "one-silo", 2.0, 0)  # the preset as it is, at the budget
    assert alone.schedule == base.schedule and alone.zo == base.zo and alone.privacy.epsilon == 2.0
    for method in METHODS:  # the budget's sigma is always calibrated afresh
        assert method_config(base, method, 2.0, 0).privacy.noise_multiplier is None


def test_the_grid_runs_private_methods_at_every_epsilon_and_zero_shot_once():
    runs = grid(QUICK, METHODS)
    assert runs.count(("zero-shot", None, 0)) == 1
    assert {(m, e) for m, e, _ in runs if m in ("dpzero", "dp-zoso", "dp-sgd", "federated")} == {
        (m, e) for m in ("dpzero", "dp-zoso", "dp-sgd", "federated") for e in QUICK.epsilons}
    assert [e for m, e, _ in runs if m == "mezo"] == [None] * len(QUICK.seeds)


def test_summaries_are_means_and_sample_deviations_over_seeds():
    records = [{"method": "dp-zoso", "epsilon": 2.0, "seed": s, "accuracy": a, "loss": 1.0, "epsilon_spent": 2.0,
                "peak_memory_mib": 100.0, "wall_s": 1.0} for s, a in enumerate((0.6, 0.7, 0.8))]
    (row,) = summarize(records)
    assert row["runs"] == 3 and row["accuracy"] == pytest.approx(0.7) and row["accuracy_std"] == pytest.approx(0.1)
    assert "of_ceiling" not in row  # no zero-shot and ceiling to read it against


def test_every_row_reads_as_the_share_of_the_gap_to_the_ceiling_it_closes():
    def run(method, accuracy, epsilon=None):
        return {"method": method, "epsilon": epsilon, "seed": 0, "accuracy": accuracy, "loss": 1.0,
                "epsilon_spent": epsilon, "peak_memory_mib": 1.0, "wall_s": 1.0}

    rows = summarize([run("zero-shot", 0.6), run("ceiling", 0.8), run("dp-sgd", 0.75, 6.0), run("mezo", 0.55)])
    share = {row["method"]: row["of_ceiling"] for row in rows}
    assert share == pytest.approx({"zero-shot": 0.0, "ceiling": 1.0, "dp-sgd": 0.75, "mezo": -0.25})


@pytest.mark.slow
def test_quick_bench_on_the_tiny_preset_runs_every_method(tmp_path, capsys):
    out = tmp_path / "bench"
    head = [*(arg for key in HEAD for arg in ("--set", key)), "--set", "schedule.lr=0.05"]
    assert main(["bench", "utility", "--quick", "--preset", "tiny", *head, "--dpzero-lr", "0.05", "--jobs", "2",
                 "--out", str(out), "--no-progress"]) == 0
    summary = json.loads((out / "utility.json").read_text())
    assert summary["complete"] and summary["quick"] and summary["jobs"] == 2
    table = {(row["method"], row["epsilon"]): row for row in summary["table"]}
    assert set(table) == {(m, e) for m, e, _ in grid(QUICK, METHODS)}
    for (method, epsilon), row in table.items():
        assert 0.0 <= row["accuracy"] <= 1.0 and row["peak_memory_mib"] > 0 and row["wall_s"] > 0
        if epsilon is not None:  # every private method spends its budget, and no more
            assert row["epsilon_spent"] == pytest.approx(epsilon, rel=1e-3)
    assert table[("mezo", None)]["epsilon_spent"] is None  # not private: no epsilon, not a number
    assert table[("zero-shot", None)]["of_ceiling"] == 0.0 and table[("ceiling", None)]["of_ceiling"] == 1.0
    assert [(r["method"], r["epsilon"], r["seed"]) for r in summary["runs"]] == grid(QUICK, METHODS)  # in order
    assert table[("ceiling", None)]["epsilon_spent"] is None and table[("ceiling", None)]["runs"] == 1
    for run in summary["runs"]:
        if run["method"] == "dp-sgd":  # Opacus's own accountant agrees on the same release
            assert run["opacus_epsilon"] == pytest.approx(run["epsilon_spent"], rel=0.05)
    assert (out / "utility.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    printed = capsys.readouterr().out
    assert "dp-sgd" in printed and "federated" in printed


def watch_the_model(monkeypatch) -> dict:
    """What the next loaded model is ("task") and its tensors' values as loaded ("before")."""
    from seedtune.common import components

    loaded = {}
    original = components.load_model

    def keep(*args, **kwargs):
        loaded["task"] = original(*args, **kwargs)
        loaded["before"] = {n: p.detach().clone() for n, p in loaded["task"].module.named_parameters()}
        return loaded["task"]

    monkeypatch.setattr(components, "load_model", keep)
    return loaded


def test_dp_sgd_trains_every_tensor_of_the_classifier(monkeypatch):
    """The tiny preset trains every tensor, position and token-type embeddings included."""
    from seedtune.bench import dpsgd

    config = load_config("tiny", None, ["schedule.steps=3", "privacy.sample_rate=0.05", "data.max_train_examples=200",
                                         "eval.test_examples=20"])
    loaded = watch_the_model(monkeypatch)
    metrics, epsilon = dpsgd.dp_sgd(config, lr=0.5)
    assert epsilon == pytest.approx(config.privacy.epsilon, rel=1e-3)
    after = dict(loaded["task"].module.named_parameters())
    unchanged = [n for n, before in loaded["before"].items() if torch.equal(before, after[n])]
    assert unchanged == []  # noise reaches every tensor, so every one moved
    assert any("position_embeddings" in n for n in after)


@pytest.mark.filterwarnings("error:Full backward hook")  # expected, and silenced
def test_dp_sgd_on_the_head_over_kept_embeddings_is_dp_sgd_through_the_whole_model(monkeypatch):
    """The head's fast path (the frozen encoder run once) takes the same steps as a full forward a
    step: same Poisson batches, same clipping, same noise, the same head up to float rounding."""
    from seedtune.bench import dpsgd

    config = load_config("tiny", None, [*HEAD, "schedule.steps=6", "privacy.sample_rate=0.1",
                                         "data.max_train_examples=120", "eval.test_examples=20"])
    heads = []
    for fast in (True, False):
        if not fast:  # no set is a readout: every step runs the whole model through Opacus
            monkeypatch.setattr(dpsgd, "readout_for", lambda task, names: None)
        loaded = watch_the_model(monkeypatch)
        torch.manual_seed(7)  # Opacus samples and noises with torch's global generator
        dpsgd.dp_sgd(config, lr=0.5)
        heads.append({n: p.detach().clone() for n, p in loaded["task"].module.named_parameters()
                      if n.startswith("classifier.")})
        moved = [n for n, before in loaded["before"].items() if not torch.equal(before, dict(
            loaded["task"].module.named_parameters())[n])]
        assert sorted(moved) == ["classifier.bias", "classifier.weight"]  # the encoder stays frozen
    for name in heads[0]:
        torch.testing.assert_close(heads[0][name], heads[1][name], rtol=1e-4, atol=1e-5)


def test_a_tensor_opacus_cannot_split_per_example_is_a_one_line_error(monkeypatch):
    from opacus.optimizers import DPOptimizer

    from seedtune.bench import dpsgd
    from seedtune.common.errors import ConfigError

    def refuse(self, *args, **kwargs):
        raise RuntimeError("per sample gradient is not initialized")

    monkeypatch.setattr(DPOptimizer, "step", refuse)
    config = load_config("tiny", None, ["schedule.steps=3", "data.max_train_examples=50"])
    with pytest.raises(ConfigError, match="cannot form per-example gradients .*per sample gradient"):
        dpsgd.dp_sgd(config, lr=0.5)


NORM = ["model.task=prompt-classification", *HEAD, 'prune.always=["lm.model.norm.weight"]']  # a prompt classifier's


@pytest.mark.parametrize("readout, trained", [(HEAD, {"classifier.weight", "classifier.bias"}),
                                              (NORM, {"lm.model.norm.weight"})], ids=["head", "final-norm"])
def test_the_ceiling_minimises_the_training_loss_of_the_readout_alone(monkeypatch, readout, trained):
    from seedtune.bench.ceiling import ceiling
    from seedtune.common import components

    config = load_config("tiny", None, [*readout, "data.max_train_examples=300", "eval.test_examples=50"])
    loaded = watch_the_model(monkeypatch)
    metrics = ceiling(config)
    after = dict(loaded["task"].module.named_parameters())
    moved = {n for n, before in loaded["before"].items() if not torch.equal(before, after[n])}
    assert moved == trained  # the frozen network is untouched
    data = components.load_data(config)
    task = loaded["task"]
    rows = data.train[:]
    with torch.no_grad():
        batch = task.encode(rows["text"], rows["label"])
        fitted = float(task.per_example_loss(task.module, batch).mean())
        for name in moved:  # back at the starting readout: the minimum is lower
            after[name].copy_(loaded["before"][name])
        start = float(task.per_example_loss(task.module, batch).mean())
    assert fitted == pytest.approx(metrics["train_loss"], rel=1e-3) and fitted < start
    assert 0 <= metrics["accuracy"] <= 1 and 0 <= metrics["validation_accuracy"] <= 1


@pytest.mark.filterwarnings("error:Full backward hook")  # expected, and silenced
def test_dp_sgd_on_a_final_norm_moves_it_alone_at_the_budget(monkeypatch):
    from seedtune.bench import dpsgd

    config = load_config("tiny", None, [*NORM, "schedule.steps=4", "privacy.sample_rate=0.1",
                                         "data.max_train_examples=120", "eval.test_examples=20"])
    loaded = watch_the_model(monkeypatch)
    metrics, epsilon = dpsgd.dp_sgd(config, lr=0.5)
    after = dict(loaded["task"].module.named_parameters())
    assert {n for n, before in loaded["before"].items() if not torch.equal(before, after[n])} == {"lm.model.norm.weight"}
    assert epsilon == pytest.approx(config.privacy.epsilon, rel=1e-3) and 0 <= metrics["accuracy"] <= 1


@pytest.mark.parametrize("masked", [False, True], ids=["every-tensor", "synflow-mask"])
def test_the_ceiling_of_any_other_set_fine_tunes_it_and_keeps_the_best_epoch_on_validation(monkeypatch, masked):
    from seedtune.bench.ceiling import EPOCHS, ceiling
    from seedtune.common import components

    settings = ["data.max_train_examples=96", "eval.test_examples=20"]
    config = load_config("tiny", None, [*settings, *(("prune.enabled=true", "prune.ratio=0.05") if masked else ())])
    loaded = watch_the_model(monkeypatch)
    chosen = {}
    original = components.choose_mask
    monkeypatch.setattr(components, "choose_mask", lambda *a: chosen.setdefault("mask", original(*a)))
    metrics = ceiling(config)
    after = dict(loaded["task"].module.named_parameters())
    assert len(metrics["epoch_validation_accuracy"]) == EPOCHS and 1 <= metrics["best_epoch"] <= EPOCHS
    assert metrics["validation_accuracy"] == max(metrics["epoch_validation_accuracy"])  # the kept epoch's model
    assert metrics["epoch_validation_accuracy"][metrics["best_epoch"] - 1] == max(metrics["epoch_validation_accuracy"])
    mask = chosen["mask"]
    assert masked == any(index is not None for index in mask.values())
    for name, before in loaded["before"].items():
        if name not in mask:
            assert torch.equal(before, after[name]), name
        elif mask[name] is None:
            assert not torch.equal(before, after[name]), name
        else:  # a mask's coordinates move; nothing outside it does
            index = mask[name]
            outside = torch.ones(before.numel(), dtype=torch.bool)
            outside[index] = False
            assert torch.equal(before.flatten()[outside], after[name].detach().flatten()[outside]), name
            assert not torch.equal(before.flatten()[index], after[name].detach().flatten()[index]), name


def test_a_used_output_folder_or_unknown_method_is_refused(tmp_path, capsys):
    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "x").write_text("keep")
    assert main(["bench", "utility", "--out", str(tmp_path / "used")]) == 2
    assert "already exists" in capsys.readouterr().err
    assert main(["bench", "utility", "--methods", "zero-shot,sgd", "--out", str(tmp_path / "new")]) == 2
    assert "--methods sgd: unknown" in capsys.readouterr().err
    assert main(["bench", "utility", "--dpzero-lr", "-1", "--out", str(tmp_path / "new")]) == 2
    assert "--dpzero-lr -1.0 must be a finite number > 0" in capsys.readouterr().err
    assert main(["bench", "utility", "--jobs", "0", "--out", str(tmp_path / "new")]) == 2
    assert "--jobs 0 must be >= 1" in capsys.readouterr().err
    for bad, said in (("0,6", "--epsilons 0.0,6.0: each must be a finite number > 0"),
                      ("six", "--epsilons 'six': expected comma-separated numbers")):
        assert main(["bench", "utility", "--epsilons", bad, "--out", str(tmp_path / "new")]) == 2
        assert said in capsys.readouterr().err
    assert not (tmp_path / "new").exists()
