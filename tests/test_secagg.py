"""The coordinator's view under secure aggregation: one masked reply is uniform modulo 2^b, the
replies of all participants sum to the sum of their releases exactly, and a set missing one
participant cannot be unmasked."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import chisquare

from seedtune.common.secagg import (
    MaskingKey,
    SecureAggregationError,
    check_bits,
    mask,
    mask_values,
    sum_bits,
    unmask_sum,
)

CONTEXT = b"run-1\0round-7"


def _round(releases: dict[str, np.ndarray], bits: int, context: bytes = CONTEXT) -> dict[str, np.ndarray]:
    keys = {name: MaskingKey() for name in releases}
    publics = {name: key.public_bytes for name, key in keys.items()}
    return {name: mask(release, own=name, key=keys[name], context=context, bits=bits,
                       peers={other: public for other, public in publics.items() if other != name})
            for name, release in releases.items()}


@pytest.mark.parametrize("bits", [20, 40, 64])
@pytest.mark.parametrize("silos", [2, 3, 7])
def test_the_masked_replies_sum_to_the_sum_of_the_releases_exactly(bits, silos):
    rng = np.random.default_rng(silos)
    limit = 2 ** (bits - 2) // silos
    releases = {f"silo-{i}": rng.integers(-limit, limit, size=64) for i in range(silos)}
    replies = _round(releases, bits)
    assert all(reply.dtype == np.uint64 and int(reply.max()) < 2**bits for reply in replies.values())
    total = unmask_sum(replies, set(releases), bits)
    assert np.array_equal(total, sum(releases.values()))


@pytest.mark.parametrize("value", [0, 100, -12345])
def test_one_masked_reply_is_uniform_whatever_its_release(value):
    """Every residue modulo 2^8 equally likely, for a release of zeros and for others alike: the
    reply carries no trace of the value."""
    bits, length = 8, 60_000
    replies = _round({"a": np.full(length, value), "b": np.zeros(length, dtype=np.int64)}, bits)
    counts = np.bincount(replies["a"].astype(np.int64), minlength=2**bits)
    assert chisquare(counts).pvalue > 1e-4


def test_a_set_missing_one_participant_cannot_be_unmasked():
    releases = {name: np.arange(16) * (i + 1) for i, name in enumerate(["a", "b", "c"])}
    replies = _round(releases, 32)
    partial = {name: reply for name, reply in replies.items() if name != "c"}
    with pytest.raises(SecureAggregationError, match="no reply from c.*retry"):
        unmask_sum(partial, set(releases), 32)
    # Summed anyway, the two replies hold the masks each shares with c: nothing of a + b shows.
    naive = unmask_sum(partial, {"a", "b"}, 32)
    assert not np.any(naive == releases["a"] + releases["b"])


def test_only_the_pair_derives_its_key_and_a_round_never_reuses_one():
    a, b, c = MaskingKey(), MaskingKey(), MaskingKey()
    ab = a.pair_key("a", "b", b.public_bytes, CONTEXT)
    assert ab == b.pair_key("b", "a", a.public_bytes, CONTEXT)
    assert ab != c.pair_key("c", "b", b.public_bytes, CONTEXT)  # a third party's exchange gives another key
    assert ab != a.pair_key("a", "b", b.public_bytes, b"run-1\0round-8")
    assert not np.array_equal(mask_values(ab, 8, 64), mask_values(a.pair_key("a", "b", b.public_bytes, b"x"), 8, 64))
    with pytest.raises(SecureAggregationError, match="twice"):
        a.pair_key("a", "a", a.public_bytes, CONTEXT)


def test_b_from_sum_bits_holds_the_largest_possible_sums_and_a_smaller_b_is_refused():
    sizes, clip_units, share_std = [1000, 250, 4000], 8192.0, 9000.0
    bits = sum_bits(sizes, clip_units, share_std)
    extreme = [size * clip_units + 40 * share_std for size in sizes]
    for sign in (1, -1):
        releases = {f"s{i}": np.full(4, sign * int(v)) for i, v in enumerate(extreme)}
        assert np.array_equal(unmask_sum(_round(releases, bits), set(releases), bits), sum(releases.values()))
    check_bits(bits, sizes, clip_units, share_std)
    with pytest.raises(SecureAggregationError, match=f"secure_bits={bits - 1} is too small.*secure_bits={bits}"):
        check_bits(bits - 1, sizes, clip_units, share_std)
    with pytest.raises(SecureAggregationError, match="more than 64"):
        check_bits(64, [2**60], clip_units, share_std)


def test_a_release_that_is_not_integers_is_refused():
    key = MaskingKey()
    with pytest.raises(SecureAggregationError, match="integers"):
        mask(np.array([0.5]), own="a", key=key, peers={"b": MaskingKey().public_bytes}, context=CONTEXT, bits=32)


def _roster_file(tmp_path, signers: dict) -> str:
    from cryptography.hazmat.primitives import serialization

    lines = ["[silos]"]
    for name, key in signers.items():
        public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
        lines.append(f'"{name}" = "{public.decode()}"')
    path = tmp_path / "roster.toml"
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def test_a_roster_accepts_only_keys_its_operators_signed_for_this_run(tmp_path):
    from cryptography.hazmat.primitives.asymmetric import ec, ed25519

    from seedtune.common.secagg import Roster, SignedKey

    signers = {"hospital-a": ec.generate_private_key(ec.SECP384R1()), "bank-b": ed25519.Ed25519PrivateKey.generate()}
    roster = Roster.load(_roster_file(tmp_path, signers))
    key = MaskingKey()
    signed = SignedKey.sign("hospital-a", key, signers["hospital-a"], "run-1")
    assert roster.verify(signed, "run-1") == key.public_bytes
    assert roster.verify(SignedKey.sign("bank-b", key, signers["bank-b"], "run-1"), "run-1") == key.public_bytes
    substituted = SignedKey("hospital-a", MaskingKey().public_bytes, signed.signature)  # a coordinator's own key
    for bad, run in [(substituted, "run-1"), (signed, "run-2"),
                     (SignedKey.sign("hospital-a", key, ec.generate_private_key(ec.SECP384R1()), "run-1"), "run-1")]:
        with pytest.raises(SecureAggregationError, match="'hospital-a' is not signed by its key in .*roster.toml"):
            roster.verify(bad, run)
    with pytest.raises(SecureAggregationError, match="'clinic-c' is not in .*add its operator's public key"):
        roster.verify(SignedKey.sign("clinic-c", key, signers["bank-b"], "run-1"), "run-1")


def test_a_bad_roster_file_is_one_line_naming_it(tmp_path):
    from seedtune.common.secagg import Roster

    with pytest.raises(SecureAggregationError, match="no such file"):
        Roster.load(tmp_path / "missing.toml")
    broken = tmp_path / "broken.toml"
    broken.write_text('[silos]\n"a" = "ssh-rsa not-a-key"\n')
    with pytest.raises(SecureAggregationError, match="the key of silo 'a' is not an OpenSSH public key"):
        Roster.load(broken)
    empty = tmp_path / "empty.toml"
    empty.write_text("title = 'x'\n")
    with pytest.raises(SecureAggregationError, match=r"no \[silos\] table"):
        Roster.load(empty)
