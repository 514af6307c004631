"""The registry: migrations apply once, rows round-trip, runs resolve by prefix.

Runs against SQLite; set TUNELOOP_TEST_PG_URL (postgresql+psycopg://...) to run the same
tests against PostgreSQL.
"""

from __future__ import annotations

import pytest
import sqlalchemy as sa

from tests.conftest import DB_KINDS, fresh_db_url
from tuneloop.errors import TuneloopError
from tuneloop.store import Registry
from tuneloop.store.migrations import MIGRATIONS, migrate

@pytest.fixture(params=DB_KINDS)
def registry(request, tmp_path):
    return Registry(fresh_db_url(request.param, tmp_path))


def test_migrations_apply_once(registry):
    assert migrate(registry.engine) == []  # already applied on open
    with registry.engine.connect() as conn:
        names = [r[0] for r in conn.execute(sa.text("SELECT name FROM _migrations"))]
    assert names == [name for name, _ in MIGRATIONS]


def test_runs_datasets_evaluations_round_trip(registry):
    ds = registry.add_dataset("ab" * 32, "/data/train.jsonl", 10, "classify")
    assert registry.add_dataset("ab" * 32, "/elsewhere.jsonl", 10, "classify").id == ds.id
    run = registry.add_run(name="x", task="classify", base_model="m", method="lora",
                           status="running", recipe={"task": "classify"}, train_dataset=ds.id)
    registry.update_run(run.id, status="done", metrics={"accuracy": 0.9})
    got = registry.get_run(run.id[:-2])  # a unique prefix is enough
    assert got.status == "done" and got.metrics == {"accuracy": 0.9}
    registry.add_evaluation(run_id=run.id, model=run.id, dataset=ds.id, strategy="fine-tuned",
                            task="classify", metrics={"accuracy": 0.9})
    assert [e.metrics["accuracy"] for e in registry.evaluations(run.id)] == [0.9]
    assert [r.id for r in registry.list_runs()] == [run.id]
    with pytest.raises(TuneloopError, match="no run 'run-nope'"):
        registry.get_run("run-nope")


def test_a_failed_write_leaves_nothing(registry):
    with pytest.raises(Exception):
        registry.add_run(name="bad", task="classify")  # missing NOT NULL columns
    assert registry.list_runs() == []
