"""``GET /openapi.json``: the OpenAPI 3.1 document of the gateway's APIs (open, like the
health probes: it holds no caller data and no secret)."""

from __future__ import annotations

from typing import Any

from flask import Blueprint, current_app, jsonify

from gateway.schemas.openapi import TWILIO_BLUEPRINTS, openapi_document
from gateway.security import public

bp = Blueprint("openapi", __name__)


@bp.get("/openapi.json")
@public
def openapi() -> Any:
    webhooks = [(rule.rule, rule.endpoint) for rule in current_app.url_map.iter_rules()
                if rule.endpoint.split(".", 1)[0] in TWILIO_BLUEPRINTS]
    return jsonify(openapi_document(webhooks))
