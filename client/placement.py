"""Where a silo computes: the device and precision its operator names (node config ``device``,
``dtype``), checked when the silo starts, not at its first request.

The base model is loaded in float32 on the CPU, checked against the run's fingerprint, and only
then moved; directions are generated on the model's device in its dtype (common/directions.py:
the same values everywhere, rounded once to the dtype). Replay is exact for a given device and
precision: two silos on the same kind of device in the same dtype hold the same bits. Across
precisions they do not (a bfloat16 replica rounds every update to bfloat16, the coordinator's
float32 model does not), which changes the silo's answers by rounding only; across devices in
float32, kernels may differ in their last bits. The coordinator's model, the log and ``export``
are float32 on the CPU whatever the silos run.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from seedtune.client.limits import NodeConfigError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class Placement:
    device: torch.device
    dtype: torch.dtype

    @property
    def default(self) -> bool:
        return self.device.type == "cpu" and self.dtype == torch.float32


CPU_FLOAT32 = Placement(torch.device("cpu"), torch.float32)


def placement(device: str = "cpu", dtype: str = "float32") -> Placement:
    """The checked placement; a device this machine lacks, or a dtype it cannot compute in, is a
    one-line :class:`NodeConfigError` naming the setting."""
    if dtype not in DTYPES:
        raise NodeConfigError(f"node config dtype={dtype!r} is not one of {', '.join(DTYPES)}")
    try:
        where = torch.device(device)
    except RuntimeError:
        raise NodeConfigError(f"node config device={device!r} is not a device; use cpu, cuda or cuda:N") from None
    if where.type not in ("cpu", "cuda"):
        raise NodeConfigError(f"node config device={device!r}: seedtune runs on cpu or cuda[:N]")
    if where.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if (where.index or 0) >= count:
            raise NodeConfigError(f"node config device={device!r} is not available here (torch sees {count} CUDA "
                                  "device(s)); use cpu, or a cuda index below that")
    chosen = Placement(where, DTYPES[dtype])
    _smoke_test(chosen, device, dtype)
    return chosen


def _smoke_test(chosen: Placement, device: str, dtype: str) -> None:
    """The operations a transformer's forward needs, once, in the chosen dtype on the device."""
    try:
        x = torch.ones(2, 8, device=chosen.device, dtype=chosen.dtype)
        layer = torch.nn.Linear(8, 8).to(device=chosen.device, dtype=chosen.dtype)
        norm = torch.nn.LayerNorm(8).to(device=chosen.device, dtype=chosen.dtype)
        torch.softmax(norm(layer(x)) @ x.T, dim=-1).sum().item()
    except (RuntimeError, TypeError) as error:
        first = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise NodeConfigError(f"node config dtype={dtype!r} does not run on device={device!r} here: {first}") from None
