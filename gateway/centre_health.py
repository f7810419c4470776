"""Is the assistance centre reachable?  A circuit breaker kept in the database.

Every gateway instance sharing the database sees the same state.  Two kinds of key:

- ``api``: the centre's incident API (``GATEWAY_ASSISTANCE_URL``), fed by deliveries.
  It is reported (metrics, ``states()``) but never takes a line down: the API and the
  staffed phone lines fail independently, and a crash call must not skip a staffed line
  because the incident API is down.
- a line key (a centre id from the number plan), fed by ``<Dial>`` outcomes of that
  line; only these keys make :meth:`CentreHealth.unreachable` skip a line.

States: ``closed`` (reachable), ``open`` (skip it) after ``failure_threshold``
consecutive failures, ``half_open`` after ``open_for_s``: exactly one caller, across
all instances, claims the probe (an atomic conditional UPDATE); its success closes the
breaker, its failure opens it again.  A successful delivery closes the ``api`` breaker.

:meth:`unreachable` runs on the voice path: it has a deadline and answers "nothing
known down" when the database does not answer in time.
"""

from __future__ import annotations

import datetime as dt
import logging
import time
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from gateway.errors import StoreError
from gateway.store import TS, Store, as_utc, insert_ignore, metadata

if TYPE_CHECKING:
    from gateway.config import Settings
    from gateway.plan import NumberPlan

log = logging.getLogger(__name__)
#: a plan whose centres cannot be listed is logged under the composition root's name,
#: as it always was (:func:`build_health` moved here from gateway.app)
_startup_logger = logging.getLogger("gateway.app")

API = "api"

centre_health = sa.Table(
    "centre_health",
    metadata,
    sa.Column("key", sa.String(64), primary_key=True),
    sa.Column("state", sa.String(16), nullable=False),
    sa.Column("failures", sa.Integer, nullable=False),
    sa.Column("opened_at", TS),
    sa.Column("probe_until", TS),
    sa.Column("updated_at", TS, nullable=False),
    sa.Column("last_reason", sa.String(200)),
)


class CentreHealth:
    def __init__(
        self,
        store: Store,
        *,
        centre_ids: Iterable[str],
        failure_threshold: int = 3,
        open_for_s: float = 30.0,
        probe_window_s: float = 60.0,
        clock: Callable[[], float],
    ) -> None:
        self.store = store
        self.centre_ids = frozenset(centre_ids)
        self.failure_threshold = failure_threshold
        self.open_for = dt.timedelta(seconds=open_for_s)
        self.probe_window = dt.timedelta(seconds=probe_window_s)
        self.clock = clock

    def _now(self) -> dt.datetime:
        return dt.datetime.fromtimestamp(self.clock(), tz=dt.UTC)

    def record(self, key: str, *, ok: bool, reason: str, conn: Connection | None = None,
               timeout_s: float = 2.0) -> None:
        """Feed one outcome; raises StoreError.  With ``conn`` it joins that transaction
        (the step writer feeds a line's outcome with the step that observed it)."""
        if conn is not None:
            state, before = self._record(conn, key, ok=ok, reason=reason)
        else:
            state, before = self.store.within(
                lambda c: self._record(c, key, ok=ok, reason=reason), timeout_s=timeout_s)
        if ok and before not in (None, "closed"):
            log.warning("centre %s reachable again (%s)", key, reason)
        elif not ok and state == "open":
            log.warning("centre %s known unreachable (%s)", key, reason)

    def _record(self, conn: Connection, key: str, *, ok: bool,
                reason: str) -> tuple[str | None, str | None]:
        """``(state after, state before)``."""
        now = self._now()
        table = centre_health
        before = conn.execute(sa.select(table.c.state).where(table.c.key == key)).scalar()
        if before is None:  # another instance may create it at the same time
            insert_ignore(conn, table, {"key": key, "state": "closed", "failures": 0,
                                        "updated_at": now})
        if ok:
            conn.execute(table.update().where(table.c.key == key).values(
                state="closed", failures=0, opened_at=None, probe_until=None,
                updated_at=now, last_reason=reason[:200]))
            return "closed", before
        # a failure: count it atomically, open at the threshold or after a failed probe
        conn.execute(table.update().where(table.c.key == key).values(
            failures=table.c.failures + 1, updated_at=now, last_reason=reason[:200]))
        conn.execute(
            table.update()
            .where(table.c.key == key, table.c.state != "open",
                   sa.or_(table.c.failures >= self.failure_threshold,
                          table.c.state == "half_open"))
            .values(state="open", opened_at=now, probe_until=None))
        state = conn.execute(sa.select(table.c.state).where(table.c.key == key)).scalar()
        return state, before

    def record_safely(self, key: str, *, ok: bool, reason: str) -> None:
        """Feed an outcome from a webhook: never raises."""
        if not key:
            return
        try:
            self.record(key, ok=ok, reason=reason)
        except Exception:
            log.exception("could not record centre health for %s", key)

    def unreachable(self, *, timeout_s: float = 2.0) -> set[str]:
        """Line keys to skip now (never because of the ``api`` key).  May claim a
        half-open probe for the caller.  Empty when the database does not answer
        within ``timeout_s``: then every line is tried.

        Background work: calls read the answer from memory (gateway.line_health), so
        this runs on the store's background slots with the writes' deadline.  (At 0.3 s
        on the request slots, a slow read on a loaded machine made the request
        threads' database fail fast for 2 s, and the next refresh kept nothing known
        down: seen in CI.)"""
        try:
            return self.store.within(self._unreachable, timeout_s=timeout_s, background=True)
        except StoreError as exc:
            log.warning("centre health unavailable (%s); trying every line", exc)
            return set()

    def _unreachable(self, conn: Connection) -> set[str]:
        now = self._now()
        table = centre_health
        down: set[str] = set()
        rows = conn.execute(
            sa.select(table).where(table.c.state != "closed", table.c.key != API)).all()
        for row in rows:
            opened = as_utc(row.opened_at) or now
            probe_until = as_utc(row.probe_until)
            probing = row.state == "half_open" and probe_until is not None and probe_until > now
            if probing or (row.state == "open" and now - opened < self.open_for):
                down.add(row.key)
                continue
            # open long enough, or a probe that never reported: claim the probe
            claimed = conn.execute(
                table.update()
                .where(table.c.key == row.key, table.c.state == row.state,
                       table.c.updated_at == row.updated_at)
                .values(state="half_open", probe_until=now + self.probe_window,
                        updated_at=now)).rowcount
            if claimed != 1:
                down.add(row.key)  # another caller probes it
            else:
                log.info("probing centre %s", row.key)
        return down

    def states(self, *, timeout_s: float = 2.0) -> dict[str, str]:
        """Every key's state (the ``api`` key included); raises StoreError."""
        query = sa.select(centre_health.c.key, centre_health.c.state)
        return self.store.within(
            lambda conn: {key: state for key, state in conn.execute(query)},
            timeout_s=timeout_s)


def build_health(settings: Settings, store: Store, plan: NumberPlan | None,
                 clock: Callable[[], float] = time.time) -> CentreHealth:
    """The breaker for the plan's centres, as ``settings.delivery`` configures it (what
    the app and ``python -m gateway worker`` build at start-up).  A plan whose centres
    cannot be listed is logged and leaves the list empty: never raises for the plan."""
    try:
        centre_ids = [c.centre_id for c in plan.centres] if plan is not None else []
    except Exception:
        _startup_logger.exception("could not list the plan's centres")
        centre_ids = []
    return CentreHealth(
        store,
        centre_ids=centre_ids,
        failure_threshold=settings.delivery.breaker_failures,
        open_for_s=settings.delivery.breaker_open_s,
        clock=clock,
    )
