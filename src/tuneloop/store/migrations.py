"""Append-only schema migrations. Never edit one that has shipped: add a new one at the end.

Each migration is a named function applied once inside a transaction; the `_migrations`
table records which ones ran, so any database moves forward to the current schema.
"""

from __future__ import annotations

import datetime as dt
from typing import Callable

import sqlalchemy as sa

MIGRATIONS: list[tuple[str, Callable[[sa.Connection], None]]] = []


def migration(fn):
    MIGRATIONS.append((fn.__name__, fn))
    return fn


@migration
def m001_initial(conn: sa.Connection) -> None:
    md = sa.MetaData()
    sa.Table(
        "datasets", md,
        sa.Column("id", sa.String(32), primary_key=True),
        sa.Column("sha256", sa.String(64), index=True, nullable=False),
        sa.Column("path", sa.String(1024), nullable=False),
        sa.Column("rows", sa.Integer, nullable=False),
        sa.Column("task", sa.String(32), nullable=True),
        sa.Column("created", sa.DateTime, nullable=False),
    )
    sa.Table(
        "runs", md,
        sa.Column("id", sa.String(32), primary_key=True),
        sa.Column("name", sa.String(256), nullable=True),
        sa.Column("task", sa.String(32), nullable=False),
        sa.Column("base_model", sa.String(512), nullable=False),
        sa.Column("method", sa.String(32), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("recipe", sa.JSON, nullable=False),
        sa.Column("train_dataset", sa.String(32), sa.ForeignKey("datasets.id"), nullable=True),
        sa.Column("test_dataset", sa.String(32), sa.ForeignKey("datasets.id"), nullable=True),
        sa.Column("metrics", sa.JSON, nullable=True),
        sa.Column("adapter_path", sa.String(1024), nullable=True),
        sa.Column("error", sa.String(4096), nullable=True),
        sa.Column("created", sa.DateTime, nullable=False),
        sa.Column("started", sa.DateTime, nullable=True),
        sa.Column("finished", sa.DateTime, nullable=True),
        sa.Column("wall_s", sa.Float, nullable=True),
    )
    sa.Table(
        "evaluations", md,
        sa.Column("id", sa.String(32), primary_key=True),
        sa.Column("run_id", sa.String(32), sa.ForeignKey("runs.id"), nullable=True),
        sa.Column("model", sa.String(512), nullable=False),
        sa.Column("dataset", sa.String(32), sa.ForeignKey("datasets.id"), nullable=True),
        sa.Column("strategy", sa.String(32), nullable=False),
        sa.Column("task", sa.String(32), nullable=False),
        sa.Column("metrics", sa.JSON, nullable=False),
        sa.Column("created", sa.DateTime, nullable=False),
    )
    md.create_all(conn)


@migration
def m002_evaluation_train_dataset(conn: sa.Connection) -> None:
    # Baselines depend on the training data too (label set, shots): key them by it.
    conn.execute(sa.text("ALTER TABLE evaluations ADD COLUMN train_dataset VARCHAR(32)"))


def migrate(engine: sa.Engine) -> list[str]:
    """Apply every migration not yet recorded; returns the names applied."""
    applied = []
    with engine.begin() as conn:
        conn.execute(sa.text("CREATE TABLE IF NOT EXISTS _migrations "
                             "(name VARCHAR(128) PRIMARY KEY, applied VARCHAR(32))"))
        done = {row[0] for row in conn.execute(sa.text("SELECT name FROM _migrations"))}
    for name, fn in MIGRATIONS:
        if name in done:
            continue
        with engine.begin() as conn:
            fn(conn)
            conn.execute(sa.text("INSERT INTO _migrations (name, applied) VALUES (:n, :t)"),
                         {"n": name, "t": dt.datetime.now(dt.timezone.utc).isoformat()})
        applied.append(name)
    return applied
