"""The owner-services audit trail: who did what to which vehicle, never a PIN."""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from gateway.store import TS, metadata

audit = sa.Table(
    "audit",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("at", TS, nullable=False),
    sa.Column("vin", sa.String(17), nullable=False, index=True),
    sa.Column("actor", sa.String(100), nullable=False),
    sa.Column("action", sa.String(40), nullable=False),
    sa.Column("detail", sa.JSON, nullable=False),
)


@dataclass(frozen=True)
class AuditEntry:
    id: int
    at: dt.datetime
    vin: str
    actor: str
    action: str
    detail: dict[str, Any]


def write_audit(
    conn: Connection,
    *,
    vin: str,
    actor: str,
    action: str,
    at: dt.datetime,
    detail: Mapping[str, Any] | None = None,
) -> None:
    """Append one audit row inside the caller's transaction (never put a PIN in ``detail``)."""
    conn.execute(
        audit.insert().values(
            at=at, vin=vin, actor=actor[:100], action=action, detail=dict(detail or {})
        )
    )
