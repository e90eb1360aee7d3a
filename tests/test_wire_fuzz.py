"""Property-based fuzzing of every decoder a party runs on what arrives from the network: any
input either decodes into a valid message or is refused with a WireError; nothing else escapes."""

from __future__ import annotations

import json
import math

import dp_accounting
import pytest
from flwr.app import ConfigRecord, RecordDict
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from seedtune.common.wire import (
    MAX_PROBES,
    WireError,
    decode_evaluation,
    decode_evaluation_reply,
    decode_reply,
    decode_request,
)

# Every value type a Flower ConfigRecord carries: scalars and homogeneous lists of them.
SCALARS = [st.integers(min_value=-(2**63), max_value=2**63 - 1), st.floats(allow_nan=True, allow_infinity=True),
           st.text(max_size=40), st.binary(max_size=40), st.booleans()]
VALUES = st.one_of(*SCALARS, *[st.lists(s, max_size=6) for s in SCALARS])
REQUEST_KEYS = ["run_id", "step", "probe_seeds", "beta", "clip_bound", "noise_multiplier",
                "sample_rate", "noise"]
SYNC_KEYS = ["start_step", "records", "setup", "checkpoint_step", "checkpoint_anchor_step"]
REPLY_KEYS = ["silo", "step", "projected_grads", "expected_batch_size", "events"]


def records(keys: list[str]):
    """Config records whose keys are mostly the real ones, with values of any type."""
    return st.dictionaries(st.one_of(st.sampled_from(keys), st.text(max_size=8)), VALUES, max_size=len(keys) + 2)


def plausible_records():
    """Step records as JSON: the right shape, values anywhere in range and out of it."""
    number = st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.integers(-5, 2**64), st.booleans(),
                       st.text(max_size=3), st.none())
    row = st.lists(st.one_of(number, st.lists(number, max_size=3)), min_size=0, max_size=9)
    return st.lists(row, max_size=3).map(json.dumps)


FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FUZZ
@given(request=records(REQUEST_KEYS), sync=records(SYNC_KEYS), steps=plausible_records(), keep_steps=st.booleans())
def test_a_train_request_decodes_or_is_refused(request, sync, steps, keep_steps):
    if keep_steps:
        sync = {**sync, "records": steps}
    content = RecordDict({"request": ConfigRecord(request), "sync": ConfigRecord(sync)})
    try:
        decoded, synced = decode_request(content)
    except WireError:
        return
    # What a silo would apply to its model: consecutive steps of finite numbers only
    assert 1 <= len(decoded.probe_seeds) <= MAX_PROBES and 0 < decoded.release.sample_rate <= 1
    assert decoded.release.noise in ("discrete", "gaussian")
    for offset, step in enumerate(synced.records):
        assert step.step == synced.start_step + offset
        assert all(math.isfinite(x) for x in (step.lr, step.beta, step.prox, *step.projected_grads))


@FUZZ
@given(sync=records(SYNC_KEYS), evaluate=records(["run_id", "step", "private", "noise_std"]))
def test_an_evaluation_request_decodes_or_is_refused(sync, evaluate):
    content = RecordDict({"sync": ConfigRecord(sync), "evaluate": ConfigRecord(evaluate)})
    try:
        decoded, _ = decode_evaluation(content)
    except WireError:
        return
    # What a silo would noise its counts with: a finite standard deviation, positive whenever it is private
    assert isinstance(decoded.private, bool) and math.isfinite(decoded.noise_std) and decoded.noise_std >= 0
    assert decoded.noise_std > 0 or not decoded.private
    assert isinstance(decoded.run_id, str) and isinstance(decoded.step, int) and decoded.step >= 0


@FUZZ
@given(reply=records(REPLY_KEYS), probes=st.integers(1, 4), step=st.integers(0, 3))
def test_a_reply_decodes_only_into_finite_values_of_the_step_asked(reply, probes, step):
    content = RecordDict({"reply": ConfigRecord(reply)})
    try:
        decoded, silo = decode_reply(content, step=step, probes=probes)
    except WireError:
        return
    # What the coordinator would aggregate: the step it asked, K finite numbers, a positive weight
    assert decoded.step == step and len(decoded.projected_grads) == probes
    assert all(math.isfinite(g) for g in decoded.projected_grads) and decoded.expected_batch_size > 0
    assert isinstance(silo, str)
    assert all(isinstance(event, dp_accounting.DpEvent) for event in decoded.events)


@FUZZ
@given(values=st.lists(st.floats(allow_nan=True, allow_infinity=True), min_size=1, max_size=4),
       weight=st.floats(allow_nan=True, allow_infinity=True), events=st.lists(st.text(max_size=30), max_size=2))
def test_a_well_formed_reply_with_bad_numbers_is_refused(values, weight, events):
    content = RecordDict({"reply": ConfigRecord({"silo": "s", "step": 0,
                                                  "projected_grads": values, "expected_batch_size": weight,
                                                  "events": events})})
    try:
        decoded, _ = decode_reply(content, step=0, probes=len(values))
    except WireError:
        return
    assert all(math.isfinite(g) for g in decoded.projected_grads) and decoded.expected_batch_size > 0


@FUZZ
@given(evaluation=records(["silo", "correct", "count", "events"]))
def test_an_evaluation_reply_decodes_only_into_finite_counts_and_known_events(evaluation):
    try:
        correct, count, events, silo = decode_evaluation_reply(RecordDict({"evaluation": ConfigRecord(evaluation)}))
    except WireError:
        return
    # What the coordinator would divide and account: finite numbers, events it can read, a short name
    assert math.isfinite(correct) and math.isfinite(count)
    assert all(isinstance(event, dp_accounting.DpEvent) for event in events)  # accountable events only
    assert isinstance(silo, str) and len(silo) <= 128


def test_the_fuzzed_request_shape_can_also_decode():
    # The strategies reach valid messages too (else the tests above would only test refusals).
    request = {"run_id": "r", "step": 1, "probe_seeds": [1, 2], "beta": 1e-3, "clip_bound": 1.0,
               "noise_multiplier": 1.0, "sample_rate": 0.1, "noise": "discrete"}
    decoded, sync = decode_request(RecordDict({"request": ConfigRecord(request),
                                               "sync": ConfigRecord({"start_step": 1, "records": "[]"})}))
    assert decoded.probe_seeds == (1, 2) and sync.records == () and len(decoded.probe_seeds) <= MAX_PROBES


def test_a_setup_that_would_allocate_without_bound_is_refused():
    import base64
    import zlib

    from seedtune.common import wire

    request = {"run_id": "r", "step": 1, "probe_seeds": [1], "beta": 1e-3, "clip_bound": 1.0,
               "noise_multiplier": 1.0, "sample_rate": 0.1, "noise": "discrete"}

    def with_setup(setup):
        return RecordDict({"request": ConfigRecord(request),
                           "sync": ConfigRecord({"start_step": 1, "records": "[]", "setup": setup})})

    for setup in (2**62, 10**9, [1, 2]):  # found by fuzzing: bytes(2**62) raised MemoryError
        with pytest.raises(WireError, match="must be bytes"):
            decode_request(with_setup(setup))
    bomb = base64.b64encode(zlib.compress(bytes(64 << 20), 9)).decode()  # 64 KB that inflates to 64 MB
    blob = json.dumps({"run_id": "r", "config": {}, "base": {}, "mask": {"w": bomb}, "mask_order": ["w"]}).encode()
    original = wire.MAX_INDEX_BYTES
    wire.MAX_INDEX_BYTES = 1 << 20
    try:
        with pytest.raises(WireError, match="inflates past"):
            decode_request(with_setup(blob))
    finally:
        wire.MAX_INDEX_BYTES = original


def test_the_fuzzed_evaluation_shape_can_also_decode():
    evaluate = {"run_id": "r", "step": 3, "private": True, "noise_std": 5.0}
    decoded, sync = decode_evaluation(RecordDict({"evaluate": ConfigRecord(evaluate),
                                                  "sync": ConfigRecord({"start_step": 3, "records": "[]"})}))
    assert (decoded.run_id, decoded.step, decoded.private, decoded.noise_std) == ("r", 3, True, 5.0)
    with pytest.raises(WireError, match="noise_std > 0"):
        decode_evaluation(RecordDict({"evaluate": ConfigRecord({**evaluate, "noise_std": 0.0}),
                                      "sync": ConfigRecord({"start_step": 3, "records": "[]"})}))


@st.composite
def plausible_local(draw):
    """A round's local steps as JSON: each field mostly valid, sometimes anything (out of order, a
    wrong seed count, NaN, a bool, a negative step size), so that both outcomes are reached."""
    junk = st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.integers(-2**64, 2**64), st.booleans(),
                     st.none(), st.text(max_size=2))

    def field(valid):
        return draw(junk if draw(st.integers(0, 29)) == 0 else valid)

    rows = []
    for offset in range(draw(st.integers(0, 3))):
        first = offset == 0
        seeds = field(st.just([1]) if first else st.lists(st.integers(0, 2**63 - 1), min_size=1, max_size=1))
        rows.append([field(st.just(1 + offset)), field(st.integers(0, 2)), seeds,
                     field(st.floats(0, 1)), field(st.just(1e-3) if first else st.floats(1e-6, 1)),
                     field(st.floats(0, 1)), field(st.integers(-1, 5))])
    return json.dumps(rows)


@FUZZ
@given(local=st.one_of(plausible_local(), st.text(max_size=20)))
def test_local_steps_decode_only_into_consecutive_finite_steps_of_the_request(local):
    request = {"run_id": "r", "step": 1, "probe_seeds": [1], "beta": 1e-3, "clip_bound": 1.0,
               "noise_multiplier": 1.0, "sample_rate": 0.1, "noise": "discrete", "local": local}
    content = RecordDict({"request": ConfigRecord(request), "sync": ConfigRecord({"start_step": 1, "records": "[]"})})
    try:
        decoded, _ = decode_request(content)
    except WireError:
        return
    # What a silo would step its own model by: consecutive steps from the request's, K seeds each
    assert decoded.steps == len(decoded.local) >= 2
    assert decoded.local[0].probe_seeds == (1,) and decoded.local[0].beta == 1e-3
    for offset, step in enumerate(decoded.local):
        assert step.step == 1 + offset and len(step.probe_seeds) == 1 and 0 <= step.probe_seeds[0] < 2**63
        assert all(math.isfinite(x) for x in (step.lr, step.beta, step.prox)) and step.beta > 0 and step.lr >= 0
