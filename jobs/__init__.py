"""Jobs: what composes a silo and a coordinator into one way of running.

``train`` (one silo and the coordinator in one process), ``simulate`` (a federation on Flower's
simulation engine), ``export`` (a run's model rebuilt from its log; ``describe`` for ``show``) and
``audit`` (real silos attacked by a coordinator, for an empirical lower bound on epsilon).
Depends on :mod:`seedtune.common`, :mod:`seedtune.client` and :mod:`seedtune.server`; nothing
there depends on it.
"""
