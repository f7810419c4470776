"""A durable queue of vehicle commands: queued in ``vehicle_commands``, done when the car confirms.

Rows are written by :func:`enqueue_command` inside the caller's transaction (or by
:meth:`CommandQueue.enqueue` in their own) under a unique idempotency ``key``; a
replay of the same key writes nothing.  The worker (:meth:`CommandQueue.run_once`,
or its thread) claims due ``pending`` rows with a lease and a fresh lease token
(``FOR UPDATE SKIP LOCKED`` on PostgreSQL; a conditional UPDATE on SQLite), sends
each through the vehicle command service with the row's key as the
``Idempotency-Key`` -- so a retry after a lost answer is deduplicated by the car --
and records the outcome with an UPDATE that carries the lease token: a worker
whose lease expired (and was taken over) changes nothing.

Outcomes of one send:

* the car answers that it executed the command (``{"status": "confirmed"}``,
  ``"executed"``, ``"done"``, ...) -> ``confirmed``;
* it answers that it took the command (``{"status": "accepted", "command_id": ...}``,
  what the vehicle command service answers today) -> ``sent``; the car's later
  ``command_result`` arrives through :meth:`CommandQueue.confirm`;
* it answers ``{"status": "rejected"}`` (or ``failed``/``refused``), or the service
  answers a permanent 4xx (unknown vehicle, rejected command) -> ``failed``;
* unreachable, 429/5xx, timeout -> stays ``pending`` with a backoff in
  ``next_attempt_at``, until ``budget_s`` after ``created_at`` -> ``failed``.

A row leaves ``pending`` once, so a command is sent again only after a transient
failure, and then with the same key.  ``sent`` rows are never re-sent.

A ``sent`` row the car has not settled ``confirm_s`` after it became ``sent`` (its
``updated_at``: nothing else updates a ``sent`` row) -> ``failed``, "not confirmed by
the car within N s" (the car out of coverage, its battery cut, its report lost): once,
by whichever worker gets there first (a conditional UPDATE; ``FOR UPDATE SKIP LOCKED``
on PostgreSQL), logged as an error per row.  The service's answer stays in ``result``,
so a late report still finds the row by its ``command_id``: ``ok`` confirms it (failed
-> confirmed, settled again), not ``ok`` leaves it failed.

A request that cannot wait for the worker sends its row itself with
:meth:`CommandQueue.send_now` (it leases the row, so the worker never sends it at the
same time).  ``on_settled(conn, row)`` is called inside the transaction that moves a
row to ``confirmed`` or ``failed`` (by a send, the car's result, the budget, or the
confirmation window), once per move: what waits for the car's acknowledgement (the
registry's state) commits with it or not at all.  Params named with a leading ``_`` are
the gateway's own notes on the row (who asked, what to record): they are never sent.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import random
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection
from sqlalchemy.exc import IntegrityError

from gateway.adapters.ports import VehicleCommands
from gateway.errors import PermanentUpstreamError, StoreError, TransientUpstreamError
from gateway.owners import vehicles
from gateway.store import TS, Store, as_utc, incidents, metadata
from gateway.watchdog import background_thread, pool_like_this_thread

log = logging.getLogger(__name__)

#: a car's synchronous answer that means "executed"
CONFIRMED_ANSWERS = frozenset({"confirmed", "executed", "done", "completed", "succeeded",
                               "success", "ok"})
#: a car's synchronous answer that means "will not execute"
REJECTED_ANSWERS = frozenset({"rejected", "failed", "refused", "error"})
#: names the adapter call uses itself; a command's params cannot use them
RESERVED_PARAMS = frozenset({"vin", "command", "idempotency_key"})
#: the statuses of a row the car has not settled yet
UNFINISHED = ("pending", "sent")
#: rows one pass fails for running out of time (a backlog, e.g. the first pass after an
#: upgrade, drains over consecutive passes, with sends in between, in short transactions)
EXPIRE_BATCH = 100
#: called in the transaction that settles a row (``confirmed``/``failed``); the row as now
Settled = Callable[[Connection, Mapping[str, Any]], None]

vehicle_commands = sa.Table(
    "vehicle_commands",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("key", sa.String(128), nullable=False, unique=True),
    sa.Column("command", sa.String(64), nullable=False),
    sa.Column("vin", sa.String(17)),
    sa.Column("msisdn", sa.String(20)),
    sa.Column("params", sa.JSON, nullable=False),
    # pending | sent | confirmed | failed | cancelled
    sa.Column("status", sa.String(16), nullable=False),
    sa.Column("attempts", sa.Integer, nullable=False, server_default="0"),
    sa.Column("next_attempt_at", TS, nullable=False),
    sa.Column("lease_until", TS),
    sa.Column("lease_token", sa.String(36)),
    sa.Column("last_error", sa.String(300)),
    sa.Column("created_at", TS, nullable=False),
    sa.Column("updated_at", TS, nullable=False),
    sa.Column("confirmed_at", TS),
    sa.Column("result", sa.JSON),
    sa.Index("ix_vehicle_commands_due", "status", "next_attempt_at"),
    # the settled commands of one car (CommandQueue.recent; revision 0003)
    sa.Index("ix_vehicle_commands_vin", "vin", "updated_at"),
)

_KEY = vehicle_commands.c["key"]


def enqueue_command(conn: Connection, *, key: str, command: str, vin: str | None,
                    msisdn: str | None, params: Mapping[str, Any], now: dt.datetime) -> bool:
    """Queue one command inside the caller's transaction; False if ``key`` exists.

    A duplicate key is not an error and does not abort the caller's transaction
    (``ON CONFLICT DO NOTHING``).  ValueError for a malformed command.
    """
    values = _new_row(key=key, command=command, vin=vin, msisdn=msisdn, params=params, now=now)
    if conn.dialect.name == "postgresql":
        stmt: Any = postgresql.insert(vehicle_commands).on_conflict_do_nothing(
            index_elements=["key"])
    elif conn.dialect.name == "sqlite":
        stmt = sqlite.insert(vehicle_commands).on_conflict_do_nothing(index_elements=["key"])
    else:  # pragma: no cover - other databases: a savepoint keeps the caller's transaction
        try:
            with conn.begin_nested():
                conn.execute(vehicle_commands.insert().values(**values))
            return True
        except IntegrityError:
            return False
    # RETURNING, not rowcount: psycopg reports -1 for an INSERT SQLAlchemy adds RETURNING to
    return conn.execute(stmt.values(**values).returning(vehicle_commands.c.id)).first() is not None


def _new_row(*, key: str, command: str, vin: str | None, msisdn: str | None,
             params: Mapping[str, Any], now: dt.datetime) -> dict[str, Any]:
    if not key or len(key) > 128:
        raise ValueError("key must be 1 to 128 characters")
    if not command or len(command) > 64:
        raise ValueError("command must be 1 to 64 characters")
    if not vin and not msisdn:
        raise ValueError("a command needs a vin or an msisdn to find the car")
    if vin is not None and len(vin) > 17:
        raise ValueError("vin is at most 17 characters")
    clash = RESERVED_PARAMS & set(params)
    if clash:
        raise ValueError(f"params may not be named {sorted(clash)}")
    body = json.loads(json.dumps(dict(params)))  # JSON-only (TypeError otherwise), a copy
    return {"key": key, "command": command, "vin": vin or None, "msisdn": msisdn or None,
            "params": body, "status": "pending", "attempts": 0, "next_attempt_at": now,
            "created_at": now, "updated_at": now}


def _as_dict(row: sa.Row[Any]) -> dict[str, Any]:
    data = dict(row._mapping)
    for name, value in data.items():
        if isinstance(value, dt.datetime):
            data[name] = as_utc(value)
    return data


def _picked(conn: Connection, ids: sa.Select[Any]) -> Any:
    """The WHERE clause for an UPDATE of the rows ``ids`` selects (with its LIMIT).

    PostgreSQL: the rows locked with ``FOR UPDATE SKIP LOCKED`` in a CTE, which runs
    once.  Not ``id IN (SELECT ... LIMIT n FOR UPDATE SKIP LOCKED)``: the planner may
    rescan that sub-select, each rescan skips the rows this statement has already locked
    and takes n more, so a claim of 4 leased every due row.  SQLite (one writer at a
    time): the sub-select."""
    if conn.dialect.name == "postgresql":
        due = ids.with_for_update(skip_locked=True).cte("picked")
        return vehicle_commands.c.id == due.c.id
    return vehicle_commands.c.id.in_(ids)


class CommandQueue:
    """Sends queued vehicle commands until the car confirms them (or they fail)."""

    def __init__(
        self,
        store: Store,
        commands: VehicleCommands | None,
        *,
        clock: Callable[[], float] = time.time,
        poll_s: float = 1.0,
        budget_s: float = 300.0,
        backoff_initial_s: float = 0.5,
        backoff_max_s: float = 15.0,
        lease_s: float = 30.0,
        concurrency: int = 4,
        confirm_s: float = 300.0,
        on_settled: Settled | None = None,
        metrics: Any = None,
    ) -> None:
        if poll_s <= 0 or budget_s <= 0 or lease_s <= 0 or concurrency < 1:
            raise ValueError("poll_s, budget_s, lease_s must be positive, concurrency >= 1")
        if confirm_s <= 0:
            raise ValueError("confirm_s must be positive")
        if backoff_initial_s < 0 or backoff_max_s < backoff_initial_s:
            raise ValueError("need 0 <= backoff_initial_s <= backoff_max_s")
        # one send (the adapter's own retries included) must end inside the lease
        adapter_budget = getattr(commands, "total_budget_s", None)
        if isinstance(adapter_budget, (int, float)) and adapter_budget >= lease_s:
            raise ValueError(f"lease_s ({lease_s:g}) must exceed the adapter's "
                             f"total_budget_s ({adapter_budget:g})")
        self.store = store
        self.commands = commands
        self.clock = clock
        self.poll_s = poll_s
        self.budget = dt.timedelta(seconds=budget_s)
        self.backoff_initial_s = backoff_initial_s
        self.backoff_max_s = backoff_max_s
        self.lease = dt.timedelta(seconds=lease_s)
        self.concurrency = concurrency
        #: a ``sent`` row the car has not settled this long after it was sent fails
        self.confirm_window = dt.timedelta(seconds=confirm_s)
        self.on_settled = on_settled
        #: gateway.metrics.Metrics (its ``vehicle_commands`` counter), or None
        self.metrics = metrics
        self.wake = threading.Event()
        self.stopping = threading.Event()
        self.thread: threading.Thread | None = None

    def _now(self) -> dt.datetime:
        return dt.datetime.fromtimestamp(self.clock(), tz=dt.UTC)

    # -- queue side ------------------------------------------------------------------

    def enqueue(self, *, key: str, command: str, vin: str | None, msisdn: str | None,
                params: Mapping[str, Any]) -> dict[str, Any]:
        """Queue in its own transaction; the row (the existing one on a replay)."""
        with self.store.begin() as conn:
            enqueue_command(conn, key=key, command=command, vin=vin, msisdn=msisdn,
                            params=params, now=self._now())
            row = conn.execute(sa.select(vehicle_commands).where(_KEY == key)).one()
        self.wake.set()
        return _as_dict(row)

    def get(self, key: str) -> dict[str, Any] | None:
        with self.store.begin() as conn:
            row = conn.execute(sa.select(vehicle_commands).where(_KEY == key)).first()
        return None if row is None else _as_dict(row)

    def pending(self, vin: str | None = None) -> list[dict[str, Any]]:
        """Rows not finished yet (``pending``, or ``sent`` and awaiting the car's
        confirmation), oldest first; only the car ``vin``'s if given."""
        query = (sa.select(vehicle_commands)
                 .where(vehicle_commands.c.status.in_(UNFINISHED))
                 .order_by(vehicle_commands.c.id))
        if vin is not None:
            query = query.where(vehicle_commands.c.vin == vin)
        with self.store.begin() as conn:
            return [_as_dict(r) for r in conn.execute(query)]

    def recent(self, vin: str, *, since: dt.datetime, limit: int = 10) -> list[dict[str, Any]]:
        """The car ``vin``'s rows settled (confirmed, failed, cancelled) at or after
        ``since``, newest first, at most ``limit``: what an agent needs to see that a
        command the owner waited for failed, and why."""
        c = vehicle_commands.c
        query = (sa.select(vehicle_commands)
                 .where(c.vin == vin, c.status.not_in(UNFINISHED), c.updated_at >= since)
                 .order_by(c.updated_at.desc(), c.id.desc())
                 .limit(max(0, limit)))
        with self.store.begin() as conn:
            return [_as_dict(r) for r in conn.execute(query)]

    def confirm(self, *, key: str, ok: bool, result: Mapping[str, Any]) -> dict[str, Any] | None:
        """The car's ``command_result`` for ``key`` (or a row id); None for an unknown key.

        ``ok`` confirms a pending, sent or (late) failed row; not ``ok`` fails a pending
        or sent one.  A finished row is returned unchanged (a replayed result).  A row a
        worker is sending right now loses its lease token, so that worker changes nothing.
        A row that moves between this read and this write (another instance failed it for
        its window, a worker's send settled it) is read and decided again: the car's
        report is never dropped for a race.
        """
        now = self._now()
        body = json.loads(json.dumps(dict(result)))
        where = _KEY == key
        if key.isdigit():
            where = sa.or_(where, vehicle_commands.c.id == int(key))
        with self.store.begin() as conn:
            # a row moves at most three times (pending, sent, failed, confirmed)
            for _ in range(4):
                found = conn.execute(sa.select(vehicle_commands).where(where)
                                     .order_by((_KEY == key).desc()).limit(1)).first()
                if found is None:
                    return None
                row = _as_dict(found)
                if ok and row["status"] in ("pending", "sent", "failed"):
                    values: dict[str, Any] = {"status": "confirmed", "confirmed_at": now,
                                              "last_error": None}
                elif not ok and row["status"] in ("pending", "sent"):
                    values = {"status": "failed",
                              "last_error": f"car reported failure: {_reason(body)}"[:300]}
                else:
                    return row
                changed = conn.execute(vehicle_commands.update().where(
                    vehicle_commands.c.id == row["id"],
                    vehicle_commands.c.status == row["status"],
                ).values(result=body, lease_token=None, lease_until=None, updated_at=now,
                         **values)).rowcount
                if changed == 1:
                    if row["status"] == "failed":
                        log.warning("command %s confirmed by the car after it was failed (%s)",
                                    row["key"], row["last_error"])
                    settled = _as_dict(conn.execute(
                        sa.select(vehicle_commands)
                        .where(vehicle_commands.c.id == row["id"])).one())
                    self._settled(conn, settled)
                    break
            else:
                return row
        self._count(settled, "report")  # committed
        return settled

    def _settled(self, conn: Connection, row: Mapping[str, Any]) -> None:
        if self.on_settled is not None and row["status"] in ("confirmed", "failed"):
            self.on_settled(conn, row)

    def _count(self, row: Mapping[str, Any], how: str) -> None:
        """Count a settled row once its transaction committed: ``how`` it was settled
        (send: the service's answer; report: the car's command_result; cancel;
        expired_unsent: the send budget ran out; expired_unconfirmed: the car did not
        report within the confirmation window)."""
        if self.metrics is None or row["status"] not in ("confirmed", "failed", "cancelled"):
            return
        try:  # a count never stands in the way of a settled command
            self.metrics.vehicle_commands.labels(str(row["command"]), str(row["status"]),
                                                 how).inc()
        except Exception:
            log.exception("could not count a settled vehicle command")

    def cancel(self, key: str) -> bool:
        """Cancel a row that is still pending (one being sent right now may already be out)."""
        now = self._now()
        with self.store.begin() as conn:
            cancelled = conn.execute(vehicle_commands.update().where(
                _KEY == key, vehicle_commands.c.status == "pending",
            ).values(status="cancelled", lease_token=None, lease_until=None,
                     updated_at=now).returning(vehicle_commands.c.command)).first()
        if cancelled is not None:
            self._count({"command": cancelled[0], "status": "cancelled"}, "cancel")
        return cancelled is not None

    # -- worker side -----------------------------------------------------------------

    def claim(self, limit: int) -> list[dict[str, Any]]:
        """Lease up to ``limit`` due pending rows under one fresh token; counts the attempt."""
        now = self._now()
        token = uuid.uuid4().hex
        c = vehicle_commands.c
        free = sa.or_(c.lease_until.is_(None), c.lease_until < now)
        with self.store.begin() as conn:
            due = (sa.select(c.id).where(c.status == "pending", c.next_attempt_at <= now, free)
                   .order_by(c.next_attempt_at, c.id).limit(limit))
            conn.execute(vehicle_commands.update()
                         .where(_picked(conn, due), c.status == "pending", free)
                         .values(lease_token=token, lease_until=now + self.lease,
                                 attempts=c.attempts + 1, updated_at=now))
            rows = conn.execute(sa.select(vehicle_commands).where(c.lease_token == token)
                                .order_by(c.id)).all()
        return [_as_dict(r) for r in rows]

    def claim_key(self, key: str) -> dict[str, Any] | None:
        """Lease the pending row ``key`` now, due or not (a person is waiting for it);
        None if it is not pending or another sender holds its lease."""
        now = self._now()
        c = vehicle_commands.c
        token = uuid.uuid4().hex
        with self.store.begin() as conn:
            leased = conn.execute(vehicle_commands.update().where(
                _KEY == key, c.status == "pending",
                sa.or_(c.lease_until.is_(None), c.lease_until < now),
            ).values(lease_token=token, lease_until=now + self.lease, next_attempt_at=now,
                     attempts=c.attempts + 1, updated_at=now)).rowcount
            row = conn.execute(sa.select(vehicle_commands).where(_KEY == key)).first()
        return _as_dict(row) if leased == 1 and row is not None else None

    def send_now(self, key: str, *, wait_s: float = 5.0) -> dict[str, Any] | None:
        """Send the pending row ``key`` in this thread (:meth:`claim_key`, :meth:`handle`);
        the row afterwards.  If the worker is sending it right now, wait up to ``wait_s``
        for its outcome.  A row that is not pending is only read."""
        row = self.claim_key(key)
        if row is not None:
            self.handle(row)
            return self.get(key)
        deadline = time.monotonic() + wait_s
        while True:
            row = self.get(key)
            if (row is None or row["status"] != "pending" or row["lease_token"] is None
                    or time.monotonic() >= deadline):
                return row
            time.sleep(0.05)

    def resolve_vin(self, msisdn: str) -> str | None:
        """The car behind an MSISDN: its newest incident, else the registry's car number."""
        with self.store.begin() as conn:
            vin = conn.execute(sa.select(incidents.c.vin).where(incidents.c.msisdn == msisdn)
                               .order_by(incidents.c.received_at.desc()).limit(1)).scalar()
            if not vin:
                vin = conn.execute(sa.select(vehicles.c.vin)
                                   .where(vehicles.c.car_msisdn == msisdn)).scalar()
        return str(vin) if vin else None

    def handle(self, row: Mapping[str, Any]) -> str:
        """Send one claimed row; the status it was left in (``lost`` if the lease was)."""
        key, command = str(row["key"]), str(row["command"])
        if self.commands is None:
            return self._fail(row, "vehicle command service is not configured "
                                   "(GATEWAY_VEHICLE_COMMAND_URL)")
        vin = row["vin"] or (self.resolve_vin(str(row["msisdn"])) if row["msisdn"] else None)
        if not vin:
            return self._fail(row, f"no vehicle known for msisdn {row['msisdn']}")
        try:
            params = {k: v for k, v in row["params"].items() if not k.startswith("_")}
            answer = self.commands.send(vin, command, idempotency_key=key, **params)
        except PermanentUpstreamError as exc:
            return self._fail(row, str(exc), vin=vin)
        except TransientUpstreamError as exc:
            return self._retry(row, str(exc), vin=vin)
        except Exception as exc:  # a bug or an odd answer: retried within the budget
            log.exception("command %s (%s) raised unexpectedly", key, command)
            return self._retry(row, f"{type(exc).__name__}: {exc}", vin=vin)
        now = self._now()
        word = str(answer.get("status", "")).lower() if isinstance(answer, dict) else ""
        result = json.loads(json.dumps(answer, default=str))
        if word in CONFIRMED_ANSWERS:
            status = "confirmed"
            values: dict[str, Any] = {"confirmed_at": now, "last_error": None}
        elif word in REJECTED_ANSWERS:
            status = "failed"
            values = {"last_error": f"car rejected {command!r}: {_reason(result)}"[:300]}
        else:  # accepted/queued/...: the car's command_result comes later
            status = "sent"
            values = {"last_error": None}
        if not self._finish(row, now, status=status, vin=vin, result=result, **values):
            return "lost"
        log.info("command %s (%s) to %s: %s", key, command, vin, status)
        return status

    def _fail(self, row: Mapping[str, Any], error: str, *, vin: str | None = None) -> str:
        log.error("command %s (%s) failed: %s", row["key"], row["command"], error)
        done = self._finish(row, self._now(), status="failed", vin=vin or row["vin"],
                            last_error=error[:300])
        return "failed" if done else "lost"

    def _retry(self, row: Mapping[str, Any], error: str, *, vin: str) -> str:
        now = self._now()
        deadline = (as_utc(row["created_at"]) or now) + self.budget
        if now >= deadline:
            return self._fail(row, f"gave up after {row['attempts']} attempt(s) in "
                                   f"{self.budget.total_seconds():g}s: {error}", vin=vin)
        exponent = min(max(int(row["attempts"]) - 1, 0), 30)
        delay = min(self.backoff_max_s, self.backoff_initial_s * 2**exponent
                    + random.uniform(0, self.backoff_initial_s))
        retry_at = min(now + dt.timedelta(seconds=delay), deadline)
        log.warning("command %s (%s) to %s will be retried at %s: %s", row["key"],
                    row["command"], vin, retry_at.isoformat(), error)
        done = self._finish(row, now, status="pending", vin=vin, next_attempt_at=retry_at,
                            last_error=error[:300])
        return "pending" if done else "lost"

    def _finish(self, row: Mapping[str, Any], now: dt.datetime, **values: Any) -> bool:
        """Record an outcome, only under this worker's lease token; False if it was lost."""
        c = vehicle_commands.c
        with self.store.begin() as conn:
            changed = conn.execute(vehicle_commands.update().where(
                c.id == row["id"], c.lease_token == row["lease_token"], c.status == "pending",
            ).values(lease_token=None, lease_until=None, updated_at=now, **values)).rowcount
            if changed == 1:
                self._settled(conn, {**row, "lease_token": None, "lease_until": None,
                                     "updated_at": now, **values})
        if changed == 1:
            self._count({**row, **values}, "send")
        if changed != 1:
            log.warning("command %s: lease lost before its outcome was recorded", row["key"])
        return bool(changed == 1)

    def _expire(self) -> int:
        """Fail pending rows whose budget ran out before they could be (re)sent (at most
        ``EXPIRE_BATCH``, oldest first)."""
        now = self._now()
        c = vehicle_commands.c
        free = sa.or_(c.lease_until.is_(None), c.lease_until < now)
        with self.store.begin() as conn:
            old = (sa.select(c.id).where(c.status == "pending",
                                         c.created_at < now - self.budget, free)
                   .order_by(c.id).limit(EXPIRE_BATCH))
            rows = conn.execute(vehicle_commands.update().where(
                _picked(conn, old), c.status == "pending", free,
            ).values(status="failed", lease_token=None, lease_until=None, updated_at=now,
                     last_error=f"not sent within {self.budget.total_seconds():g}s")
                .returning(*c)).all()
            for row in rows:
                self._settled(conn, _as_dict(row))
        for row in rows:  # committed
            self._count(_as_dict(row), "expired_unsent")
        expired = len(rows)
        if expired:
            log.error("%d vehicle command(s) expired unsent", expired)
        return int(expired)

    def _expire_unconfirmed(self) -> int:
        """Fail ``sent`` rows the car has not settled within the confirmation window (at
        most ``EXPIRE_BATCH``, oldest first).

        The window counts from ``updated_at``: the moment the row became ``sent``, as no
        statement updates a ``sent`` row but the ones that settle it.  The service's
        answer (its ``command_id``) stays in ``result``, so a late report still finds
        the row, and :meth:`confirm` still confirms it."""
        now = self._now()
        window = self.confirm_window.total_seconds()
        error = f"not confirmed by the car within {window:g}s"
        c = vehicle_commands.c
        overdue = sa.and_(c.status == "sent", c.updated_at < now - self.confirm_window)
        with self.store.begin() as conn:
            old = sa.select(c.id).where(overdue).order_by(c.id).limit(EXPIRE_BATCH)
            rows = conn.execute(vehicle_commands.update().where(_picked(conn, old), overdue)
                                .values(status="failed", lease_token=None, lease_until=None,
                                        updated_at=now, last_error=error)
                                .returning(*c)).all()
            failed = [_as_dict(row) for row in rows]
            for row in failed:
                self._settled(conn, row)
        for row in failed:  # after the commit: each is failed now, once
            self._count(row, "expired_unconfirmed")
            answer = row["result"] if isinstance(row["result"], dict) else {}
            log.error("command %s (%s) to %s failed: %s (command_id %s)", row["key"],
                      row["command"], row["vin"] or row["msisdn"], error,
                      answer.get("command_id"))
        return len(failed)

    def run_once(self) -> int:
        """Expire, claim and send what is due; how many rows were handled."""
        expired = self._expire() + self._expire_unconfirmed()
        rows = self.claim(self.concurrency)
        if len(rows) == 1:
            self.handle(rows[0])
        elif rows:  # in parallel, so a hanging car does not hold up the others
            with pool_like_this_thread(len(rows), thread_name_prefix="command") as pool:
                list(pool.map(self.handle, rows))
        return expired + len(rows)

    def run(self) -> None:
        while not self.stopping.is_set():
            try:
                handled = self.run_once()
            except StoreError as exc:
                log.error("command queue: database unavailable (%s)", exc)
                handled = 0
            except Exception:
                log.exception("command queue pass failed")
                handled = 0
            if not handled:
                self.wake.wait(self.poll_s)
                self.wake.clear()

    def start_thread(self) -> None:
        self.thread = threading.Thread(target=background_thread(self.run),
                                       name="command-queue", daemon=True)
        self.thread.start()

    def stop(self, *, wait_s: float = 0.0) -> None:
        """Stop the thread (after the send in flight, if any); join up to ``wait_s``."""
        self.stopping.set()
        self.wake.set()
        if wait_s > 0 and self.thread is not None:
            self.thread.join(wait_s)


def _reason(result: Any) -> str:
    if isinstance(result, dict):
        for name in ("error", "reason", "message", "status"):
            if result.get(name):
                return str(result[name])
    return "no reason given"
