"""Where a command may write, checked before it does any work.

A bad ``--out`` or a read-only run found after minutes of training would end in a traceback
and a half-made directory; found first, it is one line that names the path and the fix.
``os.access`` asks the kernel, so the answer holds for root too: a read-only file system
(EROFS) and the immutable attribute (EPERM) refuse root as they refuse everyone.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from seedtune.common.errors import RunDirError


def check_creatable(directory: Path, flag: str = "--out") -> None:
    """Raise :class:`RunDirError` unless ``directory`` is a directory that can be written, or
    one that can be created (its nearest existing ancestor is a writable directory)."""
    directory = Path(directory)
    if directory.exists():
        if not directory.is_dir():
            raise RunDirError(f"{flag} {directory} is a file, not a directory; choose another {flag}")
        if not os.access(directory, os.W_OK | os.X_OK):
            raise RunDirError(f"{flag} {directory} is not writable (permissions, a read-only file system or the "
                              f"immutable attribute); make it writable or choose another {flag}")
        return
    ancestor = directory.parent
    while not ancestor.exists() and not ancestor.is_symlink() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise RunDirError(f"{flag} {directory} cannot be created: {ancestor} is a file, not a directory; "
                          f"choose another {flag}")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise RunDirError(f"{flag} {directory} cannot be created: {ancestor} is not writable (permissions, a "
                          f"read-only file system or the immutable attribute); make it writable or choose another "
                          f"{flag}")


def check_resumable(run_dir: Path) -> None:
    """Raise :class:`RunDirError` unless a run can continue in ``run_dir``: the directory (where
    SQLite keeps its ``-wal`` and ``-shm`` files, and ``final/`` is written) and every database
    in it must be writable."""
    run_dir = Path(run_dir)
    for path in (run_dir, *sorted(run_dir.glob("*.sqlite*"))):
        if not os.access(path, os.W_OK):
            raise RunDirError(f"{path} is read-only (permissions, a read-only file system or the immutable "
                              f"attribute) and --resume must write to it; make the run directory and its files "
                              f"writable (chmod -R u+w {run_dir}), or copy the run somewhere writable and resume the "
                              f"copy")


LEDGER_FILE = "ledger.sqlite"  # a silo's ledger, in its state directory (and in a train run's directory)


@dataclass(frozen=True)
class RunLayout:
    """Every file a run directory holds: the one place their names are written. Files are written
    through a staging name (:meth:`staging`) and renamed, so none is ever half-written."""

    root: Path
    log: Path = field(init=False)  # log.sqlite: config, base, mask, every step, metrics
    ledger: Path = field(init=False)  # a train run's one silo's ledger
    store: Path = field(init=False)  # a federation: the coordinator's view of each silo (federation.sqlite)
    silos: Path = field(init=False)  # a simulation: each silo's state directory, silos/<name>/
    final: Path = field(init=False)  # the model, loadable with transformers
    metrics: Path = field(init=False)  # metrics.json: the summary, with every logged series
    training_plot: Path = field(init=False)  # training.png
    traffic_plot: Path = field(init=False)  # traffic.png (a federation)
    lock: Path = field(init=False)  # driver.lock: held by the live process driving the run (common/runlock.py)

    def __post_init__(self):
        root = Path(self.root)
        paths = {"root": root, "log": root / "log.sqlite", "ledger": root / LEDGER_FILE,
                 "store": root / "federation.sqlite", "silos": root / "silos", "final": root / "final",
                 "metrics": root / "metrics.json", "training_plot": root / "training.png",
                 "traffic_plot": root / "traffic.png", "lock": root / "driver.lock"}
        for name, path in paths.items():
            object.__setattr__(self, name, path)

    def staging(self, path: Path) -> Path:
        """Where ``path`` is written before it is renamed into place."""
        return path.with_name(f".{path.name}.partial")

    def silo_ledgers(self) -> list[Path]:
        """Each simulated silo's own ledger."""
        return sorted(self.silos.glob(f"*/{LEDGER_FILE}"))
