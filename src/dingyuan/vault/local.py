"""Administration on the vault's own machine, without the API: the first admin token, enrollment
tokens and API tokens, written straight into the catalog (the CLI's ``vault init``,
``vault enroll-token`` and ``vault token create``). Each is audited like its API counterpart,
with the actor ``local:<login name>``.
"""

from __future__ import annotations

import getpass
import re
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.orm import Session

from ..catalog.db import open_catalog
from ..catalog.models import User
from ..errors import UsageError
from .auth import ADMIN, NO_PASSWORD, USER_ROLES, audit_event, issue_enrollment, issue_token, utcnow
from .config import VaultConfig
from .schemas import NAME_PATTERN
from .tls import write_atomic

ADMIN_TOKEN_FILE = "admin.token"
FIRST_ADMIN = "admin"


@dataclass
class Issued:
    """A credential just made: the secret is shown once and never stored."""

    id: int
    secret: str
    role: str
    owner: str  # "user:NAME", "host:NAME" or "service"
    expires: datetime | None


def _actor() -> str:
    try:
        return f"local:{getpass.getuser()}"
    except (KeyError, OSError):
        return "local:unknown"


def _check_name(kind: str, name: str) -> None:
    if re.fullmatch(NAME_PATTERN, name) is None:
        raise UsageError(
            f"{kind} name {name!r} is not allowed: use letters, digits, '.', '_' and '-' (at most 128, "
            "starting with a letter or digit)"
        )


def create_token(
    cfg: VaultConfig, role: str, user: str | None = None, expires_in: timedelta | None = None
) -> Issued:
    """An API token with ``role``: a service token, or (``user``) a token of that user, who is
    created with ``role`` if absent (and must have ``role`` if present)."""
    if role not in USER_ROLES:
        raise UsageError(f"role must be one of {', '.join(USER_ROLES)} (agents get theirs by enrolling)")
    if user is not None:
        _check_name("user", user)
    engine = open_catalog(cfg.catalog_url)
    try:
        with Session(engine) as session, session.begin():
            row = None
            if user is not None:
                row = session.scalars(select(User).where(User.name == user)).first()
                if row is None:
                    row = User(name=user, role=role, password_hash=NO_PASSWORD)
                    session.add(row)
                    session.flush()
                elif row.role != role:
                    raise UsageError(f"user {user} has the role {row.role}, not {role}")
            expires = utcnow() + expires_in if expires_in else None
            token, secret = issue_token(session, role, user=row, expires=expires)
            session.add(
                audit_event(_actor(), "token create", f"token:{token.id}", "ok", {"role": role, "user": user})
            )
            return Issued(token.id, secret, role, f"user:{user}" if user else "service", expires)
    finally:
        engine.dispose()


def create_enrollment(cfg: VaultConfig, host: str, expires_in: timedelta) -> Issued:
    """A one-time enrollment token for ``host``."""
    _check_name("host", host)
    if expires_in <= timedelta(0):
        raise UsageError("an enrollment token must expire in the future")
    engine = open_catalog(cfg.catalog_url)
    try:
        with Session(engine) as session, session.begin():
            row, token = issue_enrollment(session, cfg, host, expires_in)
            session.add(audit_event(_actor(), "enroll-token", f"host:{host}", "ok", {"enrollment": row.id}))
            return Issued(row.id, token, "enrollment", f"host:{host}", row.expires)
    finally:
        engine.dispose()


def create_first_admin(cfg: VaultConfig) -> Path:
    """At init: the user ``admin`` and an API token of theirs in ``<vault dir>/admin.token``
    (mode 0600), so the administrator can use the API at once."""
    issued = create_token(cfg, ADMIN, FIRST_ADMIN)
    path = cfg.dir / ADMIN_TOKEN_FILE
    write_atomic(path, (issued.secret + "\n").encode(), 0o600)
    return path
