"""Settings, read once from the environment when the app or a command starts.

Nothing here runs at import time: :func:`Settings.from_env` is called by the
composition root (:func:`gateway.app.create_app`) and by the CLI.  Every
setting is under the ``GATEWAY_`` prefix; a missing or invalid value raises
:class:`~gateway.errors.ConfigError` naming the variable and the reason.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar
from urllib.parse import urlsplit

import phonenumbers

from gateway.errors import ConfigError

T = TypeVar("T")

DEFAULT_SQLITE_FILE = "assist-gateway.sqlite3"


@dataclass(frozen=True)
class VoicePolicy:
    """How hard the router tries the assistance centre before the emergency fallback."""

    #: centre lines rung at most per call (each line once, in the call plan's order)
    dial_attempts: int = 3
    #: ring timeout of one centre leg, seconds (Twilio adds about 5 s)
    ring_timeout_s: int = 15
    #: roadside (ON CALL) calls: no new roadside leg starts after this, seconds
    budget_s: int = 90
    #: seconds the agent has to press the accept key during the whisper
    whisper_accept_timeout_s: int = 5
    #: emergency legs (PSAP/TPS number, local number through Twilio) before the hand-back
    emergency_attempts: int = 2
    #: from call arrival, the first emergency leg starts no later than this, seconds
    emergency_deadline_s: int = 40
    #: ring timeout of an emergency <Dial>, seconds
    emergency_ring_s: int = 30

    def validate(self) -> None:
        if not 1 <= self.dial_attempts <= 10:
            raise ConfigError("GATEWAY_DIAL_ATTEMPTS: must be between 1 and 10")
        if not 5 <= self.ring_timeout_s <= 600:
            raise ConfigError("GATEWAY_RING_TIMEOUT_S: must be between 5 and 600 (Twilio's range)")
        if not 10 <= self.budget_s <= 600:
            raise ConfigError("GATEWAY_VOICE_BUDGET_S: must be between 10 and 600")
        if not 3 <= self.whisper_accept_timeout_s <= 30:
            raise ConfigError("GATEWAY_WHISPER_TIMEOUT_S: must be between 3 and 30")
        if not 1 <= self.emergency_attempts <= 10:
            raise ConfigError("GATEWAY_EMERGENCY_ATTEMPTS: must be between 1 and 10")
        if not 15 <= self.emergency_deadline_s <= 120:
            raise ConfigError("GATEWAY_EMERGENCY_DEADLINE_S: must be between 15 and 120")
        if not 10 <= self.emergency_ring_s <= 120:
            raise ConfigError("GATEWAY_EMERGENCY_RING_S: must be between 10 and 120")


@dataclass(frozen=True)
class DeliveryPolicy:
    """How incidents reach the centre's API (the outbox worker)."""

    #: one HTTP attempt may take this long (connect + read), seconds
    timeout_s: float = 5.0
    #: first gap between attempts; it doubles (with jitter) up to ``backoff_max_s``
    backoff_initial_s: float = 0.5
    backoff_max_s: float = 30.0
    #: one delivery pass retries for at most this long before the row is rescheduled
    budget_s: float = 60.0
    #: how often the worker looks for due rows when nothing wakes it, seconds
    poll_s: float = 1.0
    #: deliveries in flight at once
    concurrency: int = 4
    #: consecutive failures that mark the centre unreachable, and for how long
    breaker_failures: int = 3
    breaker_open_s: float = 30.0

    @property
    def lease_s(self) -> float:
        """A claimed row is another worker's again after this (its worker died)."""
        return self.budget_s + self.timeout_s + 5.0

    def validate(self) -> None:
        if not 0.1 <= self.timeout_s <= 60:
            raise ConfigError("GATEWAY_DELIVERY_TIMEOUT_S: must be between 0.1 and 60")
        if not 0.01 <= self.backoff_initial_s <= self.backoff_max_s:
            raise ConfigError("GATEWAY_DELIVERY_BACKOFF_INITIAL_S: must be at least 0.01 "
                              "and at most GATEWAY_DELIVERY_BACKOFF_MAX_S")
        if not self.backoff_max_s <= 300:
            raise ConfigError("GATEWAY_DELIVERY_BACKOFF_MAX_S: must be at most 300")
        if not 1 <= self.budget_s <= 3600:
            raise ConfigError("GATEWAY_DELIVERY_BUDGET_S: must be between 1 and 3600")
        if not 1 <= self.concurrency <= 32:
            raise ConfigError("GATEWAY_DELIVERY_CONCURRENCY: must be between 1 and 32")
        if not 1 <= self.breaker_failures <= 100:
            raise ConfigError("GATEWAY_BREAKER_FAILURES: must be between 1 and 100")


@dataclass(frozen=True)
class GeocoderPolicy:
    """The optional reverse geocoder (addresses for agents; never on a call's path)."""

    #: one lookup may take this long (connect and read each), seconds
    timeout_s: float = 2.0
    #: addresses kept in memory (per process), per coordinate rounded to 4 decimals
    cache_size: int = 10_000
    #: a cached address (or "no address here") is asked again after this, seconds
    cache_ttl_s: float = 86_400.0
    #: after a failure (error, timeout, nonsense) the geocoder is not asked for this long
    backoff_s: float = 30.0

    def validate(self) -> None:
        if not 0.1 <= self.timeout_s <= 10:
            raise ConfigError("GATEWAY_GEOCODER_TIMEOUT_S: must be between 0.1 and 10")
        if not 1 <= self.cache_size <= 1_000_000:
            raise ConfigError("GATEWAY_GEOCODER_CACHE_SIZE: must be between 1 and 1000000")
        if not 1 <= self.cache_ttl_s <= 30 * 86_400:
            raise ConfigError("GATEWAY_GEOCODER_CACHE_TTL_S: must be between 1 and 2592000")
        if not 0 <= self.backoff_s <= 3600:
            raise ConfigError("GATEWAY_GEOCODER_BACKOFF_S: must be between 0 and 3600")


@dataclass(frozen=True)
class Settings:
    """Everything the gateway needs to know about its environment."""

    twilio_auth_token: str
    public_url: str
    database_url: str = f"sqlite:///{DEFAULT_SQLITE_FILE}"
    vehicle_api_tokens: frozenset[str] = frozenset()
    #: agent bearer token -> roles (``read``, ``dispatch``, ``immobilise``, ``supervisor``)
    agent_api_tokens: Mapping[str, frozenset[str]] = field(default_factory=dict)
    #: bearer tokens of the admin API (enrolment, PINs, lockouts): its own role
    admin_api_tokens: frozenset[str] = frozenset()
    assistance_url: str | None = None
    number_plan_dir: Path | None = None
    boundaries_path: Path | None = None
    #: country -> caller ID for emergency dials through Twilio: a Twilio number of that
    #: country (with a registered emergency address where Twilio needs one: US, CA, GB).
    #: Twilio dials a short emergency number only from a caller ID of the same country.
    emergency_caller_ids: Mapping[str, str] = field(default_factory=dict)
    #: how long an incident stays "open" for a call from the car, seconds
    incident_window_s: int = 3600
    vehicle_command_url: str | None = None
    #: seconds the car stays unlocked after a remote unlock before it relocks
    unlock_relock_s: int = 60
    #: seconds a command the vehicle command service took (``accepted``) waits for the
    #: car's report before it fails (audited ``<command>_failed``); a late report still
    #: confirms it and applies the change.  An owner waiting on the phone or in the app
    #: has given up by then, and a repeated request sends nothing while it waits.
    command_confirm_s: int = 300
    push_url: str | None = None
    twilio_account_sid: str | None = None
    twilio_api_url: str = "https://api.twilio.com"
    sms_from: str | None = None
    #: markets where roadside assistance stays free after the included years if serviced
    roadside_free_markets: frozenset[str] = frozenset()
    #: scrypt cost for PIN hashes (2**14 ~ 60 ms); tests lower it
    pin_scrypt_n: int = 2**14
    #: first gap before a theft SMS/push that failed for a passing reason is retried,
    #: seconds; the gap doubles (with jitter) up to a minute
    notify_retry_s: float = 5.0
    #: seconds after a theft alarm not disarmed with the key when the owner's SMS/push
    #: stop being retried and the centre gets the escalation with what failed
    theft_escalation_s: int = 600
    voice: VoicePolicy = field(default_factory=VoicePolicy)
    delivery: DeliveryPolicy = field(default_factory=DeliveryPolicy)
    #: a self-hosted Nominatim (``https://nominatim.internal``); unset: no addresses
    geocoder_url: str | None = None
    geocoder: GeocoderPolicy = field(default_factory=GeocoderPolicy)

    @classmethod
    def from_env(
        cls, env: Mapping[str, str] | None = None, *, require_auth_token: bool = True
    ) -> Settings:
        env = os.environ if env is None else env
        for old, new in _REPLACED.items():
            if env.get(old, "").strip():
                raise ConfigError(f"{old}: no longer read; {new}")
        reader = _Reader(env)
        token = reader.text("GATEWAY_TWILIO_AUTH_TOKEN", required=require_auth_token)
        if token and len(token) < 16:
            raise ConfigError("GATEWAY_TWILIO_AUTH_TOKEN: too short to be an auth token")
        voice = VoicePolicy(
            dial_attempts=reader.integer("GATEWAY_DIAL_ATTEMPTS", VoicePolicy.dial_attempts),
            ring_timeout_s=reader.integer("GATEWAY_RING_TIMEOUT_S", VoicePolicy.ring_timeout_s),
            budget_s=reader.integer("GATEWAY_VOICE_BUDGET_S", VoicePolicy.budget_s),
            whisper_accept_timeout_s=reader.integer(
                "GATEWAY_WHISPER_TIMEOUT_S", VoicePolicy.whisper_accept_timeout_s
            ),
            emergency_attempts=reader.integer(
                "GATEWAY_EMERGENCY_ATTEMPTS", VoicePolicy.emergency_attempts
            ),
            emergency_deadline_s=reader.integer(
                "GATEWAY_EMERGENCY_DEADLINE_S", VoicePolicy.emergency_deadline_s),
            emergency_ring_s=reader.integer("GATEWAY_EMERGENCY_RING_S",
                                            VoicePolicy.emergency_ring_s),
        )
        voice.validate()
        delivery = DeliveryPolicy(
            timeout_s=reader.number("GATEWAY_DELIVERY_TIMEOUT_S", DeliveryPolicy.timeout_s),
            backoff_initial_s=reader.number("GATEWAY_DELIVERY_BACKOFF_INITIAL_S",
                                            DeliveryPolicy.backoff_initial_s),
            backoff_max_s=reader.number("GATEWAY_DELIVERY_BACKOFF_MAX_S",
                                        DeliveryPolicy.backoff_max_s),
            budget_s=reader.number("GATEWAY_DELIVERY_BUDGET_S", DeliveryPolicy.budget_s),
            poll_s=reader.number("GATEWAY_DELIVERY_POLL_S", DeliveryPolicy.poll_s),
            concurrency=reader.integer("GATEWAY_DELIVERY_CONCURRENCY", DeliveryPolicy.concurrency),
            breaker_failures=reader.integer("GATEWAY_BREAKER_FAILURES",
                                            DeliveryPolicy.breaker_failures),
            breaker_open_s=reader.number("GATEWAY_BREAKER_OPEN_S", DeliveryPolicy.breaker_open_s),
        )
        delivery.validate()
        geocoder = GeocoderPolicy(
            timeout_s=reader.number("GATEWAY_GEOCODER_TIMEOUT_S", GeocoderPolicy.timeout_s),
            cache_size=reader.integer("GATEWAY_GEOCODER_CACHE_SIZE", GeocoderPolicy.cache_size),
            cache_ttl_s=reader.number("GATEWAY_GEOCODER_CACHE_TTL_S",
                                      GeocoderPolicy.cache_ttl_s),
            backoff_s=reader.number("GATEWAY_GEOCODER_BACKOFF_S", GeocoderPolicy.backoff_s),
        )
        geocoder.validate()
        settings = cls(
            twilio_auth_token=token,
            public_url=reader.url("GATEWAY_PUBLIC_URL", default="http://127.0.0.1:8080"),
            database_url=reader.database_url("GATEWAY_DATABASE_URL", cls.database_url),
            vehicle_api_tokens=frozenset(reader.csv("GATEWAY_VEHICLE_API_TOKENS")),
            agent_api_tokens=reader.agent_tokens("GATEWAY_AGENT_API_TOKENS"),
            admin_api_tokens=frozenset(reader.csv("GATEWAY_ADMIN_API_TOKENS")),
            assistance_url=reader.url("GATEWAY_ASSISTANCE_URL", default=None),
            number_plan_dir=reader.path("GATEWAY_NUMBER_PLAN", "number plan directory",
                                        directory=True),
            boundaries_path=reader.path("GATEWAY_BOUNDARIES", "boundary data file"),
            emergency_caller_ids=reader.caller_ids("GATEWAY_EMERGENCY_CALLER_IDS"),
            incident_window_s=reader.integer("GATEWAY_INCIDENT_WINDOW_S", 3600),
            voice=voice,
            delivery=delivery,
            geocoder_url=reader.url("GATEWAY_GEOCODER_URL", default=None),
            geocoder=geocoder,
            vehicle_command_url=reader.url("GATEWAY_VEHICLE_COMMAND_URL", default=None),
            unlock_relock_s=reader.integer("GATEWAY_UNLOCK_RELOCK_S", 60),
            command_confirm_s=reader.integer("GATEWAY_COMMAND_CONFIRM_S",
                                             cls.command_confirm_s),
            push_url=reader.url("GATEWAY_PUSH_URL", default=None),
            twilio_account_sid=reader.text("GATEWAY_TWILIO_ACCOUNT_SID") or None,
            twilio_api_url=reader.url("GATEWAY_TWILIO_API_URL", default="https://api.twilio.com"),
            sms_from=reader.e164("GATEWAY_SMS_FROM"),
            roadside_free_markets=_markets(reader.text("GATEWAY_ROADSIDE_FREE_MARKETS")),
            pin_scrypt_n=reader.integer("GATEWAY_PIN_SCRYPT_N", 2**14),
            notify_retry_s=reader.number("GATEWAY_NOTIFY_RETRY_S", cls.notify_retry_s),
            theft_escalation_s=reader.integer("GATEWAY_THEFT_ESCALATION_S",
                                              cls.theft_escalation_s),
        )
        if not 10 <= settings.unlock_relock_s <= 600:
            raise ConfigError("GATEWAY_UNLOCK_RELOCK_S: must be between 10 and 600")
        if not 30 <= settings.command_confirm_s <= 3600:
            raise ConfigError("GATEWAY_COMMAND_CONFIRM_S: must be between 30 and 3600 seconds")
        if not 60 <= settings.theft_escalation_s <= 86400:
            raise ConfigError("GATEWAY_THEFT_ESCALATION_S: must be between 60 and 86400 seconds")
        if not 0 < settings.notify_retry_s < settings.theft_escalation_s:
            raise ConfigError("GATEWAY_NOTIFY_RETRY_S: must be positive and below "
                              "GATEWAY_THEFT_ESCALATION_S")
        n = settings.pin_scrypt_n
        if n < 2**8 or n & (n - 1):
            raise ConfigError("GATEWAY_PIN_SCRYPT_N: must be a power of two, at least 256")
        for name, tokens in (("GATEWAY_VEHICLE_API_TOKENS", settings.vehicle_api_tokens),
                             ("GATEWAY_AGENT_API_TOKENS", set(settings.agent_api_tokens))):
            short = sum(1 for t in tokens if len(t) < 16)
            if short:
                raise ConfigError(f"{name}: tokens must be at least 16 characters long "
                                  f"({short} of {len(tokens)} shorter)")
        if any(len(t) < 16 for t in settings.admin_api_tokens):
            raise ConfigError("GATEWAY_ADMIN_API_TOKENS: tokens must be at least 16 characters")
        if settings.admin_api_tokens & (settings.vehicle_api_tokens | set(settings.agent_api_tokens)):
            raise ConfigError("GATEWAY_ADMIN_API_TOKENS: a token is also a vehicle or agent "
                              "token; give the admin API its own")
        return settings

    def replace(self, **changes: object) -> Settings:
        return dataclasses.replace(self, **changes)  # type: ignore[arg-type]


class _Reader:
    def __init__(self, env: Mapping[str, str]) -> None:
        self.env = env

    def text(self, name: str, *, required: bool = False) -> str:
        value = self.env.get(name, "").strip()
        if required and not value:
            raise ConfigError(f"{name}: required but not set")
        return value

    def _parse(self, name: str, default: T, parse: Callable[[str], T], what: str) -> T:
        raw = self.text(name)
        if not raw:
            return default
        try:
            return parse(raw)
        except ValueError:
            raise ConfigError(f"{name}: {raw!r} is not {what}") from None

    def integer(self, name: str, default: int) -> int:
        return self._parse(name, default, int, "a whole number")

    def number(self, name: str, default: float) -> float:
        value = self._parse(name, default, float, "a number")
        if not math.isfinite(value):
            raise ConfigError(f"{name}: must be a finite number")
        return value

    def url(self, name: str, *, default: str | None) -> str:
        raw = self.text(name)
        if not raw:
            return default  # type: ignore[return-value]
        parts = urlsplit(raw)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ConfigError(f"{name}: {raw!r} is not an http(s) URL")
        if parts.query or parts.fragment:
            raise ConfigError(f"{name}: must not carry a query or fragment")
        return raw.rstrip("/")

    def csv(self, name: str) -> list[str]:
        return [p.strip() for p in self.text(name).split(",") if p.strip()]

    def path(self, name: str, what: str, *, directory: bool = False) -> Path | None:
        """A path that must exist (a directory with ``directory``); None when unset."""
        raw = self.text(name)
        if not raw:
            return None
        path = Path(raw)
        if not (path.is_dir() if directory else path.exists()):
            raise ConfigError(f"{name}: {what} not found: {raw}")
        return path

    def database_url(self, name: str, default: str) -> str:
        """``sqlite:///PATH`` (its directory must exist), ``sqlite://`` (in memory), or
        ``postgresql://`` / ``postgres://`` (psycopg 3, the ``[postgres]`` extra)."""
        raw = self.text(name)
        if not raw:
            return default
        from sqlalchemy.engine import make_url
        from sqlalchemy.exc import ArgumentError

        scheme, sep, rest = raw.partition("://")
        scheme = scheme.lower()
        expected = ("expected sqlite:///PATH or "
                    "postgresql://USER:PASSWORD@HOST:PORT/DATABASE")
        shown = _hide_password(raw)
        if not sep:
            raise ConfigError(f"{name}: {shown!r} is not a database URL; {expected}")
        postgres = scheme in ("postgres", "postgresql", "postgresql+psycopg")
        if scheme != "sqlite" and not postgres:
            raise ConfigError(f"{name}: {scheme}:// is not supported; {expected}")
        try:
            url = make_url(f"{'postgresql+psycopg' if postgres else 'sqlite'}://{rest}")
            port = url.port
        except (ArgumentError, ValueError):
            raise ConfigError(f"{name}: {shown!r} is not a valid database URL; "
                              f"{expected}") from None
        if port is not None and not 0 < port < 65536:
            raise ConfigError(f"{name}: port {port} is out of range")
        if postgres:
            import importlib.util

            if importlib.util.find_spec("psycopg") is None:
                raise ConfigError(f"{name}: PostgreSQL needs the psycopg driver: "
                                  "pip install 'assist-gateway[postgres]'")
        elif url.database and url.database != ":memory:":
            folder = Path(url.database).expanduser().absolute().parent
            if not folder.is_dir():
                raise ConfigError(f"{name}: the SQLite file's directory does not exist: "
                                  f"{folder}")
        return raw

    def e164(self, name: str) -> str | None:
        raw = self.text(name)
        return self.e164_value(name, raw) if raw else None

    def e164_value(self, name: str, raw: str) -> str:
        try:
            number = phonenumbers.parse(raw, None)
        except phonenumbers.NumberParseException:
            raise ConfigError(f"{name}: {raw!r} is not an E.164 number") from None
        if not phonenumbers.is_valid_number(number):
            raise ConfigError(f"{name}: {raw!r} is not a valid phone number")
        return phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.E164)

    def caller_ids(self, name: str) -> dict[str, str]:
        """``+44...,+49...`` -> {"GB": "+44...", "DE": "+49..."}: one per country."""
        found: dict[str, str] = {}
        for raw in self.csv(name):
            number = self.e164_value(name, raw)
            region = phonenumbers.region_code_for_number(phonenumbers.parse(number, None))
            if not region or region == "001":
                raise ConfigError(f"{name}: {raw!r} belongs to no country")
            if region in found:
                raise ConfigError(f"{name}: two caller IDs for {region} ({found[region]}, {number})")
            found[region] = number
        return found

    def agent_tokens(self, name: str) -> dict[str, frozenset[str]]:
        """``token:role+role,token2:role`` -> {token: roles}."""
        tokens: dict[str, frozenset[str]] = {}
        for item in self.csv(name):
            token, _, roles = item.partition(":")
            role_set = frozenset(r for r in roles.split("+") if r) or frozenset({"read"})
            unknown = role_set - AGENT_ROLES
            if unknown:
                raise ConfigError(f"{name}: unknown role(s) {sorted(unknown)}")
            tokens[token] = role_set
        return tokens


def _hide_password(url: str) -> str:
    """``scheme://user:***@host/...``: a URL fit for an error message."""
    scheme, sep, rest = url.partition("://")
    userinfo, at, host = rest.rpartition("@")
    if not (sep and at and ":" in userinfo):
        return url
    return f"{scheme}://{userinfo.split(':', 1)[0]}:***@{host}"


def _markets(raw: str) -> frozenset[str]:
    if not raw.strip():
        return frozenset()
    from gateway.entitlement import parse_market_rule

    return parse_market_rule(raw)


#: variables earlier releases read, and what replaced them
_REPLACED = {
    "GATEWAY_VOICE_NUMBER": "list the gateway's numbers in the number plan's inbound.csv "
                            "(service emergency, roadside or owner)",
    "GATEWAY_IVR_NUMBERS": "list the owners' numbers in the number plan's inbound.csv "
                           "(service owner)",
    "GATEWAY_EMERGENCY_CALLER_ID": "set GATEWAY_EMERGENCY_CALLER_IDS: one caller ID per "
                                   "country, used only for that country's emergency number",
}

AGENT_ROLES = frozenset({"read", "dispatch", "immobilise", "supervisor"})
