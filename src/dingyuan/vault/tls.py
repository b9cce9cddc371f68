"""The vault's TLS material: a private CA made at init and a server certificate it signs.

Both keys are ECDSA P-256. The CA is self-signed, ``CA:true`` with path length 0 and may sign
certificates and CRLs only; the server certificate names the given hostnames plus ``localhost``
and ``127.0.0.1`` and is for server authentication. Private keys are written mode 0600; every file
is written atomically (temporary file, fsync, rename).
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
from collections.abc import Iterable
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

CA_VALIDITY = timedelta(days=3650)
SERVER_VALIDITY = timedelta(days=825)
DEFAULT_NAMES = ("localhost", "127.0.0.1")


def write_atomic(path: Path, data: bytes, mode: int = 0o644) -> None:
    """Write ``data`` to ``path`` through a temporary file created with ``mode``, then rename."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)  # the umask may have narrowed it; never widen a key beyond mode
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    dfd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def make_ca(common_name: str = "dingyuan vault CA") -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """A self-signed CA certificate (path length 0) and its key."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = datetime.now(UTC)
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + CA_VALIDITY)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(ski, critical=False)
        .sign(key, hashes.SHA256())
    )
    return cert, key


def _san_entry(name: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(name))
    except ValueError:
        return x509.DNSName(name)


def server_names(hostnames: Iterable[str]) -> list[str]:
    """The given hostnames plus localhost and 127.0.0.1, in order, without duplicates."""
    return list(dict.fromkeys([*(h.strip() for h in hostnames if h.strip()), *DEFAULT_NAMES]))


def make_server_cert(
    ca_cert: x509.Certificate, ca_key: ec.EllipticCurvePrivateKey, hostnames: Iterable[str]
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """A server certificate for ``hostnames`` (plus localhost, 127.0.0.1) signed by the CA."""
    names = server_names(hostnames)
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.now(UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + SERVER_VALIDITY)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName([_san_entry(n) for n in names]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    return cert, key


def fingerprint(cert: x509.Certificate) -> str:
    """SHA-256 fingerprint as colon-separated upper-case hex (as ``openssl x509 -fingerprint``)."""
    return cert.fingerprint(hashes.SHA256()).hex(":").upper()


def create_tls(
    ca_cert_path: Path, ca_key_path: Path, cert_path: Path, key_path: Path, hostnames: Iterable[str]
) -> x509.Certificate:
    """Make the CA and the server certificate and write all four files; returns the CA."""
    ca_cert, ca_key = make_ca()
    cert, key = make_server_cert(ca_cert, ca_key, hostnames)
    for path in (ca_cert_path, ca_key_path, cert_path, key_path):
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    write_atomic(ca_key_path, _key_pem(ca_key), 0o600)
    write_atomic(ca_cert_path, ca_cert.public_bytes(serialization.Encoding.PEM))
    write_atomic(key_path, _key_pem(key), 0o600)
    write_atomic(cert_path, cert.public_bytes(serialization.Encoding.PEM))
    return ca_cert


def load_cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())
