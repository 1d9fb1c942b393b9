"""SMART Backend Services (SMART App Launch 2.x): the access tokens the plugin writes to the EHR with.

The EHR registers the plugin as a confidential client with an asymmetric key
(its public JWKS); no secret is shared. To get a token the plugin:
1. reads the token endpoint from `{FHIR base}/.well-known/smart-configuration`;
2. signs a client assertion (RS384 or ES384, `kid` in the header) with
   iss = sub = client id, aud = the token endpoint, exp within 5 minutes,
   a fresh jti;
3. POSTs grant_type=client_credentials with its `system/` scopes and the
   assertion (client_assertion_type jwt-bearer).
The token is reused until shortly before it expires; concurrent callers wait
for one refresh (single flight). A 401 from the FHIR server invalidates it
(`FhirClient` then asks once more), so a token revoked early costs one retry.

`python -m plugin.fhir.smart_auth KEY.pem [KEY2.pem …]` prints the public JWKS to
register (two keys while rotating).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from plugin.fhir.client import FhirError, RetryPolicy, TokenSource, bearer, with_retries
from plugin.observability import LOG
from plugin.settings import DEFAULT_SMART_SCOPES, ServiceSettings

ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
ASSERTION_LIFETIME = 240  # seconds; SMART allows at most 300
TOKEN_RETRY = RetryPolicy(attempts=3)  # the token endpoint, on 429, 5xx and connection failures
# The default scopes (settings.DEFAULT_SMART_SCOPES) are what the plugin reads and writes (SMART v2: c create,
# r read, u update, d delete, s search): publish makes conditional updates of Questionnaire, CodeSystem,
# StructureDefinition, OperationDefinition and Device (search, then create or update); submit and the service
# read results by identifier, the response and its Patient in one batch, then write one transaction of
# conditional creates and updates (Observation,
# Task, QuestionnaireResponse, Device; Provenance is created, if no copy is found); sync searches responses;
# $populate searches a patient's Observations and responses and reads the Patient; subscribe searches, creates
# and updates its Subscriptions.

PrivateKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey


@dataclass(frozen=True, slots=True)
class SigningKey:
    key: PrivateKey
    algorithm: str  # RS384 or ES384, the two every SMART server supports
    kid: str


def load_signing_key(path: str | Path, kid: str | None = None) -> SigningKey:
    """A private key from a PEM (PKCS#8 or traditional) or a private JWK file; `kid` defaults to the
    JWK's own, else the key's RFC 7638 thumbprint (what `python -m plugin.fhir.smart_auth` publishes)."""
    raw = Path(path).read_bytes()
    if raw.lstrip().startswith(b"{"):
        jwk = json.loads(raw)
        jwk = next((k for k in jwk.get("keys", [jwk]) if "d" in k), jwk)  # a JWKS: its first private key
        key: Any = jwt.PyJWK(jwk).key
        kid = kid or jwk.get("kid")
    else:
        key = serialization.load_pem_private_key(raw, password=None)
    if isinstance(key, rsa.RSAPrivateKey):
        algorithm = "RS384"
    elif isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name == "secp384r1":
        algorithm = "ES384"
    else:
        raise ValueError(f"{path}: SMART asks for an RSA key (RS384) or an EC P-384 key (ES384).")
    return SigningKey(key, algorithm, kid or thumbprint(public_jwk(key)))


def public_jwk(key: PrivateKey) -> dict:
    if isinstance(key, rsa.RSAPrivateKey):
        return jwt.algorithms.RSAAlgorithm.to_jwk(key.public_key(), as_dict=True)
    return jwt.algorithms.ECAlgorithm.to_jwk(key.public_key(), as_dict=True)


def thumbprint(jwk: dict) -> str:
    """RFC 7638: SHA-256 of the key's required members, sorted, without whitespace."""
    members = ("e", "kty", "n") if jwk["kty"] == "RSA" else ("crv", "kty", "x", "y")
    canonical = json.dumps({m: jwk[m] for m in members}, separators=(",", ":"), sort_keys=True)
    return base64.urlsafe_b64encode(hashlib.sha256(canonical.encode()).digest()).rstrip(b"=").decode()


def public_jwks(keys: list[SigningKey]) -> dict:
    return {"keys": [{**public_jwk(k.key), "kid": k.kid, "alg": k.algorithm, "use": "sig", "key_ops": ["verify"]}
                     for k in keys]}


class BackendServicesToken:
    """A `TokenSource` (see fhir_client) for SMART Backend Services, with a cache and single-flight refresh."""

    def __init__(self, fhir_base_url: str, client_id: str, key: SigningKey, scopes: str = DEFAULT_SMART_SCOPES, *,
                 timeout: float = 30.0, retry: RetryPolicy = TOKEN_RETRY,
                 transport: httpx.AsyncBaseTransport | None = None) -> None:
        self.fhir_base_url = fhir_base_url.rstrip("/")
        self.client_id = client_id
        self.key = key
        self.scopes = scopes
        self.timeout = timeout
        self.retry = retry
        self.transport = transport
        self.token_endpoint: str | None = None
        self.token: str | None = None
        self.renew_at = 0.0  # monotonic time after which the token is renewed
        self.lock = asyncio.Lock()

    async def __call__(self) -> str:
        if self.token and time.monotonic() < self.renew_at:
            return self.token
        async with self.lock:  # one refresh; whoever waited gets its token
            if not self.token or time.monotonic() >= self.renew_at:
                await self._refresh()
            assert self.token
            return self.token

    def invalidate(self, token: str) -> None:
        """The FHIR server refused `token` (401): forget it, unless a newer one has replaced it already."""
        if token == self.token:
            self.token = None

    def assertion(self, token_endpoint: str) -> str:
        now = int(time.time())
        claims = {"iss": self.client_id, "sub": self.client_id, "aud": token_endpoint, "iat": now,
                  "exp": now + ASSERTION_LIFETIME, "jti": str(uuid.uuid4())}
        return jwt.encode(claims, self.key.key, algorithm=self.key.algorithm,
                          headers={"kid": self.key.kid, "typ": "JWT"})

    async def _refresh(self) -> None:
        async with httpx.AsyncClient(timeout=self.timeout, transport=self.transport,
                                     headers={"Accept": "application/json"}) as http:
            endpoint = self.token_endpoint or await self._discover(http)
            self.token_endpoint = endpoint
            form = {"grant_type": "client_credentials", "scope": self.scopes,
                    "client_assertion_type": ASSERTION_TYPE}
            # a fresh assertion (and jti) per attempt: the server refuses a replayed one
            answer = await self._send(http, "POST", endpoint, lambda: {**form,
                                                                      "client_assertion": self.assertion(endpoint)})
        body = _json(answer)
        if answer.status_code != 200 or not isinstance(body.get("access_token"), str):
            # No status on the FhirError: the FHIR server was never asked. With the token endpoint's (400
            # invalid_client) serve would answer 422 "the store refused the write" and the caller would drop a
            # response it should send again once the credentials are fixed; without one it answers 503.
            _log_refusal("token-refused", answer.status_code, body)
            raise FhirError(f"The authorization server refused the plugin's token request (HTTP "
                            f"{answer.status_code}{_oauth_error(body)}). Check BACKPAIN_SMART_CLIENT_ID, the key "
                            f"and its kid against what the EHR registered.")
        lifetime = _lifetime(body.get("expires_in"))
        self.token = body["access_token"]
        self.renew_at = time.monotonic() + lifetime - min(30.0, lifetime / 10)  # renew shortly before expiry

    async def _discover(self, http: httpx.AsyncClient) -> str:
        url = f"{self.fhir_base_url}/.well-known/smart-configuration"
        answer = await self._send(http, "GET", url, None)
        config = _json(answer)
        endpoint = config.get("token_endpoint")
        if answer.status_code != 200 or not isinstance(endpoint, str):
            _log_refusal("discovery-failed", answer.status_code, {})
            raise FhirError(f"SMART discovery failed: {url} answered HTTP {answer.status_code} without a "
                            f"token_endpoint.")
        methods = config.get("token_endpoint_auth_methods_supported")
        if methods and "private_key_jwt" not in methods:
            raise FhirError(f"The EHR's authorization server does not take private_key_jwt ({url}).")
        return endpoint

    async def _send(self, http: httpx.AsyncClient, method: str, url: str, form: Any) -> httpx.Response:
        """One request, retried like the FHIR client's; `form()` is called per try (a fresh assertion each)."""
        return await with_retries(self.retry, lambda: http.request(method, url, data=form() if form else None),
                                  f"The authorization server at {url}")


def token_source(settings: ServiceSettings, timeout: float = 30.0) -> TokenSource | None:
    """SMART Backend Services when a client id is configured, else the fixed bearer token, if any."""
    if settings.smart_client_id and settings.fhir_base_url:
        if not settings.smart_private_key:
            raise FhirError("BACKPAIN_SMART_CLIENT_ID is set but BACKPAIN_SMART_PRIVATE_KEY (the key file) is not.")
        try:
            key = load_signing_key(settings.smart_private_key, settings.smart_key_id)
        except (OSError, ValueError, TypeError, jwt.PyJWKError) as error:  # a clear word, not a traceback
            raise FhirError(f"The SMART private key in BACKPAIN_SMART_PRIVATE_KEY cannot be used: "
                            f"{type(error).__name__}: {error}") from None
        return BackendServicesToken(settings.fhir_base_url, settings.smart_client_id, key, settings.smart_scopes,
                                    timeout=timeout)
    return bearer(settings.fhir_bearer_token) if settings.fhir_bearer_token else None


def _json(answer: httpx.Response) -> dict:
    try:
        body = answer.json()
    except ValueError:
        return {}
    return body if isinstance(body, dict) else {}


def _lifetime(expires_in: object) -> float:
    """Seconds the token lasts: `expires_in` (some servers send it as a string), else 300 as SMART suggests."""
    try:
        seconds = float(expires_in)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return 300.0
    return seconds if 0 < seconds < float("inf") else 300.0


def _log_refusal(reason: str, status: int, body: dict) -> None:
    """The operator's clue (the HTTP status and the OAuth error code, never the assertion or a token)."""
    error = body.get("error")
    if isinstance(error, str) and error.isascii():
        reason += f" {error[:40]}"
    LOG.warning("SMART token request failed", extra={"event": "smart-auth", "reason": reason, "status": status})


def _oauth_error(body: dict) -> str:
    error = body.get("error")
    if not isinstance(error, str):
        return ""
    description = body.get("error_description")
    return f" {error}" + (f": {description}" if isinstance(description, str) else "")


def main(paths: list[str]) -> int:
    if not paths:
        print("usage: python -m plugin.fhir.smart_auth PRIVATE_KEY [PRIVATE_KEY …]  (prints the public JWKS)",
              file=sys.stderr)
        return 2
    print(json.dumps(public_jwks([load_signing_key(p) for p in paths]), indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
