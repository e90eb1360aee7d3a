"""``seedtune bench secure``: federated accuracy against the number of silos, with and without
secure aggregation, at equal epsilon per silo and equal total data.

For N = 3 and N = 10 IID silos sharing the same training set, and each epsilon:

* **per-silo** noise (seedtune without secure aggregation): each silo noises its own sum at sigma,
  so the aggregate carries sqrt(N) sigma C;
* **secure** aggregation with distributed noise: each silo adds a share, calibrated so that the
  sum of t = N honest shares spends the silo's epsilon, and only the sum is seen;
* **one silo** holding all the data (the trusted-curator baseline; it does not depend on N).

Accuracy comes from the head-only replay of :mod:`seedtune.bench.recipe` (the private federated
run replayed on the frozen encoder's embeddings, seconds a run; validation split only, never the
test split). Bytes and seconds per round come from real rounds: real silo nodes answering a real
coordinator in one process, every message through the wire encoding, on the tiny model's head at
the same K, silos answering one after another (so the seconds are the protocol's and the model's
tail, without Flower's transport, which is the same for both).
"""

from __future__ import annotations

import math
import statistics
import tempfile
import time
from pathlib import Path

from seedtune.bench.recipe import features, replay, share_multiplier
from seedtune.common.config import load_config, with_changes

SILOS = (3, 10)
HEAD_ONLY = ("prune.enabled=true", "prune.ratio=0.0", 'prune.always=["classifier.*"]')  # as the default trains


def bench_secure(*, quick: bool = False, progress: bool = True, overrides: tuple[str, ...] = (),
                 preset: str = "default", silos: tuple[int, ...] = SILOS) -> dict:
    from tqdm.auto import tqdm

    base = load_config(preset, None, list(overrides), command="simulate")
    epsilons = (base.privacy.epsilon,) if quick else tuple(sorted({base.privacy.epsilon, 2.0}, reverse=True))
    seeds = 1 if quick else 3
    data = features(base)
    counts = silos
    plan = [(epsilon, n, mode) for epsilon in epsilons for n in counts for mode in ("per-silo", "secure")]
    plan += [(epsilon, 1, "one-silo") for epsilon in epsilons]
    rows = []
    for epsilon, n, mode in tqdm(plan, disable=not progress, unit="run", desc="bench secure"):
        config = with_changes(base, privacy={"epsilon": epsilon}, federation={"silos": n})
        accuracies = [replay(config, data, seed, mode)[0] for seed in range(seeds)]
        rows.append({"epsilon": epsilon, "silos": n, "mode": mode, "validation_accuracy": statistics.fmean(accuracies),
                     "smallest": min(accuracies), "each": accuracies, **_noise(config, mode)})
    costs = {(row["silos"], row["mode"]): row for row in round_costs(base, rounds=4 if quick else 8, silos=counts)}
    for row in rows:
        row.update({key: costs[(row["silos"], row["mode"])][key]
                    for key in ("bytes_up", "bytes_down", "seconds", "first_round_bytes")})
        row.update(masking_seconds(row["silos"], base.zo.probes) if row["mode"] == "secure"
                   else {"mask_ms": 0.0, "unmask_ms": 0.0})
    by = {(row["epsilon"], row["silos"], row["mode"]): row["validation_accuracy"] for row in rows}
    targets, falls = [], []
    most = max(counts)
    for epsilon in epsilons:
        central = by[(epsilon, 1, "one-silo")]
        targets.append({"claim": f"secure aggregation, {most} silos, epsilon {epsilon:g}: points below one silo "
                                 "holding all the data", "value": 100 * (central - by[(epsilon, most, "secure")]),
                        "limit": 1.0, "at_least": False,
                        "met": central - by[(epsilon, most, "secure")] <= 0.01})
        falls += [{"epsilon": epsilon, "silos": n, "per_silo_below_one_silo": central - by[(epsilon, n, "per-silo")],
                   "secure_below_one_silo": central - by[(epsilon, n, "secure")]} for n in counts]
    return {"bench": "secure", "rows": rows, "falls": falls, "targets": targets,
            "setup": {"preset": preset, "overrides": list(overrides), "seeds": seeds, "steps": base.schedule.steps,
                      "probes": base.zo.probes, "sample_rate": base.privacy.sample_rate,
                      "what": "validation accuracy of the head-only replay (bench recipe) per noise mode; bytes and "
                              "seconds per round from real in-process rounds on the tiny model at the same K"}}


def _noise(config, mode: str) -> dict:
    """The multiplier each silo noises with, and the aggregate sum's noise in units of C."""
    from seedtune.common import components

    if mode == "secure":
        secure = with_changes(config, federation={"secure_aggregation": True})
        share = share_multiplier(secure)
        return {"multiplier": share, "summed_noise": share * math.sqrt(secure.federation.honest)}
    sigma = components.noise_multiplier(config)
    silos = 1 if mode == "one-silo" else config.federation.silos
    return {"multiplier": sigma, "summed_noise": sigma * math.sqrt(silos)}


def round_costs(base, *, rounds: int, silos: tuple[int, ...] = SILOS) -> list[dict]:
    """Bytes (per silo, each way) and seconds per round of real rounds after the first, and the
    first round's bytes per silo (it also carries the run's setup and, under secure aggregation,
    the exchange of masking keys)."""
    from seedtune.client.app import handle_keys, handle_train
    from seedtune.client.node import SiloNode
    from seedtune.client.secure import SecureSettings
    from seedtune.common import components
    from seedtune.server.federation import DirectTransport, Federation
    from seedtune.server.runs import open_run

    results = []
    counts = silos
    for silos, mode in [(n, mode) for n in counts for mode in ("per-silo", "secure")] + [(1, "one-silo")]:
        config = load_config("tiny", None, [*HEAD_ONLY, f"zo.probes={base.zo.probes}", "eval.every=0",
                                            "eval.max_examples=50",
                                            f"schedule.steps={rounds}", f"federation.silos={silos}",
                                            f"federation.secure_aggregation={'true' if mode == 'secure' else 'false'}"],
                             command="simulate")
        with tempfile.TemporaryDirectory() as scratch:
            scratch = Path(scratch)
            run = open_run(config, scratch / "run", resume=False)
            nodes = {k: SiloNode(scratch / f"silo{k}",
                                 lambda c, names, split="train", k=k: components.silo_shard(c, split, k, silos),
                                 partition=k, secure=SecureSettings(honest=silos)) for k in range(silos)}
            transport = DirectTransport({k: (lambda m, n=n: handle_train(m, n)) for k, n in nodes.items()},
                                        keys={k: (lambda m, n=n: handle_keys(m, n)) for k, n in nodes.items()})
            federation = Federation(run, transport, progress=False)
            seconds = []
            while not run.coordinator.done:
                start = time.perf_counter()
                federation.play_round()
                seconds.append(time.perf_counter() - start)
            traffic = federation.store.traffic_rows()  # (round, attempt, silo, down, up)
            later = [row for row in traffic if row[0] > 0]
            first = [row for row in traffic if row[0] == 0]
            results.append({"silos": silos, "mode": mode, "seconds": statistics.median(seconds[1:]),
                            "bytes_up": sum(row[4] for row in later) / len(later),
                            "bytes_down": sum(row[3] for row in later) / len(later),
                            "first_round_bytes": sum(row[3] + row[4] for row in first) / silos})
            for node in nodes.values():
                node.close()
            run.close()
            federation.store.close()
    return results


def masking_seconds(silos: int, probes: int, repeats: int = 20) -> dict:
    """What secure aggregation adds to a round, alone: one silo masking its K integers with every
    peer (key agreement, key derivation, ChaCha20), and the coordinator unmasking the N replies
    (median of ``repeats``, milliseconds)."""
    import numpy as np

    from seedtune.common.secagg import MaskingKey, mask, sum_bits, unmask_sum

    keys = {f"silo-{i}": MaskingKey() for i in range(silos)}
    publics = {name: key.public_bytes for name, key in keys.items()}
    bits = sum_bits([10_000] * silos, 8192, 1e5)
    release = np.arange(probes, dtype=np.int64)
    masking, unmasking = [], []
    for attempt in range(repeats):
        context = f"bench/{attempt}".encode()
        start = time.perf_counter()
        replies = {name: mask(release, own=name, key=key, context=context, bits=bits,
                              peers={other: public for other, public in publics.items() if other != name})
                   for name, key in keys.items()}
        masking.append((time.perf_counter() - start) / silos)
        start = time.perf_counter()
        unmask_sum(replies, set(replies), bits)
        unmasking.append(time.perf_counter() - start)
    return {"mask_ms": 1e3 * statistics.median(masking), "unmask_ms": 1e3 * statistics.median(unmasking)}
