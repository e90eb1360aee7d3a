"""A real deployment on loopback: SuperLink and SuperNodes as separate processes, TLS and node
authentication on, each silo with its own data file, state directory and ledger."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
import time

import pytest
from seedtune.bench.loopback import Loopback

pytestmark = pytest.mark.processes

SETTINGS = ('model.name="tiny" data.name="synthetic" schedule.stages=1 eval.every=0 '
            'privacy.sample_rate=0.05 privacy.clip_bound=15.0 schedule.lr=0.01 zo.probes=4 ')


def _shards(tmp_path, silos):
    out = tmp_path / "shards"
    subprocess.run([sys.executable, "-m", "seedtune.cli.main", "partition", "--preset", "tiny", "--silos",
                    str(silos), "--out", str(out)], check=True, capture_output=True)
    return [out / f"silo-{i}.jsonl" for i in range(silos)]


def _messages(deployment, silo):
    path = deployment.root / f"silo-{silo}" / "messages.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()]


def _releases(deployment, silo) -> int:
    with sqlite3.connect(deployment.root / f"silo-{silo}" / "ledger.sqlite") as ledger:
        return ledger.execute("SELECT COUNT(*) FROM releases").fetchone()[0]


def _releases_so_far(deployment, silo) -> int:
    """While the silo runs: 0 until its process has created its ledger (the file appears a moment
    before its tables do)."""
    try:
        return _releases(deployment, silo)
    except sqlite3.OperationalError:
        return 0


def _bring_up(deployment, shards):
    """The SuperLink, then every silo: key registered, SuperNode on its own data file, online."""
    deployment.start_superlink()
    for silo, shard in enumerate(shards):
        deployment.register(silo)
        deployment.start_supernode(silo, data=shard)
    deployment.wait_online(len(shards))


@pytest.fixture(scope="module")
def deployed(tmp_path_factory):
    """Two silos, TLS, node authentication, a four-round run; stopped whatever happens."""
    root = tmp_path_factory.mktemp("loopback")
    deployment = Loopback(root, silos=2)
    try:
        _bring_up(deployment, _shards(root, 2))
        run_dir = root / "out"
        result = deployment.run(SETTINGS + f'run-dir="{run_dir}" schedule.steps=4 federation.silos=2 '
                                           'federation.min_silos=2')
        yield deployment, run_dir, result
    finally:
        assert deployment.close() == []


def test_a_tls_authenticated_deployment_trains_and_each_silo_keeps_its_ledger(deployed):
    deployment, run_dir, result = deployed
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    metrics = json.loads((run_dir / "metrics.json").read_text())  # `--stream` exits 0 even on failure
    assert metrics["steps"] == 4
    assert sorted(silo for silo in metrics["silos"]) == ["silo-0", "silo-1"]
    assert (run_dir / "final" / "model.safetensors").exists()
    for silo in range(2):
        assert _releases(deployment, silo) == 4  # one charged release per round, in the silo's own ledger
        assert 0 < metrics["silos"][f"silo-{silo}"]["epsilon"] <= 6.0 + 1e-9
    assert "Uvicorn running on https://" in deployment.log("superlink")


def test_only_seeds_and_scalars_cross_between_supernode_and_superlink(deployed):
    deployment, _, _ = deployed
    for silo in range(2):
        train = [m for m in _messages(deployment, silo) if m["type"] == "train"]
        outgoing = [m for m in train if m["direction"] == "out"]
        incoming = [m for m in train if m["direction"] == "in"]
        assert len(outgoing) == len(incoming) == 4
        for message in train:  # no weight tensor in either direction, in any training round
            assert all(record["kind"] != "array" for record in message["records"].values()), message
        for message in outgoing:
            assert list(message["records"]) == ["reply"]
            reply = message["records"]["reply"]["values"]
            assert sorted(reply) == ["events", "expected_batch_size", "projected_grads", "silo", "step"]
            assert len(reply["projected_grads"]) == 4 and all(isinstance(g, float) for g in reply["projected_grads"])
            assert all(isinstance(reply[k], (int, float)) for k in ("step", "expected_batch_size"))
            assert [json.loads(e)["type"] for e in reply["events"]] == ["PoissonSampledDpEvent"]
        for message in incoming:
            request = message["records"]["request"]["values"]
            assert len(request["probe_seeds"]) == 4 and all(isinstance(s, int) for s in request["probe_seeds"])


def test_a_supernode_without_a_registered_key_or_without_the_ca_is_refused(deployed):
    deployment, _, _ = deployed
    unregistered = deployment.start_supernode(2, max_retries=1)  # key made, never registered
    assert unregistered.wait(timeout=120) != 0
    assert "Failed to activate SuperNode" in deployment.log("supernode-2")
    without_ca = deployment.start_supernode(0, with_ca=False, max_retries=1)  # registered key, no CA
    assert without_ca.wait(timeout=120) != 0
    assert "CERTIFICATE_VERIFY_FAILED" in deployment.log("supernode-0")


def test_a_supernode_killed_mid_run_leaves_the_run_to_the_others(tmp_path):
    deployment = Loopback(tmp_path, silos=3)
    try:
        _bring_up(deployment, _shards(tmp_path, 3))
        run_dir = tmp_path / "out"
        run = deployment.start_run(SETTINGS + f'run-dir="{run_dir}" schedule.steps=6 federation.silos=3 '
                                              'federation.min_silos=2 federation.round_timeout=120')
        ledger = tmp_path / "silo-2" / "ledger.sqlite"
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and not (ledger.exists() and _releases_so_far(deployment, 2) >= 2):
            time.sleep(0.5)
        assert _releases(deployment, 2) >= 2, "silo-2 never answered"
        deployment.supernodes[2].kill()  # the SuperNode itself, mid-run: no goodbye to the SuperLink
        output, _ = run.communicate(timeout=900)
        assert (run_dir / "metrics.json").exists(), output[-3000:]  # the run finished: show why not
        metrics = json.loads((run_dir / "metrics.json").read_text())
        assert metrics["steps"] == 6, output[-3000:]
        assert _releases(deployment, 0) == _releases(deployment, 1) == 6
        assert _releases(deployment, 2) < 6
    finally:
        assert deployment.close() == []


def _ledger_steps(deployment, silo) -> list[int]:
    with sqlite3.connect(deployment.root / f"silo-{silo}" / "ledger.sqlite") as ledger:
        return [row[0] for row in ledger.execute("SELECT step FROM releases ORDER BY id")]


def _logged_steps(run_dir) -> int:
    try:
        with sqlite3.connect(f"file:{run_dir / 'log.sqlite'}?mode=ro", uri=True) as log:  # never creates it
            return log.execute("SELECT COUNT(*) FROM steps").fetchone()[0]
    except sqlite3.OperationalError:  # not created yet
        return 0


def test_silo_engines_serve_a_deployment_and_one_killed_mid_run_loses_nothing(tmp_path):
    """Each SuperNode's ClientApp forwards to its silo's resident engine; engine 0 is killed
    (SIGKILL) mid-run and started again: the run goes on without it, then with it again."""
    deployment = Loopback(tmp_path, silos=2)
    try:
        shards = _shards(tmp_path, 2)
        deployment.start_superlink()
        for silo, shard in enumerate(shards):
            deployment.register(silo)
            deployment.start_engine(silo, data=shard)
            deployment.start_supernode(silo, engine=True)
        deployment.wait_online(2)
        run_dir = tmp_path / "out"
        run = deployment.start_run(SETTINGS + f'run-dir="{run_dir}" schedule.steps=14 federation.silos=2 '
                                              'federation.min_silos=1 federation.round_timeout=120')
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and _releases_so_far(deployment, 0) < 3:
            time.sleep(0.2)
        deployment.engines[0].kill()  # no goodbye: its socket is left behind, its state is on disk
        deployment.engines[0].wait()
        killed_at = len(_ledger_steps(deployment, 0))
        while time.monotonic() < deadline and _logged_steps(run_dir) < killed_at + 2:
            time.sleep(0.2)  # rounds go on with silo 1 alone: silo 0's ClientApp refuses, naming the socket
        deployment.start_engine(0, data=shards[0])  # clears the stale socket, recovers from the state dir
        output, _ = run.communicate(timeout=900)
        assert (run_dir / "metrics.json").exists(), output[-3000:]
        metrics = json.loads((run_dir / "metrics.json").read_text())
        assert metrics["steps"] == 14
        assert _ledger_steps(deployment, 1) == list(range(14))  # the other silo answered every step
        steps = _ledger_steps(deployment, 0)
        assert len(steps) == len(set(steps)) and steps == sorted(steps)  # no step charged twice
        assert max(steps) > killed_at  # it came back and answered again
        rejections = json.loads(subprocess.run([sys.executable, "-m", "seedtune.cli.main", "show", str(run_dir),
                                                "--json"], capture_output=True, text=True).stdout)
        reasons = [r["reason"] for r in rejections["federation"]["rejections"]]
        assert any(f"no silo engine answers at {deployment.engine_socket(0)}" in reason for reason in reasons), reasons
    finally:
        assert deployment.close() == []


def test_a_secure_aggregation_round_runs_end_to_end_on_a_tls_authenticated_deployment(tmp_path):
    """Three silos, each checking its peers' masking keys against a roster of the operators' node
    keys: the coordinator receives only masked integers and a Flower query for each key, every
    silo's ledger charges the sum of t = 3 shares and records what holds if all others collude."""
    deployment = Loopback(tmp_path, silos=3)
    try:
        shards = _shards(tmp_path, 3)
        roster = tmp_path / "roster.toml"
        roster.write_text("[silos]\n" + "".join(
            f'"silo-{i}" = "{(deployment.credentials / f"silo-{i}.pub").read_text().strip()}"\n' for i in range(3)))
        deployment.start_superlink()
        for silo, shard in enumerate(shards):
            deployment.register(silo)
            deployment.start_supernode(silo, data=shard, extra=(
                f'secure-honest=3 secure-roster="{roster}" '
                f'secure-signing-key="{deployment.credentials / f"silo-{silo}"}"'))
        deployment.wait_online(3)
        run_dir = tmp_path / "out"
        result = deployment.run(SETTINGS + f'run-dir="{run_dir}" schedule.steps=3 federation.silos=3 '
                                           'federation.min_silos=3 federation.secure_aggregation=true')
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        metrics = json.loads((run_dir / "metrics.json").read_text())
        assert metrics["steps"] == 3, result.stdout[-3000:]
        for silo in range(3):
            assert _releases(deployment, silo) == 3
            entry = metrics["silos"][f"silo-{silo}"]
            assert 0 < entry["epsilon"] <= 6.0 + 1e-9 < entry["epsilon_if_all_collude"]
            messages = _messages(deployment, silo)
            assert [m["direction"] for m in messages if m["type"] == "query"] == ["in", "out"]  # the key, once
            replies = [m["records"]["reply"]["values"] for m in messages
                       if m["type"] == "train" and m["direction"] == "out"]
            assert len(replies) == 3
            for reply in replies:  # masked integers, 8 bytes a probe; no plain scalar leaves
                assert reply["projected_grads"] == [] and reply["masked"] == {"bytes": 8 * 4}
        with sqlite3.connect(deployment.root / "silo-0" / "ledger.sqlite") as ledger:
            events = [json.loads(e) for (e,) in ledger.execute("SELECT event FROM releases")]
        assert all(e["event"]["type"] == "DistributedDiscreteGaussianDpEvent" and e["event"]["parties"] == 3
                   for e in events)
    finally:
        assert deployment.close() == []
