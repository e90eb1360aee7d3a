#!/usr/bin/env python3
"""Make what a seedtune deployment needs to be encrypted and authenticated.

    python deploy/credentials.py --out deploy/credentials --silos 3 \\
        --server-name superlink --server-name localhost --server-name 127.0.0.1

writes

    ca.crt, ca.key              the deployment's own certificate authority (keep ca.key offline)
    superlink.crt, .key         the SuperLink's TLS certificate, signed by the CA, for those names
    silo-<i>, silo-<i>.pub      each silo's node key pair (EC P-384, OpenSSH format, as Flower's
                                ``--auth-supernode-private-key`` and ``flwr supernode register``
                                read them)

Every silo gets ``ca.crt`` (to know it talks to the real SuperLink) and only its own ``silo-<i>``;
the SuperLink operator registers each ``silo-<i>.pub``. Across organisations a silo better makes its
own key pair, so that its private key never leaves it, and sends only the public half:

    python deploy/credentials.py --node-key hospital-b --out keys/     # keys/hospital-b, .pub

Existing files are never overwritten (``--force`` to replace them), so running it twice does not
invalidate keys already handed out.
"""

from __future__ import annotations

import argparse
import datetime
import ipaddress
import os
import sys
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

VALID_DAYS = 365


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "seedtune deployment"),
                      x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _builder(subject: x509.Name, issuer: x509.Name, public_key) -> x509.CertificateBuilder:
    start = datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(minutes=5)
    return (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer).public_key(public_key)
            .serial_number(x509.random_serial_number()).not_valid_before(start)
            .not_valid_after(start + datetime.timedelta(days=VALID_DAYS)))


def make_ca() -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP384R1())
    name = _name("seedtune deployment CA")
    cert = (_builder(name, name, key.public_key())
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                         content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False,
                                         encipher_only=False, decipher_only=False), critical=True)
            .sign(key, hashes.SHA384()))
    return key, cert


def make_server_certificate(ca_key, ca_cert: x509.Certificate, names: list[str]):
    key = ec.generate_private_key(ec.SECP384R1())
    alternative = []
    for name in names:
        try:
            alternative.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            alternative.append(x509.DNSName(name))
    cert = (_builder(_name(names[0]), ca_cert.subject, key.public_key())
            .add_extension(x509.SubjectAlternativeName(alternative), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .sign(ca_key, hashes.SHA384()))
    return key, cert


def node_key_pair(comment: str) -> tuple[bytes, bytes]:
    """(private, public) in OpenSSH format; EC on a NIST curve, which Flower requires."""
    key = ec.generate_private_key(ec.SECP384R1())
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                serialization.NoEncryption())
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    return private, public + f" {comment}\n".encode()


def _pem(key) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def write_node_key(out: Path, name: str, force: bool = False) -> list[Path]:
    """One silo's key pair: ``out/<name>`` (private, mode 0600) and ``out/<name>.pub``."""
    private, public = node_key_pair(name)
    return _write(out, {name: (private, True), f"{name}.pub": (public, False)}, force)


def write_credentials(out: Path, silos: int, server_names: list[str], force: bool = False) -> list[Path]:
    """Write everything into ``out``; returns the paths written. Private keys are mode 0600."""
    files: dict[str, tuple[bytes, bool]] = {}  # name -> (content, private)
    ca_key, ca_cert = make_ca()
    files["ca.crt"] = (ca_cert.public_bytes(serialization.Encoding.PEM), False)
    files["ca.key"] = (_pem(ca_key), True)
    server_key, server_cert = make_server_certificate(ca_key, ca_cert, server_names)
    files["superlink.crt"] = (server_cert.public_bytes(serialization.Encoding.PEM), False)
    files["superlink.key"] = (_pem(server_key), True)
    for silo in range(silos):
        private, public = node_key_pair(f"silo-{silo}")
        files[f"silo-{silo}"] = (private, True)
        files[f"silo-{silo}.pub"] = (public, False)
    return _write(out, files, force)


def _write(out: Path, files: dict[str, tuple[bytes, bool]], force: bool) -> list[Path]:
    existing = sorted(name for name in files if (out / name).exists())
    if existing and not force:
        raise FileExistsError(f"{out / existing[0]} already exists: keep the credentials already handed out, "
                              "or pass --force to replace all of them")
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name, (content, private) in files.items():
        path = out / name
        temporary = path.with_name(path.name + ".tmp")
        temporary.write_bytes(content)
        os.chmod(temporary, 0o600 if private else 0o644)
        temporary.replace(path)
        written.append(path)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("deploy/credentials"), help="folder to write into")
    parser.add_argument("--silos", type=int, default=3, help="how many silo key pairs to make")
    parser.add_argument("--server-name", action="append", dest="server_names",
                        help="a host name or IP address the SuperLink is reached at (repeat); "
                             "default: superlink, localhost, 127.0.0.1")
    parser.add_argument("--node-key", metavar="NAME", help="make only one silo's key pair, NAME and NAME.pub")
    parser.add_argument("--force", action="store_true", help="replace existing credentials")
    args = parser.parse_args(argv)
    if args.silos < 1:
        parser.error(f"--silos={args.silos}: need at least one silo")
    if args.node_key is not None and not args.node_key.replace("-", "").replace("_", "").isalnum():
        parser.error(f"--node-key={args.node_key!r}: use letters, digits, '-' and '_' only")
    names = args.server_names or ["superlink", "localhost", "127.0.0.1"]
    try:
        if args.node_key:
            written = write_node_key(args.out, args.node_key, force=args.force)
        else:
            written = write_credentials(args.out, args.silos, names, force=args.force)
    except FileExistsError as error:
        print(f"credentials: error: {error}", file=sys.stderr)
        return 2
    detail = "a silo key pair" if args.node_key else f"SuperLink names: {', '.join(names)}"
    print(f"wrote {len(written)} files to {args.out} ({detail})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
