"""The local channel between a silo's thin ClientApp and its resident engine (client/engine.py).

Standard library only: the ClientApp that Flower starts for every message imports this, and must
start in a fraction of a second. One connection carries one exchange over a Unix socket that only
the silo's operator can open (the engine creates it with mode 0600):

    frame = (header length, body length) as two big-endian uint32, a JSON header, the body

The thin ClientApp sends ``{"kind": "train" | "evaluate" | "keys" | "ping"}`` and the message's records
(Flower's own protobuf serialisation of a ``RecordDict``); the engine answers ``{"ok": true}`` with
the reply's records, or ``{"ok": false, "reason": "..."}`` when the silo refused.
"""

from __future__ import annotations

import json
import socket
import struct

KINDS = ("train", "evaluate", "keys", "ping")
REFUSED = 100  # Flower error code of a request the silo refused, with the reason
MAX_HEADER = 1 << 16
MAX_BODY = (1 << 32) - 1  # a checkpoint of a large trainable set is the biggest message
CONNECT_TIMEOUT_S = 5.0
_SIZES = struct.Struct(">II")


class EngineUnavailable(ConnectionError):
    """No engine answers at the socket: the text names the path and how to start one."""


class ChannelError(ValueError):
    """A frame that does not follow the channel's format."""


def send_frame(connection: socket.socket, header: dict, body: bytes = b"") -> None:
    encoded = json.dumps(header).encode()
    if len(encoded) > MAX_HEADER or len(body) > MAX_BODY:
        raise ChannelError(f"frame too large: header {len(encoded)} B, body {len(body)} B")
    connection.sendall(_SIZES.pack(len(encoded), len(body)) + encoded)
    if body:  # an empty one would be a second write after the peer may have answered and closed
        connection.sendall(body)


def receive_frame(connection: socket.socket) -> tuple[dict, bytes]:
    header_size, body_size = _SIZES.unpack(_receive(connection, _SIZES.size))
    if header_size > MAX_HEADER:
        raise ChannelError(f"frame header of {header_size} B is over the {MAX_HEADER} B limit")
    try:
        header = json.loads(_receive(connection, header_size))
    except ValueError as error:
        raise ChannelError(f"frame header is not JSON: {error}") from None
    if not isinstance(header, dict):
        raise ChannelError("frame header is not a JSON object")
    return header, _receive(connection, body_size)


def _receive(connection: socket.socket, size: int) -> bytes:
    chunks, left = [], size
    while left:
        chunk = connection.recv(min(left, 1 << 20))
        if not chunk:
            raise ChannelError(f"the connection closed {left} B before the end of a frame")
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def ask(path: str, kind: str, body: bytes = b"") -> tuple[dict, bytes]:
    """One exchange with the engine at ``path``: (reply header, reply body). Waits as long as the
    engine computes (its forward passes), but not for an engine that is not there."""
    connection = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        connection.settimeout(CONNECT_TIMEOUT_S)
        try:
            connection.connect(path)
        except (FileNotFoundError, ConnectionRefusedError, socket.timeout) as error:
            raise EngineUnavailable(
                f"no silo engine answers at {path} ({type(error).__name__}); start it with "
                f"`seedtune silo serve --socket {path} --node-config ...`") from None
        except PermissionError:
            raise EngineUnavailable(f"the silo engine's socket {path} is not this user's to open (mode 0600: "
                                    "run the SuperNode as the engine's user)") from None
        connection.settimeout(None)
        send_frame(connection, {"kind": kind}, body)
        try:
            return receive_frame(connection)
        except ChannelError as error:
            raise EngineUnavailable(f"the silo engine at {path} stopped mid-answer: {error}") from None
    finally:
        connection.close()
