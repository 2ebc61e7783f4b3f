"""The database a benchmark runs on: a fresh one for each run."""

from __future__ import annotations

from pathlib import Path


def fresh_database(database_url: str, workdir: Path, name: str) -> str:
    """The URL of an empty database for one benchmark: on the PostgreSQL server of
    ``database_url``, ``name`` dropped (its sessions ended) and created again; without a URL,
    a SQLite file in ``workdir``."""
    if not database_url:
        return f"sqlite:///{workdir / 'bench.sqlite3'}"
    import psycopg
    from psycopg import sql

    base = database_url.rsplit("/", 1)[0]
    with psycopg.connect(f"{base}/postgres", autocommit=True) as conn:
        conn.execute(
            sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
        )
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    return f"{base}/{name}"
