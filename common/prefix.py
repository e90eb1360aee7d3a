"""Compute the frozen beginning of a network once per batch instead of 2K times.

Within one estimate every perturbed pass sees the same batch; only trainable coordinates move.
A module none of whose tensors is trainable, and which returns before the first module holding
trainable coordinates is entered, therefore computes bit-identical outputs in every pass. A
pruning mask concentrated in the top layers (SynFlow's usual choice) or a trained head leaves
most of the network in that prefix, so the perturbed passes run only what follows it.

The plan (which modules form the prefix) is traced once on a real forward; per batch, a pass
that stops as soon as the prefix has returned records their outputs (the rest of the network is
left to the perturbed passes, so the cache costs the prefix once, never a whole extra forward),
and the perturbed passes return them in call order. A recording is a value the caller keeps, so
one can be held per example while the perturbed passes run over several. The outputs
are reused as they are, so a model that edits activations in place after the prefix would break
this; the estimator's oracle tests compare cached and uncached estimates bit for bit.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

from seedtune.common.trainable import TrainableSet
from torch import nn


Recording = dict[nn.Module, list]  # each prefix module's outputs, in call order


class _PrefixRecorded(Exception):
    """Raised out of the forward once the last prefix output is recorded: the rest is not needed."""


class PrefixCache:
    def __init__(self, model: nn.Module, trainable: TrainableSet):
        self.model = model
        trainable_ids = {id(entry.param) for entry in trainable}
        self._owns_trainable = {
            module for module in model.modules()
            if any(id(p) in trainable_ids for p in module._parameters.values() if p is not None)
        }
        self._frozen = {
            module for module in model.modules()
            if not any(id(p) in trainable_ids for p in module.parameters())
        }
        self.modules: list[nn.Module] | None = None  # the plan, once traced
        self._last: tuple[nn.Module, int] | None = None  # the prefix module returning last, its calls

    def trace(self, forward: Callable[[], object]) -> list[nn.Module]:
        """Find the prefix: maximal frozen modules that return before trainable ones start."""
        events: list[tuple[str, nn.Module]] = []
        handles = []
        for module in self.model.modules():
            handles.append(module.register_forward_pre_hook(lambda m, a: events.append(("enter", m))))
            handles.append(module.register_forward_hook(lambda m, a, o: events.append(("exit", m))))
        try:
            forward()
        finally:
            for handle in handles:
                handle.remove()
        boundary = next((i for i, (kind, m) in enumerate(events) if kind == "enter" and m in self._owns_trainable),
                        len(events))
        calls: dict[nn.Module, list[tuple[int, int]]] = {}
        stack: list[tuple[nn.Module, int]] = []
        for position, (kind, module) in enumerate(events):
            if kind == "enter":
                stack.append((module, position))
            else:
                entered = next(i for i in range(len(stack) - 1, -1, -1) if stack[i][0] is module)
                calls.setdefault(module, []).append((stack[entered][1], position))
                del stack[entered]
        cacheable = {m for m, spans in calls.items()
                     if m in self._frozen and all(end < boundary for _, end in spans)}
        parents = {child: parent for parent in self.model.modules() for child in parent.children()}

        def inside_cacheable(module: nn.Module) -> bool:
            parent = parents.get(module)
            while parent is not None:
                if parent in cacheable:
                    return True
                parent = parents.get(parent)
            return False

        self.modules = [m for m in self.model.modules() if m in cacheable and not inside_cacheable(m)]
        if self.modules:
            last = max(self.modules, key=lambda m: calls[m][-1][1])
            self._last = (last, len(calls[last]))
        return self.modules

    def record(self, forward: Callable[[], object]) -> Recording:
        """Run ``forward`` until every prefix module has returned; their outputs, in call order."""
        outputs: Recording = {module: [] for module in self.modules or ()}
        last, calls = self._last or (None, 0)

        def keep(module: nn.Module, args, output) -> None:
            outputs[module].append(output)
            if module is last and len(outputs[module]) == calls:
                raise _PrefixRecorded

        handles = [module.register_forward_hook(keep) for module in self.modules or ()]
        try:
            forward()
        except _PrefixRecorded:
            pass
        finally:
            for handle in handles:
                handle.remove()
        return outputs

    @contextmanager
    def replaying(self, recording: Recording) -> Iterator[None]:
        """Prefix modules return what they returned in ``recording``, without computing."""
        patched = []
        for module in self.modules or ():
            outputs = iter(recording[module])
            module.forward = lambda *args, _outputs=outputs, **kwargs: next(_outputs)
            patched.append(module)
        try:
            yield
        finally:
            for module in patched:
                del module.forward
