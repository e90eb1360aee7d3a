"""A silo's privacy ledger: every release it made, durable in SQLite, and the budget it enforces.

The ledger belongs to the party whose data is protected. Before a release it checks that the
release keeps the total within the budget (epsilon, delta) and within the silo's own limits
(``admit``), and refuses otherwise; the event is committed to disk *before* the released values
leave the function that noised them, so a crash can over-count a release but never under-count
one. The budget is written into the ledger when it is created and binds every later opening: a
restarted process, or a caller that asks for more, cannot raise it.

Each release is keyed by its run, step and a digest of the request it answered, and keeps the
values that left: the same request asked again (a coordinator that crashed before it logged the
step) is answered with the same values, which releases nothing new and is not charged again
(:meth:`PrivacyLedger.answered`). How many per-example rows were zeroed because they were not
finite is kept with each release, for the silo's operator only.
"""

from __future__ import annotations

import json
import math
import sqlite3
import time
from collections import Counter
from pathlib import Path

from collections.abc import Callable
from dataclasses import dataclass

import dp_accounting
from seedtune.common import durable
from seedtune.common.errors import BudgetExhausted, RunDirError
from seedtune.common.privacy import events as event_codec
from seedtune.common.privacy.accounting import ACCOUNTANTS, epsilon_of

_SCHEMA = """
CREATE TABLE IF NOT EXISTS budget (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    epsilon REAL NOT NULL, delta REAL NOT NULL, accountant TEXT NOT NULL, created REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS releases (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    step INTEGER NOT NULL,  -- the step the release answered (named "round" in older ledgers; opening one renames it)
    event TEXT NOT NULL,
    note TEXT NOT NULL DEFAULT '',
    created REAL NOT NULL,
    released TEXT,  -- the values that left, once they have: lets a crashed run reuse them
    run_id TEXT NOT NULL DEFAULT '',
    request TEXT NOT NULL DEFAULT '',  -- digest of the request answered (common/protocol.py)
    zeroed INTEGER NOT NULL DEFAULT 0,  -- per-example rows that were not finite and counted as zero
    collusion TEXT  -- under secure aggregation: the event that holds if every other party colludes
);
-- How many releases of one event fit a budget: a pure function of public values that costs the
-- accountant ~1.5 s, kept so that every new process serving this silo does not pay it again.
CREATE TABLE IF NOT EXISTS capacities (
    event TEXT NOT NULL, epsilon REAL NOT NULL, delta REAL NOT NULL, accountant TEXT NOT NULL,
    count REAL NOT NULL,
    PRIMARY KEY (event, epsilon, delta, accountant)
);
"""


# Added after the first ledgers were written: a ledger without them gains them when opened.
_LATER_COLUMNS = (
    ("run_id", "TEXT NOT NULL DEFAULT ''"),
    ("request", "TEXT NOT NULL DEFAULT ''"),
    ("zeroed", "INTEGER NOT NULL DEFAULT 0"),
    ("collusion", "TEXT"),
)

def _upgrade(db: sqlite3.Connection) -> None:
    """A ledger an earlier version wrote: its ``round`` column is now ``step``, and it gains the
    columns added since."""
    columns = {row[1] for row in db.execute("PRAGMA table_info(releases)")}
    if "round" in columns:
        db.execute("ALTER TABLE releases RENAME COLUMN round TO step")
    for name, kind in _LATER_COLUMNS:
        if name not in columns:
            db.execute(f"ALTER TABLE releases ADD COLUMN {name} {kind}")


Admission = Callable[[dp_accounting.DpEvent, int], None]  # (event, releases so far) -> None, or raises


@dataclass(frozen=True)
class Answered:
    """A release made for a run's step: the request it answered, and the values, if they left."""

    request: str
    values: list[float] | None
    event: dp_accounting.DpEvent


class PrivacyLedger:
    """Every release a silo makes, and the (epsilon, delta) budget none may exceed.

    ``admit(event, releases)``, if given, is the silo's own limits: it is called inside the same
    write transaction as the charge, with the number of releases already recorded, and refuses by
    raising."""

    def __init__(self, path: str | Path, *, epsilon: float, delta: float, accountant: str = "rdp",
                 admit: Admission | None = None):
        if accountant not in ACCOUNTANTS:
            raise ValueError(f"unknown accountant {accountant!r}; use one of {ACCOUNTANTS}")
        self.path = Path(path)
        self._db = durable.open_upgraded(self.path, _SCHEMA, _upgrade, "privacy ledger")
        row = self._db.execute("SELECT epsilon, delta, accountant FROM budget").fetchone()
        if row is None:
            with self._db:
                self._db.execute("BEGIN IMMEDIATE")
                self._db.execute(
                    "INSERT INTO budget VALUES (1, ?, ?, ?, ?)", (epsilon, delta, accountant, time.time())
                )
            row = (epsilon, delta, accountant)
        elif (epsilon, delta, accountant) != tuple(row):
            raise BudgetExhausted(
                f"privacy ledger {self.path} was created with budget epsilon={row[0]}, "
                f"delta={row[1]}, accountant={row[2]}; a ledger's budget cannot be changed "
                f"(asked for epsilon={epsilon}, delta={delta}, accountant={accountant})"
            )
        self.epsilon, self.delta, self.accountant = float(row[0]), float(row[1]), str(row[2])
        self._admit = admit
        self._counts: Counter[dp_accounting.DpEvent] = Counter()
        self._last_id = 0
        self._capacity: dict[dp_accounting.DpEvent, int] = {}
        self._refresh()

    @classmethod
    def existing(cls, path: str | Path) -> PrivacyLedger:
        """Open a ledger that exists, with the budget it was created with (for reading it)."""
        path = durable.existing(path, f"no privacy ledger at {path}")
        try:
            with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as db:
                row = db.execute("SELECT epsilon, delta, accountant FROM budget").fetchone()
        except sqlite3.Error as error:
            raise RunDirError(f"cannot read privacy ledger {path}: {error}") from None
        if row is None:
            raise RunDirError(f"privacy ledger {path} has no budget: it was never used")
        return cls(path, epsilon=row[0], delta=row[1], accountant=row[2])

    def _refresh(self) -> None:
        """Read releases other processes serving this silo have recorded since we last looked."""
        rows = self._db.execute("SELECT id, event FROM releases WHERE id > ? ORDER BY id", (self._last_id,))
        for release_id, text in rows.fetchall():
            self._counts[event_codec.loads(text)] += 1
            self._last_id = release_id

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> PrivacyLedger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- reading ---------------------------------------------------------------------------
    def events(self) -> list[dp_accounting.DpEvent]:
        return [event_codec.loads(text) for (text,) in self._db.execute("SELECT event FROM releases ORDER BY id")]

    @property
    def releases(self) -> int:
        self._refresh()
        return sum(self._counts.values())

    def spent(self) -> float:
        """epsilon spent so far at the ledger's delta."""
        self._refresh()
        return epsilon_of(self._counts.elements(), self.delta, self.accountant)

    def spent_if_all_collude(self) -> float:
        """epsilon spent if every other party of every secure-aggregation round colluded against
        this silo: each such release counted as the silo's own share of noise alone (the others
        as charged). Equal to :meth:`spent` for a silo that never aggregated securely."""
        rows = self._db.execute("SELECT COALESCE(collusion, event) FROM releases ORDER BY id")
        return epsilon_of([event_codec.loads(text) for (text,) in rows], self.delta, self.accountant)

    def history(self) -> list[dict]:
        rows = self._db.execute("SELECT id, step, event, note, created, released, run_id, request, zeroed "
                                "FROM releases ORDER BY id")
        return [
            {"id": i, "step": r, "event": json.loads(e), "note": n, "created": c,
             "released": None if v is None else json.loads(v), "run_id": run, "request": q, "zeroed": z}
            for i, r, e, n, c, v, run, q, z in rows
        ]

    def answered(self, run_id: str, step: int, note: str = "") -> Answered | None:
        """The last release made for ``run_id``'s ``step`` (of kind ``note``), if any."""
        row = self._db.execute(
            "SELECT request, released, event FROM releases WHERE run_id = ? AND step = ? AND note = ? "
            "ORDER BY id DESC LIMIT 1", (run_id, step, note)).fetchone()
        if row is None:
            return None
        return Answered(row[0], None if row[1] is None else json.loads(row[1]), event_codec.loads(row[2]))

    # -- charging ----------------------------------------------------------------------------
    def would_exceed(self, event: dp_accounting.DpEvent) -> bool:
        if set(self._counts) <= {event}:  # the common case: every release alike
            return self._counts[event] + 1 > self.capacity(event)
        return epsilon_of([*self._counts.elements(), event], self.delta, self.accountant) > self.epsilon

    def capacity(self, event: dp_accounting.DpEvent) -> int:
        """How many releases of ``event`` alone fit in the budget (kept in the ledger per event)."""
        if event not in self._capacity:
            key = (event_codec.dumps(event), self.epsilon, self.delta, self.accountant)
            row = self._db.execute("SELECT count FROM capacities WHERE event = ? AND epsilon = ? AND delta = ? "
                                   "AND accountant = ?", key).fetchone()
            if row is None:
                count = _largest_count_within(
                    lambda n: epsilon_of([dp_accounting.SelfComposedDpEvent(event, n)], self.delta, self.accountant)
                    <= self.epsilon
                )
                self._db.execute("INSERT OR REPLACE INTO capacities VALUES (?, ?, ?, ?, ?)", (*key, count))
            else:
                count = row[0] if math.isinf(row[0]) else int(row[0])
            self._capacity[event] = count
        return self._capacity[event]

    def charge(self, event: dp_accounting.DpEvent, *, step: int, note: str = "", run_id: str = "",
               request: str = "", zeroed: int = 0, collusion: dp_accounting.DpEvent | None = None) -> int:
        """Record one release, durably, and return its id; refuse it if it would exceed the budget.
        ``collusion``: what the release costs if every other party colludes (secure aggregation:
        the silo's own share alone), recorded beside the event charged, never charged itself.

        Raises :class:`BudgetExhausted` (and records nothing) when the budget does not allow it, and
        whatever ``admit`` raises when the silo's limits do not.
        """
        # Check and insert in one write transaction: another process serving the same silo
        # cannot slip a release in between.
        with self._db:
            self._db.execute("BEGIN IMMEDIATE")
            self._refresh()
            if self._admit is not None:
                self._admit(event, sum(self._counts.values()))
            if self.would_exceed(event):
                raise BudgetExhausted(
                    f"release refused: it would take the ledger {self.path} past its budget "
                    f"epsilon={self.epsilon} at delta={self.delta} ({sum(self._counts.values())} releases "
                    f"made, {epsilon_of(self._counts.elements(), self.delta, self.accountant):.4g} spent)"
                )
            cursor = self._db.execute(
                "INSERT INTO releases (step, event, note, created, run_id, request, zeroed, collusion) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (step, event_codec.dumps(event), note, time.time(), run_id, request, int(zeroed),
                 None if collusion is None else event_codec.dumps(collusion)),
            )
        self._counts[event] += 1
        self._last_id = int(cursor.lastrowid)
        return self._last_id

    def attach(self, release_id: int, values: list[float]) -> None:
        """Store the values a charged release let out (public once released)."""
        with self._db:
            self._db.execute("UPDATE releases SET released = ? WHERE id = ?", (json.dumps(values), release_id))



def _largest_count_within(fits) -> int:
    """The largest n >= 0 with fits(n), for a predicate that is true up to some n and false after."""
    if not fits(1):
        return 0
    low = 1
    while fits(low * 2):
        low *= 2
        if low > 1 << 40:
            return math.inf  # type: ignore[return-value]  # effectively unbounded
    high = low * 2  # fits(low) and not fits(high)
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (middle, high) if fits(middle) else (low, middle)
    return low
