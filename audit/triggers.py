"""Database triggers that make the audit table append-only, on SQLite and PostgreSQL.

The database itself refuses UPDATE and DELETE of audit rows (and, on PostgreSQL, TRUNCATE
of a non-empty audit table), whatever the client: the ORM, ``dbshell`` or a script.
Installed by migration ``audit.0002_append_only``; that migration calls
:func:`install_append_only_triggers`, so changing the SQL here takes a new migration that
installs it again. On SQLite, a migration that rebuilds the table (Django remakes SQLite
tables for most ``AlterField`` / ``AddField`` operations) drops its triggers: such a
migration must call :func:`install_append_only_triggers` again.

Both databases refuse with an integrity error (``django.db.IntegrityError``).

:func:`append_only_suspended` lifts the protection for the length of a ``with`` block. It
exists for tests that tamper with the trail on purpose, and for emptying a test database;
it needs the table owner's rights on PostgreSQL and never belongs in application code.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from django.db import connection as default_connection
from django.db.backends.base.base import BaseDatabaseWrapper

TABLE = "audit_auditevent"

_SQLITE_TRIGGERS = {
    f"{TABLE}_refuse_update": "UPDATE",
    f"{TABLE}_refuse_delete": "DELETE",
}

_PG_FUNCTION = f"{TABLE}_refuse_change"
_PG_ROW_TRIGGER = f"{TABLE}_append_only"
_PG_TRUNCATE_TRIGGER = f"{TABLE}_refuse_truncate"

_PG_INSTALL = [
    f"""
    CREATE OR REPLACE FUNCTION {_PG_FUNCTION}() RETURNS trigger
    LANGUAGE plpgsql AS $body$
    DECLARE
        is_empty boolean;
    BEGIN
        IF TG_OP = 'TRUNCATE' THEN
            -- Emptying an empty trail loses nothing (Django's test flush truncates
            -- every table, audit included).
            EXECUTE format('SELECT NOT EXISTS (SELECT 1 FROM %I.%I)',
                           TG_TABLE_SCHEMA, TG_TABLE_NAME) INTO is_empty;
            IF is_empty THEN
                RETURN NULL;
            END IF;
        END IF;
        RAISE EXCEPTION '% is append-only: % refused', TG_TABLE_NAME, TG_OP
            USING ERRCODE = 'integrity_constraint_violation';
    END;
    $body$
    """,  # noqa: S608 - built from this module's constants, no outside input
    f"""
    CREATE OR REPLACE TRIGGER {_PG_ROW_TRIGGER}
    BEFORE UPDATE OR DELETE ON {TABLE}
    FOR EACH ROW EXECUTE FUNCTION {_PG_FUNCTION}()
    """,
    f"""
    CREATE OR REPLACE TRIGGER {_PG_TRUNCATE_TRIGGER}
    BEFORE TRUNCATE ON {TABLE}
    FOR EACH STATEMENT EXECUTE FUNCTION {_PG_FUNCTION}()
    """,
]

_PG_REMOVE = [
    f"DROP TRIGGER IF EXISTS {_PG_TRUNCATE_TRIGGER} ON {TABLE}",
    f"DROP TRIGGER IF EXISTS {_PG_ROW_TRIGGER} ON {TABLE}",
    f"DROP FUNCTION IF EXISTS {_PG_FUNCTION}()",
]


def _sqlite_install() -> list[str]:
    return [
        f"CREATE TRIGGER IF NOT EXISTS {name} BEFORE {operation} ON {TABLE} "
        f"BEGIN SELECT RAISE(ABORT, '{TABLE} is append-only: {operation} refused'); END"
        for name, operation in _SQLITE_TRIGGERS.items()
    ]


def _sqlite_remove() -> list[str]:
    return [f"DROP TRIGGER IF EXISTS {name}" for name in _SQLITE_TRIGGERS]


def _run(connection: BaseDatabaseWrapper, statements: list[str]) -> None:
    with connection.cursor() as cursor:
        for statement in statements:
            cursor.execute(statement)


def _unsupported(connection: BaseDatabaseWrapper) -> NotImplementedError:
    return NotImplementedError(f"no append-only triggers for {connection.vendor}")


def install_append_only_triggers(connection: BaseDatabaseWrapper = default_connection) -> None:
    """Create the triggers (idempotent)."""
    if connection.vendor == "postgresql":
        _run(connection, _PG_INSTALL)
    elif connection.vendor == "sqlite":
        _run(connection, _sqlite_install())
    else:
        raise _unsupported(connection)


def remove_append_only_triggers(connection: BaseDatabaseWrapper = default_connection) -> None:
    """Drop the triggers (idempotent): the migration's reverse."""
    if connection.vendor == "postgresql":
        _run(connection, _PG_REMOVE)
    elif connection.vendor == "sqlite":
        _run(connection, _sqlite_remove())
    else:
        raise _unsupported(connection)


@contextmanager
def append_only_suspended(
    connection: BaseDatabaseWrapper = default_connection,
) -> Iterator[None]:
    """Let UPDATE, DELETE and TRUNCATE through inside the block. Tests and maintenance only.

    PostgreSQL: ``ALTER TABLE ... DISABLE TRIGGER USER`` then ``ENABLE TRIGGER USER``.
    SQLite: the triggers are dropped, then created again.
    """
    if connection.vendor == "postgresql":
        _run(connection, [f"ALTER TABLE {TABLE} DISABLE TRIGGER USER"])
        try:
            yield
        finally:
            _run(connection, [f"ALTER TABLE {TABLE} ENABLE TRIGGER USER"])
    elif connection.vendor == "sqlite":
        _run(connection, _sqlite_remove())
        try:
            yield
        finally:
            _run(connection, _sqlite_install())
    else:
        raise _unsupported(connection)
