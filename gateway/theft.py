"""Theft notification state: what to tell the owner and the agents, and when to stop.

An ``alarm_triggered`` event creates, in one transaction, an SMS to the
owner's registered phone (when there is one), a push to the owner's app
(target ``vin:<VIN>``: the push service maps vehicles to app installations) and
an *escalation*: an agent follow-up that becomes due ``escalate_after`` later.
The event's ``event_id`` makes this idempotent (``idempotency_key`` is
``<event_id>:<kind>``, unique).  A later ``alarm_disarmed`` with the key
cancels every pending notification and escalation of the car, records the
reason on each row and writes one audit row.

Senders poll :func:`pending_notifications` and report back with
:func:`mark_sent` / :func:`mark_failed`; both only act on ``pending`` rows, so
a row cancelled meanwhile stays cancelled.  Bodies carry no secret (no PIN,
no lookup code) and only the end of the VIN for the owner.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping
from typing import Any, Literal

import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError, SQLAlchemyError

from gateway.errors import StoreError, ValidationError
from gateway.owners import UnknownVehicleError, Vehicles, write_audit
from gateway.store import TS, Store, metadata, utcnow

NotificationKind = Literal["sms", "push", "escalation"]
NotificationStatus = Literal["pending", "sent", "cancelled", "failed"]

notifications = sa.Table(
    "notifications",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("vin", sa.String(17), nullable=False, index=True),
    sa.Column("kind", sa.String(16), nullable=False),
    sa.Column("target", sa.String(64), nullable=False),
    sa.Column("body", sa.Text, nullable=False),
    sa.Column("status", sa.String(16), nullable=False, default="pending"),
    sa.Column("created_at", TS, nullable=False),
    #: not before this time (now for sms/push, the follow-up time for escalations)
    sa.Column("due_at", TS, nullable=False, index=True),
    sa.Column("sent_at", TS),
    sa.Column("cancelled_at", TS),
    sa.Column("cancel_reason", sa.String(200)),
    sa.Column("attempts", sa.Integer, nullable=False, default=0),
    sa.Column("last_error", sa.String(500)),
    sa.Column("idempotency_key", sa.String(160), nullable=False, unique=True),
    sa.Column("alarm_event_id", sa.String(128), nullable=False, index=True),
)

ESCALATION_TARGET = "assistance-centre"


def _as_dict(row: sa.Row[Any]) -> dict[str, Any]:
    data = dict(row._mapping)
    for key, value in data.items():
        if isinstance(value, dt.datetime) and value.tzinfo is None:
            data[key] = value.replace(tzinfo=dt.UTC)
    return data


def _event_id(event_id: object) -> str:
    if not isinstance(event_id, str) or not event_id.strip() or len(event_id) > 128:
        raise ValidationError({"event_id": "required, at most 128 characters"})
    return event_id


def _bodies(vin: str, occurred_at: dt.datetime) -> dict[str, str]:
    at = occurred_at.astimezone(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    return {
        "sms": (
            f"Theft alarm on your car (VIN ending {vin[-6:]}) at {at}. "
            "If this was not you, call the assistance centre."
        ),
        "push": f"Theft alarm on your car at {at}. Open the app to see where it is.",
        "escalation": (
            f"Theft alarm on VIN {vin} at {at}: not disarmed with the key. "
            "Call the owner to confirm."
        ),
    }


def on_alarm_triggered(
    *,
    store: Store,
    vehicles: Vehicles,
    vin: str,
    event_id: str,
    occurred_at: dt.datetime,
    now: dt.datetime,
    escalate_after: dt.timedelta = dt.timedelta(minutes=10),
    escalation_target: str = ESCALATION_TARGET,
) -> list[dict[str, Any]]:
    """Create the SMS, push and escalation for a theft alarm; a replay returns the stored rows.

    ValidationError if ``event_id`` is empty or was used for another vehicle;
    UnknownVehicleError if the VIN is not registered.
    """
    event_id = _event_id(event_id)
    if occurred_at.tzinfo is None or now.tzinfo is None:
        raise ValueError("occurred_at and now must be timezone-aware")
    existing = notifications_for_event(store, event_id)
    if existing:
        return _same_vehicle(existing, vin)
    vehicle = vehicles.get(vin)
    if vehicle is None:
        raise UnknownVehicleError(vin)
    bodies = _bodies(vehicle.vin, occurred_at)
    planned: list[tuple[str, str, dt.datetime]] = []
    if vehicle.owner_phone:
        planned.append(("sms", vehicle.owner_phone, now))
    planned.append(("push", f"vin:{vehicle.vin}", now))
    planned.append(("escalation", escalation_target, now + escalate_after))
    try:
        with store.engine.begin() as conn:
            for kind, target, due_at in planned:
                conn.execute(
                    notifications.insert().values(
                        vin=vehicle.vin,
                        kind=kind,
                        target=target,
                        body=bodies[kind],
                        status="pending",
                        created_at=now,
                        due_at=due_at,
                        attempts=0,
                        idempotency_key=f"{event_id}:{kind}",
                        alarm_event_id=event_id,
                    )
                )
            write_audit(
                conn, vin=vehicle.vin, actor=f"vehicle:{vehicle.vin}", action="theft_alarm",
                at=now,
                detail={
                    "event_id": event_id,
                    "occurred_at": occurred_at.isoformat(),
                    "notifications": [kind for kind, _, _ in planned],
                },
            )
    except IntegrityError:  # the same event, processed by another request meanwhile
        existing = notifications_for_event(store, event_id)
        if not existing:
            raise StoreError("theft notification insert conflicted") from None
        return _same_vehicle(existing, vin)
    except SQLAlchemyError as exc:
        raise StoreError(f"database error: {type(exc).__name__}") from exc
    return notifications_for_event(store, event_id)


def _same_vehicle(rows: list[dict[str, Any]], vin: str) -> list[dict[str, Any]]:
    if any(r["vin"] != vin.strip().upper() for r in rows):
        raise ValidationError({"event_id": "already used for another vehicle"})
    return rows


def on_alarm_disarmed(
    *, store: Store, vin: str, event_id: str, now: dt.datetime, reason: str
) -> list[dict[str, Any]]:
    """Cancel every pending notification and escalation of ``vin``; returns the cancelled rows.

    Sent or failed rows are left as they are.  One audit row
    (``notifications_cancelled``) records the event, the reason and what was
    cancelled, also when there was nothing left to cancel.
    """
    event_id = _event_id(event_id)
    reason = reason.strip() if isinstance(reason, str) else ""
    if not reason:
        raise ValidationError({"reason": "required"})
    reason = reason[:200]
    vin = vin.strip().upper()
    with store.begin() as conn:
        cancelled = [
            _as_dict(r)
            for r in conn.execute(
                notifications.update()
                .where(notifications.c.vin == vin, notifications.c.status == "pending")
                .values(status="cancelled", cancelled_at=now, cancel_reason=reason)
                .returning(*notifications.c)
            ).all()
        ]
        cancelled.sort(key=lambda r: int(r["id"]))
        write_audit(
            conn, vin=vin, actor=f"vehicle:{vin}", action="notifications_cancelled", at=now,
            detail={
                "event_id": event_id,
                "reason": reason,
                "cancelled": [{"id": r["id"], "kind": r["kind"]} for r in cancelled],
            },
        )
    return cancelled


def notifications_for_event(store: Store, event_id: str) -> list[dict[str, Any]]:
    query = (
        sa.select(notifications)
        .where(notifications.c.alarm_event_id == event_id)
        .order_by(notifications.c.id)
    )
    with store.begin() as conn:
        return [_as_dict(r) for r in conn.execute(query).all()]


def notifications_for(store: Store, vin: str) -> list[dict[str, Any]]:
    query = sa.select(notifications).where(notifications.c.vin == vin).order_by(notifications.c.id)
    with store.begin() as conn:
        return [_as_dict(r) for r in conn.execute(query).all()]


def pending_notifications(
    store: Store, *, now: dt.datetime, limit: int = 100
) -> list[dict[str, Any]]:
    """Pending rows that are due, oldest due first."""
    query = (
        sa.select(notifications)
        .where(notifications.c.status == "pending", notifications.c.due_at <= now)
        .order_by(notifications.c.due_at, notifications.c.id)
        .limit(limit)
    )
    with store.begin() as conn:
        return [_as_dict(r) for r in conn.execute(query).all()]


def mark_sent(store: Store, id: int, *, now: dt.datetime | None = None) -> bool:
    """Record delivery; False if the row was no longer pending (e.g. cancelled meanwhile)."""
    now = now or utcnow()
    with store.begin() as conn:
        updated = conn.execute(
            notifications.update()
            .where(notifications.c.id == id, notifications.c.status == "pending")
            .values(status="sent", sent_at=now, attempts=notifications.c.attempts + 1)
        ).rowcount
    return bool(updated)


def mark_failed(
    store: Store,
    id: int,
    error: str,
    *,
    permanent: bool,
    now: dt.datetime | None = None,
    max_attempts: int = 5,
    retry_after: dt.timedelta = dt.timedelta(minutes=1),
) -> dict[str, Any] | None:
    """Record a failed delivery attempt.

    A permanent error, or the ``max_attempts``-th failure, makes the row
    ``failed``; otherwise it stays ``pending`` and is due again after
    ``retry_after``.  Returns the updated row, or None if it was not pending.
    """
    now = now or utcnow()
    attempts = notifications.c.attempts + 1
    values: dict[str, Any] = {"attempts": attempts, "last_error": error[:500]}
    if permanent:
        values["status"] = "failed"
    else:
        give_up = attempts >= max_attempts
        values["status"] = sa.case((give_up, "failed"), else_="pending")
        values["due_at"] = sa.case(
            (give_up, notifications.c.due_at), else_=sa.literal(now + retry_after, TS)
        )
    with store.begin() as conn:
        row = conn.execute(
            notifications.update()
            .where(notifications.c.id == id, notifications.c.status == "pending")
            .values(**values)
            .returning(*notifications.c)
        ).first()
    return _as_dict(row) if row is not None else None


def as_public(row: Mapping[str, Any]) -> dict[str, Any]:
    """A notification row for the agent API (ISO timestamps)."""
    return {k: (v.isoformat() if isinstance(v, dt.datetime) else v) for k, v in row.items()}
