"""Where a silo computes (client/placement.py): the device and precision its operator names."""

from __future__ import annotations

import pytest
import torch

from seedtune.client.app import handle_train
from seedtune.client.limits import NodeConfigError
from seedtune.client.node import SiloNode
from seedtune.client.placement import Placement, placement
from seedtune.common import components
from seedtune.common.config import load_config
from seedtune.common.directions import direction_range
from seedtune.common.wire import Sync
from seedtune.server.federation import DirectTransport, Federation
from seedtune.server.runs import open_run

BF16 = Placement(torch.device("cpu"), torch.bfloat16)


@pytest.mark.parametrize("device, dtype, message", [
    ("cuda:7", "float32", "device='cuda:7' is not available here"),
    ("tpu", "float32", "device='tpu'"),
    ("cpu", "float8", "dtype='float8' is not one of float32, bfloat16, float16"),
])
def test_a_device_or_dtype_this_machine_cannot_run_is_a_one_line_error(device, dtype, message):
    if device.startswith("cuda") and torch.cuda.device_count() > 7:
        pytest.skip("this machine has a cuda:7")
    with pytest.raises(NodeConfigError, match=message) as error:
        placement(device, dtype)
    assert "\n" not in str(error.value)


def test_cpu_runs_every_precision():
    for dtype in ("float32", "bfloat16", "float16"):
        assert placement("cpu", dtype).dtype == getattr(torch, dtype)


def _shard(partition, partitions):
    return lambda config, labels, split: components.silo_shard(config, split, partition, partitions)


def _weights(replica):
    return [entry.values().clone() for entry in replica.parts.trainable]


def test_bfloat16_silos_train_and_replay_to_the_same_bits(tmp_path):
    config = load_config("tiny", overrides=["schedule.steps=5", "schedule.stages=1", "eval.every=0",
                                            "federation.silos=2", "data.synthetic_size=200"], command="simulate")
    run = open_run(config, tmp_path / "run", resume=False)
    nodes = {k: SiloNode(tmp_path / f"silo{k}", _shard(k, 2), partition=k, where=BF16) for k in range(2)}
    transport = DirectTransport({k: (lambda c, node=node: handle_train(c, node)) for k, node in nodes.items()})
    result = Federation(run, transport, progress=False).run_all()
    assert result.steps == 5 and not result.rejections
    replicas = [node.run(run.run_id) for node in nodes.values()]
    assert all(entry.param.dtype == torch.bfloat16 for replica in replicas for entry in replica.parts.trainable)
    assert all(entry.param.dtype == torch.float32 for entry in run.parts.trainable)  # the coordinator's model
    # A silo that joins late replays the whole log in bfloat16 and holds the same bits as the others.
    late = SiloNode(tmp_path / "late", _shard(0, 2), partition=0, where=BF16)
    late.run(run.run_id, run.setup()).catch_up(Sync(0, tuple(run.log.steps()), run.setup()))
    for replica in replicas:
        replica.applier.apply_all(list(run.log.steps(replica.step)))  # the last step reaches silos later
        assert replica.step == late.run(run.run_id).step == 5
        assert all(torch.equal(a, b) for a, b in zip(_weights(replica), _weights(late.run(run.run_id))))
    # ... and not the coordinator's float32 bits: the precision is the silo's, and the docs say so.
    assert not all(torch.equal(a.float(), b) for a, b in zip(_weights(late.run(run.run_id)), _weights(run)))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine: the CPU/CUDA "
                    "identity of directions can only be checked where one is present")
@pytest.mark.parametrize("distribution", ["rademacher", "gaussian"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_directions_are_bit_identical_on_cpu_and_cuda(distribution, dtype):
    for seed, name, start, stop in ((1, "w", 0, 10_000), (2**62 + 5, "encoder.layer.0.weight", 12_345, 80_000)):
        on_cpu = direction_range(distribution, seed, name, start, stop, dtype=dtype, device="cpu")
        on_cuda = direction_range(distribution, seed, name, start, stop, dtype=dtype, device="cuda")
        assert torch.equal(on_cpu, on_cuda.cpu())
