"""TLS certificates and SuperNode keys for a secure Flower deployment.

A cross-site deployment needs two kinds of credentials (README, "Cross-site training"):

- TLS: a certificate authority (CA) and a SuperLink certificate signed by it, naming every
  host name and IP address the SuperNodes and the `flwr` CLI dial. The SuperLink gets
  `--ssl-ca-certfile ca.crt --ssl-certfile server.crt --ssl-keyfile server.key`; every
  SuperNode and every CLI connection only gets `ca.crt`, to check whom it talks to.
- SuperNode authentication: one EC key pair per SuperNode, in OpenSSH format (what
  `ssh-keygen -t ecdsa -b 384` writes and what Flower reads). The private key stays on its
  site (`flower-supernode --auth-supernode-private-key`); the public key is registered on the
  SuperLink with `flwr supernode register`, which is what lets that node in.

    python -m fl_diloco.certificates superlink OUT_DIR [--hosts localhost 127.0.0.1 ...]
    python -m fl_diloco.certificates node-key OUT_DIR/site-a     # site-a + site-a.pub

Private keys are written with mode 0600; an existing file is never overwritten.
"""

from __future__ import annotations

import argparse
import datetime
import ipaddress
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

DEFAULT_HOSTS = ("localhost", "127.0.0.1")
CA_CERT = "ca.crt"
CA_KEY = "ca.key"
SERVER_CERT = "server.crt"
SERVER_KEY = "server.key"
# Flower's node authentication takes any NIST curve; P-384 is what its docs generate.
CURVE = ec.SECP384R1


def _write_new(path: Path, data: bytes, mode: int) -> None:
    """Create `path` with `mode` from the start (no window where a key is world-readable)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def _pem_private(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _subject_alternative_names(hosts: Sequence[str]) -> x509.SubjectAlternativeName:
    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    return x509.SubjectAlternativeName(names)


def _validity(days: int) -> tuple[datetime.datetime, datetime.datetime]:
    # Backdated a little so a peer whose clock lags ours still accepts a fresh certificate.
    now = datetime.datetime.now(datetime.UTC)
    return now - datetime.timedelta(hours=1), now + datetime.timedelta(days=days)


def make_superlink_certificates(out_dir: Path, hosts: Sequence[str] = DEFAULT_HOSTS,
                                days: int = 365) -> dict[str, Path]:
    """Write a CA and a SuperLink certificate for `hosts` into `out_dir`; return their paths.

    `hosts` must list every name or IP address that SuperNodes and the `flwr` CLI use in
    `--superlink`/`address`, plus 127.0.0.1: the SuperLink's own ServerApp process dials it
    on loopback, through the same TLS port.
    """
    if not hosts:
        raise ValueError("give at least one host name or IP address for the SuperLink certificate")
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {name: out_dir / name for name in (CA_CERT, CA_KEY, SERVER_CERT, SERVER_KEY)}
    existing = [str(p) for p in paths.values() if p.exists()]
    if existing:
        raise FileExistsError(f"refusing to overwrite {', '.join(existing)}; pick an empty directory")
    not_before, not_after = _validity(days)

    ca_key = ec.generate_private_key(CURVE())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fl-diloco deployment CA")])
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name).issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before).not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False,
                                     key_encipherment=False, data_encipherment=False,
                                     key_agreement=False, key_cert_sign=True, crl_sign=True,
                                     encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA384())
    )

    server_key = ec.generate_private_key(CURVE())
    server_cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
        .issuer_name(ca_name)
        .public_key(server_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before).not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False,
                                     key_encipherment=False, data_encipherment=False,
                                     key_agreement=False, key_cert_sign=False, crl_sign=False,
                                     encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(_subject_alternative_names(hosts), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(server_key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                       critical=False)
        .sign(ca_key, hashes.SHA384())
    )

    _write_new(paths[CA_KEY], _pem_private(ca_key), 0o600)
    _write_new(paths[SERVER_KEY], _pem_private(server_key), 0o600)
    _write_new(paths[CA_CERT], ca_cert.public_bytes(serialization.Encoding.PEM), 0o644)
    _write_new(paths[SERVER_CERT], server_cert.public_bytes(serialization.Encoding.PEM), 0o644)
    return paths


def make_node_key(private_key_path: Path, comment: str = "") -> tuple[Path, Path]:
    """Write a SuperNode's key pair: `private_key_path` (0600) and `private_key_path`.pub.

    OpenSSH format, like `ssh-keygen -t ecdsa -b 384 -N "" -f PATH`: Flower's SuperNode reads
    the private key with `--auth-supernode-private-key`, `flwr supernode register` the public one.
    """
    public_key_path = private_key_path.with_name(private_key_path.name + ".pub")
    for path in (private_key_path, public_key_path):
        if path.exists():
            raise FileExistsError(f"refusing to overwrite {path}")
    private_key_path.parent.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(CURVE())
    private_bytes = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                      serialization.NoEncryption())
    public_bytes = key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                                 serialization.PublicFormat.OpenSSH)
    if comment:
        public_bytes += b" " + comment.encode()
    _write_new(private_key_path, private_bytes, 0o600)
    _write_new(public_key_path, public_bytes + b"\n", 0o644)
    return private_key_path, public_key_path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fl_diloco.certificates",
                                     description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    superlink = commands.add_parser("superlink", help="a CA and the SuperLink's TLS certificate")
    superlink.add_argument("out_dir", type=Path)
    superlink.add_argument("--hosts", nargs="+", default=list(DEFAULT_HOSTS),
                           help="every name/IP the SuperLink is reached by (keep 127.0.0.1: "
                                "its ServerApp dials it on loopback)")
    superlink.add_argument("--days", type=int, default=365, help="validity of both certificates")
    node = commands.add_parser("node-key", help="a SuperNode's authentication key pair")
    node.add_argument("private_key", type=Path, help="path of the private key; .pub is added for the public one")
    node.add_argument("--comment", default="", help="appended to the public key, e.g. the site's name")
    args = parser.parse_args(argv)
    try:
        if args.command == "superlink":
            paths = make_superlink_certificates(args.out_dir, args.hosts, args.days)
            for name, path in paths.items():
                print(f"{name:12s} {path}")
        else:
            private, public = make_node_key(args.private_key, args.comment)
            print(f"private key  {private}  (stays on this site)\npublic key   {public}  "
                  "(register it: flwr supernode register <it> <connection>)")
    except (FileExistsError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
