"""Signed, short-lived access to one response's results: the SMART launch session and plain results links.

Both are HS256 JWTs under one key (BACKPAIN_SESSION_SECRET, else a random
key of this process) with a `purpose` claim, so a token made for one use
cannot be replayed as the other.
"""

from __future__ import annotations

import hashlib
import secrets
import time

import jwt
from starlette.requests import Request

from plugin.settings import ServiceSettings
from plugin.web.service import service

SESSION_COOKIE = "backpain_session"
LINK_SECONDS = 3600  # a CDS card's plain results link: the EHR fetches cards anew each time the chart opens
_PROCESS_KEY = secrets.token_bytes(32)  # without BACKPAIN_SESSION_SECRET: valid in this process only


def _key(settings: ServiceSettings) -> bytes:
    secret = settings.session_secret
    return hashlib.sha256(b"backpain-launch|" + secret.encode()).digest() if secret else _PROCESS_KEY


def sign(settings: ServiceSettings, claims: dict, seconds: int, purpose: str) -> str:
    return jwt.encode({**claims, "purpose": purpose, "exp": int(time.time()) + seconds}, _key(settings), "HS256")


def read_signed(settings: ServiceSettings, token: str | None, purpose: str) -> dict | None:
    if not token:
        return None
    try:
        claims = jwt.decode(token, _key(settings), algorithms=["HS256"])
    except jwt.PyJWTError:
        return None
    return claims if claims.get("purpose") == purpose else None


def session_allows(request: Request, qr_id: str) -> bool:
    """Whether the request carries a launch session, or a signed results link, for this response."""
    settings = service(request).settings
    for claims in (read_signed(settings, request.cookies.get(SESSION_COOKIE), "session"),
                   read_signed(settings, request.query_params.get("access"), "results-link")):
        if claims and claims.get("questionnaireResponse") == qr_id:
            return True
    return False


def results_access(settings: ServiceSettings, qr_id: str) -> str:
    """The `access` of a plain results link (CDS cards without SMART): a browser cannot send the bearer token.

    It opens that one response for an hour; pages send no Referer, so it does not leak from them.
    """
    return sign(settings, {"questionnaireResponse": qr_id}, LINK_SECONDS, "results-link")
