"""``seedtune bench step|memory|comm|server|scale|sweep|noise|robust|deploy|secure``: run one, print its figures and targets.

Each bench returns a report: ``setup`` (what was measured, on what), ``rows`` (the figures) and
``targets`` (each claim of ``docs/performance.md`` with its measured value, its limit and
whether it is met). Reports are written atomically with ``--out``; the command prints them
(:func:`seedtune.cli.reports.print_bench`).
"""

from __future__ import annotations

import json
import platform
from datetime import datetime
from pathlib import Path

from seedtune.bench.cost import SWEEP_BATCHES, bench_memory, bench_step, bench_sweep
from seedtune.bench.deploy import bench_deploy, bench_deploy_job
from seedtune.bench.noise import bench_noise
from seedtune.bench.robust import bench_robust
from seedtune.bench.secure import bench_secure
from seedtune.bench.traffic import bench_comm, bench_scale, bench_server

def run_bench(name: str, *, quick: bool = False, out: Path | None = None, progress: bool = True,
              profile: bool = False, overrides: tuple[str, ...] = (), preset: str = "default") -> dict:
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
    elif name == "deploy":
        report = bench_deploy(quick=quick, progress=progress, overrides=overrides)
    elif name == "secure":
        report = bench_secure(quick=quick, progress=progress, overrides=overrides, preset=preset)
    elif name == "deploy-job":
        report = bench_deploy_job(overrides=overrides)  # no progress bar: the run is another process's
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
