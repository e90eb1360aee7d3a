"""The silo as a Flower ClientApp (Message API).

``app`` is what ``flwr run`` loads (see ``[tool.flwr.app.components]`` in pyproject.toml);
``make_client_app`` builds one whose silos keep their state under a given directory, which is
how ``seedtune simulate`` keeps every silo's ledger inside the run directory.

Node configuration (``--node-config`` of a SuperNode, or set by the simulation engine):

* ``partition-id`` / ``num-partitions`` — which share of the configured dataset is this silo's
  (simulation); ``data-path`` — a CSV/JSONL file that *is* this silo's data (deployment);
* ``state-dir`` — where the ledger and the model replica live (default
  ``~/.seedtune/silos/<partition>``);
* ``epsilon`` / ``delta`` — this silo's own budget, which no request can raise;
* ``name`` — how the coordinator's reports call this silo;
* ``audit-log`` — a JSON-lines file of every message in and out (``client/audit.py``);
* ``min-noise-multiplier``, ``max-probes``, ``max-sample-rate``, ``max-rounds``,
  ``allow-nonprivate``, ``allow-float-noise`` — limits no request can exceed (``client/limits.py``).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch  # noqa: F401  (Ray workers need torch imported by the ClientApp module itself)
from flwr.app import Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp
from seedtune.client.audit import audit_mod
from seedtune.client.limits import Limits
from seedtune.client.node import SiloNode
from seedtune.common import components
from seedtune.common.config import Config
from seedtune.common.data import load_text_data
from seedtune.common.errors import SeedtuneError
from seedtune.common.wire import (
    WireError,
    decode_evaluation,
    decode_request,
    encode_evaluation_reply,
    encode_reply,
)

log = logging.getLogger(__name__)

REFUSED = 100  # Flower error code of a request the silo refused, with the reason
_NODES: dict[str, SiloNode] = {}  # one per state directory, for the life of this process


class InjectedFault(RuntimeError):
    """federation.fault_partition/fault_round: this silo behaves as if killed (tests)."""


def handle_train(content: RecordDict, node: SiloNode, *, partition: int | None = None) -> RecordDict:
    """Decode, catch up, answer privately, encode. Raises on anything the silo refuses."""
    request, sync = decode_request(content)
    dead = node.state_dir / "injected-fault"
    if dead.exists():
        raise InjectedFault(f"injected fault: silo {partition} is dead")
    reply, version = node.answer(request, sync)
    fault = node.run(request.run_id).config.federation
    if partition is not None and partition == fault.fault_partition and request.round >= fault.fault_round >= 0:
        dead.touch()  # from now on it answers nothing, like a killed process
        raise InjectedFault(f"injected fault: silo {partition} dies at round {request.round} after releasing")
    return encode_reply(reply, version, silo=node.name)


def handle_evaluate(content: RecordDict, node: SiloNode) -> RecordDict:
    request, sync, private, sigma = decode_evaluation(content)
    correct, count, events = node.evaluate(request, sync, private=private, noise_multiplier=sigma)
    return encode_evaluation_reply(correct, count, events, silo=node.name)


def own_data(path: Path, config: Config, label_names: tuple[str, ...], split: str):
    """The silo's own file, split reproducibly, its labels numbered as the run's ``label_names``
    (a file's labels are names: "positive", not 1, so no silo can silently flip them)."""
    data = load_text_data(str(path), split_seed=config.data.split_seed, validation_fraction=0.1, test_fraction=0.01)
    unknown = sorted(set(data.label_names) - set(label_names))
    if unknown:
        raise SeedtuneError(f"data-path {str(path)!r} has label {unknown[0]!r}, which this run does not know; "
                            f"its labels are {list(label_names)}")
    ids = [label_names.index(name) for name in data.label_names]
    return getattr(data, split).map(lambda row: {"label": ids[row["label"]]})


def node_for(context: Context, state_root: Path | None = None) -> tuple[SiloNode, int | None]:
    """This process's SiloNode for the node described by ``context.node_config``."""
    node_config = context.node_config
    partition = node_config.get("partition-id")
    partition = int(partition) if partition is not None else None
    label = f"partition-{partition}" if partition is not None else f"node-{context.node_id}"
    if "state-dir" in node_config:
        state_dir = Path(str(node_config["state-dir"]))
    elif state_root is not None:
        state_dir = Path(state_root) / label
    else:
        state_dir = Path(os.environ.get("SEEDTUNE_STATE_DIR", Path.home() / ".seedtune" / "silos")) / label
    key = str(state_dir.resolve())
    if key not in _NODES:
        budget = None
        if "epsilon" in node_config:
            budget = (float(node_config["epsilon"]), float(node_config.get("delta", 1e-5)),
                      str(node_config.get("accountant", "rdp")))

        def shard(config: Config, label_names: tuple[str, ...], split: str):
            if "data-path" in node_config:
                return own_data(Path(str(node_config["data-path"])), config, label_names, split)
            return components.silo_shard(config, split, partition, int(node_config.get("num-partitions", 1)))

        # seedtune simulate (state_root given) runs every silo for the one user who started it.
        limits = Limits.from_node_config(node_config, allow_nonprivate=state_root is not None)
        _NODES[key] = SiloNode(state_dir, shard, budget=budget, partition=partition,
                               name=str(node_config.get("name", label)), limits=limits)
    return _NODES[key], partition


def make_client_app(state_root: Path | None = None) -> ClientApp:
    app = ClientApp(mods=[audit_mod])

    @app.train()
    def train(message: Message, context: Context) -> Message:
        node, partition = node_for(context, state_root)
        try:
            content = handle_train(message.content, node, partition=partition)
        except (SeedtuneError, WireError, InjectedFault) as error:
            log.warning("silo %s refused a request: %s", node.name, error)
            return Message(Error(code=REFUSED, reason=f"{type(error).__name__}: {error}"), reply_to=message)
        return Message(content, reply_to=message)

    @app.evaluate()
    def evaluate(message: Message, context: Context) -> Message:
        node, partition = node_for(context, state_root)
        try:
            content = handle_evaluate(message.content, node)
        except (SeedtuneError, WireError) as error:
            return Message(Error(code=REFUSED, reason=f"{type(error).__name__}: {error}"), reply_to=message)
        return Message(content, reply_to=message)

    return app


app = make_client_app()
