"""JWTs as a second credential, for users of a tenant's own app: each trusted
issuer is configured with its JWKS, its audience and the tenant it acts for.
Only asymmetric algorithms are accepted (RS256, ES256, EdDSA), and a key is
only ever used with the algorithm its type implies, so `alg: none` and HS/RS
key confusion cannot pass. Expiry is required; `nbf`, `aud` and `iss` are
checked."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt
from pydantic import BaseModel, ConfigDict, Field

from mariana_common.errors import Unauthenticated

ALGORITHM_FOR_KEY = {("RSA", None): "RS256", ("EC", "P-256"): "ES256", ("OKP", "Ed25519"): "EdDSA"}
INVALID_TOKEN = "invalid token"


class IssuerConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    issuer: str
    audience: str
    tenant_id: str = Field(..., description="The tenant whose quota and policy the app's users use.")
    jwks_file: Path = Field(..., description="A JSON Web Key Set with the issuer's public keys.")
    leeway_s: float = Field(30, ge=0, le=300)


@dataclass(frozen=True)
class Claims:
    issuer: IssuerConfig
    subject: str
    expires_at: float


def looks_like_jwt(token: str) -> bool:
    return token.count(".") == 2 and token.startswith("eyJ")


class JwtVerifier:
    def __init__(self, issuers: list[IssuerConfig]) -> None:
        self._issuers = {i.issuer: i for i in issuers}
        # issuer -> kid -> (algorithm, key)
        self._keys: dict[str, dict[str, tuple[str, Any]]] = {}
        for issuer in issuers:
            jwks = json.loads(issuer.jwks_file.read_text())
            keys = {}
            for jwk in jwks.get("keys", []):
                algorithm = ALGORITHM_FOR_KEY.get((jwk.get("kty"), jwk.get("crv")))
                if algorithm is None or "kid" not in jwk:
                    raise ValueError(f"{issuer.jwks_file}: keys need a kid and RSA, EC P-256 or Ed25519 material")
                keys[jwk["kid"]] = (algorithm, jwt.PyJWK(jwk, algorithm).key)
            self._keys[issuer.issuer] = keys

    def verify(self, token: str) -> Claims:
        try:
            header = jwt.get_unverified_header(token)
            unverified = jwt.decode(token, options={"verify_signature": False})
        except jwt.PyJWTError as error:
            raise Unauthenticated(INVALID_TOKEN) from error
        issuer = self._issuers.get(str(unverified.get("iss")))
        found = self._keys.get(issuer.issuer, {}).get(str(header.get("kid"))) if issuer else None
        if issuer is None or found is None:
            raise Unauthenticated(INVALID_TOKEN)
        algorithm, key = found
        if header.get("alg") != algorithm:  # none, HS256 with a public key as secret, ...
            raise Unauthenticated(INVALID_TOKEN)
        try:
            claims = jwt.decode(
                token,
                key,
                algorithms=[algorithm],
                audience=issuer.audience,
                issuer=issuer.issuer,
                leeway=issuer.leeway_s,
                options={"require": ["exp", "sub", "iss", "aud"]},
            )
        except jwt.PyJWTError as error:
            raise Unauthenticated(INVALID_TOKEN) from error
        return Claims(issuer, str(claims["sub"]), float(claims["exp"]))
