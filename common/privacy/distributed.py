"""Accounting for noise that several silos add in shares (secure aggregation with distributed noise).

Under secure aggregation each participant adds integer noise N_Z(0, s^2) per coordinate to its own
lattice release, and the coordinator sees only the sum of the releases. A silo that assumes t
honest participants (itself included) is protected by the sum of at least t independent shares:
noise from more participants, or from dishonest ones that did add theirs, is independent of its
data, and adding it is post-processing. The sum of t discrete Gaussians is close to, but not
exactly, N_Z(0, t s^2); how close is the tau term below.

**The mechanism without sampling** (Kairouz, Liu, Steinke 2021, "The Distributed Discrete Gaussian
Mechanism for Federated Learning with Secure Aggregation", Proposition 14 / eq. (17), as Google's
reference implementation computes it: google-research/federated,
``distributed_dp/accounting_utils.py``, ``compute_rdp_dgaussian``). For integer vectors of
dimension d whose L2 distance is at most D2 and L1 distance at most D1, the sum of t independent
N_Z(0, s^2)^d satisfies, at every order alpha >= 1,

    eps(alpha) <= min{ alpha D2^2 / (2 t s^2) + tau d,
                       alpha / 2 (D2^2 / (t s^2) + 2 D1 tau / (sqrt(t) s) + tau^2 d),
                       alpha / 2 (D2 / (sqrt(t) s) + tau sqrt(d))^2 },
    tau = 10 sum_{k=1}^{t-1} exp(-2 pi^2 s^2 k / (k + 1)).

At t = 1, tau = 0 and it is the discrete Gaussian's bound (Canonne, Kamath, Steinke 2020). A
silo's release is an integer vector on the lattice of :mod:`~seedtune.common.privacy.mechanism`
(units of g), so D2 is its lattice sensitivity D, and D1 <= min(sqrt(d) D2, D2^2) (an integer
vector's L1 norm is at most its squared L2 norm). At the shares seedtune uses (s in the thousands
of lattice units) tau underflows to zero: the bound is then exactly the discrete Gaussian's at
the summed variance t s^2.

**Poisson sampling at rate q** (each silo samples its own shard): the general upper bound of Zhu and
Wang 2019 ("Poisson Subsampled Renyi Differential Privacy", ICML, the bound for any mechanism
with RDP curve eps, integer orders), as the same reference implementation computes it
(``_compute_rdp_subsampled``, ``upper_bound=True``):

    eps'(alpha) <= log[ (1-q)^(alpha-1) (alpha q - q + 1) + C(alpha,2) q^2 (1-q)^(alpha-2) e^eps(2)
                        + 3 sum_{l=3}^{alpha} C(alpha,l) (1-q)^(alpha-l) q^l e^((l-1) eps(l)) ] / (alpha - 1),

and never more than eps(alpha) itself. This general bound does not use the Gaussian shape, and
it is loose: at the default's q = 0.05 and 1,200 steps it charges a fifth more epsilon than the
sampled Gaussian at the same summed noise, and at epsilon = 2 it needed twelve times the noise.
So the charge is the smaller of it and a second bound (:func:`sampled_gaussian_rdp`): the sum of
shares is within max-divergence tau d of one discrete Gaussian of the summed variance, whose
sampled curve is charged as a silo's own noise is, plus 3 tau d. At seedtune's shares tau is 0.

Assumptions: the shares are independent of each other and of the data; at least t participants
of the round are honest (add their share, keep it secret); one record belongs to one silo, so it
moves one participant's release only; and the release is computed on a Poisson sample. Both
directions of adjacency (a record added, a record removed) are covered by the bounds above;
``tests/test_distributed_noise.py`` checks them against exact summation over the lattice.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import attr
import dp_accounting
import numpy as np
from scipy.special import gammaln, logsumexp


@attr.s(frozen=True, slots=True, auto_attribs=True)
class DistributedDiscreteGaussianDpEvent(dp_accounting.DpEvent):
    """The sum of ``parties`` independent shares N_Z(0, s^2)^dimension added to an integer vector of
    L2 sensitivity D (``sensitivity``, in lattice units): ``noise_multiplier`` is s / D, the
    multiplier of *one* share, and ``dimension`` is d. With ``parties`` = 1 it is the discrete
    Gaussian mechanism itself."""

    noise_multiplier: float
    parties: int
    dimension: int
    sensitivity: float


def tau(share_std: float, parties: int) -> float:
    """KLS21's tau: how far the sum of ``parties`` shares of std ``share_std`` (lattice units) is
    from one discrete Gaussian of their summed variance."""
    k = np.arange(1, parties, dtype=np.float64)
    return float(10.0 * np.exp(-2.0 * math.pi**2 * share_std**2 * k / (k + 1)).sum())


def summed_rdp(event: DistributedDiscreteGaussianDpEvent, alpha: float) -> float:
    """eps(alpha) of the unsampled mechanism, KLS21 Prop. 14."""
    d, t, sensitivity = event.dimension, event.parties, event.sensitivity
    share_std = event.noise_multiplier * sensitivity
    l2 = sensitivity / (math.sqrt(t) * share_std)  # D2 over the summed std
    l1 = min(math.sqrt(d) * sensitivity, sensitivity**2) / (math.sqrt(t) * share_std)
    spread = tau(share_std, t)
    return min(alpha / 2 * l2**2 + spread * d,
               alpha / 2 * (l2**2 + 2 * l1 * spread + spread**2 * d),
               alpha / 2 * (l2 + spread * math.sqrt(d)) ** 2)


def poisson_subsampled_rdp(sample_rate: float, rdp: Sequence[float], alpha: int) -> float:
    """Zhu and Wang's general upper bound at integer ``alpha`` >= 2 for a mechanism whose RDP at
    order l is ``rdp[l]`` (l = 2 .. alpha), run on a Poisson sample at ``sample_rate``."""
    q = sample_rate
    if q >= 1.0:
        return rdp[alpha]
    if q <= 0.0:
        return 0.0
    log_q, log_1q = math.log(q), math.log1p(-q)
    logs = [(alpha - 1) * log_1q + math.log(alpha * q - q + 1),
            _log_binomial(alpha, 2) + 2 * log_q + (alpha - 2) * log_1q + rdp[2]]
    logs += [math.log(3.0) + _log_binomial(alpha, l) + (alpha - l) * log_1q + l * log_q + (l - 1) * rdp[l]
             for l in range(3, alpha + 1)]
    return min(float(logsumexp(logs)) / (alpha - 1), rdp[alpha])


def _log_binomial(n: int, k: int) -> float:
    return float(gammaln(n + 1) - gammaln(k + 1) - gammaln(n - k + 1))


def rdp_curve(event: dp_accounting.DpEvent, orders: Sequence[int]) -> np.ndarray:
    """The RDP of ``event`` (a distributed discrete Gaussian, Poisson-sampled or not, possibly
    self-composed) at each integer order in ``orders``."""
    count = 1
    if isinstance(event, dp_accounting.SelfComposedDpEvent):
        event, count = event.event, event.count
    rate = 1.0
    if isinstance(event, dp_accounting.PoissonSampledDpEvent):
        event, rate = event.event, event.sampling_probability
    if not isinstance(event, DistributedDiscreteGaussianDpEvent):
        raise TypeError(f"not a distributed discrete Gaussian event: {event!r}")
    top = max(orders)
    base = [math.inf, math.inf] + [summed_rdp(event, alpha) for alpha in range(2, top + 1)]
    curve = np.array([poisson_subsampled_rdp(rate, base, int(alpha)) for alpha in orders])
    if rate < 1.0:
        curve = np.minimum(curve, sampled_gaussian_rdp(event, rate, orders))
    return count * curve


def sampled_gaussian_rdp(event: DistributedDiscreteGaussianDpEvent, rate: float, orders: Sequence[int]) -> np.ndarray:
    """The second bound for Poisson sampling: the sum of t shares is within max-divergence tau d,
    both ways, of one discrete Gaussian N_Z(0, t s^2)^d (KLS21 Prop. 13), and so is each component
    of the sampled mixture, hence the mixture too; a pointwise ratio within e^(+-eta) moves a Renyi
    divergence of order alpha by at most eta (2 alpha - 1) / (alpha - 1) <= 3 eta (alpha >= 2). The
    sampled discrete Gaussian at multiplier sqrt(t) s is charged as dp-accounting's sampled
    Gaussian at integer orders, as a silo's own noise is (``accounting.py`` says why; the exact
    summations of ``tests/test_distributed_noise.py`` check the result). At seedtune's shares tau
    underflows to 0 and this is exactly the curve one silo's own noise of multiplier sqrt(t) s is
    charged by, where the general bound above costs a fifth more epsilon or far more at small
    epsilon."""
    from dp_accounting import rdp  # noqa: PLC0415 - the accountant's own sampled-Gaussian curve

    accountant = rdp.RdpAccountant(orders=[float(alpha) for alpha in orders])
    accountant.compose(dp_accounting.PoissonSampledDpEvent(
        rate, dp_accounting.GaussianDpEvent(event.noise_multiplier * math.sqrt(event.parties))))
    spread = tau(event.noise_multiplier * event.sensitivity, event.parties) * event.dimension
    return np.asarray(accountant._rdp, dtype=np.float64) + 3.0 * spread  # no public getter of the curve
