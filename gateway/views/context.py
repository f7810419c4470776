"""A view's services: what the composition root built for the app serving the request.

:func:`gateway.app.create_app` keeps them in ``app.extensions["gateway"]``; every view
reads them here, so no view imports :mod:`gateway.app` (imports run one way).
"""

from __future__ import annotations

from flask import current_app

from gateway.services import Services


def services() -> Services:
    """The current app's :class:`~gateway.services.Services` (in a request or app context)."""
    svc: Services = current_app.extensions["gateway"]
    return svc
