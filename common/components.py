"""Build a run's parts from its configuration: the same parts for training, replay and export."""

from __future__ import annotations

import base64
import fnmatch
from collections import OrderedDict
from dataclasses import dataclass

import dp_accounting
import numpy as np
import torch
from seedtune.common.config import Config
from seedtune.common.data import TextData, default_prompt, load_text_data
from seedtune.common.errors import ConfigError
from seedtune.common.lora import is_lora
from seedtune.common.models import fingerprint
from seedtune.common.partition import partition_indices
from seedtune.common.perturb import unreached_parameters
from seedtune.common.privacy.accounting import (
    calibrate_noise_multiplier,
    calibrate_share_multiplier,
    epsilon_of,
    evaluation_event,
    release_event,
)
from seedtune.common.privacy.mechanism import lattice_sensitivity, share_event
from seedtune.common.protocol import ReleaseParameters
from seedtune.common.privacy.randomness import PublicRandomness, SecretRandomness
from seedtune.common.pruning import synflow_mask
from seedtune.common.schedule import ConstantSchedule, Schedule, StagewiseSchedule
from seedtune.common.tasks import Task, load_task
from seedtune.common.trainable import DirectionField, TrainableSet


@dataclass
class ModelParts:
    """A task model, the coordinates training may change, and the directions over them."""

    task: Task
    trainable: TrainableSet
    directions: DirectionField


def load_data(config: Config) -> TextData:
    d = config.data
    return load_text_data(
        d.name,
        split_seed=d.split_seed,
        validation_fraction=d.validation_fraction,
        test_fraction=d.test_fraction,
        max_train_examples=d.max_train_examples,
        synthetic_size=d.synthetic_size,
        labels=d.labels or None,
    )


def silo_shard(config: Config, split: str, partition: int | None, partitions: int):
    """Silo ``partition``'s share of the configured dataset's ``split`` ("train" or "validation"),
    split as in a simulation (``federation.partition``, ``alpha``, ``data.split_seed``)."""
    examples = getattr(load_data(config), split)
    if partition is None or partitions == 1:
        return examples
    federation = config.federation
    parts = partition_indices(examples["text"], examples["label"], partitions, scheme=federation.partition,
                              alpha=federation.alpha, seed=config.data.split_seed)
    return examples.select(parts[partition])


def load_model(config: Config, label_names: tuple[str, ...], base: dict | None = None) -> Task:
    """The task model at its starting point. With ``base`` (a run's base reference), tensors the
    task derives by computation are set to the values the run started from, exactly."""
    m = config.model
    task = load_task(
        m.name, m.task, label_names, max_length=m.max_length, template=m.template or default_prompt(config.data.name),
        head_scale=m.head_scale, init_seed=m.init_seed, lora=lora_settings(config),
    )
    if base is not None and base.get("derived"):
        params = dict(task.module.named_parameters())
        with torch.no_grad():
            for name, text in base["derived"].items():
                values = np.frombuffer(base64.b64decode(text), dtype="<f4")
                params[name].copy_(torch.from_numpy(values.copy()).view_as(params[name]))
    return task


def lora_settings(config: Config) -> dict | None:
    lora = config.lora
    return dict(rank=lora.rank, alpha=lora.alpha, targets=lora.targets) if lora.enabled else None


def base_reference(config: Config, task: Task, label_names: tuple[str, ...]) -> dict:
    """What a replay needs to rebuild the starting model, and a fingerprint to check it by.

    The label-word head is computed by a forward pass, whose last bits depend on the machine
    and thread count; its starting values travel with the reference (a few KB) instead, so every
    party starts from the same bits.
    """
    params = dict(task.module.named_parameters())
    derived = {
        name: base64.b64encode(params[name].detach().float().cpu().numpy().astype("<f4").tobytes()).decode()
        for name in task.derived
    }
    return {
        "model": config.model.name,
        "task": config.model.task,
        "label_names": list(label_names),
        "derived": derived,
        "fingerprint": fingerprint(task.module),
    }


def choose_mask(config: Config, task: Task, sample: dict) -> OrderedDict[str, torch.Tensor | None]:
    """LoRA's adapters, SynFlow's top r% or everything (each with the ``prune.always`` tensors),
    minus tensors the task's forward never reaches."""
    if config.lora.enabled:
        mask = OrderedDict((name, None) for name, _ in task.module.named_parameters()
                           if is_lora(name) or any(fnmatch.fnmatchcase(name, p) for p in config.prune.always))
    elif config.prune.enabled:
        mask = synflow_mask(task.module, task.synflow_output, config.prune.ratio, config.prune.always)
    else:
        mask = OrderedDict((name, None) for name, _ in task.module.named_parameters())
    everything = TrainableSet(task.module, mask)
    unused = set(unreached_parameters(task.module, everything, lambda: task.per_example_loss(task.module, sample)))
    mask = OrderedDict((name, index) for name, index in mask.items() if name not in unused)
    if not mask:
        names = [name for name, _ in task.module.named_parameters()]
        unmatched = [p for p in config.prune.always if not any(fnmatch.fnmatchcase(name, p) for name in names)]
        hint = (f"prune.always={unmatched[0]!r} matches no tensor of {config.model.name} (its last is {names[-1]!r}); "
                if unmatched else "")
        raise ConfigError(f"no trainable coordinates: {hint}raise prune.ratio or set prune.enabled=false")
    return mask


def mask_for(config: Config, task: Task, data: TextData) -> OrderedDict[str, torch.Tensor | None]:
    """:func:`choose_mask` traced on the first four training examples, as every party of a run
    computes it (the coordinator, an audit and the benches alike)."""
    sample = task.encode(data.train[:4]["text"], data.train[:4]["label"])
    return choose_mask(config, task, sample)


def model_parts(config: Config, task: Task, mask) -> ModelParts:
    trainable = TrainableSet(task.module, mask)
    directions = DirectionField(trainable, config.zo.distribution, config.zo.sphere)
    return ModelParts(task, trainable, directions)


def make_schedule(config: Config) -> Schedule:
    s = config.schedule
    if s.kind == "constant":
        return ConstantSchedule(s.steps, s.lr, s.beta)
    beta_end = s.beta if s.beta_end is None else s.beta_end
    return StagewiseSchedule(s.steps, s.stages, s.lr, s.beta, beta_end, s.prox)


def noise_multiplier(config: Config) -> float:
    """sigma: given, or calibrated so that the planned steps spend at most epsilon."""
    p = config.privacy
    if not p.enabled:
        return 0.0
    if p.noise_multiplier is not None:
        return p.noise_multiplier
    also = planned_evaluation(config)
    try:
        if config.federation.secure_aggregation:
            return calibrate_share_multiplier(
                p.epsilon, p.delta, p.sample_rate, config.schedule.steps, honest=config.federation.honest,
                dimension=config.zo.probes, sensitivity=float(lattice_sensitivity(p.clip_bound, config.zo.probes)),
                also=also)
        return calibrate_noise_multiplier(p.epsilon, p.delta, p.sample_rate, config.schedule.steps, p.accountant,
                                          also=also, noise=p.noise)
    except ValueError:
        raise ConfigError(
            f"federation.silo_eval_std={config.federation.silo_eval_std} alone spends more than "
            f"privacy.epsilon={p.epsilon}; raise it, or set federation.silo_eval=off"
        ) from None


def planned_evaluation(config: Config):
    """The private client evaluation a run ends with, if any (charged to every silo)."""
    federation = config.federation
    if config.privacy.enabled and federation.silo_eval == "private":
        return evaluation_event(federation.silo_eval_std, config.privacy.noise)
    return None


def planned_epsilon(config: Config, sigma: float) -> float:
    """epsilon of everything a silo will release in the run: the planned steps and evaluation."""
    p = config.privacy
    if not p.enabled:
        return float("inf")
    events = [dp_accounting.SelfComposedDpEvent(planned_release(config, sigma), config.schedule.steps)]
    if planned_evaluation(config) is not None:
        events.append(planned_evaluation(config))
    return epsilon_of(events, p.delta, p.accountant)


def planned_release(config: Config, sigma: float) -> dp_accounting.DpEvent:
    """The event each of a silo's releases is charged: its own noise at sigma, or under secure
    aggregation the sum of ``federation.honest`` shares of multiplier sigma."""
    p = config.privacy
    if config.federation.secure_aggregation:
        release = ReleaseParameters(p.clip_bound, sigma, p.sample_rate, p.noise)
        return share_event(release, config.federation.honest, config.zo.probes)
    return release_event(p.sample_rate, sigma, p.noise)


def randomness(config: Config, silo: int = 0) -> SecretRandomness:
    """The silo's sampling and noise source: the operating system's CSPRNG for every private run,
    whatever the config says; for a non-private run (nothing to protect) sampling is keyed by the
    run's public seed, silo k by seed + 1000003 k, so runs repeat. Nothing that travels in a
    config can seed a private silo's randomness (tests that need it build a
    :class:`~seedtune.common.privacy.randomness.SeededRandomness` themselves)."""
    if not config.privacy.enabled:
        return PublicRandomness(config.seed + 1_000_003 * silo)
    return SecretRandomness()
