"""``seedtune bench deploy``: seconds per round from the update log, and where a deployed round goes."""

from __future__ import annotations

import json
import sqlite3

import pytest

from seedtune.bench import deploy
from seedtune.bench.deploy import Case, _round_parts, round_seconds


def _log(path, created: list[float]):
    with sqlite3.connect(path) as db:
        db.execute("CREATE TABLE steps (step INTEGER PRIMARY KEY, created REAL NOT NULL)")
        db.executemany("INSERT INTO steps VALUES (?, ?)", enumerate(created))
    return path


def test_a_round_is_the_time_between_commits_and_local_steps_commit_together(tmp_path):
    median, commits = round_seconds(_log(tmp_path / "a.sqlite", [10.0, 11.0, 13.0, 14.0, 20.0]), 1)
    assert median == 1.5 and commits == {0: 10.0, 1: 11.0, 2: 13.0, 3: 14.0, 4: 20.0}  # 1, 2, 1, 6
    tau = [10.0, 10.0, 10.0, 14.0, 14.0, 14.0, 19.0, 19.0, 19.0]  # three rounds of three steps
    median, commits = round_seconds(_log(tmp_path / "b.sqlite", tau), 3)
    assert commits == {0: 10.0, 3: 14.0, 6: 19.0} and median == 4.5


def _messages(path, rounds: list[tuple[int, float, float]]):
    lines = []
    for step, into, out in rounds:
        lines.append({"time": into, "direction": "in", "type": "train",
                      "records": {"request": {"kind": "config", "values": {"step": step}}}})
        lines.append({"time": out, "direction": "out", "type": "train", "records": {}})
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


def test_a_deployed_round_splits_into_engine_way_back_and_way_out(tmp_path):
    commits = {0: 5.0, 1: 10.0, 2: 15.0, 3: 20.0}
    silo_a = _messages(tmp_path / "a.jsonl", [(0, 1.0, 4.0), (1, 7.0, 9.0), (2, 12.0, 14.0), (3, 17.0, 19.0)])
    silo_b = _messages(tmp_path / "b.jsonl", [(0, 1.5, 4.5), (1, 7.5, 9.5), (2, 12.5, 14.5), (3, 17.5, 19.5)])
    parts = _round_parts([silo_a, silo_b], commits)
    # the first round is left out; from the second: engine 2 s, the last reply 0.5 s before the
    # commit, the next message 2 s after it in the first ClientApp to get it
    assert parts == {"engine_s": 2.0, "way_back_s": 0.5, "way_out_s": 2.0}


def test_the_report_names_its_ratio_and_every_case_against_its_limit(monkeypatch):
    simulated = {"tiny": 0.5, "default": 2.0, "tau": 10.0}
    deployed = {"tiny": 2.5, "default": 3.0, "tau": 12.0}
    monkeypatch.setattr(deploy, "cases", lambda quick: [Case(name, "tiny", 1, 3) for name in simulated])
    monkeypatch.setattr(deploy, "in_fresh_process", lambda fn, case: {"round_s": simulated[case.name]})
    monkeypatch.setattr(deploy, "deploy_rounds", lambda case: {"round_s": deployed[case.name], "silos": 3,
                                                               "engine_s": 1.0, "way_back_s": 0.1, "way_out_s": 1.0})
    monkeypatch.setattr(deploy, "clientapp_import_s", lambda: 0.9)
    report = deploy.bench_deploy(progress=False, overrides=("data.synthetic_size=500",))
    assert report["ratio"] == 1.5  # the default preset's case, whatever its place
    assert [row["ratio"] for row in report["rows"]] == [5.0, 1.5, 1.2]
    assert [target["met"] for target in report["targets"]] == [False, False, True]


def test_every_case_carries_the_overrides_and_its_own_settings_win():
    case = Case("default, tau 6", "default", 6, 3, extra=("federation.local_steps=2", "data.max_train_examples=99"))
    config = deploy._config(case)
    assert config.federation.local_steps == 6 and config.schedule.steps == 18 and config.eval.every == 0
    assert config.data.max_train_examples == 99


@pytest.mark.processes
def test_a_deployed_tiny_case_runs_for_real_and_every_silo_answers_every_round(monkeypatch):
    """The loopback deployment the bench measures: three engines and SuperNodes, every round timed
    and taken apart, each silo charged once per round."""
    releases = []
    real = deploy.round_seconds

    def counting(log_path, local_steps):  # while the deployment's files are still there
        for ledger in sorted(log_path.parent.parent.glob("silo-*/ledger.sqlite")):
            with sqlite3.connect(ledger) as db:
                releases.append(db.execute("SELECT COUNT(*) FROM releases").fetchone()[0])
        return real(log_path, local_steps)

    monkeypatch.setattr(deploy, "round_seconds", counting)
    row = deploy.deploy_rounds(Case("tiny", "tiny", 1, 4))
    assert row["silos"] == 3 and releases == [4, 4, 4]
    assert row["round_s"] > 0 and all(row[key] >= 0 for key in ("engine_s", "way_back_s", "way_out_s"))
    assert row["engine_s"] < row["round_s"]
