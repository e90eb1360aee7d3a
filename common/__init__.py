"""The mathematics and the wire, shared by silos and the coordinator: directions, the estimator,
the privacy path, schedules, pruning, the update log, tasks, configuration and messages.

Depends on neither :mod:`seedtune.client` nor :mod:`seedtune.server`.
"""
