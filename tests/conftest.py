"""Shared fixtures: tiny real models (random weights, real architectures) and their tasks."""

from __future__ import annotations

import os

import pytest
import seedtune.common  # noqa: F401  (before torch's first MKL call: it sets MKL_CBWR, common/kernels.py)
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

from seedtune.common.data import SYNTHETIC_LABELS, load_text_data  # noqa: E402
from seedtune.common.tasks import load_task  # noqa: E402


@pytest.fixture(scope="session")
def synthetic():
    return load_text_data("synthetic", split_seed=0, validation_fraction=0.1, test_fraction=0.1,
                          synthetic_size=400)


def pytest_collection_modifyitems(items):
    """Whatever needs docker, real Flower processes or a real pretrained model is also ``slow``:
    ``pytest -m "not slow"`` is the few-minute run for development; CI runs everything."""
    for item in items:
        if any(item.get_closest_marker(name) for name in ("docker", "processes", "models")):
            item.add_marker(pytest.mark.slow)


def make_task(kind: str, dtype=torch.float32):
    task = load_task("tiny", kind, SYNTHETIC_LABELS, max_length=24)
    task.module.to(dtype)
    return task


@pytest.fixture(params=["sequence-classification", "prompt-classification", "causal-lm"])
def any_task(request):
    return make_task(request.param)


def batch_of(task, data, size=6, offset=0):
    rows = data.train[offset : offset + size]
    return task.encode(rows["text"], rows["label"])
