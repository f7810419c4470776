"""Everything since release dde7ea9, with the rows written before it filled in.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-25

New tables: ``owner_phones`` (several numbers per owner), ``pin_failure_times`` (one
row per PIN failure that still counts), ``vehicle_commands`` (durable vehicle
commands).  ``incidents``: ``msd`` and ``test_call`` (eCall MSD), ``lat``/``lon``
nullable (an MSD without a position).  ``notifications``: ``title``, ``language``,
``deadline_at``, ``leased_until``, ``in_doubt``, ``given_up_at``, ``last_status``,
``provider_ref`` (owner messages retried until a deadline).

Rows already there, read the way the code now reads them:

* each vehicle's ``owner_phone`` becomes its ``owner_phones`` row 0 (the code reads a
  vehicle without rows the same way; this keeps one form);
* failures counted in ``pin_failures`` on an unlocked PIN become that many
  ``pin_failure_times`` rows at the last attempt (they count for the window from
  then, instead of being forgotten by the upgrade);
* a pending notification gets the deadline a new one gets: owner messages 24 hours
  after they were created, the escalation at its due time.

SQLite rebuilds ``incidents`` and ``notifications`` (batch mode) to change them.
"""

from __future__ import annotations

import datetime as dt

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

TS = sa.DateTime(timezone=True)
#: how long owner messages (SMS, push) are retried (gateway.theft.OWNER_GIVE_UP_AFTER)
OWNER_GIVE_UP_AFTER = dt.timedelta(hours=24)


def upgrade() -> None:
    op.create_table(
        "owner_phones",
        sa.Column("vin", sa.String(17), nullable=False),
        sa.Column("position", sa.Integer, nullable=False),
        sa.Column("phone", sa.String(20), nullable=False),
        sa.PrimaryKeyConstraint("vin", "position"),
    )
    op.create_index("ix_owner_phones_phone", "owner_phones", ["phone"])

    op.create_table(
        "pin_failure_times",
        sa.Column("id", sa.Integer, autoincrement=True, nullable=False),
        sa.Column("vin", sa.String(17), nullable=False),
        sa.Column("at", TS, nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_pin_failure_times_vin", "pin_failure_times", ["vin"])

    op.create_table(
        "vehicle_commands",
        sa.Column("id", sa.Integer, autoincrement=True, nullable=False),
        sa.Column("key", sa.String(128), nullable=False),
        sa.Column("command", sa.String(64), nullable=False),
        sa.Column("vin", sa.String(17)),
        sa.Column("msisdn", sa.String(20)),
        sa.Column("params", sa.JSON, nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("attempts", sa.Integer, server_default="0", nullable=False),
        sa.Column("next_attempt_at", TS, nullable=False),
        sa.Column("lease_until", TS),
        sa.Column("lease_token", sa.String(36)),
        sa.Column("last_error", sa.String(300)),
        sa.Column("created_at", TS, nullable=False),
        sa.Column("updated_at", TS, nullable=False),
        sa.Column("confirmed_at", TS),
        sa.Column("result", sa.JSON),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("key"),
    )
    op.create_index("ix_vehicle_commands_due", "vehicle_commands", ["status", "next_attempt_at"])

    with op.batch_alter_table("incidents") as batch:
        batch.add_column(sa.Column("msd", sa.String(200)))
        batch.add_column(sa.Column("test_call", sa.Boolean))
        batch.alter_column("lat", existing_type=sa.Float, nullable=True)
        batch.alter_column("lon", existing_type=sa.Float, nullable=True)

    with op.batch_alter_table("notifications") as batch:
        batch.add_column(sa.Column("title", sa.String(100)))
        batch.add_column(sa.Column("language", sa.String(8)))
        batch.add_column(sa.Column("deadline_at", TS))
        batch.add_column(sa.Column("leased_until", TS))
        # NOT NULL: the rows already there get false, then the default goes (the code
        # always writes it)
        batch.add_column(sa.Column("in_doubt", sa.Boolean, nullable=False,
                                   server_default=sa.false()))
        batch.add_column(sa.Column("given_up_at", TS))
        batch.add_column(sa.Column("last_status", sa.Integer))
        batch.add_column(sa.Column("provider_ref", sa.String(64)))
    with op.batch_alter_table("notifications") as batch:
        batch.alter_column("in_doubt", existing_type=sa.Boolean, existing_nullable=False,
                           server_default=None)

    _fill_in_rows()


def _fill_in_rows() -> None:
    bind = op.get_bind()
    vehicles = sa.table("vehicles", sa.column("vin"), sa.column("owner_phone"))
    owner_phones = sa.table("owner_phones", sa.column("vin"), sa.column("position"),
                            sa.column("phone"))
    bind.execute(owner_phones.insert().from_select(
        ["vin", "position", "phone"],
        sa.select(vehicles.c.vin, sa.literal(0), vehicles.c.owner_phone).where(
            vehicles.c.owner_phone.is_not(None), vehicles.c.owner_phone != "")))

    pin_failures = sa.table("pin_failures", sa.column("vin"), sa.column("failures"),
                            sa.column("locked_until"), sa.column("updated_at", TS))
    times = sa.table("pin_failure_times", sa.column("vin"), sa.column("at", TS))
    counted = bind.execute(sa.select(pin_failures.c.vin, pin_failures.c.failures,
                                     pin_failures.c.updated_at).where(
        pin_failures.c.failures > 0, pin_failures.c.locked_until.is_(None))).all()
    rows = [{"vin": vin, "at": at} for vin, failures, at in counted for _ in range(failures)]
    if rows:
        bind.execute(times.insert(), rows)

    notifications = sa.table("notifications", sa.column("id"), sa.column("kind"),
                             sa.column("status"), sa.column("created_at", TS),
                             sa.column("due_at", TS), sa.column("deadline_at", TS))
    pending = bind.execute(sa.select(
        notifications.c.id, notifications.c.kind, notifications.c.created_at,
        notifications.c.due_at).where(notifications.c.status == "pending",
                                      notifications.c.deadline_at.is_(None))).all()
    for id_, kind, created_at, due_at in pending:
        deadline = due_at if kind == "escalation" else created_at + OWNER_GIVE_UP_AFTER
        bind.execute(notifications.update().where(notifications.c.id == id_)
                     .values(deadline_at=deadline))


def downgrade() -> None:
    """Back to 0001: the new tables and columns go, with what they held; fails while an
    incident without a position exists (0001 requires lat/lon)."""
    with op.batch_alter_table("notifications") as batch:
        for name in ("provider_ref", "last_status", "given_up_at", "in_doubt",
                     "leased_until", "deadline_at", "language", "title"):
            batch.drop_column(name)
    with op.batch_alter_table("incidents") as batch:
        batch.alter_column("lon", existing_type=sa.Float, nullable=False)
        batch.alter_column("lat", existing_type=sa.Float, nullable=False)
        batch.drop_column("test_call")
        batch.drop_column("msd")
    op.drop_index("ix_vehicle_commands_due", table_name="vehicle_commands")
    op.drop_table("vehicle_commands")
    op.drop_index("ix_pin_failure_times_vin", table_name="pin_failure_times")
    op.drop_table("pin_failure_times")
    op.drop_index("ix_owner_phones_phone", table_name="owner_phones")
    op.drop_table("owner_phones")
