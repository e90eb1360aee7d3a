"""Fixed-shape micro-batches need kernels that give a row the same bits at every position of a
batch (common/kernels.py); where that is not known to hold, a silo computes each example alone."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from torch import nn

from seedtune.common import estimator as estimator_module
from seedtune.common.estimator import KernelWarning, safe_micro_batch
from seedtune.common.kernels import rows_position_invariant

MKL = torch.backends.mkl.is_available()


def test_this_process_runs_mkl_in_strict_reproducibility_mode():
    # seedtune.common set MKL_CBWR before torch's first MKL call (tests/conftest.py imports it first)
    assert rows_position_invariant() is (True if MKL else None)


@pytest.mark.skipif(not MKL, reason="torch here has no MKL: there is no MKL mode to detect")
def test_a_process_that_called_mkl_before_seedtune_is_detected():
    code = ("import torch; torch.ones(4, 8) @ torch.ones(8, 2); "
            "from seedtune.common.kernels import rows_position_invariant; print(rows_position_invariant())")
    env = {key: value for key, value in os.environ.items() if key != "MKL_CBWR"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True).stdout
    assert out.strip() == "False"


def test_micro_batches_fall_back_to_one_example_at_a_time_where_rows_may_move(monkeypatch):
    model = nn.Linear(4, 2)
    monkeypatch.setattr(estimator_module, "rows_position_invariant", lambda: False)
    with pytest.warns(KernelWarning, match="each example is computed alone"):
        assert safe_micro_batch(16, model) == 1
    assert safe_micro_batch(1, model) == 1
    for known in (True, None):  # invariant, or another BLAS whose operator the docs tell to check
        monkeypatch.setattr(estimator_module, "rows_position_invariant", lambda known=known: known)
        assert safe_micro_batch(16, model) == 16
