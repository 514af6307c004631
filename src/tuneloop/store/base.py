"""What every table module shares: the declarative base, the clock and the id scheme."""

from __future__ import annotations

import datetime as dt
import secrets

from sqlalchemy.orm import DeclarativeBase


class Base(DeclarativeBase):
    pass


def utcnow() -> dt.datetime:
    """Now in UTC, without a zone (as the tables store it: SQLite keeps no zone)."""
    return dt.datetime.now(dt.timezone.utc).replace(tzinfo=None)


def new_id(prefix: str) -> str:
    return f"{prefix}-{utcnow():%Y%m%d}-{secrets.token_hex(3)}"
