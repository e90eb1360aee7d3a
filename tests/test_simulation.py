"""The federation on Flower's real simulation engine and its real `flwr run`."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from seedtune.bench.processes import kill_marked, marked_processes, wait_gone


pytestmark = pytest.mark.processes

ROOT = Path(__file__).resolve().parents[1]


def seedtune(*args, env=None):
    return subprocess.run([sys.executable, "-m", "seedtune.cli.main", *map(str, args)], capture_output=True,
                          text=True, timeout=900, env={**os.environ, **(env or {})})


@pytest.fixture(scope="module")
def killed_silo_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("sim") / "run"
    marker = uuid.uuid4().hex
    # Every silo in one process (federation.workers=1), the setting for an expensive prefix; the
    # other simulations here run the default, a process a core.
    result = seedtune("simulate", "--preset", "tiny", "--rounds", 30, "--out", run_dir, "--no-progress",
                      "--set", "zo.probes=16", "--set", "eval.every=0", "--set", "federation.workers=1",
                      env={"SEEDTUNE_TEST_MARKER": marker, "SEEDTUNE_TEST_KILL_SILO": "1:10"})
    assert result.returncode == 0, result.stderr[-3000:]
    return run_dir, result, marker


def test_a_killed_silo_leaves_the_run_to_the_others_and_every_ledger_exact(killed_silo_run):
    run_dir, result, _ = killed_silo_run
    report = json.loads(seedtune("show", run_dir, "--json").stdout)
    assert report["status"] == "finished" and report["steps"] == 30
    seen = {silo["silo"]: silo["releases"] for silo in report["federation"]["silos"]}
    assert seen == {"partition-0": 30, "partition-1": 10, "partition-2": 30}  # what reached the coordinator
    table = {line.split()[0]: line.split() for line in result.stdout.splitlines() if line.startswith("partition-")}
    # each silo's own ledger: partition-1 released step 10 and died before its reply left
    assert {silo: int(row[1]) for silo, row in table.items()} == {"partition-0": 30, "partition-1": 11, "partition-2": 30}
    assert all(float(row[2]) <= 8.0 for row in table.values())
    assert table["partition-0"][2] == table["partition-0"][3]  # coordinator's view = silo's own ledger
    assert any("dies at step 10" in r["reason"] for r in report["federation"]["rejections"])


def test_one_worker_answers_every_silo_from_one_process(killed_silo_run):
    run_dir, _, _ = killed_silo_run
    files = sorted((run_dir / "silos").glob("*/timings.jsonl"))
    timings = [json.loads(line) for path in files for line in path.read_text().splitlines()]
    assert len(files) == 3 and len(timings) >= 60  # every silo answered, 30 rounds of two and 11 of one
    assert len({entry["pid"] for entry in timings}) == 1  # federation.workers=1: one process held them all


def test_uplink_is_under_a_kilobyte_and_no_weights_travel(killed_silo_run):
    run_dir, _, _ = killed_silo_run
    report = json.loads(seedtune("show", run_dir, "--json").stdout)
    replies = [m for round in report["federation"]["traffic_per_round"].values() for m in round if m["bytes_up"]]
    assert replies and max(m["bytes_up"] for m in replies) <= 1024  # K = 16 scalars + events, serialized
    later = [m["bytes_down"] for r, msgs in report["federation"]["traffic_per_round"].items() if int(r) > 0
             for m in msgs if m["silo"] != "partition-1"]  # the dead silo is sent the rounds it missed
    assert max(later) < 3000  # seeds and scalars only: a tensor of the model is far larger
    assert (run_dir / "traffic.png").exists() and (run_dir / "training.png").exists()


def test_simulated_runs_export_and_leave_no_process_behind(killed_silo_run, tmp_path):
    run_dir, _, marker = killed_silo_run
    assert seedtune("export", run_dir, "--out", tmp_path / "exported").returncode == 0
    final, exported = load_file(run_dir / "final" / "model.safetensors"), load_file(tmp_path / "exported" / "model.safetensors")
    assert all(torch.equal(final[k], exported[k]) for k in final)
    # every file, byte for byte: the tokenizer's too (the server's tokenizer has truncated and
    # padded evaluation batches; the export's has not)
    files = {path.relative_to(run_dir / "final") for path in (run_dir / "final").rglob("*") if path.is_file()}
    assert files == {path.relative_to(tmp_path / "exported") for path in (tmp_path / "exported").rglob("*")
                     if path.is_file()}
    assert [f for f in sorted(files) if (run_dir / "final" / f).read_bytes() != (tmp_path / "exported" / f).read_bytes()] == []
    assert wait_gone(marker) == []


@pytest.mark.parametrize("how", ["stop", "kill"])
def test_a_simulation_stopped_mid_round_resumes_finishes_and_charges_each_round_once(tmp_path, how):
    """Stopped (as by Ctrl-C) or SIGKILLed with round 3's replies in and its step not logged: the
    resumed run finishes, every silo's ledger holds exactly one release per logged round, the
    export equals final/ in every file, and the report lists each silo once with its ledger's ε."""
    marker = uuid.uuid4().hex
    run_dir = tmp_path / "run"
    stopped = seedtune("simulate", "--preset", "tiny", "--rounds", 6, "--out", run_dir, "--no-progress",
                       "--set", "eval.every=0", env={"SEEDTUNE_TEST_MARKER": marker,
                                                     "SEEDTUNE_TEST_STOP_MID_ROUND": f"3:{how}"})
    assert stopped.returncode == (2 if how == "stop" else -signal.SIGKILL), stopped.stderr[-3000:]
    if how == "stop":
        assert "resume with seedtune simulate --resume" in stopped.stderr
    kill_marked(marker)  # after a SIGKILL, Ray's workers outlive the process that started them
    ledgers = {path.parent.name: path for path in (run_dir / "silos").glob("*/ledger.sqlite")}
    assert len(ledgers) == 3 and all(_releases(path) == 4 for path in ledgers.values())  # rounds 0-3 charged

    resumed = seedtune("simulate", "--resume", "--out", run_dir, "--no-progress", env={"SEEDTUNE_TEST_MARKER": marker})
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert all(_releases(path) == 6 for path in ledgers.values())  # round 3 answered again, not charged again
    report = json.loads(seedtune("show", run_dir, "--json").stdout)
    assert report["status"] == "finished" and report["steps"] == 6
    silos = {silo["silo"]: silo for silo in report["federation"]["silos"]}
    assert sorted(silos) == sorted(ledgers) and all(silo["releases"] == 6 for silo in silos.values())
    for name, ledger in report["privacy"]["ledger_per_silo"].items():
        assert ledger["releases"] == 6 and silos[name]["epsilon"] == pytest.approx(ledger["epsilon"], rel=1e-9)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert sorted(metrics["epsilon"]) == sorted(ledgers)
    table = [line.split() for line in resumed.stdout.splitlines() if line.startswith("partition-")]
    assert sorted(row[0] for row in table) == sorted(ledgers)  # each silo once, not once per node id
    exported = tmp_path / "exported"
    assert seedtune("export", run_dir, "--out", exported).returncode == 0
    files = sorted(p.relative_to(run_dir / "final") for p in (run_dir / "final").rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(exported) for p in exported.rglob("*") if p.is_file())
    assert all((run_dir / "final" / f).read_bytes() == (exported / f).read_bytes() for f in files)
    assert wait_gone(marker) == []


def _releases(ledger) -> int:
    import sqlite3

    with sqlite3.connect(ledger) as db:
        return db.execute("SELECT COUNT(*) FROM releases").fetchone()[0]


def test_ctrl_c_stops_the_simulation_and_everything_it_started(tmp_path):
    marker = uuid.uuid4().hex
    run_dir = tmp_path / "run"
    process = subprocess.Popen(
        [sys.executable, "-m", "seedtune.cli.main", "simulate", "--preset", "tiny", "--rounds", "400",
         "--out", str(run_dir), "--no-progress"],
        env={**os.environ, "SEEDTUNE_TEST_MARKER": marker}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 180
    while not list((run_dir / "silos").glob("*/ledger.sqlite")) and time.monotonic() < deadline:
        time.sleep(0.5)  # until silos are answering
    running = json.loads(seedtune("show", run_dir, "--json").stdout)
    assert running["status"] == "running" and running["driver"]["pid"] == process.pid
    assert running["driver"]["command"] == "seedtune simulate"  # the ServerApp's thread holds the run
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 2, stderr[-2000:]
    assert "resume with seedtune simulate --resume" in stderr
    assert wait_gone(marker) == []
    stopped = json.loads(seedtune("show", run_dir, "--json").stdout)
    assert stopped["status"] == "stopped" and stopped["driver"] is None


def test_a_failed_simulation_is_a_one_line_error_and_stops_what_it_started(tmp_path):
    marker = uuid.uuid4().hex
    result = seedtune("simulate", "--preset", "tiny", "--silos", 2, "--out", tmp_path / "run", "--no-progress",
                      "--set", "federation.min_silos=3", "--set", "federation.round_timeout=3",
                      env={"SEEDTUNE_TEST_MARKER": marker})
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("seedtune: error:")
    assert "min_silos=3" in result.stderr
    assert wait_gone(marker) == []


def test_flwr_run_drives_the_same_apps_against_a_local_simulation_federation(tmp_path):
    marker = uuid.uuid4().hex
    bin_dir = str(Path(sys.executable).parent)  # `flwr` starts `flower-superlink` from PATH, as an activated venv has it
    env = {**os.environ, "PATH": bin_dir + os.pathsep + os.environ.get("PATH", ""), "FLWR_HOME": str(tmp_path / "flwr"), "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
           "FLWR_DISABLE_UPDATE_CHECK": "1", "FLWR_TELEMETRY_ENABLED": "0", "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0",
           "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": "39391", "FLWR_LOCAL_CONTROL_API_PORT": "39393",
           "SEEDTUNE_STATE_DIR": str(tmp_path / "silos"), "SEEDTUNE_EPSILON": "6.0", "SEEDTUNE_TEST_MARKER": marker}
    run_dir = tmp_path / "out"
    settings = (f'run-dir="{run_dir}" model.name="tiny" data.name="synthetic" schedule.steps=4 schedule.stages=1 '
                'federation.silos=2 eval.every=0 privacy.sample_rate=0.05 privacy.clip_bound=15.0 schedule.lr=0.01')
    flwr = Path(bin_dir) / "flwr"
    try:
        result = subprocess.run(
            [str(flwr), "run", str(ROOT), "local", "--stream", "--federation-config",
             "num-supernodes=2 client-resources-num-cpus=1", "--run-config", settings],
            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stderr[-3000:]
        metrics = json.loads((run_dir / "metrics.json").read_text())  # `--stream` exits 0 even on failure
        assert metrics["steps"] == 4 and len(metrics["silos"]) == 2
        assert sorted(p.name for p in (tmp_path / "silos").iterdir()) == ["partition-0", "partition-1"]
    finally:  # `flwr` leaves its SuperLink running: stop it and everything under it
        for process in marked_processes(marker):
            process.kill()
    assert wait_gone(marker) == []


def test_secure_aggregation_on_flowers_engine_stops_resumes_and_reports_both_figures(tmp_path):
    """Under secure aggregation on the real simulation engine: stopped with round 2's masked
    replies in, the resumed run asks the same round again and every silo answers with the same
    masked integers, uncharged; the summary and ``seedtune show`` print each silo's epsilon with
    t honest participants and what holds if every other party colludes."""
    marker = uuid.uuid4().hex
    run_dir = tmp_path / "run"
    common = ["--no-progress", "--set", "eval.every=0", "--set", "federation.secure_aggregation=true"]
    stopped = seedtune("simulate", "--preset", "tiny", "--rounds", 5, "--out", run_dir, *common,
                       env={"SEEDTUNE_TEST_MARKER": marker, "SEEDTUNE_TEST_STOP_MID_ROUND": "2:stop"})
    assert stopped.returncode == 2, stopped.stderr[-3000:]
    ledgers = sorted((run_dir / "silos").glob("*/ledger.sqlite"))
    assert len(ledgers) == 3 and all(_releases(path) == 3 for path in ledgers)  # rounds 0-2 charged
    resumed = seedtune("simulate", "--resume", "--out", run_dir, "--no-progress", env={"SEEDTUNE_TEST_MARKER": marker})
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert all(_releases(path) == 5 for path in ledgers)  # round 2 answered again, not charged again
    assert "secure aggregation: epsilon holds with at least 3 honest participants" in resumed.stdout
    header = next(line for line in resumed.stdout.splitlines() if line.startswith("silo "))
    assert "if all collude" in header
    report = json.loads(seedtune("show", run_dir, "--json").stdout)
    privacy = report["privacy"]
    assert privacy["secure_aggregation"] == {"honest": 3}
    for name, ledger in privacy["ledger_per_silo"].items():
        assert privacy["epsilon_per_silo"][name] == pytest.approx(ledger["epsilon"], rel=1e-9)
        assert privacy["epsilon_per_silo_if_all_collude"][name] == pytest.approx(ledger["epsilon_if_all_collude"],
                                                                                 rel=1e-9)
        assert ledger["epsilon"] <= privacy["budget_epsilon"] * (1 + 1e-9) < ledger["epsilon_if_all_collude"]
    shown = seedtune("show", run_dir).stdout
    assert "if every other party colluded, each silo's own share alone gives" in shown
    assert wait_gone(marker) == []
