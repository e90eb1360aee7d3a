"""Invariants of the privacy path: sampling, clipping, secret noise, events, ledger, accounting."""

from __future__ import annotations

import math
import os
import random

import dp_accounting
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from seedtune.common.errors import BudgetExhausted
from seedtune.common.privacy import events as codec
from seedtune.common.privacy.accounting import (
    calibrate_noise_multiplier,
    epsilon_for,
    epsilon_of,
    release_event,
)
from seedtune.common.privacy.ledger import PrivacyLedger
from seedtune.common.privacy.mechanism import LedgerKey, clip_per_example, private_release
from seedtune.common.privacy.randomness import InsecureRandomnessWarning, SecretRandomness, SeededRandomness
from seedtune.common.privacy.sampling import poisson_sample
from seedtune.common.protocol import ReleaseParameters


# -- sampling ----------------------------------------------------------------------------------
def test_poisson_sampling_includes_each_example_independently_at_rate_q():
    randomness = SecretRandomness()
    sizes = [len(poisson_sample(2000, 0.05, randomness)) for _ in range(200)]
    assert abs(np.mean(sizes) - 100) < 3  # E = q n
    assert 7 < np.std(sizes) < 13  # sd = sqrt(n q (1 - q)) ~ 9.7: the batch size varies
    hits = np.zeros(2000)
    for _ in range(200):
        hits[poisson_sample(2000, 0.05, randomness)] += 1
    assert abs(hits.mean() / 200 - 0.05) < 0.003
    assert list(poisson_sample(5, 1.0, randomness)) == [0, 1, 2, 3, 4]


# -- clipping ----------------------------------------------------------------------------------
def test_clipping_bounds_each_examples_vector_and_keeps_small_ones():
    differences = torch.tensor([[3.0, 4.0], [0.3, 0.4], [0.0, 0.0], [-60.0, 80.0]], dtype=torch.float64)
    clipped = clip_per_example(differences, 1.0)
    assert torch.all(torch.linalg.vector_norm(clipped, dim=1) <= 1.0 + 1e-12)
    assert torch.equal(clipped[1], differences[1]) and torch.equal(clipped[2], differences[2])
    assert torch.allclose(clipped[0], torch.tensor([0.6, 0.8], dtype=torch.float64))  # direction kept


@given(st.lists(st.lists(st.floats(-1e6, 1e6), min_size=3, max_size=3), min_size=1, max_size=20),
       st.floats(1e-3, 1e3))
@settings(max_examples=60, deadline=None)
def test_adding_or_removing_one_example_moves_the_sum_by_at_most_c(rows, clip_bound):
    differences = torch.tensor(rows, dtype=torch.float64)
    clipped = clip_per_example(differences, clip_bound)
    with_all = clipped.sum(dim=0)
    without_last = clip_per_example(differences[:-1], clip_bound).sum(dim=0)
    assert torch.linalg.vector_norm(with_all - without_last) <= clip_bound * (1 + 1e-9)


# -- noise -------------------------------------------------------------------------------------
def _release(ledger, randomness, differences=None, noise="discrete"):
    differences = torch.ones(10, 3, dtype=torch.float64) if differences is None else differences
    return private_release(differences, ReleaseParameters(1.0, 1.0, 0.1, noise), population=100,
                           randomness=randomness, ledger=ledger, key=LedgerKey(0)).values


def test_identical_runs_release_different_noise(tmp_path):
    ledger = PrivacyLedger(tmp_path / "l.sqlite", epsilon=1e6, delta=1e-5)
    draws = []
    for _ in range(2):  # the same inputs and every public RNG re-seeded with the run's seed
        torch.manual_seed(0), np.random.seed(0), random.seed(0)
        draws.append(_release(ledger, SecretRandomness()))
    assert not np.array_equal(draws[0], draws[1])


@pytest.mark.parametrize("noise", ["discrete", "gaussian"])
def test_noise_comes_from_the_os_csprng_and_not_from_any_public_seed(tmp_path, monkeypatch, noise):
    ledger = PrivacyLedger(tmp_path / "l.sqlite", epsilon=1e6, delta=1e-5)
    seeds = [0, 1, 1000, 653885050075807403]  # run seed, split seed, probe seeds

    def replay_urandom():  # a fixed stream of "OS" bytes, restarted for each release
        stream = np.random.default_rng(987654321)
        monkeypatch.setattr(os, "urandom", lambda n: stream.bytes(n))

    replay_urandom()
    first = _release(ledger, SecretRandomness(), noise=noise)
    torch.manual_seed(123), np.random.seed(123), random.seed(123)
    replay_urandom()
    assert np.array_equal(first, _release(ledger, SecretRandomness(), noise=noise))  # fixed urandom => fixed noise
    noise = first * 10 - 10 * 1.0  # undo the normalisation: (sum + noise) / (q n), sum = 10 per coordinate
    for seed in seeds:  # no generator keyed by a public value reproduces it
        for candidate in (np.random.default_rng(seed).standard_normal(3),
                          np.random.RandomState(seed % 2**32).standard_normal(3),
                          torch.randn(3, generator=torch.Generator().manual_seed(seed)).double().numpy()):
            assert not np.allclose(candidate, noise)


@pytest.mark.slow
def test_a_fixed_noise_seed_is_reproducible_and_warns(tmp_path):
    ledger = PrivacyLedger(tmp_path / "l.sqlite", epsilon=1e6, delta=1e-5)
    with pytest.warns(InsecureRandomnessWarning, match="NO privacy guarantee"):
        a = _release(ledger, SeededRandomness(5))
    with pytest.warns(InsecureRandomnessWarning):
        b = _release(ledger, SeededRandomness(5))
    assert np.array_equal(a, b)


def test_secure_gaussian_has_unit_variance():
    draws = SecretRandomness().normal(200_001)
    assert len(draws) == 200_001
    assert abs(draws.mean()) < 0.01 and abs(draws.std() - 1) < 0.01


@pytest.mark.slow
def test_release_is_normalised_by_the_expected_not_the_realised_batch_size(tmp_path):
    class NoNoise(SecretRandomness):
        def normal(self, n):
            return np.zeros(n)

        def discrete_gaussian(self, n, sigma_squared):
            return np.zeros(n, dtype=np.int64)

    ledger = PrivacyLedger(tmp_path / "l.sqlite", epsilon=1e6, delta=1e-5)
    values = private_release(torch.full((7, 2), 0.5, dtype=torch.float64), ReleaseParameters(10.0, 1.0, 0.1),
                             population=100, randomness=NoNoise(), ledger=ledger, key=LedgerKey(0)).values
    assert np.allclose(values, 7 * 0.5 / (0.1 * 100))


# -- ledger ------------------------------------------------------------------------------------
def test_every_release_is_recorded_durably_before_it_leaves(tmp_path):
    path = tmp_path / "ledger.sqlite"
    ledger = PrivacyLedger(path, epsilon=10, delta=1e-5)
    for round in range(3):
        _release(ledger, SecretRandomness())
    ledger.close()  # a restart
    reopened = PrivacyLedger(path, epsilon=10, delta=1e-5)
    assert reopened.releases == 3
    assert reopened.events() == [release_event(0.1, 1.0, "discrete")] * 3
    assert reopened.spent() == pytest.approx(epsilon_for(1.0, 0.1, 3, 1e-5, noise="discrete"))


def test_a_release_past_the_budget_is_refused_and_nothing_is_released(tmp_path):
    event = release_event(0.1, 1.0, "discrete")
    budget = epsilon_for(1.0, 0.1, 5, 1e-5, noise="discrete") * 1.0001  # room for exactly five
    ledger = PrivacyLedger(tmp_path / "l.sqlite", epsilon=budget, delta=1e-5)
    assert ledger.capacity(event) == 5
    for _ in range(5):
        _release(ledger, SecretRandomness())
    with pytest.raises(BudgetExhausted, match="past its budget"):
        _release(ledger, SecretRandomness())
    assert ledger.releases == 5
    ledger.close()
    with pytest.raises(BudgetExhausted):  # also after a restart
        _release(PrivacyLedger(tmp_path / "l.sqlite", epsilon=budget, delta=1e-5), SecretRandomness())


def test_a_new_process_reads_the_stored_capacity_and_it_is_the_accountants(tmp_path, monkeypatch):
    from seedtune.common.privacy import ledger as ledger_module

    event = release_event(0.1, 1.0)
    budget = epsilon_for(1.0, 0.1, 7, 1e-5) * 1.0001  # room for exactly seven
    PrivacyLedger(tmp_path / "l.sqlite", epsilon=budget, delta=1e-5).capacity(event)
    calls = []
    monkeypatch.setattr(ledger_module, "epsilon_of", lambda *a: calls.append(a) or ledger_module.math.inf)
    reopened = PrivacyLedger(tmp_path / "l.sqlite", epsilon=budget, delta=1e-5)
    assert reopened.capacity(event) == 7 and calls == []  # stored, not recomputed
    assert reopened.capacity(release_event(0.2, 1.0)) == 0  # another event is computed afresh
    assert calls


def test_a_ledgers_budget_cannot_be_changed_after_creation(tmp_path):
    PrivacyLedger(tmp_path / "l.sqlite", epsilon=2, delta=1e-5).close()
    with pytest.raises(BudgetExhausted, match="cannot be changed"):
        PrivacyLedger(tmp_path / "l.sqlite", epsilon=20, delta=1e-5)


def test_a_ledger_written_before_the_step_rename_keeps_every_release_and_its_reuse(tmp_path):
    """A silo upgraded mid-run opens its old ledger (a "round" column, none of the later ones):
    nothing it spent is forgotten, and the release it already made is found under its step."""
    import sqlite3

    path = tmp_path / "old.sqlite"
    event = release_event(0.1, 2.0)
    with sqlite3.connect(path) as db:
        db.executescript(
            "CREATE TABLE budget (id INTEGER PRIMARY KEY CHECK (id = 1), epsilon REAL NOT NULL, "
            "delta REAL NOT NULL, accountant TEXT NOT NULL, created REAL NOT NULL);"
            "CREATE TABLE releases (id INTEGER PRIMARY KEY AUTOINCREMENT, round INTEGER NOT NULL, "
            "event TEXT NOT NULL, note TEXT NOT NULL DEFAULT '', created REAL NOT NULL, released TEXT);")
        db.execute("INSERT INTO budget VALUES (1, 3.0, 1e-5, 'rdp', 0)")
        db.execute("INSERT INTO releases (round, event, created, released) VALUES (4, ?, 0, '[0.5]')",
                   (codec.dumps(event),))
    for _ in range(2):  # the upgrade happens once; a second opening finds nothing to change
        with PrivacyLedger.existing(path) as ledger:
            assert ledger.releases == 1 and ledger.spent() == pytest.approx(epsilon_of([event], 1e-5))
            assert [(entry["step"], entry["released"]) for entry in ledger.history()] == [(4, [0.5])]
            assert ledger.answered("", 4).values == [0.5] and ledger.answered("", 3) is None
    with PrivacyLedger.existing(path) as ledger:
        ledger.charge(event, step=5)
        assert [entry["step"] for entry in ledger.history()] == [4, 5]


def test_mixed_events_are_checked_by_full_composition(tmp_path):
    ledger = PrivacyLedger(tmp_path / "l.sqlite", epsilon=3.0, delta=1e-5)
    ledger.charge(release_event(0.1, 2.0), step=0)
    other = release_event(0.2, 1.0)
    expected = epsilon_of([release_event(0.1, 2.0), other], 1e-5) > 3.0
    assert ledger.would_exceed(other) == expected


# -- accounting --------------------------------------------------------------------------------
@pytest.mark.slow
def test_calibration_matches_dp_accounting_reference_values():
    assert calibrate_noise_multiplier(2.0, 1e-5, 0.01, 1000, "rdp") == pytest.approx(1.0223, abs=5e-4)
    assert calibrate_noise_multiplier(2.0, 1e-5, 0.01, 1000, "pld") == pytest.approx(0.9591, abs=5e-4)


@given(epsilon=st.floats(0.3, 10), log_delta=st.floats(-9, -3), q=st.floats(1e-3, 1.0), steps=st.integers(1, 3000))
@settings(max_examples=15, deadline=None)
@pytest.mark.slow
def test_calibrated_sigma_never_overshoots_and_is_tight(epsilon, log_delta, q, steps):
    delta = 10**log_delta
    sigma = calibrate_noise_multiplier(epsilon, delta, q, steps)
    assert epsilon_for(sigma, q, steps, delta) <= epsilon
    assert epsilon_for(sigma * 0.999, q, steps, delta) > epsilon * 0.999  # not wastefully large


def test_epsilon_of_grouped_events_equals_dp_accounting_composition():
    events = [release_event(0.01, 1.0)] * 50 + [release_event(0.02, 1.5)] * 30
    accountant = dp_accounting.rdp.RdpAccountant()
    accountant.compose(dp_accounting.ComposedDpEvent(events))
    assert epsilon_of(events, 1e-5) == pytest.approx(accountant.get_epsilon(1e-5), rel=1e-12)
    assert math.isinf(epsilon_of([release_event(0.5, 0.0)], 1e-5))


def test_event_codec_round_trips_and_refuses_what_it_does_not_know():
    for noise in ("gaussian", "discrete"):
        event = dp_accounting.SelfComposedDpEvent(release_event(0.01, 1.3, noise), 4)
        assert codec.loads(codec.dumps(event)) == event
    for bad in ('{"type": "os.system", "command": "rm"}', '{"type": "GaussianDpEvent"}',
                '{"type": "GaussianDpEvent", "noise_multiplier": "1"}',
                '{"type": "GaussianDpEvent", "noise_multiplier": NaN}', "not json"):
        with pytest.raises(codec.EventDecodeError):
            codec.loads(bad)
