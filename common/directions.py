"""Seed-keyed random directions z(seed, parameter, coordinate).

Every party of a run regenerates the same direction from a public seed, so a direction never
crosses the network. That only works if z is a pure function of (seed, parameter name,
coordinate): the same numbers on a CPU or a GPU, in float32 or bfloat16, whether a tensor is
generated whole, in chunks, or at a few scattered coordinates. ``torch.Generator`` streams differ
between devices and depend on how much was drawn before, so directions here are *counter-based*:

    h(s, p, i) = splitmix64(key(s, p) + (i + 1) * 0x9E3779B97F4A7C15)       (mod 2**64)

computed with int64 tensor arithmetic, which wraps identically on every device. From h:

* **Rademacher** (default): one 64-bit hash carries the signs of 64 consecutive coordinates,
  z_i = +1 if bit (i mod 64) of h(s, p, i // 64) is set, else -1. Exact in every dtype.
* **Gaussian**: Box-Muller on the two 32-bit halves of h(s, p, i), z_i = sqrt(-2 ln u1) cos(2 pi u2),
  evaluated in float64 with polynomial ``ln`` and ``cos`` built from +, -, *, / and sqrt only.
  Those operations are correctly rounded under IEEE 754 on every device; the vendor ``log``/``cos``
  are not (CPU SIMD bodies and scalar tails even use different implementations), so they would
  break chunking invariance. The float64 value is rounded once to the requested dtype.

Sphere scaling (DPZero draws u uniformly from the sphere of radius sqrt(d)) is applied on top of
these values by :class:`seedtune.common.trainable.DirectionField`, which knows d.
"""

from __future__ import annotations

import functools
import hashlib
import math
from typing import Literal

import torch

Distribution = Literal["rademacher", "gaussian"]
DISTRIBUTIONS: tuple[str, ...] = ("rademacher", "gaussian")

_GOLDEN = 0x9E3779B97F4A7C15
_M1 = 0xBF58476D1CE4E5B9
_M2 = 0x94D049BB133111EB
_U64 = 1 << 64
_GAUSSIAN_BLOCK = 1 << 16


def _signed(value: int) -> int:
    """The int64 with the same 64 bits as the unsigned ``value``."""
    value %= _U64
    return value - _U64 if value >= 1 << 63 else value


def _shr(x: torch.Tensor, n: int) -> torch.Tensor:
    """Logical right shift of int64 bit patterns (torch's ``>>`` is arithmetic)."""
    return (x >> n) & ((1 << (64 - n)) - 1)


def _mix(x: torch.Tensor) -> torch.Tensor:
    """The splitmix64 finaliser on int64 bit patterns."""
    x = (x ^ _shr(x, 30)) * _signed(_M1)
    x = (x ^ _shr(x, 27)) * _signed(_M2)
    return x ^ _shr(x, 31)


def mix_int(x: int) -> int:
    """The splitmix64 finaliser on a Python int, returned as an unsigned 64-bit value."""
    x %= _U64
    x = ((x ^ (x >> 30)) * _M1) % _U64
    x = ((x ^ (x >> 27)) * _M2) % _U64
    return x ^ (x >> 31)


def stream_key(seed: int, name: str) -> int:
    """The 64-bit key of parameter ``name``'s stream under direction seed ``seed``.

    The name enters through BLAKE2b so that keys of different parameters are unrelated; the
    seed enters through splitmix64 so that consecutive seeds give unrelated streams.
    """
    return mix_int(mix_int(seed) ^ _name_key(name))


@functools.lru_cache(maxsize=4096)
def _name_key(name: str) -> int:
    return int.from_bytes(hashlib.blake2b(name.encode(), digest_size=8).digest(), "little")


def _hash(key: int, counter: torch.Tensor) -> torch.Tensor:
    """h = splitmix64(key + (counter + 1) * golden) for an int64 counter tensor."""
    return _mix((counter + 1) * _signed(_GOLDEN) + _signed(key))


def _rademacher_at(key: int, index: torch.Tensor) -> torch.Tensor:
    """Sign bits (0/1, uint8) of arbitrary coordinates ``index``."""
    words = _hash(key, index >> 6)
    # An arithmetic shift leaves bit j of the word in bit 0; & 1 drops the sign extension.
    return ((words >> (index & 63)) & 1).to(torch.uint8)


def rademacher_block(keys: list[int], start: int, stop: int, out: torch.Tensor) -> torch.Tensor:
    """(len(keys), stop - start): row k holds the Rademacher values of coordinates [start, stop)
    under stream key ``keys[k]``, the same bits :func:`_rademacher_range` writes, from one hash of
    a (keys x words) tensor instead of one call per key. Written into ``out`` (a flat tensor of at
    least len(keys) * 64 * words values; reused, since fresh large tensors are slow to fault in);
    each row of the result is contiguous."""
    first, last = start >> 6, (stop - 1) >> 6
    counters = torch.arange(first, last + 1, dtype=torch.int64, device=out.device)
    offsets = torch.tensor([_signed(key) for key in keys], dtype=torch.int64, device=out.device)
    words = _mix(((counters + 1) * _signed(_GOLDEN)).unsqueeze(0) + offsets.unsqueeze(1))
    octets = words.view(torch.uint8).to(torch.int32).reshape(-1)  # (keys, 8 bytes a word), little-endian
    signs = out[: octets.numel() * 8].view(-1, 8)
    torch.index_select(_sign_table(out.dtype, out.device), 0, octets, out=signs)
    offset = start - (first << 6)
    return signs.view(len(keys), -1)[:, offset : offset + (stop - start)]


def _rademacher_range(key: int, start: int, stop: int, out: torch.Tensor) -> None:
    """Write the Rademacher values of coordinates [start, stop) into ``out``, 64 per hash.

    Each byte of a hash word selects a row of the sign table, eight values at once: one gather
    writes ``out``, where splitting the bits, widening them and mapping {0, 1} to {-1, +1} took
    four passes (2.3x slower over 1M coordinates; the values are the same).
    """
    first, last = start >> 6, (stop - 1) >> 6
    words = _hash(key, torch.arange(first, last + 1, dtype=torch.int64, device=out.device))
    # Little-endian bytes of each word hold its bits 0-7, 8-15, ...: bit j of the word is bit
    # (j % 8) of byte j // 8, which is what the shift in _rademacher_at reads.
    octets = words.view(torch.uint8).to(torch.int32)
    table = _sign_table(out.dtype, out.device)
    offset = start - (first << 6)
    if offset == 0 and out.numel() == octets.numel() * 8 and out.is_contiguous():
        torch.index_select(table, 0, octets, out=out.view(-1, 8))
    else:
        out.copy_(torch.index_select(table, 0, octets).view(-1)[offset : offset + (stop - start)])


_TABLES: dict[tuple[torch.dtype, torch.device], torch.Tensor] = {}


def _sign_table(dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """(256, 8): row b, column j is +1 if bit j of the byte b is set, else -1."""
    table = _TABLES.get((dtype, device))
    if table is None:
        bits = (torch.arange(256).unsqueeze(1) >> torch.arange(8)) & 1
        table = _TABLES[(dtype, device)] = (bits * 2 - 1).to(dtype=dtype, device=device)
    return table


# --- float64 ln and cos from correctly rounded operations only -------------------------------
_LN2 = 0.6931471805599453
_TWO_PI = 6.283185307179586


def _ln(u: torch.Tensor) -> torch.Tensor:
    """ln(u) for u > 0 in float64: u = m 2^e with m in [sqrt(1/2), sqrt(2)), then
    ln m = 2 atanh(f) = 2 (f + f^3/3 + f^5/5 + ...) with f = (m - 1)/(m + 1), |f| < 0.172."""
    mantissa, exponent = torch.frexp(u)  # exact: u = mantissa * 2**exponent, mantissa in [0.5, 1)
    small = mantissa < 0.7071067811865476
    mantissa = torch.where(small, mantissa * 2.0, mantissa)
    exponent = exponent.to(torch.float64) - small.to(torch.float64)
    f = (mantissa - 1.0) / (mantissa + 1.0)
    f2 = f * f
    series = torch.full_like(f, 1.0 / 23.0)
    for n in range(10, -1, -1):  # Horner over 1/(2n+1), error < 1e-17 for |f| < 0.172
        series.mul_(f2).add_(1.0 / (2 * n + 1))
    return exponent * _LN2 + 2.0 * f * series


def _cos_turns(t: torch.Tensor) -> torch.Tensor:
    """cos(2 pi t) for t in [0, 1) in float64, by symmetry reduced to an angle in [0, pi/4]."""
    v = torch.abs(t - 0.5)  # cos(2 pi t) = -cos(2 pi v), v in [0, 0.5]
    flip = v > 0.25  # cos(2 pi v) = -cos(2 pi (0.5 - v))
    w = torch.where(flip, 0.5 - v, v)  # w in [0, 0.25]: angle in [0, pi/2]
    use_sin = w > 0.125  # cos(a) = sin(pi/2 - a)
    a = torch.where(use_sin, 0.25 - w, w) * _TWO_PI  # a in [0, pi/4]
    a2 = a * a
    cos_series = torch.zeros_like(a)
    sin_series = torch.zeros_like(a)
    for n in range(10, -1, -1):  # Taylor, error < 1e-19 on [0, pi/4]
        cos_series.mul_(a2).add_(((-1) ** n) / math.factorial(2 * n))
        sin_series.mul_(a2).add_(((-1) ** n) / math.factorial(2 * n + 1))
    value = torch.where(use_sin, a * sin_series, cos_series)
    sign = torch.where(flip, 1.0, -1.0).to(value.dtype)
    return sign * value


def _gaussian(key: int, index: torch.Tensor) -> torch.Tensor:
    """Standard normal values (float64) at coordinates ``index``."""
    h = _hash(key, index)
    high = _shr(h, 32).to(torch.float64)
    low = (h & 0xFFFFFFFF).to(torch.float64)
    u1 = (high + 0.5) * (1.0 / 4294967296.0)  # in (0, 1): ln is finite
    u2 = low * (1.0 / 4294967296.0)  # in [0, 1)
    return torch.sqrt(-2.0 * _ln(u1)) * _cos_turns(u2)


def fill_range(
    distribution: Distribution,
    seed: int,
    name: str,
    start: int,
    out: torch.Tensor,
    *,
    scale: float = 1.0,
) -> torch.Tensor:
    """Write ``scale`` * z at the flat coordinates [start, start + len(out)) of parameter ``name``.

    ``out`` is a 1-D floating tensor of any dtype and device; it is returned. A Gaussian value is
    scaled in float64 and rounded once; Rademacher values ignore ``scale``, which is exactly 1
    for them on the sphere (their norm is sqrt(d) by construction).
    """
    stop = start + out.numel()
    if stop > start:
        key = stream_key(seed, name)
        if distribution == "rademacher":
            _rademacher_range(key, start, stop, out)
        else:
            # Blocks small enough to stay in cache: 7x faster than one pass over a large tensor.
            for block in range(start, stop, _GAUSSIAN_BLOCK):
                end = min(block + _GAUSSIAN_BLOCK, stop)
                index = torch.arange(block, end, dtype=torch.int64, device=out.device)
                out[block - start : end - start].copy_(_gaussian(key, index) * scale)
    return out


def direction_range(
    distribution: Distribution,
    seed: int,
    name: str,
    start: int,
    stop: int,
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """z at the flat coordinates [start, stop) of parameter ``name`` under ``seed``."""
    out = torch.empty(max(stop - start, 0), dtype=dtype, device=device)
    return fill_range(distribution, seed, name, start, out)


def direction_at(
    distribution: Distribution,
    seed: int,
    name: str,
    index: torch.Tensor,
    *,
    dtype: torch.dtype = torch.float32,
    scale: float = 1.0,
) -> torch.Tensor:
    """``scale`` * z at arbitrary flat coordinates ``index`` (int64, any shape) of ``name``."""
    key = stream_key(seed, name)
    index = index.to(torch.int64)
    if distribution == "rademacher":
        return _rademacher_at(key, index).to(dtype).mul_(2).sub_(1)
    return (_gaussian(key, index) * scale).to(dtype)


def direction_norm_squared(values: torch.Tensor) -> int:
    """sum(z^2) in units of 2**-24, as an exact integer.

    Float sums depend on the order of addition, which differs between devices and chunkings;
    the squares rounded to a fixed point sum exactly in int64 (up to 2**31 coordinates of
    |z| < 8), so every party computes the same sphere scaling factor.
    """
    squares = values.to(torch.float64).square() * float(1 << 24)
    return int(torch.round(squares).to(torch.int64).sum().item())

