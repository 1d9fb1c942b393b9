"""A CDS Client's signing side for the tests: real RSA and EC P-384 keys, their JWK Set served over HTTP
on 127.0.0.1 by a thread, and JWTs signed as a CDS Client signs them."""

from __future__ import annotations

import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import jwt
import orjson
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import ECAlgorithm, RSAAlgorithm

ISSUER = "https://ehr.example.org/cds-client"


@dataclass
class Keys:
    rsa: rsa.RSAPrivateKey = field(default_factory=lambda: rsa.generate_private_key(public_exponent=65537,
                                                                                    key_size=2048))
    ec: ec.EllipticCurvePrivateKey = field(default_factory=lambda: ec.generate_private_key(ec.SECP384R1()))

    def jwks(self) -> dict:
        rsa_jwk = RSAAlgorithm.to_jwk(self.rsa.public_key(), as_dict=True)
        ec_jwk = ECAlgorithm.to_jwk(self.ec.public_key(), as_dict=True)
        return {"keys": [{**rsa_jwk, "kid": "rsa-1", "use": "sig", "alg": "RS384"},
                         {**ec_jwk, "kid": "ec-1", "use": "sig", "alg": "ES384"}]}


def reply_json(handler: BaseHTTPRequestHandler, status: int, value: Any,
               content_type: str = "application/json") -> None:
    """What the small HTTP servers of these tests answer: `value` as JSON."""
    body = orjson.dumps(value)
    handler.send_response(status)
    handler.send_header("Content-Type", content_type)
    handler.send_header("Content-Length", str(len(body)))
    handler.end_headers()
    handler.wfile.write(body)


class JwksServer:
    """Serves JWK Sets by path (`/jwks.json`, `/other.json`) and counts each fetch."""

    def __init__(self, sets: dict[str, dict]) -> None:
        self.sets = sets
        self.hits: Counter[str] = Counter()
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                owner.hits[self.path] += 1
                found = owner.sets.get(self.path)
                reply_json(self, 200 if found is not None else 404, found if found is not None else {})

            def log_message(self, *_: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    @contextmanager
    def running(self) -> Iterator[JwksServer]:
        thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        thread.start()
        try:
            yield self
        finally:
            self.server.shutdown()
            self.server.server_close()
            thread.join(5)


def token(keys: Keys, audience: str, *, alg: str = "ES384", jku: str | None = None, kid: str | None = None,
          drop: tuple[str, ...] = (), **claims: Any) -> str:
    """A CDS Client's JWT for `audience`; `claims` override the defaults, `drop` leaves claims out."""
    now = int(time.time())
    payload = {"iss": ISSUER, "aud": audience, "exp": now + 300, "iat": now, "jti": str(uuid.uuid4()),
               "tenant": "clinic-1", **claims}
    for name in drop:
        payload.pop(name, None)
    headers: dict[str, Any] = {"typ": "JWT", "kid": kid or ("ec-1" if alg.startswith("ES") else "rsa-1")}
    if jku:
        headers["jku"] = jku
    key: Any = keys.ec if alg.startswith("ES") else keys.rsa
    return jwt.encode(payload, key, algorithm=alg, headers=headers)
