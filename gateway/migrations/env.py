"""Alembic's entry point for the ``alembic`` command (see gateway.migrations)."""

from alembic import context

from gateway.migrations import run_env

run_env(context)
