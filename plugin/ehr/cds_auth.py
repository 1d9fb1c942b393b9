"""Who may call the CDS Hooks service: the signed JWT every CDS Client sends (CDS Hooks 2.0, "Trusting CDS Clients").

Each call carries `Authorization: Bearer <JWT>`, signed with the client's
private key. The JWT is accepted only when all of these hold:

- `alg` is RS384 or ES384 (never `none`, HMAC or anything weaker), with a `kid`;
- `iss` is an issuer the operator allow-listed (BACKPAIN_CDS_ISSUERS), and the
  `jku` header, if any, is one of the JWK Set URLs allow-listed for that issuer
  (without `jku`, the issuer's configured JWK Sets are used);
- the signature verifies with the key of that `kid` in that JWK Set;
- `aud` is the URL of the endpoint called; `exp`, `iat` and `jti` are present,
  `exp` is in the future (and not too far), `iat` not in the future;
- the `jti` was not seen before from that issuer (replay).

Anything else is refused with a bare 401; the log gets a reason code only,
never the token. With no issuer configured every call is refused.

JWK Sets are fetched with httpx and kept for JWKS_TTL seconds; an unknown
`kid` refetches at most once every REFETCH_AFTER seconds (key rotation,
without letting random kids make us hammer the client's server).

Limitation: the `jti` replay cache lives in this process's memory. With
several workers or replicas, a replayed token could be accepted once by each
of them (within its short lifetime); a shared cache (e.g. Redis) would close
that gap. The README says so too.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import httpx
import jwt
from jwt.exceptions import PyJWKError, PyJWTError

from plugin.observability import LOG
from plugin.web.security import loopback, refused

ALGORITHMS = {"RS384": ("RSA", None), "ES384": ("EC", "P-384")}  # alg -> (kty, crv) its key must have
JWKS_TTL = 300.0  # seconds a fetched JWK Set is trusted before it is fetched again
REFETCH_AFTER = 30.0  # an unknown kid refetches the set, but not more often than this
FETCH_TIMEOUT = 5.0
MAX_JWKS_BYTES = 64 * 1024
LEEWAY = 30  # seconds of clock skew allowed on exp and iat
MAX_LIFETIME = 3600  # a token valid for longer than this from now is refused (the replay cache holds each jti)
MAX_TIMESTAMP = 253402300800  # 10000-01-01T00:00:00Z: a time past the calendar is no time
MAX_REPLAY_ENTRIES = 100_000


class Refused(Exception):
    """A call that is not let in; `reason` is a short code for the log, never shown to the caller."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True, slots=True)
class Issuers:
    """The allow-list: issuer -> the JWK Set URLs its tokens may name in `jku` (the first is its default)."""

    jwks: dict[str, tuple[str, ...]]

    @classmethod
    def parse(cls, entries: Iterable[str]) -> Issuers:
        """From `iss|jwks_url` entries; an issuer may be listed more than once (several JWK Sets)."""
        found: dict[str, list[str]] = {}
        for entry in entries:
            issuer, bar, url = entry.strip().rpartition("|")
            if not bar or not issuer or not url.startswith(("https://", "http://")):
                raise ValueError("BACKPAIN_CDS_ISSUERS entries are `issuer|jwks_url`, separated by commas.")
            if url.startswith("http://") and not loopback(urlsplit(url).hostname or ""):
                # whoever sits on the network path could hand us their own keys, and sign any call
                raise ValueError("BACKPAIN_CDS_ISSUERS: a JWK Set URL must be https (plain http only on this machine).")
            found.setdefault(issuer, []).append(url)
        return cls({issuer: tuple(urls) for issuer, urls in found.items()})


@dataclass(slots=True)
class _KeySet:
    keys: dict[str, dict]  # kid -> JWK
    fetched: float


@dataclass(slots=True)
class Verifier:
    """Checks CDS Hooks JWTs; holds the JWK Set cache and the jti replay cache (one per process)."""

    issuers: Issuers
    clock: Callable[[], float] = time.time  # seconds since the epoch; a test may pass another
    sets: dict[str, _KeySet] = field(default_factory=dict)
    seen: dict[tuple[str, str], float] = field(default_factory=dict)  # (iss, jti) -> exp
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    async def verify(self, authorization: str | None, audience: str) -> dict:
        """The JWT's claims, or `Refused`."""
        token = _bearer(authorization)
        header, unverified = _unverified(token)
        alg = header.get("alg")
        if alg not in ALGORITHMS:
            raise Refused("algorithm")
        kid = header.get("kid")
        if not isinstance(kid, str) or not kid:
            raise Refused("kid")
        issuer = unverified.get("iss")
        allowed = self.issuers.jwks.get(issuer) if isinstance(issuer, str) else None
        if not allowed:
            raise Refused("issuer")
        jku = header.get("jku")
        if jku is not None and jku not in allowed:
            raise Refused("jku")
        key = await self._key((jku,) if jku else allowed, kid, alg)
        claims = _decode(token, key, alg, audience, issuer)
        self._check_times(claims)
        self._not_replayed(issuer, claims)
        return claims

    # -- keys ----------------------------------------------------------------------------

    async def _key(self, urls: tuple[str, ...], kid: str, alg: str) -> object:
        for url in urls:
            jwk = await self._jwk(url, kid)
            if jwk is not None:
                return _public_key(jwk, alg)
        raise Refused("unknown-key")

    async def _jwk(self, url: str, kid: str) -> dict | None:
        if self._usable(self.sets.get(url), kid):
            return self.sets[url].keys.get(kid)
        async with self.lock:  # one fetch at a time: a burst of calls waits for the same answer
            cached = self.sets.get(url)
            if not self._usable(cached, kid):
                cached = await self._fetch(url, self.clock(), cached)
        return cached.keys.get(kid) if cached else None

    def _usable(self, cached: _KeySet | None, kid: str) -> bool:
        """The cached set answers for `kid`: it is fresh, and has the kid or was fetched only just now."""
        if cached is None:
            return False
        age = self.clock() - cached.fetched
        return age < JWKS_TTL and (kid in cached.keys or age < REFETCH_AFTER)

    async def _fetch(self, url: str, now: float, stale: _KeySet | None) -> _KeySet:
        try:
            async with httpx.AsyncClient(timeout=FETCH_TIMEOUT, follow_redirects=False) as client:
                answer = await client.get(url, headers={"Accept": "application/json"})
            if answer.status_code != 200 or len(answer.content) > MAX_JWKS_BYTES:
                raise ValueError(f"HTTP {answer.status_code}")
            keys = answer.json().get("keys")
            if not isinstance(keys, list):
                raise ValueError("no keys")
        except (httpx.HTTPError, ValueError, AttributeError):
            if stale is not None:  # keep using what we had rather than lock every client out
                LOG.warning("JWK Set refetch failed; using the cached one", extra={"event": "cds-auth",
                                                                                   "reason": "jwks-refetch"})
                stale.fetched = now - JWKS_TTL + REFETCH_AFTER  # and try again in a while, not on every call
                return stale
            raise Refused("jwks-unavailable") from None
        found = _KeySet({k["kid"]: k for k in keys if isinstance(k, dict) and isinstance(k.get("kid"), str)}, now)
        self.sets[url] = found
        return found

    # -- claims --------------------------------------------------------------------------

    def _check_times(self, claims: dict) -> None:
        now = self.clock()
        if claims["exp"] > now + MAX_LIFETIME + LEEWAY:
            raise Refused("lifetime")
        if claims["iat"] > now + LEEWAY:
            raise Refused("issued-in-future")

    def _not_replayed(self, issuer: str, claims: dict) -> None:
        now = self.clock()
        jti = claims["jti"]
        if not isinstance(jti, str) or not jti:
            raise Refused("jti")
        if len(self.seen) >= MAX_REPLAY_ENTRIES:
            self.seen = {k: exp for k, exp in self.seen.items() if exp + LEEWAY > now}
            if len(self.seen) >= MAX_REPLAY_ENTRIES:  # flooded with live tokens: refuse rather than forget
                raise Refused("replay-cache-full")
        key = (issuer, jti)
        if key in self.seen and self.seen[key] + LEEWAY > now:
            raise Refused("replay")
        self.seen[key] = float(claims["exp"])


def _bearer(authorization: str | None) -> str:
    scheme, _, token = (authorization or "").partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token or token.count(".") != 2:
        raise Refused("no-bearer")
    return token


def _unverified(token: str) -> tuple[dict, dict]:
    """Header and claims read before the signature is checked: only to choose the key, never trusted."""
    try:
        header = jwt.get_unverified_header(token)
        claims = jwt.decode(token, options={"verify_signature": False})
    except PyJWTError:
        raise Refused("malformed") from None
    if not isinstance(header, dict) or not isinstance(claims, dict):
        raise Refused("malformed")
    _claim_types(claims)
    return header, claims


def _claim_types(claims: dict) -> None:
    """Claims of the wrong JSON type (a text `exp`, a numeric `iss`) are a refusal, not a crash further on."""
    for name in ("exp", "iat", "nbf"):
        value = claims.get(name)
        if name in claims and not (isinstance(value, int | float) and not isinstance(value, bool)
                                   and 0 <= value < MAX_TIMESTAMP):
            raise Refused("claims")
    if not all(isinstance(claims.get(name, ""), str) for name in ("iss", "jti", "sub")):
        raise Refused("claims")
    aud = claims.get("aud", "")
    if not (isinstance(aud, str) or (isinstance(aud, list) and all(isinstance(a, str) for a in aud))):
        raise Refused("claims")


def _public_key(jwk: dict, alg: str) -> object:
    kty, crv = ALGORITHMS[alg]
    if jwk.get("kty") != kty or (crv and jwk.get("crv") != crv):
        raise Refused("key-type")
    if jwk.get("use", "sig") != "sig" or jwk.get("alg", alg) != alg or "d" in jwk:
        raise Refused("key-use")  # a published private key is no key to trust
    try:
        return jwt.PyJWK(jwk, algorithm=alg).key
    except (PyJWKError, PyJWTError, ValueError, TypeError):
        raise Refused("key-invalid") from None


def _decode(token: str, key: object, alg: str, audience: str, issuer: str) -> dict:
    try:
        return jwt.decode(token, key, algorithms=[alg], audience=audience, issuer=issuer, leeway=LEEWAY,
                          options={"require": ["iss", "aud", "exp", "iat", "jti"]})
    except jwt.ExpiredSignatureError:
        raise Refused("expired") from None
    except jwt.InvalidAudienceError:
        raise Refused("audience") from None
    except jwt.InvalidSignatureError:
        raise Refused("signature") from None
    except jwt.MissingRequiredClaimError:
        raise Refused("claims") from None
    except (PyJWTError, TypeError, ValueError, OverflowError):  # whatever else a claim's content trips
        raise Refused("invalid") from None


async def check(verifier: Verifier, authorization: str | None, audience: str) -> dict:
    """The claims of a valid JWT; anything else is the plugin's bare 401 (the reason only in the log)."""
    try:
        return await verifier.verify(authorization, audience)
    except Refused as error:
        LOG.warning("CDS Hooks call refused", extra={"event": "cds-auth", "reason": error.reason, "status": 401})
        raise refused(401) from None
