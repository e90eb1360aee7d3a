"""Which process drives a run: the one that writes its steps, alive or not.

A run's log says "finished" or not; it cannot say whether the process writing it is still alive,
so a run whose coordinator was killed would read as running for ever. The driving process holds
an exclusive ``flock`` on ``RUN_DIR/driver.lock``, which the kernel drops when the process ends,
however it ends. So :func:`driver` tells a live run from a stopped one, and :meth:`RunLock.acquire`
refuses to let a second process drive a run the first still drives (two coordinators writing one
log would race for every step, and the loser would stop mid-run).

A process may hold its own run's lock more than once (a run resumed in the same process, as the
tests and ``seedtune simulate``'s ServerApp thread do): the lock is counted and released with its
last holder.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import threading
import time
from pathlib import Path

from seedtune.common.errors import RunDirError

_HELD: dict[str, list] = {}  # this process's locks: realpath -> [file descriptor, holders, who]
_GUARD = threading.Lock()


def _key(path: Path) -> str:
    return os.path.realpath(path)


class RunLock:
    """This process's hold on a run (release it with :meth:`release`; idempotent)."""

    def __init__(self, key: str):
        self._key: str | None = key

    @classmethod
    def acquire(cls, path: str | Path, command: str) -> RunLock:
        """Hold ``path`` for this process, or raise :class:`RunDirError` naming the live process that does."""
        path = Path(path)
        key = _key(path)
        with _GUARD:
            if key in _HELD:
                _HELD[key][1] += 1
                return cls(key)
            try:
                fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as error:
                raise RunDirError(f"cannot lock {path}: {error.strerror}; make the run directory writable") from None
            if not _lock(fd):
                os.close(fd)
                raise RunDirError(f"{path.parent} is being run by another live process ({_describe(_read(path))}); "
                                  "wait for it to end, or stop it and resume") from None
            who = {"pid": os.getpid(), "host": socket.gethostname(), "command": command}
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps(who).encode(), 0)
            _HELD[key] = [fd, 1, who]
        return cls(key)

    def release(self) -> None:
        with _GUARD:
            if self._key is None:
                return
            held = _HELD[self._key]
            held[1] -= 1
            if held[1] == 0:
                os.close(held[0])  # drops the flock
                del _HELD[self._key]
            self._key = None


def driver(path: str | Path) -> dict | None:
    """The live process driving the run (its ``pid``, ``host`` and ``command``), or None when none is.
    Needs only read access: a read-only copy of a run can be asked."""
    path = Path(path)
    with _GUARD:
        if _key(path) in _HELD:
            return dict(_HELD[_key(path)][2])
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return None  # never driven since locks were written (a run from an older version)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)  # a separate open file: releasing it touches no other lock
    except BlockingIOError:
        return _read(path)
    finally:
        os.close(fd)
    return None


def _lock(fd: int, tries: int = 20) -> bool:
    """Take the exclusive lock, waiting out a reader's moment-long shared one (:func:`driver`)."""
    for _ in range(tries):
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            time.sleep(0.05)
    return False


def _read(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}  # the holder had not written itself yet


def _describe(who: dict) -> str:
    if not who:
        return "starting"
    return f"pid {who.get('pid')} on {who.get('host')}, {who.get('command')}"
