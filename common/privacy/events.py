"""DP events to and from JSON, for the ledger on disk and the events a silo reports.

dp-accounting's own ``DpEvent.from_named_tuple`` imports whatever module a record names; a record
that came over the network must not choose what gets imported, so decoding here accepts only the
event classes a seedtune release can produce.
"""

from __future__ import annotations

import json
import math
from typing import Any

import attr
import dp_accounting
from seedtune.common.privacy.accounting import DiscreteGaussianDpEvent
from seedtune.common.privacy.distributed import DistributedDiscreteGaussianDpEvent

_ALLOWED: dict[str, type[dp_accounting.DpEvent]] = {
    cls.__name__: cls
    for cls in (
        dp_accounting.GaussianDpEvent,
        DiscreteGaussianDpEvent,
        DistributedDiscreteGaussianDpEvent,
        dp_accounting.PoissonSampledDpEvent,
        dp_accounting.SelfComposedDpEvent,
        dp_accounting.ComposedDpEvent,
    )
}


class EventDecodeError(ValueError):
    """A serialized event is not one seedtune can account for."""


def event_to_dict(event: dp_accounting.DpEvent) -> dict[str, Any]:
    name = type(event).__name__
    if name not in _ALLOWED:
        raise EventDecodeError(f"cannot serialize {name}; supported: {sorted(_ALLOWED)}")
    record: dict[str, Any] = {"type": name}
    for field in attr.fields(type(event)):
        value = getattr(event, field.name)
        if isinstance(value, dp_accounting.DpEvent):
            value = event_to_dict(value)
        elif isinstance(value, (list, tuple)):
            value = [event_to_dict(item) for item in value]
        record[field.name] = value
    return record


def event_from_dict(record: Any) -> dp_accounting.DpEvent:
    if not isinstance(record, dict) or record.get("type") not in _ALLOWED:
        kind = record.get("type") if isinstance(record, dict) else type(record).__name__
        raise EventDecodeError(f"unsupported event {kind!r}; supported: {sorted(_ALLOWED)}")
    cls = _ALLOWED[record["type"]]
    names = {field.name for field in attr.fields(cls)}
    if set(record) - {"type"} != names:
        raise EventDecodeError(f"{cls.__name__} needs fields {sorted(names)}, got {sorted(set(record) - {'type'})}")
    values: dict[str, Any] = {}
    for name in names:
        value = record[name]
        if isinstance(value, dict):
            value = event_from_dict(value)
        elif isinstance(value, list):
            value = [event_from_dict(item) for item in value]
        elif isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise EventDecodeError(f"{cls.__name__}.{name} must be a finite number, got {value!r}")
        values[name] = value
    return cls(**values)


def dumps(event: dp_accounting.DpEvent) -> str:
    return json.dumps(event_to_dict(event), sort_keys=True)


def loads(text: str) -> dp_accounting.DpEvent:
    try:
        record = json.loads(text)
    except json.JSONDecodeError as error:
        raise EventDecodeError(f"not JSON: {error}") from None
    return event_from_dict(record)
