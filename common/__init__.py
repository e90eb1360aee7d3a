"""The mathematics and the wire, shared by silos and the coordinator: directions, the estimator,
the privacy path, schedules, pruning, the update log, tasks, configuration and messages.

Depends on neither :mod:`seedtune.client` nor :mod:`seedtune.server`.
"""

import os as _os

# Fixed-shape micro-batches (common/estimator.py) need a row computed the same at every position of
# a batch. Intel MKL's matrix kernels on AVX-512 CPUs do not guarantee it (a row's last bits moved
# with its neighbours on this project's machines) unless MKL runs in strict conditional numerical
# reproducibility mode, which it reads from MKL_CBWR before its first call, and which costs no
# measurable speed here. Set before any seedtune module imports torch; common/kernels.py checks
# that it took effect, and a silo computes each example alone where it did not.
_os.environ.setdefault("MKL_CBWR", "AUTO,STRICT")
