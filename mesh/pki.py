"""A development CA and one certificate per workload identity, minted at
start-up and never committed. Each certificate carries the SPIFFE-style URI
`spiffe://<trust domain>/<identity>` plus localhost names, so it serves both
as a server certificate on loopback and as a client certificate.

`rotate_workloads` re-issues every workload certificate from the same CA in
place (each file replaced atomically); Envoy (SDS from files) and the
services (mariana_common.tls) pick the new ones up without a restart."""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

VALIDITY = dt.timedelta(days=7)
# Workload certificates live a day: rotation is routine, not an event.
WORKLOAD_VALIDITY = dt.timedelta(days=1)


@dataclass(frozen=True)
class CertFiles:
    cert: Path
    key: Path
    ca: Path


def _replace(path: Path, data: bytes, mode: int = 0o644) -> None:
    """Readers see the old file or the new one, never half of one."""
    partial = path.with_name(f".{path.name}.new")
    partial.write_bytes(data)
    partial.chmod(mode)
    os.replace(partial, path)


def _write_key(key: ec.EllipticCurvePrivateKey, path: Path) -> None:
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    _replace(path, pem, 0o600)


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Mariana dev mesh"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def mint_ca(
    directory: Path, common_name: str = "Mariana dev CA"
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    directory.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(_name(common_name))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + VALIDITY)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_cert_sign=True,
                crl_sign=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .sign(key, hashes.SHA256())
    )
    _replace(directory / "ca.pem", cert.public_bytes(serialization.Encoding.PEM))
    _write_key(key, directory / "ca.key")
    return key, cert


def mint_workload(
    directory: Path, identity: str, spiffe_id: str, ca_key: ec.EllipticCurvePrivateKey, ca_cert: x509.Certificate
) -> CertFiles:
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    sans: list[x509.GeneralName] = [
        x509.UniformResourceIdentifier(spiffe_id),
        x509.DNSName("localhost"),
        x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
    ]
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(identity))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + WORKLOAD_VALIDITY)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    files = CertFiles(directory / f"{identity}.pem", directory / f"{identity}.key", directory / "ca.pem")
    _write_key(key, files.key)
    _replace(files.cert, cert.public_bytes(serialization.Encoding.PEM))
    return files


def mint_mesh(directory: Path, trust_domain: str, identities: list[str]) -> dict[str, CertFiles]:
    """A fresh CA and a certificate for each identity."""
    ca_key, ca_cert = mint_ca(directory)
    return {
        name: mint_workload(directory, name, f"spiffe://{trust_domain}/{name}", ca_key, ca_cert) for name in identities
    }


def rotate_workloads(directory: Path, trust_domain: str, identities: list[str]) -> dict[str, CertFiles]:
    """New keys and certificates for `identities`, from the CA already in `directory`."""
    ca_key = serialization.load_pem_private_key((directory / "ca.key").read_bytes(), password=None)
    ca_cert = x509.load_pem_x509_certificate((directory / "ca.pem").read_bytes())
    if not isinstance(ca_key, ec.EllipticCurvePrivateKey):
        raise ValueError("the mesh CA key is not an EC key")
    return {
        name: mint_workload(directory, name, f"spiffe://{trust_domain}/{name}", ca_key, ca_cert) for name in identities
    }
