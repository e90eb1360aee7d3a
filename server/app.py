"""The coordinator as a Flower ServerApp (Message API).

``app`` is what ``flwr run`` loads; it reads its configuration from the run config (the same
dotted keys as ``seedtune train``, plus ``run-dir``) and resumes an unfinished run found in
``run-dir``. ``make_server_app`` builds one with the configuration given in code, which is how
``seedtune simulate`` drives Flower's simulation engine.
"""

from __future__ import annotations

import logging
import threading
import time
from datetime import datetime
from pathlib import Path

from flwr.app import Context, Message, MessageType, RecordDict
from flwr.serverapp import Grid, ServerApp
from seedtune.common.config import Config
from seedtune.common.wire import serialized_size
from seedtune.server import plots
from seedtune.server.federation import Federation, FederationResult, Response, Stopped
from seedtune.common.paths import RunLayout
from seedtune.server.runs import finish_run, open_run

log = logging.getLogger(__name__)

RUN_DIR_KEY = "run-dir"


class GridTransport:
    """Rounds over Flower's Grid: one message per silo, replies gathered until the timeout.

    Replies are pulled in a short loop rather than one blocking ``send_and_receive``, so a stop
    request is honoured within a tenth of a second.
    """

    def __init__(self, grid: Grid, stop: threading.Event | None = None):
        self.grid = grid
        self.stop = stop or threading.Event()

    def nodes(self) -> list[int]:
        if self.stop.is_set():
            raise Stopped("stopped by the caller")
        return sorted(self.grid.get_node_ids())

    def exchange(self, messages: dict[int, RecordDict], *, round: int, timeout: float,
                 kind: str = "train") -> list[Response]:
        message_type = {"train": MessageType.TRAIN, "keys": MessageType.QUERY}.get(kind, MessageType.EVALUATE)
        outgoing = {node: Message(content, dst_node_id=node, message_type=message_type, group_id=str(round))
                    for node, content in messages.items()}
        sizes = {node: serialized_size(message) for node, message in outgoing.items()}
        nodes = list(outgoing)
        ids = list(self.grid.push_messages([outgoing[node] for node in nodes]))
        addressee = dict(zip(ids, nodes))  # replies are matched to whom we asked: an error the
        pending = set(ids)                 # SuperLink writes for a lost node comes from the SuperLink
        replies = []
        deadline = time.monotonic() + timeout
        while pending and time.monotonic() < deadline:
            if self.stop.is_set():
                raise Stopped("stopped by the caller")
            for reply in self.grid.pull_messages(list(pending)):
                pending.discard(reply.metadata.reply_to_message_id)
                replies.append(reply)
            if pending:
                time.sleep(0.05)
        responses = []
        for reply in replies:
            node = addressee.get(reply.metadata.reply_to_message_id, reply.metadata.src_node_id)
            if reply.has_error():
                error = f"Flower error {reply.error.code}: {reply.error.reason}"
                responses.append(Response(node, None, error, sizes.get(node, 0), serialized_size(reply)))
            elif reply.metadata.src_node_id != node:
                error = f"a reply from node {reply.metadata.src_node_id} to the message sent to node {node}"
                responses.append(Response(node, None, error, sizes.get(node, 0), serialized_size(reply)))
            else:
                responses.append(Response(node, reply.content, None, sizes.get(node, 0), serialized_size(reply)))
        return responses


class Outcome:
    """Where a ServerApp built in code leaves its result, and how its caller stops it."""

    def __init__(self) -> None:
        self.result: FederationResult | None = None
        self.run_dir: Path | None = None
        self.stop = threading.Event()


def serve(grid: Grid, config: Config, run_dir: Path, *, progress: bool, outcome: Outcome | None = None,
          turns: int = 1, command: str = "federation") -> None:
    resume = RunLayout(run_dir).log.exists()
    run = open_run(config, run_dir, resume=resume, command=command)
    federation = Federation(run, GridTransport(grid, outcome.stop if outcome else None), progress=progress,
                            turns=turns)
    try:  # however it ends, another process may then resume the run
        result = federation.run_all()
        releases = federation.store.releases()
        finish_run(run, result.before, result.after, result.epsilons,
                   extra={"silos": {silo: {"epsilon": result.epsilons.get(silo), "releases": releases.get(silo, 0),
                                           **({"epsilon_if_all_collude": result.epsilons_if_all_collude.get(silo)}
                                              if result.epsilons_if_all_collude else {}),
                                           **result.traffic.get(silo, {})}
                                    for silo in federation.store.silos()},
                          "rejections": result.rejections, "silo_evaluation": result.silo_evaluation,
                          "stopped_early": result.stopped_early})
        plots.traffic_plot(federation.store.traffic_rows(), run.layout.traffic_plot)
        if outcome is not None:
            outcome.result, outcome.run_dir = result, run_dir
    finally:
        run.close()
        federation.store.close()


def make_server_app(config: Config, run_dir: Path, *, progress: bool = True, outcome: Outcome | None = None,
                    turns: int = 1, command: str = "federation") -> ServerApp:
    """``turns``: see :class:`Federation` (a simulation's silos answering one after another).
    ``command``: what started it, as ``seedtune show`` names the process running the run."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        try:
            serve(grid, config, Path(run_dir), progress=progress, outcome=outcome, turns=turns, command=command)
        except Stopped:
            # Asked to stop (outcome.stop is set): return rather than raise, so that Flower's
            # simulation runtime winds down at once instead of waiting 3 s for a context that a
            # failed ServerApp never hands back.
            if outcome is None or not outcome.stop.is_set():
                raise

    return app


app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    settings = dict(context.run_config)
    run_dir = Path(str(settings.pop(RUN_DIR_KEY, f"runs/flwr-{datetime.now():%Y%m%d-%H%M%S}")))
    serve(grid, Config.from_flat(settings), run_dir, progress=False)
