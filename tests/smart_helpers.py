"""A real OAuth 2.0 authorization server (tests/oauth_server/, npm `oidc-provider`) for the SMART tests, and keys.

`authorization_server(...)` installs it on first use (`npm ci --ignore-scripts`), starts it on 127.0.0.1 with
the given clients (each with its public JWKS, the scopes it may be granted and, if given, its own token
lifetime `ttl`) and stops it afterwards.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from plugin.fhir.smart_auth import SigningKey, load_signing_key, public_jwks
from tests.fhir_helpers import OAUTH_DIR, node_server


@dataclass(frozen=True)
class AuthServer:
    issuer: str

    def stats(self) -> dict:
        return httpx.get(f"{self.issuer}/__admin/stats").json()

    def tokens(self, client_id: str) -> int:
        return self.stats()["tokens"].get(client_id, 0)


@contextmanager
def authorization_server(audience: str, clients: list[dict], ttl: int = 300, port: int = 0) -> Iterator[AuthServer]:
    """`port`: the one the SMART HAPI (conftest's `smart_hapi`) names as its issuer; 0 for any."""
    env = {"AUDIENCE": audience, "TOKEN_TTL": str(ttl), "CONFIG": json.dumps({"clients": clients}),
           "PORT": str(port)}
    with node_server(OAUTH_DIR, env, "/.well-known/openid-configuration", "authorization server",
                     quiet=True) as issuer:
        yield AuthServer(issuer)


def backend_client(client_id: str, keys: list[SigningKey], scope: str, ttl: int | None = None) -> dict:
    """oidc-provider metadata of a SMART Backend Services client (private_key_jwt, client_credentials)."""
    client = {"client_id": client_id, "token_endpoint_auth_method": "private_key_jwt",
              "grant_types": ["client_credentials"], "jwks": public_jwks(keys), "scope": scope}
    return {**client, "ttl": ttl} if ttl else client


def rsa_key(directory: Path, name: str) -> Path:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    path = directory / f"{name}.pem"
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))
    return path


def ec_jwk(directory: Path, name: str, kid: str) -> Path:
    """An EC P-384 private key as a JWK file, with its kid."""
    import jwt

    key = ec.generate_private_key(ec.SECP384R1())
    jwk = {**jwt.algorithms.ECAlgorithm.to_jwk(key, as_dict=True), "kid": kid}
    path = directory / f"{name}.jwk.json"
    path.write_text(json.dumps(jwk))
    return path


def signing_key(path: Path) -> SigningKey:
    return load_signing_key(path)
