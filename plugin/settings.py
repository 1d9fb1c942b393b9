"""Settings of the service (`ServiceSettings`); a scoring run's own (`Settings`) live in the screening core.

Every setting has a safe default and comes from an environment variable
(or the matching command-line flag, which wins). `SERVICE_SETTINGS` is the
one table of them: the README's settings table is checked against it.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path

from plugin.screening.parsing import MAX_BODY_BYTES
from plugin.screening.pipeline import Settings

# SMART v2 scopes for what the plugin reads and writes (see plugin/fhir/smart_auth.py for why each).
DEFAULT_SMART_SCOPES = ("system/Questionnaire.crus system/CodeSystem.crus system/StructureDefinition.crus "
                        "system/OperationDefinition.crus system/Device.crus "
                        "system/QuestionnaireResponse.crus system/Observation.crus system/Task.crus "
                        "system/Provenance.cs system/Patient.r system/Subscription.crus")


def default_store_path() -> Path:
    state_home = os.environ.get("XDG_STATE_HOME") or Path.home() / ".local" / "state"
    return Path(state_home) / "backpain-screen" / "store.sqlite3"


# Upper bounds of the client time limits: longer ones would let a few slow clients hold the connections again.
# Keep-alive goes higher: Google Cloud's load balancers keep backend connections 600 s and want more than that.
CLIENT_SECONDS_AT_MOST = {"header_seconds": 60, "body_gap_seconds": 60, "body_seconds": 600,
                          "keep_alive_seconds": 1200}


class SettingError(ValueError):
    """A setting that cannot be used; its message names the environment variable."""


@dataclass(frozen=True, slots=True)
class ServiceSettings:
    """What `backpain-screen serve` runs with. Secrets are never printed (repr hides them)."""

    fhir_base_url: str | None = None  # None: the embedded SQLite store
    fhir_bearer_token: str | None = field(default=None, repr=False)
    store_path: Path = field(default_factory=default_store_path)
    host: str = "127.0.0.1"
    port: int = 8000
    workers: int = 1
    strategy: str | None = None
    max_body_bytes: int = MAX_BODY_BYTES
    ingest_token: str | None = field(default=None, repr=False)  # bearer token for ingest, $populate and results
    notify_secret: str | None = field(default=None, repr=False)  # X-Notification-Secret of Subscriptions
    form_secret: str | None = field(default=None, repr=False)  # signs portal links that name a patient
    cors_origins: tuple[str, ...] = ()
    public_url: str | None = None  # how callers reach the service, for absolute links; None: from the request
    smart_launch_client_id: str | None = None  # registered as a SMART app with the EHR: CDS cards link via /launch
    smart_client_id: str | None = None  # SMART Backend Services client: writes to the FHIR server with its tokens
    smart_private_key: str | None = field(default=None, repr=False)  # path of its private key (PEM or JWK)
    smart_key_id: str | None = None  # the key's kid in the registered JWKS; None: the JWK's own, or its thumbprint
    smart_scopes: str = DEFAULT_SMART_SCOPES
    session_secret: str | None = field(default=None, repr=False)  # signs the SMART launch's cookies
    cds_issuers: tuple[str, ...] = ()  # `iss|jwks_url` the CDS Hooks JWTs may come from; none: CDS calls refused
    log_level: str = "info"
    # Slow and idle clients (plugin/web/slow_clients.py): whole seconds, each at least 1
    header_seconds: int = 10  # request line and headers must be in within this; else the connection is closed
    body_gap_seconds: int = 10  # a body that stalls this long between chunks is a 408
    body_seconds: int = 30  # and one that takes longer than this in all
    keep_alive_seconds: int = 5  # an idle keep-alive connection is closed after this

    def check_client_limits(self) -> None:
        """`serve` refuses limits out of bounds (other commands do not use them, so a CronJob sharing the
        service's ConfigMap is not stopped by one)."""
        for name, most in CLIENT_SECONDS_AT_MOST.items():
            if not 1 <= getattr(self, name) <= most:
                raise SettingError(f"{SERVICE_SETTINGS[name][0]} must be a whole number of seconds from 1 to {most}")

    def scoring(self) -> Settings:
        return Settings(strategy=self.strategy, max_body_bytes=self.max_body_bytes, fhir_base=self.fhir_base_url)


# field -> (environment variable, what it is); the README's settings table lists exactly these.
SERVICE_SETTINGS: dict[str, tuple[str, str]] = {
    "fhir_base_url": ("FHIR_BASE_URL", "the EHR's FHIR server; unset: the embedded SQLite store"),
    "fhir_bearer_token": ("FHIR_BEARER_TOKEN", "bearer token the plugin sends to the FHIR server"),
    "store_path": ("BACKPAIN_STORE",
                   "the embedded store's file (default $XDG_STATE_HOME/backpain-screen/store.sqlite3)"),
    "host": ("BACKPAIN_HOST", "address to listen on (default 127.0.0.1)"),
    "port": ("BACKPAIN_PORT", "port to listen on (default 8000)"),
    "workers": ("BACKPAIN_WORKERS", "uvicorn worker processes (default 1)"),
    "strategy": ("BACKPAIN_STRATEGY", "referral strategy: asas-2015 (default) or nice-ng65"),
    "max_body_bytes": ("BACKPAIN_MAX_BODY_BYTES", "largest request body accepted (default 1048576; larger: 413)"),
    "ingest_token": ("BACKPAIN_INGEST_TOKEN", "if set, POST /QuestionnaireResponse, `$populate` and the "
                     "results need `Authorization: Bearer` with it"),
    "notify_secret": ("BACKPAIN_NOTIFY_SECRET", "shared secret Subscriptions send in `X-Notification-Secret`; "
                      "unset: notifications are refused"),
    "form_secret": ("BACKPAIN_FORM_SECRET", "if set, a form link naming a patient must carry "
                    "`sig` = HMAC-SHA256(secret, patient reference), hex"),
    "cors_origins": ("BACKPAIN_CORS_ORIGINS", "comma-separated origins allowed to call the API from a browser"),
    "public_url": ("BACKPAIN_PUBLIC_URL", "the service's public base URL, for absolute links"),
    "smart_launch_client_id": ("BACKPAIN_SMART_LAUNCH_CLIENT_ID", "client id the EHR gave the plugin as a SMART app; "
                               "set: CDS Hooks cards open the results view through SMART App Launch (`/launch`)"),
    "smart_client_id": ("BACKPAIN_SMART_CLIENT_ID", "SMART Backend Services client id the EHR registered; set: "
                        "the plugin gets its access tokens from the EHR's authorization server (instead of "
                        "`FHIR_BEARER_TOKEN`)"),
    "smart_private_key": ("BACKPAIN_SMART_PRIVATE_KEY", "file of the client's private key: PEM or JWK, RSA "
                          "(RS384) or EC P-384 (ES384)"),
    "smart_key_id": ("BACKPAIN_SMART_KEY_ID", "the key's `kid` in the JWKS registered with the EHR (default: "
                     "the JWK's `kid`, else its RFC 7638 thumbprint)"),
    "smart_scopes": ("BACKPAIN_SMART_SCOPES", "scopes asked for (default: the SMART v2 `system/` scopes of "
                     "what the plugin reads and writes)"),
    "session_secret": ("BACKPAIN_SESSION_SECRET", "signs the SMART App Launch's short-lived cookies and CDS "
                       "cards' plain results links; unset: a random key per process, so set it when running "
                       "more than one worker"),
    "cds_issuers": ("BACKPAIN_CDS_ISSUERS", "comma-separated `issuer|jwks_url` pairs: the CDS Clients whose "
                    "signed JWTs the CDS Hooks service accepts, and their JWK Sets (allowed `jku`); unset: "
                    "CDS Hooks calls are refused"),
    "log_level": ("BACKPAIN_LOG_LEVEL", "debug, info (default), warning or error"),
    "header_seconds": ("BACKPAIN_HEADER_SECONDS", "seconds a client has to send a request's line and headers "
                       "(default 10, at most 60; then the connection is closed)"),
    "body_gap_seconds": ("BACKPAIN_BODY_GAP_SECONDS", "seconds a request body may stall between chunks (default 10, "
                         "at most 60; then 408)"),
    "body_seconds": ("BACKPAIN_BODY_SECONDS", "seconds a whole request body may take (default 30, at most 600; "
                     "then 408)"),
    "keep_alive_seconds": ("BACKPAIN_KEEP_ALIVE_SECONDS", "seconds an idle keep-alive connection stays open "
                           "(default 5, at most 1200); behind a load balancer or ingress, set it above the "
                           "balancer's own idle timeout (ingress-nginx 60 s, Google Cloud's load balancers 600 s), "
                           "or the balancer may reuse a connection the plugin is closing (a 502). A new connection "
                           "that sends nothing is closed after BACKPAIN_HEADER_SECONDS"),
}


def service_settings(environ: Mapping[str, str] | None = None, **flags: object) -> ServiceSettings:
    """Settings from the environment, overridden by flags that were given (not None)."""
    environ = os.environ if environ is None else environ
    values: dict[str, object] = {}
    kinds = {f.name: f.type for f in fields(ServiceSettings)}
    for name, (variable, _) in SERVICE_SETTINGS.items():
        raw = flags.get(name)
        if raw is None and environ.get(variable):
            raw = environ[variable]
        if raw is not None:
            try:
                values[name] = _convert(kinds[name], raw)
            except ValueError:  # int("ten"): say which setting, as the range checks do
                raise SettingError(f"{variable} must be a whole number, not {raw!r}") from None
    return ServiceSettings(**values)  # type: ignore[arg-type]


def _convert(kind: object, raw: object) -> object:
    if not isinstance(raw, str):
        return raw
    if kind == "int":
        return int(raw)
    if kind == "Path":
        return Path(raw)
    if kind == "tuple[str, ...]":
        return tuple(origin.strip() for origin in raw.split(",") if origin.strip())
    return raw
