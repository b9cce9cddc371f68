"""SQLAlchemy models of the catalog.

Times are timezone-aware UTC datetimes in Python and stored as UTC (:class:`UTCDateTime`), so
SQLite, which keeps no zone, gives back aware datetimes too. The schema is created and upgraded
only by the alembic migrations in ``migrations/``; a test checks that they match these models.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any, ClassVar

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    CheckConstraint,
    DateTime,
    Dialect,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

#: Deterministic constraint names, so migrations can refer to them (and SQLite batch mode works).
NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

ROLES = ("admin", "operator", "viewer")
SCHEDULE_KINDS = ("interval", "cron")


def utcnow() -> datetime:
    return datetime.now(UTC)


class UTCDateTime(TypeDecorator[datetime]):
    """An aware datetime stored as UTC; naive datetimes are refused rather than guessed."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None or value.utcoffset() is None:
            raise ValueError(f"naive datetime {value!r}: the catalog stores aware UTC times only")
        value = value.astimezone(UTC)
        # SQLite keeps no zone; store the plain UTC wall time there
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value.astimezone(UTC)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map: ClassVar[dict[Any, Any]] = {datetime: UTCDateTime(), dict[str, Any]: JSON()}


class Host(Base):
    """A protected machine. Derived from the repository (the ``host`` of its snapshots), or
    registered before its first backup (an enrolled agent)."""

    __tablename__ = "hosts"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(255), unique=True)
    created: Mapped[datetime] = mapped_column(default=utcnow)
    last_seen: Mapped[datetime | None]  # the agent's latest call
    agent_version: Mapped[str | None] = mapped_column(String(64))


class Volume(Base):
    """One protected disk of one host. Derived from the repository; ``chunk_size`` is that of
    the volume's newest snapshot (incremental backups keep it).

    A volume the administrator protects also names its ``source`` on the agent (a block device
    or a disk-image file) and the ``policy`` that says when to back it up and how long to keep
    it; those two live only in the catalog (a rebuilt catalog has them empty).
    """

    __tablename__ = "volumes"
    __table_args__ = (UniqueConstraint("host_id", "name"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    host_id: Mapped[int] = mapped_column(ForeignKey("hosts.id"))  # indexed by the unique key
    name: Mapped[str] = mapped_column(String(255))
    chunk_size: Mapped[int] = mapped_column(Integer)
    source: Mapped[str | None] = mapped_column(String(4096))
    policy_id: Mapped[int | None] = mapped_column(ForeignKey("policies.id"), index=True)
    enabled: Mapped[bool] = mapped_column(Boolean, default=True)


class Snapshot(Base):
    """Index of one repository snapshot: its manifest's core and its newest note (retention lock,
    annotations). The primary key is the repository's snapshot id; the repository is the truth."""

    __tablename__ = "snapshots"
    __table_args__ = (Index("ix_snapshots_volume_time", "volume_id", "time"),)

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    volume_id: Mapped[int] = mapped_column(ForeignKey("volumes.id"))
    time: Mapped[datetime]
    size: Mapped[int] = mapped_column(BigInteger)
    consistency: Mapped[str] = mapped_column(String(32))
    labels: Mapped[dict[str, Any]]
    # not a foreign key: a parent may be deleted while its children remain
    parent_id: Mapped[str | None] = mapped_column(String(64))
    retention_until: Mapped[datetime | None]
    annotations: Mapped[dict[str, Any]]
    stats: Mapped[dict[str, Any]]


class Policy(Base):
    """What to protect how often and how long to keep it. Lives only in the catalog.

    ``schedule`` is ``interval`` (every ``interval_seconds``) or ``cron`` (a cron expression);
    ``retention`` holds keep-last / hourly / daily / weekly / monthly / yearly counts;
    ``lock_for_seconds`` makes new snapshots immutable for that long; ``bandwidth_limit`` caps an
    agent's upload in bytes per second; ``consistency`` and ``quiesce`` name how the agent takes
    a point in time (crash-consistent by default); ``drill`` is the recovery drill the vault runs
    on each new snapshot (none by default).
    """

    __tablename__ = "policies"
    __table_args__ = (
        CheckConstraint("schedule IN ('interval', 'cron')", name="schedule_kind"),
        CheckConstraint(
            "(schedule = 'interval' AND interval_seconds IS NOT NULL) "
            "OR (schedule = 'cron' AND cron IS NOT NULL)",
            name="schedule_complete",
        ),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(255), unique=True)
    schedule: Mapped[str] = mapped_column(String(16))
    interval_seconds: Mapped[int | None] = mapped_column(Integer)
    cron: Mapped[str | None] = mapped_column(String(255))
    retention: Mapped[dict[str, Any]]
    lock_for_seconds: Mapped[int | None] = mapped_column(Integer)
    chunk_size: Mapped[int] = mapped_column(Integer)
    enabled: Mapped[bool] = mapped_column(Boolean, default=True)
    bandwidth_limit: Mapped[int | None] = mapped_column(BigInteger)
    consistency: Mapped[str] = mapped_column(String(32), default="crash")
    quiesce: Mapped[str | None] = mapped_column(String(255))
    drill: Mapped[dict[str, Any] | None]  # a recovery drill run on each new snapshot


class Job(Base):
    """A unit of vault work (backup, verify, gc, replication, ...) and how it went.

    A backup job belongs to a volume (and so a host); the agent running it sends ``heartbeat``
    and ``progress`` while it works, and the snapshot it made ends it.
    """

    __tablename__ = "jobs"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    kind: Mapped[str] = mapped_column(String(32))
    state: Mapped[str] = mapped_column(String(16), index=True)
    created: Mapped[datetime] = mapped_column(default=utcnow)
    started: Mapped[datetime | None]
    finished: Mapped[datetime | None]
    error: Mapped[str | None] = mapped_column(Text)
    details: Mapped[dict[str, Any]] = mapped_column(default=dict)
    volume_id: Mapped[int | None] = mapped_column(ForeignKey("volumes.id"), index=True)
    heartbeat: Mapped[datetime | None]
    progress: Mapped[dict[str, Any]] = mapped_column(default=dict)
    snapshot_id: Mapped[str | None] = mapped_column(String(64))


class User(Base):
    """A person who uses the API or console, with one role."""

    __tablename__ = "users"
    __table_args__ = (CheckConstraint("role IN ('admin', 'operator', 'viewer')", name="role"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(255), unique=True)
    role: Mapped[str] = mapped_column(String(16))
    password_hash: Mapped[str] = mapped_column(String(255))


class Token(Base):
    """An API credential of a user or of a host's agent (or neither: a service token). Only a
    hash of the secret is stored."""

    __tablename__ = "tokens"
    __table_args__ = (
        CheckConstraint("role IN ('admin', 'operator', 'viewer', 'agent')", name="role"),
        CheckConstraint("user_id IS NULL OR host_id IS NULL", name="one_owner"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    user_id: Mapped[int | None] = mapped_column(ForeignKey("users.id"), index=True)
    host_id: Mapped[int | None] = mapped_column(ForeignKey("hosts.id"), index=True)
    role: Mapped[str] = mapped_column(String(16))
    secret_hash: Mapped[str] = mapped_column(String(255), unique=True)
    created: Mapped[datetime] = mapped_column(default=utcnow)
    expires: Mapped[datetime | None]
    revoked: Mapped[bool] = mapped_column(Boolean, default=False)


class Enrollment(Base):
    """A one-time token with which an agent enrolls as ``host_name``. Only a hash of the secret
    is stored; ``used`` is set when it is spent."""

    __tablename__ = "enrollments"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    host_name: Mapped[str] = mapped_column(String(255))
    secret_hash: Mapped[str] = mapped_column(String(255), unique=True)
    created: Mapped[datetime] = mapped_column(default=utcnow)
    expires: Mapped[datetime]
    used: Mapped[datetime | None]


class Export(Base):
    """A snapshot or clone served as a block device. ``name`` is the export name clients ask for:
    over NBD it is long and random, so it works as an access token; over iSCSI it is the target's
    IQN, and CHAP (``chap_*``, and ``mutual_chap_*`` for the target's own credentials) guards it.
    Exports live in the catalog so a restarted vault serves them again."""

    __tablename__ = "exports"
    __table_args__ = (
        CheckConstraint("kind IN ('snapshot', 'clone')", name="kind"),
        CheckConstraint("protocol IN ('nbd', 'iscsi')", name="protocol"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(255), unique=True)
    protocol: Mapped[str] = mapped_column(String(16))
    kind: Mapped[str] = mapped_column(String(16))
    target: Mapped[str] = mapped_column(String(64))  # a snapshot id or a clone id
    writable: Mapped[bool] = mapped_column(Boolean)
    allowed_clients: Mapped[list[str] | None] = mapped_column(JSON)  # networks; None: any
    created: Mapped[datetime] = mapped_column(default=utcnow)
    created_by: Mapped[str] = mapped_column(String(255))
    chap_user: Mapped[str | None] = mapped_column(String(255))
    chap_secret: Mapped[str | None] = mapped_column(String(255))
    mutual_chap_user: Mapped[str | None] = mapped_column(String(255))
    mutual_chap_secret: Mapped[str | None] = mapped_column(String(255))


class AuditEvent(Base):
    """One authorised (or refused) action: who did what to which object, and the outcome."""

    __tablename__ = "audit_events"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    time: Mapped[datetime] = mapped_column(default=utcnow, index=True)
    actor: Mapped[str] = mapped_column(String(255))
    action: Mapped[str] = mapped_column(String(64))
    target: Mapped[str] = mapped_column(String(255))
    outcome: Mapped[str] = mapped_column(String(16))
    detail: Mapped[dict[str, Any]] = mapped_column(default=dict)
