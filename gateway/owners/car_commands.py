"""Commands confirmed by the car: immobilise, reactivate, unlock, start and stop tracking.

Every command that changes what the car does takes one path, :class:`CarCommands`:

1. **Validate everything first**: the command service is configured, the VIN is
   registered, references and actor are well-formed, the owner's PIN checks out.
   Nothing is recorded or sent for an invalid request.
2. **Record it** as a ``pending`` row of the durable queue (:mod:`gateway.commands`)
   under one idempotency key per logical request, with the ``<command>_requested``
   audit entry, in one transaction.  A replayed request finds the row and records
   nothing.  The key names the *episode* (:func:`episode_key`): immobilise after the
   last reactivation, reactivate the current immobilisation, start tracking after the
   last session, stop the current session, unlock during one call.  After a failure
   (the car rejected it, the budget ran out) the next request of the same episode gets
   a new key, ``<key>#<id of the failed row>``, so it is sent again.
3. **Send it at once** from the request (:meth:`CommandQueue.send_now
   <gateway.commands.CommandQueue.send_now>`: the request leases the row, so the
   worker thread never sends it at the same time), under the adapter's budget.  The
   row is made due for the worker only :data:`WORKER_GRACE_S` later.
4. **Change the registry only on the car's acknowledgement**, in the transaction that
   confirms the row (:func:`apply_settled`, the queue's ``on_settled`` hook): the car's
   synchronous ``confirmed`` (``executed``, ``done``, ...) or, later, its
   ``command_result`` (:meth:`CarCommands.command_result`).  Whoever confirms the row
   -- the request, the worker, the car's report -- applies the change, exactly once,
   audited.  A confirmation that arrives after the episode moved on (the car was
   reactivated and immobilised again meanwhile) changes nothing and is audited as stale.

**"accepted" is not an acknowledgement.**  The vehicle command service answering
``accepted`` has taken the command; the car has not executed it.  The row is ``sent``,
the registry unchanged, until the car's ``command_result``.  A car that does not report
within the queue's confirmation window (``GATEWAY_COMMAND_CONFIRM_S``) fails the row
(audited ``<command>_failed``; the registry stays unchanged, and the next request of the
episode is sent again under a new key).  Its report may still come: ``ok`` confirms the
failed row and applies the change then, like any confirmation (:func:`apply_settled`),
so the registry ends as the car reports; the audit shows the failure, then the change.

**Unreachable** (timeouts, 429/5xx): the registry is unchanged, the row stays
``pending`` and the queue worker retries it with the same key until the queue's budget
(``budget_s`` after the request) runs out.  A new request of the same episode sends
the pending row again at once.  An **unlock** is the exception: it is only wanted
while the owner stands at the car on the phone, so an unlock the car did not take at
once is cancelled, never sent later.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from gateway import theft
from gateway.commands import CommandQueue, enqueue_command, vehicle_commands
from gateway.errors import GatewayError, ValidationError
from gateway.owners.audit import write_audit
from gateway.owners.pins import PinCheck
from gateway.owners.records import (
    UnknownVehicleError,
    Vehicle,
    checked_actor,
    normal_vin,
    utc,
    vehicles,
)
from gateway.owners.records import reference as reference_text
from gateway.owners.registry import Vehicles
from gateway.store import as_utc

#: the row's params entry with the gateway's own notes (never sent to the car)
NOTES = "_gateway"
#: a request's row is due for the worker only this long after it was recorded
WORKER_GRACE_S = 30.0
#: how far back, and how many, settled commands the agent API shows with a vehicle
RECENT_S = 86400
RECENT_MAX = 10
#: the audit action written when the car confirms each command
CONFIRMED_ACTIONS = {"immobilise": "immobilise", "reactivate": "reactivate",
                     "unlock": "unlock", "start_tracking": "tracking_started",
                     "stop_tracking": "tracking_stopped"}
#: the vehicle column whose value marks each command's episode (unlock: the call)
EPISODE_COLUMNS = {"immobilise": "reactivated_at", "reactivate": "immobilised_at",
                   "start_tracking": "tracking_started_at",
                   "stop_tracking": "tracking_started_at"}


class CommandServiceMissingError(GatewayError):
    """No vehicle command service is configured (``GATEWAY_VEHICLE_COMMAND_URL``)."""


class AlreadyTrackingError(GatewayError):
    """``start_tracking`` for a vehicle that is being tracked: nothing to send (a repeat
    is the tracking session's own business, :func:`gateway.theft.start_tracking`)."""


@dataclass(frozen=True)
class CommandRequest:
    """What one request for a car command came to."""

    #: the ``vehicle_commands`` row after this request
    row: Mapping[str, Any]
    #: the vehicle as the registry has it after this request
    vehicle: Vehicle
    #: True when this request recorded the row (False: a replay or retry found it)
    created: bool

    @property
    def status(self) -> str:
        """``confirmed`` (acknowledged, registry changed), ``sent`` (taken by the command
        service, awaiting the car), ``pending`` (unreachable, retried), ``failed``,
        ``cancelled`` (an unlock the car did not take at once)."""
        return str(self.row["status"])


@dataclass(frozen=True)
class Reactivation:
    check: PinCheck
    vehicle: Vehicle
    #: None: no command (the PIN was refused, or the car is not immobilised)
    request: CommandRequest | None = None

    @property
    def ok(self) -> bool:
        return self.check.ok


def episode_marker(vehicle: Mapping[str, Any] | Vehicle, command: str) -> str:
    """The value that tells this command's episodes apart (``first`` before any)."""
    column = EPISODE_COLUMNS[command]
    value = as_utc(vehicle[column] if isinstance(vehicle, Mapping)
                   else getattr(vehicle, column))
    return value.astimezone(dt.UTC).isoformat() if value is not None else "first"


def episode_key(vehicle: Vehicle, command: str, call: str | None = None) -> str:
    """The idempotency key of ``command`` for the vehicle's current episode (unlock:
    for the call ``call``)."""
    if command == "unlock":
        return f"unlock:{vehicle.vin}:{call}"
    return f"{command}:{vehicle.vin}:{episode_marker(vehicle, command)}"


def command_view(row: Mapping[str, Any]) -> dict[str, Any]:
    """A command row for the APIs (no params, no lease bookkeeping)."""
    result = row["result"] or {}
    return {"id": row["id"], "key": row["key"], "command": row["command"],
            "status": row["status"], "attempts": row["attempts"],
            "last_error": row["last_error"], "created_at": row["created_at"].isoformat(),
            "updated_at": row["updated_at"].isoformat(),
            "next_attempt_at": row["next_attempt_at"].isoformat()
            if row["status"] == "pending" else None,
            "command_id": str(result["command_id"]) if result.get("command_id") else None}


class CarCommands:
    """The one path for commands the car must confirm (see the module)."""

    def __init__(self, queue: CommandQueue, registry: Vehicles, *, wait_s: float = 5.0) -> None:
        self.queue = queue
        self.registry = registry
        #: how long a request waits for a send the worker has in flight
        self.wait_s = wait_s

    def _now(self) -> dt.datetime:
        return dt.datetime.fromtimestamp(self.queue.clock(), tz=dt.UTC)

    def _vehicle(self, vin: str) -> Vehicle:
        vehicle = self.registry.get(vin)
        if vehicle is None:
            raise UnknownVehicleError(normal_vin(vin))
        return vehicle

    def _ready(self, vin: str, actor: str) -> tuple[Vehicle, str]:
        if self.queue.commands is None:
            raise CommandServiceMissingError(
                "no vehicle command service is configured (GATEWAY_VEHICLE_COMMAND_URL)")
        return self._vehicle(vin), checked_actor(actor)

    # -- the commands ------------------------------------------------------------------

    def immobilise(self, vin: str, *, actor: str, authority_reference: str) -> CommandRequest:
        errors: dict[str, str] = {}
        reference = reference_text(authority_reference, "authority_reference", errors)
        if errors:
            raise ValidationError(errors)
        vehicle, actor = self._ready(vin, actor)
        return self._request(vehicle, "immobilise", actor=actor,
                             params={"authority_reference": reference},
                             notes={"authority_reference": reference})

    def reactivate(self, vin: str, *, actor: str, pin: str) -> Reactivation:
        """Only with the owner's PIN, checked first (a wrong one counts towards the
        lockout and sends nothing); a car that is not immobilised gets no command."""
        vehicle, actor = self._ready(vin, actor)
        check = self.registry.verify_pin(vehicle.vin, pin, actor=actor)
        vehicle = self._vehicle(vehicle.vin)
        if not check.ok or not vehicle.immobilised:
            return Reactivation(check=check, vehicle=vehicle)
        return Reactivation(check=check, vehicle=vehicle,
                            request=self._request(vehicle, "reactivate", actor=actor))

    def unlock(self, vin: str, *, actor: str, call: str, relock_after_s: int) -> CommandRequest:
        """Unlock for the owner on the phone (``call``: its CallSid; the PIN was checked
        by the caller).  Not taken by the car at once: cancelled, never sent later."""
        if not call or len(call) > 64:
            raise ValidationError({"call": "required, at most 64 characters"})
        if not isinstance(relock_after_s, int) or relock_after_s <= 0:
            raise ValidationError({"relock_after_s": "a positive whole number of seconds"})
        vehicle, actor = self._ready(vin, actor)
        request = self._request(vehicle, "unlock", actor=actor, call=call,
                                params={"relock_after_s": relock_after_s})
        if request.status == "pending" and self.queue.cancel(str(request.row["key"])):
            with self.queue.store.begin() as conn:
                write_audit(conn, vin=vehicle.vin, actor=actor, action="unlock_failed",
                            at=self._now(),
                            detail={"key": request.row["key"], "cancelled": True,
                                    "error": str(request.row["last_error"] or "")[:200]})
            row = self.queue.get(str(request.row["key"]))
            request = CommandRequest(row=row or request.row, vehicle=request.vehicle,
                                     created=request.created)
        return request

    def start_tracking(self, vin: str, *, actor: str, police_reference: str) -> CommandRequest:
        reference = theft.check_police_reference(police_reference)
        vehicle, actor = self._ready(vin, actor)
        if vehicle.tracking:
            raise AlreadyTrackingError(f"vehicle {vehicle.vin} is being tracked")
        return self._request(vehicle, "start_tracking", actor=actor,
                             notes={"police_reference": reference})

    def stop_tracking(self, vin: str, *, actor: str, reason: str | None) -> CommandRequest:
        """NotTrackingError if the vehicle is not being tracked (nothing is sent)."""
        vehicle, actor = self._ready(vin, actor)
        if not vehicle.tracking:
            raise theft.NotTrackingError(vehicle.vin)
        return self._request(vehicle, "stop_tracking", actor=actor, notes={"reason": reason})

    # -- the path ----------------------------------------------------------------------

    def _request(self, vehicle: Vehicle, command: str, *, actor: str,
                 params: Mapping[str, Any] | None = None,
                 notes: Mapping[str, Any] | None = None,
                 call: str | None = None) -> CommandRequest:
        base = episode_key(vehicle, command, call)
        episode = None if command == "unlock" else episode_marker(vehicle, command)
        body = {**(params or {}),
                NOTES: {"actor": actor, "episode": episode, **(notes or {})}}
        key = base
        while True:
            now = self._now()
            with self.queue.store.begin() as conn:
                created = enqueue_command(conn, key=key, command=command, vin=vehicle.vin,
                                          msisdn=None, params=body, now=now)
                if created:  # the worker leaves it to this request for a while
                    conn.execute(vehicle_commands.update()
                                 .where(vehicle_commands.c.key == key)
                                 .values(next_attempt_at=now + dt.timedelta(
                                     seconds=WORKER_GRACE_S)))
                    write_audit(conn, vin=vehicle.vin, actor=actor,
                                action=f"{command}_requested", at=now,
                                detail={"key": key, **(notes or {})})
            row = self.queue.get(key)
            assert row is not None  # rows are never deleted
            if row["status"] not in ("failed", "cancelled"):
                break
            key = f"{base}#{row['id']}"  # a new request after a failure is sent again
        if row["status"] == "pending":
            row = self.queue.send_now(key, wait_s=self.wait_s) or row
        return CommandRequest(row=row, vehicle=self._vehicle(vehicle.vin), created=created)

    # -- what the car reports ----------------------------------------------------------

    def command_result(self, vin: str, *, key: str | None, command_id: str | None, ok: bool,
                       detail: str | None) -> dict[str, Any] | None:
        """The car's report on a command it was sent: confirms (``ok``) or fails the row,
        and on ``ok`` applies the registry change (once).  Found by the row's ``key``,
        else by the ``command_id`` the vehicle command service gave it; only among the
        commands of ``vin``.  None for no such command.  A replay changes nothing and
        answers the same row."""
        row = self._find(normal_vin(vin), key=key, command_id=command_id)
        if row is None:
            return None
        earlier = row["result"] or {}
        result: dict[str, Any] = {"status": "executed" if ok else "failed",
                                  "source": "command_result",
                                  "command_id": earlier.get("command_id") or command_id}
        if detail:
            result["detail" if ok else "reason"] = detail
        return self.queue.confirm(key=str(row["key"]), ok=ok, result=result)

    def _find(self, vin: str, *, key: str | None,
              command_id: str | None) -> Mapping[str, Any] | None:
        c = vehicle_commands.c
        with self.queue.store.begin() as conn:
            if key is not None:
                found = conn.execute(sa.select(vehicle_commands)
                                     .where(c.key == key, c.vin == vin)).first()
                return None if found is None else dict(found._mapping)
            rows = conn.execute(sa.select(vehicle_commands).where(c.vin == vin)
                                .order_by(c.id.desc()).limit(200)).all()
        for found in rows:
            if str((found.result or {}).get("command_id")) == command_id:
                return dict(found._mapping)
        return None

    def unfinished(self, vin: str) -> list[dict[str, Any]]:
        """The vehicle's commands the car has not settled (pending, sent), oldest first."""
        return [command_view(r) for r in self.queue.pending(normal_vin(vin))]

    def recent(self, vin: str, *, now: dt.datetime) -> list[dict[str, Any]]:
        """The vehicle's commands settled in the last ``RECENT_S`` seconds (confirmed,
        failed with the reason, cancelled), newest first, at most ``RECENT_MAX``."""
        return [command_view(r) for r in self.queue.recent(
            normal_vin(vin), since=now - dt.timedelta(seconds=RECENT_S), limit=RECENT_MAX)]


# -- the registry change, in the transaction that settles the row ----------------------


def apply_settled(conn: Connection, row: Mapping[str, Any]) -> None:
    """The queue's ``on_settled`` hook: a confirmed command changes the registry (if its
    episode is still current), a failed one is audited.  Rows not made by
    :class:`CarCommands` (no notes) are left alone."""
    notes = row["params"].get(NOTES)
    command = str(row["command"])
    if not isinstance(notes, dict) or command not in CONFIRMED_ACTIONS or not row["vin"]:
        return
    vin, actor = str(row["vin"]), str(notes["actor"])
    now = utc(row["updated_at"])
    detail: dict[str, Any] = {"key": row["key"]}
    if row["status"] == "failed":
        detail["error"] = str(row["last_error"] or "")[:200]
        write_audit(conn, vin=vin, actor=actor, action=f"{command}_failed", at=now,
                    detail=detail)
        return
    car = conn.execute(sa.select(vehicles).where(vehicles.c.vin == vin)).first()
    if car is None:
        return
    fresh = command == "unlock" or notes.get("episode") == episode_marker(dict(car._mapping), command)
    if fresh and command == "start_tracking" and not car.tracking:
        theft.start_tracking_in(conn, vin=vin, actor=actor,
                                police_reference=str(notes["police_reference"]), now=now)
        return
    if fresh and command == "stop_tracking" and car.tracking:
        theft.stop_tracking_in(conn, vin=vin, actor=actor, reason=notes.get("reason"), now=now)
        return
    changed = 0
    if fresh and command == "immobilise":
        changed = conn.execute(vehicles.update().where(
            vehicles.c.vin == vin, vehicles.c.immobilised.is_(False),
        ).values(immobilised=True, immobilised_by=actor, immobilised_at=now, updated_at=now,
                 immobilised_reference=notes["authority_reference"])).rowcount
        detail["authority_reference"] = notes["authority_reference"]
    elif fresh and command == "reactivate":
        changed = conn.execute(vehicles.update().where(
            vehicles.c.vin == vin, vehicles.c.immobilised.is_(True),
        ).values(immobilised=False, reactivated_by=actor, reactivated_at=now,
                 updated_at=now)).rowcount
    if command != "unlock":
        detail["changed"] = bool(changed)
    if not fresh:
        detail["stale"] = True
    write_audit(conn, vin=vin, actor=actor, action=CONFIRMED_ACTIONS[command], at=now,
                detail=detail)
