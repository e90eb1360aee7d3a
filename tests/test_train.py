"""Training runs: determinism where promised, fresh noise where required, crash and resume."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from seedtune.jobs.export import export
from seedtune.jobs.train import NonPrivateRunWarning, train
from seedtune.common.config import load_config
from seedtune.common.errors import RunDirError
from seedtune.common.privacy.ledger import PrivacyLedger
from seedtune.common.updatelog import UpdateApplier, UpdateLog

SHORT = ["schedule.steps=12", "schedule.stages=2", "eval.every=0", "data.synthetic_size=200", "prune.enabled=true",
         "prune.ratio=0.2"]


def _config(*extra):
    return load_config("tiny", overrides=[*SHORT, *extra])


def _weights(run_dir):
    return load_file(run_dir / "final" / "model.safetensors")


def _same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_without_noise_two_runs_are_identical(tmp_path):
    for name in ("a", "b"):
        with pytest.warns(NonPrivateRunWarning, match="no differential-privacy guarantee"):
            train(_config("privacy.enabled=false"), tmp_path / name, progress=False)
    assert _same(_weights(tmp_path / "a"), _weights(tmp_path / "b"))
    assert not (tmp_path / "a" / "ledger.sqlite").exists()  # nothing private was released


@pytest.mark.slow
def test_with_noise_identical_seeds_release_different_values(tmp_path):
    for name in ("a", "b"):
        train(_config(), tmp_path / name, progress=False)
    logs = [list(UpdateLog.open(tmp_path / name / "log.sqlite").steps()) for name in ("a", "b")]
    assert [r.probe_seeds for r in logs[0]] == [r.probe_seeds for r in logs[1]]  # public: the same
    assert all(a.projected_grads != b.projected_grads for a, b in zip(*logs))  # secret noise: never
    assert not _same(_weights(tmp_path / "a"), _weights(tmp_path / "b"))


@pytest.mark.slow
def test_a_run_interrupted_anywhere_resumes_to_its_log_and_counts_every_release(tmp_path, monkeypatch):
    run_dir = tmp_path / "run"
    real_extend = UpdateLog.extend  # the coordinator commits a round's steps with one extend

    def crash_before_logging_step_7(self, records):
        if any(record.step == 7 for record in records):
            raise KeyboardInterrupt  # after the release of step 7, before its log row
        real_extend(self, records)

    monkeypatch.setattr(UpdateLog, "extend", crash_before_logging_step_7)
    with pytest.raises(RunDirError, match="interrupted at step 7.*--resume"):
        train(_config(), run_dir, progress=False)
    monkeypatch.setattr(UpdateLog, "extend", real_extend)
    with PrivacyLedger(run_dir / "ledger.sqlite", epsilon=8.0, delta=1e-5) as ledger:
        assert ledger.releases == 8  # rounds 0..7 were released, and all are on record

    real_apply = UpdateApplier.apply

    def crash_after_logging_step_10(self, record):
        if record.step == 10:
            raise KeyboardInterrupt  # in the log, not yet in the model
        real_apply(self, record)

    monkeypatch.setattr(UpdateApplier, "apply", crash_after_logging_step_10)
    with pytest.raises(RunDirError, match="interrupted at step 10"):
        train(_config(), run_dir, resume=True, progress=False)
    monkeypatch.setattr(UpdateApplier, "apply", real_apply)

    result = train(_config(), run_dir, resume=True, progress=False)
    assert result.steps == 12
    with PrivacyLedger(run_dir / "ledger.sqlite", epsilon=8.0, delta=1e-5) as ledger:
        assert ledger.releases == 12  # round 7's release was reused, not charged twice
        assert ledger.spent() <= 8.0
    export(run_dir, tmp_path / "exported", progress=False)
    assert _same(_weights(run_dir), load_file(tmp_path / "exported" / "model.safetensors"))


@pytest.mark.slow
def test_a_release_lost_before_its_values_were_kept_is_charged_and_the_run_ends_within_budget(tmp_path, monkeypatch):
    run_dir = tmp_path / "run"
    real_attach = PrivacyLedger.attach

    def crash_while_releasing_round_5(self, release_id, values):
        if self.releases == 6:
            raise KeyboardInterrupt  # round 5 is charged, its values never left
        real_attach(self, release_id, values)

    monkeypatch.setattr(PrivacyLedger, "attach", crash_while_releasing_round_5)
    with pytest.raises(RunDirError, match="interrupted at step 5"):
        train(_config(), run_dir, progress=False)
    monkeypatch.setattr(PrivacyLedger, "attach", real_attach)
    with pytest.warns(UserWarning, match="stopped after 11 of 12 steps"):
        result = train(_config(), run_dir, resume=True, progress=False)
    assert result.steps == 11 and (run_dir / "final" / "model.safetensors").exists()
    with PrivacyLedger(run_dir / "ledger.sqlite", epsilon=8.0, delta=1e-5) as ledger:
        assert ledger.releases == 12  # round 5 twice: the lost release still counts
        assert ledger.spent() <= 8.0


def test_a_finished_run_holds_exactly_the_files_its_layout_names(tmp_path):
    from seedtune.common.paths import RunLayout

    run_dir = tmp_path / "run"
    train(_config("schedule.steps=2", "schedule.stages=1"), run_dir, progress=False)
    layout = RunLayout(run_dir)
    named = {layout.log, layout.ledger, layout.final, layout.metrics, layout.training_plot, layout.lock}
    sqlite_sidecars = ("-wal", "-shm", "-journal")
    assert {path for path in run_dir.iterdir() if not path.name.endswith(sqlite_sidecars)} == named
    assert not list(run_dir.glob(".*.partial"))  # every file went through its staging name and was renamed
