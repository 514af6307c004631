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


@migration
def m003_serving(conn: sa.Connection) -> None:
    # Serving: tenants and their hashed API keys, deployments with their history, the request
    # log, feedback, uploaded files and fine-tuning jobs with their events.
    md = sa.MetaData()
    # runs exists already: named here only so foreign keys resolve (create_all skips it).
    sa.Table("runs", md, sa.Column("id", sa.String(32), primary_key=True))
    sa.Table(
        "tenants", md,
        sa.Column("name", sa.String(64), primary_key=True),
        sa.Column("bases", sa.JSON, nullable=True),
        sa.Column("created", sa.DateTime, nullable=False),
    )
    sa.Table(
        "api_keys", md,
        sa.Column("id", sa.String(32), primary_key=True),
        sa.Column("tenant", sa.String(64), sa.ForeignKey("tenants.name"), nullable=False),
        sa.Column("prefix", sa.String(16), nullable=False),
        sa.Column("sha256", sa.String(64), nullable=False, unique=True),
        sa.Column("name", sa.String(128), nullable=True),
        sa.Column("rate_per_minute", sa.Integer, nullable=False),
        sa.Column("created", sa.DateTime, nullable=False),
        sa.Column("revoked", sa.DateTime, nullable=True),
    )
    sa.Table(
        "deployments", md,
        sa.Column("name", sa.String(256), primary_key=True),
        sa.Column("tenant", sa.String(64), sa.ForeignKey("tenants.name"), nullable=False),
        sa.Column("run_id", sa.String(32), sa.ForeignKey("runs.id"), nullable=False),
        sa.Column("updated", sa.DateTime, nullable=False),
    )
    sa.Table(
        "deployment_events", md,
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("name", sa.String(256), nullable=False, index=True),
        sa.Column("tenant", sa.String(64), nullable=False),
        sa.Column("action", sa.String(16), nullable=False),
        sa.Column("run_id", sa.String(32), nullable=True),
        sa.Column("previous_run_id", sa.String(32), nullable=True),
        sa.Column("forced", sa.Boolean, nullable=False),
        sa.Column("reason", sa.String(1024), nullable=True),
        sa.Column("created", sa.DateTime, nullable=False),
    )
    sa.Table(
        "completions", md,
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column("tenant", sa.String(64), nullable=False, index=True),
        sa.Column("key_id", sa.String(32), nullable=True),
        sa.Column("model", sa.String(256), nullable=False, index=True),
        sa.Column("run_id", sa.String(32), nullable=True),
        sa.Column("request", sa.JSON, nullable=False),
        sa.Column("response", sa.JSON, nullable=False),
        sa.Column("prompt_tokens", sa.Integer, nullable=False),
        sa.Column("completion_tokens", sa.Integer, nullable=False),
        sa.Column("latency_ms", sa.Float, nullable=False),
        sa.Column("created", sa.DateTime, nullable=False, index=True),
    )
    sa.Table(
        "feedback", md,
        sa.Column("id", sa.String(32), primary_key=True),
        sa.Column("completion_id", sa.String(64), sa.ForeignKey("completions.id"), nullable=False),
        sa.Column("tenant", sa.String(64), nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("choice", sa.Integer, nullable=False),
        sa.Column("rating", sa.Integer, nullable=True),
        sa.Column("correction", sa.Text, nullable=True),
        sa.Column("other_completion_id", sa.String(64), nullable=True),
        sa.Column("comment", sa.String(2048), nullable=True),
        sa.Column("created", sa.DateTime, nullable=False),
    )
    sa.Table(
        "files", md,
        sa.Column("id", sa.String(32), primary_key=True),
        sa.Column("tenant", sa.String(64), nullable=False, index=True),
        sa.Column("filename", sa.String(512), nullable=False),
        sa.Column("purpose", sa.String(32), nullable=False),
        sa.Column("bytes", sa.Integer, nullable=False),
        sa.Column("sha256", sa.String(64), nullable=False),
        sa.Column("path", sa.String(1024), nullable=False),
        sa.Column("created", sa.DateTime, nullable=False),
    )
    sa.Table(
        "jobs", md,
        sa.Column("id", sa.String(32), primary_key=True),
        sa.Column("tenant", sa.String(64), nullable=False, index=True),
        sa.Column("model", sa.String(256), nullable=False),
        sa.Column("training_file", sa.String(32), nullable=False),
        sa.Column("validation_file", sa.String(32), nullable=True),
        sa.Column("method", sa.JSON, nullable=False),
        sa.Column("suffix", sa.String(64), nullable=True),
        sa.Column("seed", sa.Integer, nullable=False),
        sa.Column("metadata", sa.JSON, nullable=True),
        sa.Column("status", sa.String(24), nullable=False, index=True),
        sa.Column("cancel_requested", sa.Boolean, nullable=False),
        sa.Column("run_id", sa.String(32), nullable=True),
        sa.Column("fine_tuned_model", sa.String(256), nullable=True),
        sa.Column("trained_tokens", sa.Integer, nullable=True),
        sa.Column("error", sa.JSON, nullable=True),
        sa.Column("worker", sa.String(64), nullable=True),
        sa.Column("created", sa.DateTime, nullable=False),
        sa.Column("started", sa.DateTime, nullable=True),
        sa.Column("finished", sa.DateTime, nullable=True),
    )
    sa.Table(
        "job_events", md,
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("job_id", sa.String(32), sa.ForeignKey("jobs.id"), nullable=False, index=True),
        sa.Column("level", sa.String(8), nullable=False),
        sa.Column("message", sa.String(2048), nullable=False),
        sa.Column("data", sa.JSON, nullable=True),
        sa.Column("created", sa.DateTime, nullable=False),
    )
    md.create_all(conn)


@migration
def m004_dataset_versions(conn: sa.Connection) -> None:
    # `tuneloop data prepare`: each prepared dataset with its parent, splits and report.
    md = sa.MetaData()
    sa.Table(
        "dataset_versions", md,
        sa.Column("id", sa.String(32), primary_key=True),
        sa.Column("name", sa.String(256), nullable=True, index=True),
        sa.Column("parent", sa.String(32), nullable=True),
        sa.Column("sha256", sa.String(64), nullable=False),
        sa.Column("task", sa.String(32), nullable=False),
        sa.Column("folder", sa.String(1024), nullable=False),
        sa.Column("splits", sa.JSON, nullable=False),
        sa.Column("report", sa.JSON, nullable=False),
        sa.Column("created", sa.DateTime, nullable=False),
    )
    md.create_all(conn)


@migration
def m005_job_recipe(conn: sa.Connection) -> None:
    # A fine-tuning job may carry tuneloop recipe keys (task, method, lora, epochs, ...).
    conn.execute(sa.text("ALTER TABLE jobs ADD COLUMN recipe JSON"))


@migration
def m006_job_lease(conn: sa.Connection) -> None:
    # A job's claim is a lease its worker renews, so a worker on a machine that is gone loses
    # the job when the lease runs out and another worker resumes it.
    kind = sa.DateTime().compile(dialect=conn.dialect)
    conn.execute(sa.text(f"ALTER TABLE jobs ADD COLUMN lease_until {kind}"))


@migration
def m007_rate_events(conn: sa.Connection) -> None:
    # Each key's requests of the last minute, shared by every server process on the registry,
    # so that a key's rate limit holds across processes and machines.
    md = sa.MetaData()
    sa.Table("rate_events", md,
             sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
             sa.Column("key_id", sa.String(32), nullable=False),
             sa.Column("t", sa.Float, nullable=False),
             sa.Index("ix_rate_events_key_t", "key_id", "t"))
    md.create_all(conn)


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
