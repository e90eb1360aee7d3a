"""Which coordinates of a model training may change, and the random directions over them.

A :class:`TrainableSet` names every trainable tensor by its *canonical* name (the first name
``named_parameters()`` gives it, so tied weights appear once) and holds either all of its
coordinates or a sorted index of some of them (a pruning mask). Everything that perturbs or
updates the model goes through it, so coordinates outside it can never change.

A :class:`DirectionField` restricts the seed-keyed directions of
:mod:`seedtune.common.directions` to those coordinates. With ``sphere=True`` it rescales a
Gaussian direction onto the sphere of radius sqrt(d) in the d trainable coordinates, as DPZero
samples it; the norm is summed exactly, so every party computes the same factor.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import torch
from seedtune.common.directions import (
    Distribution,
    direction_at,
    direction_norm_squared,
    fill_range,
    rademacher_block,
    stream_key,
)
from torch import nn

CHUNK = 1 << 19  # coordinates per piece of z (2 MiB in float32): no larger than a big layer
BLOCK = 1 << 14  # values of z generated at once for several seeds (fill_each): below torch's
# intra-op grain, so it runs on one thread (a larger block forked OpenMP threads, which stalled on
# a busy machine: 3-5 ms against 0.2 ms for the same values)


@dataclass(eq=False)
class TrainableTensor:
    """One parameter tensor and the flat coordinates of it that training may change."""

    name: str
    param: nn.Parameter
    index: torch.Tensor | None  # sorted int64 flat indices; None means every coordinate

    @property
    def size(self) -> int:
        """The number of trainable coordinates."""
        return self.param.numel() if self.index is None else self.index.numel()

    @property
    def flat(self) -> torch.Tensor:
        return self.param.detach().view(-1)

    def values(self) -> torch.Tensor:
        """A copy of the trainable coordinates, flat."""
        return self.flat.clone() if self.index is None else self.flat[self.index]


class TrainableSet:
    """The trainable coordinates of a model, in canonical parameter order."""

    def __init__(self, model: nn.Module, mask: Mapping[str, torch.Tensor | None]):
        params = dict(model.named_parameters())
        unknown = sorted(set(mask) - set(params))
        if unknown:
            raise ValueError(f"mask names parameters the model does not have: {unknown[:3]}")
        self.entries: list[TrainableTensor] = []
        for name, param in params.items():  # canonical order, tied weights once
            if name not in mask:
                continue
            index = mask[name]
            if index is not None:
                index = index.to(torch.int64).flatten()
                if index.numel() == 0:
                    continue
                index = torch.unique(index)  # sorted, no duplicates: updates are then exact
                if int(index[0]) < 0 or int(index[-1]) >= param.numel():
                    raise ValueError(f"mask index out of range for parameter {name!r}")
                if index.numel() == param.numel():
                    index = None
            self.entries.append(TrainableTensor(name, param, index))
        self._by_param = {id(entry.param): entry for entry in self.entries}

    @classmethod
    def everything(cls, model: nn.Module) -> TrainableSet:
        return cls(model, {name: None for name, _ in model.named_parameters()})

    def __iter__(self) -> Iterator[TrainableTensor]:
        return iter(self.entries)

    def __len__(self) -> int:
        return len(self.entries)

    @property
    def dimension(self) -> int:
        """d, the number of trainable coordinates."""
        return sum(entry.size for entry in self.entries)

    def entry_for(self, param: torch.Tensor) -> TrainableTensor | None:
        return self._by_param.get(id(param))

    def snapshot(self) -> list[torch.Tensor]:
        """Copies of every trainable coordinate (a proximal anchor, or a test's reference)."""
        return [entry.values() for entry in self.entries]

    def mask(self) -> OrderedDict[str, torch.Tensor | None]:
        return OrderedDict((entry.name, entry.index) for entry in self.entries)


class DirectionField:
    """Seed-keyed directions over the coordinates of a :class:`TrainableSet`."""

    def __init__(self, trainable: TrainableSet, distribution: Distribution, sphere: bool = False):
        self.trainable = trainable
        self.distribution = distribution
        self.sphere = sphere and distribution == "gaussian"  # Rademacher lies on it already
        self._scales: OrderedDict[int, float] = OrderedDict()
        self._buffers: dict[tuple[torch.dtype, torch.device], torch.Tensor] = {}

    def scale(self, seed: int) -> float:
        """sqrt(d) / ||z|| for a sphere field, else 1.0 (cached for the last few seeds)."""
        if not self.sphere:
            return 1.0
        if seed not in self._scales:
            total = 0
            for entry in self.trainable:
                for offset, length in self.chunks(entry):
                    raw = torch.empty(length, dtype=torch.float64, device=entry.param.device)
                    total += direction_norm_squared(self._generate(entry, seed, raw, offset, 1.0))
            norm = math.sqrt(total / float(1 << 24))
            self._scales[seed] = math.sqrt(self.trainable.dimension) / norm
            while len(self._scales) > 64:
                self._scales.popitem(last=False)
        return self._scales[seed]

    @staticmethod
    def chunks(entry: TrainableTensor, size: int | None = None) -> Iterator[tuple[int, int]]:
        """(offset, length) pieces of an entry's trainable coordinates, to bound working memory."""
        size = size or CHUNK
        for offset in range(0, entry.size, size):
            yield offset, min(size, entry.size - offset)

    def fill(self, entry: TrainableTensor, seed: int, out: torch.Tensor, offset: int = 0) -> torch.Tensor:
        """z on trainable coordinates [offset, offset + len(out)) of ``entry``, written into ``out``.

        The coordinates are the entry's in their order: flat positions for a full tensor, the
        mask's sorted indices for a masked one. Values do not depend on how a tensor is split.
        """
        return self._generate(entry, seed, out, offset, self.scale(seed))

    def fill_each(self, entry: TrainableTensor, seeds: list[int], offset: int, out: torch.Tensor) -> Iterator[torch.Tensor]:
        """z of each seed in turn on trainable coordinates [offset, offset + len(out)) of
        ``entry``: the values :meth:`fill` writes into ``out``, or, for Rademacher directions on a
        short piece of a whole tensor, rows of a block generated for several seeds at once (one
        hash over seeds x words instead of a call per seed; ``out`` is then left as it was).
        Each value holds until the next one is drawn: they share working memory."""
        length = out.numel()
        words = ((offset + length - 1) >> 6) - (offset >> 6) + 1 if length else 0
        per = BLOCK // (words * 64) if words and self.distribution == "rademacher" and entry.index is None else 0
        if per < 2:
            for seed in seeds:
                yield self.fill(entry, seed, out, offset)
            return
        # Behind the caller's ``out`` (the workspace's first ``length`` values).
        space = self.workspace(length + per * words * 64, entry.param.dtype, entry.param.device)[length:]
        for first in range(0, len(seeds), per):
            keys = [stream_key(seed, entry.name) for seed in seeds[first : first + per]]
            yield from rademacher_block(keys, offset, offset + length, space)

    def _generate(self, entry: TrainableTensor, seed: int, out: torch.Tensor, offset: int, scale: float):
        if entry.index is None:
            return fill_range(self.distribution, seed, entry.name, offset, out, scale=scale)
        index = entry.index[offset : offset + out.numel()]
        out.copy_(direction_at(self.distribution, seed, entry.name, index, dtype=out.dtype, scale=scale))
        return out

    def buffer(self, entry: TrainableTensor, length: int | None = None) -> torch.Tensor:
        """A reused flat buffer for a piece of ``entry``'s direction."""
        length = min(entry.size, CHUNK) if length is None else length
        return self.workspace(length, entry.param.dtype, entry.param.device)

    def workspace(self, numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """The one reused flat scratch tensor of a dtype and device, at least ``numel`` long.

        Fresh multi-MB tensors are slow to fault in on a CPU, so it stays; and the update's
        pieces of z and the perturbation's copy of a module's weights share it (they are never
        in use at once), so a step holds one such buffer above inference, not two.
        """
        key = (dtype, device)
        buffer = self._buffers.get(key)
        if buffer is None or buffer.numel() < numel:
            self._buffers.pop(key, None)  # freed before the larger one is made
            buffer = self._buffers[key] = torch.empty(numel, dtype=dtype, device=device)
        return buffer[:numel]

    def rows(self, entry: TrainableTensor, seed: int, rows: torch.Tensor) -> torch.Tensor:
        """z on whole rows ``rows`` of a fully trainable 2-D parameter, shape (len(rows), width).

        Random access: an embedding's untouched rows are never generated.
        """
        width = entry.param.shape[-1]
        index = rows.to(torch.int64).unsqueeze(-1) * width + torch.arange(width, device=rows.device)
        return direction_at(
            self.distribution, seed, entry.name, index, dtype=entry.param.dtype, scale=self.scale(seed)
        )
