"""The coordinator's durable view of the federation: what each silo reported spending, the
traffic of every round, and every reply it rejected and why.

Silos are known by the name each asserts in its replies (its operator's ``name``, or its state
directory's), never by the node id Flower hands out: that id changes whenever a SuperNode or a
simulation restarts, and a view keyed by it listed one silo several times after a resume, each
with part of its spending. A silo's release for a round is recorded once, however often the
reply arrives (a silo answers a repeated request with the same release, uncharged).

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

import dp_accounting

from seedtune.common import durable
from seedtune.common.privacy import events as event_codec
from seedtune.common.privacy.accounting import epsilon_of

_SCHEMA = """
CREATE TABLE IF NOT EXISTS silo_events (
    silo TEXT NOT NULL, round INTEGER NOT NULL, kind TEXT NOT NULL, events TEXT NOT NULL,
    PRIMARY KEY (silo, round, kind)
);
CREATE TABLE IF NOT EXISTS traffic (
    round INTEGER NOT NULL, attempt INTEGER NOT NULL, node TEXT NOT NULL,
    bytes_down INTEGER NOT NULL, bytes_up INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS rejections (
    round INTEGER NOT NULL, node TEXT NOT NULL, reason TEXT NOT NULL, created REAL NOT NULL
);
-- Secure aggregation: what each release costs its silo if every other party colludes (its own
-- share of the noise alone), beside the event it charged (silo_events).
CREATE TABLE IF NOT EXISTS silo_collusion (
    silo TEXT NOT NULL, round INTEGER NOT NULL, kind TEXT NOT NULL, events TEXT NOT NULL,
    PRIMARY KEY (silo, round, kind)
);
-- Flower node ids are unsigned 64-bit, beyond SQLite's INTEGER: stored as text.
CREATE TABLE IF NOT EXISTS nodes (node TEXT PRIMARY KEY, silo TEXT NOT NULL DEFAULT '');
"""


def _upgrade(db: sqlite3.Connection) -> None:
    """Stores written before silos were keyed by name held events per node id."""
    tables = {row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    if "node_events" not in tables:
        return
    grouped: dict[tuple[str, int], list] = defaultdict(list)
    rows = db.execute("SELECT e.node, e.round, e.event, COALESCE(n.silo, '') FROM node_events e "
                      "LEFT JOIN nodes n ON n.node = e.node ORDER BY e.id")
    for node, round, event, silo in rows.fetchall():
        grouped[(silo or f"node {node}", round)].append(json.loads(event))
    db.executemany("INSERT OR IGNORE INTO silo_events VALUES (?, ?, 'train', ?)",
                   [(silo, round, json.dumps(events)) for (silo, round), events in grouped.items()])
    db.execute("DROP TABLE node_events")


class FederationStore:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._db = durable.open_upgraded(self.path, _SCHEMA, _upgrade, "the federation store")

    def close(self) -> None:
        self._db.close()

    # -- writing -------------------------------------------------------------------------------
    def record_release(self, silo: str, round: int, events: tuple[dp_accounting.DpEvent, ...],
                       kind: str = "train") -> None:
        """The events of ``silo``'s reply for ``round`` (a training round or an ``"evaluation"``);
        recorded when the reply is accepted, before the step is logged. The same silo, round and
        kind again is the same release and is not counted twice."""
        with self._db:
            self._db.execute("INSERT OR IGNORE INTO silo_events VALUES (?, ?, ?, ?)",
                             (silo, round, kind,
                              json.dumps([event_codec.event_to_dict(e) for e in events], sort_keys=True)))

    def record_collusion(self, silo: str, round: int, events: tuple[dp_accounting.DpEvent, ...],
                         kind: str = "train") -> None:
        """Beside :meth:`record_release` under secure aggregation: what that release costs the
        silo if every other party colludes."""
        with self._db:
            self._db.execute("INSERT OR IGNORE INTO silo_collusion VALUES (?, ?, ?, ?)",
                             (silo, round, kind,
                              json.dumps([event_codec.event_to_dict(e) for e in events], sort_keys=True)))

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

    def silos(self) -> list[str]:
        """Every silo that has answered, each once, by name."""
        names = {silo for (silo,) in self._db.execute("SELECT silo FROM nodes WHERE silo != ''")}
        names |= {silo for (silo,) in self._db.execute("SELECT DISTINCT silo FROM silo_events")}
        return sorted(names)

    def reported_events(self, colluding: bool = False) -> dict[str, list]:
        """Silo -> the events of every release it reported, each release once; ``colluding``: a
        securely aggregated release as what it costs if every other party colludes."""
        events: dict[str, list] = defaultdict(list)
        query = ("SELECT e.silo, COALESCE(c.events, e.events) FROM silo_events e LEFT JOIN silo_collusion c "
                 "ON c.silo = e.silo AND c.round = e.round AND c.kind = e.kind ORDER BY e.silo, e.round, e.kind"
                 if colluding else "SELECT silo, events FROM silo_events ORDER BY silo, round, kind")
        for silo, text in self._db.execute(query):
            events[silo].extend(event_codec.event_from_dict(record) for record in json.loads(text))
        return dict(events)

    def secure(self) -> bool:
        """Whether any release was securely aggregated."""
        return self._db.execute("SELECT 1 FROM silo_collusion LIMIT 1").fetchone() is not None

    def releases(self) -> dict[str, int]:
        """Silo -> how many releases it reported (training rounds and evaluations)."""
        return dict(self._db.execute("SELECT silo, COUNT(*) FROM silo_events GROUP BY silo").fetchall())

    def epsilons(self, delta: float, accountant: str, colluding: bool = False) -> dict[str, float]:
        """ε per silo, recomputed from its reported events (once per distinct multiset of events:
        silos asked the same rounds spent the same, and each computation takes a fraction of a second).
        ``colluding``: what holds if every other party of its secure rounds colluded."""
        reported = self.reported_events(colluding)
        computed: dict[frozenset, float] = {}
        epsilons = {}
        for silo in self.silos():
            events = reported.get(silo, [])
            key = frozenset(Counter(events).items())
            if key not in computed:
                computed[key] = epsilon_of(events, delta, accountant)
            epsilons[silo] = computed[key]
        return epsilons

    def _label(self) -> dict[str, str]:
        return {node: silo or f"node {node}" for node, silo in self._db.execute("SELECT node, silo FROM nodes")}

    def traffic(self) -> dict[str, dict[str, int]]:
        """Silo -> messages and bytes each way, over every node id it has had (a node that never
        answered appears as "node <id>")."""
        label = self._label()
        totals: dict[str, dict[str, int]] = {}
        for node, messages, down, up in self._db.execute(
            "SELECT node, COUNT(*), SUM(bytes_down), SUM(bytes_up) FROM traffic GROUP BY node"
        ):
            entry = totals.setdefault(label.get(node, f"node {node}"), {"messages": 0, "bytes_down": 0, "bytes_up": 0})
            entry["messages"] += messages
            entry["bytes_down"] += down
            entry["bytes_up"] += up
        return dict(sorted(totals.items()))

    def traffic_rows(self) -> list[tuple[int, int, str, int, int]]:
        """(round, attempt, silo, bytes down, bytes up) for every message."""
        label = self._label()
        rows = self._db.execute("SELECT round, attempt, node, bytes_down, bytes_up FROM traffic ORDER BY round")
        return [(r, a, label.get(n, f"node {n}"), d, u) for r, a, n, d, u in rows]

    def rejections(self) -> list[dict]:
        label = self._label()
        rows = self._db.execute("SELECT round, node, reason FROM rejections ORDER BY created")
        return [{"round": r, "node": int(n), "silo": label.get(n, f"node {n}"), "reason": reason} for r, n, reason in rows]
