"""Envoy's identity and the mesh CA, delivered by SDS from files: when the
certificates are rotated in place, Envoy picks them up without a restart."""

from __future__ import annotations

import json
from pathlib import Path

from envoy_data_plane.envoy.config.core.v3 import (
    ConfigSource,
    DataSource,
    PathConfigSource,
    WatchedDirectory,
)
from envoy_data_plane.envoy.extensions.transport_sockets.tls.v3 import (
    CertificateValidationContext,
    CommonTlsContext,
    CommonTlsContextCombinedCertificateValidationContext,
    SdsSecretConfig,
    Secret,
    SubjectAltNameMatcher,
    SubjectAltNameMatcherSanType,
    TlsCertificate,
)
from envoy_data_plane.envoy.type.matcher.v3 import StringMatcher
from envoy_data_plane.google.protobuf import Any

from mesh.plan import ENVOY_IDENTITY, Plan


def data_source(path: Path) -> DataSource:
    return DataSource(filename=str(path.resolve()))


# Envoy's certificate and the mesh CA come from SDS secrets in files: when the
# certificates are rotated in place, Envoy picks them up without a restart.
IDENTITY_SECRET = "envoy_identity"
CA_SECRET = "mesh_ca"


def _sds(plan: Plan, secret: str) -> SdsSecretConfig:
    directory = plan.certs[ENVOY_IDENTITY].cert.parent.resolve()
    source = PathConfigSource(path=str(sds_file(plan, secret)), watched_directory=WatchedDirectory(path=str(directory)))
    return SdsSecretConfig(name=secret, sds_config=ConfigSource(path_config_source=source))


def sds_file(plan: Plan, secret: str) -> Path:
    return plan.certs[ENVOY_IDENTITY].cert.parent.resolve() / f"sds-{secret}.json"


def sds_secrets(plan: Plan) -> dict[str, Secret]:
    certs = plan.certs[ENVOY_IDENTITY]
    directory = WatchedDirectory(path=str(certs.cert.parent.resolve()))
    return {
        IDENTITY_SECRET: Secret(
            name=IDENTITY_SECRET,
            tls_certificate=TlsCertificate(
                certificate_chain=data_source(certs.cert),
                private_key=data_source(certs.key),
                watched_directory=directory,
            ),
        ),
        CA_SECRET: Secret(
            name=CA_SECRET,
            validation_context=CertificateValidationContext(
                trusted_ca=data_source(certs.ca), watched_directory=directory
            ),
        ),
    }


def tls_context(plan: Plan, peer_ids: list[str], alpn: tuple[str, ...] = ("h2",)) -> CommonTlsContext:
    sans = [
        SubjectAltNameMatcher(san_type=SubjectAltNameMatcherSanType.URI, matcher=StringMatcher(exact=peer))
        for peer in peer_ids
    ]
    return CommonTlsContext(
        # gRPC servers refuse TLS without ALPN h2.
        alpn_protocols=list(alpn),
        tls_certificate_sds_secret_configs=[_sds(plan, IDENTITY_SECRET)],
        combined_validation_context=CommonTlsContextCombinedCertificateValidationContext(
            default_validation_context=CertificateValidationContext(match_typed_subject_alt_names=sans),
            validation_context_sds_secret_config=_sds(plan, CA_SECRET),
        ),
    )


def write_sds_files(plan: Plan) -> None:
    """The SDS files the bootstraps point at (one per secret, next to the certificates)."""
    if plan.service_dns:
        return
    for name, secret in sds_secrets(plan).items():
        sds_file(plan, name).write_text(json.dumps({"resources": [Any.pack(secret).to_dict()]}, indent=1))
