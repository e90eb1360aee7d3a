"""What a silo will do, whatever a coordinator asks: limits its operator sets.

The coordinator chooses sigma, K, q, beta and how often it asks; a silo's ledger already refuses a
release past the silo's own budget, but within the budget a careless or malicious coordinator
could still spend it on weak releases (a tiny sigma, a huge batch) or switch privacy off in the
run's setup. A silo therefore checks every request against its own limits *before* it samples,
computes or charges anything, and refuses with the reason:

========================  =======================================================  ==========
node config key           refuses ...                                              default
========================  =======================================================  ==========
``min-noise-multiplier``  a release whose charged event's sigma is below it        0 (none)
                          (an evaluation's counts are charged at sigma / sqrt 2)
``max-sample-rate``       a release whose charged event samples at a rate above it 1.0
``max-releases``          a release once the ledger holds this many (training      unlimited
                          rounds and evaluations, over every run)
``max-probes``            a request with more than this many probe seeds K         1024
``min-beta``              a request whose ZO scale beta is below it                1e-4
``allow-nonprivate``      a run whose setup disables privacy, or an exact          false
                          (non-private) evaluation, unless true
``allow-float-noise``     a run whose setup asks for floating-point Gaussian       false
                          noise (``privacy.noise = "gaussian"``), unless true
========================  =======================================================  ==========

The first three are checked against **the event the silo charges and the releases its ledger
counts**, never against what a request says of itself: :meth:`Limits.admit` runs inside the
ledger's write transaction (:meth:`~seedtune.common.privacy.ledger.PrivacyLedger.charge`), so a
request labelled with an old round number, an evaluation, or another process serving the same
silo all count alike. The same check also runs on the event before anything is computed, so a
refused request costs nothing.

``min-beta``: a finite difference divides float rounding by 2 beta. Each example's row is computed
from that example alone (:mod:`seedtune.common.estimator`), so rounding cannot carry one example's
presence into another's row; the floor is defence in depth against hardware where that might not
hold, and against requests whose beta is below float32 resolution (where the estimate is noise).

``seedtune simulate`` runs every silo for the one user who started it, so there non-private
runs and floating-point noise are allowed; a deployed SuperNode refuses them unless its operator
says otherwise.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import dp_accounting
from seedtune.common.errors import SeedtuneError
from seedtune.common.privacy.accounting import DiscreteGaussianDpEvent
from seedtune.common.privacy.distributed import DistributedDiscreteGaussianDpEvent
from seedtune.common.protocol import MIN_BETA, TrainRequest
from seedtune.common.wire import MAX_PROBES


class NodeConfigError(SeedtuneError):
    """A SuperNode's node configuration that a silo cannot run with."""


def node_setting(node_config: Mapping, key: str, default, kind: type, valid, rule: str):
    """``node_config[key]`` as ``kind`` (an int only from a whole number: 3.7 is not 3), or
    ``default`` when it is not set; a value that is not ``valid`` is a one-line error naming it."""
    if key not in node_config:
        return default
    raw = node_config[key]
    try:
        value = kind(raw)
        if kind is int and str(value) != str(raw).strip():
            value = None
    except (TypeError, ValueError):
        value = None
    if value is None or isinstance(raw, bool) or not valid(value):
        raise NodeConfigError(f"node config {key}={raw!r} must be {rule}")
    return value

RENAMED = {"max-rounds": "max-releases"}


class RequestRefused(SeedtuneError):
    """A request outside this silo's limits; nothing was sampled, computed, charged or released."""


@dataclass(frozen=True)
class Limits:
    min_noise_multiplier: float = 0.0
    max_probes: int = MAX_PROBES
    max_sample_rate: float = 1.0
    max_releases: int | None = None
    min_beta: float = MIN_BETA
    allow_nonprivate: bool = False
    allow_float_noise: bool = False

    @classmethod
    def from_node_config(cls, node_config: Mapping, *, allow_nonprivate: bool = False) -> Limits:
        """The limits in a SuperNode's ``--node-config``; a bad value is a one-line error."""
        for old, new in RENAMED.items():
            if old in node_config:
                raise SeedtuneError(f"node config {old} is now {new} (it counts every release in the silo's "
                                    f"ledger, not the round a request names): write {new}={node_config[old]}")

        def number(key: str, default, kind, valid, rule: str):
            return node_setting(node_config, key, default, kind, valid, rule)

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
            max_releases=number("max-releases", None, int, lambda v: v >= 1, "an integer >= 1"),
            min_beta=number("min-beta", MIN_BETA, float, lambda v: math.isfinite(v) and v > 0,
                            f"a number > 0 (default {MIN_BETA:g})"),
            allow_nonprivate=flag("allow-nonprivate"),
            allow_float_noise=flag("allow-float-noise"),
        )

    # -- before anything is computed -------------------------------------------------------------
    def check_training(self, request: TrainRequest, *, private: bool, noise: str = "discrete") -> None:
        """Refuse a training request outside the limits, saying which."""
        self.check_privacy(private, "a run with privacy disabled")
        self.check_noise(private, noise)
        if len(request.probe_seeds) > self.max_probes:
            self._refuse(f"{len(request.probe_seeds)} probes exceed this silo's ceiling {self.max_probes} (max-probes)")
        if request.beta < self.min_beta:
            self._refuse(f"beta {request.beta:g} is below this silo's floor {self.min_beta:g} (min-beta): a finite "
                         "difference that small is float rounding, not a gradient")

    def check_evaluation(self, *, private: bool, noise: str = "discrete") -> None:
        self.check_privacy(private, "an exact (non-private) evaluation")
        self.check_noise(private, noise)

    def check_privacy(self, private: bool, what: str) -> None:
        if not private and not self.allow_nonprivate:
            self._refuse(f"{what} would release values without noise; this silo allows that only "
                         "with allow-nonprivate=true")

    def check_noise(self, private: bool, noise: str) -> None:
        if private and noise != "discrete" and not self.allow_float_noise:
            self._refuse(f"privacy.noise={noise!r} would release floating-point noise, whose low-order bits can "
                         "leak; this silo allows that only with allow-float-noise=true")

    # -- against what is charged and counted -----------------------------------------------------
    def admit(self, event: dp_accounting.DpEvent, releases: int) -> None:
        """Refuse charging ``event`` to a ledger that already holds ``releases`` releases. Called by
        the ledger inside its write transaction, and by the silo before it computes anything."""
        sigma, rate = _mechanism(event)
        if sigma < self.min_noise_multiplier:
            self._refuse(f"the release would be charged at noise multiplier {sigma:g}, below this silo's floor "
                         f"{self.min_noise_multiplier:g} (min-noise-multiplier)")
        if rate > self.max_sample_rate:
            self._refuse(f"the release would sample at rate {rate:g}, above this silo's ceiling "
                         f"{self.max_sample_rate:g} (max-sample-rate)")
        if self.max_releases is not None and releases >= self.max_releases:
            self._refuse(f"this silo's ledger already holds {releases} releases, its ceiling (max-releases)")

    @staticmethod
    def _refuse(reason: str) -> None:
        raise RequestRefused(f"request refused: {reason}")


def _mechanism(event: dp_accounting.DpEvent) -> tuple[float, float]:
    """(sigma, q) of a release event: its (discrete) Gaussian's noise multiplier and its Poisson
    rate (1 when nothing is sampled: an evaluation counts every held-out example)."""
    rate = 1.0
    while isinstance(event, dp_accounting.PoissonSampledDpEvent):
        rate *= event.sampling_probability
        event = event.event
    if isinstance(event, (dp_accounting.GaussianDpEvent, DiscreteGaussianDpEvent)):
        return float(event.noise_multiplier), rate
    if isinstance(event, DistributedDiscreteGaussianDpEvent):  # the summed noise the silo counts on
        return float(event.noise_multiplier) * math.sqrt(event.parties), rate
    raise RequestRefused(f"request refused: this silo does not release {type(event).__name__}")
