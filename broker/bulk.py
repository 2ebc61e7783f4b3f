"""The registry's bulk inserts: Django's ``bulk_create``, or on PostgreSQL a COPY.

A registration batch inserts hundreds of rows in a handful of tables (manifests, their
series and instances, new patients and their identifiers). Django writes each table's rows
as one INSERT of hundreds of parameters (or as UNNEST arrays), which it compiles, and which
psycopg then parses again in Python, every time: it caches its parsing of statements of at
most 50 parameters only, and dumps UNNEST's arrays element by element. Together that was a
fifth of a registration's CPU (docs/performance.md, "DICOM intake"). PostgreSQL's COPY takes
the same rows with none of it: psycopg formats each row in C.

On PostgreSQL, the rows without a primary key get theirs from the table's sequence first
(one query), as ``bulk_create`` would give them through ``RETURNING``. Values are prepared by
the model's own fields, as ``bulk_create`` prepares them; errors are raised as Django's (an
IntegrityError for a taken key: `manifests_register` retries on it).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import TypeVar

from django.db import connection, models
from django.db.backends.utils import CursorWrapper

M = TypeVar("M", bound=models.Model)


def bulk_insert(model: type[M], rows: list[M]) -> list[M]:
    """``model.objects.bulk_create(rows)``, by COPY on PostgreSQL: ``rows`` get their
    primary keys and are saved."""
    meta = model._meta
    fields = meta.concrete_fields
    if (
        connection.vendor != "postgresql"
        or len(rows) < 2
        # What COPY cannot take as values: a parent table, a default or value of the database's.
        or meta.parents
        or any(field.generated or field.has_db_default() for field in fields)
    ):
        return model._default_manager.bulk_create(rows)
    for row in rows:
        row._prepare_related_fields_for_save(operation_name="bulk_create")
    without_key = [row for row in rows if row.pk is None]
    with connection.cursor() as cursor:
        if without_key:
            cursor.execute(
                "SELECT nextval(pg_get_serial_sequence(%s, %s)) FROM generate_series(1, %s)",
                [meta.db_table, meta.pk.column, len(without_key)],
            )
            for row, (pk,) in zip(without_key, cursor.fetchall(), strict=True):
                row.pk = pk
        copy_rows(
            cursor,
            meta.db_table,
            [field.column for field in fields],
            [
                [field.get_db_prep_save(field.pre_save(row, True), connection) for field in fields]
                for row in rows
            ],
        )
    for row in rows:
        row._state.adding = False
        row._state.db = connection.alias
    return rows


def copy_rows(
    cursor: CursorWrapper, table: str, columns: list[str], rows: Iterable[Sequence[object]]
) -> None:
    """PostgreSQL's COPY of ``rows`` (values prepared for psycopg: prepare them before, as an
    error in the middle of a COPY aborts the transaction) into ``table``, checked and its
    errors raised as through ``cursor.execute()``. Django's query log does not see it."""
    connection.validate_no_broken_transaction()
    quote = connection.ops.quote_name
    statement = f"COPY {quote(table)} ({', '.join(quote(c) for c in columns)}) FROM STDIN"
    with connection.wrap_database_errors, cursor.cursor.copy(statement) as copy:
        for row in rows:
            copy.write_row(row)
