"""JWT verification against a configured JWKS, and the classic attacks."""

from __future__ import annotations

import base64
import json
import time
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from mariana_common.errors import Unauthenticated
from mariana_common.sql import Database
from services.auth.authorizer import Authorizer
from services.auth.jwt_tokens import IssuerConfig, JwtVerifier
from services.auth.store import KeyStore

ISSUER, AUDIENCE = "https://login.acme.example", "mariana"
KEYS = {
    "rsa": (rsa.generate_private_key(public_exponent=65537, key_size=2048), "RS256"),
    "ec": (ec.generate_private_key(ec.SECP256R1()), "ES256"),
    "ed": (ed25519.Ed25519PrivateKey.generate(), "EdDSA"),
}


def public_jwk(kid: str) -> dict[str, Any]:
    private, algorithm = KEYS[kid]
    jwk = json.loads(jwt.algorithms.get_default_algorithms()[algorithm].to_jwk(private.public_key()))  # type: ignore[attr-defined]
    return {**jwk, "kid": kid}


@pytest.fixture
def verifier(tmp_path: Path) -> JwtVerifier:
    jwks = tmp_path / "jwks.json"
    jwks.write_text(json.dumps({"keys": [public_jwk(k) for k in KEYS]}))
    return JwtVerifier([IssuerConfig(issuer=ISSUER, audience=AUDIENCE, tenant_id="t_acme", jwks_file=jwks)])


def claims(**overrides: Any) -> dict[str, Any]:
    now = int(time.time())
    return {"iss": ISSUER, "aud": AUDIENCE, "sub": "user-42", "iat": now, "exp": now + 300, **overrides}


def sign(key: str, payload: dict[str, Any] | None = None, kid: str | None = None) -> str:
    """Signed with KEYS[key]; the header names `kid` (default: the same key)."""
    private, algorithm = KEYS[key]
    return jwt.encode(payload or claims(), private, algorithm=algorithm, headers={"kid": kid or key})


@pytest.mark.parametrize("kid", list(KEYS))
def test_each_algorithm_verifies(verifier: JwtVerifier, kid: str) -> None:
    assert verifier.verify(sign(kid)).subject == "user-42"


def b64(data: dict[str, Any] | bytes) -> str:
    raw = data if isinstance(data, bytes) else json.dumps(data).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def hs256_with_public_key_as_secret() -> str:
    """Key confusion: an HMAC signed with the RSA public key's PEM."""
    import hashlib
    import hmac

    pem = (
        KEYS["rsa"][0]
        .public_key()
        .public_bytes(  # type: ignore[union-attr]
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    signing_input = f"{b64({'alg': 'HS256', 'typ': 'JWT', 'kid': 'rsa'})}.{b64(claims())}"
    return f"{signing_input}.{b64(hmac.new(pem, signing_input.encode(), hashlib.sha256).digest())}"


ATTACKS = {
    "alg none": lambda: f"{b64({'alg': 'none', 'kid': 'rsa'})}.{b64(claims())}.",
    "HS256 with the public key": hs256_with_public_key_as_secret,
    "expired": lambda: sign("ec", claims(exp=int(time.time()) - 120)),
    "not yet valid": lambda: sign("ec", claims(nbf=int(time.time()) + 600)),
    "wrong audience": lambda: sign("ec", claims(aud="someone-else")),
    "wrong issuer": lambda: sign("ec", claims(iss="https://evil.example")),
    "no expiry": lambda: sign("ec", {k: v for k, v in claims().items() if k != "exp"}),
    "unknown kid": lambda: sign("ec", kid="nope"),
    "RS key claims ES256": lambda: sign("ec", kid="rsa"),
    "tampered payload": lambda: (lambda t: t.split(".")[0] + "." + b64(claims(sub="admin")) + "." + t.split(".")[2])(
        sign("rsa")
    ),
    "signed by another key": lambda: jwt.encode(
        claims(), ec.generate_private_key(ec.SECP256R1()), algorithm="ES256", headers={"kid": "ec"}
    ),
    "garbage": lambda: "eyJhbGciOi.eyJzdWIiOi.xyz",
}


@pytest.mark.parametrize("attack", list(ATTACKS))
def test_attacks_are_refused(verifier: JwtVerifier, attack: str) -> None:
    with pytest.raises(Unauthenticated, match="invalid token"):
        verifier.verify(ATTACKS[attack]())


async def test_jwt_user_acts_for_the_issuers_tenant(verifier: JwtVerifier, tmp_path: Path) -> None:
    store = KeyStore(Database(f"sqlite:///{tmp_path / 'k.db'}"), b"p" * 32)
    tenant = store.create_tenant("acme", rpm=30)
    config = IssuerConfig(issuer=ISSUER, audience=AUDIENCE, tenant_id=tenant.id, jwks_file=tmp_path / "jwks.json")
    authorizer = Authorizer(store, None, jwt=JwtVerifier([config]))
    identity = (await authorizer.authorize(f"Bearer {sign('ed')}", "/v1/chat/completions")).identity
    assert (identity.tenant_id, identity.key_id, identity.admin, identity.tenant_rpm) == (
        tenant.id,
        "jwt:user-42",
        False,
        30,
    )
    with pytest.raises(Exception, match="admin"):
        await authorizer.authorize(f"Bearer {sign('ed')}", "/admin/v1/keys")
