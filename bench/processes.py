"""Finding and stopping the processes a test or a bench started, whatever they detached from.

Flower's SuperLink and SuperNode start `flower-superexec` in a new session, and the local
simulation SuperLink keeps running after `flwr run` exits, so process groups are not enough:
every process a test starts carries SEEDTUNE_TEST_MARKER in its environment, which children inherit.
"""

from __future__ import annotations

import time

import psutil


def marked_processes(marker: str) -> list[psutil.Process]:
    """Processes started with SEEDTUNE_TEST_MARKER=<marker> (children inherit the environment)."""
    found = []
    for process in psutil.process_iter():
        try:
            if process.environ().get("SEEDTUNE_TEST_MARKER") == marker and process.status() != psutil.STATUS_ZOMBIE:
                found.append(process)
        except (psutil.AccessDenied, psutil.NoSuchProcess, psutil.ZombieProcess):
            continue
    return found


def wait_gone(marker: str, seconds: float = 20) -> list[psutil.Process]:
    deadline = time.monotonic() + seconds
    while (left := marked_processes(marker)) and time.monotonic() < deadline:
        time.sleep(0.5)
    return left


def kill_marked(marker: str) -> list[psutil.Process]:
    """Kill every marked process; returns those still alive after a short wait (should be none)."""
    for process in marked_processes(marker):
        try:
            process.kill()
        except psutil.NoSuchProcess:
            pass
    return wait_gone(marker)
