"""``seedtune bench comm|server|scale``: what crosses the network, what the coordinator costs,
and how a simulated federation scales.

* ``comm`` — bytes per client per round, down and up, on the serialized Flower messages the
  federation sends (``Message`` objects, as the deployment measures them), for K in {1, 4, 16};
  FedAvg's messages carrying all-MiniLM-L6-v2's full state dict, encoded the same way; and the
  total per client over a 1,000-round run, for a silo asked every round, one asked every third
  round (it catches up by replaying the two updates it missed), and one joining at the end.
* ``server`` — the coordinator's time per round to aggregate 3 replies, log the step durably and
  apply the update, against one client's ZO step on the same trainable set; and the replay speed
  of a silo catching up, through the silo's own catch-up code, against downloading the model.
* ``scale`` — ``seedtune simulate`` on the tiny preset with 2, 4 and 8 silos on Flower's
  simulation engine: per round, the time spent in forward passes (from the silos' own
  ``timings.jsonl``) against everything else, and the memory of the whole process tree.
"""

from __future__ import annotations

import json
import math
import sqlite3
import statistics
import tempfile
import threading
import time
from contextlib import contextmanager
from pathlib import Path

from seedtune.bench.cost import _progress, _target, _threads, in_fresh_process, workload, zo_step

PROBES = (1, 4, 16)
ROUNDS = 1000
LINK_BITS_PER_S = 100e6  # a 100 Mbit/s link
SCALE_CLIENTS = (2, 4, 8)


# -- comm ----------------------------------------------------------------------------------
@contextmanager
def _flower_identity():
    """Flower Message objects need a run identity outside a Flower process."""
    from flwr.supercore.task_identity import TaskIdentity

    saved = {key: getattr(TaskIdentity, key, None) for key in ("_run_id", "_node_id", "_task_id")}
    for key in saved:
        setattr(TaskIdentity, key, 1)
    try:
        yield
    finally:
        for key, value in saved.items():
            setattr(TaskIdentity, key, value)


def reply_bytes(probes: int, epsilon: float = 6.0) -> int:
    """Bytes of one silo's serialized Flower reply to one training request with ``probes`` values
    (the uplink of one round at one local step)."""
    import numpy as np
    from flwr.app import Message, MessageType
    from seedtune.common.privacy.accounting import release_event
    from seedtune.common.protocol import ReleaseParameters, TrainReply, TrainRequest, probe_seeds
    from seedtune.common.wire import Sync, encode_reply, encode_request, serialized_size

    event = release_event(0.05, 1.0)
    with _flower_identity():
        asked = Message(encode_request(TrainRequest("bench", 500, probe_seeds(0, 500, probes), 1e-3,
                                                    ReleaseParameters(3.0, 1.0, 0.05, "discrete")), Sync(500, (), None)),
                        dst_node_id=7, message_type=MessageType.TRAIN, group_id="500")
        reply = TrainReply(500, tuple(np.random.default_rng(0).normal(size=probes)), 170.0, (event,))
        return serialized_size(Message(encode_reply(reply, "silo-0"), reply_to=asked))


def bench_comm(progress: bool = True) -> dict:
    import numpy as np
    from flwr.app import ArrayRecord, Message, MessageType, RecordDict
    from seedtune.common import components
    from seedtune.common.config import load_config
    from seedtune.common.privacy.accounting import release_event
    from seedtune.common.protocol import ReleaseParameters, TrainReply, TrainRequest, probe_seeds
    from seedtune.common.updatelog import StepRecord
    from seedtune.common.wire import Setup, Sync, encode_reply, encode_request, serialized_size

    config = load_config("default", command="simulate")
    data = components.load_data(config)
    task = components.load_model(config, data.label_names)
    mask = components.mask_for(config, task, data)
    setup = Setup("bench", config.to_dict(), components.base_reference(config, task, data.label_names), mask)
    schedule = components.make_schedule(config)
    sigma = components.noise_multiplier(config)
    p = config.privacy
    event = release_event(p.sample_rate, sigma)
    noise = np.random.default_rng()

    def record(step: int, probes: int) -> StepRecord:
        plan = schedule.plan(step % schedule.steps)
        return StepRecord(step, plan.stage, probe_seeds(0, step, probes), tuple(noise.normal(size=probes)),
                          plan.lr, plan.beta, plan.prox, plan.anchor_step)

    def request(step: int, probes: int, missed: int, first: bool = False) -> Message:
        ask = TrainRequest("bench", step, probe_seeds(0, step, probes), 1e-3,
                           ReleaseParameters(p.clip_bound, sigma, p.sample_rate, p.noise))
        sync = Sync(step - missed, tuple(record(s, probes) for s in range(step - missed, step)),
                    setup if first else None)
        return Message(encode_request(ask, sync), dst_node_id=7, message_type=MessageType.TRAIN,
                       group_id=str(step))

    rows = []
    with _flower_identity():
        for probes in _progress(PROBES, progress, "comm"):
            asked = request(500, probes, 1)
            reply = TrainReply(500, tuple(noise.normal(size=probes)), p.sample_rate * 3400, (event,))
            answer = Message(encode_reply(reply, "silo-0"), reply_to=asked)
            down, up = serialized_size(asked), serialized_size(answer)
            first = serialized_size(request(0, probes, 0, first=True))
            every_third = serialized_size(request(501, probes, 3))
            late = serialized_size(request(ROUNDS, probes, min(ROUNDS, config.federation.max_replay), first=True))
            rows.append({
                "probes": probes, "down_bytes": down, "up_bytes": up, "first_contact_bytes": first,
                "total_every_round_bytes": first + (ROUNDS - 1) * down + ROUNDS * up,
                "total_every_third_round_bytes": first + (ROUNDS // 3 - 1) * every_third + (ROUNDS // 3) * up,
                "join_at_the_end_bytes": late,
            })
        state = {name: tensor.detach().clone() for name, tensor in task.module.state_dict().items()}
        model = Message(RecordDict({"arrays": ArrayRecord(state)}), dst_node_id=7,
                        message_type=MessageType.TRAIN, group_id="0")
        fedavg = serialized_size(model)
    return _comm_report(config, task, mask, rows, fedavg)


def _comm_report(config, task, mask: dict, rows: list[dict], fedavg: int) -> dict:
    k16 = next(row for row in rows if row["probes"] == 16)
    return {
        "bench": "comm",
        "setup": {"model": "all-MiniLM-L6-v2", "config": "simulate preset", "trainable": sum(
            task.module.get_parameter(n).numel() if i is None else i.numel() for n, i in mask.items()),
            "rounds": ROUNDS, "max_replay": config.federation.max_replay},
        "rows": rows,
        "fedavg_round_bytes": {"down": fedavg, "up": fedavg, "total_1000_rounds": 2 * ROUNDS * fedavg},
        "targets": [
            _target("uplink bytes per client per round at K=16", k16["up_bytes"], 1024),
            _target("FedAvg uplink / seedtune uplink at K=16", fedavg / k16["up_bytes"], 10_000, at_least=True),
        ],
    }


# -- server --------------------------------------------------------------------------------
def bench_server(rounds: int = ROUNDS, full_rounds: int = 200, progress: bool = True, profile: bool = False) -> dict:
    """Coordinator round time against a client step, and catch-up replay speed, for the default
    preset's trainable set (the head, K=8) over ``rounds`` rounds and for every parameter (K=1,
    DPZero's setting) over ``full_rounds`` (its replay time per round does not depend on how many)."""
    from seedtune.bench.cost import step_masks
    from seedtune.common import components

    work = workload()
    default_mask = components.choose_mask(work.config, work.task, work.batch)
    variants = [("default preset (head)", default_mask, work.config.zo.probes, rounds, False),
                ("every parameter", step_masks(work)["full"], 1, full_rounds, profile)]
    rows = [_server_row(work, *variant) for variant in _progress(variants, progress, "server")]
    model_bytes = sum(p.numel() * p.element_size() for p in work.task.module.parameters())
    download = model_bytes * 8 / LINK_BITS_PER_S
    for row in rows:
        row["replay_s"] = row["rounds"] / row["replay_rounds_per_s"]
        row["replay_1000_s"] = ROUNDS / row["replay_rounds_per_s"]
        row["trainable_download_s"] = row["trainable"] * 4 * 8 / LINK_BITS_PER_S
    default = rows[0]
    return {
        "bench": "server",
        "setup": {"model": "all-MiniLM-L6-v2", "replies_per_round": 3, "model_bytes": model_bytes,
                  "model_download_s_at_100_mbit": download},
        "rows": rows,
        "targets": [
            _target("replay of 1,000 rounds (default preset) / model download at 100 Mbit/s, s/s",
                    default["replay_1000_s"] / download, 1.0),
            _target("replay of 1,000 rounds (every parameter) / model download at 100 Mbit/s, s/s",
                    rows[1]["replay_1000_s"] / download, 1.0),
        ],
    }


def _server_row(work, label: str, mask: dict, probes: int, rounds: int, profile: bool) -> dict:
    import numpy as np
    from seedtune.client.node import _Run
    from seedtune.common import components
    from seedtune.common.config import with_changes
    from seedtune.common.privacy.accounting import release_event
    from seedtune.common.protocol import ReleaseParameters, TrainReply
    from seedtune.common.updatelog import UpdateApplier, UpdateLog
    from seedtune.common.wire import Setup, Sync
    from seedtune.server.coordinator import Coordinator

    config = with_changes(work.config, schedule={"steps": rounds}, zo={"probes": probes})
    parts = components.model_parts(config, work.task, mask)
    noise = np.random.default_rng()
    event = release_event(0.01, 1.0)
    with tempfile.TemporaryDirectory() as scratch:
        log = UpdateLog.create(Path(scratch) / "log.sqlite", config=config.to_dict(),
                               base=components.base_reference(config, work.task, work.label_names),
                               mask=mask, numels={n: p.numel() for n, p in work.task.module.named_parameters()})
        snapshot = parts.trainable.snapshot()
        coordinator = Coordinator(run_id="bench", run_seed=0, probes=config.zo.probes,
                                  schedule=components.make_schedule(config), release=ReleaseParameters(2.0, 1.0, 0.01), log=log,
                                  applier=UpdateApplier(parts.trainable, parts.directions))
        times = []
        while not coordinator.done:
            ask = coordinator.request()
            replies = [TrainReply(ask.step, tuple(noise.normal(size=len(ask.probe_seeds))), 34.0, (event,))
                       for _ in range(3)]
            start = time.perf_counter()
            coordinator.apply(ask, replies)
            times.append(time.perf_counter() - start)
        records = tuple(log.steps())
        setup = Setup("bench", config.to_dict(), log.base, log.mask())
        log.close()
        _restore(parts.trainable, snapshot)  # the silo starts from the same model
        client = _client_step_times(work, mask, config.zo.probes)
        replica = _Run(Path(scratch) / "silo", setup)  # the silo's own model, from the base model
        with _profiler(profile) as profiled:
            start = time.perf_counter()
            replica.catch_up(Sync(0, records))
            replay = time.perf_counter() - start
        replica.log.close()
        one_at_a_time, piecewise = _apply_times(replica, records)
    extra = {"replay_profile": profiled.key_averages().table(sort_by="self_cpu_time_total", row_limit=12)
             } if profile else {}
    return {**extra,"trainable_set": label, "trainable": parts.trainable.dimension, "probes": config.zo.probes,
            "rounds": rounds, "server_round_s": statistics.median(times),
            "client_step_s": statistics.median(client),
            "server_over_client": statistics.median(times) / statistics.median(client),
            "replay_rounds_per_s": rounds / replay,
            "apply_one_at_a_time_rounds_per_s": rounds / min(one_at_a_time),
            "apply_all_rounds_per_s": rounds / min(piecewise)}


def _client_step_times(work, mask: dict, probes: int) -> list[float]:
    """Three timed ZO steps of a silo, after one untimed."""
    client_step = zo_step(work, mask, probes)
    client_step()
    client = []
    for _ in range(3):
        start = time.perf_counter()
        client_step()
        client.append(time.perf_counter() - start)
    return client


def _apply_times(replica, records) -> tuple[list[float], list[float]]:
    """The same steps on the same model applied one at a time, and all at once piece by piece
    (what catch-up does), timed alternately: apply_all's gain, without the log's commit."""
    from seedtune.common.updatelog import UpdateApplier

    one_at_a_time, piecewise = [], []
    for _ in range(2):
        for durations, apply in ((one_at_a_time, _one_at_a_time), (piecewise, _all_at_once)):
            applier = UpdateApplier(replica.parts.trainable, replica.parts.directions)
            start = time.perf_counter()
            apply(applier, records)
            durations.append(time.perf_counter() - start)
    return one_at_a_time, piecewise


def _one_at_a_time(applier, records) -> None:
    for record in records:
        applier.apply(record)


def _all_at_once(applier, records) -> None:
    applier.apply_all(records)


@contextmanager
def _profiler(enabled: bool):
    """torch's profiler around the block when ``enabled``."""
    if not enabled:
        yield None
        return
    from torch.profiler import profile

    with profile() as profiled:
        yield profiled


def _restore(trainable, values) -> None:
    import torch

    with torch.no_grad():
        for entry, value in zip(trainable, values):
            if entry.index is None:
                entry.flat.copy_(value)
            else:
                entry.flat[entry.index] = value


# -- scale ---------------------------------------------------------------------------------
def bench_scale(clients: tuple[int, ...] = SCALE_CLIENTS, rounds: int = 12, progress: bool = True) -> dict:
    rows = [in_fresh_process(simulate_and_measure, n, rounds) for n in _progress(clients, progress, "scale")]
    return {"bench": "scale", "setup": {"preset": "tiny", "rounds": rounds, "cpus": _threads()}, "rows": rows,
            "targets": []}


def simulate_and_measure(clients: int, rounds: int) -> dict:
    """``seedtune simulate --preset tiny`` with ``clients`` silos, in this (fresh) process."""
    import psutil
    from seedtune.common.paths import RunLayout
    from seedtune.jobs.simulate import simulate
    from seedtune.client.node import TIMINGS_FILE
    from seedtune.common.config import load_config

    config = load_config("tiny", overrides=["eval.every=0", f"federation.silos={clients}",
                                            f"schedule.steps={rounds}"], command="simulate")
    peak = {"bytes": 0}
    done = threading.Event()

    def watch() -> None:  # resident memory of this process and everything it started (Ray)
        me = psutil.Process()
        while not done.wait(0.2):
            total = 0
            for process in [me, *me.children(recursive=True)]:
                try:
                    total += process.memory_info().rss
                except psutil.Error:
                    pass
            peak["bytes"] = max(peak["bytes"], total)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    with tempfile.TemporaryDirectory() as scratch:
        run_dir = Path(scratch) / "run"
        start = time.perf_counter()
        simulate(config, run_dir, progress=False)
        wall = time.perf_counter() - start
        done.set()
        watcher.join()
        with sqlite3.connect(RunLayout(run_dir).log) as db:
            stamps = [row[0] for row in db.execute("SELECT created FROM steps ORDER BY step")]
        timings = [json.loads(line) for path in RunLayout(run_dir).silos.glob(f"*/{TIMINGS_FILE}")
                   for line in path.read_text().splitlines()]
    # Round r's duration: from the commit of step r-1 to that of step r (the first round, which
    # also starts the silos, is left out).
    durations = [b - a for a, b in zip(stamps, stamps[1:])]
    later = [t for t in timings if t["step"] >= 1]
    forward = sum(t["forward_s"] for t in later) / max(len(durations), 1)
    silo_total = sum(t["total_s"] for t in later) / max(len(durations), 1)
    round_s = statistics.median(durations) if durations else math.nan
    workers = min(clients, _threads())
    compute = forward / workers  # the silos run on `workers` Ray workers at once
    return {"clients": clients, "rounds": rounds, "wall_s": wall, "round_s": round_s,
            "forward_s_per_round": forward, "silo_busy_s_per_round": silo_total,
            "framework_s_per_round": round_s - compute, "framework_over_compute": (round_s - compute) / compute,
            "peak_tree_mib": peak["bytes"] / 2**20, "peak_mib_per_client": peak["bytes"] / 2**20 / clients}

