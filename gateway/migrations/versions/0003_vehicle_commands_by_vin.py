"""An index of vehicle commands by car and last change.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-26

The agent API shows, with each vehicle, the commands settled in the last day (a
reactivation the car never confirmed, and why).  Settled rows are nearly all of
``vehicle_commands``, so the due index (status first) does not find them; without this
index the read scans the whole table.
"""

from __future__ import annotations

from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index("ix_vehicle_commands_vin", "vehicle_commands", ["vin", "updated_at"])


def downgrade() -> None:
    op.drop_index("ix_vehicle_commands_vin", table_name="vehicle_commands")
