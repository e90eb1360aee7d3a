"""The coordinator's durable view of the federation: what each silo reported spending, the
traffic of every round, and every reply it rejected and why.

The ε shown for a silo is recomputed here with dp-accounting from the events the silo reported,
not taken from a number it sent. The silo's own ledger remains the authority: a release whose
reply never arrived is in the silo's ledger and not here.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections import Counter, defaultdict
from pathlib import Path

from seedtune.common.privacy import events as event_codec
from seedtune.common.privacy.accounting import epsilon_of

_SCHEMA = """
CREATE TABLE IF NOT EXISTS node_events (
    id INTEGER PRIMARY KEY AUTOINCREMENT, node TEXT NOT NULL, round INTEGER NOT NULL, event TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS traffic (
    round INTEGER NOT NULL, attempt INTEGER NOT NULL, node TEXT NOT NULL,
    bytes_down INTEGER NOT NULL, bytes_up INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS rejections (
    round INTEGER NOT NULL, node TEXT NOT NULL, reason TEXT NOT NULL, created REAL NOT NULL
);
-- Flower node ids are unsigned 64-bit, beyond SQLite's INTEGER: stored as text.
CREATE TABLE IF NOT EXISTS nodes (node TEXT PRIMARY KEY, silo TEXT NOT NULL DEFAULT '');
"""


class FederationStore:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._db = sqlite3.connect(self.path, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(_SCHEMA)

    def close(self) -> None:
        self._db.close()

    def record_round(self, round: int, events: dict[int, tuple[dict, ...]]) -> None:
        """The events of the replies a round was built from (called before the step is logged)."""
        with self._db:
            self._db.executemany(
                "INSERT INTO node_events (node, round, event) VALUES (?, ?, ?)",
                [(str(node), round, json.dumps(event, sort_keys=True)) for node, evs in events.items() for event in evs],
            )

    def record_traffic(self, round: int, attempt: int, node: int, bytes_down: int, bytes_up: int) -> None:
        with self._db:
            self._db.execute("INSERT INTO traffic VALUES (?, ?, ?, ?, ?)", (round, attempt, str(node), bytes_down, bytes_up))

    def reject(self, round: int, node: int, reason: str) -> None:
        with self._db:
            self._db.execute("INSERT INTO rejections VALUES (?, ?, ?, ?)", (round, str(node), reason, time.time()))

    def register(self, node: int, silo: str | None = None) -> None:
        """A node seen; with ``silo``, the name it reports (kept once known)."""
        with self._db:
            self._db.execute("INSERT OR IGNORE INTO nodes VALUES (?, '')", (str(node),))
            if silo:
                self._db.execute("UPDATE nodes SET silo = ? WHERE node = ?", (silo, str(node)))

    # -- reading -------------------------------------------------------------------------------
    def nodes(self) -> dict[int, str]:
        """Node id -> the silo name it reported ('' until it has)."""
        return {int(node): silo for node, silo in self._db.execute("SELECT node, silo FROM nodes")}

    def reported_events(self) -> dict[int, list]:
        events: dict[int, list] = defaultdict(list)
        for node, text in self._db.execute("SELECT node, event FROM node_events ORDER BY id"):
            events[int(node)].append(event_codec.loads(text))
        return dict(events)

    def epsilons(self, delta: float, accountant: str) -> dict[int, float]:
        """ε per silo, recomputed from its reported events (once per distinct multiset of events:
        silos asked the same rounds spent the same, and each computation takes a fraction of a second)."""
        reported = self.reported_events()
        computed: dict[frozenset, float] = {}
        epsilons = {}
        for node in self.nodes():
            events = reported.get(node, [])
            key = frozenset(Counter(events).items())
            if key not in computed:
                computed[key] = epsilon_of(events, delta, accountant)
            epsilons[node] = computed[key]
        return epsilons

    def traffic(self) -> dict[int, dict[str, int]]:
        totals = {}
        for node, rounds, down, up in self._db.execute(
            "SELECT node, COUNT(*), SUM(bytes_down), SUM(bytes_up) FROM traffic GROUP BY node ORDER BY node"
        ):
            totals[int(node)] = {"messages": rounds, "bytes_down": down, "bytes_up": up}
        return totals

    def traffic_rows(self) -> list[tuple[int, int, int, int, int]]:
        rows = self._db.execute("SELECT round, attempt, node, bytes_down, bytes_up FROM traffic ORDER BY round")
        return [(r, a, int(n), d, u) for r, a, n, d, u in rows]

    def rejections(self) -> list[dict]:
        rows = self._db.execute("SELECT round, node, reason FROM rejections ORDER BY created")
        return [{"round": r, "node": int(n), "reason": reason} for r, n, reason in rows]
