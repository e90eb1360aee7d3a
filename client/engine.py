"""A silo's resident engine: one long-lived process that holds the silo's model, data, ledger and
replica, and answers the messages its SuperNode's thin ClientApp forwards (client/thin.py).

Flower starts a fresh ClientApp process for every message; without an engine each one imports
torch and transformers, loads the model and restores the replica before it can compute anything.
The engine pays that once. It listens on a Unix socket that it creates with mode 0600, so only
its operator's user can ask it anything, and it answers one exchange at a time: the model is
never shared between two requests. It is the only writer of its state directory (it holds a lock
on it, so a second engine pointed at the same directory stops at start), and everything it must
not lose is on disk before an answer leaves, as in-process silos do: an engine that crashes and is
started again recovers its ledger, replica and checkpoint from the directory.

``seedtune silo serve --socket PATH --node-config "..."`` runs one; the node settings are the
ones a SuperNode's ``--node-config`` takes today (client/app.py lists them).
"""

from __future__ import annotations

import fcntl
import logging
import os
import socket
import stat
import threading
from collections.abc import Mapping
from pathlib import Path

from seedtune.client.app import REFUSALS, build_node, handle, silo_location
from seedtune.client.channel import ChannelError, EngineUnavailable, ask, receive_frame, send_frame
from seedtune.client.thin import decode, encode
from seedtune.common.errors import SeedtuneError

log = logging.getLogger(__name__)

LOCK_FILE = "engine.lock"
MAX_SOCKET_PATH = 107  # bytes in sockaddr_un.sun_path, less the terminating NUL (Linux)


class EngineError(SeedtuneError):
    """The engine cannot start as asked; the text says why and what to change."""


class SiloEngine:
    """One silo, resident. ``serve()`` answers until ``stop()`` (or SIGTERM, via the command)."""

    def __init__(self, socket_path: str | Path, node_config: Mapping):
        self.socket_path = Path(socket_path)
        if len(os.fsencode(self.socket_path)) > MAX_SOCKET_PATH:
            raise EngineError(f"--socket {self.socket_path} is longer than the {MAX_SOCKET_PATH} bytes a Unix "
                              "socket path may have; choose a shorter path")
        node_config = dict(node_config)
        state_dir, self.partition = silo_location(node_config, None)
        self._lock = _lock_state_dir(state_dir)  # before anything in it is opened
        try:
            self.node = build_node(node_config)
        except BaseException:
            self._lock.close()
            raise
        self._stopping = threading.Event()
        self._listener: socket.socket | None = None

    @property
    def name(self) -> str:
        return self.node.name

    # -- answering ---------------------------------------------------------------------------
    def answer(self, kind: str, body: bytes) -> tuple[dict, bytes]:
        """(header, body) for one request; a refusal is an answer too, with its reason."""
        if kind == "ping":
            return {"ok": True, "silo": self.node.name, "pid": os.getpid()}, b""
        if kind not in ("train", "evaluate", "keys"):
            return {"ok": False, "reason": f"ChannelError: unknown request kind {kind!r}"}, b""
        try:
            reply = handle(kind, decode(body), self.node, self.partition)
        except (*REFUSALS, ChannelError) as error:
            log.warning("silo %s refused a request: %s", self.node.name, error)
            return {"ok": False, "reason": f"{type(error).__name__}: {error}"}, b""
        return {"ok": True}, encode(reply)

    def _serve_one(self, connection: socket.socket) -> None:
        with connection:
            try:
                header, body = receive_frame(connection)
                kind = header.get("kind")
                try:
                    answer = self.answer(str(kind), body)
                except Exception as error:  # a bug, not a refusal: say so, and keep serving
                    log.exception("silo engine %s failed on a %s request", self.node.name, kind)
                    answer = {"ok": False, "reason": f"engine error: {type(error).__name__}: {error}"}, b""
                send_frame(connection, *answer)
            except (ChannelError, OSError) as error:  # the ClientApp went away mid-exchange
                log.warning("silo engine %s: an exchange broke off: %s", self.node.name, error)

    # -- the socket --------------------------------------------------------------------------
    def listen(self) -> None:
        """Create the socket (mode 0600 from the start: no moment when others could connect)."""
        _clear_stale_socket(self.socket_path)
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        previous = os.umask(0o177)
        try:
            listener.bind(str(self.socket_path))
        finally:
            os.umask(previous)
        os.chmod(self.socket_path, 0o600)
        listener.listen(8)
        listener.settimeout(0.25)  # so that stop() is noticed
        self._listener = listener

    def serve(self) -> None:
        if self._listener is None:
            self.listen()
        try:
            while not self._stopping.is_set():
                try:
                    connection, _ = self._listener.accept()
                except socket.timeout:
                    continue
                connection.settimeout(None)
                self._serve_one(connection)
        finally:
            self.close()

    def stop(self) -> None:
        self._stopping.set()

    def close(self) -> None:
        if self._listener is not None:
            self._listener.close()
            self._listener = None
            self.socket_path.unlink(missing_ok=True)
        self.node.close()
        self._lock.close()  # releases the state directory


def _lock_state_dir(state_dir: Path):
    state_dir.mkdir(parents=True, exist_ok=True)
    lock = (state_dir / LOCK_FILE).open("a+")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.close()
        raise EngineError(f"another silo engine holds state-dir {state_dir} ({state_dir / LOCK_FILE}); stop it, "
                          "or give this engine its own state-dir") from None
    return lock


def _clear_stale_socket(path: Path) -> None:
    """A socket left by an engine that died is removed; a live engine's, or any other file, is not."""
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        return
    if not stat.S_ISSOCK(path.stat().st_mode):
        raise EngineError(f"--socket {path} exists and is not a socket; choose another path")
    try:
        ask(str(path), "ping")
    except EngineUnavailable:
        path.unlink()
        return
    raise EngineError(f"a silo engine already answers at {path}; stop it, or choose another --socket")
