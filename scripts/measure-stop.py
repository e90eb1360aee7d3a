#!/usr/bin/env python3
"""How long `seedtune simulate` takes to stop on Ctrl-C, and how long Ray's processes outlive a
SIGKILL of it: each measured on the tiny preset, once its silos are answering.

    .venv/bin/python scripts/measure-stop.py [--repeats N]
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from processes import marked_processes  # noqa: E402  (the test suite's own process finder)


def _start(run_dir: Path, marker: str) -> subprocess.Popen:
    process = subprocess.Popen(
        [sys.executable, "-m", "seedtune.cli.main", "simulate", "--preset", "tiny", "--rounds", "400",
         "--out", str(run_dir), "--no-progress"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ, "SEEDTUNE_TEST_MARKER": marker})
    while not list((run_dir / "silos").glob("*/ledger.sqlite")):
        time.sleep(0.2)
    time.sleep(3)  # a few rounds in
    return process


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    repeats = parser.parse_args().repeats
    with tempfile.TemporaryDirectory() as scratch:
        for repeat in range(repeats):
            marker = uuid.uuid4().hex
            process = _start(Path(scratch) / f"int{repeat}", marker)
            start = time.monotonic()
            process.send_signal(signal.SIGINT)
            process.wait()
            stop_s = time.monotonic() - start
            while marked_processes(marker) and time.monotonic() - start < 120:
                time.sleep(0.2)
            marker = uuid.uuid4().hex
            process = _start(Path(scratch) / f"kill{repeat}", marker)
            start = time.monotonic()
            process.kill()
            process.wait()
            while marked_processes(marker) and time.monotonic() - start < 120:
                time.sleep(0.2)
            print(f"Ctrl-C: exit after {stop_s:.1f} s; SIGKILL: last Ray process gone after "
                  f"{time.monotonic() - start:.1f} s", flush=True)


if __name__ == "__main__":
    main()
