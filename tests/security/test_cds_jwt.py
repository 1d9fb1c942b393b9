"""CDS Hooks JWTs (issue #14 item 6): `aud` never from the Host header; malformed claims are a 401, never a 500."""

from __future__ import annotations

import json
import time
import uuid

import jwt
import orjson
import pytest

from tests.cds_keys import ISSUER, token
from tests.ehr.test_cds_hooks import AUD, SERVICE, hook, jwks, keys, make_client  # noqa: F401 (fixtures)


def post(client, bearer: str, host: str | None = None):
    headers = {"Content-Type": "application/json", "Authorization": f"Bearer {bearer}"}
    if host:
        headers["Host"] = host
    return client.post(SERVICE, content=orjson.dumps(hook()), headers=headers)


@pytest.mark.parametrize("host", ["evil.example.org", "testserver", "127.0.0.1:9999", "localhost:8000"])
def test_a_token_for_the_host_the_caller_names_is_refused(make_client, keys, host):  # noqa: F811
    """Without BACKPAIN_PUBLIC_URL, aud is checked against the listen URL only: a spoofed Host gains nothing."""
    with make_client() as client:
        assert post(client, token(keys, f"http://{host}{SERVICE}"), host=host).status_code == 401
        assert post(client, token(keys, AUD), host=host).status_code == 200


def test_the_listen_url_is_the_audience_without_a_public_url(make_client, keys):  # noqa: F811
    with make_client(host="10.1.2.3", port=9443) as client:
        assert post(client, token(keys, f"http://10.1.2.3:9443{SERVICE}")).status_code == 200
        assert post(client, token(keys, AUD)).status_code == 401


MALFORMED = {
    "exp as text": {"exp": "9999999999"},
    "iat as text": {"iat": "1"},
    "exp and iat as text": {"exp": "soon", "iat": "now"},
    "exp as a boolean": {"exp": True},
    "exp as an object": {"exp": {"at": 1}},
    "exp as a list": {"exp": [9999999999]},
    "exp null": {"exp": None},
    "exp huge": {"exp": 10**30},
    "exp negative": {"exp": -1},
    "exp a float past the range": {"exp": 1e300},
    "iat huge": {"iat": 10**30},
    "nbf as text": {"nbf": "later"},
    "nbf in the future": {"nbf": int(time.time()) + 3600},
    "jti a number": {"jti": 7},
    "jti empty": {"jti": ""},
    "jti an object": {"jti": {"id": "x"}},
    "iss a number": {"iss": 5},
    "aud a number": {"aud": 5},
    "aud a list of others": {"aud": ["https://other.example.org"]},
    "aud null": {"aud": None},
}


def raw_token(keys, claims: dict) -> str:  # noqa: F811
    """Signed as a CDS Client would, with claims PyJWT itself would refuse to encode (a numeric iss)."""
    now = int(time.time())
    payload = {"iss": ISSUER, "aud": AUD, "exp": now + 300, "iat": now, "jti": str(uuid.uuid4()), **claims}
    return jwt.api_jws.PyJWS().encode(json.dumps(payload).encode(), keys.ec, algorithm="ES384",
                                      headers={"typ": "JWT", "kid": "ec-1"})


@pytest.mark.parametrize("name", sorted(MALFORMED))
def test_malformed_claims_are_a_401(make_client, keys, name):  # noqa: F811
    with make_client() as client:
        answer = post(client, raw_token(keys, MALFORMED[name]))
    assert answer.status_code == 401, (name, answer.text)
    assert answer.json()["resourceType"] == "OperationOutcome"
