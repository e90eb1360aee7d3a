"""Directions are a pure function of (seed, parameter, coordinate): checked against a pure-Python
reference, across chunkings, dtypes and access patterns, and for their distribution."""

from __future__ import annotations

import math

import pytest
import torch

from seedtune.common import directions as d
from seedtune.common.trainable import DirectionField, TrainableSet


def reference_hash(key: int, counter: int) -> int:
    """splitmix64 in Python integers: the specification the tensor code must match."""
    x = (key + (counter + 1) * 0x9E3779B97F4A7C15) % 2**64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) % 2**64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) % 2**64
    return x ^ (x >> 31)


def test_tensor_hash_matches_the_python_specification():
    key = d.stream_key(7, "layer.weight")
    counters = torch.tensor([0, 1, 2, 63, 64, 2**31, 2**40 + 5])
    got = [value % 2**64 for value in d._hash(key, counters).tolist()]
    assert got == [reference_hash(key, c) for c in counters.tolist()]


def test_rademacher_bits_follow_the_specification():
    key = d.stream_key(3, "w")
    values = d.direction_range("rademacher", 3, "w", 0, 200)
    expected = [2 * ((reference_hash(key, i // 64) >> (i % 64)) & 1) - 1 for i in range(200)]
    assert values.tolist() == expected


@pytest.mark.parametrize("distribution", d.DISTRIBUTIONS)
def test_any_chunking_and_random_access_give_the_same_values(distribution):
    whole = d.direction_range(distribution, 11, "p", 0, 5000)
    generator = torch.Generator().manual_seed(0)
    cuts = sorted(set(torch.randint(1, 5000, (12,), generator=generator).tolist()))
    pieces = [d.direction_range(distribution, 11, "p", a, b) for a, b in zip([0, *cuts], [*cuts, 5000])]
    assert torch.equal(torch.cat(pieces), whole)
    index = torch.randint(0, 5000, (300,), generator=generator)
    assert torch.equal(d.direction_at(distribution, 11, "p", index), whole[index])
    out = torch.empty(1234)
    d.fill_range(distribution, 11, "p", 777, out)
    assert torch.equal(out, whole[777 : 777 + 1234])


@pytest.mark.parametrize("distribution", d.DISTRIBUTIONS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_every_dtype_holds_the_float64_value_rounded_once(distribution, dtype):
    exact = d.direction_range(distribution, 5, "p", 100, 3000, dtype=torch.float64)
    assert torch.equal(d.direction_range(distribution, 5, "p", 100, 3000, dtype=dtype), exact.to(dtype))
    assert torch.equal(d.direction_at(distribution, 5, "p", torch.arange(100, 3000), dtype=dtype), exact.to(dtype))


def test_rademacher_is_balanced_and_gaussian_is_standard_normal():
    signs = d.direction_range("rademacher", 1, "p", 0, 400_000, dtype=torch.float64)
    assert set(signs.unique().tolist()) == {-1.0, 1.0}
    assert abs(signs.mean().item()) < 4 / math.sqrt(400_000)
    z = d.direction_range("gaussian", 1, "p", 0, 400_000, dtype=torch.float64)
    assert abs(z.mean().item()) < 0.01
    assert abs(z.var().item() - 1) < 0.01
    assert abs((z**4).mean().item() - 3) < 0.05  # Gaussian kurtosis
    assert abs((z.abs() < 1).double().mean().item() - 0.6827) < 0.005


def test_polynomial_ln_and_cos_match_libm_to_float64_precision():
    u = torch.rand(100_000, dtype=torch.float64).clamp(min=1e-300)
    assert torch.allclose(d._ln(u), torch.log(u), rtol=0, atol=4e-15)
    assert torch.allclose(d._cos_turns(u.clamp(max=1 - 1e-16)), torch.cos(2 * math.pi * u), rtol=0, atol=4e-15)


def test_seeds_and_names_give_unrelated_streams():
    a = d.direction_range("gaussian", 1, "p", 0, 50_000, dtype=torch.float64)
    for other in (d.direction_range("gaussian", 2, "p", 0, 50_000, dtype=torch.float64),
                  d.direction_range("gaussian", 1, "q", 0, 50_000, dtype=torch.float64)):
        assert abs(torch.corrcoef(torch.stack([a, other]))[0, 1].item()) < 0.03


def test_sphere_scaling_puts_the_direction_on_the_sphere_of_radius_sqrt_d():
    model = torch.nn.Sequential(torch.nn.Linear(40, 30), torch.nn.Linear(30, 7))
    trainable = TrainableSet(model, {"0.weight": torch.arange(0, 1200, 3), "0.bias": None, "1.weight": None})
    field = DirectionField(trainable, "gaussian", sphere=True)
    z = torch.cat([field.fill(entry, 99, torch.empty(entry.size, dtype=torch.float64)) for entry in trainable])
    assert z.numel() == trainable.dimension
    assert z.square().sum().item() == pytest.approx(trainable.dimension, rel=1e-9)
    assert DirectionField(trainable, "rademacher", sphere=True).scale(99) == 1.0


def test_exact_norm_does_not_depend_on_chunking():
    z = d.direction_range("gaussian", 4, "p", 0, 10_000, dtype=torch.float64)
    parts = sum(d.direction_norm_squared(z[a : a + 999]) for a in range(0, 10_000, 999))
    assert parts == d.direction_norm_squared(z)


@pytest.mark.parametrize("distribution", ["rademacher", "gaussian"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_many_seeds_at_once_give_each_seeds_values_bit_for_bit(distribution, dtype):
    """What the update adds for each seed: rows of one block where that is cheaper, the same
    values as filling seed by seed, at any offset and length (across hash words), masked or not."""
    module = torch.nn.Module()
    module.weight = torch.nn.Parameter(torch.zeros(9, 77, dtype=dtype))
    module.bias = torch.nn.Parameter(torch.zeros(5, dtype=dtype))
    trainable = TrainableSet(module, {"weight": None, "bias": torch.tensor([0, 3, 4])})
    field = DirectionField(trainable, distribution)
    seeds = list(range(100, 100 + 70))  # more seeds than one block of a long piece holds
    for entry in trainable:
        for offset, length in ((0, entry.size), (5, min(130, entry.size - 5)), (64, min(64, entry.size - 64))):
            if length <= 0:
                continue
            out = torch.empty(length, dtype=dtype)
            each = [value.clone() for value in field.fill_each(entry, seeds, offset, out)]
            alone = [field.fill(entry, seed, torch.empty(length, dtype=dtype), offset) for seed in seeds]
            assert len(each) == len(seeds)
            assert all(torch.equal(a, b) for a, b in zip(each, alone)), (entry.name, offset, length)
