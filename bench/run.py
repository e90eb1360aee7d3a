"""``seedtune bench step|memory|comm|server|scale|sweep|noise|robust``: run one, print its figures and targets.

Each bench returns a report: ``setup`` (what was measured, on what), ``rows`` (the figures) and
``targets`` (each claim of ``docs/performance.md`` with its measured value, its limit and
whether it is met). Reports are printed as tables or JSON, and written atomically with ``--out``.
"""

from __future__ import annotations

import json
import platform
import re
import sys
from datetime import datetime
from pathlib import Path

from seedtune.bench.cost import SWEEP_BATCHES, bench_memory, bench_step, bench_sweep
from seedtune.bench.noise import bench_noise
from seedtune.bench.robust import bench_robust
from seedtune.bench.traffic import bench_comm, bench_scale, bench_server

# The columns each bench prints: (heading, key, format).
COLUMNS = {
    "step": [("variant", "variant", "{:<42}"), ("trainable", "trainable", "{:>10}"),
             ("step ms", "step_s", "{:>9.0f}"), ("2 fwd ms", "baseline_s", "{:>9.0f}"),
             ("ratio", "ratio", "{:>7.3f}")],
    "memory": [("method", "method", "{:<11}"), ("step s", "step_s", "{:>8.3f}"),
               ("MiB above model", "peak_above_model_mib", "{:>16.1f}"), ("x inference", "vs_inference", "{:>12.2f}")],
    "sweep": [("method", "method", "{:<11}"), ("batch", "batch", "{:>6}"), ("step s", "step_s", "{:>8.3f}"),
              ("MiB above model", "peak_above_model_mib", "{:>16.1f}")],
    "comm": [("K", "probes", "{:>3}"), ("down B", "down_bytes", "{:>8}"), ("up B", "up_bytes", "{:>6}"),
             ("first contact B", "first_contact_bytes", "{:>16}"),
             ("1000 rounds, every round", "total_every_round_bytes", "{:>25,}"),
             ("every 3rd round", "total_every_third_round_bytes", "{:>16,}"),
             ("join at round 1000", "join_at_the_end_bytes", "{:>19,}")],
    "server": [("trainable set", "trainable_set", "{:<22}"), ("K", "probes", "{:>3}"),
               ("server ms/round", "server_round_s", "{:>16.2f}"), ("client ms/step", "client_step_s", "{:>15.1f}"),
               ("replay rounds/s", "replay_rounds_per_s", "{:>16.1f}"), ("1000 rounds s", "replay_1000_s", "{:>14.2f}"),
               ("apply one by one/s", "apply_one_at_a_time_rounds_per_s", "{:>19.1f}"),
               ("apply_all/s", "apply_all_rounds_per_s", "{:>12.1f}")],
    "scale": [("silos", "clients", "{:>6}"), ("round s", "round_s", "{:>8.3f}"),
              ("forward s", "forward_s_per_round", "{:>10.3f}"), ("framework s", "framework_s_per_round", "{:>12.3f}"),
              ("framework/compute", "framework_over_compute", "{:>18.2f}"),
              ("tree MiB", "peak_tree_mib", "{:>9.0f}"), ("MiB/silo", "peak_mib_per_client", "{:>9.0f}")],
    "noise": [("K", "probes", "{:>3}"), ("discrete ms", "discrete_ms", "{:>12.3f}"),
              ("gaussian ms", "gaussian_ms", "{:>12.3f}"), ("ratio", "ratio", "{:>7.1f}"),
              ("extra noise %", "noise_inflation_pct", "{:>14.3f}")],
    "robust": [("attack", "attack", "{:<10}"), ("rule", "rule", "{:<13}"), ("accuracy", "accuracy", "{:>9.3f}"),
               ("vs honest", "change", "{:>10.3f}"), ("rounds", "rounds", "{:>7}"), ("refused", "refused", "{:>8}")],
}
MILLISECONDS = {("step", "step_s"), ("step", "baseline_s"), ("server", "server_round_s"),
                ("server", "client_step_s")}  # stored in seconds, printed in ms


def run_bench(name: str, *, quick: bool = False, out: Path | None = None, progress: bool = True,
              profile: bool = False, overrides: tuple[str, ...] = ()) -> dict:
    import torch

    from seedtune.bench.cost import _threads

    torch.set_num_threads(_threads())
    if name == "step":
        report = bench_step(repeats=3 if quick else 10, progress=progress)
    elif name == "memory":
        report = bench_memory(progress=progress)
    elif name == "comm":
        report = bench_comm(progress=progress)
    elif name == "server":
        report = bench_server(rounds=100 if quick else 1000, full_rounds=20 if quick else 100, progress=progress,
                              profile=profile)
    elif name == "scale":
        report = bench_scale(rounds=4 if quick else 12, progress=progress)
    elif name == "noise":
        report = bench_noise(repeats=30 if quick else 300, progress=progress)
    elif name == "robust":
        report = bench_robust(quick=quick, progress=progress, overrides=overrides)
    elif name == "sweep":
        out = out or Path("runs") / f"bench-sweep-{datetime.now():%Y%m%d-%H%M%S}"
        report = bench_sweep(out, batches=(1, 4) if quick else SWEEP_BATCHES, progress=progress)
    else:
        raise ValueError(name)
    report["machine"] = {"cpus": _threads(), "processor": platform.processor() or platform.machine(),
                         "python": platform.python_version(), "torch": torch.__version__,
                         "date": datetime.now().isoformat(timespec="seconds")}
    report["quick"] = quick
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        staging = out / f"{name}.json.partial"
        staging.write_text(json.dumps(report, indent=2))
        staging.replace(out / f"{name}.json")
    return report


def print_report(report: dict, file=None) -> None:
    file = file or sys.stdout
    columns = COLUMNS[report["bench"]]
    print(" ".join(_heading(title, fmt) for title, _, fmt in columns), file=file)
    for row in report["rows"]:
        cells = []
        for _, key, fmt in columns:
            value = row[key] * 1e3 if (report["bench"], key) in MILLISECONDS else row[key]
            cells.append(fmt.format(value))
        print(" ".join(cells), file=file)
    if report["bench"] == "comm":
        fedavg = report["fedavg_round_bytes"]
        print(f"FedAvg (full model each way): {fedavg['down']:,} B down and up per round, "
              f"{fedavg['total_1000_rounds']:,} B over 1000 rounds", file=file)
    if report["bench"] == "server":
        setup = report["setup"]
        print(f"model download at 100 Mbit/s: {setup['model_download_s_at_100_mbit']:.2f} s "
              f"({setup['model_bytes']:,} B)", file=file)
    for row in report.get("presets", []):
        print(f"preset {row['preset']} (epsilon {row['epsilon']:g}, q {row['sample_rate']:g}, {row['steps']} steps): "
              f"sigma {row['sigma_gaussian']:.4f} gaussian -> {row['sigma_discrete']:.4f} discrete "
              f"(+{row['sigma_increase_pct']:.2f}%)", file=file)
    if "timing" in report:
        timing = report["timing"]
        print(f"timing of one exact draw at the default preset's sigma ({timing['sigma_lattice_units']:.0f} lattice "
              f"units, {timing['draws']} draws): median {timing['median_us']:.1f} us; rank correlation with |z| "
              f"{timing['spearman_time_vs_magnitude']:.2f}; median by |z|/sigma: " + ", ".join(
                  f"[{band['low']:g}, {band['high']:g}) {band['median_us']:.1f} us" for band in timing["bands"]),
              file=file)
    if report["bench"] == "robust":
        print(f"test accuracy before training: {report['rows'][0]['before']:.3f}", file=file)
        for row in report["rows"]:
            if row["attack"] == "honest":
                print(row["cost"], file=file)
    for row in report["rows"]:
        if "replay_profile" in row:
            print(f"\nwhere replay time goes ({row['trainable_set']}, torch profiler):\n{row['replay_profile']}", file=file)
    for target in report["targets"]:
        relation = ">=" if target["at_least"] else "<="
        print(f"[{'met' if target['met'] else 'NOT met'}] {target['claim']}: {target['value']:.4g} "
              f"(target {relation} {target['limit']:g})", file=file)


def _heading(title: str, fmt: str) -> str:
    """``title`` aligned and padded like the values that ``fmt`` formats."""
    align, width = re.match(r"\{:([<>]?)(\d+)", fmt).groups()
    return f"{title:{align or '>'}{width}}"
