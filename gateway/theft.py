"""Theft notification and tracking: what to tell the owner, the centre and the police, and when.

Alarm
    ``alarm_triggered`` creates, in one transaction, an SMS to the owner's registered
    phone (when there is one), a push to the owner's app (target ``vin:<VIN>``: the push
    service maps vehicles to installations) and an *escalation* to the assistance centre,
    due at the escalation deadline (``escalate_after``, ``GATEWAY_THEFT_ESCALATION_S``).
    Owner texts are in the owner's language (:mod:`gateway.owner_texts`).  The event's
    ``event_id`` makes this idempotent (``idempotency_key`` is ``<event_id>:<kind>``,
    unique).

Delivery (the notifier, :mod:`gateway.notify`, drives these functions)
    SMS and push rows are retried with backoff until delivered (``sent``), refused for
    good (``failed``: a 4xx such as Twilio 21211, invalid number), cancelled by the key,
    or their deadline -- the escalation's -- comes before the next try (``expired``).
    A sender *claims* a due row with a lease (a conditional UPDATE: one sender per row
    across processes), records the attempt before it sends (``attempts``, and for an
    SMS ``in_doubt``: the request may reach Twilio), and reports back with
    :func:`mark_sent` / :func:`mark_failed`; both only act on ``pending`` rows, so a row
    cancelled meanwhile stays cancelled.

Escalation
    At the deadline the escalation row becomes an outbox row of :mod:`gateway.delivery`
    (``theft_escalation``, with every owner channel's status, attempts and last error),
    in the same transaction that marks it sent; the outbox worker delivers it to
    ``POST {GATEWAY_ASSISTANCE_URL}/incidents`` with an ``Idempotency-Key``, never
    dropping it.  A disarm with the key cancels it like the rest.

Tracking
    :func:`start_tracking` switches tracking on and queues a ``police_notification`` to
    the centre through the same outbox, in one transaction; its key is derived from the
    tracking session (VIN, start time and the reference it started with), so a replayed
    request -- whatever reference it carries -- adds nothing and the centre gets one
    notification per session.
    :func:`stop_tracking` switches it off.  Both are audited.

Bodies carry no secret (no PIN, no lookup code) and only the end of the VIN for the owner.
"""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import sqlalchemy as sa
from sqlalchemy.engine import Connection
from sqlalchemy.exc import IntegrityError, SQLAlchemyError

from gateway.delivery import outbox
from gateway.errors import GatewayError, StoreError, ValidationError
from gateway.owner_texts import agent_text, owner_texts
from gateway.owners import UnknownVehicleError, Vehicles, vehicles, write_audit
from gateway.store import TS, Store, as_utc, insert_ignore, metadata, utcnow

NotificationKind = Literal["sms", "push", "escalation"]
NotificationStatus = Literal["pending", "sent", "cancelled", "failed", "expired"]
OWNER_CHANNELS = ("sms", "push")

#: owner messages (SMS, push) are retried this long, past the escalation: a message
#: that arrives late still tells the owner; the centre was told at the escalation
OWNER_GIVE_UP_AFTER = dt.timedelta(hours=24)

#: the escalation deadline when none is configured (``GATEWAY_THEFT_ESCALATION_S``)
DEFAULT_ESCALATION = dt.timedelta(minutes=10)

notifications = sa.Table(
    "notifications",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("vin", sa.String(17), nullable=False, index=True),
    sa.Column("kind", sa.String(16), nullable=False),
    sa.Column("target", sa.String(64), nullable=False),
    sa.Column("body", sa.Text, nullable=False),
    #: the push title (owner's language); None for SMS and escalation
    sa.Column("title", sa.String(100)),
    #: the language of the owner texts (en, de, sv, fr, ...)
    sa.Column("language", sa.String(8)),
    sa.Column("status", sa.String(16), nullable=False, default="pending"),
    sa.Column("created_at", TS, nullable=False),
    #: not before this time (now for sms/push, the deadline for the escalation)
    sa.Column("due_at", TS, nullable=False, index=True),
    #: sms/push: no attempt at or after this time (the escalation deadline)
    sa.Column("deadline_at", TS),
    #: a sender holds the row until then (one sender per row across processes)
    sa.Column("leased_until", TS),
    #: an SMS attempt may have reached Twilio without us seeing the answer
    sa.Column("in_doubt", sa.Boolean, nullable=False, default=False),
    sa.Column("sent_at", TS),
    sa.Column("cancelled_at", TS),
    sa.Column("cancel_reason", sa.String(200)),
    #: when the row became failed or expired
    sa.Column("given_up_at", TS),
    sa.Column("attempts", sa.Integer, nullable=False, default=0),
    sa.Column("last_error", sa.String(500)),
    #: HTTP status of the last failed attempt (None for a transport failure)
    sa.Column("last_status", sa.Integer),
    #: Twilio's message SID for an SMS; the outbox key for an escalation
    sa.Column("provider_ref", sa.String(64)),
    sa.Column("idempotency_key", sa.String(160), nullable=False, unique=True),
    sa.Column("alarm_event_id", sa.String(128), nullable=False, index=True),
)

ESCALATION_TARGET = "assistance-centre"

#: namespace of the outbox keys (UUIDv5) of escalations and police notifications
_OUTBOX_NAMESPACE = uuid.UUID("5b0d6f52-8f4e-4a43-9d0e-8f3c5a1e7a11")


class NotTrackingError(GatewayError):
    """``stop_tracking`` for a vehicle that is not being tracked."""

    def __init__(self, vin: str) -> None:
        super().__init__(f"vehicle {vin!r} is not being tracked")
        self.vin = vin


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


def outbox_key(kind: str, natural_key: str) -> str:
    """The outbox row key (36 characters) of a centre message derived from ``natural_key``."""
    return str(uuid.uuid5(_OUTBOX_NAMESPACE, f"{kind}:{natural_key}"))


# -- alarm ----------------------------------------------------------------------------


def on_alarm_triggered(
    *,
    store: Store,
    vehicles: Vehicles,
    vin: str,
    event_id: str,
    occurred_at: dt.datetime,
    now: dt.datetime,
    escalate_after: dt.timedelta = DEFAULT_ESCALATION,
    escalation_target: str = ESCALATION_TARGET,
) -> list[dict[str, Any]]:
    """Create the SMS, push and escalation for a theft alarm; a replay returns the stored rows.

    ValidationError if ``event_id`` is empty or was used for another vehicle;
    UnknownVehicleError if the VIN is not registered.
    """
    event_id = _event_id(event_id)
    if occurred_at.tzinfo is None or now.tzinfo is None:
        raise ValueError("occurred_at and now must be timezone-aware")
    if escalate_after <= dt.timedelta(0):
        raise ValueError("escalate_after must be positive")
    existing = notifications_for_event(store, event_id)
    if existing:
        return _same_vehicle(existing, vin)
    vehicle = vehicles.get(vin)
    if vehicle is None:
        raise UnknownVehicleError(vin)
    texts = owner_texts(vin=vehicle.vin, occurred_at=occurred_at, language=vehicle.language,
                        market=vehicle.market, sms_key=f"{event_id}:sms")
    deadline = now + escalate_after
    # the owner is still told after the centre was (an outage longer than the escalation
    # delay must not lose the SMS): owner messages are tried until OWNER_GIVE_UP_AFTER
    give_up = now + max(escalate_after, OWNER_GIVE_UP_AFTER)
    planned: list[dict[str, Any]] = []
    if vehicle.owner_phone:
        planned.append({"kind": "sms", "target": vehicle.owner_phone, "body": texts.sms,
                        "language": texts.language, "due_at": now, "deadline_at": give_up})
    planned.append({"kind": "push", "target": f"vin:{vehicle.vin}", "body": texts.push_body,
                    "title": texts.push_title, "language": texts.language, "due_at": now,
                    "deadline_at": give_up})
    planned.append({"kind": "escalation", "target": escalation_target,
                    "body": agent_text(vin=vehicle.vin, occurred_at=occurred_at),
                    "due_at": deadline, "deadline_at": deadline})
    try:
        with store.transaction() as conn:
            for values in planned:
                conn.execute(notifications.insert().values(
                    vin=vehicle.vin, status="pending", created_at=now, attempts=0,
                    in_doubt=False, idempotency_key=f"{event_id}:{values['kind']}",
                    alarm_event_id=event_id, **values))
            write_audit(
                conn, vin=vehicle.vin, actor=f"vehicle:{vehicle.vin}", action="theft_alarm",
                at=now,
                detail={
                    "event_id": event_id,
                    "occurred_at": occurred_at.isoformat(),
                    "notifications": [v["kind"] for v in planned],
                    "language": texts.language,
                    "escalation_at": deadline.isoformat(),
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

    Sent, failed or expired rows are left as they are.  One audit row
    (``notifications_cancelled``) records the event, the reason and what was
    cancelled, also when there was nothing left to cancel.  A send already on the
    wire cannot be called back; its result no longer changes the row.
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
                .values(status="cancelled", cancelled_at=now, cancel_reason=reason,
                        leased_until=None)
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
    """Pending rows that are due, oldest due first (leases not considered)."""
    query = (
        sa.select(notifications)
        .where(notifications.c.status == "pending", notifications.c.due_at <= now)
        .order_by(notifications.c.due_at, notifications.c.id)
        .limit(limit)
    )
    with store.begin() as conn:
        return [_as_dict(r) for r in conn.execute(query).all()]


# -- the sender's side ----------------------------------------------------------------


def _free(now: dt.datetime) -> sa.ColumnElement[bool]:
    return sa.or_(notifications.c.leased_until.is_(None), notifications.c.leased_until < now)


def claim_due(
    store: Store, *, now: dt.datetime, lease: dt.timedelta, limit: int = 50
) -> list[dict[str, Any]]:
    """Lease up to ``limit`` due pending rows, oldest due first; only one sender gets each."""
    with store.begin() as conn:
        due = conn.execute(
            sa.select(notifications.c.id)
            .where(notifications.c.status == "pending", notifications.c.due_at <= now, _free(now))
            .order_by(notifications.c.due_at, notifications.c.id)
            .limit(limit)
        ).scalars().all()
    claimed: list[dict[str, Any]] = []
    for row_id in due:
        with store.begin() as conn:
            row = conn.execute(
                notifications.update()
                .where(notifications.c.id == row_id, notifications.c.status == "pending",
                       _free(now))
                .values(leased_until=now + lease)
                .returning(*notifications.c)
            ).first()
        if row is not None:
            claimed.append(_as_dict(row))
    return claimed


def attempt_started(store: Store, id: int, *, in_doubt: bool) -> bool:
    """Count an attempt before it is made; ``in_doubt``: it may reach the provider.

    Written before the request, so a sender that dies mid-request leaves a row the
    next sender knows to check first.  False if the row is no longer pending.
    """
    values: dict[str, Any] = {"attempts": notifications.c.attempts + 1}
    if in_doubt:
        values["in_doubt"] = True
    with store.begin() as conn:
        return bool(conn.execute(
            notifications.update()
            .where(notifications.c.id == id, notifications.c.status == "pending")
            .values(**values)
        ).rowcount)


def mark_sent(
    store: Store, id: int, *, now: dt.datetime | None = None, provider_ref: str | None = None
) -> bool:
    """Record delivery; False if the row was no longer pending (e.g. cancelled meanwhile)."""
    now = now or utcnow()
    with store.begin() as conn:
        updated = conn.execute(
            notifications.update()
            .where(notifications.c.id == id, notifications.c.status == "pending")
            .values(status="sent", sent_at=now, leased_until=None, in_doubt=False,
                    provider_ref=provider_ref[:64] if provider_ref else None)
        ).rowcount
    return bool(updated)


def mark_failed(
    store: Store,
    id: int,
    error: str,
    *,
    permanent: bool,
    now: dt.datetime | None = None,
    retry_at: dt.datetime | None = None,
    in_doubt: bool = False,
    status: int | None = None,
) -> dict[str, Any] | None:
    """Record a failed attempt; returns the updated row, or None if it was not pending.

    ``permanent`` makes the row ``failed``.  Otherwise it is due again at
    ``retry_at`` -- unless that is at or after its deadline, which makes it
    ``expired`` now (no attempt after the deadline).  ``in_doubt`` records whether
    this attempt may have reached the provider.
    """
    now = now or utcnow()
    if not permanent and retry_at is None:
        raise ValueError("a transient failure needs retry_at")
    values: dict[str, Any] = {"last_error": error[:500], "last_status": status,
                              "leased_until": None, "in_doubt": in_doubt}
    if permanent:
        values.update(status="failed", given_up_at=now)
    else:
        assert retry_at is not None
        late = sa.and_(notifications.c.deadline_at.is_not(None),
                       notifications.c.deadline_at <= sa.literal(retry_at, TS))
        values["status"] = sa.case((late, "expired"), else_="pending")
        values["given_up_at"] = sa.case((late, sa.literal(now, TS)), else_=None)
        values["due_at"] = sa.case((late, notifications.c.due_at),
                                   else_=sa.literal(retry_at, TS))
    with store.begin() as conn:
        row = conn.execute(
            notifications.update()
            .where(notifications.c.id == id, notifications.c.status == "pending")
            .values(**values)
            .returning(*notifications.c)
        ).first()
    return _as_dict(row) if row is not None else None


def mark_expired(store: Store, id: int, *, now: dt.datetime) -> bool:
    """A pending row whose deadline passed before it could be tried again."""
    with store.begin() as conn:
        return bool(conn.execute(
            notifications.update()
            .where(notifications.c.id == id, notifications.c.status == "pending")
            .values(status="expired", given_up_at=now, leased_until=None)
        ).rowcount)


# -- escalation -----------------------------------------------------------------------


def _iso(value: Any) -> Any:
    value = as_utc(value) if isinstance(value, dt.datetime) else value
    return value.isoformat() if isinstance(value, dt.datetime) else value


def channel_report(row: Mapping[str, Any], *, now: dt.datetime) -> dict[str, Any]:
    """One owner channel as the centre sees it in an escalation."""
    leased = as_utc(row["leased_until"])
    return {
        "channel": row["kind"],
        "target": row["target"],
        "status": row["status"],
        "delivered": row["status"] == "sent",
        "in_flight": row["status"] == "pending" and leased is not None and leased > now,
        "attempts": row["attempts"],
        "last_error": row["last_error"],
        "last_status": row["last_status"],
        "sent_at": _iso(row["sent_at"]),
        "message_id": row["provider_ref"],
        "language": row["language"],
    }


def escalation_payload(escalation: Mapping[str, Any], channels: Sequence[Mapping[str, Any]],
                       *, key: str, now: dt.datetime) -> dict[str, Any]:
    """What the centre receives at the deadline: the alarm and what reached the owner."""
    reports = [channel_report(c, now=now) for c in channels]
    failed = [r for r in reports if not r["delivered"]]
    summary = str(escalation["body"])
    if failed:
        summary += " Not delivered to the owner: " + "; ".join(
            f"{r['channel'].upper()} "
            f"{'still retried' if r['status'] == 'pending' else r['status']} "
            f"after {r['attempts']} attempt(s)"
            + (f" (last error: {r['last_error']})" if r["last_error"] else "")
            for r in failed) + "."
    if not channels:
        summary += " The owner has no channel to be notified on."
    return {
        "type": "theft_escalation",
        "incident_id": key,
        "vin": escalation["vin"],
        "alarm_event_id": escalation["alarm_event_id"],
        "alarm_received_at": _iso(escalation["created_at"]),
        "deadline_at": _iso(escalation["due_at"]),
        "escalated_at": now.isoformat(),
        "summary": summary,
        "owner_notifications": reports,
        "failed_channels": [r["channel"] for r in failed],
    }


def escalate(store: Store, escalation: Mapping[str, Any], *, now: dt.datetime) -> str | None:
    """Hand a due escalation to the delivery outbox, with what reached the owner.

    In one transaction: the escalation becomes ``sent`` with the outbox key as
    ``provider_ref``; the outbox row is inserted (once per key), reporting each owner
    channel (a pending one is still retried after the escalation).
    Returns the outbox key, or None if the escalation was no longer pending
    (cancelled by the key meanwhile).
    """
    key = outbox_key("theft_escalation", str(escalation["idempotency_key"]))
    event_id = escalation["alarm_event_id"]
    with store.begin() as conn:
        won = conn.execute(
            notifications.update()
            .where(notifications.c.id == escalation["id"], notifications.c.status == "pending")
            .values(status="sent", sent_at=now, leased_until=None, provider_ref=key,
                    attempts=notifications.c.attempts + 1)
        ).rowcount
        if not won:
            return None
        # owner channels still pending keep being retried (until OWNER_GIVE_UP_AFTER):
        # the centre is told now, the owner as soon as the channel recovers
        channels = [_as_dict(r) for r in conn.execute(
            sa.select(notifications)
            .where(notifications.c.alarm_event_id == event_id,
                   notifications.c.kind.in_(OWNER_CHANNELS))
            .order_by(notifications.c.id)).all()]
        payload = escalation_payload(escalation, channels, key=key, now=now)
        insert_ignore(conn, outbox, _outbox_values(key, payload, now))
        write_audit(conn, vin=str(escalation["vin"]), actor="gateway:notifier",
                    action="theft_escalated", at=now,
                    detail={"event_id": event_id, "outbox_key": key,
                            "failed_channels": payload["failed_channels"]})
    return key


def _outbox_values(key: str, payload: Mapping[str, Any], now: dt.datetime) -> dict[str, Any]:
    return {"incident_id": key, "payload": dict(payload), "status": "pending",
            "created_at": now, "next_attempt_at": now, "attempts": 0}


def outbox_row(store: Store, key: str) -> dict[str, Any] | None:
    """The outbox row of a centre message (escalation, police notification), if any."""
    with store.begin() as conn:
        row = conn.execute(sa.select(outbox).where(outbox.c.incident_id == key)).first()
    return _as_dict(row) if row is not None else None


# -- tracking and the police ----------------------------------------------------------


def check_police_reference(value: object) -> str:
    """A police report reference: 1 to 100 characters (ValidationError otherwise)."""
    text = value.strip() if isinstance(value, str) else ""
    if not text:
        raise ValidationError({"police_reference": "required: a non-empty string"})
    if len(text) > 100:
        raise ValidationError({"police_reference": "at most 100 characters"})
    return text


def stop_reason(body: object) -> str | None:
    """The optional ``reason`` of a stop request (at most 200 characters)."""
    if body is None:
        return None
    if not isinstance(body, dict):
        raise ValidationError({"body": "must be a JSON object"})
    reason = body.get("reason")
    if reason is None:
        return None
    if not isinstance(reason, str) or len(reason.strip()) > 200:
        raise ValidationError({"reason": "a string of at most 200 characters"})
    return reason.strip() or None


@dataclass(frozen=True)
class TrackingStart:
    #: True when this request switched tracking on (False: it was already on)
    started: bool
    police_reference: str
    #: the outbox key of the session's police notification
    notification_key: str
    #: the outbox row's status: pending, delivered or failed
    notification_status: str


def _actor(actor: str) -> str:
    text = actor.strip() if isinstance(actor, str) else ""
    if not text or len(text) > 100:
        raise ValidationError({"actor": "required, at most 100 characters"})
    return text


def start_tracking(store: Store, *, vin: str, actor: str, police_reference: str,
                   now: dt.datetime) -> TrackingStart:
    """Switch tracking on and queue the session's ``police_notification`` to the centre.

    One transaction (:func:`start_tracking_in`): the registry change (only if tracking
    was off: the first reference stands), the audit row and the outbox row (``INSERT
    ... ON CONFLICT DO NOTHING`` under a key of the VIN, the session's start time and
    its reference).  A repeat while tracking changes nothing, is audited, and inserts
    nothing new -- it only re-creates the notification of a session started before
    notifications existed.  UnknownVehicleError for an unknown VIN.
    """
    with store.begin() as conn:
        return start_tracking_in(conn, vin=vin, actor=actor,
                                 police_reference=police_reference, now=now)


def start_tracking_in(conn: Connection, *, vin: str, actor: str, police_reference: str,
                      now: dt.datetime) -> TrackingStart:
    """:func:`start_tracking` inside the caller's transaction (the car's confirmation of
    ``start_tracking`` applies it in the transaction that confirms the command)."""
    vin = vin.strip().upper()
    actor = _actor(actor)
    reference = check_police_reference(police_reference)
    changed = conn.execute(
        vehicles.update()
        .where(vehicles.c.vin == vin, vehicles.c.tracking.is_(False))
        .values(tracking=True, tracking_started_by=actor, tracking_police_reference=reference,
                tracking_started_at=now, updated_at=now)
    ).rowcount
    car = conn.execute(sa.select(vehicles).where(vehicles.c.vin == vin)).first()
    if car is None:
        raise UnknownVehicleError(vin)
    started_at = as_utc(car.tracking_started_at) or now
    stored_reference = str(car.tracking_police_reference or reference)
    key = outbox_key("police_notification",
                     f"{vin}:{started_at.isoformat()}:{stored_reference}")
    alarm = conn.execute(
        sa.select(notifications.c.alarm_event_id)
        .where(notifications.c.vin == vin)
        .order_by(notifications.c.id.desc()).limit(1)
    ).scalar()
    payload = {
        "type": "police_notification",
        "incident_id": key,
        "vin": vin,
        "market": car.market,
        "police_reference": stored_reference,
        "tracking": True,
        "tracking_started_at": started_at.isoformat(),
        "requested_by": car.tracking_started_by,
        "alarm_event_id": alarm,
    }
    insert_ignore(conn, outbox, _outbox_values(key, payload, now))
    status = conn.execute(
        sa.select(outbox.c.status).where(outbox.c.incident_id == key)).scalar_one()
    write_audit(conn, vin=vin, actor=actor, action="tracking_started", at=now,
                detail={"police_reference": reference, "changed": bool(changed),
                        "police_notification": key})
    return TrackingStart(started=bool(changed), police_reference=stored_reference,
                         notification_key=key, notification_status=str(status))


def session_notification(store: Store, *, vin: str) -> TrackingStart:
    """The police notification of the vehicle's tracking session (the current one, or
    the last); nothing is written.  UnknownVehicleError for an unknown VIN,
    NotTrackingError for a vehicle never tracked."""
    vin = vin.strip().upper()
    with store.begin() as conn:
        car = conn.execute(sa.select(vehicles).where(vehicles.c.vin == vin)).first()
        if car is None:
            raise UnknownVehicleError(vin)
        started_at = as_utc(car.tracking_started_at)
        if started_at is None or not car.tracking_police_reference:
            raise NotTrackingError(vin)
        reference = str(car.tracking_police_reference)
        key = outbox_key("police_notification", f"{vin}:{started_at.isoformat()}:{reference}")
        status = conn.execute(
            sa.select(outbox.c.status).where(outbox.c.incident_id == key)).scalar()
    return TrackingStart(started=bool(car.tracking), police_reference=reference,
                         notification_key=key, notification_status=str(status or "pending"))


def stop_tracking(store: Store, *, vin: str, actor: str, reason: str | None,
                  now: dt.datetime) -> None:
    """Switch tracking off, audited with the session it ends (:func:`stop_tracking_in`).

    UnknownVehicleError for an unknown VIN; NotTrackingError if tracking is off.
    The session's fields (who started it, the police reference) stay on the vehicle
    for reference until the next start.
    """
    with store.begin() as conn:
        stop_tracking_in(conn, vin=vin, actor=actor, reason=reason, now=now)


def stop_tracking_in(conn: Connection, *, vin: str, actor: str, reason: str | None,
                     now: dt.datetime) -> None:
    """:func:`stop_tracking` inside the caller's transaction."""
    vin = vin.strip().upper()
    actor = _actor(actor)
    car = conn.execute(sa.select(vehicles).where(vehicles.c.vin == vin)).first()
    if car is None:
        raise UnknownVehicleError(vin)
    changed = conn.execute(
        vehicles.update()
        .where(vehicles.c.vin == vin, vehicles.c.tracking.is_(True))
        .values(tracking=False, updated_at=now)
    ).rowcount
    if not changed:
        raise NotTrackingError(vin)
    write_audit(conn, vin=vin, actor=actor, action="tracking_stopped", at=now,
                detail={"police_reference": car.tracking_police_reference,
                        "started_at": _iso(car.tracking_started_at),
                        "started_by": car.tracking_started_by, "reason": reason})


def as_public(row: Mapping[str, Any]) -> dict[str, Any]:
    """A notification row for the APIs (ISO timestamps; no lease bookkeeping)."""
    return {k: (v.isoformat() if isinstance(v, dt.datetime) else v) for k, v in row.items()
            if k != "leased_until"}
