"""``seedtune silo supernode``: Flower's SuperNode with shorter waits, and nothing else changed."""

from __future__ import annotations

import importlib
import inspect
import os
import subprocess
import sys

import pytest

from seedtune.client import supernode
from seedtune.client.supernode import (BUSY_GAP_S, FLOWER_IDLE_S, IDLE_FIRST_S, IDLE_GROWTH, STATE_POLL_S,
                                       TASK_POLL_ENV, IdleWaits)


class FakeClock:
    """``time`` with a clock that moves only when slept on, or when told."""

    def __init__(self):
        self.now = 100.0
        self.slept: list[float] = []

    def monotonic(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds

    def time(self) -> float:
        return 1.7e9 + self.now


def test_idle_waits_start_short_after_a_message_and_grow_back_to_flowers_own():
    clock = FakeClock()
    waits = IdleWaits(clock)
    for _ in range(30):  # pulls that keep finding nothing, each a moment after the last wait
        waits.sleep(FLOWER_IDLE_S)
        clock.now += 0.01
    assert clock.slept[0] == IDLE_FIRST_S
    assert all(b == min(IDLE_GROWTH * a, FLOWER_IDLE_S) for a, b in zip(clock.slept, clock.slept[1:]))
    assert 1 < IDLE_GROWTH <= 1.25  # a message t seconds late is picked up at most about 0.25 t later
    assert clock.slept[-1] == FLOWER_IDLE_S  # an idle silo polls the SuperLink no more often than before
    clock.now += BUSY_GAP_S + 2.0  # a message was pulled and answered in between
    waits.sleep(FLOWER_IDLE_S)
    assert clock.slept[-1] == IDLE_FIRST_S


def test_other_waits_in_the_loop_are_capped_and_the_rest_of_time_passes_through():
    clock = FakeClock()
    waits = IdleWaits(clock)
    waits.sleep(0.5)  # the loop's checks of its own state for the ClientApp's reply
    waits.sleep(0.01)
    assert clock.slept == [STATE_POLL_S, 0.01]
    assert waits.time() == clock.time()


def test_flowers_supernode_still_waits_where_the_launcher_expects():
    """A Flower upgrade that moves these waits (or drops the setting) fails here, not in a deployment."""
    from flwr.supercore.superexec import run_superexec
    from flwr.supernode import start_client_internal

    loop = inspect.getsource(start_client_internal.start_client_internal)
    assert f"time.sleep({FLOWER_IDLE_S})" in loop
    assert "time.sleep(0.5)" in inspect.getsource(start_client_internal._push_messages)
    assert start_client_internal.time is not None and "time" in start_client_internal.__dict__
    assert run_superexec._TASK_POLL_INTERVAL_ENV == TASK_POLL_ENV
    assert run_superexec._MIN_TASK_POLL_INTERVAL_SECONDS <= supernode.TASK_POLL_S


def test_the_launcher_patches_only_the_supernode_loop_and_leaves_an_operators_setting(monkeypatch):
    from flwr.supernode import start_client_internal

    cli = importlib.import_module("flwr.supernode.cli.flower_supernode")  # the module, not the function
    seen = {}

    def fake_supernode():
        seen["time"] = start_client_internal.time
        seen["argv"] = list(sys.argv)
        seen["poll"] = os.environ[TASK_POLL_ENV]

    monkeypatch.setattr(cli, "flower_supernode", fake_supernode)
    before = start_client_internal.time, list(sys.argv)
    monkeypatch.setenv(TASK_POLL_ENV, "0.5")
    supernode.run_supernode(["--superlink", "127.0.0.1:9092", "--insecure"])
    assert isinstance(seen["time"], IdleWaits)
    assert seen["argv"] == ["seedtune silo supernode", "--superlink", "127.0.0.1:9092", "--insecure"]
    assert seen["poll"] == "0.5"  # the operator's own setting wins
    assert (start_client_internal.time, sys.argv) == before  # put back once Flower's main returns
    monkeypatch.delenv(TASK_POLL_ENV)
    supernode.run_supernode([])
    assert seen["poll"] == str(supernode.TASK_POLL_S) and TASK_POLL_ENV not in os.environ


@pytest.mark.slow
def test_seedtune_silo_supernode_passes_every_argument_to_flower():
    """``--help`` and a bad flag reach flower-supernode itself: its own help, its own usage error."""
    command = [sys.executable, "-m", "seedtune.cli.main", "silo", "supernode"]
    helped = subprocess.run([*command, "--help"], capture_output=True, text=True, timeout=120)
    assert helped.returncode == 0 and "--superlink" in helped.stdout and "--node-config" in helped.stdout
    assert helped.stdout.startswith("usage: seedtune silo supernode")
    refused = subprocess.run([*command, "--no-such-flag"], capture_output=True, text=True, timeout=120)
    assert refused.returncode != 0 and "--no-such-flag" in refused.stderr
