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
from dataclasses import dataclass

import torch
from seedtune.common.trainable import TrainableSet
from torch import nn
from torch.utils import _pytree as pytree


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
        self.unread: set[nn.Module] = set()  # prefix modules whose outputs only other prefix modules read
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
            self.unread = self._find_unread(forward)
        return self.modules

    def _find_unread(self, forward: Callable[[], object]) -> set[nn.Module]:
        """The prefix modules whose outputs nothing after the prefix reads.

        In a replay every prefix module returns its recorded output without computing, so the
        output of, say, the third of six frozen layers is read only by the fourth, which does not
        run. Such an output need not be kept: a module is unread when replaying NaN in place of
        every one of its values leaves the forward's result bit for bit the same (a NaN that is
        read reaches the result). Checked for each module, then for all of them together.
        """
        recording = self.record(forward)
        with self.replaying(recording):
            reference = pytree.tree_leaves(forward())

        def unchanged_without(modules: set[nn.Module]) -> bool:
            poisoned = {**recording, **{module: _unread(recording[module]) for module in modules}}
            with self.replaying(poisoned, modules):
                result = pytree.tree_leaves(forward())
            return len(result) == len(reference) and all(_same(a, b) for a, b in zip(result, reference))

        unread = {module for module in self.modules or () if unchanged_without({module})}
        return unread if unread and unchanged_without(unread) else set()

    def record(self, forward: Callable[[], object]) -> Recording:
        """Run ``forward`` until every prefix module has returned; their outputs, in call order."""
        outputs: Recording = {module: [] for module in self.modules or ()}
        last, calls = self._last or (None, 0)

        def keep(module: nn.Module, args, output) -> None:
            outputs[module].append(_unread([output])[0] if module in self.unread else output)
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
    def replaying(self, recording: Recording, unread: set[nn.Module] | None = None) -> Iterator[None]:
        """Prefix modules return what they returned in ``recording``, without computing; those in
        ``unread`` (default: the trace's) return NaN of their outputs' shapes."""
        unread = self.unread if unread is None else unread
        patched = []
        for module in self.modules or ():
            kept = recording[module]
            outputs = iter([pytree.tree_map(_poison, output) for output in kept] if module in unread else kept)
            module.forward = lambda *args, _outputs=outputs, **kwargs: next(_outputs)
            patched.append(module)
        try:
            yield
        finally:
            for module in patched:
                del module.forward


@dataclass(frozen=True)
class Unread:
    """Kept in place of a tensor no computation after the prefix reads: its shape and kind only.
    Replayed as NaN (:func:`_poison`), so a read the trace did not foresee reaches the loss as NaN
    instead of a wrong number."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    device: torch.device


def _unread(outputs: list) -> list:
    """``outputs`` with each floating-point tensor replaced by its :class:`Unread` description
    (integer tensors cannot hold NaN, so they are kept as they are)."""
    def describe(leaf):
        if isinstance(leaf, torch.Tensor) and leaf.is_floating_point():
            return Unread(tuple(leaf.shape), leaf.dtype, leaf.device)
        return leaf
    return [pytree.tree_map(describe, output) for output in outputs]


def _poison(leaf):
    """An :class:`Unread` as a tensor of its shape that holds one NaN (strides of zero)."""
    if isinstance(leaf, Unread):
        return torch.full((), float("nan"), dtype=leaf.dtype, device=leaf.device).expand(leaf.shape)
    return leaf


class RecordingStore:
    """Each example's prefix outputs, kept across steps within a byte budget.

    The prefix is frozen, so an example's prefix outputs never change during a run: a silo that
    samples the same record again (every epoch's worth of steps) can replay them instead of
    computing them again. Entries are keyed by the exact input row (every input tensor's bytes and
    shape, and the size of the batch it came in, so an example padded to its bucket and a filler
    row of each width are separate), kept one example per entry, and joined into whatever
    micro-batch the next step forms. That joined recording is what a fresh pass would have
    computed only where a row's outputs do not depend on its position in a batch, the property
    fixed-shape micro-batches already rely on (:mod:`seedtune.common.estimator`); the estimator's
    tests compare the two bit for bit. An output one row high in a batch of several (rotary
    position tables: the same for every row) is kept whole with each row and joined only where
    every row's copy is equal.

    When the budget is full, new examples are computed per batch as before and not kept. The
    store lives in the silo's memory (on its device) and never leaves it.
    """

    def __init__(self, budget_bytes: int):
        self.budget_bytes = budget_bytes
        self.used_bytes = 0
        self._largest = 0  # bytes of the largest row kept
        self._kept: dict[bytes, _Row] = {}
        self.kept_rows = 0  # rows computed and kept, over the store's life
        self.hits = 0  # batches joined from kept rows
        self.misses = 0  # batches with a row not kept

    def __len__(self) -> int:
        return len(self._kept)

    def has_room(self, rows: int) -> bool:
        """Whether ``rows`` more rows, each as large as the largest kept so far, fit the budget."""
        return self.used_bytes + rows * self._largest <= self.budget_bytes

    def lookup(self, keys: list[bytes]) -> Recording | None:
        """The joined recording of these rows, in this order, if every one of them is kept."""
        rows = [self._kept.get(key) for key in keys]
        joined = None if any(row is None for row in rows) else _join(rows)
        if joined is None:
            self.misses += 1
        else:
            self.hits += 1
        return joined

    def keep(self, keys: list[bytes], recording: Recording) -> bool:
        """Keep each row of ``recording`` under its key, while the budget allows; False if the
        recording cannot be split into rows (an output with no row per example)."""
        pieces = _split(recording, len(keys))
        if pieces is None:
            return False
        for key, row in zip(keys, pieces):
            size = sum(leaf.numel() * leaf.element_size() for outputs in row.values() for leaves, _, _ in outputs
                       for leaf in leaves if isinstance(leaf, torch.Tensor))
            if key in self._kept or self.used_bytes + size > self.budget_bytes:
                continue
            self._kept[key] = row
            self.used_bytes += size
            self._largest = max(self._largest, size)
            self.kept_rows += 1
        return True


# One example's share of a recording: per module and call, the flattened output's leaves, its
# structure, and which leaves are whole tensors shared by every row rather than this row's slice.
_Row = dict[nn.Module, list[tuple[list, pytree.TreeSpec, list[bool]]]]


def row_keys(batch: dict) -> list[bytes]:
    """One key per row of an encoded batch: the row's bytes in every input, its shape, and the
    number of rows in the batch."""
    names = sorted(batch)
    rows = len(batch[names[0]]) if names else 0
    keys = []
    for row in range(rows):
        parts = [f"rows:{rows}:".encode()]
        for name in names:
            value = batch[name][row].detach().cpu()
            parts.append(f"{name}:{value.dtype}:{tuple(value.shape)}:".encode())
            parts.append(value.numpy().tobytes())
        keys.append(b"".join(parts))
    return keys


def _split(recording: Recording, rows: int) -> list[_Row] | None:
    """``recording`` as ``rows`` rows (contiguous copies of each row's slices), or None if some
    tensor in it has neither a row per example nor a single row shared by all of them."""
    flat = {module: [pytree.tree_flatten(output) for output in outputs] for module, outputs in recording.items()}
    shared = {}
    for module, outputs in flat.items():
        shared[module] = []
        for leaves, _ in outputs:
            flags = []
            for leaf in leaves:
                if not isinstance(leaf, torch.Tensor):
                    flags.append(True)
                elif leaf.dim() > 0 and leaf.shape[0] == rows:
                    flags.append(False)
                elif leaf.dim() > 0 and leaf.shape[0] == 1:
                    flags.append(True)
                else:
                    return None
            shared[module].append(flags)
    return [
        {module: [([leaf if whole else leaf[row : row + 1].clone() for leaf, whole in zip(leaves, flags)], spec, flags)
                  for (leaves, spec), flags in zip(outputs, shared[module])]
         for module, outputs in flat.items()}
        for row in range(rows)
    ]


def _join(rows: list[_Row]) -> Recording | None:
    """Rows stacked back into one recording, or None if their shared outputs differ."""
    joined: Recording = {}
    for module, outputs in rows[0].items():
        joined[module] = []
        for call, (leaves, spec, flags) in enumerate(outputs):
            values = []
            for i, (leaf, whole) in enumerate(zip(leaves, flags)):
                column = [row[module][call][0][i] for row in rows]
                if not whole:
                    values.append(torch.cat(column))
                elif all(_same(leaf, other) for other in column[1:]):
                    values.append(leaf)
                else:
                    return None
            joined[module].append(pytree.tree_unflatten(values, spec))
    return joined


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return a is b or (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape
                          and a.dtype == b.dtype and torch.equal(a, b))
    return a == b
