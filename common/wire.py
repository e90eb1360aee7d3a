"""The messages of a round on Flower's wire, and their validation at both ends.

A training request is a ``RecordDict`` of

* ``request`` (ConfigRecord): run id, step, probe seeds, beta, and the release parameters (C,
  sigma, q, noise kind); the silo answers on the model after exactly ``step`` steps;
* ``sync`` (ConfigRecord): the updates the silo has not applied, as step records (seeds,
  scalars, lr, beta, prox, anchor step), the step they start from, and on first contact the
  run's setup (public config, base-model fingerprint, pruning mask as indices);
* ``checkpoint`` (ArrayRecord), only for a silo too far behind to replay: the trainable
  coordinates (and proximal anchor) after the steps it names.

An evaluation request is a ConfigRecord ``evaluate`` (run id, step, private, noise std
per count) with the same ``sync`` and ``checkpoint``.

A reply is one ConfigRecord ``reply``: the request's step, the K released
scalars, its expected batch size and the DP events it charged. Nothing else: no weights, no
gradients, no per-example values, no losses. Decoding checks every field and raises
:class:`WireError` with the reason, so a malformed message never reaches the model.
"""

from __future__ import annotations

import base64
import dataclasses
import json
import math
import zlib
from collections import OrderedDict
from dataclasses import dataclass

import dp_accounting
import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, RecordDict
from seedtune.common.privacy import events as event_codec
from seedtune.common.protocol import (
    NOISES,
    EvaluationRequest,
    LocalStep,
    Participant,
    ReleaseParameters,
    SecureRound,
    TrainReply,
    TrainRequest,
)
from seedtune.common.updatelog import Checkpoint, StepRecord

MAX_PROBES = 1024
MAX_LOCAL_STEPS = 1024
MAX_PARTICIPANTS = 1000


class WireError(ValueError):
    """A message that does not follow the protocol; the text says what is wrong."""


@dataclass(frozen=True)
class Setup:
    """What a silo needs once per run to build the same starting model as everyone else."""

    run_id: str
    config: dict
    base: dict
    mask: OrderedDict  # name -> sorted flat indices (torch.int64) or None (every coordinate)


@dataclass(frozen=True)
class Sync:
    """Updates to apply before answering: optional setup, optional checkpoint, then records."""

    start_step: int  # the first record's step: the silo must hold the model after this many steps
    records: tuple[StepRecord, ...]
    setup: Setup | None = None
    checkpoint: Checkpoint | None = None  # for a silo too far behind to replay


# -- requests ----------------------------------------------------------------------------------
def encode_request(request: TrainRequest, sync: Sync) -> RecordDict:
    content = RecordDict()
    content["request"] = ConfigRecord({
        "run_id": request.run_id,
        "step": request.step,
        "probe_seeds": [int(seed) for seed in request.probe_seeds],
        "beta": float(request.beta),
        "clip_bound": float(request.release.clip_bound),
        "noise_multiplier": float(request.release.noise_multiplier),
        "sample_rate": float(request.release.sample_rate),
        "noise": request.release.noise,
    })
    if request.local:  # only with local steps: a one-step request is what it always was
        content["request"]["local"] = json.dumps([
            [s.step, s.stage, list(s.probe_seeds), s.lr, s.beta, s.prox, s.anchor_step] for s in request.local])
    if request.secure is not None:  # likewise without secure aggregation
        secure = request.secure
        content["request"]["secure"] = json.dumps({
            "attempt": secure.attempt, "bits": secure.bits, "honest": secure.honest,
            "participants": [[p.name, p.public.hex(), p.signature.hex(), p.public_size] for p in secure.participants]})
    _encode_sync(content, sync)
    return content


def _encode_sync(content: RecordDict, sync: Sync) -> None:
    sync_record = {
        "start_step": sync.start_step,
        "records": json.dumps([_record_to_list(r) for r in sync.records]),
    }
    if sync.setup is not None:
        sync_record["setup"] = json.dumps({
            "run_id": sync.setup.run_id, "config": sync.setup.config, "base": sync.setup.base,
            "mask": {name: None if index is None else _pack_index(index) for name, index in sync.setup.mask.items()},
            "mask_order": list(sync.setup.mask),
        }).encode()
    if sync.checkpoint is not None:
        sync_record["checkpoint_step"] = int(sync.checkpoint.step)
        arrays = {f"value.{i}": np.ascontiguousarray(v) for i, v in enumerate(sync.checkpoint.values)}
        if sync.checkpoint.anchor is not None:
            arrays.update({f"anchor.{i}": np.ascontiguousarray(v) for i, v in enumerate(sync.checkpoint.anchor)})
            sync_record["checkpoint_anchor_step"] = int(sync.checkpoint.anchor_step)
        content["checkpoint"] = ArrayRecord({key: torch.from_numpy(value) for key, value in arrays.items()})
    content["sync"] = ConfigRecord(sync_record)


def decode_request(content: RecordDict) -> tuple[TrainRequest, Sync]:
    record = _config(content, "request")
    seeds = _field(record, "probe_seeds", list)
    if not 1 <= len(seeds) <= MAX_PROBES or not all(isinstance(s, int) and 0 <= s < 2**63 for s in seeds):
        raise WireError(f"request.probe_seeds must be 1..{MAX_PROBES} integers in [0, 2^63)")
    request = TrainRequest(
        run_id=_field(record, "run_id", str),
        step=_nonnegative_int(record, "step"),
        probe_seeds=tuple(seeds),
        beta=_positive(record, "beta"),
        release=ReleaseParameters(
            clip_bound=_positive(record, "clip_bound"),
            noise_multiplier=_finite(record, "noise_multiplier", minimum=0.0),
            sample_rate=_finite(record, "sample_rate", minimum=0.0),
            noise=_field(record, "noise", str),
        ),
    )
    if not 0 < request.release.sample_rate <= 1:
        raise WireError(f"request.sample_rate={request.release.sample_rate} is outside (0, 1]")
    if request.release.noise not in NOISES:
        raise WireError(f"request.noise={request.release.noise!r} is not one of {', '.join(NOISES)}")
    if "local" in record:
        request = dataclasses.replace(request, local=_decode_local(record, request))
    if "secure" in record:
        request = dataclasses.replace(request, secure=_decode_secure(record))
    return request, _decode_sync(content)


def _decode_secure(record: ConfigRecord) -> SecureRound:
    """A secure round: an attempt >= 0, 2 <= bits <= 64, t >= 1, and 2..MAX_PARTICIPANTS named,
    distinct participants, each with a 32-byte key and a public size >= 1."""
    try:
        data = json.loads(_field(record, "secure", str))
        participants = tuple(Participant(str(name), bytes.fromhex(public), bytes.fromhex(signature), size)
                             for name, public, signature, size in data["participants"])
        secure = SecureRound(data["attempt"], data["bits"], data["honest"], participants)
    except (ValueError, TypeError, KeyError) as error:
        raise WireError(f"request.secure is malformed: {error}") from None
    for key in ("attempt", "bits", "honest"):
        value = getattr(secure, key)
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise WireError(f"request.secure.{key} must be an integer >= 0")
    if not 2 <= secure.bits <= 64 or secure.honest < 1:
        raise WireError("request.secure needs bits in [2, 64] and honest >= 1")
    names = secure.names
    if not 1 <= len(names) <= MAX_PARTICIPANTS or len(set(names)) != len(names):
        raise WireError(f"request.secure must name 1..{MAX_PARTICIPANTS} distinct participants")
    for p in participants:
        if not p.name or len(p.name) > 128 or len(p.public) != 32 or len(p.signature) > 512:
            raise WireError(f"request.secure participant {p.name[:128]!r} has a malformed name, key or signature")
        if isinstance(p.public_size, bool) or not isinstance(p.public_size, int) or p.public_size < 1:
            raise WireError(f"request.secure participant {p.name!r} has a public size that is not an integer >= 1")
    return secure


def _decode_local(record: ConfigRecord, request: TrainRequest) -> tuple[LocalStep, ...]:
    """The round's local steps: consecutive from the request's step, the first its own seeds and
    beta, each with K seeds and finite schedule values."""
    try:
        rows = json.loads(_field(record, "local", str))
        local = tuple(_record_from_list([step, stage, seeds, [], lr, beta, prox, anchor])
                      for step, stage, seeds, lr, beta, prox, anchor in rows)
    except (ValueError, TypeError) as error:
        raise WireError(f"request.local is malformed: {error}") from None
    if not 2 <= len(local) <= MAX_LOCAL_STEPS:
        raise WireError(f"request.local must list 2..{MAX_LOCAL_STEPS} steps (one step needs none)")
    if any(s.step != request.step + i for i, s in enumerate(local)):
        raise WireError("request.local is not consecutive steps from request.step")
    if local[0].probe_seeds != request.probe_seeds or local[0].beta != request.beta:
        raise WireError("request.local's first step is not the request's own seeds and beta")
    for s in local:
        if len(s.probe_seeds) != len(request.probe_seeds) or not all(0 <= seed < 2**63 for seed in s.probe_seeds):
            raise WireError(f"request.local step {s.step} must have {len(request.probe_seeds)} seeds in [0, 2^63)")
        if not (s.beta > 0 and s.lr >= 0 and s.prox >= 0 and s.anchor_step >= -1):
            raise WireError(f"request.local step {s.step} has a beta <= 0, or a negative lr, prox or anchor step")
    return tuple(LocalStep(s.step, s.stage, s.probe_seeds, s.lr, s.beta, s.prox, s.anchor_step) for s in local)


def _decode_sync(content: RecordDict) -> Sync:
    sync_record = _config(content, "sync")
    try:
        rows = json.loads(_field(sync_record, "records", str))
        records = tuple(_record_from_list(row) for row in rows)
    except (ValueError, TypeError) as error:
        raise WireError(f"sync.records is malformed: {error}") from None
    start = _nonnegative_int(sync_record, "start_step")
    if any(r.step != start + i for i, r in enumerate(records)):
        raise WireError("sync.records are not consecutive steps from start_step")
    setup = _decode_setup(sync_record["setup"]) if "setup" in sync_record else None
    checkpoint = None
    if "checkpoint_step" in sync_record:
        if "checkpoint" not in content.array_records:
            raise WireError("sync names a checkpoint but the message carries none")
        arrays = content.array_records["checkpoint"]
        values = [arrays[f"value.{i}"].numpy() for i in range(sum(k.startswith("value.") for k in arrays))]
        anchors = [arrays[f"anchor.{i}"].numpy() for i in range(sum(k.startswith("anchor.") for k in arrays))]
        anchor_step = sync_record.get("checkpoint_anchor_step", -1)
        if isinstance(anchor_step, bool) or not isinstance(anchor_step, int) or anchor_step < -1:
            raise WireError("sync.checkpoint_anchor_step must be an integer >= -1")
        checkpoint = Checkpoint(_nonnegative_int(sync_record, "checkpoint_step"), tuple(values),
                                tuple(anchors) or None, anchor_step)
    return Sync(start, records, setup, checkpoint)


# -- replies -----------------------------------------------------------------------------------
def encode_reply(reply: TrainReply, silo: str = "") -> RecordDict:
    """``silo`` is the name the silo goes by (its operator's choice), shown in summaries."""
    content = RecordDict()
    content["reply"] = ConfigRecord({
        "silo": silo,
        "step": reply.step,
        "projected_grads": [float(g) for g in reply.projected_grads],
        "expected_batch_size": float(reply.expected_batch_size),
        "events": [event_codec.dumps(event) for event in reply.events],
    })
    if reply.masked:  # secure aggregation: K integers mod 2^b, 8 bytes each
        content["reply"]["masked"] = np.asarray(reply.masked, dtype="<u8").tobytes()
        content["reply"]["collusion"] = [event_codec.dumps(event) for event in reply.collusion]
    return content


def decode_reply(content: RecordDict, *, step: int, probes: int, bits: int | None = None) -> tuple[TrainReply, str]:
    """A reply, checked against the step and probe count it answers: (reply, silo). ``bits``: the
    request was a secure round's, so the reply must be masked integers mod 2^bits."""
    record = _config(content, "reply")
    reply_step = _nonnegative_int(record, "step")
    if reply_step != step:
        raise WireError(f"reply is for step {reply_step}, not {step}")
    grads = _field(record, "projected_grads", list)
    masked: tuple[int, ...] = ()
    collusion: tuple[dp_accounting.DpEvent, ...] = ()
    if bits is not None:
        blob = _field(record, "masked", bytes)
        if grads or len(blob) != 8 * probes:
            raise WireError(f"a secure reply carries {probes} masked integers (8 bytes each) and no plain scalars")
        values = np.frombuffer(blob, dtype="<u8")
        if bits < 64 and (values >> np.uint64(bits)).any():
            raise WireError(f"reply has a masked value outside [0, 2^{bits})")
        masked = tuple(int(v) for v in values)
        collusion = _events(record, "collusion")
    else:
        if len(grads) != probes:
            raise WireError(f"reply has {len(grads)} projected gradients, expected {probes}")
        if not all(isinstance(g, float) and math.isfinite(g) for g in grads):
            raise WireError("reply has a projected gradient that is not a finite number")
    reply = TrainReply(reply_step, tuple(grads), _positive(record, "expected_batch_size"), _events(record, "events"),
                       masked, collusion)
    silo = record.get("silo", "")
    if not isinstance(silo, str) or len(silo) > 128:
        raise WireError("reply.silo must be a short string")
    return reply, silo


def _events(record: ConfigRecord, key: str) -> tuple[dp_accounting.DpEvent, ...]:
    try:
        return tuple(event_codec.loads(text) for text in _field(record, key, list))
    except (event_codec.EventDecodeError, TypeError) as error:
        raise WireError(f"reply.{key}: {error}") from None


# -- secure aggregation's keys -----------------------------------------------------------------
def encode_keys_request(run_id: str, sync: Sync) -> RecordDict:
    """Ask a silo for its masking public key of the run (with the setup on first contact)."""
    content = RecordDict()
    content["keys"] = ConfigRecord({"run_id": run_id})
    _encode_sync(content, sync)
    return content


def decode_keys_request(content: RecordDict) -> tuple[str, Sync]:
    return _field(_config(content, "keys"), "run_id", str), _decode_sync(content)


def encode_keys_reply(participant: Participant) -> RecordDict:
    content = RecordDict()
    content["key"] = ConfigRecord({"silo": participant.name, "public": participant.public,
                                   "signature": participant.signature, "public_size": participant.public_size})
    return content


def decode_keys_reply(content: RecordDict) -> Participant:
    record = _config(content, "key")
    participant = Participant(_field(record, "silo", str), _field(record, "public", bytes),
                              _field(record, "signature", bytes), _nonnegative_int(record, "public_size"))
    if not participant.name or len(participant.name) > 128 or len(participant.public) != 32 \
            or len(participant.signature) > 512 or participant.public_size < 1:
        raise WireError("key reply has a malformed name, key, signature or public size")
    return participant


# -- evaluation on silos' own data -------------------------------------------------------------
def encode_evaluation(request: EvaluationRequest, sync: Sync) -> RecordDict:
    content = RecordDict()
    content["evaluate"] = ConfigRecord({"run_id": request.run_id, "step": request.step,
                                        "private": request.private, "noise_std": float(request.noise_std)})
    _encode_sync(content, sync)
    return content


def decode_evaluation(content: RecordDict) -> tuple[EvaluationRequest, Sync]:
    record = _config(content, "evaluate")
    request = EvaluationRequest(
        run_id=_field(record, "run_id", str),
        step=_nonnegative_int(record, "step"),
        private=_field(record, "private", bool),
        noise_std=_finite(record, "noise_std", minimum=0.0),
    )
    if request.private and request.noise_std <= 0:
        raise WireError("a private evaluation needs evaluate.noise_std > 0")
    return request, _decode_sync(content)


def encode_evaluation_reply(correct: float, count: float, events: tuple[dp_accounting.DpEvent, ...],
                            silo: str = "") -> RecordDict:
    content = RecordDict()
    content["evaluation"] = ConfigRecord({
        "silo": silo, "correct": float(correct), "count": float(count),
        "events": [event_codec.dumps(event) for event in events],
    })
    return content


def decode_evaluation_reply(content: RecordDict) -> tuple[float, float, tuple[dict, ...], str]:
    """(correct, count, events, the silo's name)."""
    record = _config(content, "evaluation")
    values = []
    for key in ("correct", "count"):
        value = record.get(key)
        if not isinstance(value, float) or not math.isfinite(value):
            raise WireError(f"evaluation.{key} must be a finite number")
        values.append(value)
    try:
        events = tuple(event_codec.loads(text) for text in _field(record, "events", list))
    except (event_codec.EventDecodeError, TypeError) as error:
        raise WireError(f"evaluation.events: {error}") from None
    silo = record.get("silo", "")
    if not isinstance(silo, str) or len(silo) > 128:
        raise WireError("evaluation.silo must be a name of at most 128 characters")
    return values[0], values[1], events, silo


# -- helpers -----------------------------------------------------------------------------------
def _config(content: RecordDict, name: str) -> ConfigRecord:
    if name not in content.config_records:
        raise WireError(f"message has no {name!r} record")
    return content.config_records[name]


def _field(record: ConfigRecord, key: str, kind: type):
    if key not in record:
        raise WireError(f"missing field {key!r}")
    value = record[key]
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise WireError(f"field {key!r} must be {kind.__name__}, got {type(value).__name__}")
    return value


def _nonnegative_int(record: ConfigRecord, key: str) -> int:
    value = _field(record, key, int)
    if value < 0:
        raise WireError(f"field {key!r}={value} must be >= 0")
    return value


def _finite(record: ConfigRecord, key: str, minimum: float) -> float:
    value = record.get(key)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < minimum:
        raise WireError(f"field {key!r}={value!r} must be a finite number >= {minimum}")
    return float(value)


def _positive(record: ConfigRecord, key: str) -> float:
    value = _finite(record, key, 0.0)
    if value <= 0:
        raise WireError(f"field {key!r}={value} must be > 0")
    return value


def _record_to_list(record: StepRecord) -> list:
    return [record.step, record.stage, list(record.probe_seeds), [float(g) for g in record.projected_grads],
            record.lr, record.beta, record.prox, record.anchor_step]


def _record_from_list(row) -> StepRecord:
    step, stage, seeds, grads, lr, beta, prox, anchor = row
    numbers = [lr, beta, prox, *grads]
    if not all(isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) for x in numbers):
        raise ValueError("a step record holds a non-finite number")
    if not all(isinstance(x, int) for x in (step, stage, anchor, *seeds)):
        raise ValueError("a step record holds a non-integer step or seed")
    return StepRecord(step, stage, tuple(seeds), tuple(float(g) for g in grads), float(lr), float(beta),
                      float(prox), anchor)


def _pack_index(index: torch.Tensor) -> str:
    deltas = np.diff(index.to(torch.int64).numpy(), prepend=0).astype("<i8")
    return base64.b64encode(zlib.compress(deltas.tobytes(), 6)).decode()


MAX_INDEX_BYTES = 1 << 30  # 128M mask coordinates: a decompression bomb stops here


def _unpack_index(text: str) -> torch.Tensor:
    inflater = zlib.decompressobj()
    raw = inflater.decompress(base64.b64decode(text), MAX_INDEX_BYTES)
    if inflater.unconsumed_tail:
        raise ValueError(f"a mask index inflates past {MAX_INDEX_BYTES} bytes")
    deltas = np.frombuffer(raw, dtype="<i8")
    return torch.from_numpy(np.cumsum(deltas).astype(np.int64))


def _decode_setup(blob) -> Setup:
    if not isinstance(blob, bytes):  # bytes(n) of a huge int n would allocate n bytes
        raise WireError(f"sync.setup must be bytes, got {type(blob).__name__}")
    try:
        data = json.loads(bytes(blob).decode())
        mask = OrderedDict((name, None if data["mask"][name] is None else _unpack_index(data["mask"][name]))
                           for name in data["mask_order"])
        return Setup(str(data["run_id"]), dict(data["config"]), dict(data["base"]), mask)
    except (ValueError, KeyError, TypeError, zlib.error) as error:
        raise WireError(f"sync.setup is malformed: {error}") from None


def serialized_size(obj) -> int:
    """Bytes of a Flower message or record on the wire: the sum of its serialized objects."""
    from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects

    return sum(len(child.deflate()) for child in get_all_nested_objects(obj).values())
