"""The one exception hierarchy of dingyuan.

Every error a user can see derives from :class:`DingyuanError`. The class docstring is the
message template (formatted with the constructor's keyword arguments), and ``exit_code`` is what
the CLI exits with. Errors live here so the CLI can map them without knowing every module::

    DingyuanError                     exit 2  (generic failure)
    ├── UsageError                    exit 2  bad arguments or names
    ├── RepositoryError               exit 10
    │   ├── RepositoryNotFound
    │   ├── RepositoryExists
    │   ├── UnsupportedFormat         written by a newer dingyuan / not a repository object
    │   ├── WrongPassphrase
    │   ├── PassphraseRequired
    │   ├── CorruptObject             checksum / authentication / structure failure
    │   ├── MissingObject             referenced object absent
    │   ├── LockedError               another process holds a conflicting lock
    │   ├── SnapshotNotFound
    │   ├── AmbiguousSnapshot
    │   ├── RetentionLocked           snapshot is immutable until its lock expires
    │   │   └── RetentionLockKept     a lock in force cannot be shortened or removed
    ├── StorageError                  exit 20 (backend I/O)
    │   ├── ObjectNotFound
    │   ├── ObjectExists
    │   ├── StorageFull               ENOSPC / quota
    │   └── StorageIOError            EIO and other OS errors
    ├── SourceError                   exit 30 (reading the volume to back up)
    ├── RestoreTargetError            exit 31 (writing the restore target)
    ├── ConsistencyError              exit 32 (taking a point in time of a volume)
    │   ├── ProviderUnavailable       the provider cannot serve this source (checked up front)
    │   ├── ProviderFailed            a snapshot ioctl or step failed
    │   │   └── CommandFailed         a snapshot tool (lvcreate, diskshadow, ...) failed
    │   ├── FreezeTimeout             frozen longer than allowed: the watchdog thawed, nothing committed
    │   ├── PluginFailed              a quiesce plugin's step failed or timed out
    │   └── QuiesceFailed             ... and the policy skips the snapshot on a quiesce failure
    ├── VaultError                    exit 2  (the vault's directory, configuration, policies, jobs)
    │   ├── VaultExists
    │   ├── VaultNotFound
    │   ├── VaultConfigError          unreadable or unsupported vault.json
    │   ├── AgentConfigError          the agent is not enrolled / agent.json unreadable
    │   ├── PolicyError               a policy that cannot be scheduled or applied
    │   ├── JobConflict               a job that is not in a state for what was asked
    │   ├── CatalogUnavailable        the catalog's URL is wrong or its database unreachable
    │   └── ListenError               the API server cannot listen on its address
    ├── TransferError                 exit 2  (agent-to-vault transfers)
    │   ├── UploadRejected            a malformed or inconsistent upload
    │   ├── SessionNotFound           unknown or expired upload session
    │   ├── IncompleteSnapshot        a commit refers to blobs the vault lacks
    │   ├── VaultUnreachable          no connection to the vault
    │   └── VaultRefused              the vault answered with an error
    ├── ApiError                      exit 2  (a refused API request; ``status`` is its HTTP status)
    │   ├── Unauthenticated           401 no, malformed, unknown, revoked or expired credential
    │   ├── Forbidden                 403 the credential's role may not do this
    │   ├── NotFound                  404
    │   ├── Conflict                  409 the request contradicts the current state
    │   └── InvalidRequest            422 well-formed but unacceptable input
    ├── ExportError                   exit 50 (exports, clones and mounts)
    │   ├── ReadOnlyDevice            a write to a snapshot or a read-only export
    │   ├── CloneNotFound
    │   ├── CloneBusy                 the clone is exported or mounted
    │   └── MountError                a step of mounting or unmounting failed
    ├── RpoBreached                   exit 3  (a volume's newest snapshot is older than its policy allows)
    └── VerifyFailed                  exit 40 (verify found problems)
"""

from __future__ import annotations

from typing import Any, ClassVar


class DingyuanError(Exception):
    """{detail}"""

    exit_code: ClassVar[int] = 2

    def __init__(self, detail: str = "", **kwargs: Any) -> None:
        self.kwargs = dict(kwargs, detail=detail)
        template = " ".join((type(self).__doc__ or "{detail}").split())
        try:
            message = template.format(**self.kwargs)
        except (KeyError, IndexError):
            message = detail or template
        super().__init__(message)


class UsageError(DingyuanError):
    """{detail}"""


class RepositoryError(DingyuanError):
    """{detail}"""

    exit_code = 10


class RepositoryNotFound(RepositoryError):
    """No dingyuan repository at {location}: create one with 'dingyuan repo init' or check --repo."""


class RepositoryExists(RepositoryError):
    """A repository already exists at {location}; refusing to overwrite it."""


class UnsupportedFormat(RepositoryError):
    """{what} has format version or magic dingyuan does not understand ({detail}); upgrade dingyuan
    or check that this is a dingyuan repository."""


class WrongPassphrase(RepositoryError):
    """The passphrase does not open any key of this repository: check DINGYUAN_PASSPHRASE or
    --passphrase-file."""


class PassphraseRequired(RepositoryError):
    """This repository is encrypted: give its passphrase in DINGYUAN_PASSPHRASE, with
    --passphrase-file, or on a terminal."""


class CorruptObject(RepositoryError):
    """Repository object {name} is corrupt ({detail}). Run 'dingyuan verify --read-data' to see
    which snapshots are affected."""


class MissingObject(RepositoryError):
    """Repository object {name} is missing ({detail}). Run 'dingyuan verify' to see which
    snapshots are affected."""


class LockedError(RepositoryError):
    """The repository is locked by {holder} ({detail}); wait for it to finish, or if that process
    is gone run 'dingyuan repo unlock'."""


class SnapshotNotFound(RepositoryError):
    """No snapshot matches '{ref}'; list them with 'dingyuan snapshot list'."""


class AmbiguousSnapshot(RepositoryError):
    """'{ref}' matches several snapshots ({detail}); give more characters of the id."""


class RetentionLocked(RepositoryError):
    """Snapshot {snapshot} is retention-locked until {until}; it cannot be deleted or forgotten
    before then, by anyone."""


class RetentionLockKept(RetentionLocked):
    """Snapshot {snapshot} is retention-locked until {until}; a lock can be extended but never
    shortened or removed before it expires, by anyone."""


class StorageError(DingyuanError):
    """Storage failed: {detail}"""

    exit_code = 20


class ObjectNotFound(StorageError):
    """Object {name} does not exist in the storage backend."""


class ObjectExists(StorageError):
    """Object {name} already exists in the storage backend."""


class StorageFull(StorageError):
    """The storage holding the repository is full while writing {name}: free space or move the
    repository, then run the command again (nothing committed was lost)."""


class StorageIOError(StorageError):
    """I/O error on {name}: {detail}. Nothing committed was changed; check the disk and retry."""


class SourceError(DingyuanError):
    """Cannot read the source {source}: {detail}"""

    exit_code = 30


class RestoreTargetError(DingyuanError):
    """Cannot write the restore target {target}: {detail}"""

    exit_code = 31


class ConsistencyError(DingyuanError):
    """{detail}"""

    exit_code = 32


class ProviderUnavailable(ConsistencyError):
    """The consistency provider '{provider}' cannot take a point in time of {source}: {reason}.
    Choose another provider in the policy ('live' reads the source as it is, crash-consistent at
    best)."""


class ProviderFailed(ConsistencyError):
    """The consistency provider '{provider}' failed on {source}: {detail}. Nothing was committed;
    the next run tries again."""


class CommandFailed(ProviderFailed):
    """'{command}' failed: {detail}. Nothing was committed; the next run tries again."""


class FreezeTimeout(ConsistencyError):
    """{what} stayed paused longer than {limit} s: the watchdog thawed it and this snapshot is not
    committed. Raise the limit in the policy, or use a provider that pauses only for an instant
    (reflink, lvm)."""


class PluginFailed(ConsistencyError):
    """Quiesce plugin {plugin} failed to {step}: {detail}"""


class QuiesceFailed(ConsistencyError):
    """Quiesce plugin {plugin} failed to {step} ({detail}) and the policy skips the snapshot on a
    quiesce failure: fix the plugin, or let the policy take a crash-consistent snapshot instead."""


class VaultError(DingyuanError):
    """{detail}"""


class VaultExists(VaultError):
    """A vault already exists at {location}; refusing to overwrite it."""


class VaultNotFound(VaultError):
    """No dingyuan vault at {location}: create one with 'dingyuan vault init' or check --dir /
    DINGYUAN_VAULT_DIR."""


class VaultConfigError(VaultError):
    """The vault configuration {path} cannot be used: {detail}"""


class AgentConfigError(VaultError):
    """The agent configuration {path} cannot be used: {detail}"""


class TransferError(DingyuanError):
    """{detail}"""


class UploadRejected(TransferError):
    """The upload was rejected: {detail}"""


class SessionNotFound(TransferError):
    """No upload session {session} on this vault (it expired or the vault restarted): start a new
    backup run."""


class IncompleteSnapshot(TransferError):
    """The snapshot cannot be committed: {detail}. The agent sends the missing blobs on its next
    run."""


class VaultUnreachable(TransferError):
    """Cannot reach the vault at {url}: {detail}. Check the address, the network and that the vault
    runs; the agent retries."""


class VaultRefused(TransferError):
    """The vault refused {method} {path} ({status}): {detail}"""


class PolicyError(VaultError):
    """Policy {policy} cannot be used: {detail}. Correct the policy; volumes that use it are not
    backed up until then."""


class CatalogUnavailable(VaultError):
    """Cannot open the catalog at {url}: {detail}. Check the catalog URL (vault.json, --catalog-url)
    and that the database server runs and accepts this user."""


class JobConflict(VaultError):
    """Job {job} is {state}: {detail}"""


class RpoBreached(DingyuanError):
    """The RPO is breached for {count} volume(s): {volumes}. Check their last error and agent."""

    exit_code = 3


class ListenError(VaultError):
    """The vault cannot listen on {address}: {detail}. Choose another address (--listen,
    --nbd-listen or --iscsi-listen) or stop the process that holds it."""


class ApiError(DingyuanError):
    """{detail}"""

    #: the HTTP status the API answers with
    status: ClassVar[int] = 400


class Unauthenticated(ApiError):
    """Not authenticated: {detail}"""

    status = 401


class Forbidden(ApiError):
    """Not allowed: {detail}"""

    status = 403


class NotFound(ApiError):
    """{detail}"""

    status = 404


class Conflict(ApiError):
    """{detail}"""

    status = 409


class InvalidRequest(ApiError):
    """Invalid request: {detail}"""

    status = 422


class ExportError(DingyuanError):
    """{detail}"""

    exit_code = 50


class ReadOnlyDevice(ExportError):
    """{name} is read-only: {detail}"""


class CloneNotFound(ExportError):
    """No clone {name}: list the clones with `dingyuan clone list`."""


class CloneBusy(ExportError):
    """Clone {name} is in use: {detail}"""


class MountError(ExportError):
    """Cannot {action} {path}: {detail}"""


class VerifyFailed(DingyuanError):
    """Verification found {count} problem(s); affected snapshots: {snapshots}."""

    exit_code = 40
