"""Subscribes the plugin to the EHR's FHIR server: one R4 rest-hook Subscription per published Questionnaire.

Each Subscription asks the server to `PUT {endpoint}/QuestionnaireResponse/{id}`
with the response (payload `application/fhir+json`) whenever a response to
that Questionnaire is written completed, amended or entered-in-error (the
statuses `sync` handles), sending `X-Notification-Secret` as a channel header
(HAPI and the test server send each `channel.header` line as an HTTP header).
They are made `requested`; the server makes them `active`.

Running it again is safe: the plugin's Subscriptions carry a tag naming their
Questionnaire, so they are found again and left alone when nothing changed,
updated in place (with If-Match) when something did (a rotated secret, a new
endpoint, a Subscription the server put in `error` or someone switched `off`),
and created only when missing. The secret is never printed.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from urllib.parse import urlsplit

from plugin.fhir.client import FHIR_JSON, FhirClient
from plugin.screening import data, systems
from plugin.stores.sync import STATUSES
from plugin.web.security import loopback

TAG_SYSTEM = f"{systems.BASE}/subscription"  # code: the Questionnaire's id (its canonical URL's last segment)
SECRET_HEADER = "X-Notification-Secret"
LIVE = frozenset({"requested", "active"})  # what the server may make of `requested`: nothing to change
PRIVATE_SUFFIXES = (".svc", ".cluster.local", ".internal", ".local", ".lan", ".home.arpa")
HIDDEN = "(hidden)"


@dataclass(frozen=True, slots=True)
class Change:
    """What `subscribe` did (or, in a dry run, would do) for one Questionnaire."""

    questionnaire: str
    action: str  # created | updated | unchanged
    subscription: dict  # as stored (or as it would be written)
    changed: tuple[str, ...] = ()  # the elements that differed, by name (never their values)
    duplicates: tuple[str, ...] = ()  # other Subscriptions with the same tag, left alone

    def summary(self) -> dict:
        ident = self.subscription.get("id")
        entry: dict = {"questionnaire": self.questionnaire,
                       "subscription": f"Subscription/{ident}" if ident else None,
                       "status": self.subscription.get("status")}
        if self.changed:
            entry["changed"] = list(self.changed)
        if self.duplicates:
            entry["duplicates"] = [f"Subscription/{d}" for d in self.duplicates]
        return entry


def check_endpoint(endpoint: str, allow_http: bool = False) -> tuple[str, str | None]:
    """The endpoint without a trailing slash, and a warning if any; ValueError if it will not do.

    The secret travels in a header, so plain http is accepted quietly only to
    this machine; to a private network (a compose service name, a cluster's
    `.svc` name, a private address) with a warning; elsewhere only with
    `allow_http`.
    """
    parts = urlsplit(endpoint)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"the endpoint must be an absolute http(s) URL, such as "
                         f"https://plugin.example.org/notify; got {endpoint!r}")
    if parts.username or parts.password:
        raise ValueError("the endpoint must not carry credentials; the shared secret is sent as a header")
    if parts.query or parts.fragment:
        raise ValueError("the endpoint must have no query or fragment: the server appends "
                         "/QuestionnaireResponse/{id} to it")
    if parts.scheme == "https" or loopback(parts.hostname):
        return endpoint.rstrip("/"), None
    if not (allow_http or _private(parts.hostname)):
        raise ValueError("the endpoint is plain http to another machine, so the notification secret would "
                         "cross the network in clear; use https, or --allow-http on a private network")
    return endpoint.rstrip("/"), (f"the endpoint is plain http: the notification secret crosses the network "
                                  f"to {parts.hostname} in clear; keep that network private")


def check_secret(secret: str | None) -> str:
    """The notification secret, or ValueError: it must exist and survive being an HTTP header line."""
    if not secret:
        raise ValueError("BACKPAIN_NOTIFY_SECRET is not set; set it to the same secret the service "
                         "(backpain-screen serve) runs with")
    if not (secret.isascii() and secret.isprintable()) or secret != secret.strip():
        raise ValueError("BACKPAIN_NOTIFY_SECRET must be printable ASCII without surrounding spaces "
                         "(it is sent as an HTTP header)")
    return secret


def _private(host: str) -> bool:
    """A name or address that only a private network resolves: a compose service, a cluster service, RFC 1918."""
    try:
        return ipaddress.ip_address(host).is_private
    except ValueError:
        return "." not in host or host.lower().endswith(PRIVATE_SUFFIXES)


def wanted(endpoint: str, secret: str) -> list[tuple[str, dict]]:
    """(Questionnaire URL, the Subscription the plugin needs for it) for every published Questionnaire."""
    newest = {q["url"]: q for q in data.definitions("Questionnaire")}  # one per Questionnaire, whatever its versions
    return [(url, subscription(q, endpoint, secret)) for url, q in newest.items()]


def subscription(questionnaire: dict, endpoint: str, secret: str) -> dict:
    url = questionnaire["url"]
    return {
        "resourceType": "Subscription",
        "meta": {"tag": [_tag(questionnaire)]},
        "status": "requested",
        "reason": f"backpain-screen scores responses to {questionnaire.get('title') or url} and writes the "
                  f"results back",
        "criteria": f"QuestionnaireResponse?questionnaire={data.canonical_forms(url)}&status={STATUSES}",
        "channel": {"type": "rest-hook", "endpoint": endpoint, "payload": FHIR_JSON,
                    "header": [f"{SECRET_HEADER}: {secret}"]},
    }


def _tag(questionnaire: dict) -> dict:
    return {"system": TAG_SYSTEM, "code": questionnaire["url"].rstrip("/").rsplit("/", 1)[-1],
            "display": f"backpain-screen notifications for {questionnaire['url']}"}


def differences(stored: dict, want: dict) -> tuple[str, ...]:
    """The elements of `want` that `stored` lacks or holds otherwise (what the server adds is ignored)."""
    found = []
    if stored.get("status") not in LIVE:
        found.append("status")
    for name in ("criteria", "reason"):
        if stored.get(name) != want[name]:
            found.append(name)
    have, need = stored.get("channel") or {}, want["channel"]
    for name in ("type", "endpoint", "payload"):
        if (have.get(name) or "").rstrip("/") != need[name].rstrip("/"):
            found.append(f"channel.{name}")
    if _secret_lines(have) != _secret_lines(need):
        found.append("channel.header")
    tag = want["meta"]["tag"][0]
    if not any(t.get("system") == tag["system"] and t.get("code") == tag["code"]
               for t in (stored.get("meta") or {}).get("tag") or []):
        found.append("meta.tag")
    return tuple(found)


async def subscribe(client: FhirClient, endpoint: str, secret: str, *, dry_run: bool = False) -> list[Change]:
    """Creates or updates the plugin's Subscriptions so there is one, as wanted, per Questionnaire."""
    changes = []
    for url, want in wanted(endpoint, secret):
        tag = want["meta"]["tag"][0]
        found = [s async for s in client.search("Subscription", {"_tag": f"{tag['system']}|{tag['code']}"})]
        found.sort(key=_age)
        changes.append(await _settle(client, url, want, found, dry_run))
    return changes


async def _settle(client: FhirClient, url: str, want: dict, found: list[dict], dry_run: bool) -> Change:
    """One Questionnaire: keep the oldest tagged Subscription (others are reported, never deleted)."""
    if not found:
        stored = want if dry_run else await client.create(want)
        return Change(url, "created", stored)
    current, others = found[0], tuple(s["id"] for s in found[1:])
    changed = differences(current, want)
    if not changed:
        return Change(url, "unchanged", current, duplicates=others)
    body = merged(current, want)
    if not dry_run:
        version = (current.get("meta") or {}).get("versionId")
        headers = {"If-Match": f'W/"{version}"'} if version else {}
        body = await client.request("PUT", f"Subscription/{current['id']}", body=body, headers=headers)
    return Change(url, "updated", body, changed, others)


def merged(current: dict, want: dict) -> dict:
    """What to PUT: the wanted elements over the stored ones, so what others added (`contact`, `end`,
    extensions, other channel headers, the server's own tags) is kept; `error` goes, as the status is
    `requested` again."""
    tags = [t for t in (current.get("meta") or {}).get("tag") or [] if t.get("system") != TAG_SYSTEM]
    kept = {k: v for k, v in current.items() if k not in ("meta", "text", "error")}
    have = current.get("channel") or {}
    others = [line for line in have.get("header") or [] if line not in _secret_lines(have)]
    channel = {**have, **want["channel"], "header": [*others, *want["channel"]["header"]]}
    return {"resourceType": "Subscription", "id": current["id"], "meta": {"tag": [*tags, *want["meta"]["tag"]]},
            **{k: v for k, v in kept.items() if k != "id"}, **{k: v for k, v in want.items() if k != "meta"},
            "channel": channel}


def _secret_lines(channel: dict) -> list[str]:
    """The channel's X-Notification-Secret header lines: the only header the plugin manages."""
    return sorted(line for line in channel.get("header") or []
                  if line.partition(":")[0].strip().lower() == SECRET_HEADER.lower())


def _age(stored: dict) -> tuple[bool, int, str]:
    """A stable order, so the same one is kept on every run: numeric ids (HAPI) by number, i.e. oldest first."""
    ident = stored.get("id", "")
    return (not ident.isdigit(), int(ident) if ident.isdigit() else 0, ident)


def hide_secret(resource: dict) -> dict:
    """A copy to print: every channel header's value hidden (they carry the secret)."""
    channel = resource.get("channel") or {}
    headers = [f"{line.partition(':')[0]}: {HIDDEN}" for line in channel.get("header") or []]
    return {**resource, "channel": {**channel, "header": headers}} if headers else resource


def report(changes: list[Change], endpoint: str, dry_run: bool) -> dict:
    """The JSON summary `subscribe` prints: what was created, updated and left unchanged (no secret)."""
    summary: dict = {"endpoint": endpoint, "dry_run": dry_run}
    for action in ("created", "updated", "unchanged"):
        summary[action] = [c.summary() for c in changes if c.action == action]
    if dry_run:
        summary["subscriptions"] = [hide_secret(c.subscription) for c in changes]
    return summary
