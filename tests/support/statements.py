"""Counting the statements a Store runs (round trips), whichever way they go."""

from __future__ import annotations

import sqlalchemy as sa

from gateway.store import Store


def count_statements(store: Store) -> list[str]:
    """The statements ``store`` runs from now on: through SQLAlchemy, and on a SQLite
    file's voice-read connections (gateway.store.sqlite_reads) without their set-up PRAGMAs."""
    seen: list[str] = []
    sa.event.listen(store.engine, "before_cursor_execute",
                    lambda _c, _cur, statement, *_: seen.append(statement))
    if store.sqlite_reads is not None:
        store.sqlite_reads.close()  # new connections, traced
        store.sqlite_reads.trace = lambda statement: (
            None if statement.startswith("PRAGMA") else seen.append(statement))
    return seen
