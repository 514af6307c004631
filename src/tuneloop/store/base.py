"""What every table module shares: the declarative base, the clock and the id scheme."""

from __future__ import annotations

import datetime as dt
import secrets

from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError
from sqlalchemy.orm import DeclarativeBase


class Base(DeclarativeBase):
    pass


def utcnow() -> dt.datetime:
    """Now in UTC, without a zone (as the tables store it: SQLite keeps no zone)."""
    return dt.datetime.now(dt.timezone.utc).replace(tzinfo=None)


def new_id(prefix: str) -> str:
    return f"{prefix}-{utcnow():%Y%m%d}-{secrets.token_hex(3)}"


def unavailable(exc: BaseException) -> bool:
    """Whether a database error means the registry cannot be reached just now (its server is
    down or restarting, a connection was cut, SQLite's file is locked past its timeout), as
    against a fault in a query: the first is answered "retry shortly", the second is a bug."""
    if not isinstance(exc, DBAPIError):
        return False
    if exc.connection_invalidated:
        return True
    if not isinstance(exc, (OperationalError, InterfaceError)):
        return False
    # SQLite's OperationalError also names schema faults ("no such table"): only a lock is
    # "unavailable" there; a server database's OperationalError is about its connection
    message = str(exc.orig).lower()
    sqlite = type(exc.orig).__module__.startswith("sqlite3")
    return not sqlite or "locked" in message or "busy" in message
