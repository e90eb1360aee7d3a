"""The silo as a Flower ClientApp (Message API).

A silo answered in the process that received the message. ``make_client_app`` builds a ClientApp
whose silos keep their state under a given directory, which is how ``seedtune simulate`` keeps
every silo's ledger inside the run directory. What ``flwr run`` loads is the thin ClientApp
(client/thin.py, ``[tool.flwr.app.components]`` in pyproject.toml): it forwards each message to
the silo's resident engine (node config ``engine``), or, without one, calls
:func:`reply_in_process` here.

Node configuration (``--node-config`` of a SuperNode, or set by the simulation engine):

* ``partition-id`` / ``num-partitions`` — which share of the configured dataset is this silo's
  (simulation); ``data-path`` — a CSV/JSONL file that *is* this silo's data (deployment);
* ``state-dir`` — where the ledger and the model replica live (or ``SEEDTUNE_STATE_DIR``/<name>);
  a deployed silo without one refuses every request;
* ``epsilon`` / ``delta`` — this silo's own budget, which no request can raise (or
  ``SEEDTUNE_EPSILON``/``SEEDTUNE_DELTA``); a deployed silo without one refuses private runs;
* ``public-size`` — with ``data-path``, the size the silo publishes: releases are divided by
  q x public-size, never by the exact count (required in a deployment);
* ``name`` — how the coordinator's reports call this silo;
* ``message-log`` — a JSON-lines file of every message in and out (``client/message_log.py``);
* ``device`` (``cpu``, ``cuda``, ``cuda:N``) and ``dtype`` (``float32``, ``bfloat16``,
  ``float16``) — where the model computes (client/placement.py; default cpu, float32);
* ``micro-batch`` — examples per fixed-shape forward pass (default: from the public q x size; 1
  computes each example alone, the by-construction guarantee that one example cannot change
  another's row, for hardware where the fixed-shape batches have not been checked);
* ``min-noise-multiplier``, ``max-probes``, ``max-sample-rate``, ``max-releases``, ``min-beta``,
  ``allow-nonprivate``, ``allow-float-noise`` — limits no request can exceed (``client/limits.py``).
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path

import torch  # noqa: F401  (Ray workers need torch imported by the ClientApp module itself)
from flwr.app import Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp
from seedtune.client.channel import REFUSED
from seedtune.client.message_log import message_log_mod
from seedtune.client.limits import Limits, NodeConfigError, node_setting
from seedtune.client.node import SiloNode
from seedtune.client.placement import placement
from seedtune.common import components
from seedtune.common.config import Config
from seedtune.common.data import load_text_data
from seedtune.common.errors import SeedtuneError
from seedtune.client.secure import SecureSettings
from seedtune.common.wire import (
    WireError,
    decode_evaluation,
    decode_keys_request,
    decode_request,
    encode_evaluation_reply,
    encode_keys_reply,
    encode_reply,
)

log = logging.getLogger(__name__)

_NODES: dict[str, SiloNode] = {}  # one per state directory, for the life of this process


KILL_HOOK = "SEEDTUNE_TEST_KILL_SILO"  # tests: "<partition>:<step>"


class InjectedFault(RuntimeError):
    """Tests only (``SEEDTUNE_TEST_KILL_SILO``): this silo behaves as if killed."""


def _killed_at(partition: int | None) -> int | None:
    """Tests only: the step from which ``partition`` dies after releasing, if the hook names it."""
    hook = os.environ.get(KILL_HOOK, "")
    if partition is None or not hook:
        return None
    victim, _, step = hook.partition(":")
    return int(step) if int(victim) == partition else None


def handle_train(content: RecordDict, node: SiloNode, *, partition: int | None = None) -> RecordDict:
    """Decode, catch up, answer privately, encode. Raises on anything the silo refuses."""
    request, sync = decode_request(content)
    dead = node.state_dir / "injected-fault"
    if dead.exists():
        raise InjectedFault(f"injected fault: silo {partition} is dead")
    reply = node.answer(request, sync)
    killed_at = _killed_at(partition)
    if killed_at is not None and request.step >= killed_at:
        dead.touch()  # from now on it answers nothing, like a killed process
        raise InjectedFault(f"injected fault: silo {partition} dies at step {request.step} after releasing")
    return encode_reply(reply, silo=node.name)


def handle_evaluate(content: RecordDict, node: SiloNode) -> RecordDict:
    request, sync = decode_evaluation(content)
    correct, count, events = node.evaluate(request, sync)
    return encode_evaluation_reply(correct, count, events, silo=node.name)


def handle_keys(content: RecordDict, node: SiloNode) -> RecordDict:
    """Secure aggregation: this silo's masking public key for the run (client/secure.py)."""
    run_id, sync = decode_keys_request(content)
    return encode_keys_reply(node.participant(run_id, sync))


def own_data(path: Path, config: Config, label_names: tuple[str, ...], split: str):
    """The silo's own file, split reproducibly, its labels numbered as the run's ``label_names``
    (a file's labels are names: "positive", not 1, so no silo can silently flip them)."""
    # Declared labels: a label the run does not know is an error naming its row, and ids follow
    # the run's order.
    data = load_text_data(str(path), split_seed=config.data.split_seed, validation_fraction=0.1, test_fraction=0.01,
                          labels=tuple(label_names))
    return getattr(data, split)



def node_for(context: Context, state_root: Path | None = None,
             settings: dict | None = None) -> tuple[SiloNode, int | None]:
    """This process's SiloNode for the node described by ``context.node_config`` over the shared
    ``settings`` (built once per state directory, then kept for the life of the process): see
    :func:`build_node`."""
    node_config = {**(settings or {}), **dict(context.node_config)}
    state_dir, partition = silo_location(node_config, state_root)
    key = str(state_dir.resolve())
    if key not in _NODES:
        _NODES[key] = build_node(node_config, state_root)
    return _NODES[key], partition


def build_node(node_config, state_root: Path | None = None) -> SiloNode:
    """A new SiloNode for the node settings ``node_config``.

    In a deployment (no ``state_root``) everything that binds the silo comes from its operator,
    never from the coordinator: the state directory that holds its ledger (node config
    ``state-dir``, or ``SEEDTUNE_STATE_DIR``/<name>), its budget (``epsilon``/``delta``, or
    ``SEEDTUNE_EPSILON``/``SEEDTUNE_DELTA``; without one it refuses private runs) and, for its own
    file (``data-path``), the public size its releases are normalised by (``public-size``). A silo
    given a share of the run's public corpus instead (``partition-id``) publishes that share's size.
    """
    state_dir, partition = silo_location(node_config, state_root)
    deployed = state_root is None
    budget = _own_budget(node_config)
    public_size = _public_size(node_config)
    partitions = _positive_int(node_config, "num-partitions") or 1
    if partition is not None and "data-path" not in node_config and not 0 <= partition < partitions:
        raise NodeConfigError(
            f"node config partition-id={partition} is not a share of num-partitions={partitions}: set "
            "num-partitions to the number of silos sharing the dataset (a silo given no num-partitions took "
            "the whole of it)")

    def shard(config: Config, label_names: tuple[str, ...], split: str):
        if "data-path" in node_config:
            return own_data(Path(str(node_config["data-path"])), config, label_names, split)
        return components.silo_shard(config, split, partition, partitions)

    if deployed and "data-path" in node_config and public_size is None:
        raise NodeConfigError(
            "node config public-size is not set: a silo with its own data-path divides its releases by "
            "q x public-size, a number you are willing to publish (e.g. your record count rounded), so that "
            "the exact count never leaves; add public-size=N")
    # seedtune simulate (state_root given) runs every silo for the one user who started it.
    limits = Limits.from_node_config(node_config, allow_nonprivate=not deployed)
    where = placement(str(node_config.get("device", "cpu")), str(node_config.get("dtype", "float32")))
    return SiloNode(state_dir, shard, budget=budget, partition=partition, name=_name(node_config) or state_dir.name,
                    limits=limits, public_size=public_size, budget_required=deployed,
                    micro_batch=_positive_int(node_config, "micro-batch"), where=where,
                    secure=SecureSettings.from_node_config(node_config))


def _name(node_config) -> str | None:
    partition = node_config.get("partition-id")
    if "name" in node_config:
        return str(node_config["name"])
    return f"partition-{int(partition)}" if partition is not None else None


def silo_location(node_config, state_root: Path | None) -> tuple[Path, int | None]:
    """(state directory, partition id or None) from the node settings."""
    partition = node_config.get("partition-id")
    partition = int(partition) if partition is not None else None
    name = _name(node_config)
    if "state-dir" in node_config:
        return Path(str(node_config["state-dir"])), partition
    if state_root is not None:
        return Path(state_root) / f"partition-{partition}", partition
    if os.environ.get("SEEDTUNE_STATE_DIR") and name is not None:
        return Path(os.environ["SEEDTUNE_STATE_DIR"]) / name, partition
    raise NodeConfigError(
        "this silo has no state directory: its ledger must live where its operator says, or a restart would "
        "start a new, empty one; set node config state-dir (or SEEDTUNE_STATE_DIR and node config name)")


def _own_budget(node_config) -> tuple[float, float, str] | None:
    """(epsilon, delta, accountant) from the node config, else the environment, else None."""
    raw_epsilon = node_config.get("epsilon", os.environ.get("SEEDTUNE_EPSILON"))
    if raw_epsilon is None:
        return None
    raw_delta = node_config.get("delta", os.environ.get("SEEDTUNE_DELTA", 1e-5))
    try:
        epsilon, delta = float(raw_epsilon), float(raw_delta)
    except (TypeError, ValueError):
        epsilon = delta = math.nan
    if not (0 < epsilon < math.inf):
        raise NodeConfigError(f"node config epsilon={raw_epsilon!r} must be a finite number > 0, e.g. epsilon=6.0")
    if not 0 < delta < 1:
        raise NodeConfigError(f"node config delta={raw_delta!r} must be in (0, 1), e.g. delta=1e-5")
    return epsilon, delta, str(node_config.get("accountant", "rdp"))


def _public_size(node_config) -> int | None:
    return _positive_int(node_config, "public-size", "e.g. public-size=1000")


def _positive_int(node_config, key: str, example: str = "") -> int | None:
    return node_setting(node_config, key, None, int, lambda v: v >= 1,
                        f"a whole number >= 1{', ' + example if example else ''}")


REFUSALS = (SeedtuneError, WireError, InjectedFault)  # a silo's refusal, with its reason; anything else is a bug


def handle(kind: str, content: RecordDict, node: SiloNode, partition: int | None) -> RecordDict:
    """A silo's answer to one message of ``kind`` (train or evaluate), in this process or an engine's."""
    if kind == "train":
        return handle_train(content, node, partition=partition)
    if kind == "keys":
        return handle_keys(content, node)
    return handle_evaluate(content, node)


def reply_in_process(kind: str, message: Message, context: Context, state_root: Path | None = None,
                     settings: dict | None = None) -> Message:
    """Answer ``message`` (``kind``: train, evaluate or keys) with this process's silo: the simulation
    engine's way, and a deployed SuperNode's when it has no resident engine (client/engine.py)."""
    try:
        node, partition = node_for(context, state_root, settings)
        content = handle(kind, message.content, node, partition)
    except REFUSALS as error:
        log.warning("silo refused a request: %s", error)
        return Message(Error(code=REFUSED, reason=f"{type(error).__name__}: {error}"), reply_to=message)
    return Message(content, reply_to=message)


def make_client_app(state_root: Path | None = None, settings: dict | None = None) -> ClientApp:
    """Silos in this process, their state under ``state_root`` (``seedtune simulate``), with the
    node ``settings`` every simulated silo shares (its operator's, in a deployment)."""
    app = ClientApp(mods=[message_log_mod])

    @app.train()
    def train(message: Message, context: Context) -> Message:
        return reply_in_process("train", message, context, state_root, settings)

    @app.evaluate()
    def evaluate(message: Message, context: Context) -> Message:
        return reply_in_process("evaluate", message, context, state_root, settings)

    @app.query()
    def keys(message: Message, context: Context) -> Message:
        return reply_in_process("keys", message, context, state_root, settings)

    return app
