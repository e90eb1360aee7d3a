"""Whether this process's CPU kernels compute a row of a batch the same at every position.

A silo's fixed-shape micro-batches (:mod:`seedtune.common.estimator`) rely on it: one example's
row must not change when another example is added to or removed from its micro-batch. Intel MKL,
torch's CPU BLAS on x86, guarantees it only in strict conditional numerical reproducibility (CNR)
mode, which ``seedtune.common`` asks for through ``MKL_CBWR`` before torch makes its first MKL call;
a process that called MKL first (another library's import, say) runs without it.
"""

from __future__ import annotations

import ctypes
import functools
import os

import torch

_MKL_CBWR_ALL = -1  # mkl_cbwr_get(MKL_CBWR_ALL): the branch and the flags
_MKL_CBWR_STRICT = 0x10000
_MKL_CBWR_COMPATIBLE = 3


@functools.cache
def rows_position_invariant() -> bool | None:
    """True when torch's MKL runs in strict (or compatible) CNR mode; False when it runs without
    it; None when torch has no MKL or its setting cannot be read (another BLAS: not known here,
    and the docs tell such a silo's operator to check, or set micro-batch=1)."""
    if not torch.backends.mkl.is_available():
        return None
    try:
        library = ctypes.CDLL(os.path.join(os.path.dirname(torch.__file__), "lib", "libtorch_cpu.so"))
        settings = library.mkl_serv_cbwr_get(_MKL_CBWR_ALL)
    except (OSError, AttributeError):
        return None
    return bool(settings & _MKL_CBWR_STRICT) or (settings & 0xFFFF) == _MKL_CBWR_COMPATIBLE
