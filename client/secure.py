"""A silo's side of secure aggregation: its masking key, its operator's settings, and the checks a
round must pass before anything is sampled, computed, charged or released.

Node configuration (``--node-config``; ``seedtune simulate`` sets them for its own silos):

* ``secure-honest`` — t, the fewest honest participants (this silo included) whose noise shares
  this silo counts on. It charges every secure release as the sum of t shares, refuses a round
  with fewer than t participants, and records beside each charge what holds if every other party
  colludes (its own share alone). A deployed silo without it refuses secure rounds.
* ``secure-roster`` — a TOML file whose ``[silos]`` table maps every silo's name to its operator's
  OpenSSH public key (the ``silo-<i>.pub`` lines of ``seedtune-credentials``), exchanged out of
  band. Each peer's masking key must be signed by its roster key, so that a coordinator cannot put
  a key of its own in a peer's place and unmask this silo's reply (with one honest peer's mask
  missing from its view, a reply is uniform).
* ``secure-trust-coordinator = true`` — instead of a roster: this silo's operator accepts an
  honest-but-curious coordinator, one that follows the protocol (relays the silos' keys unchanged)
  but reads everything it receives. A coordinator that breaks the protocol could then substitute
  keys and learn this silo's release with only its own share of the noise on it: the guarantee
  that ``spent_if_all_collude`` reports.
* ``secure-signing-key`` — the operator's private key that signs this silo's masking key (its
  OpenSSH node key, EC P-384, or an Ed25519 key); needed for peers that check a roster.

The masking key is an X25519 key pair for one run, kept in ``<state>/secagg/<run>.key`` (mode
0600), so a restarted silo keeps the key its peers know.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from seedtune.client.limits import NodeConfigError, node_setting
from seedtune.common.privacy.mechanism import share_scale
from seedtune.common.protocol import Participant, TrainRequest
from seedtune.common.secagg import MaskingKey, Roster, SecureAggregationError, SignedKey, check_bits


@dataclass(frozen=True)
class SecureSettings:
    """What a silo's operator decided about secure aggregation (module docstring)."""

    honest: int | None = None
    roster: Roster | None = None
    trust_coordinator: bool = False
    signing_key: object | None = None

    @classmethod
    def from_node_config(cls, node_config: Mapping) -> SecureSettings:
        honest = node_setting(node_config, "secure-honest", None, int, lambda v: v >= 1,
                              "an integer >= 1: the fewest honest participants this silo counts on, itself included")
        roster = Roster.load(str(node_config["secure-roster"])) if "secure-roster" in node_config else None
        trust = node_config.get("secure-trust-coordinator", False)
        if isinstance(trust, str):
            if trust.lower() not in ("true", "false"):
                raise NodeConfigError(f"node config secure-trust-coordinator={trust!r} must be true or false")
            trust = trust.lower() == "true"
        signing_key = None
        if "secure-signing-key" in node_config:
            signing_key = _load_signing_key(Path(str(node_config["secure-signing-key"])))
        return cls(honest, roster, bool(trust), signing_key)


def _load_signing_key(path: Path):
    try:
        data = path.read_bytes()
    except OSError as error:
        raise NodeConfigError(f"node config secure-signing-key={str(path)!r}: {error.strerror}") from None
    for load in (serialization.load_ssh_private_key, serialization.load_pem_private_key):
        try:
            return load(data, password=None)
        except (ValueError, TypeError):
            continue
    raise NodeConfigError(f"node config secure-signing-key={str(path)!r} is not an unencrypted OpenSSH or PEM private "
                          "key (use the silo's node key, silo-<i>)")


def masking_key(state_dir: Path, run_id: str) -> MaskingKey:
    """This silo's masking key for ``run_id``: made once (mode 0600 from the start), then read."""
    directory = state_dir / "secagg"
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / ("".join(c if c.isalnum() or c in "-_" else "_" for c in run_id)[:64] + ".key")
    if not path.exists():
        fresh = X25519PrivateKey.generate()
        raw = fresh.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                                  serialization.NoEncryption())
        temporary = path.with_suffix(f".{os.getpid()}.tmp")
        descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            with os.fdopen(descriptor, "wb") as file:
                file.write(raw)
                file.flush()
                os.fsync(file.fileno())
            os.link(temporary, path)  # whole or absent, and the first process to make one wins
        except FileExistsError:
            pass  # another process serving this silo made it first: use that one
        finally:
            temporary.unlink(missing_ok=True)
    return MaskingKey(X25519PrivateKey.from_private_bytes(path.read_bytes()))


def own_participant(name: str, key: MaskingKey, settings: SecureSettings, run_id: str, public_size: int) -> Participant:
    """How this silo appears in a round: its key, signed by its operator's key if it has one."""
    signature = b""
    if settings.signing_key is not None:
        signature = SignedKey.sign(name, key, settings.signing_key, run_id).signature
    return Participant(name, key.public_bytes, signature, public_size)


def check_round(request: TrainRequest, own: Participant, settings: SecureSettings, *, deployed: bool) -> dict[str, bytes]:
    """Refuse a secure round this silo must not answer, in one line, before anything is drawn or
    charged; return its peers' masking keys (name -> key) to mask with."""
    secure = request.secure
    assert secure is not None
    honest = settings.honest
    if honest is None:
        raise SecureAggregationError(
            "a secure round, but node config secure-honest is not set: set it to the fewest honest participants "
            "this silo counts on (itself included), e.g. secure-honest=3")
    names = secure.names
    if len(names) < honest:
        raise SecureAggregationError(
            f"the round has {len(names)} participant(s), fewer than the {honest} honest ones this silo counts on "
            "(secure-honest); nothing was released")
    mine = next((p for p in secure.participants if p.name == own.name), None)
    if mine is None or mine.public != own.public or mine.public_size != own.public_size:
        raise SecureAggregationError(
            f"the round lists {own.name!r} with a masking key or public size that is not this silo's; refused "
            "(a coordinator that substitutes keys could unmask this silo's reply)")
    peers = {p.name: p for p in secure.participants if p.name != own.name}
    if settings.roster is not None:
        for peer in peers.values():
            settings.roster.verify(SignedKey(peer.name, peer.public, peer.signature), request.run_id)
    elif deployed and not settings.trust_coordinator:
        raise SecureAggregationError(
            "a secure round, but this silo has no secure-roster to check its peers' keys against; set node config "
            "secure-roster=<file>, or secure-trust-coordinator=true to accept an honest-but-curious coordinator")
    check_bits(secure.bits, [p.public_size for p in secure.participants],
               *share_scale(request.release, len(request.probe_seeds)))
    return {name: peer.public for name, peer in peers.items()}
