"""Which process drives a run (common/runlock.py): seen from other processes, counted within one."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from seedtune.common.errors import RunDirError
from seedtune.common.runlock import RunLock, driver


def _seen_from_another_process(path):
    shown = subprocess.run([sys.executable, "-c", "import json, sys; from seedtune.common.runlock import driver; "
                            "print(json.dumps(driver(sys.argv[1])))", str(path)],
                           capture_output=True, text=True, timeout=60, check=True)
    return json.loads(shown.stdout)


def test_a_lock_held_twice_by_one_process_is_released_with_its_last_holder(tmp_path):
    path = tmp_path / "driver.lock"
    first = RunLock.acquire(path, "seedtune simulate")
    second = RunLock.acquire(path, "federation")  # the same process resuming its own run (simulate's ServerApp)
    first.release()
    first.release()  # idempotent: does not count down the other holder
    seen = _seen_from_another_process(path)
    assert seen["pid"] == os.getpid() and seen["command"] == "seedtune simulate"
    assert driver(path)["pid"] == os.getpid()  # asked in-process, without dropping its own lock
    assert _seen_from_another_process(path)["pid"] == os.getpid()
    second.release()
    assert _seen_from_another_process(path) is None and driver(path) is None


def test_a_run_never_locked_has_no_driver(tmp_path):
    assert driver(tmp_path / "driver.lock") is None


def test_a_lock_that_cannot_be_written_is_a_one_line_error(tmp_path):
    with pytest.raises(RunDirError, match=r"cannot lock .*driver.lock: .*make the run directory writable"):
        RunLock.acquire(tmp_path / "missing" / "driver.lock", "seedtune train")


def test_a_new_run_that_fails_after_its_log_is_written_stops_driving_it(tmp_path, monkeypatch):
    """The log exists (the run can be resumed) but nothing holds it: neither the lock nor the log."""
    from seedtune.common.config import load_config
    from seedtune.common.updatelog import UpdateLog
    from seedtune.server import runs
    from seedtune.server.runs import open_run

    def broken(*args, **kwargs):
        raise MemoryError("no room for the coordinator")

    monkeypatch.setattr(runs, "Coordinator", broken)
    config = load_config("tiny", overrides=["data.max_train_examples=40"], command="simulate")
    with pytest.raises(MemoryError):
        open_run(config, tmp_path / "run", resume=False)
    assert driver(tmp_path / "run" / "driver.lock") is None
    assert _seen_from_another_process(tmp_path / "run" / "driver.lock") is None
    UpdateLog.open(tmp_path / "run" / "log.sqlite").close()  # written, and closed
    monkeypatch.undo()
    open_run(config, tmp_path / "run", resume=True).close()
