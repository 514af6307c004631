"""The registry: datasets, runs and evaluations in SQLite (or any SQLAlchemy URL).

Schema changes are append-only named migrations (store/migrations.py); every write is one
transaction. `TUNELOOP_DB_URL` points at PostgreSQL when a team outgrows one file.
"""

from __future__ import annotations

import datetime as dt
import json
import os
from pathlib import Path

from sqlalchemy import (JSON, DateTime, Float, ForeignKey, Integer, String, create_engine, event,
                        select)
from sqlalchemy.orm import Mapped, Session, mapped_column

from tuneloop.errors import TuneloopError
from tuneloop.store.base import Base, new_id, unavailable, utcnow  # noqa: F401  (re-exported)
from tuneloop.store.migrations import migrate




class Dataset(Base):
    __tablename__ = "datasets"
    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    sha256: Mapped[str] = mapped_column(String(64), index=True)
    path: Mapped[str] = mapped_column(String(1024))
    rows: Mapped[int] = mapped_column(Integer)
    task: Mapped[str | None] = mapped_column(String(32), nullable=True)
    created: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)


class DatasetVersion(Base):
    """A prepared dataset (`tuneloop data prepare`): its splits, lineage and the full report."""

    __tablename__ = "dataset_versions"
    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    name: Mapped[str | None] = mapped_column(String(256), nullable=True, index=True)
    parent: Mapped[str | None] = mapped_column(String(32), nullable=True)
    sha256: Mapped[str] = mapped_column(String(64))
    task: Mapped[str] = mapped_column(String(32))
    folder: Mapped[str] = mapped_column(String(1024))
    splits: Mapped[dict] = mapped_column(JSON)  # split → registered dataset id
    report: Mapped[dict] = mapped_column(JSON)
    created: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)


class Run(Base):
    __tablename__ = "runs"
    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    name: Mapped[str | None] = mapped_column(String(256), nullable=True)
    task: Mapped[str] = mapped_column(String(32))
    base_model: Mapped[str] = mapped_column(String(512))
    method: Mapped[str] = mapped_column(String(32))
    status: Mapped[str] = mapped_column(String(16), default="created")
    recipe: Mapped[dict] = mapped_column(JSON)
    train_dataset: Mapped[str | None] = mapped_column(ForeignKey("datasets.id"), nullable=True)
    test_dataset: Mapped[str | None] = mapped_column(ForeignKey("datasets.id"), nullable=True)
    metrics: Mapped[dict | None] = mapped_column(JSON, nullable=True)
    adapter_path: Mapped[str | None] = mapped_column(String(1024), nullable=True)
    error: Mapped[str | None] = mapped_column(String(4096), nullable=True)
    created: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)
    started: Mapped[dt.datetime | None] = mapped_column(DateTime, nullable=True)
    finished: Mapped[dt.datetime | None] = mapped_column(DateTime, nullable=True)
    wall_s: Mapped[float | None] = mapped_column(Float, nullable=True)


class Evaluation(Base):
    __tablename__ = "evaluations"
    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    run_id: Mapped[str | None] = mapped_column(ForeignKey("runs.id"), nullable=True)
    model: Mapped[str] = mapped_column(String(512))
    dataset: Mapped[str | None] = mapped_column(ForeignKey("datasets.id"), nullable=True)
    train_dataset: Mapped[str | None] = mapped_column(String(32), nullable=True)
    strategy: Mapped[str] = mapped_column(String(32))
    task: Mapped[str] = mapped_column(String(32))
    metrics: Mapped[dict] = mapped_column(JSON)
    created: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)


CONNECT_TIMEOUT_S = 5


class Registry:
    """A connection to the registry database, migrated to the latest schema on open."""

    def __init__(self, url: str):
        self.url = url
        if url.startswith("sqlite"):
            # Many server threads write (request log, feedback): wait for the lock instead of
            # failing, and let readers proceed while one writer commits (WAL).
            self.engine = create_engine(url, connect_args={"timeout": 60, "check_same_thread": False})
            event.listen(self.engine, "connect", _sqlite_pragmas)
        else:
            # a server that restarted leaves the pool's connections dead: each is tested as it
            # is taken (pre-ping) and replaced; a host that does not answer fails in seconds
            self.engine = create_engine(url, pool_pre_ping=True,
                                        connect_args={"connect_timeout": CONNECT_TIMEOUT_S})
        migrate(self.engine)

    @classmethod
    def open(cls, workspace: Path) -> "Registry":
        """The registry of a workspace: $TUNELOOP_DB_URL, else workspace/tuneloop.db."""
        workspace.mkdir(parents=True, exist_ok=True)
        url = os.environ.get("TUNELOOP_DB_URL") or f"sqlite:///{workspace / 'tuneloop.db'}"
        return cls(url)

    def session(self) -> Session:
        return Session(self.engine, expire_on_commit=False)

    def add_dataset(self, sha256: str, path: str, rows: int, task: str | None) -> Dataset:
        """Register a data file by content; the same content is the same dataset."""
        with self.session() as s, s.begin():
            found = s.scalars(select(Dataset).where(Dataset.sha256 == sha256)).first()
            if found:
                return found
            ds = Dataset(id="ds-" + sha256[:12], sha256=sha256, path=path, rows=rows, task=task)
            s.add(ds)
            return ds

    def add_version(self, version_id: str, report: dict, folder: Path) -> DatasetVersion:
        """Record a prepared version and register each split file, in one transaction."""
        with self.session() as s, s.begin():
            splits = {}
            for split, info in report["splits"].items():
                ds = s.scalars(select(Dataset).where(Dataset.sha256 == info["sha256"])).first()
                if ds is None:
                    ds = Dataset(id="ds-" + info["sha256"][:12], sha256=info["sha256"],
                                 path=str(folder / f"{split}.jsonl"), rows=info["rows"],
                                 task=report["task"])
                    s.add(ds)
                splits[split] = ds.id
            version = DatasetVersion(id=version_id, name=report.get("name"),
                                     parent=report.get("parent"), sha256=report["sha256"],
                                     task=report["task"], folder=str(folder), splits=splits,
                                     report=json.loads(to_json(report)))
            s.add(version)
            return version

    def get_version(self, version_id: str) -> DatasetVersion | None:
        with self.session() as s:
            found = s.get(DatasetVersion, version_id)
            if found is None and version_id:
                matches = s.scalars(select(DatasetVersion).where(
                    DatasetVersion.id.startswith(version_id))).all()
                found = matches[0] if len(matches) == 1 else None
            return found

    def latest_version_id(self, name: str | None) -> str | None:
        if not name:
            return None
        with self.session() as s:
            return s.scalars(select(DatasetVersion.id).where(DatasetVersion.name == name)
                             .order_by(DatasetVersion.created.desc())).first()

    def list_versions(self, limit: int = 50) -> list[DatasetVersion]:
        with self.session() as s:
            return list(s.scalars(select(DatasetVersion)
                                  .order_by(DatasetVersion.created.desc()).limit(limit)))

    def versions_holding(self, sha256: str) -> list[DatasetVersion]:
        """The prepared versions one of whose split files has this content."""
        with self.session() as s:
            return [v for v in s.scalars(select(DatasetVersion))
                    if any(info.get("sha256") == sha256
                           for info in (v.report.get("splits") or {}).values())]

    def add_run(self, **fields) -> Run:
        with self.session() as s, s.begin():
            run = Run(id=new_id("run"), **fields)
            s.add(run)
            return run

    def update_run(self, run_id: str, **fields) -> None:
        with self.session() as s, s.begin():
            run = s.get(Run, run_id)
            for key, value in fields.items():
                setattr(run, key, value)

    def get_run(self, run_id: str) -> Run:
        with self.session() as s:
            run = s.get(Run, run_id)
            if run is None:
                matches = s.scalars(select(Run).where(Run.id.startswith(run_id))).all()
                if len(matches) == 1:
                    return matches[0]
                raise TuneloopError(f"no run '{run_id}'; `tuneloop runs list` shows the runs")
            return run

    def list_runs(self, limit: int = 50) -> list[Run]:
        with self.session() as s:
            return list(s.scalars(select(Run).order_by(Run.created.desc()).limit(limit)))

    def add_evaluation(self, id: str | None = None, **fields) -> Evaluation:
        with self.session() as s, s.begin():
            ev = Evaluation(id=id or new_id("ev"), **fields)
            s.add(ev)
            return ev

    def baselines(self, model: str, dataset: str, train_dataset: str,
                  settings: dict[str, dict]) -> dict[str, dict]:
        """The latest metrics of each baseline strategy of a base model on a test/train pair,
        scored with the settings given for that strategy (prompt budget, seed, documents)."""
        with self.session() as s:
            rows = s.scalars(select(Evaluation).where(
                Evaluation.model == model, Evaluation.dataset == dataset,
                Evaluation.train_dataset == train_dataset, Evaluation.run_id.is_(None),
            ).order_by(Evaluation.created))
            return {row.strategy: row.metrics for row in rows
                    if row.metrics.get("settings") == settings.get(row.strategy)}

    def evaluations(self, run_id: str | None = None) -> list[Evaluation]:
        with self.session() as s:
            q = select(Evaluation).order_by(Evaluation.created)
            if run_id:
                q = q.where(Evaluation.run_id == run_id)
            return list(s.scalars(q))


def _sqlite_pragmas(dbapi_connection, _record) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA busy_timeout=60000")
    cursor.close()


def to_json(obj) -> str:
    return json.dumps(obj, default=str)
from tuneloop.store import serving  # noqa: E402,F401  (registers the serving tables)
