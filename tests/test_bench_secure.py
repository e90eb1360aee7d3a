"""``seedtune bench secure``: accuracy, noise, bytes and seconds with and without secure aggregation."""

from __future__ import annotations

import json
import math

import pytest

from seedtune.bench.secure import bench_secure, masking_seconds
from seedtune.cli.main import main

HEAD = ("prune.enabled=true", "prune.ratio=0.0", 'prune.always=["classifier.*"]')
QUICK = (*HEAD, "schedule.steps=30")


@pytest.fixture(scope="module")
def report():
    return bench_secure(quick=True, progress=False, overrides=QUICK, preset="tiny", silos=(2, 4))


def test_every_mode_is_measured_for_every_federation_and_the_noise_is_where_it_should_be(report):
    rows = {(row["silos"], row["mode"]): row for row in report["rows"]}
    assert set(rows) == {(2, "per-silo"), (2, "secure"), (4, "per-silo"), (4, "secure"), (1, "one-silo")}
    one = rows[(1, "one-silo")]
    for silos in (2, 4):
        per_silo, secure = rows[(silos, "per-silo")], rows[(silos, "secure")]
        assert per_silo["multiplier"] == pytest.approx(one["multiplier"])  # each silo noises at the full sigma
        assert per_silo["summed_noise"] == pytest.approx(math.sqrt(silos) * one["multiplier"])  # grows as sqrt N
        assert secure["multiplier"] < one["multiplier"]  # a share
        assert secure["summed_noise"] < per_silo["summed_noise"]
        assert 0 <= secure["validation_accuracy"] <= 1 and secure["mask_ms"] > 0 and secure["unmask_ms"] > 0
        assert secure["bytes_up"] > per_silo["bytes_up"]  # 8 bytes a probe, and the collusion event
    # the sum of t shares carries (about) the same noise whatever t: it is calibrated for the same epsilon
    assert rows[(2, "secure")]["summed_noise"] == pytest.approx(rows[(4, "secure")]["summed_noise"], rel=0.05)
    (target,) = report["targets"]
    assert "4 silos" in target["claim"] and target["met"] == (target["value"] <= 1.0)
    assert {fall["silos"] for fall in report["falls"]} == {2, 4}


def test_masking_costs_grow_with_the_number_of_peers():
    assert masking_seconds(8, 64, repeats=5)["mask_ms"] > masking_seconds(2, 64, repeats=5)["mask_ms"]


def test_the_command_prints_the_table_the_falls_and_the_target(monkeypatch, capsys, tmp_path, report):
    import seedtune.bench.run as run

    monkeypatch.setattr(run, "bench_secure", lambda **kwargs: dict(report))
    assert main(["bench", "secure", "--quick", "--preset", "tiny", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "sum's noise /C" in out and "per-silo noise ends" in out and "secure aggregation" in out
    assert json.loads((tmp_path / "secure.json").read_text())["bench"] == "secure"
