"""Run configuration: typed, frozen, validated once at the edge.

One vocabulary for every way of running: a TOML file, ``--set section.key=value`` overrides and
(later) Flower's run config all use the same dotted keys. Unknown keys and out-of-range values
raise :class:`ConfigError` with a one-line message naming the key, the value and the fix.
"""

from __future__ import annotations

import difflib
import math
import warnings
import tomllib
from dataclasses import asdict, dataclass, field, fields, is_dataclass, replace
from importlib import resources
from pathlib import Path
from typing import Any, get_args, get_origin, get_type_hints

from seedtune.common.aggregation import RULES
from seedtune.common.directions import DISTRIBUTIONS
from seedtune.common.errors import ConfigError
from seedtune.common.privacy.accounting import ACCOUNTANTS, NOISES
from seedtune.common.protocol import MIN_BETA
from seedtune.common.tasks import TASKS

PRESETS = ("default", "tiny")


def _check(key: str, value: Any, ok: bool, expectation: str) -> None:
    if not ok:
        raise ConfigError(f"{key}={value!r} is invalid: it must be {expectation} (fix it with --set {key}=...)")


@dataclass(frozen=True)
class ModelConfig:
    name: str = "minilm"  # a registry name (minilm, tiny) or a local Hugging Face directory
    task: str = "sequence-classification"
    max_length: int = 64
    template: str = ""  # prompt tasks: must contain {text}; empty = the task's default
    head_scale: float = 20.0  # sequence classification: logit scale of the cosine head
    init_seed: int = 0  # the tiny model's random initialisation

    def validate(self) -> None:
        _check("model.task", self.task, self.task in TASKS, f"one of {', '.join(TASKS)}")
        _check("model.max_length", self.max_length, self.max_length >= 4, "an integer >= 4")
        _check("model.head_scale", self.head_scale, self.head_scale > 0, "> 0")
        _check("model.template", self.template, not self.template or "{text}" in self.template,
               "empty or a string containing {text}")


@dataclass(frozen=True)
class DataConfig:
    name: str = "rotten-tomatoes"
    split_seed: int = 0
    validation_fraction: float = 0.1
    test_fraction: float = 0.1
    max_train_examples: int = 0  # 0 = all
    synthetic_size: int = 2000
    labels: tuple[str, ...] = ()  # the label names a data file may hold, in id order; () = whatever it holds

    def validate(self) -> None:
        for key in ("validation_fraction", "test_fraction"):
            value = getattr(self, key)
            _check(f"data.{key}", value, 0 < value < 0.5, "in (0, 0.5)")
        _check("data.max_train_examples", self.max_train_examples, self.max_train_examples >= 0, ">= 0")
        _check("data.synthetic_size", self.synthetic_size, self.synthetic_size >= 20, ">= 20")


@dataclass(frozen=True)
class PrivacyConfig:
    enabled: bool = True
    epsilon: float = 6.0
    delta: float = 1e-5
    clip_bound: float = 1.0  # C: L2 bound on each example's K-vector of differences
    sample_rate: float = 0.003  # q: Poisson sampling rate
    noise_multiplier: float | None = None  # sigma; None = calibrate from (epsilon, delta, steps)
    accountant: str = "rdp"
    noise: str = "discrete"  # "discrete": exact integer noise on a lattice; "gaussian": floating-point

    def validate(self) -> None:
        _check("privacy.epsilon", self.epsilon, self.epsilon > 0 and math.isfinite(self.epsilon), "a finite number > 0")
        _check("privacy.delta", self.delta, 0 < self.delta < 1, "in (0, 1), e.g. 1e-5")
        _check("privacy.clip_bound", self.clip_bound, self.clip_bound > 0 and math.isfinite(self.clip_bound), "> 0")
        _check("privacy.sample_rate", self.sample_rate, 0 < self.sample_rate <= 1, "in (0, 1]")
        _check("privacy.accountant", self.accountant, self.accountant in ACCOUNTANTS, f"one of {ACCOUNTANTS}")
        _check("privacy.noise", self.noise, self.noise in NOISES, f"one of {NOISES}")
        _check("privacy.accountant", self.accountant, not (self.accountant == "pld" and self.noise == "discrete"),
               "'rdp' with privacy.noise='discrete' (PLD models the continuous Gaussian only; or set "
               "privacy.noise='gaussian')")
        if self.noise_multiplier is not None:
            _check("privacy.noise_multiplier", self.noise_multiplier,
                   self.noise_multiplier > 0 and math.isfinite(self.noise_multiplier),
                   "> 0 (leave it out to calibrate it from epsilon and delta)")


@dataclass(frozen=True)
class ZOConfig:
    probes: int = 1  # K directions per step
    distribution: str = "rademacher"
    sphere: bool = False  # DPZero's sphere of radius sqrt(d) (Gaussian only; Rademacher is on it)
    keep_prefix_mib: float = 1024  # memory a silo may keep examples' frozen-prefix outputs in across steps; 0 = off

    def validate(self) -> None:
        _check("zo.probes", self.probes, 1 <= self.probes <= 1024, "an integer in [1, 1024]")
        _check("zo.keep_prefix_mib", self.keep_prefix_mib,
               self.keep_prefix_mib >= 0 and math.isfinite(self.keep_prefix_mib), "a number of MiB >= 0 (0 = off)")
        _check("zo.distribution", self.distribution, self.distribution in DISTRIBUTIONS, f"one of {DISTRIBUTIONS}")


@dataclass(frozen=True)
class ScheduleConfig:
    kind: str = "stagewise"  # "constant" (DPZero) or "stagewise" (DP-ZOSO)
    steps: int = 1000
    lr: float = 2e-3  # eta (the first stage's, for stagewise)
    beta: float = 1e-3  # ZO scale (the first stage's, for stagewise)
    beta_end: float | None = None  # stagewise: the last stage's ZO scale; None = beta
    stages: int = 3
    prox: float = 0.0  # lambda of the proximal term (stagewise only)

    def validate(self) -> None:
        _check("schedule.kind", self.kind, self.kind in ("constant", "stagewise"), "'constant' or 'stagewise'")
        _check("schedule.steps", self.steps, self.steps >= 1, "an integer >= 1")
        _check("schedule.lr", self.lr, self.lr > 0 and math.isfinite(self.lr), "> 0")
        floor = f">= {MIN_BETA:g}, the smallest ZO scale a silo accepts by default (node config min-beta)"
        _check("schedule.beta", self.beta, self.beta >= MIN_BETA and math.isfinite(self.beta), floor)
        if self.beta_end is not None:
            _check("schedule.beta_end", self.beta_end, self.beta_end >= MIN_BETA and math.isfinite(self.beta_end),
                   floor)
        _check("schedule.stages", self.stages, 1 <= self.stages <= 16, "an integer in [1, 16]")
        _check("schedule.stages", self.stages, (1 << self.stages) - 1 <= self.steps,
               f"small enough that every stage has a step (2^stages - 1 <= steps={self.steps})")
        _check("schedule.prox", self.prox, self.prox >= 0, ">= 0")
        if self.kind == "constant":
            _check("schedule.prox", self.prox, self.prox == 0,
                   "0 for the constant (DPZero) schedule; use kind='stagewise' for a proximal term")


@dataclass(frozen=True)
class PruneConfig:
    enabled: bool = True
    ratio: float = 0.01  # r: the fraction of coordinates trained (by SynFlow score); 0 = only `always`
    always: tuple[str, ...] = ("classifier.*",)  # parameter-name patterns trained in full

    def validate(self) -> None:
        _check("prune.ratio", self.ratio, 0 <= self.ratio <= 1, "in [0, 1]")


@dataclass(frozen=True)
class LoRAConfig:
    enabled: bool = False  # train LoRA adapters (through peft) and the prune.always tensors, not a mask
    rank: int = 8
    alpha: float = 16.0
    targets: tuple[str, ...] = ()  # module names to adapt; empty = peft's default for the model type

    def validate(self) -> None:
        _check("lora.rank", self.rank, 1 <= self.rank <= 1024, "an integer in [1, 1024]")
        _check("lora.alpha", self.alpha, self.alpha > 0 and math.isfinite(self.alpha), "> 0")


@dataclass(frozen=True)
class FederationConfig:
    silos: int = 3  # silos in a simulation (a deployment has as many as connect)
    fraction: float = 1.0  # share of silos asked each round (sampled from public randomness)
    min_silos: int = 1  # a round is applied only with at least this many valid replies
    partition: str = "iid"  # how a simulation splits the training set: "iid", "label-skew", "quantity-skew"
    alpha: float = 0.5  # label/quantity skew: Dirichlet concentration (small = more skewed)
    round_timeout: float = 300.0  # seconds to wait for a silo's reply (k of them if a simulated process answers k in turn)
    round_retries: int = 2  # a round short of min_clients is asked again this often, then the run stops
    max_replay: int = 2000  # a silo further behind than this gets a checkpoint instead of replay
    silo_eval: str = "off"  # evaluation on silos' own data: "off", "private" (noised, charged) or "nonprivate" (warns)
    silo_eval_std: float = 5.0  # private silo evaluation: noise standard deviation per count (not a multiplier)
    aggregation: str = "mean"  # how replies combine: "mean" (weighted by q n), "median", "trimmed-mean"
    trim: float = 0.2  # trimmed-mean: drop floor(trim * N) of the N values at each end of every coordinate
    local_steps: int = 1  # tau: steps each silo takes on its own shard per round (1: one step per round)
    # Secure aggregation with distributed noise (docs/design.md): each silo adds a share of the
    # noise to its integer release and masks it; the coordinator learns only the round's sum.
    secure_aggregation: bool = False
    secure_bits: int = 0  # b: replies are integers mod 2^b; 0 = the fewest bits no round's sum can wrap
    secure_honest: int = 0  # t the shares are calibrated for: honest participants a round counts on (0 = every silo asked)
    # Simulation only: the processes the silos answer in, sharing the machine's cores (0 = one a core, at most one a
    # silo). Flower hands each message to whichever process is free, so every process ends up holding every silo it
    # served (model and kept prefixes); 1 keeps each silo, and its prefix store, in one process using every core.
    workers: int = 0

    def validate(self) -> None:
        _check("federation.silos", self.silos, 1 <= self.silos <= 1000, "an integer in [1, 1000]")
        _check("federation.fraction", self.fraction, 0 < self.fraction <= 1, "in (0, 1]")
        _check("federation.min_silos", self.min_silos, self.min_silos >= 1, "an integer >= 1")
        _check("federation.partition", self.partition, self.partition in ("iid", "label-skew", "quantity-skew"),
               "'iid', 'label-skew' or 'quantity-skew'")
        _check("federation.alpha", self.alpha, self.alpha > 0, "> 0")
        _check("federation.round_timeout", self.round_timeout, self.round_timeout > 0, "> 0 seconds")
        _check("federation.round_retries", self.round_retries, self.round_retries >= 0, ">= 0")
        _check("federation.max_replay", self.max_replay, self.max_replay >= 0, ">= 0")
        _check("federation.local_steps", self.local_steps, 1 <= self.local_steps <= 1024, "an integer in [1, 1024]")
        _check("federation.silo_eval", self.silo_eval, self.silo_eval in ("off", "private", "nonprivate"),
               "'off', 'private' or 'nonprivate'")
        _check("federation.silo_eval_std", self.silo_eval_std, self.silo_eval_std > 0, "> 0")
        _check("federation.aggregation", self.aggregation, self.aggregation in RULES,
               ", ".join(repr(name) for name in list(RULES)[:-1]) + f" or {list(RULES)[-1]!r}")
        _check("federation.trim", self.trim, 0 <= self.trim < 0.5,
               "in [0, 0.5), the share of silos dropped at each end (0.2 drops 1 of 5)")
        _check("federation.secure_bits", self.secure_bits, self.secure_bits == 0 or 2 <= self.secure_bits <= 64,
               "0 (chosen from the round's sizes) or an integer in [2, 64]")
        _check("federation.secure_honest", self.secure_honest, 0 <= self.secure_honest <= self.asked,
               f"in [0, {self.asked}], at most the silos asked each round (0 = all of them)")
        _check("federation.workers", self.workers, 0 <= self.workers <= self.silos,
               f"an integer in [0, {self.silos}], at most one process a silo (0 = one a core)")
        if self.secure_aggregation:
            _check("federation.aggregation", self.aggregation, self.aggregation == "mean",
                   "'mean' under federation.secure_aggregation=true (a robust rule needs each silo's values, which "
                   "secure aggregation hides; set one or the other)")
            _check("federation.local_steps", self.local_steps, self.local_steps == 1,
                   "1 under federation.secure_aggregation=true (a silo's local steps would move its model by its own "
                   "release, which only its share of the noise protects)")

    @property
    def asked(self) -> int:
        """Silos asked each round (of a simulation's ``silos``)."""
        return min(self.silos, max(self.min_silos, math.ceil(self.fraction * self.silos)))

    @property
    def honest(self) -> int:
        """t: the honest participants each secure round's shares are calibrated for."""
        return self.secure_honest or self.asked


@dataclass(frozen=True)
class EvalConfig:
    every: int = 100  # evaluate on public validation data every N steps (0 = only at the end)
    max_examples: int = 500
    batch_size: int = 64
    test_examples: int = 0  # test accuracy before and after a run on the first N test examples (0 = all)

    def validate(self) -> None:
        _check("eval.every", self.every, self.every >= 0, ">= 0")
        _check("eval.max_examples", self.max_examples, self.max_examples >= 0, ">= 0 (0 = all)")
        _check("eval.batch_size", self.batch_size, self.batch_size >= 1, ">= 1")
        _check("eval.test_examples", self.test_examples, self.test_examples >= 0, ">= 0 (0 = all)")


@dataclass(frozen=True)
class Config:
    seed: int = 0  # public randomness of the run: direction seeds
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    zo: ZOConfig = field(default_factory=ZOConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    prune: PruneConfig = field(default_factory=PruneConfig)
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    federation: FederationConfig = field(default_factory=FederationConfig)

    def validate(self) -> Config:
        for section in fields(self):
            value = getattr(self, section.name)
            if is_dataclass(value):
                value.validate()
        if self.federation.secure_aggregation:
            _check("privacy.enabled", self.privacy.enabled, self.privacy.enabled,
                   "true under federation.secure_aggregation=true (it sums noised shares; without privacy set "
                   "secure_aggregation=false)")
            _check("privacy.noise", self.privacy.noise, self.privacy.noise == "discrete",
                   "'discrete' under federation.secure_aggregation=true (masks sum integers)")
        return self

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> Config:
        return _build(cls, _renamed(data), "").validate()

    def to_flat(self) -> dict:
        """Dotted keys, as Flower's run config holds them: {"privacy.epsilon": 6.0, ...}.
        A None (unset optional) is left out; tuples become comma-separated strings."""
        flat = {}

        def walk(node: dict, prefix: str) -> None:
            for key, value in node.items():
                if isinstance(value, dict):
                    walk(value, f"{prefix}{key}.")
                elif value is not None:
                    flat[f"{prefix}{key}"] = ",".join(value) if isinstance(value, (tuple, list)) else value

        walk(self.to_dict(), "")
        return flat

    @classmethod
    def from_flat(cls, flat: dict, base: Config | None = None) -> Config:
        """Dotted keys over ``base`` (default: the defaults): Flower's run config -> Config."""
        data = (base or cls()).to_dict()
        for key, value in flat.items():
            _merge(data, _current(key).split("."), value)
        return cls.from_dict(data)


# Keys that once existed and must never be read from a config again: the reason, and the value an
# older seedtune wrote into every run's logged config when the setting was not used (read as unset).
REMOVED = {
    "privacy.noise_seed": ("a silo draws its sampling and noise from the operating system's secure source only, "
                           "never from a value in a config that travels (tests build seeded randomness themselves)",
                           None),
    "federation.fault_partition": ("fault injection is a test hook, not a setting (tests set SEEDTUNE_TEST_KILL_SILO)",
                                   -1),
    "federation.fault_round": ("fault injection is a test hook, not a setting (tests set SEEDTUNE_TEST_KILL_SILO)", -1),
}


# Keys renamed, old name -> new name: the old one is still read (a run logged before the rename
# resumes), and a config that sets it warns. A participant is a "silo" everywhere (Flower's
# "client" and "node" name only Flower's own parts), and "sigma" always a noise multiplier: the
# evaluation's was a standard deviation.
RENAMED = {
    "federation.clients": "federation.silos",
    "federation.min_clients": "federation.min_silos",
    "federation.client_eval": "federation.silo_eval",
    "federation.client_eval_sigma": "federation.silo_eval_std",
}


class DeprecatedKeyWarning(FutureWarning):
    """A config key under its old name."""


def _current(dotted: str) -> str:
    """A dotted key's current name; an old name warns."""
    if dotted in RENAMED:
        warnings.warn(f"{dotted} is deprecated: it is now {RENAMED[dotted]}", DeprecatedKeyWarning, stacklevel=3)
    return RENAMED.get(dotted, dotted)


def _renamed(tree: Any, prefix: str = "") -> Any:
    """``tree`` (nested tables) with every key under its current name; an old name warns."""
    if not isinstance(tree, dict):
        return tree
    out = {}
    for key, value in tree.items():
        dotted = f"{prefix}{key}"
        if dotted in RENAMED:
            new = RENAMED[dotted].rpartition(".")[2]
            if new in tree:
                raise ConfigError(f"{RENAMED[dotted]} is set twice, also under its old name {dotted}; keep only "
                                  f"{RENAMED[dotted]}")
            key = _current(dotted).rpartition(".")[2]
        out[key] = _renamed(value, f"{dotted}.")
    return out


def _build(cls: type, data: Any, prefix: str):
    """Build dataclass ``cls`` from nested ``data``, checking keys and types."""
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'} must be a table, got {data!r}")
    hints = get_type_hints(cls)
    known = {f.name for f in fields(cls)}
    values = {}
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        if dotted in REMOVED:
            reason, unset = REMOVED[dotted]
            if value == unset:  # written unset by an older seedtune: it asked for nothing
                continue
            raise ConfigError(f"{dotted} is not a setting: {reason}")
        if key not in known:
            close = difflib.get_close_matches(key, sorted(known), n=1)
            hint = f"; did you mean {prefix}{close[0]}?" if close else f"; known keys: {', '.join(sorted(known))}"
            raise ConfigError(f"unknown config key {dotted!r}{hint}")
        values[key] = _coerce(hints[key], value, dotted)
    return cls(**values)


def _coerce(hint: Any, value: Any, key: str):
    if is_dataclass(hint):
        return _build(hint, value, f"{key}.")
    optional = get_origin(hint) is not None and type(None) in get_args(hint)
    if optional:
        if value is None or (isinstance(value, str) and value.lower() in ("", "none", "auto")):
            return None
        hint = next(arg for arg in get_args(hint) if arg is not type(None))
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}={value!r} is invalid: it must be true or false")
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{key}={value!r} is invalid: it must be an integer")
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(f"{key}={value!r} is invalid: it must be a number")
    if hint is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{key}={value!r} is invalid: it must be a string")
    if get_origin(hint) is tuple:
        if isinstance(value, str) and value.startswith("["):  # a TOML list that did not parse
            raise ConfigError(f"{key}={value!r} is invalid: quote each string of the list, e.g. "
                              f"--set '{key}=[\"classifier.*\"]'")
        if isinstance(value, str):
            value = [part for part in value.split(",") if part]
        if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
            return tuple(value)
        raise ConfigError(f"{key}={value!r} is invalid: it must be a list of strings")
    raise ConfigError(f"{key}: unsupported type {hint}")


def parse_override(text: str) -> tuple[list[str], Any]:
    """``section.key=value`` -> (path, value); the value is read as TOML, else as a string."""
    if "=" not in text:
        raise ConfigError(f"--set {text!r} is invalid: use --set section.key=value, e.g. --set privacy.epsilon=2")
    key, raw = text.split("=", 1)
    path = key.strip().split(".")
    if not all(path):
        raise ConfigError(f"--set {text!r} has an empty key part")
    try:
        value = tomllib.loads(f"v = {raw.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw.strip()
    return path, value


def _merge(base: dict, path: list[str], value: Any) -> None:
    node = base
    for part in path[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"config key {'.'.join(path)!r}: {part!r} is not a section")
        node = child
    node[path[-1]] = value


def _deep_update(base: dict, update: dict, prefix: str = "") -> None:
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            _deep_update(base[key], value, f"{prefix}{key}.")
        else:
            base[key] = value


def preset(name: str, command: str = "train") -> dict:
    """The settings of preset ``name`` for ``command`` ("train" or "simulate").

    A simulate preset (``simulate-<name>.toml``) starts from the train preset it names in its
    ``preset`` key and changes only what a federation needs changed.
    """
    if name not in PRESETS:
        raise ConfigError(f"--preset {name!r} is not a preset; use one of {', '.join(PRESETS)}")
    files = resources.files("seedtune.common.presets")
    specific = files.joinpath(f"{command}-{name}.toml")
    data = tomllib.loads((specific if specific.is_file() else files.joinpath(f"{name}.toml")).read_text())
    parent = data.pop("preset", None)
    if parent is None:
        return data
    merged = tomllib.loads(files.joinpath(f"{parent}.toml").read_text())
    _deep_update(merged, data)
    return merged


def load_config(
    preset_name: str | None = "default", file: str | Path | None = None, overrides: list[str] = (),
    command: str = "train",
) -> Config:
    """The preset, then the TOML file, then each ``--set`` in order; validated."""
    data: dict = Config().to_dict()
    if preset_name:
        _deep_update(data, _renamed(preset(preset_name, command)))
    if file is not None:
        path = Path(file)
        try:
            _deep_update(data, _renamed(tomllib.loads(path.read_text())))
        except FileNotFoundError:
            raise ConfigError(f"--config {str(path)!r}: no such file") from None
        except tomllib.TOMLDecodeError as error:
            raise ConfigError(f"--config {str(path)!r} is not valid TOML: {error}") from None
    for text in overrides:
        path, value = parse_override(text)
        _merge(data, _current(".".join(path)).split("."), value)
    return Config.from_dict(data)


def with_changes(config: Config, **sections: dict) -> Config:
    """A copy of ``config`` with some fields of some sections replaced (for tests and tools)."""
    updated = {name: replace(getattr(config, name), **changes) for name, changes in sections.items()}
    return replace(config, **updated).validate()
