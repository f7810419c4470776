"""The schema as released at dde7ea9: the twelve tables every start created then.

Revision ID: 0001
Revises:
Create Date: 2026-11-25

A database made by that release's ``create_all`` has exactly these tables and no
``alembic_version``; the upgrade recognises it and stamps it with this revision.
"""

from __future__ import annotations

from alembic import op

from gateway.migrations.schema_0001 import released_metadata

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    released_metadata().create_all(op.get_bind(), checkfirst=False)


def downgrade() -> None:
    released_metadata().drop_all(op.get_bind(), checkfirst=False)
