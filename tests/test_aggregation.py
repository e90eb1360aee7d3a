"""Aggregation rules: one contract for every rule, the mean bit for bit as it always was, the
sensitivity and noise that ``describe`` derives checked against the rules themselves."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from seedtune.common.config import load_config
from seedtune.common.errors import ConfigError
from seedtune.common.protocol import ReleaseParameters, TrainReply
from seedtune.common.schedule import ConstantSchedule
from seedtune.common.aggregation import RULES, aggregate, describe, sensitivities, trimmed_count
from seedtune.server.coordinator import Coordinator, NonFiniteStep

# Every rule, and the trimmed mean at the edges of its range (trim 0 is the unweighted mean).
SETTINGS = [("mean", 0.2), ("median", 0.2), ("trimmed-mean", 0.2), ("trimmed-mean", 0.0), ("trimmed-mean", 0.45)]
IDS = [f"{rule}-{trim}" for rule, trim in SETTINGS]

values = st.floats(-1e3, 1e3, allow_nan=False)
weights = st.floats(0.5, 100.0)


@st.composite
def replies(draw, min_silos=1, max_silos=7):
    """(vectors, weights): N silos' K-vectors and expected batch sizes."""
    count = draw(st.integers(min_silos, max_silos))
    probes = draw(st.integers(1, 3))
    vectors = draw(st.lists(st.lists(values, min_size=probes, max_size=probes), min_size=count, max_size=count))
    return vectors, draw(st.lists(weights, min_size=count, max_size=count))


def _close(a, b, scale=1.0):
    return all(math.isclose(x, y, rel_tol=1e-12, abs_tol=1e-12 * scale) for x, y in zip(a, b, strict=True))


# -- the contract every rule keeps -------------------------------------------------------------
@pytest.mark.parametrize("rule, trim", SETTINGS, ids=IDS)
@given(data=replies(), vector=st.lists(values, min_size=1, max_size=3))
def test_silos_that_agree_give_their_common_vector(rule, trim, data, vector):
    _, sizes = data
    assert _close(aggregate(rule, [vector] * len(sizes), sizes, trim), vector, 1e3)


@pytest.mark.parametrize("rule, trim", SETTINGS, ids=IDS)
@given(data=replies(), seed=st.integers(0, 2**32 - 1))
def test_the_order_of_the_replies_does_not_matter(rule, trim, data, seed):
    vectors, sizes = data
    order = np.random.default_rng(seed).permutation(len(vectors))
    shuffled = aggregate(rule, [vectors[i] for i in order], [sizes[i] for i in order], trim)
    assert _close(shuffled, aggregate(rule, vectors, sizes, trim), 1e3)


@pytest.mark.parametrize("rule, trim", SETTINGS, ids=IDS)
@settings(max_examples=200)
@given(data=replies(), silo=st.integers(0, 6), change=st.lists(values, min_size=3, max_size=3))
def test_one_silo_moves_the_aggregate_by_at_most_the_derived_sensitivity(rule, trim, data, silo, change):
    vectors, sizes = data
    silo %= len(vectors)
    delta = change[: len(vectors[0])]
    moved = [list(v) for v in vectors]
    moved[silo] = [x + d for x, d in zip(moved[silo], delta)]
    # The derived bound for one record, d_i = C / (q n_i) times a factor; with C = 1, factor / (q n_i).
    factor = sensitivities(rule, sizes, clip_bound=1.0, trim=trim)[silo] * sizes[silo]
    before, after = aggregate(rule, vectors, sizes, trim), aggregate(rule, moved, sizes, trim)
    for k, d in enumerate(delta):
        assert abs(after[k] - before[k]) <= factor * abs(d) * (1 + 1e-9) + 1e-9


@pytest.mark.parametrize("rule, trim", SETTINGS, ids=IDS)
def test_the_bound_is_reached_so_the_sensitivity_is_not_loose(rule, trim):
    vectors, sizes = [[float(i)] for i in range(5)], [1.0, 2.0, 3.0, 4.0, 5.0]
    silo = 2  # the middle value: moving it a little moves every rule
    factor = sensitivities(rule, sizes, clip_bound=1.0, trim=trim)[silo] * sizes[silo]
    moved = [list(v) for v in vectors]
    moved[silo][0] += 0.5
    shift = aggregate(rule, moved, sizes, trim)[0] - aggregate(rule, vectors, sizes, trim)[0]
    assert shift == pytest.approx(factor * 0.5)


@pytest.mark.parametrize("rule, trim", SETTINGS, ids=IDS)
def test_an_empty_round_or_unknown_rule_is_refused(rule, trim):
    with pytest.raises(ValueError, match="no vectors"):
        aggregate(rule, [], [], trim)
    with pytest.raises(ValueError, match="unknown aggregation rule 'avg'"):
        aggregate("avg", [[1.0]], [1.0])


# -- robustness --------------------------------------------------------------------------------
@pytest.mark.parametrize("outlier", [1e30, -1e30, 1.7e308, 3.0])
def test_median_and_trimmed_mean_stay_within_the_honest_range_the_mean_does_not(outlier):
    honest = [[0.1, -0.4], [0.3, -0.2], [0.2, -0.3], [0.25, -0.1]]
    vectors, sizes = [*honest, [outlier, outlier]], [10.0] * 5
    low, high = np.min(honest, axis=0), np.max(honest, axis=0)
    for rule in ("median", "trimmed-mean"):
        result = np.array(aggregate(rule, vectors, sizes, 0.2))
        assert np.all(low <= result) and np.all(result <= high)
    mean = np.array(aggregate("mean", vectors, sizes))  # (1.7e308 * 10 overflows: an infinite mean)
    assert np.all((mean < low) | (mean > high))


def test_trim_always_leaves_a_value_and_drops_one_of_five_at_the_default():
    for count, trim in itertools.product(range(1, 60), np.linspace(0, 0.4999, 50)):
        assert count - 2 * trimmed_count(count, float(trim)) >= 1
    assert trimmed_count(5, 0.2) == 1 and trimmed_count(4, 0.2) == 0 and trimmed_count(10, 0.2) == 2
    with pytest.raises(ValueError, match="trim=0.5"):
        trimmed_count(5, 0.5)


# -- the mean, as it always was -----------------------------------------------------------------
@given(data=replies())
def test_the_mean_is_bit_for_bit_the_weighted_mean_the_coordinator_always_computed(data):
    vectors, sizes = data
    replies_ = [TrainReply(0, tuple(v), w, ()) for v, w in zip(vectors, sizes)]
    weight = sum(reply.expected_batch_size for reply in replies_)  # the code before common/aggregation.py
    old = tuple(sum(reply.expected_batch_size * reply.projected_grads[k] for reply in replies_) / weight
                for k in range(len(vectors[0])))
    assert aggregate("mean", vectors, sizes) == old


class _Log:
    def __init__(self):
        self.records = []

    def extend(self, records):
        self.records.extend(records)


class _Applier:
    step = 0

    def apply_all(self, records):
        self.step += len(records)


@pytest.mark.parametrize("rule", RULES)
def test_the_coordinator_steps_with_the_configured_rule(rule):
    coordinator = Coordinator(run_id="r", run_seed=0, probes=2, schedule=ConstantSchedule(4, 0.1, 1e-3),
                              release=ReleaseParameters(1.0, 1.0, 0.1), log=_Log(),
                              applier=_Applier(), aggregation=rule, trim=0.2)
    replies_ = [TrainReply(0, (float(i), -float(i) ** 2), 5.0 + i, ()) for i in (3, 1, 4, 1, 5)]
    record, = coordinator.apply(coordinator.request(), replies_)
    assert record.projected_grads == aggregate(rule, [r.projected_grads for r in replies_],
                                               [r.expected_batch_size for r in replies_], 0.2)
    assert coordinator.cost(replies_).rule == rule
    with pytest.raises(ValueError, match="unknown aggregation rule"):
        Coordinator(run_id="r", run_seed=0, probes=2, schedule=ConstantSchedule(4, 0.1, 1e-3), 
                    release=ReleaseParameters(1.0, 1.0, 0.1), log=_Log(), applier=_Applier(), aggregation="mode")


def test_an_aggregate_that_overflows_is_refused_before_it_is_logged():
    log, applier = _Log(), _Applier()
    coordinator = Coordinator(run_id="r", run_seed=0, probes=2, schedule=ConstantSchedule(4, 0.1, 1e-3),
                              release=ReleaseParameters(1.0, 1.0, 0.1), log=log, applier=applier)
    huge = TrainReply(0, (1.7976931348623157e308, 1.0), 5.0, ())  # finite, so the decoder accepts it
    with pytest.raises(NonFiniteStep, match="not finite"):
        coordinator.apply(coordinator.request(), [huge, huge])
    assert log.records == [] and applier.step == 0


# -- noise: describe() against the rules ------------------------------------------------------
@pytest.mark.parametrize("rule, trim", SETTINGS, ids=IDS)
@pytest.mark.parametrize("sizes", [(24.0,) * 5, (10.0, 20.0, 40.0, 15.0, 30.0), (12.0, 12.0, 12.0, 12.0)])
def test_the_derived_noise_matches_the_rule_applied_to_noised_replies(rule, trim, sizes):
    clip_bound, sigma, draws = 5.0, 0.8, 40_000
    stds = np.array([sigma * clip_bound / size for size in sizes])
    signal = 0.37
    # Each silo's K = draws coordinates carry independent noise: one call aggregates them all.
    noised = signal + np.random.default_rng(12345).standard_normal((len(sizes), draws)) * stds[:, None]
    result = np.array(aggregate(rule, noised.tolist(), list(sizes), trim))
    measured = float(np.std(result - signal))
    assert describe(rule, sizes, clip_bound=clip_bound, noise_multiplier=sigma, trim=trim).noise_std == \
        pytest.approx(measured, rel=0.02)


def _median_variance_exact(count: int) -> float:
    """Var of the median of ``count`` (odd) i.i.d. N(0, 1), from the order statistic's density
    f(x) = count! / (m! m!) Phi(x)^m (1 - Phi(x))^m phi(x), m = (count - 1) / 2, integrated."""
    m = (count - 1) // 2
    x = np.linspace(-8, 8, 200_001)
    phi = np.exp(-x**2 / 2) / math.sqrt(2 * math.pi)
    cdf = 0.5 * (1 + np.vectorize(math.erf)(x / math.sqrt(2)))
    density = math.factorial(count) / math.factorial(m) ** 2 * cdf**m * (1 - cdf) ** m * phi
    return float(np.sum(x**2 * density) * (x[1] - x[0]))


@pytest.mark.parametrize("count", [3, 5, 7])
def test_the_median_noise_is_the_order_statistic_integral(count):
    derived = describe("median", [1.0] * count, clip_bound=1.0, noise_multiplier=1.0).noise_std
    assert derived == pytest.approx(math.sqrt(_median_variance_exact(count)), rel=0.005)


def test_for_many_silos_the_noise_tends_to_the_asymptotic_formulas():
    count = 201
    median = describe("median", [1.0] * count, clip_bound=1.0, noise_multiplier=1.0).noise_std
    assert median * math.sqrt(count) == pytest.approx(math.sqrt(math.pi / 2), rel=0.03)
    alpha = 0.2
    z = 0.8416212335729143  # Phi^-1(0.8)
    phi = math.exp(-z * z / 2) / math.sqrt(2 * math.pi)
    v = ((1 - 2 * alpha) - 2 * z * phi + 2 * alpha * z * z) / (1 - 2 * alpha) ** 2
    trimmed = describe("trimmed-mean", [1.0] * count, clip_bound=1.0, noise_multiplier=1.0, trim=alpha).noise_std
    assert trimmed * math.sqrt(count) == pytest.approx(math.sqrt(v), rel=0.03)


def test_describe_states_the_mean_in_closed_form_and_the_robust_rules_cost_more_noise():
    sizes = (24.0,) * 5
    mean = describe("mean", sizes, clip_bound=5.0, noise_multiplier=0.8)
    assert mean.noise_std == pytest.approx(math.sqrt(5) * 0.8 * 5.0 / 120.0)
    assert mean.sensitivity == pytest.approx((5.0 / 120.0,) * 5)
    median = describe("median", sizes, clip_bound=5.0, noise_multiplier=0.8)
    trimmed = describe("trimmed-mean", sizes, clip_bound=5.0, noise_multiplier=0.8, trim=0.2)
    assert median.sensitivity == pytest.approx((5.0 / 24.0,) * 5)
    assert trimmed.trimmed == 1 and trimmed.sensitivity == pytest.approx((5.0 / 24.0 / 3,) * 5)
    assert mean.noise_std < trimmed.noise_std < median.noise_std
    assert "epsilon unchanged" in median.summary() and "t=1" in trimmed.summary()


# -- configuration ------------------------------------------------------------------------------
@pytest.mark.parametrize("override, fragment", [
    ("federation.aggregation=avg", "federation.aggregation='avg' is invalid: it must be 'mean', 'median' or"),
    ("federation.trim=0.5", "federation.trim=0.5 is invalid: it must be in [0, 0.5)"),
    ("federation.trim=-0.1", "federation.trim=-0.1 is invalid"),
    ("federation.trim=high", "federation.trim='high' is invalid: it must be a number"),
])
def test_bad_aggregation_settings_name_the_key_and_the_fix(override, fragment):
    with pytest.raises(ConfigError) as error:
        load_config("tiny", overrides=[override], command="simulate")
    assert fragment in str(error.value) and "\n" not in str(error.value)


def test_the_rule_is_chosen_in_the_config_and_defaults_to_the_mean():
    assert load_config("tiny", command="simulate").federation.aggregation == "mean"
    config = load_config("tiny", overrides=["federation.aggregation=trimmed-mean", "federation.trim=0.3"],
                         command="simulate")
    assert (config.federation.aggregation, config.federation.trim) == ("trimmed-mean", 0.3)


def test_the_rule_list_has_one_owner_that_validation_and_aggregation_both_read(monkeypatch):
    from seedtune.common import aggregation
    from seedtune.common.config import load_config

    largest = aggregation.Rule("max", lambda vectors, weights, trim: tuple(max(v) for v in zip(*vectors)),
                               lambda sizes, clip_bound, trim: tuple(clip_bound / size for size in sizes))
    monkeypatch.setitem(aggregation.RULES, "max", largest)
    assert load_config("tiny", overrides=["federation.aggregation=max"]).federation.aggregation == "max"
    assert aggregate("max", [[1.0, 5.0], [3.0, 2.0]], [1.0, 1.0]) == (3.0, 5.0)
    assert describe("max", [2.0, 4.0], clip_bound=1.0, noise_multiplier=1.0).sensitivity == (0.5, 0.25)
    monkeypatch.delitem(aggregation.RULES, "max")
    with pytest.raises(ConfigError, match="federation.aggregation='max' is invalid"):
        load_config("tiny", overrides=["federation.aggregation=max"])


def test_a_round_of_local_steps_is_aggregated_step_by_step_and_logged_whole_or_not_at_all():
    log, applier = _Log(), _Applier()
    schedule = ConstantSchedule(5, 0.1, 1e-3)
    coordinator = Coordinator(run_id="r", run_seed=0, probes=2, schedule=schedule, release=ReleaseParameters(1.0, 1.0, 0.1),
                              log=log, applier=applier, local_steps=3)
    request = coordinator.request()
    assert request.steps == 3 and [s.step for s in request.local] == [0, 1, 2]
    assert request.local[0].probe_seeds == request.probe_seeds and len({s.probe_seeds for s in request.local}) == 3
    replies_ = [TrainReply(0, tuple(float(i * 10 + j) for j in range(6)), 5.0 + i, ()) for i in (1, 2, 3)]
    records = coordinator.apply(request, replies_)
    for position, record in enumerate(records):  # the scalars of one shared seed, across silos
        own = [r.projected_grads[2 * position:2 * position + 2] for r in replies_]
        assert record.step == position and record.probe_seeds == request.local[position].probe_seeds
        assert record.projected_grads == aggregate("mean", own, [r.expected_batch_size for r in replies_], 0.2)
    assert log.records == records and applier.step == 3
    last = coordinator.request()  # two steps left: the last round asks for two
    assert last.steps == 2 and [s.step for s in last.local] == [3, 4]
    huge = TrainReply(3, (1.0, 1.0, 1.7976931348623157e308, 1.0), 5.0, ())
    with pytest.raises(NonFiniteStep, match="step 4"):
        coordinator.apply(last, [huge, huge])
    assert len(log.records) == 3 and applier.step == 3  # the round's first step was not logged either
