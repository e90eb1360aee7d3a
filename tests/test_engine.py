"""A silo's resident engine (client/engine.py) and the thin ClientApp that forwards to it
(client/thin.py), over a real Unix socket."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import threading
import time
from types import SimpleNamespace

import pytest
import torch
from flwr.app import Message, MessageType

from seedtune.client import thin
from seedtune.client.app import handle_train
from seedtune.client.limits import Limits
from seedtune.client.channel import REFUSED, EngineUnavailable, ask
from seedtune.client.engine import EngineError, SiloEngine
from seedtune.client.node import SiloNode
from seedtune.common import components
from seedtune.common.config import load_config
from seedtune.common.privacy.ledger import PrivacyLedger
from seedtune.server.federation import DirectTransport, Federation
from seedtune.server.runs import open_run

TINY = ["schedule.steps=6", "schedule.stages=1", "eval.every=0", "data.synthetic_size=200", "federation.silos=1",
        "federation.round_timeout=5"]


@pytest.fixture(autouse=True)
def flower_identity(monkeypatch):
    """Flower's Message needs a run identity outside a Flower process."""
    from flwr.supercore.task_identity import TaskIdentity

    for key in ("_run_id", "_node_id", "_task_id"):
        monkeypatch.setattr(TaskIdentity, key, 1)


def _engine(tmp_path, name="silo", socket_name="e.sock", **settings) -> SiloEngine:
    node_config = {"name": name, "state-dir": str(tmp_path / name), "partition-id": 0, "num-partitions": 1,
                   "epsilon": 8.0, **settings}
    return SiloEngine(tmp_path / socket_name, node_config)


class Serving:
    """An engine answering in a background thread of this process (a real socket all the same)."""

    def __init__(self, engine: SiloEngine):
        self.engine = engine
        engine.listen()
        self.thread = threading.Thread(target=engine.serve, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.engine.stop()
        self.thread.join(timeout=10)
        assert not self.thread.is_alive()


def _through_thin_app(socket_path):
    """What a SuperNode's ClientApp process does with a message: the thin app, node config engine."""
    def handler(content):
        message = Message(content, dst_node_id=1, message_type=MessageType.TRAIN)
        reply = thin._answer("train", message, SimpleNamespace(node_config={"engine": str(socket_path)}))
        if reply.has_error():
            raise RuntimeError(reply.error.reason)
        return reply.content
    return handler


def _weights(run):
    return [entry.values().clone() for entry in run.parts.trainable]


def test_an_engine_answers_exactly_as_a_silo_in_the_clientapps_own_process(tmp_path):
    # Non-private with q = 1: every answer is a deterministic function of the model and the data,
    # so the two runs must end at the same weights, bit for bit.
    config = load_config("tiny", overrides=[*TINY, "privacy.enabled=false", "privacy.sample_rate=1.0"],
                         command="simulate")
    local = open_run(config, tmp_path / "local", resume=False)
    node = SiloNode(tmp_path / "inproc", lambda c, labels, split: components.silo_shard(c, split, 0, 1), partition=0,
                    limits=Limits(allow_nonprivate=True))
    Federation(local, DirectTransport({0: lambda content: handle_train(content, node)}), progress=False).run_all()

    serving = Serving(_engine(tmp_path, **{"allow-nonprivate": True}))
    try:
        engine_run = open_run(config, tmp_path / "engine", resume=False)
        result = Federation(engine_run, DirectTransport({0: _through_thin_app(tmp_path / "e.sock")}),
                            progress=False).run_all()
        assert result.steps == 6 and not result.rejections
        assert stat.S_IMODE(os.stat(tmp_path / "e.sock").st_mode) == 0o600  # only its operator's user
    finally:
        serving.stop()
    assert not (tmp_path / "e.sock").exists()  # a stopped engine leaves no socket behind
    assert all(torch.equal(a, b) for a, b in zip(_weights(local), _weights(engine_run)))


def test_a_restarted_engine_loses_no_release_and_no_step(tmp_path):
    config = load_config("tiny", overrides=[*TINY, "privacy.epsilon=8.0"], command="simulate")
    run = open_run(config, tmp_path / "run", resume=False)
    federation = Federation(run, DirectTransport({0: _through_thin_app(tmp_path / "e.sock")}), progress=False)
    serving = Serving(_engine(tmp_path))
    for _ in range(3):
        federation.play_round()
    serving.stop()
    # Down: the ClientApp refuses with the path, and the coordinator records a missing reply.
    with pytest.raises(Exception, match="FederationError"):
        try:
            federation.play_round()
        except Exception as error:
            raise Exception(type(error).__name__) from error
    reasons = [r["reason"] for r in federation.store.rejections()]
    assert reasons and all(f"no silo engine answers at {tmp_path / 'e.sock'}" in r for r in reasons)
    restarted = Serving(_engine(tmp_path))  # a new process would find the same state directory
    try:
        while not run.coordinator.done:
            federation.play_round()
    finally:
        restarted.stop()
    # What the engine left on disk: one release per step, and a replica at the coordinator's model.
    with PrivacyLedger.existing(tmp_path / "silo" / "ledger.sqlite") as ledger:
        assert sorted(entry["step"] for entry in ledger.history()) == list(range(6))
    node = SiloNode(tmp_path / "silo", lambda c, labels, split: components.silo_shard(c, split, 0, 1), partition=0)
    replica = node.run(run.run_id)
    assert replica.step == 5  # every step it was sent: the last reaches silos with the next request
    replica.applier.apply_all(list(run.log.steps(5)))
    assert all(torch.equal(a, b) for a, b in zip(_weights(replica), _weights(run)))
    node.close()


def test_one_state_directory_and_one_socket_serve_one_engine(tmp_path):
    first = _engine(tmp_path)
    serving = Serving(first)
    try:
        with pytest.raises(EngineError, match=f"another silo engine holds state-dir {tmp_path / 'silo'}"):
            _engine(tmp_path, socket_name="other.sock")
        second = _engine(tmp_path, name="other")
        with pytest.raises(EngineError, match="already answers at"):
            second.listen()
        second.close()
        assert ask(str(tmp_path / "e.sock"), "ping")[0] == {"ok": True, "silo": "silo", "pid": os.getpid()}
    finally:
        serving.stop()
    (tmp_path / "file.sock").write_text("not a socket")
    with pytest.raises(EngineError, match="exists and is not a socket"):
        _engine(tmp_path, socket_name="file.sock").listen()


def test_a_clientapp_whose_engine_is_missing_refuses_with_the_path():
    message = Message(thin.RecordDict(), dst_node_id=1, message_type=MessageType.TRAIN)
    reply = thin._answer("train", message, SimpleNamespace(node_config={"engine": "/nonexistent/silo.sock"}))
    assert reply.has_error() and reply.error.code == REFUSED
    assert "EngineUnavailable: no silo engine answers at /nonexistent/silo.sock" in reply.error.reason
    with pytest.raises(EngineUnavailable, match="seedtune silo serve --socket /nonexistent/silo.sock"):
        ask("/nonexistent/silo.sock", "ping")


def test_the_thin_clientapp_imports_neither_torch_nor_the_silo():
    code = ("import sys, time; t = time.perf_counter(); import seedtune.client.thin; "
            "print(time.perf_counter() - t); print(sorted(m for m in sys.modules if m.split('.')[0] in "
            "('torch', 'transformers', 'datasets') or m.startswith('seedtune.common')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split("\n")
    assert out[1] == "[]", out[1]


@pytest.mark.processes
def test_the_serve_command_refuses_bad_settings_in_one_line_and_serves_good_ones(tmp_path):
    seedtune = [sys.executable, "-m", "seedtune.cli.main"]
    bad = subprocess.run([*seedtune, "silo", "serve", "--socket", str(tmp_path / "s.sock"), "--node-config",
                          f'state-dir="{tmp_path / "st"}" epsilon=-1'], capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "epsilon=-1" in bad.stderr
    missing = subprocess.run([*seedtune, "silo", "ping", "--socket", str(tmp_path / "none.sock")],
                             capture_output=True, text=True)
    assert missing.returncode == 2 and str(tmp_path / "none.sock") in missing.stderr
    engine = subprocess.Popen([*seedtune, "silo", "serve", "--socket", str(tmp_path / "s.sock"), "--node-config",
                               f'state-dir="{tmp_path / "st"}" name="s" partition-id=0 epsilon=6.0'],
                              stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while True:
            ping = subprocess.run([*seedtune, "silo", "ping", "--socket", str(tmp_path / "s.sock")],
                                  capture_output=True, text=True)
            if ping.returncode == 0 or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        assert ping.returncode == 0 and "'s' answers" in ping.stdout
    finally:
        engine.terminate()
        engine.wait(timeout=30)
    assert engine.returncode == 0 and not (tmp_path / "s.sock").exists()  # SIGTERM: a clean stop


def test_an_engine_asked_for_a_device_it_lacks_stops_at_start_and_frees_its_state_dir(tmp_path):
    from seedtune.client.limits import NodeConfigError

    with pytest.raises(NodeConfigError, match="device='cuda:9' is not available here"):
        _engine(tmp_path, device="cuda:9")
    with pytest.raises(NodeConfigError, match="dtype='int8' is not one of"):
        _engine(tmp_path, dtype="int8")
    serving = Serving(_engine(tmp_path, dtype="bfloat16"))  # the lock went with the failed starts
    try:
        assert ask(str(tmp_path / "e.sock"), "ping")[0]["ok"] is True
        assert serving.engine.node.where.dtype == torch.bfloat16
    finally:
        serving.stop()
