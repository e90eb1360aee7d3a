"""deploy/credentials.py: what it writes is what Flower and TLS accept, and it never overwrites."""

from __future__ import annotations

import importlib.util
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_ssh_private_key
from flwr.cli.supernode.register import try_load_public_key

spec = importlib.util.spec_from_file_location("credentials", Path(__file__).resolve().parents[1] / "deploy" /
                                              "credentials.py")
credentials = importlib.util.module_from_spec(spec)
spec.loader.exec_module(credentials)


def test_the_superlink_certificate_is_signed_by_the_ca_for_every_name_given(tmp_path):
    credentials.write_credentials(tmp_path, 2, ["superlink.example.org", "10.0.0.5"])
    ca = x509.load_pem_x509_certificate((tmp_path / "ca.crt").read_bytes())
    server = x509.load_pem_x509_certificate((tmp_path / "superlink.crt").read_bytes())
    server.verify_directly_issued_by(ca)
    names = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert names.get_values_for_type(x509.DNSName) == ["superlink.example.org"]
    assert [str(ip) for ip in names.get_values_for_type(x509.IPAddress)] == ["10.0.0.5"]
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca


def test_private_keys_are_readable_by_their_owner_only_and_node_keys_are_what_flower_loads(tmp_path):
    written = credentials.write_credentials(tmp_path, 2, ["localhost"])
    for path in written:
        mode = stat.S_IMODE(path.stat().st_mode)
        private = path.suffix in (".key", "") and path.name != "ca.crt"
        assert mode == (0o600 if private else 0o644), path
    for silo in range(2):
        private = load_ssh_private_key((tmp_path / f"silo-{silo}").read_bytes(), password=None)
        assert isinstance(private, ec.EllipticCurvePrivateKey) and private.curve.name == "secp384r1"
        assert try_load_public_key(tmp_path / f"silo-{silo}.pub")  # what `flwr supernode register` reads
    keys = {(tmp_path / f"silo-{silo}.pub").read_bytes().split()[1] for silo in range(2)}
    assert len(keys) == 2


def test_existing_credentials_are_never_overwritten_without_force(tmp_path):
    credentials.write_credentials(tmp_path, 1, ["localhost"])
    before = (tmp_path / "silo-0").read_bytes()
    with pytest.raises(FileExistsError, match="--force"):
        credentials.write_credentials(tmp_path, 1, ["localhost"])
    assert (tmp_path / "silo-0").read_bytes() == before
    assert credentials.main(["--out", str(tmp_path), "--silos", "1"]) == 2
    assert credentials.main(["--out", str(tmp_path), "--node-key", "hospital-b"]) == 0  # a silo's own pair
    assert try_load_public_key(tmp_path / "hospital-b.pub")
    credentials.write_credentials(tmp_path, 1, ["localhost"], force=True)
    assert (tmp_path / "silo-0").read_bytes() != before
