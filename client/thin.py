"""The ClientApp a SuperNode starts for every message: Flower and the standard library only.

Flower 1.41 runs a fresh ClientApp process per message, so whatever this module imports, every
round pays for. It imports no torch, no transformers and no seedtune module beyond the channel and
the message log, and forwards each message to the silo's resident engine (``seedtune silo
serve``, client/engine.py), which holds the model, the data, the ledger and the replica. Node
config ``engine = "<socket path>"`` names it; a message the engine cannot take (no engine, a
refusal) is answered with a Flower error carrying the reason, which the coordinator records as a
missing reply. Without ``engine`` the silo is answered in this process (client/app.py), as the
simulation engine and older deployments do.
"""

from __future__ import annotations

from flwr.app import Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.serde import recorddict_from_proto, recorddict_to_proto
from flwr.proto.recorddict_pb2 import RecordDict as ProtoRecordDict
from seedtune.client.channel import REFUSED, ChannelError, EngineUnavailable, ask
from seedtune.client.message_log import message_log_mod

ENGINE_KEY = "engine"  # node config: the engine's Unix socket

app = ClientApp(mods=[message_log_mod])


@app.train()
def train(message: Message, context: Context) -> Message:
    return _answer("train", message, context)


@app.evaluate()
def evaluate(message: Message, context: Context) -> Message:
    return _answer("evaluate", message, context)


@app.query()
def keys(message: Message, context: Context) -> Message:
    return _answer("keys", message, context)


def _answer(kind: str, message: Message, context: Context) -> Message:
    path = context.node_config.get(ENGINE_KEY)
    if path is None:
        from seedtune.client.app import reply_in_process  # the heavy imports, only without an engine

        return reply_in_process(kind, message, context)
    try:
        header, body = ask(str(path), kind, encode(message.content))
        if header.get("ok") is True:
            return Message(decode(body), reply_to=message)
        reason = str(header.get("reason") or "the engine refused without a reason")
    except (EngineUnavailable, ChannelError) as error:
        reason = f"{type(error).__name__}: {error}"
    return Message(Error(code=REFUSED, reason=reason), reply_to=message)


def encode(content: RecordDict) -> bytes:
    return recorddict_to_proto(content).SerializeToString()


def decode(body: bytes) -> RecordDict:
    try:
        return recorddict_from_proto(ProtoRecordDict.FromString(body))
    except Exception as error:  # protobuf's DecodeError and whatever a malformed record raises
        raise ChannelError(f"the message's records do not decode: {error}") from None
