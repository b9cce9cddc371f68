"""Who is calling the vault's API, what they may do, and the audit record of it.

Credentials
    **API token** ``dyt_`` + 43 URL-safe characters (256 random bits), sent as
    ``Authorization: Bearer <token>``. The catalog keeps only the SHA-256 hex of the whole token
    (``Token.secret_hash``). A token belongs to a user (and has the user's role), to a host's
    agent (role ``agent``), or to nobody (a service token with a role of its own); it may expire
    and can be revoked.

    **Enrollment token** ``dye1.<fingerprint>.<secret>``: the SHA-256 fingerprint of the vault's
    CA (64 lower-case hex digits, no colons) and 43 URL-safe characters. An agent pins the CA by
    the fingerprint before it trusts the vault (``GET /ca``), then spends the token once at
    ``POST /enroll`` for an agent token. The catalog keeps the SHA-256 hex of the secret in an
    ``Enrollment`` row with its expiry; ``used`` is set when it is spent.

    **Passwords** of users (optional; for the console) are Argon2id hashes in PHC form.

Roles
    ========  ==================================================================================
    admin     everything
    operator  read everything; manage policies and volumes, run a backup now, lock snapshots
    viewer    read everything
    agent     read its own host and that host's volumes, snapshots and jobs; nothing else
    ========  ==================================================================================

Caching
    An authenticated token is trusted for :data:`PRINCIPAL_TTL` (5 s) without another catalog
    lookup (an agent makes hundreds of requests a run). Revoking a token, re-enrolling a host or
    deleting a user through the API clears that cache at once; a change made from another
    process (``dingyuan vault token ...``) takes effect within those 5 s.

Audit
    Every refusal (401, 403) and every mutating call (POST, PUT, PATCH, DELETE), whether it
    succeeds or is refused, becomes an ``AuditEvent``: actor (``user:alice``, ``host:web1``,
    ``token:7`` or ``anonymous``), action (``DELETE /api/v1/snapshots/{snapshot_id}``: the method
    and the route), target, outcome (``ok``, ``denied``, ``invalid``, ``error``) and a detail
    with the reason and the client's address. A success is written in the same transaction as
    the change (:func:`audit`, or :func:`get_session` for a handler that did not call it); a
    refusal in a transaction of its own (:func:`record_event`), since the request's is rolled back.

Dependencies for routers (also those of other subsystems):
:func:`get_context` / ``ContextDep``, :func:`get_session` / ``SessionDep``,
:func:`current_principal` / ``PrincipalDep``, :func:`require` and :func:`audit`.
"""

from __future__ import annotations

import hashlib
import re
import secrets
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any

from cryptography.exceptions import InvalidKey
from cryptography.hazmat.primitives.kdf.argon2 import Argon2id
from fastapi import Depends, Request, params
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy import Engine, select, update
from sqlalchemy.orm import Session

from ..catalog.models import AuditEvent, Enrollment, Host, Token, User
from ..errors import Forbidden, Unauthenticated, UsageError
from ..repository.crypto import KdfParams
from .config import VaultConfig
from .context import VaultContext

API_PREFIX = "/api/v1"  # every route of the API is under it
API_TOKEN_PREFIX = "dyt_"
ENROLLMENT_PREFIX = "dye1"
_SECRET = r"[A-Za-z0-9_-]{43}"  # secrets.token_urlsafe(32)
API_TOKEN_RE = re.compile(rf"{API_TOKEN_PREFIX}{_SECRET}")
ENROLLMENT_TOKEN_RE = re.compile(rf"{ENROLLMENT_PREFIX}\.([0-9a-f]{{64}})\.({_SECRET})")

ADMIN, OPERATOR, VIEWER, AGENT = "admin", "operator", "viewer", "agent"
USER_ROLES = (ADMIN, OPERATOR, VIEWER)
READERS = USER_ROLES  # read everything
MANAGERS = (ADMIN, OPERATOR)  # policies, volumes, run now, lock
OWN_HOST_READERS = (*USER_ROLES, AGENT)  # an agent sees its own host only

MUTATING = frozenset({"POST", "PUT", "PATCH", "DELETE"})
NO_PASSWORD = "!"  # stored for a user who signs in with tokens only

# column lengths of AuditEvent
_ACTION_LEN, _TARGET_LEN, _ACTOR_LEN = 64, 255, 255


def utcnow() -> datetime:
    return datetime.now(UTC)


# secrets --------------------------------------------------------------------------------------
def hash_secret(secret: str) -> str:
    """The SHA-256 hex the catalog keeps instead of a secret."""
    return hashlib.sha256(secret.encode()).hexdigest()


def new_api_token() -> str:
    return API_TOKEN_PREFIX + secrets.token_urlsafe(32)


def ca_fingerprint_hex(cfg: VaultConfig) -> str:
    """The vault CA's SHA-256 fingerprint as 64 lower-case hex digits (as in enrollment tokens)."""
    return cfg.ca_fingerprint().replace(":", "").lower()


def hash_password(password: str, kdf: KdfParams | None = None) -> str:
    """An Argon2id hash of ``password`` in PHC form (``$argon2id$v=19$m=...``)."""
    p = kdf or KdfParams.from_env()
    return Argon2id(
        salt=secrets.token_bytes(16),
        length=32,
        iterations=p.iterations,
        lanes=p.lanes,
        memory_cost=p.memory_kib,
    ).derive_phc_encoded(password.encode())


def verify_password(password: str, stored: str) -> bool:
    if not stored.startswith("$argon2id$"):
        return False  # NO_PASSWORD, or nothing we wrote
    try:
        Argon2id.verify_phc_encoded(password.encode(), stored)
    except (InvalidKey, ValueError):
        return False
    return True


# principals -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Principal:
    """An authenticated caller. ``host_id`` is set for an agent, which sees only that host."""

    actor: str
    role: str
    host_id: int | None = None
    token_id: int | None = None

    def may_read_host(self, host_id: int | None) -> bool:
        return self.role != AGENT or (host_id is not None and host_id == self.host_id)

    def check_host(self, host_id: int | None, what: str) -> None:
        """Refuse (403) an agent that asks for ``what`` of a host other than its own."""
        if not self.may_read_host(host_id):
            raise Forbidden(f"an agent may read its own host's data only, not {what}")


ANONYMOUS = Principal(actor="anonymous", role="")


def issue_token(
    session: Session,
    role: str,
    *,
    user: User | None = None,
    host: Host | None = None,
    expires: datetime | None = None,
) -> tuple[Token, str]:
    """Add a new API token to ``session``; returns the row and the secret (shown once)."""
    if user is not None and host is not None:
        raise UsageError("a token belongs to a user or to a host, not both")
    if role not in (*USER_ROLES, AGENT) or (role == AGENT) != (host is not None):
        raise UsageError(f"role {role!r} does not fit this token (agent tokens belong to a host)")
    secret = new_api_token()
    row = Token(
        user_id=user.id if user else None,
        host_id=host.id if host else None,
        role=role,
        secret_hash=hash_secret(secret),
        expires=expires,
        revoked=False,
    )
    session.add(row)
    session.flush()
    return row, secret


def issue_enrollment(
    session: Session, cfg: VaultConfig, host_name: str, expires_in: timedelta
) -> tuple[Enrollment, str]:
    """Add a one-time enrollment for ``host_name``; returns the row and the token (shown once)."""
    secret = secrets.token_urlsafe(32)
    token = f"{ENROLLMENT_PREFIX}.{ca_fingerprint_hex(cfg)}.{secret}"
    row = Enrollment(host_name=host_name, secret_hash=hash_secret(secret), expires=utcnow() + expires_in)
    session.add(row)
    session.flush()
    return row, token


def redeem_enrollment(session: Session, cfg: VaultConfig, token: str) -> Enrollment:
    """Check an enrollment token and mark it used (in ``session``'s transaction)."""
    m = ENROLLMENT_TOKEN_RE.fullmatch(token)
    if m is None:
        raise Unauthenticated("malformed enrollment token (expected dye1.<CA fingerprint>.<secret>)")
    if m.group(1) != ca_fingerprint_hex(cfg):
        raise Unauthenticated("this enrollment token was made by another vault (its CA fingerprint differs)")
    row = session.scalars(select(Enrollment).where(Enrollment.secret_hash == hash_secret(m.group(2)))).first()
    now = utcnow()
    if row is None:
        raise Unauthenticated("unknown enrollment token; ask the vault's administrator for a new one")
    if row.used is not None:
        raise Unauthenticated(
            f"this enrollment token was already used at {row.used.isoformat()}; enrollment tokens "
            "work once, ask for a new one"
        )
    if row.expires <= now:
        raise Unauthenticated(
            f"this enrollment token expired at {row.expires.isoformat()}; ask for a new one"
        )
    # a conditional update, so two agents racing with one token cannot both spend it
    spent = session.execute(
        update(Enrollment).where(Enrollment.id == row.id, Enrollment.used.is_(None)).values(used=now)
    )
    if getattr(spent, "rowcount", 1) != 1:
        raise Unauthenticated("this enrollment token was just used by another request")
    session.refresh(row)
    return row


def authenticate(session: Session, token: str) -> Principal:
    """The principal of an API token; :class:`Unauthenticated` with the reason otherwise."""
    if API_TOKEN_RE.fullmatch(token) is None:
        raise Unauthenticated("malformed API token (dingyuan API tokens start with 'dyt_')")
    row = session.scalars(select(Token).where(Token.secret_hash == hash_secret(token))).first()
    if row is None:
        raise Unauthenticated("unknown API token")
    if row.revoked:
        raise Unauthenticated("this API token was revoked; ask an administrator for a new one")
    if row.expires is not None and row.expires <= utcnow():
        raise Unauthenticated(
            f"this API token expired at {row.expires.isoformat()}; ask an administrator for a new one"
        )
    if row.user_id is not None:
        user = session.get(User, row.user_id)
        actor = f"user:{user.name}" if user else f"token:{row.id}"
    elif row.host_id is not None:
        host = session.get(Host, row.host_id)
        actor = f"host:{host.name}" if host else f"token:{row.id}"
    else:
        actor = f"token:{row.id}"
    return Principal(actor=actor, role=row.role, host_id=row.host_id, token_id=row.id)


# audit ----------------------------------------------------------------------------------------
def action_of(request: Request) -> str:
    """``METHOD /api/v1/route/{template}`` of a request (the raw path if no route matched)."""
    route = getattr(request.scope.get("route"), "path", None)
    if route is None:
        path = request.url.path
    else:  # FastAPI gives the route's path relative to the prefix it was included under
        path = route if route.startswith(API_PREFIX) else API_PREFIX + route
    return f"{request.method} {path}"[:_ACTION_LEN]


def _client(request: Request) -> str:
    return request.client.host if request.client else ""


def audit_event(
    actor: str, action: str, target: str, outcome: str, detail: dict[str, Any] | None = None
) -> AuditEvent:
    """An audit row, with its strings cut to the columns' lengths."""
    return AuditEvent(
        time=utcnow(),
        actor=actor[:_ACTOR_LEN],
        action=action[:_ACTION_LEN],
        target=target[:_TARGET_LEN],
        outcome=outcome,
        detail=detail or {},
    )


def record_event(
    engine: Engine, actor: str, action: str, target: str, outcome: str, detail: dict[str, Any] | None = None
) -> None:
    """Write one audit event in a transaction of its own (for refusals: the request's rolled back)."""
    with Session(engine) as session, session.begin():
        session.add(audit_event(actor, action, target, outcome, detail))


def audit(
    session: Session,
    request: Request,
    principal: Principal,
    *,
    target: str | None = None,
    outcome: str = "ok",
    detail: dict[str, Any] | None = None,
) -> None:
    """Record the request's action in ``session``, so it commits (or not) with the change."""
    session.add(
        audit_event(
            principal.actor,
            action_of(request),
            target or request.url.path,
            outcome,
            {**(detail or {}), "client": _client(request)},
        )
    )
    request.state.audited = True


def refusal_actor(request: Request, engine: Engine) -> str:
    """The actor to name for a refused request: its principal if it got that far, else the owner
    of a valid bearer token it carried (the request failed for another reason), else anonymous."""
    principal = getattr(request.state, "principal", None)
    if isinstance(principal, Principal):
        return principal.actor
    token = _bearer_token(request)
    if token:
        try:
            with Session(engine) as session:
                return authenticate(session, token).actor
        except Unauthenticated:
            pass
    return ANONYMOUS.actor


def record_refusal(request: Request, engine: Engine, status: int, kind: str, message: str) -> None:
    """Audit a refused request (any 401 or 403, and any failed mutating call)."""
    outcome = "denied" if status in (401, 403, 409) else "invalid" if status < 500 else "error"
    record_event(
        engine,
        refusal_actor(request, engine),
        action_of(request),
        request.url.path,
        outcome,
        {"status": status, "error": kind, "reason": message[:1000], "client": _client(request)},
    )


# FastAPI dependencies -------------------------------------------------------------------------
def get_context(request: Request) -> VaultContext:
    ctx = request.app.state.ctx
    assert isinstance(ctx, VaultContext)
    return ctx


ContextDep = Annotated[VaultContext, Depends(get_context)]


def get_session(request: Request) -> Iterator[Session]:
    """A catalog session per request, committed after the handler returns (before the response is
    sent) and rolled back if it raises. A mutating request that succeeded without calling
    :func:`audit` gets a generic audit event in the same transaction."""
    with Session(get_context(request).engine, expire_on_commit=False) as session:
        try:
            yield session
        except BaseException:
            session.rollback()
            raise
        if request.method in MUTATING and not getattr(request.state, "audited", False):
            principal = getattr(request.state, "principal", ANONYMOUS)
            audit(session, request, principal)
        session.commit()


#: ``scope="function"``: the commit happens before the response leaves, so a client never sees
#: success for a change that did not commit.
SessionDep = Annotated[Session, Depends(get_session, scope="function")]

_bearer = HTTPBearer(auto_error=False, description="An API token: `Authorization: Bearer dyt_...`")


def _bearer_token(request: Request) -> str | None:
    header = request.headers.get("authorization")
    if not header:
        return None
    scheme, _, token = header.partition(" ")
    return token.strip() if scheme.lower() == "bearer" else None


def current_principal(
    request: Request,
    session: SessionDep,
    # declared for the OpenAPI document (the "Authorize" button); the header is parsed below so
    # that a missing and a malformed header get different messages
    _credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> Principal:
    """The caller, from ``Authorization: Bearer <token>``; 401 (audited) otherwise."""
    header = request.headers.get("authorization")
    if not header:
        raise Unauthenticated(
            "no credentials: send 'Authorization: Bearer <API token>' (an administrator makes one "
            "with 'dingyuan vault token create' or POST /api/v1/tokens)"
        )
    token = _bearer_token(request)
    if not token:
        raise Unauthenticated("malformed Authorization header: use 'Authorization: Bearer <API token>'")
    principal = _cached_principal(session, token)
    request.state.principal = principal
    return principal


PrincipalDep = Annotated[Principal, Depends(current_principal)]

#: How long an authenticated token is trusted without looking at the catalog again: an agent makes
#: hundreds of requests a run. A revoked or expired token is refused at most this much later.
PRINCIPAL_TTL = 5.0
_principals: dict[str, tuple[float, Principal]] = {}
_principals_lock = threading.Lock()


def _cached_principal(session: Session, token: str) -> Principal:
    key = hash_secret(token)
    now = time.monotonic()
    with _principals_lock:
        hit = _principals.get(key)
    if hit is not None and now - hit[0] < PRINCIPAL_TTL:
        return hit[1]
    principal = authenticate(session, token)
    with _principals_lock:
        if len(_principals) > 10_000:
            _principals.clear()
        _principals[key] = (now, principal)
    return principal


def forget_principals() -> None:
    """Drop every cached authentication (after a token is revoked or a user deleted)."""
    with _principals_lock:
        _principals.clear()


def require(*roles: str) -> params.Depends:
    """A dependency: the caller, if their role is one of ``roles``; 403 (audited) otherwise.

    Use as ``principal: Annotated[Principal, require(ADMIN)]`` or ``dependencies=[require(...)]``.
    """
    allowed = frozenset(roles)

    def check(request: Request, principal: PrincipalDep) -> Principal:
        if principal.role not in allowed:
            raise Forbidden(
                f"{request.method} {request.url.path} needs the role {' or '.join(sorted(allowed))}; "
                f"this credential has the role {principal.role}"
            )
        return principal

    depends: params.Depends = Depends(check)
    return depends
