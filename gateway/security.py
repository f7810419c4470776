"""Who may call what: Twilio signatures, bearer tokens, and a guard mark on every view.

Every view function carries a ``guard`` attribute naming its protection; the
test suite walks ``app.view_functions`` and fails on a route without one.
"""

from __future__ import annotations

import functools
import hmac
import logging
from collections.abc import Callable, Iterable
from typing import Any, TypeVar, cast

from flask import Response, current_app, g, jsonify, request
from twilio.request_validator import (
    SIGNATURE_HEADER,
    SIGNATURE_SETTINGS_HEADER,
    RequestValidator,
    get_signature_algorithm,
)

log = logging.getLogger(__name__)

F = TypeVar("F", bound=Callable[..., Any])

PUBLIC = "public"
TWILIO = "twilio-signature"


def _mark(view: F, guard: str) -> F:
    view.guard = guard  # type: ignore[attr-defined]
    return view


def public(view: F) -> F:
    """Deliberately open (health probes): says so, so the route walk accepts it."""
    return _mark(view, PUBLIC)


def signed_url(public_url: str) -> str:
    """The URL Twilio requested, as Twilio saw it: the configured public base
    (scheme and host as outside the TLS-terminating proxy) + path + raw query."""
    query = request.query_string.decode("latin-1")
    return public_url + request.path + (f"?{query}" if query else "")


def twilio_signature_valid(auth_token: str, public_url: str) -> bool:
    signature = request.headers.get(SIGNATURE_HEADER, "")
    if not signature:
        return False
    algorithm = get_signature_algorithm(request.headers.get(SIGNATURE_SETTINGS_HEADER))
    validator = RequestValidator(auth_token)
    return bool(validator.validate(signed_url(public_url), request.form, signature, algorithm))


def twilio_signed(view: F) -> F:
    """403 unless ``X-Twilio-Signature`` matches the request under the public URL."""

    @functools.wraps(view)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        settings = current_app.extensions["gateway"].settings
        if not twilio_signature_valid(settings.twilio_auth_token, settings.public_url):
            log.warning("rejected webhook with missing or invalid signature: %s", request.path)
            return Response("invalid signature\n", status=403, mimetype="text/plain")
        return view(*args, **kwargs)

    return _mark(cast(F, wrapper), TWILIO)


def _bearer_token() -> str | None:
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


def _match(token: str, candidates: Iterable[str]) -> str | None:
    """Constant-time comparison against every candidate (no early exit)."""
    found = None
    for candidate in candidates:
        if hmac.compare_digest(token.encode(), candidate.encode()):
            found = candidate
    return found


def _unauthorized(realm: str) -> Response:
    response = jsonify(error="unauthorized", detail="a valid bearer token is required")
    response.status_code = 401
    response.headers["WWW-Authenticate"] = f'Bearer realm="{realm}"'
    return response


def vehicle_token(view: F) -> F:
    """401 unless the request carries one of GATEWAY_VEHICLE_API_TOKENS."""

    @functools.wraps(view)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        settings = current_app.extensions["gateway"].settings
        token = _bearer_token()
        if token is None or _match(token, settings.vehicle_api_tokens) is None:
            return _unauthorized("vehicle")
        return view(*args, **kwargs)

    return _mark(cast(F, wrapper), "bearer:vehicle")


def agent_role(role: str) -> Callable[[F], F]:
    """401 without a valid agent token; 403 if the token lacks ``role``."""

    def decorate(view: F) -> F:
        @functools.wraps(view)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            tokens = current_app.extensions["gateway"].settings.agent_api_tokens
            token = _bearer_token()
            matched = _match(token, tokens) if token else None
            if matched is None:
                return _unauthorized("agent")
            roles = tokens[matched]
            if role not in roles and "supervisor" not in roles:
                response = jsonify(error="forbidden", detail=f"this token lacks the role {role!r}")
                response.status_code = 403
                return response
            g.agent = hmac.new(b"agent-id", matched.encode(), "sha256").hexdigest()[:12]
            return view(*args, **kwargs)

        return _mark(cast(F, wrapper), f"bearer:agent:{role}")

    return decorate


ADMIN = "bearer:admin"


def admin_token(view: F) -> F:
    """The admin API (enrolment, PINs, lockouts): 401 without a valid bearer token,
    403 for a token of another API (vehicle or agent); ``g.admin`` is the token's id."""

    @functools.wraps(view)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        settings = current_app.extensions["gateway"].settings
        token = _bearer_token()
        matched = _match(token, settings.admin_api_tokens) if token else None
        if matched is None:
            others = [*settings.vehicle_api_tokens, *settings.agent_api_tokens]
            if token and _match(token, others) is not None:
                response = jsonify(error="forbidden",
                                   detail="this token is not an admin API token")
                response.status_code = 403
                return response
            return _unauthorized("admin")
        g.admin = hmac.new(b"admin-id", matched.encode(), "sha256").hexdigest()[:12]
        return view(*args, **kwargs)

    return _mark(cast(F, wrapper), ADMIN)
