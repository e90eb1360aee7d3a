"""Pairwise masks that hide each silo's integer release from the coordinator and cancel in the sum.

Secure aggregation as Bonawitz et al. (CCS 2017) build it, for the cross-silo case (few, reliable
participants; no recovery of a dropped one): every pair of participants (i, j) of a round agrees
on a secret by X25519 key agreement, derives from it (HKDF-SHA256, bound to the run, the round and
the pair) a key for a ChaCha20 keystream, and expands that into one mask value per coordinate,
uniform modulo 2^b. Participant i adds the mask it shares with each j it precedes in name order
and subtracts the mask of each j that precedes it. Each masked reply is uniform modulo 2^b on its
own (one mask it does not know hides it); the sum of all of a round's replies is the sum of the
releases modulo 2^b, every mask added once and subtracted once. A set missing one participant
leaves that participant's masks in, so it reveals nothing: a round whose participant fails is
retried with fresh masks, never unmasked from a partial set.

The releases are integers (lattice units plus integer noise, :mod:`seedtune.common.privacy.mechanism`),
so the arithmetic is exact. :func:`sum_bits` chooses b so that no sum can wrap: every silo's
clipped sum is bounded by its public size times the clip bound in lattice units, and its noise
share is cut at ``tail`` standard deviations (the chance of a draw beyond 40 standard deviations
is below 1e-340, smaller than float64 can hold).

Only ``cryptography``'s primitives are used; nothing here is a primitive of our own.
"""

from __future__ import annotations

import math
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from seedtune.common.errors import SeedtuneError

MAX_BITS = 64  # the masks and sums are numpy uint64: arithmetic modulo 2^64 is exact
TAIL = 40.0  # standard deviations of noise a share is bounded by when choosing b


class SecureAggregationError(SeedtuneError):
    """A round that secure aggregation cannot run or unmask: said in one line, nothing released."""


class MaskingKey:
    """A participant's X25519 key pair for one run (never reused across runs)."""

    def __init__(self, private: X25519PrivateKey | None = None):
        self._private = private or X25519PrivateKey.generate()

    @property
    def public_bytes(self) -> bytes:
        return self._private.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)

    def pair_key(self, own: str, other: str, other_public: bytes, context: bytes) -> bytes:
        """The 32-byte key only ``own`` and ``other`` can derive: HKDF over their X25519 secret,
        bound to ``context`` (the run and the round) and to the pair's names in order."""
        if own == other:
            raise SecureAggregationError(f"participant {own!r} appears twice in the round")
        secret = self._private.exchange(X25519PublicKey.from_public_bytes(other_public))
        first, second = sorted((own, other))
        info = b"seedtune-secagg-v1\0" + context + b"\0" + first.encode() + b"\0" + second.encode()
        return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(secret)


@dataclass(frozen=True)
class SignedKey:
    """A participant's masking public key for one run, signed with its operator's long-term key
    (the node key the deployment already registers), so that a coordinator cannot put its own key
    in the participant's place and unmask that participant's reply."""

    name: str
    public: bytes  # X25519, raw
    signature: bytes

    @staticmethod
    def statement(name: str, public: bytes, run_id: str) -> bytes:
        return b"seedtune-secagg-key-v1\0" + run_id.encode() + b"\0" + name.encode() + b"\0" + public

    @classmethod
    def sign(cls, name: str, key: MaskingKey, signing_key, run_id: str) -> SignedKey:
        """``key``'s public half signed by ``signing_key`` (EC P-384 as deploy/credentials.py makes
        node keys, or Ed25519), for ``run_id`` only."""
        message = cls.statement(name, key.public_bytes, run_id)
        if isinstance(signing_key, ec.EllipticCurvePrivateKey):
            signature = signing_key.sign(message, ec.ECDSA(hashes.SHA384()))
        elif isinstance(signing_key, ed25519.Ed25519PrivateKey):
            signature = signing_key.sign(message)
        else:
            raise SecureAggregationError(f"a signing key must be EC or Ed25519, not {type(signing_key).__name__}")
        return cls(name, key.public_bytes, signature)


class Roster:
    """The operators' long-term public keys, exchanged out of band: a TOML file whose ``[silos]``
    table maps each silo's name to its OpenSSH public key (the ``silo-<i>.pub`` lines of
    deploy/credentials.py)."""

    def __init__(self, keys: Mapping[str, object], source: str = "the roster"):
        self.keys = dict(keys)
        self.source = source

    @classmethod
    def load(cls, path: str | Path) -> Roster:
        path = Path(path)
        try:
            table = tomllib.loads(path.read_text()).get("silos")
        except FileNotFoundError:
            raise SecureAggregationError(f"secagg roster {str(path)!r}: no such file") from None
        except tomllib.TOMLDecodeError as error:
            raise SecureAggregationError(f"secagg roster {str(path)!r} is not valid TOML: {error}") from None
        if not isinstance(table, dict) or not table:
            raise SecureAggregationError(f"secagg roster {str(path)!r} has no [silos] table of name = \"ssh public key\"")
        keys = {}
        for name, line in table.items():
            try:
                keys[name] = serialization.load_ssh_public_key(str(line).encode())
            except (ValueError, TypeError, NotImplementedError):
                raise SecureAggregationError(f"secagg roster {str(path)!r}: the key of silo {name!r} is not an OpenSSH "
                                             "public key (paste its silo-<i>.pub line)") from None
        return cls(keys, repr(str(path)))

    def verify(self, signed: SignedKey, run_id: str) -> bytes:
        """``signed.public`` if the roster's key for ``signed.name`` signed it for this run."""
        key = self.keys.get(signed.name)
        if key is None:
            raise SecureAggregationError(f"participant {signed.name!r} is not in {self.source}; the round is refused "
                                         "(add its operator's public key to the roster, or leave it out of the run)")
        message = SignedKey.statement(signed.name, signed.public, run_id)
        try:
            if isinstance(key, ec.EllipticCurvePublicKey):
                key.verify(signed.signature, message, ec.ECDSA(hashes.SHA384()))
            elif isinstance(key, ed25519.Ed25519PublicKey):
                key.verify(signed.signature, message)
            else:
                raise InvalidSignature
        except InvalidSignature:
            raise SecureAggregationError(f"the masking key of {signed.name!r} is not signed by its key in {self.source} "
                                         "for this run; the round is refused and nothing is released") from None
        return signed.public


def mask_values(key: bytes, length: int, bits: int) -> np.ndarray:
    """``length`` values uniform modulo 2^bits: the ChaCha20 keystream of ``key`` (nonce zero: each
    key masks one reply only), 8 bytes a value."""
    encryptor = Cipher(algorithms.ChaCha20(key, bytes(16)), mode=None).encryptor()
    stream = np.frombuffer(encryptor.update(bytes(8 * length)), dtype="<u8")
    return stream & _modulus_mask(bits)


def mask(release: np.ndarray, *, own: str, key: MaskingKey, peers: Mapping[str, bytes], context: bytes,
         bits: int) -> np.ndarray:
    """``release`` (integers) modulo 2^bits plus this participant's masks with every peer of the
    round (``peers``: name -> public key, every other participant). What leaves the silo."""
    values = np.asarray(release)
    if values.dtype.kind not in "iu":
        raise SecureAggregationError(f"a masked release must be integers, not {values.dtype}")
    out = values.astype(np.int64).astype(np.uint64) & _modulus_mask(bits)  # two's complement modulo 2^bits
    for name, public in peers.items():
        share = mask_values(key.pair_key(own, name, public, context), len(values), bits)
        out = (out + share) if own < name else (out - share)
        out &= _modulus_mask(bits)
    return out


def unmask_sum(replies: Mapping[str, np.ndarray], participants: set[str], bits: int) -> np.ndarray:
    """The sum of the releases of ``participants``, from every one of their masked replies, as
    signed integers. A missing reply leaves masks in the sum: refused, never unmasked."""
    missing = sorted(participants - set(replies))
    if missing:
        raise SecureAggregationError(f"no reply from {', '.join(missing)}: the round cannot be unmasked; retry it "
                                     "with the silos that answer (fresh masks and noise)")
    total = np.zeros_like(next(iter(replies.values())), dtype=np.uint64)
    for name in sorted(participants):
        total = (total + replies[name]) & _modulus_mask(bits)
    return _signed(total, bits)


def sum_bits(public_sizes: list[int], clip_units: float, share_std: float, tail: float = TAIL) -> int:
    """The fewest bits b such that the sum of every silo's release lies in [-2^(b-1), 2^(b-1)):
    each silo's clipped sum is at most its public size times the clip bound in lattice units per
    coordinate, and its noise share at most ``tail`` standard deviations."""
    bound = sum(size * clip_units + tail * share_std + 1 for size in public_sizes)
    return math.ceil(math.log2(bound + 1)) + 1


def check_bits(bits: int, public_sizes: list[int], clip_units: float, share_std: float) -> None:
    """Refuse ``bits`` too small for the round's sums (or outside what the arithmetic supports)."""
    needed = sum_bits(public_sizes, clip_units, share_std)
    if not 2 <= bits <= MAX_BITS:
        raise SecureAggregationError(f"federation.secure_bits={bits} is outside [2, {MAX_BITS}]")
    if needed > MAX_BITS:
        raise SecureAggregationError(f"this round's sums need {needed} bits, more than {MAX_BITS}; lower the silos' "
                                     "public sizes or the noise")
    if bits < needed:
        raise SecureAggregationError(f"federation.secure_bits={bits} is too small: this round's sums need {needed} "
                                     f"bits; set federation.secure_bits={needed} or more")


def _modulus_mask(bits: int) -> np.uint64:
    return np.uint64((1 << bits) - 1)


def _signed(values: np.ndarray, bits: int) -> np.ndarray:
    """Residues modulo 2^bits read as two's complement integers in [-2^(bits-1), 2^(bits-1))."""
    half = 1 << (bits - 1)
    if bits == 64:
        return values.astype(np.uint64).view(np.int64).copy()
    as_int = values.astype(np.int64)
    return np.where(as_int >= half, as_int - (1 << bits), as_int)
