"""Request and response bodies of the vault's API (pydantic v2).

Requests are strict about shape: unknown fields are refused (``extra="forbid"``), names follow
:data:`NAME_PATTERN`, every string and number has bounds that fit its catalog column, schedules
are checked (an interval of at least 10 s, or a cron expression ``cronsim`` accepts), and chunk
sizes are powers of two from 4 KiB to 4 MiB. A request that breaks any of this gets a 422 that
names the field; nothing reaches the catalog or the repository unchecked.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from cronsim import CronSim
from pydantic import (
    AfterValidator,
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    field_validator,
    model_validator,
)

from ..agent.quiesce.spec import MAX_SPEC, parse_quiesce

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"
SNAPSHOT_ID_PATTERN = r"^[0-9a-f]{64}$"
MAX_INT32 = 2**31 - 1  # Integer columns (PostgreSQL integer)
MAX_INT64 = 2**63 - 1  # BigInteger columns
MIN_INTERVAL = 10
MIN_CHUNK, MAX_CHUNK, DEFAULT_CHUNK = 4 << 10, 4 << 20, 64 << 10
RETENTION_KEYS = ("keep_last", "keep_hourly", "keep_daily", "keep_weekly", "keep_monthly", "keep_yearly")
#: how an agent takes the point in time: a provider (agent/consistency), or a level that picks one
#: (crash: a live read; filesystem, application: auto, the best provider the source allows)
CONSISTENCY = Literal[
    "crash", "filesystem", "application", "auto", "reflink", "btrfs", "freeze", "lvm", "vss", "live"
]
UserRole = Literal["admin", "operator", "viewer"]

#: a host, volume, policy or user name
Name = Annotated[str, StringConstraints(pattern=NAME_PATTERN)]
#: a path or device name on the agent: no control characters
Source = Annotated[str, StringConstraints(min_length=1, max_length=4096, pattern=r"^[^\x00-\x1f\x7f]+$")]


def _quiesce(v: str) -> str:
    parse_quiesce(v)  # ValueError with the reason: a 422
    return v


#: a policy's quiesce setting: plugins and failure policy (agent/quiesce/spec.py), checked here
Quiesce = Annotated[str, StringConstraints(min_length=1, max_length=MAX_SPEC), AfterValidator(_quiesce)]
Id = Annotated[int, Field(ge=1, le=MAX_INT32)]
Seconds = Annotated[int, Field(ge=1, le=MAX_INT32)]


def _to_utc(t: datetime) -> datetime:
    try:
        t = t.astimezone(UTC)
    except OverflowError:
        raise ValueError("time out of range") from None
    if not 1970 <= t.year < 9000:
        raise ValueError("time must be between the years 1970 and 9000")
    return t


#: an ISO 8601 time with a zone, converted to UTC
UtcTime = Annotated[AwareDatetime, AfterValidator(_to_utc)]


class Request(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Response(BaseModel):
    model_config = ConfigDict(from_attributes=True)


def check_cron(expr: str) -> str:
    """``expr`` if it is a five-field cron expression ``cronsim`` accepts; ValueError otherwise."""
    try:
        CronSim(expr, datetime.now(UTC))
    except Exception as e:  # cronsim raises CronSimError, but odd input may raise others
        raise ValueError(f"not a valid cron expression ({e}); use five fields, e.g. '30 2 * * *'") from None
    return expr


def check_chunk_size(n: int) -> int:
    if not MIN_CHUNK <= n <= MAX_CHUNK or n & (n - 1):
        raise ValueError("chunk_size must be a power of two from 4096 (4 KiB) to 4194304 (4 MiB)")
    return n


# health, CA, enrollment -----------------------------------------------------------------------
class Health(Response):
    status: str
    version: str


class EnrollmentCreate(Request):
    host: Name
    expires_in_seconds: int = Field(default=86400, ge=60, le=30 * 86400)


class EnrollmentCreated(Response):
    host: str
    token: str = Field(description="The one-time enrollment token; shown only now.")
    expires: datetime


class EnrollRequest(Request):
    token: str = Field(max_length=200)
    hostname: str = Field(max_length=255, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,254}$")
    agent_version: str = Field(max_length=64, pattern=r"^[\x21-\x7e]{1,64}$")


class EnrollResponse(Response):
    host: str
    token: str = Field(description="The agent's API token; shown only now.")
    repository_id: str
    id_key: str = Field(description="Hex key of chunk ids (keyed BLAKE3); not the encryption key.")


# hosts, volumes -------------------------------------------------------------------------------
class HostOut(Response):
    id: int
    name: str
    created: datetime
    last_seen: datetime | None
    agent_version: str | None


class VolumeCreate(Request):
    name: Name
    source: Source
    policy: Name | None = None
    enabled: bool = True


class VolumePatch(Request):
    source: Source | None = None
    policy: Name | None = None
    enabled: bool | None = None

    @model_validator(mode="after")
    def _not_empty(self) -> VolumePatch:
        if not self.model_fields_set:
            raise ValueError("nothing to change: give source, policy (null to detach) or enabled")
        if "source" in self.model_fields_set and self.source is None:
            raise ValueError("source cannot be removed, only changed")
        if "enabled" in self.model_fields_set and self.enabled is None:
            raise ValueError("enabled must be true or false")
        return self


class VolumeOut(Response):
    id: int
    host: str
    name: str
    chunk_size: int
    source: str | None
    policy: str | None
    enabled: bool


# policies -------------------------------------------------------------------------------------
class Retention(Request):
    keep_last: int | None = Field(default=None, ge=0, le=1_000_000)
    keep_hourly: int | None = Field(default=None, ge=0, le=1_000_000)
    keep_daily: int | None = Field(default=None, ge=0, le=1_000_000)
    keep_weekly: int | None = Field(default=None, ge=0, le=1_000_000)
    keep_monthly: int | None = Field(default=None, ge=0, le=1_000_000)
    keep_yearly: int | None = Field(default=None, ge=0, le=1_000_000)


class DrillSpec(Request):
    """A recovery drill: ``boot`` waits for a console ``pattern`` (literal text) or for the
    guest's service on TCP ``port`` to send something (a greeting service: SSH, SMTP, a database);
    ``postgresql`` and ``mariadb`` start the database found on the snapshot and query it."""

    kind: Literal["boot", "postgresql", "mariadb"]
    pattern: Annotated[str, StringConstraints(min_length=1, max_length=200)] | None = None
    port: int | None = Field(default=None, ge=1, le=65535)
    timeout_seconds: int = Field(default=300, ge=5, le=3600)
    memory_mib: int = Field(default=1024, ge=64, le=1 << 20)

    @model_validator(mode="after")
    def _probe(self) -> DrillSpec:
        if self.kind == "boot" and (self.pattern is None) == (self.port is None):
            raise ValueError("a boot drill needs exactly one probe: pattern (console) or port (TCP)")
        if self.kind != "boot" and (self.pattern is not None or self.port is not None):
            raise ValueError("pattern and port are probes of boot drills only")
        return self


class PolicySettings(Request):
    """Everything of a policy but its name (the body of a PATCH, all optional, is merged into it)."""

    schedule: Literal["interval", "cron"]
    interval_seconds: int | None = Field(default=None, ge=MIN_INTERVAL, le=MAX_INT32)
    cron: str | None = Field(default=None, min_length=9, max_length=255)
    retention: Retention = Field(default_factory=Retention)
    lock_for_seconds: Seconds | None = None
    chunk_size: int = DEFAULT_CHUNK
    enabled: bool = True
    bandwidth_limit: int | None = Field(default=None, ge=1, le=MAX_INT64, description="bytes per second")
    consistency: CONSISTENCY = "crash"
    quiesce: Quiesce | None = None
    drill: DrillSpec | None = None

    @field_validator("cron")
    @classmethod
    def _cron(cls, v: str | None) -> str | None:
        return None if v is None else check_cron(v)

    @field_validator("chunk_size")
    @classmethod
    def _chunk(cls, v: int) -> int:
        return check_chunk_size(v)

    @model_validator(mode="after")
    def _schedule_complete(self) -> PolicySettings:
        if self.schedule == "interval" and (self.interval_seconds is None or self.cron is not None):
            raise ValueError("schedule 'interval' needs interval_seconds (>= 10) and no cron")
        if self.schedule == "cron" and (self.cron is None or self.interval_seconds is not None):
            raise ValueError("schedule 'cron' needs a cron expression and no interval_seconds")
        return self


class PolicyCreate(PolicySettings):
    name: Name


class PolicyPatch(Request):
    schedule: Literal["interval", "cron"] | None = None
    interval_seconds: int | None = Field(default=None, ge=MIN_INTERVAL, le=MAX_INT32)
    cron: str | None = Field(default=None, min_length=9, max_length=255)
    retention: Retention | None = None
    lock_for_seconds: Seconds | None = None
    chunk_size: int | None = None
    enabled: bool | None = None
    bandwidth_limit: int | None = Field(default=None, ge=1, le=MAX_INT64)
    consistency: CONSISTENCY | None = None
    quiesce: Quiesce | None = None
    drill: DrillSpec | None = None

    @field_validator("cron")
    @classmethod
    def _cron(cls, v: str | None) -> str | None:
        return None if v is None else check_cron(v)

    @field_validator("chunk_size")
    @classmethod
    def _chunk(cls, v: int | None) -> int | None:
        return None if v is None else check_chunk_size(v)

    @model_validator(mode="after")
    def _not_empty(self) -> PolicyPatch:
        if not self.model_fields_set:
            raise ValueError("nothing to change")
        for name in ("schedule", "retention", "chunk_size", "enabled", "consistency"):
            if name in self.model_fields_set and getattr(self, name) is None:
                raise ValueError(f"{name} cannot be null")
        return self


class PolicyOut(Response):
    id: int
    name: str
    schedule: str
    interval_seconds: int | None
    cron: str | None
    retention: dict[str, int]
    lock_for_seconds: int | None
    chunk_size: int
    enabled: bool
    bandwidth_limit: int | None
    consistency: str
    quiesce: str | None
    drill: dict[str, Any] | None


# snapshots ------------------------------------------------------------------------------------
class SnapshotOut(Response):
    id: str
    host: str
    volume: str
    time: datetime
    size: int
    consistency: str
    labels: dict[str, Any]
    parent: str | None
    retention_until: datetime | None
    annotations: dict[str, Any]
    stats: dict[str, Any]


class SnapshotLock(Request):
    """Lock until a time, or for a number of seconds from now: exactly one of the two."""

    until: UtcTime | None = None
    for_seconds: int | None = Field(default=None, ge=1, le=100 * 366 * 86400)

    @model_validator(mode="after")
    def _one(self) -> SnapshotLock:
        if (self.until is None) == (self.for_seconds is None):
            raise ValueError("give exactly one of until (an ISO 8601 time with zone) and for_seconds")
        if self.until is not None and self.until <= datetime.now(UTC):
            raise ValueError("until must be in the future")
        return self


# jobs -----------------------------------------------------------------------------------------
class JobOut(Response):
    id: int
    kind: str
    state: str
    created: datetime
    started: datetime | None
    finished: datetime | None
    error: str | None
    details: dict[str, Any]
    volume_id: int | None
    heartbeat: datetime | None
    progress: dict[str, Any]
    snapshot_id: str | None


# users, tokens, audit -------------------------------------------------------------------------
class UserCreate(Request):
    name: Name
    role: UserRole
    password: str | None = Field(default=None, min_length=12, max_length=1024)


class UserOut(Response):
    id: int
    name: str
    role: str
    has_password: bool


class TokenCreate(Request):
    """A token for a user (with the user's role) or a service token with a role: one of the two."""

    user: Name | None = None
    role: UserRole | None = None
    expires_in_seconds: int | None = Field(default=None, ge=60, le=10 * 366 * 86400)

    @model_validator(mode="after")
    def _owner(self) -> TokenCreate:
        if (self.user is None) == (self.role is None):
            raise ValueError("give exactly one of user (a token with the user's role) and role")
        return self


class TokenOut(Response):
    id: int
    role: str
    user: str | None
    host: str | None
    created: datetime
    expires: datetime | None
    revoked: bool


class TokenCreated(TokenOut):
    token: str = Field(description="The API token; shown only now.")


class AuditOut(Response):
    id: int
    time: datetime
    actor: str
    action: str
    target: str
    outcome: str
    detail: dict[str, Any]


class ErrorOut(Response):
    error: str = Field(description="What kind of error, e.g. not_found, retention_locked, forbidden.")
    message: str = Field(description="What happened and what to do.")


# clones and exports ---------------------------------------------------------------------------
#: a snapshot as the API names it: a full id, a unique id prefix (at least 8 hex digits), or
#: VOLUME@latest (HOST:VOLUME@latest when volume names repeat across hosts)
SnapshotRef = Annotated[str, StringConstraints(min_length=8, max_length=300, pattern=r"^[^\x00-\x1f\x7f/]+$")]
#: a network an export admits clients from: an address or CIDR block, IPv4 or IPv6
Network = Annotated[str, StringConstraints(min_length=1, max_length=64, pattern=r"^[0-9A-Fa-f.:/]+$")]


class CloneCreate(Request):
    snapshot: SnapshotRef
    name: Name | None = None  # default: <volume>-<short snapshot id>-<n>


class CloneOut(Response):
    id: str
    name: str
    snapshot: str  # the base snapshot's id
    host: str
    volume: str  # the base snapshot's volume
    size: int
    chunk_size: int
    created: datetime
    exports: list[int]  # ids of the exports serving it


class ClonePromote(Request):
    volume: Name
    host: Name | None = None  # default: the base snapshot's host


class ChapCredentials(Request):
    user: Annotated[str, StringConstraints(pattern=r"^[!-~]{1,255}$")]
    secret: Annotated[str, StringConstraints(min_length=12, max_length=255, pattern=r"^[ -~]+$")]


class ExportCreate(Request):
    """Serve a snapshot (read-only) or a clone. ``writable`` with a snapshot serves a new clone of
    it instead: a snapshot is never written."""

    snapshot: SnapshotRef | None = None
    clone: Name | None = None  # a clone's name or id
    writable: bool = False
    protocol: Literal["nbd", "iscsi"] = "nbd"
    allowed_clients: list[Network] | None = Field(default=None, max_length=64)
    #: iSCSI only: the initiator must log in with CHAP as this user and secret (12+ characters)
    chap: ChapCredentials | None = None
    #: iSCSI only: the target's own user and secret, for initiators that authenticate the target
    mutual_chap: ChapCredentials | None = None

    @model_validator(mode="after")
    def _one(self) -> ExportCreate:
        if (self.snapshot is None) == (self.clone is None):
            raise ValueError("give exactly one of snapshot and clone")
        return self


class ExportOut(Response):
    id: int
    name: str  # the export name clients ask for: it works as an access token
    protocol: str
    kind: Literal["snapshot", "clone"]
    target: str  # the snapshot id or the clone id
    writable: bool
    allowed_clients: list[str] | None
    uri: str
    portal: str | None = None  # iSCSI: the HOST:PORT initiators log in to; name is the target IQN
    chap_user: str | None = None  # iSCSI: the CHAP user initiators log in as (never the secret)
    created: datetime
    created_by: str


# boots and drills -----------------------------------------------------------------------------
class VmSettings(Request):
    memory_mib: int = Field(default=1024, ge=64, le=1 << 20)
    cpus: int = Field(default=1, ge=1, le=256)
    network: Literal["isolated", "user", "bridge"] = "isolated"
    bridge: Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9_.-]{1,15}$")] | None = None
    firmware: Literal["bios", "uefi"] = "bios"
    vnc: bool = True


class BootCreate(VmSettings):
    """Boot a snapshot (through a new clone: the snapshot is never written) or a clone."""

    snapshot: SnapshotRef | None = None
    clone: Name | None = None

    @model_validator(mode="after")
    def _one(self) -> BootCreate:
        if (self.snapshot is None) == (self.clone is None):
            raise ValueError("give exactly one of snapshot and clone")
        if (self.network == "bridge") != (self.bridge is not None):
            raise ValueError("a bridge goes with network 'bridge', and only with it")
        return self


class BootOut(Response):
    id: str
    snapshot: str
    clone: str
    export: int
    running: bool
    accelerator: str | None
    memory_mib: int | None
    cpus: int | None
    network: str | None
    firmware: str | None
    serial_log: str | None  # on the vault's machine
    vnc_socket: str | None  # on the vault's machine (a unix socket: `vncviewer` via ssh -L)
    created: datetime
    created_by: str


class BootPromote(Request):
    volume: Name
    host: Name | None = None


class DrillCreate(DrillSpec):
    snapshot: SnapshotRef
