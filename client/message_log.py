"""The message log: every message that leaves (and enters) this silo, as the silo's operator sees it.

Node configuration ``message-log = "<path>"`` turns it on (``audit-log``, its name before 0.2, still
works and warns: "audit" now means only the privacy audit, ``seedtune audit``). It is a Flower ClientApp *mod*, so it sees
the very ``Message`` objects Flower serialises to and from the SuperLink, after seedtune's own code:
a hospital's operator can read, line by line, that what left were seeds, counts and noised scalars
— and check it against the claim, which ``tests/test_deployment.py`` does.

One JSON line per message: direction (``in``/``out``), message type, run, and for every record its
kind; config and metric records with their values in full (they are small), array records with
only dtype, shape and size per array (a weight tensor in a reply would show here).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import warnings

from flwr.app import Context, Message
from flwr.clientapp.typing import ClientAppCallable

NODE_CONFIG_KEY = "message-log"
DEPRECATED_KEY = "audit-log"  # the same setting's name before 0.2


def describe(message: Message) -> dict:
    entry: dict = {"type": message.metadata.message_type, "run": message.metadata.run_id}
    if message.has_error():
        entry["error"] = {"code": message.error.code, "reason": message.error.reason}
        return entry
    records = {}
    for name, record in message.content.config_records.items():
        records[name] = {"kind": "config", "values": {key: _plain(value) for key, value in record.items()}}
    for name, record in message.content.metric_records.items():
        records[name] = {"kind": "metric", "values": {key: _plain(value) for key, value in record.items()}}
    for name, record in message.content.array_records.items():
        records[name] = {"kind": "array", "arrays": {
            key: {"dtype": array.dtype, "shape": list(array.shape), "bytes": len(array.data)}
            for key, array in record.items()}}
    entry["records"] = records
    return entry


def _plain(value):
    if isinstance(value, bytes):
        return {"bytes": len(value)}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


def message_log_mod(message: Message, context: Context, call_next: ClientAppCallable) -> Message:
    path = log_path(context.node_config)
    if not path:
        return call_next(message, context)
    log = Path(str(path))
    log.parent.mkdir(parents=True, exist_ok=True)
    _append(log, "in", message)
    reply = call_next(message, context)
    _append(log, "out", reply)
    return reply


def log_path(node_config) -> str | None:
    """The message log's path from the node config (the deprecated key still counts, and warns)."""
    if NODE_CONFIG_KEY in node_config:
        return node_config[NODE_CONFIG_KEY] or None
    if DEPRECATED_KEY in node_config:
        warnings.warn(f"node config {DEPRECATED_KEY} is deprecated: rename it {NODE_CONFIG_KEY}",
                      DeprecationWarning, stacklevel=2)
        return node_config[DEPRECATED_KEY] or None
    return None


def _append(log: Path, direction: str, message: Message) -> None:
    line = json.dumps({"time": time.time(), "direction": direction, **describe(message)})
    with log.open("a") as file:  # one write per line: lines from concurrent processes do not interleave
        file.write(line + "\n")
