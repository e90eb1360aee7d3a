"""What a silo will do, whatever a coordinator asks: limits its operator sets.

The coordinator chooses sigma, K, q and the number of rounds; a silo's ledger already refuses a
release past the silo's own budget, but within the budget a careless or malicious coordinator
could still spend it on weak releases (a tiny sigma, a huge batch) or switch privacy off in the
run's setup. A silo therefore checks every request against its own limits *before* it samples,
computes or charges anything, and refuses with the reason:

========================  =======================================================  ==========
node config key           refuses a request ...                                    default
========================  =======================================================  ==========
``min-noise-multiplier``  whose sigma (training or evaluation) is below it         0 (none)
``max-probes``            with more than this many probe seeds K                   1024
``max-sample-rate``       with a sampling rate q above it                          1.0
``max-rounds``            for a round >= it (rounds count from 0)                  unlimited
``allow-nonprivate``      of a run whose setup disables privacy, or an exact       false
                          (non-private) evaluation, unless true
``allow-float-noise``     of a run whose setup asks for floating-point Gaussian    false
                          noise (``privacy.noise = "gaussian"``), unless true
========================  =======================================================  ==========

``seedtune simulate`` runs every silo for the one user who started it, so there non-private
runs and floating-point noise are allowed; a deployed SuperNode refuses them unless its operator
says otherwise.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

from seedtune.common.errors import SeedtuneError
from seedtune.common.protocol import TrainRequest
from seedtune.common.wire import MAX_PROBES


class RequestRefused(SeedtuneError):
    """A request outside this silo's limits; nothing was sampled, computed, charged or released."""


@dataclass(frozen=True)
class Limits:
    min_noise_multiplier: float = 0.0
    max_probes: int = MAX_PROBES
    max_sample_rate: float = 1.0
    max_rounds: int | None = None
    allow_nonprivate: bool = False
    allow_float_noise: bool = False

    @classmethod
    def from_node_config(cls, node_config: Mapping, *, allow_nonprivate: bool = False) -> Limits:
        """The limits in a SuperNode's ``--node-config``; a bad value is a one-line error."""

        def number(key: str, default, kind, valid, rule: str):
            if key not in node_config:
                return default
            raw = node_config[key]
            try:
                value = kind(raw)
            except (TypeError, ValueError):
                value = None
            if value is None or isinstance(raw, bool) or not valid(value):
                raise SeedtuneError(f"node config {key}={raw!r} must be {rule}")
            return value

        def flag(key: str) -> bool:
            value = node_config.get(key, allow_nonprivate)
            if isinstance(value, str):
                if value.lower() not in ("true", "false"):
                    raise SeedtuneError(f"node config {key}={value!r} must be true or false")
                value = value.lower() == "true"
            return bool(value)

        return cls(
            min_noise_multiplier=number("min-noise-multiplier", 0.0, float, lambda v: math.isfinite(v) and v >= 0,
                                        "a number >= 0"),
            max_probes=number("max-probes", MAX_PROBES, int, lambda v: 1 <= v <= MAX_PROBES,
                              f"an integer in [1, {MAX_PROBES}]"),
            max_sample_rate=number("max-sample-rate", 1.0, float, lambda v: 0 < v <= 1, "a number in (0, 1]"),
            max_rounds=number("max-rounds", None, int, lambda v: v >= 1, "an integer >= 1"),
            allow_nonprivate=flag("allow-nonprivate"),
            allow_float_noise=flag("allow-float-noise"),
        )

    def check_training(self, request: TrainRequest, *, private: bool, noise: str = "discrete") -> None:
        """Refuse a training request outside the limits, saying which."""
        self.check_privacy(private, "a run with privacy disabled")
        self.check_noise(private, noise)
        if private and request.noise_multiplier < self.min_noise_multiplier:
            self._refuse(f"noise multiplier {request.noise_multiplier:g} is below this silo's floor "
                         f"{self.min_noise_multiplier:g} (min-noise-multiplier)")
        if len(request.probe_seeds) > self.max_probes:
            self._refuse(f"{len(request.probe_seeds)} probes exceed this silo's ceiling {self.max_probes} (max-probes)")
        if request.sample_rate > self.max_sample_rate:
            self._refuse(f"sample rate {request.sample_rate:g} exceeds this silo's ceiling "
                         f"{self.max_sample_rate:g} (max-sample-rate)")
        if self.max_rounds is not None and request.round >= self.max_rounds:
            self._refuse(f"round {request.round} is past this silo's last round {self.max_rounds - 1} (max-rounds)")

    def check_evaluation(self, *, private: bool, noise_multiplier: float, noise: str = "discrete") -> None:
        self.check_privacy(private, "an exact (non-private) evaluation")
        self.check_noise(private, noise)
        if private and noise_multiplier < self.min_noise_multiplier:
            self._refuse(f"evaluation noise multiplier {noise_multiplier:g} is below this silo's floor "
                         f"{self.min_noise_multiplier:g} (min-noise-multiplier)")

    def check_privacy(self, private: bool, what: str) -> None:
        if not private and not self.allow_nonprivate:
            self._refuse(f"{what} would release values without noise; this silo allows that only "
                         "with allow-nonprivate=true")

    def check_noise(self, private: bool, noise: str) -> None:
        if private and noise != "discrete" and not self.allow_float_noise:
            self._refuse(f"privacy.noise={noise!r} would release floating-point noise, whose low-order bits can "
                         "leak; this silo allows that only with allow-float-noise=true")

    @staticmethod
    def _refuse(reason: str) -> None:
        raise RequestRefused(f"request refused: {reason}")
