"""Tenants and API keys. A key is shown once, at creation; the registry keeps only its SHA-256
(keys are 256 random bits, so a fast hash is as safe as a slow one) and a short prefix for lists."""

from __future__ import annotations

import hashlib
import re
import secrets
import time
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request
from sqlalchemy import delete, func, select

from tuneloop.errors import TuneloopError
from tuneloop.serve.errors import ApiError
from tuneloop.store import Registry, utcnow, new_id
from tuneloop.store.serving import ApiKey, RateEvent, Tenant

KEY_PREFIX = "tl-"
TENANT_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")


@dataclass(frozen=True)
class Caller:
    """Who is calling: the tenant, the key's id and its rate limit."""

    tenant: str
    key_id: str | None
    rate_per_minute: int
    bases: tuple[str, ...] | None  # base models this tenant may call; None: all served


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def ensure_tenant(registry: Registry, name: str, bases: list[str] | None = None) -> Tenant:
    """The tenant `name`, created on first use (with the bases it may call, default all)."""
    if not TENANT_NAME.match(name):
        raise TuneloopError(f"tenant name '{name}' is not valid: use lower-case letters, digits, "
                            "'-' and '_' (at most 63 characters)")
    with registry.session() as s, s.begin():
        tenant = s.get(Tenant, name)
        if tenant is None:
            tenant = Tenant(name=name, bases=bases)
            s.add(tenant)
        elif bases is not None:
            tenant.bases = bases
        return tenant


def create_key(registry: Registry, tenant: str, name: str | None = None,
               rate_per_minute: int = 600, bases: list[str] | None = None) -> tuple[ApiKey, str]:
    """(row, secret) of a new key for `tenant`; the secret is not stored and cannot be shown again."""
    ensure_tenant(registry, tenant, bases)
    secret = KEY_PREFIX + secrets.token_urlsafe(32)
    with registry.session() as s, s.begin():
        row = ApiKey(id=new_id("key"), tenant=tenant, prefix=secret[:10], sha256=hash_key(secret),
                     name=name, rate_per_minute=rate_per_minute)
        s.add(row)
    return row, secret


def list_keys(registry: Registry, tenant: str | None = None) -> list[ApiKey]:
    with registry.session() as s:
        q = select(ApiKey).order_by(ApiKey.created)
        if tenant:
            q = q.where(ApiKey.tenant == tenant)
        return list(s.scalars(q))


def revoke_key(registry: Registry, key_id: str) -> ApiKey:
    """Revoke a key by id (or its unique prefix); it stops working on the next request."""
    with registry.session() as s, s.begin():
        matches = s.scalars(select(ApiKey).where(ApiKey.id.startswith(key_id))).all()
        if len(matches) != 1:
            raise TuneloopError(f"no single key matches '{key_id}'; `tuneloop keys list` shows them")
        matches[0].revoked = matches[0].revoked or utcnow()
        return matches[0]


def lookup(registry: Registry, secret: str) -> Caller | None:
    """The caller a presented key belongs to, or None for an unknown or revoked key."""
    with registry.session() as s:
        row = s.scalars(select(ApiKey).where(ApiKey.sha256 == hash_key(secret))).first()
        if row is None or row.revoked is not None:
            return None
        tenant = s.get(Tenant, row.tenant)
        bases = tuple(tenant.bases) if tenant.bases is not None else None
        return Caller(row.tenant, row.id, row.rate_per_minute, bases)


class RateLimiter:
    """Requests per key in a sliding 60-second window, counted in the registry, so that the
    limit holds across every server process (and machine) that shares it.

    A request is recorded first and counted with the others after: a request that makes the
    count exceed the limit removes its record and is refused. Two processes deciding at once
    can then both refuse, never both admit: the limit is never exceeded."""

    WINDOW_S = 60.0

    def __init__(self, registry: Registry):
        self.registry = registry

    def allow(self, key: str, per_minute: int) -> float | None:
        """None if the request may go ahead, else the seconds until it may."""
        now = time.time()
        since = now - self.WINDOW_S
        with self.registry.session() as s, s.begin():
            s.execute(delete(RateEvent).where(RateEvent.key_id == key, RateEvent.t <= since))
            mine = RateEvent(key_id=key, t=now)
            s.add(mine)
            s.flush()
            count, oldest = s.execute(select(func.count(), func.min(RateEvent.t)).where(
                RateEvent.key_id == key, RateEvent.t > since)).one()
            if count <= per_minute:
                return None
            s.delete(mine)
            return max(0.0, oldest + self.WINDOW_S - now)


def bearer(request: Request) -> str:
    """The token of an `Authorization: Bearer TOKEN` header ("" without one)."""
    header = request.headers.get("authorization", "")
    return header[7:].strip() if header.lower().startswith("bearer ") else ""


def caller(request: Request) -> Caller:
    """The authenticated caller of a request (401 without a valid key, 429 over its rate)."""
    settings = request.app.state.settings
    if not settings.auth:
        return Caller("default", None, 10**9, None)
    key = bearer(request)
    if not key:
        raise ApiError(401, "Missing API key: send it as 'Authorization: Bearer KEY' "
                       "(create one with `tuneloop keys create --tenant NAME`)",
                       code="missing_api_key")
    who = lookup(request.app.state.registry, key)
    if who is None:
        raise ApiError(401, "Incorrect API key provided.", code="invalid_api_key")
    wait = request.app.state.limiter.allow(who.key_id, who.rate_per_minute)
    if wait is not None:
        raise ApiError(429, f"Rate limit reached: {who.rate_per_minute} requests per minute for "
                       f"this key; retry in {wait:.1f} s", type="requests",
                       code="rate_limit_exceeded", headers={"retry-after": str(int(wait) + 1)})
    return who


CallerDep = Annotated[Caller, Depends(caller)]
