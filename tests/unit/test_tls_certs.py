"""Certificates made by twinvol.tls.certs (names, usages, validity, file modes), how a
peer certificate names its node, and the one-line reasons of refused handshakes."""

from __future__ import annotations

import datetime
import os
import pathlib
import ssl

import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from twinvol.nbd.guard import describe_tls_error
from twinvol.tls.certs import CertError, Role, init_ca, issue
from twinvol.tls.context import cert_node, client_context, server_context


def load(path: str) -> x509.Certificate:
    with open(path, "rb") as f:
        return x509.load_pem_x509_certificate(f.read())


def test_node_certificate_names_the_node(tmp_path: pathlib.Path) -> None:
    d = str(tmp_path / "tls")
    init_ca(d)
    out = issue(d, Role.NODE, name="B", hosts=["10.0.0.2"])
    assert out.cert == os.path.join(d, "nodes", "B", "server-cert.pem")
    cert = load(out.cert)
    cn = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value
    assert cn == "twinvol-node:B"
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["B"]
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["10.0.0.2"]
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert set(eku) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
    assert cert.verify_directly_issued_by(load(os.path.join(d, "ca-cert.pem"))) is None
    for f in ("server-key.pem", "client-key.pem"):
        assert os.stat(os.path.join(d, "nodes", "B", f)).st_mode & 0o777 == 0o600
    # Both contexts load what was made.
    server_context(d, node="B", verify_clients=True)
    client_context(d, node="B")


def test_expired_on_request_and_no_ca(tmp_path: pathlib.Path) -> None:
    d = str(tmp_path / "tls")
    with pytest.raises(CertError, match="run `twinvol certs init` first"):
        issue(d, Role.CLIENT)
    init_ca(d)
    start = datetime.datetime.now(datetime.UTC) - datetime.timedelta(days=10)
    cert = load(issue(d, Role.CLIENT, days=1, valid_from=start).cert)
    assert cert.not_valid_after_utc < datetime.datetime.now(datetime.UTC)
    with pytest.raises(CertError, match="exists: a new CA"):
        init_ca(d)


def test_cert_node() -> None:
    assert cert_node({"subject": ((("commonName", "twinvol-node:A"),),)}) == "A"
    assert cert_node({"subject": ((("commonName", "twinvol-client"),),)}) is None
    assert cert_node(None) is None


def test_handshake_reasons() -> None:
    e = ssl.SSLCertVerificationError(1, "certificate verify failed")
    e.verify_message = "certificate has expired"
    assert describe_tls_error(e) == "the client's certificate was refused: certificate " \
                                    "has expired"
    assert describe_tls_error(e, "the peer").startswith("the peer's certificate")
    alert = ssl.SSLError(1, "alert")
    alert.reason = "TLSV1_ALERT_UNKNOWN_CA"
    assert describe_tls_error(alert) == ("the client does not trust the CA of this server's "
                                         "certificate (TLSV1_ALERT_UNKNOWN_CA)")
    assert describe_tls_error(ConnectionResetError()).startswith(
        "the client hung up during the TLS handshake")
    assert describe_tls_error(TimeoutError()) == "the TLS handshake did not finish in time"
