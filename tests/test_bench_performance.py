"""``seedtune bench step|memory|comm|server|scale|sweep``: the measurements measure what they claim."""

from __future__ import annotations

import json

import pytest
import torch

from seedtune.bench import cost as bench_cost
from seedtune.bench.cost import (
    EXACT_MEMORY,
    cost,
    in_fresh_process,
    paired,
    sweep_plot,
    workload,
)
from seedtune.cli.main import main
from seedtune.cli.reports import COLUMNS, print_bench


def test_paired_timing_alternates_and_takes_the_median_ratio(monkeypatch):
    clock = {"now": 0.0}
    order = []
    monkeypatch.setattr(bench_cost.time, "perf_counter", lambda: clock["now"])

    def step():
        order.append("step")
        clock["now"] += 3.0 if len(order) != 6 else 30.0  # one slow outlier

    def baseline():
        order.append("base")
        clock["now"] += 2.0

    figures = paired(step, baseline, repeats=3)
    assert order == ["step", "base"] + ["base", "step"] * 3  # one warm-up each, then alternating
    assert figures["ratio"] == 1.5 and figures["baseline_s"] == 2.0 and figures["step_s"] == 3.0


def _allocate(megabytes: int) -> dict:
    torch.ones(1 << 20).sum()  # torch's own first-use set-up (thread pools) happens before the reset
    bench_cost._reset_high_water()
    before = bench_cost._resident_kib()
    block = torch.ones(megabytes * 2**18)  # float32: megabytes MiB, every page touched
    del block
    return {"peak_mib": (bench_cost._high_water_kib() - before) / 1024,
            "after_mib": (bench_cost._resident_kib() - before) / 1024}


@pytest.mark.slow
def test_the_high_water_mark_catches_a_freed_allocation_and_exact_mode_returns_it():
    seen = in_fresh_process(_allocate, 48, environment=EXACT_MEMORY)
    assert 47 <= seen["peak_mib"] <= 52  # the peak saw it although it was gone when read
    assert seen["after_mib"] < 2  # and the allocator gave it back


@pytest.mark.slow
def test_a_zo_step_holds_one_layer_above_inference_and_dp_sgd_far_more():
    inference, zo = cost("inference", 4), cost("zo", 4)
    largest_layer_mib = 1536 * 384 * 4 / 2**20  # MiniLM's feed-forward matrices
    extra = zo["peak_above_model_mib"] - inference["peak_above_model_mib"]
    assert 0 < extra <= largest_layer_mib + 1.5, (inference, zo)  # + the generator's small buffers
    dp_sgd = in_fresh_process(bench_cost.measure_cost, "dp-sgd", 4, 64, 1, environment=EXACT_MEMORY)
    # Per-example gradients of every tensor (position embeddings too: explicit position ids)
    assert dp_sgd["peak_above_model_mib"] > 4 * dp_sgd["model_mib"]


def test_comm_measures_real_messages_and_meets_its_claims(capsys):
    assert main(["bench", "comm", "--no-progress", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    rows = {row["probes"]: row for row in report["rows"]}
    assert set(rows) == {1, 4, 16}
    # 15 more float64 scalars in a reply: at least 8 bytes each, and nothing else grows
    assert 15 * 8 <= rows[16]["up_bytes"] - rows[1]["up_bytes"] <= 15 * 12
    for row in rows.values():
        assert row["total_every_round_bytes"] == row["first_contact_bytes"] + 999 * row["down_bytes"] + 1000 * row["up_bytes"]
        assert row["first_contact_bytes"] > row["down_bytes"]  # the setup travels once
    assert report["fedavg_round_bytes"]["up"] > 22_000_000 * 4  # MiniLM's float32 weights
    assert all(target["met"] for target in report["targets"]), report["targets"]


@pytest.mark.slow
def test_server_replays_through_the_silos_own_catch_up(tmp_path, capsys):
    assert main(["bench", "server", "--quick", "--no-progress", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "server.json").read_text())
    head, full = report["rows"]
    assert head["trainable"] == 770 and full["trainable"] > 22_000_000
    assert head["replay_rounds_per_s"] > full["replay_rounds_per_s"] > 0
    assert 0 < head["server_round_s"] < head["client_step_s"]  # the coordinator is not the bottleneck
    assert report["targets"][0]["met"]  # the default preset replays 1,000 rounds faster than a download
    assert "model download at 100 Mbit/s" in capsys.readouterr().out


@pytest.mark.slow
def test_noise_prices_the_discrete_gaussian_in_time_noise_and_sigma(tmp_path, capsys):
    assert main(["bench", "noise", "--quick", "--no-progress", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "noise.json").read_text())
    rows = {row["probes"]: row for row in report["rows"]}
    assert set(rows) == {1, 4, 8, 16}
    for probes, row in rows.items():
        assert row["discrete_ms"] > 0 and row["gaussian_ms"] > 0
        assert 0 < row["noise_inflation_pct"] <= 100 * (probes**0.5 + 2) / 2**12
    assert rows[16]["noise_inflation_pct"] > rows[1]["noise_inflation_pct"]
    for preset in report["presets"]:  # integer orders only: never less noise for the same budget
        assert preset["sigma_discrete"] >= preset["sigma_gaussian"]
    assert "gaussian ->" in capsys.readouterr().out


@pytest.mark.slow
def test_scale_reads_every_silos_own_timings():
    from seedtune.bench.traffic import bench_scale

    (row,) = bench_scale(clients=(2,), rounds=3, progress=False)["rows"]
    assert row["clients"] == 2 and row["round_s"] > 0
    assert 0 < row["forward_s_per_round"] < row["silo_busy_s_per_round"]
    assert row["peak_mib_per_client"] * 2 == pytest.approx(row["peak_tree_mib"])


def test_explicit_position_ids_change_nothing_but_make_the_lookup_per_example():
    work = workload(batch_size=2, length=16)
    positions = torch.arange(16).expand(2, 16)
    with torch.no_grad():
        plain = work.task.logits(work.task.module, work.batch)
        explicit = work.task.logits(work.task.module, {**work.batch, "position_ids": positions})
    assert torch.equal(plain, explicit)


def test_every_sequence_of_the_workload_is_real_text_of_full_length():
    work = workload(batch_size=3, length=64)
    assert work.batch["input_ids"].shape == (3, 64) and bool(work.batch["attention_mask"].all())


def test_reports_print_for_every_bench_and_the_sweep_plots(tmp_path):
    rows = {
        "step": {"variant": "v", "trainable": 1, "step_s": 0.3, "baseline_s": 0.2, "ratio": 1.5},
        "memory": {"method": "zo", "step_s": 0.3, "peak_above_model_mib": 20.0, "vs_inference": 1.2},
        "sweep": {"method": "zo", "batch": 4, "step_s": 0.3, "peak_above_model_mib": 20.0},
        "comm": {"probes": 1, "down_bytes": 1, "up_bytes": 1, "first_contact_bytes": 1, "total_every_round_bytes": 1,
                 "total_every_third_round_bytes": 1, "join_at_the_end_bytes": 1},
        "server": {"trainable_set": "head", "probes": 8, "server_round_s": 0.001, "client_step_s": 0.1,
                   "replay_rounds_per_s": 900.0, "replay_1000_s": 1.1, "apply_one_at_a_time_rounds_per_s": 1.0,
                   "apply_all_rounds_per_s": 1.0},
        "scale": {"clients": 2, "round_s": 0.2, "forward_s_per_round": 0.1, "framework_s_per_round": 0.1,
                  "framework_over_compute": 1.0, "peak_tree_mib": 10.0, "peak_mib_per_client": 5.0},
        "noise": {"probes": 4, "discrete_ms": 0.2, "gaussian_ms": 0.01, "ratio": 20.0, "noise_inflation_pct": 0.07},
        "robust": {"attack": "honest", "rule": "mean", "accuracy": 0.9, "change": 0.0, "rounds": 40, "refused": 0,
                   "before": 0.55, "cost": "aggregation=mean: ..."},
        "deploy": {"case": "default", "silos": 3, "rounds": 12, "simulated_s": 1.0, "deployed_s": 4.3, "ratio": 4.3,
                   "engine_s": 0.9, "way_back_s": 0.9, "way_out_s": 2.0},
        "deploy-job": {"case": "default job, tau 6", "silos": 3, "steps": 600, "rounds": 100, "wall_min": 14.7,
                       "test_before": 0.625, "test_after": 0.72, "epsilon": 6.0},
        "secure": {"epsilon": 6.0, "silos": 3, "mode": "secure", "multiplier": 0.94, "summed_noise": 1.62,
                   "validation_accuracy": 0.75, "smallest": 0.74, "bytes_up": 1268, "bytes_down": 4304, "seconds": 0.46,
                   "mask_ms": 0.09, "unmask_ms": 0.01, "first_round_bytes": 7541},
    }
    assert set(rows) == set(COLUMNS)
    for name, row in rows.items():
        report = {"bench": name, "rows": [row], "targets": [{"claim": "c", "value": 1.0, "limit": 2.0,
                                                              "at_least": False, "met": True}],
                  "fedavg_round_bytes": {"down": 1, "total_1000_rounds": 1},
                  "setup": {"model_download_s_at_100_mbit": 1.0, "model_bytes": 1, "clientapp_import_s": 1.0},
                  "ratio": 4.3,
                  "falls": [{"epsilon": 6.0, "silos": 3, "per_silo_below_one_silo": 0.01, "secure_below_one_silo": 0.0}]}
        print_bench(report)
    summary = {"setup": {"length": 64}, "rows": [
        {"method": method, "batch": batch, "step_s": 0.1 * batch, "peak_above_model_mib": 5.0 * batch}
        for method in bench_cost.COST_METHODS for batch in (1, 4)]}
    sweep_plot(summary, tmp_path / "sweep.png")
    assert (tmp_path / "sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
