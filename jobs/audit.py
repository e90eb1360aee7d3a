"""``seedtune audit``: an empirical lower bound on what one silo's release leaks, beside what its
ledger charges.

The ledger *claims* an upper bound: a release at noise multiplier sigma and sampling rate q spends
at most epsilon at delta. An audit tests the claim from the other side. It plays an adversarial
coordinator against **real silos** (:class:`~seedtune.client.node.SiloNode`, answering through the
ClientApp's own handler), runs one round's release many times on two neighbouring datasets, and
measures how well a test tells them apart. Any (epsilon, delta)-DP release limits that, so a test
that does too well refutes the claim or the code.

What runs is what a deployed silo runs: the setup is decoded and checked by the silo, its limits
are its defaults, it Poisson-samples its shard, computes the model's per-example losses with its
own estimator, clips, charges the event to its own SQLite ledger and adds its own noise. The
audit reads epsilon from the event the silo charged, not from a formula of its own.

**The neighbours** (Nasr et al. 2021, "Adversary Instantiation", IEEE S&P). D is the first
``AUDIT_EXAMPLES`` training examples of the config's data. D' is D plus one canary, a real
example (text and label): among ``CANDIDATES`` further training examples with their labels
flipped, the one whose per-example difference vector s (round 0's probes, the request's beta, the
starting model) is longest. Clipped, it moves the sum by min(|s|, C) along u = s / |s|; the report
gives |s| / C (>= 1: the canary sits at the clip bound, as far as any example can move the sum).

**The adversary** sees each release R and, to catch a silo whose noise is predictable from public
values, also a *shadow* release S: a second silo built from the same public setup and request
over D alone, as anyone could build one. Four scores per trial, each a test statistic:

* ``canary``: <R, u>; with Gaussian noise N(0, (sigma C)^2 I) the two worlds differ by a shift
  along u, and by Neyman-Pearson a threshold on this score is the most powerful test;
* ``shift``: <R, d>, d the direction of the mean difference between the worlds' releases as
  measured on the first half of the trials: catches a release that moves by more than the canary
  (one example changing the others' rows);
* ``canary-paired`` and ``shift-paired``: the same on R - S. With secret noise this only adds
  noise; with noise the adversary can reproduce, R - S is the sum's difference exactly.

A release that is not finite scores +inf: whether a silo releases NaN must not depend on its data.

**Two bounds**, from the half of the trials not used to choose the statistic and threshold: the
assumption-free Clopper-Pearson bound and the Gaussian (GDP) bound of
:mod:`seedtune.common.privacy.audit`, which says what each assumes.

The verdict is a violation if either bound exceeds the charged epsilon, or if a silo released a
value that is not finite. An attack the silo refuses (before it samples, computes, charges or
releases anything) is consistent: the report names the refusal.

**Attacks** (``--attack``), each the way a coordinator could get more out of a silo than its ledger
charges (issue 13; ``docs/threat-model.md``):

* ``noise-seed``: the run's setup carries ``privacy.noise_seed``, asking the silo to draw its
  sample and noise from a seed the coordinator knows;
* ``nonfinite``: the coordinator sends a checkpoint whose classification head overflows the
  canary's loss, and only the canary's, to infinity;
* ``padding``: the canary is a long text and beta is 1e-7, so that if the batch's padded width (set
  by its longest example) changed the other examples' float32 losses, the change would count;
* ``none``: an honest request.

``noise_scale`` (a test hook, not on the command line) builds silos whose noise is drawn at
``noise_scale`` times the charged sigma: the negative control the audit must flag.
"""

from __future__ import annotations

import copy
import hashlib
import math
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from fractions import Fraction
from collections.abc import Callable
from pathlib import Path

import datasets
import numpy as np
import torch
from seedtune.client.app import handle_train
from seedtune.client.limits import Limits
from seedtune.client.node import SiloNode
from seedtune.common import components
from seedtune.common.config import Config
from seedtune.common.errors import ConfigError, SeedtuneError
from seedtune.common.estimator import ZerothOrderEstimator
from seedtune.common.privacy.accounting import calibrate_noise_multiplier, epsilon_of
from seedtune.common.privacy.audit import (
    choose_threshold,
    clopper_pearson_upper,
    epsilon_lower_bound,
    error_counts,
    expected_flagged_scale,
    gaussian_shift_lower,
    gdp_epsilon,
)
from seedtune.common.privacy.mechanism import NoiseMechanism
from seedtune.common.privacy.randomness import SecretRandomness
from seedtune.common.protocol import ReleaseParameters, TrainRequest, probe_seeds
from seedtune.common.updatelog import Checkpoint
from seedtune.common.wire import Setup, Sync, WireError, encode_request
from tqdm.auto import tqdm

AUDIT_EXAMPLES = 64  # D: the first 64 training examples
CANDIDATES = 32  # further training examples, labels flipped, tried as the canary
DEFAULT_TRIALS = 2_000  # per dataset: flags a release noised at half its sigma (tests/test_audit.py)
DEFAULT_EPSILON = 2.0  # one release calibrated to this: where the Gaussian bound has most power
MIN_TRIALS = 100
ACCOUNTANT = "rdp"  # the only accountant for discrete noise
ATTACKS = ("none", "noise-seed", "nonfinite", "padding")
ATTACK_BETA = {"padding": 1e-7}
ATTACK_NOISE_SEED = 1234
STATISTICS = ("canary", "shift", "canary-paired", "shift-paired")


@dataclass(frozen=True)
class AuditResult:
    """One audit: the release audited, the test's counts on its held-out half, and the epsilons."""

    attack: str
    noise: str  # "discrete", "gaussian" or "off"
    noise_multiplier: float  # sigma of the request, which the silo charged (0 with noise off)
    noise_scale: float  # the silos drew their noise at noise_scale * sigma (1 unless a test says otherwise)
    sample_rate: float  # q of the audited release
    probes: int  # K
    clip_bound: float  # C
    beta: float
    delta: float
    examples: int  # n, the size of D (D' has n + 1)
    trials: int  # per dataset; half choose the statistic and threshold, half test them
    confidence: float
    canary: str  # the canary's text (shortened)
    canary_norm: float  # |s| / C of the canary's difference vector (>= 1: at the clip bound)
    statistic: str  # the score chosen on the first half
    threshold: float  # declare D' when score >= threshold
    false_positives: int  # of test_trials releases on D
    false_negatives: int  # of test_trials releases on D'
    test_trials: int
    fpr_upper: float
    fnr_upper: float
    epsilon_lower: float  # assumption-free (Clopper-Pearson)
    mu_lower: float  # Gaussian: lower confidence bound on the shift over the noise's std
    epsilon_gaussian: float  # epsilon of mu_lower-GDP at delta
    nonfinite_releases: int  # releases with a NaN or infinite value (any world)
    epsilon_accountant: float  # of the event the silos charged (inf with noise off)
    releases_charged: int  # in the two audited silos' ledgers
    rows_zeroed: int  # per-example rows the audited silos counted as zero for not being finite (their ledgers)
    flagged_scale: float  # power: in expectation, a release noised at <= this times sigma is flagged
    epsilon_ceiling: float  # the highest assumption-free bound test_trials can show
    refused: str  # why the silo refused the attack's request ("" if it answered)
    wall_s: float

    @property
    def consistent(self) -> bool:
        if self.refused:
            return True
        return (self.nonfinite_releases == 0 and self.epsilon_lower <= self.epsilon_accountant
                and self.epsilon_gaussian <= self.epsilon_accountant)

    @property
    def verdict(self) -> str:
        if self.refused:
            return "consistent: the silo refused the attack before releasing anything"
        if self.consistent:
            return "consistent: both lower bounds <= the charged epsilon"
        if self.nonfinite_releases:
            return "VIOLATION: a silo released values that are not finite"
        return "VIOLATION: the release leaks more than the silo charged for it"

    def to_dict(self) -> dict:
        """JSON-ready: an infinite epsilon is written as the string "inf" (float("inf") reads it back)."""
        values = {key: "inf" if isinstance(value, float) and math.isinf(value) else value
                  for key, value in asdict(self).items()}
        return {**values, "consistent": self.consistent, "verdict": self.verdict}


# -- the silos under audit ---------------------------------------------------------------------
class _Remembered:
    """An estimator that returns a copy of its earlier result for the same inputs.

    The model does not change during an audit and the estimator is deterministic, so a batch it
    has seen gives the same differences again; at q = 1 every trial's batch is the same, and the
    audit then costs milliseconds a trial instead of 2K forward passes."""

    def __init__(self, estimator):
        self._estimator = estimator
        self._results: dict[str, object] = {}

    def __getattr__(self, name: str):
        method = getattr(self._estimator, name)
        if not callable(method):
            return method

        def remembered(*args, **kwargs):
            key = _fingerprint((name, args, kwargs))
            if key not in self._results:
                self._results[key] = method(*args, **kwargs)
            return copy.deepcopy(self._results[key])

        return remembered


def _fingerprint(value) -> str:
    digest = hashlib.blake2b(digest_size=16)

    def feed(item) -> None:
        if isinstance(item, torch.Tensor):
            digest.update(str((item.dtype, tuple(item.shape))).encode())
            digest.update(item.detach().cpu().contiguous().numpy().tobytes())
        elif isinstance(item, dict):
            for key in sorted(item, key=str):
                feed(key)
                feed(item[key])
        elif isinstance(item, (list, tuple)):
            digest.update(f"[{len(item)}".encode())
            for part in item:
                feed(part)
        elif isinstance(item, (str, int, float, bool, type(None))):
            digest.update(repr(item).encode())
        else:  # a task or model: the same object throughout one audit
            digest.update(f"<{id(item)}>".encode())

    feed(value)
    return digest.hexdigest()


class _ScaledNoise(SecretRandomness):
    """The operating system's randomness, but noise at ``scale`` times what was asked for: a
    broken silo, for the audit's negative control."""

    def __init__(self, scale: float):
        self.scale = Fraction(scale)

    def discrete_gaussian(self, n: int, sigma_squared: Fraction) -> np.ndarray:
        return super().discrete_gaussian(n, Fraction(sigma_squared) * self.scale * self.scale)

    def normal(self, n: int) -> np.ndarray:
        return super().normal(n) * float(self.scale)


@dataclass
class _Silo:
    """One real silo node over one dataset, and what it has been sent."""

    node: SiloNode
    synced: bool = False


def _make_silo(directory: Path, rows: dict, *, budget: tuple[float, float, str], limits: Limits,
               noise_scale: float, name: str, randomness: Callable[[], SecretRandomness] | None) -> _Silo:
    shard = datasets.Dataset.from_dict(rows)
    kwargs = {}
    if randomness is not None:
        kwargs["randomness"] = randomness
    elif noise_scale != 1.0:
        kwargs["randomness"] = lambda: _ScaledNoise(noise_scale)
    node = SiloNode(directory, lambda config, label_names, split: shard, budget=budget, limits=limits, name=name,
                    **kwargs)
    return _Silo(node)


# -- the audit ------------------------------------------------------------------------------------
def validate(*, epsilon: float | None, trials: int, sample_rate: float, noise_off: bool, confidence: float,
             attack: str = "none", beta: float | None = None) -> None:
    """The audit's own settings, checked before anything is loaded."""

    def need(ok: bool, message: str) -> None:
        if not ok:
            raise SeedtuneError(message)

    need(trials >= MIN_TRIALS, f"--trials {trials} must be >= {MIN_TRIALS} (default {DEFAULT_TRIALS})")
    need(0 < confidence < 1, f"--confidence {confidence} must be in (0, 1), e.g. 0.95")
    need(0 < sample_rate <= 1, f"--sample-rate {sample_rate} must be in (0, 1]; 1 gives the sharpest test")
    need(attack in ATTACKS, f"--attack {attack!r} is not an attack; use one of {', '.join(ATTACKS)}")
    if beta is not None:
        need(beta > 0 and math.isfinite(beta), f"--beta {beta} must be a finite number > 0")
    if epsilon is not None:
        need(epsilon > 0 and math.isfinite(epsilon), f"--epsilon {epsilon} must be a finite number > 0")
        need(not noise_off, "--noise-off releases without noise: there is no sigma for --epsilon to calibrate; "
                            "drop one of them")


@dataclass
class _Experiment:
    """What the audit's silos are sent, and the two neighbouring datasets they hold."""

    run_id: str
    setup: Setup
    seeds: tuple[int, ...]
    beta: float
    step: int  # the first trial's step: the model the coordinator sends is after this many steps
    checkpoint: Checkpoint | None
    worlds: tuple[dict, dict]  # D, D' (columns "text" and "label")
    canary: str
    canary_norm: float  # |s| / C
    direction: np.ndarray  # u = s / |s|


@dataclass
class _Trials:
    releases: np.ndarray  # [world][target, shadow][trial][k]
    nonfinite: int  # releases of the targets with a value that is not finite
    charged: list  # the events the targets' ledgers charged
    zeroed: int  # rows the targets counted as zero
    refused: str  # why the silos refused ("" if they answered)


def run_audit(
    config: Config,
    *,
    epsilon: float | None = None,
    trials: int = DEFAULT_TRIALS,
    sample_rate: float = 1.0,
    noise_off: bool = False,
    confidence: float = 0.95,
    attack: str = "none",
    beta: float | None = None,
    noise_scale: float = 1.0,
    randomness: Callable[[], SecretRandomness] | None = None,
    progress: bool = False,
    workdir: str | Path | None = None,
) -> AuditResult:
    """Audit one round's release by real silos of ``config`` at sampling rate ``sample_rate``.

    sigma is calibrated so that one release at ``sample_rate`` spends ``epsilon`` (default
    ``DEFAULT_EPSILON``) at the config's delta; the silos charge it and the report's charged
    epsilon is read from their ledgers. ``noise_off`` audits a non-private run (no clipping, no
    noise), which the silos are told to allow. ``beta``: the request's ZO scale (default: the
    attack's, else the schedule's first). ``workdir``: where the silos' state directories go
    (default: a temporary directory, in memory where the system has one), removed afterwards.
    ``randomness``: a test hook, each silo's sampling and noise source (called once per silo).
    """
    validate(epsilon=epsilon, trials=trials, sample_rate=sample_rate, noise_off=noise_off, confidence=confidence,
             attack=attack, beta=beta)
    if not noise_scale > 0:
        raise ValueError(f"noise_scale must be > 0, got {noise_scale}")
    started = time.perf_counter()
    p = config.privacy
    sigma = _sigma(config, epsilon, sample_rate, noise_off)
    beta = beta if beta is not None else ATTACK_BETA.get(attack, components.make_schedule(config).plan(0).beta)
    experiment = _experiment(config, attack, beta, noise_off)
    limits = Limits(allow_nonprivate=noise_off, allow_float_noise=p.noise == "gaussian")
    root = Path(tempfile.mkdtemp(prefix="seedtune-audit-", dir=workdir or _memory_dir()))
    try:
        silos = _silos(root, experiment, p.delta, limits, noise_scale, randomness)
        outcome = _play(silos, experiment, trials, sigma, p.clip_bound, sample_rate, attack, progress)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    epsilon_accountant = _charged_epsilon(outcome.charged, p.delta, noise_off)
    half = trials // 2
    test_trials = trials - half
    flagged = _power(config, sigma, experiment, epsilon_accountant, test_trials, confidence)
    common = dict(
        attack=attack, noise="off" if noise_off else p.noise, noise_multiplier=sigma, noise_scale=noise_scale,
        sample_rate=sample_rate, probes=len(experiment.seeds), clip_bound=p.clip_bound, beta=beta, delta=p.delta,
        examples=len(experiment.worlds[0]["text"]), trials=trials, confidence=confidence,
        canary=_shorten(experiment.canary), canary_norm=experiment.canary_norm, test_trials=test_trials,
        epsilon_accountant=epsilon_accountant, releases_charged=len(outcome.charged), rows_zeroed=outcome.zeroed,
        flagged_scale=flagged,
        epsilon_ceiling=float(epsilon_lower_bound(0, test_trials, 0, test_trials, p.delta, confidence)),
        wall_s=time.perf_counter() - started)
    if outcome.refused:
        return AuditResult(**common, statistic="-", threshold=math.nan, false_positives=0, false_negatives=0,
                           fpr_upper=1.0, fnr_upper=1.0, epsilon_lower=0.0, mu_lower=0.0, epsilon_gaussian=0.0,
                           nonfinite_releases=0, refused=outcome.refused)
    return AuditResult(**common, **_test(outcome, experiment.direction, half, p.delta, confidence))


def _sigma(config: Config, epsilon: float | None, sample_rate: float, noise_off: bool) -> float:
    """The noise multiplier at which one release at ``sample_rate`` spends ``epsilon``."""
    p = config.privacy
    if noise_off:
        return 0.0
    if not p.enabled:
        raise ConfigError("privacy.enabled=false: the config releases without noise; audit that with "
                          "--noise-off, or remove the setting")
    return calibrate_noise_multiplier(epsilon or DEFAULT_EPSILON, p.delta, sample_rate, 1, ACCOUNTANT, noise=p.noise)


def _experiment(config: Config, attack: str, beta: float, noise_off: bool) -> _Experiment:
    """The starting model, the canary, D and D', and the setup a coordinator playing ``attack`` sends."""
    data = components.load_data(config)
    task = components.load_model(config, data.label_names)
    reference = components.base_reference(config, task, data.label_names)
    parts = components.model_parts(config, task, components.mask_for(config, task, data))
    estimator = ZerothOrderEstimator(task.module, task.per_example_loss, parts.trainable, parts.directions)
    seeds = probe_seeds(config.seed, 0, config.zo.probes)

    base = data.train[: min(AUDIT_EXAMPLES, len(data.train))]
    pool = data.train[len(base["text"]): len(base["text"]) + CANDIDATES]
    canary_text, canary_label, canary_row = _choose_canary(
        task, estimator, pool, len(data.label_names), seeds, beta, long=attack == "padding")
    if attack == "nonfinite":
        canary_text = _with_own_token(task, canary_text, list(base["text"]))
    norm = torch.linalg.vector_norm(canary_row)
    worlds = ({"text": list(base["text"]), "label": list(base["label"])},
              {"text": [*base["text"], canary_text], "label": [*base["label"], canary_label]})

    setup_config = copy.deepcopy(config.to_dict())
    if noise_off:
        setup_config["privacy"]["enabled"] = False
    if attack == "noise-seed":
        setup_config["privacy"]["noise_seed"] = ATTACK_NOISE_SEED
    run_id = f"audit-{attack}"
    step, checkpoint = 0, None
    if attack == "nonfinite":
        step, checkpoint = 1, _overflowing_checkpoint(task, parts, canary_text, canary_label, worlds[0]["text"])
    return _Experiment(run_id, Setup(run_id, setup_config, reference, parts.trainable.mask()), seeds, beta, step,
                       checkpoint, worlds, canary_text, float(norm) / config.privacy.clip_bound,
                       (canary_row / norm).numpy())


def _silos(root: Path, experiment: _Experiment, delta: float, limits: Limits, noise_scale: float,
           randomness: Callable[[], SecretRandomness] | None) -> list[_Silo]:
    """Targets on D and D', then shadows on D (all four real nodes, each with its own ledger)."""
    budget = (1e6, delta, ACCOUNTANT)  # a real ledger that lets the trials through; each release's cost is read from it
    return [_make_silo(root / name, experiment.worlds[world], budget=budget, limits=limits, noise_scale=noise_scale,
                       name=name, randomness=randomness)
            for world, name in ((0, "target-d"), (1, "target-d-prime"), (0, "shadow-d"), (0, "shadow-d-prime"))]


def _play(silos: list[_Silo], experiment: _Experiment, trials: int, sigma: float, clip_bound: float,
          sample_rate: float, attack: str, progress: bool) -> _Trials:
    """Ask every silo the same question ``trials`` times, trial t as step ``experiment.step + t`` of an
    unchanging model, so that each is a fresh release (a refusal of the first ends the audit)."""
    releases = np.zeros((2, 2, trials, len(experiment.seeds)))
    refused = ""
    try:
        for silo in silos:
            silo.node.run(experiment.run_id, experiment.setup)
            run = silo.node.run(experiment.run_id)
            run.estimator = _Remembered(run.estimator)  # before the silo is built around it
    except (SeedtuneError, WireError, ValueError) as error:
        refused = f"{type(error).__name__}: {error}"
    for trial in tqdm(range(0 if refused else trials), disable=not progress, unit="trial",
                      desc=f"audit ({attack})", dynamic_ncols=True):
        request = TrainRequest(experiment.run_id, experiment.step + trial, experiment.seeds, experiment.beta,
                               ReleaseParameters(clip_bound, sigma, sample_rate, experiment.setup.config["privacy"]["noise"]))
        try:
            for world, role in ((0, 0), (0, 1), (1, 0), (1, 1)):
                releases[world, role, trial] = _answer(silos[world + 2 * role], request, experiment)
        except (SeedtuneError, WireError) as error:
            if trial > 0:
                raise
            refused = f"{type(error).__name__}: {error}"
            break
    nonfinite = 0 if refused else int(np.sum(~np.all(np.isfinite(releases[:, 0]), axis=-1)))
    ledgers = [silo.node.ledger for silo in silos[:2] if silo.node.ledger is not None]
    charged = [event for ledger in ledgers for event in ledger.events()]
    zeroed = sum(entry["zeroed"] for ledger in ledgers for entry in ledger.history())
    for silo in silos:
        silo.node.close()
    return _Trials(releases, nonfinite, charged, zeroed, refused)


def _power(config: Config, sigma: float, experiment: _Experiment, epsilon_accountant: float, test_trials: int,
           confidence: float) -> float:
    """The noise scale at or below which the test half would flag the release, in expectation."""
    p = config.privacy
    if not math.isfinite(epsilon_accountant) or sigma == 0:
        return 0.0
    noise_std = NoiseMechanism.for_release(p.noise, sigma, p.clip_bound).std(len(experiment.seeds))
    shift_units = min(experiment.canary_norm, 1.0) * p.clip_bound / noise_std if noise_std > 0 else math.inf
    return expected_flagged_scale(shift_units, epsilon_accountant, p.delta, test_trials, confidence)


def _charged_epsilon(charged: list, delta: float, noise_off: bool) -> float:
    """epsilon of the one event the targets charged for a release (inf with noise off)."""
    if noise_off:
        return math.inf
    if not charged:
        return 0.0  # nothing was charged
    distinct = set(charged)
    if len(distinct) != 1:
        raise SeedtuneError(f"the silos charged {len(distinct)} different events for one request: {distinct}")
    return epsilon_of([charged[0]], delta, ACCOUNTANT)


def _test(outcome: _Trials, direction: np.ndarray, half: int, delta: float, confidence: float) -> dict:
    """Choose the statistic and threshold on the first half of the trials; bound epsilon on the rest."""
    scores = _scores(outcome.releases, direction, half)
    best = None
    for name, (null, alternative) in scores.items():
        threshold, bound = choose_threshold(null[:half], alternative[:half], delta, confidence)
        gaussian = gdp_epsilon(gaussian_shift_lower(null[:half], alternative[:half], confidence), delta)
        strength = max(bound, gaussian)
        if best is None or strength > best[0]:
            best = (strength, name, threshold)
    _, name, threshold = best
    null, alternative = (s[half:] for s in scores[name])
    test_trials = len(null)
    false_positives, false_negatives = (int(c[0]) for c in error_counts(null, alternative, np.array([threshold])))
    level = 1.0 - (1.0 - confidence) / 2.0
    mu_lower = gaussian_shift_lower(null, alternative, confidence)
    return dict(
        statistic=name, threshold=threshold, false_positives=false_positives, false_negatives=false_negatives,
        fpr_upper=float(clopper_pearson_upper(false_positives, test_trials, level)),
        fnr_upper=float(clopper_pearson_upper(false_negatives, test_trials, level)),
        epsilon_lower=float(epsilon_lower_bound(false_positives, test_trials, false_negatives, test_trials,
                                                delta, confidence)),
        mu_lower=mu_lower, epsilon_gaussian=gdp_epsilon(mu_lower, delta), nonfinite_releases=outcome.nonfinite,
        refused="")


def _answer(silo: _Silo, request: TrainRequest, experiment: _Experiment) -> np.ndarray:
    """The silo's answer through the ClientApp's own handler; the released values as they left
    (before any coordinator-side validation, which would refuse a NaN the adversary still sees)."""
    if silo.synced:
        # The coordinator sent an empty step: the model is unchanged, and the next step's request is
        # a new question. Logging thousands of empty steps would cost a disk sync each, so the
        # replica's step counter moves instead.
        silo.node.run(experiment.run_id).applier.step = request.step
        sync = Sync(request.step, ())
    else:
        sync = Sync(experiment.step, (), experiment.setup, experiment.checkpoint)
    content = handle_train(encode_request(request, sync), silo.node)
    silo.synced = True
    return np.asarray(content.config_records["reply"]["projected_grads"], dtype=np.float64)


def _scores(releases: np.ndarray, direction: np.ndarray, half: int) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Each statistic's scores on D (null) and D' (alternative); non-finite releases score +inf."""

    def project(values: np.ndarray, unit: np.ndarray) -> np.ndarray:
        with np.errstate(invalid="ignore", over="ignore"):
            score = values @ unit
        return np.where(np.all(np.isfinite(values), axis=-1) & np.isfinite(score), score, np.inf)

    plain = releases[:, 0]
    paired = releases[:, 0] - releases[:, 1]
    out = {}
    for name, values in (("canary", plain), ("canary-paired", paired)):
        out[name] = (project(values[0], direction), project(values[1], direction))
    for name, values in (("shift", plain), ("shift-paired", paired)):
        finite = np.all(np.isfinite(values[:, :half]), axis=(0, 2))
        shift = (values[1, :half][finite].mean(axis=0) - values[0, :half][finite].mean(axis=0)
                 if finite.any() else direction)
        norm = float(np.linalg.norm(shift))
        unit = shift / norm if norm > 0 and np.isfinite(norm) else direction
        out[name] = (project(values[0], unit), project(values[1], unit))
    return out


def _choose_canary(task, estimator, pool, labels: int, seeds, beta: float, *, long: bool):
    """A real example, label flipped, whose difference vector is longest; or, with ``long``, the
    pool's texts joined into one that fills the model's whole input. (The adversary's own
    computation, on its own copy of the model: batched, since only the choice depends on it.)"""
    texts = list(pool["text"])
    flipped = [(label + 1) % labels for label in pool["label"]]
    if long:
        text = " ".join(texts)
        return text, flipped[0], _rows(task, estimator, [text], flipped[:1], seeds, beta)[0]
    rows = _rows(task, estimator, texts, flipped, seeds, beta)
    norms = torch.linalg.vector_norm(rows, dim=1)
    norms = torch.where(torch.isfinite(norms), norms, torch.full_like(norms, -1.0))
    best = int(torch.argmax(norms))
    return texts[best], flipped[best], rows[best]


def _rows(task, estimator, texts: list[str], labels: list[int], seeds, beta: float) -> torch.Tensor:
    """The examples' difference vectors (n x K, float64)."""
    return estimator.estimate_examples(task, texts, labels, seeds, beta).differences.to(torch.float64)


def _overflowing_checkpoint(task, parts, canary_text: str, canary_label: int, others: list[str]) -> Checkpoint:
    """A checkpoint of the trainable coordinates (what a coordinator may send a silo) that makes the
    canary's loss, and only the canary's, infinite or NaN in float32.

    * With the input embeddings trainable: the row of a token only the canary holds set to
      float32's largest value; the canary's embedding sums overflow to inf, and layer norm makes
      them NaN, whatever the perturbation.
    * With only the classification head trainable: row j of the head is a w_j e, with e the
      canary's sentence embedding, w = -1 for the canary's label and +1 for the others. The canary's
      logits are -a for its label and +a for the rest, so its cross-entropy is 2a + log(L - 1),
      infinite once 2a passes float32's largest value, while another example x_i gets at most
      2a |<x_i, e>|, finite for the a chosen here."""
    limit = float(torch.finfo(torch.float32).max)
    entries = {entry.name: entry for entry in parts.trainable}
    named = dict(task.module.named_parameters())
    embeddings = _input_embeddings(task.module)
    name = next((n for n, param in named.items() if embeddings is not None and param is embeddings.weight), None)
    values = {entry.name: entry.values().clone() for entry in parts.trainable}
    if name in entries and entries[name].index is None:
        token = _own_token(task, canary_text, others)
        if token is None:
            raise ConfigError("--attack nonfinite: the canary holds no token that D lacks")
        table = values[name].view(embeddings.weight.shape)
        table[token] = limit
    elif "classifier.weight" in entries and entries["classifier.weight"].index is None and hasattr(task.module, "embed"):
        with torch.no_grad():
            def embed(texts):
                batch = task.encode(texts)
                return task.module.embed(batch["input_ids"], batch["attention_mask"],
                                         batch.get("token_type_ids")).double()

            target = embed([canary_text])[0]
            closest = float((embed(others) @ target).abs().max())
        if closest >= 0.99:
            raise ConfigError("--attack nonfinite: the canary's sentence embedding is too close to another example's")
        scale = limit / 2 * (1 + (1 / max(closest, 0.5) - 1) / 2)  # 2a > limit > 2a |<x_i, e>|
        signs = torch.ones(len(task.label_names), dtype=torch.float64)
        signs[canary_label] = -1.0
        values["classifier.weight"] = (torch.outer(signs, target) * scale).to(values["classifier.weight"].dtype).flatten()
        if "classifier.bias" in values:
            values["classifier.bias"].zero_()
    else:
        raise ConfigError("--attack nonfinite needs the input embeddings or the whole classification head "
                          "trainable (prune.enabled=false, or prune.always = ['classifier.*'] with "
                          "model.task=sequence-classification)")
    return Checkpoint(1, tuple(values[entry.name].cpu() for entry in parts.trainable))


def _input_embeddings(module):
    for candidate in (module, getattr(module, "encoder", None), getattr(module, "lm", None)):
        getter = getattr(candidate, "get_input_embeddings", None)
        if getter is not None:
            try:
                return getter()
            except (NotImplementedError, AttributeError):
                continue
    return None


def _own_token(task, canary_text: str, others: list[str]) -> int | None:
    """A token id in the canary that no other example of D holds (and no special token other
    than the unknown-word token), or None."""
    unknown = task.tokenizer.unk_token_id
    special = set(task.tokenizer.all_special_ids) - {unknown}
    seen = {token for ids in task.encode(others)["input_ids"].tolist() for token in ids}
    own = [t for t in task.encode([canary_text])["input_ids"][0].tolist() if t not in seen and t not in special]
    return own[0] if own else None


def _with_own_token(task, canary_text: str, others: list[str]) -> str:
    """The canary, with a rare word added if it holds no token that D lacks."""
    if _own_token(task, canary_text, others) is None:
        canary_text = f"zyzzyva {canary_text}"
    if _own_token(task, canary_text, others) is None:
        raise ConfigError("--attack nonfinite: no token sets the canary apart from D")
    return canary_text


def _memory_dir() -> str | None:
    shm = Path("/dev/shm")
    return str(shm) if shm.is_dir() else None


def _shorten(text: str, limit: int = 60) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"
