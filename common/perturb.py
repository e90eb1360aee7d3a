"""Run a model at theta + s * z(seed) without ever writing theta.

MeZO perturbs in place (+beta z, -2 beta z, +beta z) and relies on the floats coming back; they
do not (x + a - a != x in floating point), so the model drifts away from the one the update log
describes. Here the stored weights are never modified by a fully trainable tensor's perturbation:

* a module that owns fully trainable tensors runs, for the duration of its own forward, on
  perturbed copies ``theta + s * z`` written into a reused workspace (memory: one module's
  weights, not the model's);
* an ``nn.Embedding`` keeps its weight and adds ``s * z`` to the rows the batch looks up, so the
  rows it does not touch are never generated;
* masked tensors (a few scattered coordinates) are shifted in place and then *copied back* from a
  saved copy of those coordinates, which restores them bit for bit.

All three compute the same floating-point value theta + (s * z) for each coordinate.
A tensor that is used outside its owning module's forward would escape the perturbation;
:func:`unreached_parameters` finds tensors whose modules a forward never calls.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from seedtune.common.trainable import DirectionField, TrainableSet, TrainableTensor
from torch import nn


@dataclass
class _Owner:
    """A module and the fully trainable tensors registered directly on it."""

    module: nn.Module
    tensors: list[tuple[str, TrainableTensor]]
    rows: bool  # an embedding: perturb the looked-up rows only
    size: int = field(init=False)

    def __post_init__(self) -> None:
        self.size = sum(entry.param.numel() for _, entry in self.tensors)


class Perturbation:
    """Evaluate ``model`` at theta + s * z(seed) on the coordinates of ``trainable``."""

    def __init__(self, model: nn.Module, trainable: TrainableSet, directions: DirectionField):
        self.model = model
        self.trainable = trainable
        self.directions = directions
        self._owners: list[_Owner] = []
        for module in model.modules():
            tensors = []
            for pname, param in module._parameters.items():
                entry = trainable.entry_for(param) if param is not None else None
                if entry is not None and entry.index is None:
                    tensors.append((pname, entry))
            if tensors:
                rows = isinstance(module, nn.Embedding)
                if rows and module.max_norm is not None:
                    raise ValueError("embeddings with max_norm rewrite their weights; not supported")
                self._owners.append(_Owner(module, tensors, rows))
        self._masked = [entry for entry in trainable if entry.index is not None]
        self._workspace: dict[tuple[int, torch.dtype, torch.device], torch.Tensor] = {}
        self._stack: list[tuple[nn.Module, list[tuple[str, torch.Tensor]]]] = []
        self._seed = 0
        self._shift = 0.0

    @contextmanager
    def shifted(self, seed: int, shift: float) -> Iterator[None]:
        """Inside the block the model computes at theta + shift * z(seed); outside, at theta."""
        self._seed, self._shift = seed, shift
        handles = []
        saved_masked: list[tuple[TrainableTensor, torch.Tensor]] = []
        try:
            with torch.no_grad():
                for entry in self._masked:
                    original = entry.flat[entry.index]
                    saved_masked.append((entry, original))
                    step = self.directions.fill(entry, seed, torch.empty_like(original))
                    entry.flat[entry.index] = original + step.mul_(shift)
            for owner in self._owners:
                if owner.rows:
                    handles.append(owner.module.register_forward_hook(
                        self._make_row_hook(owner), with_kwargs=True))
                else:
                    handles.append(owner.module.register_forward_pre_hook(self._make_swap_in(owner)))
                    handles.append(owner.module.register_forward_hook(
                        self._swap_out, always_call=True))
            yield
        finally:
            for handle in handles:
                handle.remove()
            while self._stack:  # only after an exception inside a pre-hook
                self._restore(*self._stack.pop())
            with torch.no_grad():
                for entry, original in saved_masked:
                    entry.flat[entry.index] = original  # a copy: exact

    # -- fully trainable tensors of ordinary modules: swap in perturbed copies -----------------
    def _buffer(self, numel: int, like: torch.Tensor) -> torch.Tensor:
        depth = len(self._stack)  # one buffer per nesting depth; the outermost is shared with updates
        if depth == 0:
            return self.directions.workspace(numel, like.dtype, like.device)
        key = (depth, like.dtype, like.device)
        buffer = self._workspace.get(key)
        if buffer is None or buffer.numel() < numel:
            buffer = self._workspace[key] = torch.empty(numel, dtype=like.dtype, device=like.device)
        return buffer

    def _make_swap_in(self, owner: _Owner) -> Callable:
        def swap_in(module: nn.Module, args: tuple) -> None:
            buffer = self._buffer(owner.size, owner.tensors[0][1].param)
            offset, saved = 0, []
            with torch.no_grad():
                for pname, entry in owner.tensors:
                    original = module._parameters[pname]
                    view = buffer[offset : offset + original.numel()]
                    offset += original.numel()
                    self.directions.fill(entry, self._seed, view)
                    view.mul_(self._shift).add_(original.detach().view(-1))
                    saved.append((pname, original))
                    # A plain tensor in _parameters is what the module's forward reads as
                    # self.<name>; the Parameter object is put back by _swap_out.
                    module._parameters[pname] = view.view_as(original)
            self._stack.append((module, saved))

        return swap_in

    def _swap_out(self, module: nn.Module, args: tuple, output: object) -> None:
        if self._stack and self._stack[-1][0] is module:
            self._restore(*self._stack.pop())

    @staticmethod
    def _restore(module: nn.Module, saved: list[tuple[str, torch.Tensor]]) -> None:
        for pname, original in saved:
            module._parameters[pname] = original

    # -- embeddings: shift the rows looked up ---------------------------------------------------
    def _make_row_hook(self, owner: _Owner) -> Callable:
        (_, entry), = owner.tensors

        def add_rows(module: nn.Module, args: tuple, kwargs: dict, output: torch.Tensor):
            ids = args[0] if args else kwargs["input"]
            rows, inverse = torch.unique(ids, return_inverse=True)
            step = self.directions.rows(entry, self._seed, rows).mul_(self._shift)
            return output + step[inverse]

        return add_rows


def unreached_parameters(
    model: nn.Module, trainable: TrainableSet, forward: Callable[[], object]
) -> list[str]:
    """Names of trainable tensors whose owning modules ``forward()`` never calls.

    A zeroth-order update moves every trainable coordinate along z whether or not the loss
    depends on it, so a tensor the loss never reaches would only random-walk; such tensors
    (an unused pooler, say) are left out of training.
    """
    reached: set[int] = set()
    handles = []
    for module in model.modules():
        params = [p for p in module._parameters.values() if p is not None]
        if params:
            def mark(mod, args, params=params):
                reached.update(id(p) for p in params)
            handles.append(module.register_forward_pre_hook(mark))
    try:
        with torch.no_grad():
            forward()
    finally:
        for handle in handles:
            handle.remove()
    return [entry.name for entry in trainable if id(entry.param) not in reached]
