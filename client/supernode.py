"""``seedtune silo supernode``: Flower's own SuperNode, waiting less between rounds.

Flower 1.41's SuperNode waits 3 s after every pull from the SuperLink that finds no message
(``flwr/supernode/start_client_internal.py``), and the SuperExec beside it looks for a ClientApp
to start once a second. A silo pulls right after pushing its reply, and the next round's message
comes a moment later (once every silo has replied and the coordinator has logged the step), so
every round waited out both: 3 s and up to 1 s more, longer than a default-preset step takes. This starts
Flower's own SuperNode, unchanged but for those waits:

* the SuperExec's, through Flower's own setting ``FLWR_SUPEREXEC_TASK_POLL_INTERVAL``
  (unless the operator has set it);
* the SuperNode's idle wait, which Flower does not expose: its loop is given a ``time`` whose
  ``sleep`` starts at :data:`IDLE_FIRST_S` after a message and grows by :data:`IDLE_GROWTH`
  while pulls keep finding nothing, up to Flower's own 3 s, so an idle silo polls the SuperLink
  as rarely as before, and a message that comes t seconds after the last one is picked up at
  most about 0.25 t late (doubling would be t late: a round waited for its next message a
  second longer than it needed); its other waits there (0.5 s checks of the node's own state
  for the ClientApp's reply) last at most :data:`STATE_POLL_S`.

Nothing else changes: the same arguments, messages, TLS and node authentication. flwr is pinned
to 1.41.*, and tests/test_supernode.py fails if an upgrade moves the waits this relies on.
What a round still costs beyond its compute is a fresh ``flwr-clientapp`` process per message,
whose Flower imports alone took 1.05 s here (``seedtune bench deploy``, docs/performance.md).
"""

from __future__ import annotations

import math
import os
import sys
import time

TASK_POLL_ENV = "FLWR_SUPEREXEC_TASK_POLL_INTERVAL"  # Flower's own setting, read by flower-superexec
TASK_POLL_S = 0.05
FLOWER_IDLE_S = 3  # the SuperNode's wait after a pull that found nothing (its literal)
IDLE_FIRST_S = 0.05
IDLE_GROWTH = 1.25  # 14 waits fill the first 5 s after a message, then fewer and fewer
STATE_POLL_S = 0.05
BUSY_GAP_S = 1.0  # a pull that found a message kept the loop away this long: the next idle wait starts short


class IdleWaits:
    """The ``time`` module as the SuperNode's loop sees it, with the waits above."""

    def __init__(self, clock=time):
        self._clock = clock
        self._idle_s = IDLE_FIRST_S
        self._idle_ended = -math.inf

    def __getattr__(self, name: str):
        return getattr(self._clock, name)

    def sleep(self, seconds: float) -> None:
        if seconds != FLOWER_IDLE_S:
            self._clock.sleep(min(seconds, STATE_POLL_S))
            return
        back_to_back = self._clock.monotonic() - self._idle_ended < BUSY_GAP_S  # pulls keep finding nothing
        self._idle_s = min(IDLE_GROWTH * self._idle_s, FLOWER_IDLE_S) if back_to_back else IDLE_FIRST_S
        self._clock.sleep(self._idle_s)
        self._idle_ended = self._clock.monotonic()


def run_supernode(arguments: list[str], name: str = "seedtune silo supernode") -> None:
    """``flower-supernode <arguments>``, in this process, with the waits above (its usage and
    help say ``name``). Whatever it changed is put back if it returns (``--help``, a usage error)."""
    from flwr.supernode import start_client_internal
    from flwr.supernode.cli.flower_supernode import flower_supernode

    saved = os.environ.get(TASK_POLL_ENV), start_client_internal.time, sys.argv
    os.environ.setdefault(TASK_POLL_ENV, str(TASK_POLL_S))  # the SuperExec it starts inherits it
    start_client_internal.time = IdleWaits()
    sys.argv = [name, *arguments]  # argparse's prog
    try:
        flower_supernode()
    finally:
        if saved[0] is None:
            os.environ.pop(TASK_POLL_ENV, None)
        start_client_internal.time, sys.argv = saved[1], saved[2]
