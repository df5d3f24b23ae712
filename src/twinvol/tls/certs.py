"""A small CA for a cluster: `twinvol certs init|issue`, with the `cryptography` library.

Files are laid out as libnbd (`tls-certificates=DIR`) and QEMU (`tls-creds-x509,dir=DIR`)
expect them: `ca-cert.pem`, `server-cert.pem`, `server-key.pem`, `client-cert.pem`,
`client-key.pem`; the CA key `ca-key.pem` stays beside them so `issue` can sign more.
A node's own certificate (`nodes/NAME/`) names the node in its subject CN and as a
DNS name, which is how peers and API clients check who they talk to (mutual TLS).
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from dataclasses import dataclass
from enum import StrEnum

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

CA_CERT = "ca-cert.pem"
CA_KEY = "ca-key.pem"
NODE_PREFIX = "twinvol-node:"  # subject CN of a node certificate: twinvol-node:NAME


class Role(StrEnum):
    SERVER = "server"
    CLIENT = "client"
    NODE = "node"  # both: serves NBD/API/peer links and dials peers


class CertError(Exception):
    """The CA or a certificate cannot be made or read."""


@dataclass(frozen=True, slots=True)
class Issued:
    cert: str
    key: str


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def _write(path: str, data: bytes, private: bool) -> None:
    tmp = path + ".tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600 if private else 0o644)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def init_ca(directory: str, name: str = "twinvol", *, days: int = 3650,
            force: bool = False) -> str:
    """Create the CA in `directory`; refuses to replace an existing one unless `force`
    (every certificate it signed would stop being trusted)."""
    os.makedirs(directory, exist_ok=True)
    cert_path = os.path.join(directory, CA_CERT)
    if os.path.exists(cert_path) and not force:
        raise CertError(f"{cert_path} exists: a new CA would invalidate every certificate it "
                        "signed (pass --force to replace it)")
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"{name} CA")])
    now = _now()
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True,
                                         crl_sign=True, content_commitment=False,
                                         key_encipherment=False, data_encipherment=False,
                                         key_agreement=False, encipher_only=False,
                                         decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                           critical=False)
            .sign(key, hashes.SHA256()))
    _write(os.path.join(directory, CA_KEY), _key_pem(key), private=True)
    _write(cert_path, cert.public_bytes(serialization.Encoding.PEM), private=False)
    return cert_path


def _load_ca(directory: str) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    try:
        with open(os.path.join(directory, CA_CERT), "rb") as f:
            cert = x509.load_pem_x509_certificate(f.read())
        with open(os.path.join(directory, CA_KEY), "rb") as f:
            key = serialization.load_pem_private_key(f.read(), None)
    except FileNotFoundError as e:
        raise CertError(f"no CA in {directory} ({e.filename} missing): run "
                        "`twinvol certs init` first") from None
    except (OSError, ValueError) as e:
        raise CertError(f"cannot read the CA in {directory}: {e}") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise CertError(f"{CA_KEY} in {directory} is not an EC key made by twinvol")
    return cert, key


def _sans(hosts: list[str]) -> list[x509.GeneralName]:
    out: list[x509.GeneralName] = []
    for h in dict.fromkeys(hosts):
        try:
            out.append(x509.IPAddress(ipaddress.ip_address(h)))
        except ValueError:
            out.append(x509.DNSName(h))
    return out


def issue(directory: str, role: Role, *, name: str = "", hosts: list[str] | None = None,
          days: int = 825, valid_from: datetime.datetime | None = None,
          out_dir: str | None = None) -> Issued:
    """Sign a certificate for `role` with the CA in `directory`.

    server: `server-cert.pem`/`server-key.pem` naming `hosts` (default localhost and
    127.0.0.1, ::1); client: `client-cert.pem`/`client-key.pem` with CN `name`; node:
    both usages in `nodes/NAME/`, CN `twinvol-node:NAME`, DNS name NAME plus `hosts`.
    `valid_from`/`days` exist so tests can make expired certificates."""
    ca_cert, ca_key = _load_ca(directory)
    hosts = list(hosts) if hosts else ["localhost", "127.0.0.1", "::1"]
    if role is Role.NODE:
        if not name:
            raise CertError("a node certificate needs the node's name")
        cn = NODE_PREFIX + name
        hosts = [name, *hosts]
        usages = [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
        target = out_dir or os.path.join(directory, "nodes", name)
        stem = "server"
    elif role is Role.SERVER:
        cn = name or hosts[0]
        usages = [ExtendedKeyUsageOID.SERVER_AUTH]
        target = out_dir or directory
        stem = "server"
    else:
        cn = name or "twinvol-client"
        usages = [ExtendedKeyUsageOID.CLIENT_AUTH]
        target = out_dir or directory
        stem = "client"
    key = ec.generate_private_key(ec.SECP256R1())
    start = valid_from or (_now() - datetime.timedelta(minutes=5))
    builder = (x509.CertificateBuilder()
               .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
               .issuer_name(ca_cert.subject).public_key(key.public_key())
               .serial_number(x509.random_serial_number())
               .not_valid_before(start).not_valid_after(start + datetime.timedelta(days=days))
               .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
               .add_extension(x509.KeyUsage(digital_signature=True, key_encipherment=False,
                                            key_cert_sign=False, crl_sign=False,
                                            content_commitment=False, data_encipherment=False,
                                            key_agreement=True, encipher_only=False,
                                            decipher_only=False), critical=True)
               .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
               .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                   ca_key.public_key()), critical=False))
    if role is not Role.CLIENT:
        builder = builder.add_extension(x509.SubjectAlternativeName(_sans(hosts)),
                                        critical=False)
    cert = builder.sign(ca_key, hashes.SHA256())
    os.makedirs(target, exist_ok=True)
    cert_path = os.path.join(target, f"{stem}-cert.pem")
    key_path = os.path.join(target, f"{stem}-key.pem")
    _write(key_path, _key_pem(key), private=True)
    _write(cert_path, cert.public_bytes(serialization.Encoding.PEM), private=False)
    if role is Role.NODE:  # the node dials peers with the same identity
        _write(os.path.join(target, "client-cert.pem"),
               cert.public_bytes(serialization.Encoding.PEM), private=False)
        _write(os.path.join(target, "client-key.pem"), _key_pem(key), private=True)
        _write(os.path.join(target, CA_CERT),
               ca_cert.public_bytes(serialization.Encoding.PEM), private=False)
    return Issued(cert_path, key_path)


def setup_dir(directory: str, nodes: dict[str, list[str]], *, name: str = "twinvol") -> None:
    """Everything a cluster needs, made once: CA, a server and a client certificate for
    NBD clients, and one certificate per node (`nodes` maps node name to its hosts)."""
    if not os.path.exists(os.path.join(directory, CA_CERT)):
        init_ca(directory, name)
    hosts = sorted({h for hs in nodes.values() for h in hs} | {"localhost", "127.0.0.1"})
    issue(directory, Role.SERVER, hosts=hosts)
    issue(directory, Role.CLIENT)
    for node, node_hosts in nodes.items():
        issue(directory, Role.NODE, name=node, hosts=node_hosts or ["127.0.0.1"])
