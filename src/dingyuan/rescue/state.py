"""Enrollment and the rescue tool's state file.

Enrollment is the agent's (docs/protocols.md, "Enrollment"): the one-time token
``dye1.<CA SHA-256>.<secret>`` names the fingerprint of the vault's CA, so the tool fetches the CA
over an unverified connection, accepts it only if its SHA-256 matches, and from then on talks to
the vault over TLS verified against it. Spending the token gives an agent API token of the host;
the vault revokes that host's previous agent token (the server is being rebuilt, its old agent is
gone with its disk).

The state file (default ``./dingyuan-rescue.json``, mode 0600) holds the vault's URL, the host,
the API token and the CA (PEM): everything later commands need, in one file.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import ssl
from dataclasses import asdict, dataclass
from pathlib import Path

from .. import __version__
from ..errors import AgentConfigError, TransferError, UsageError
from .client import Vault, pinned_context, unverified_context

DEFAULT_STATE = Path("dingyuan-rescue.json")
_FIELDS = ("url", "host", "token", "ca")


@dataclass(frozen=True)
class State:
    url: str
    host: str
    token: str
    ca: str  # the vault's CA certificate, PEM

    @classmethod
    def load(cls, path: Path) -> State:
        try:
            doc = json.loads(path.read_text())
            return cls(**{k: str(doc[k]) for k in _FIELDS})
        except FileNotFoundError:
            raise AgentConfigError(
                path=str(path), detail="not enrolled yet: run 'enroll URL TOKEN' first (or give --state)"
            ) from None
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise AgentConfigError(path=str(path), detail=f"unreadable: {e}") from None

    def save(self, path: Path) -> None:
        """Write atomically, readable by its owner alone (it holds an API token)."""
        tmp = path.with_name(path.name + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(asdict(self), f, indent=2)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)

    def vault(self) -> Vault:
        return Vault(self.url, self.token, pinned_context(self.ca))


def ca_fingerprint(token: str) -> str:
    """The CA fingerprint (lower-case hex) inside an enrollment token."""
    parts = token.strip().split(".")
    if len(parts) != 3 or parts[0] != "dye1" or len(parts[1]) != 64:
        raise UsageError("an enrollment token looks like dye1.<64 hex digits>.<secret>: copy it whole")
    try:
        bytes.fromhex(parts[1])
    except ValueError:
        raise UsageError("the enrollment token's CA fingerprint is not hex: copy the token whole") from None
    return parts[1].lower()


def fetch_pinned_ca(url: str, fingerprint: str) -> str:
    """The vault's CA (PEM), accepted only if the SHA-256 of its DER form is ``fingerprint``."""
    pem = Vault(url, None, unverified_context()).get_text("/ca")
    try:
        der = ssl.PEM_cert_to_DER_cert(pem)
    except ValueError:
        raise TransferError(f"{url} answered GET /api/v1/ca with no certificate") from None
    if hashlib.sha256(der).hexdigest() != fingerprint:
        raise UsageError(
            f"the CA served at {url} does not match the enrollment token's fingerprint: wrong "
            "address, or someone is in the middle; enrollment stopped"
        )
    return pem


def enroll(url: str, token: str, path: Path, hostname: str | None = None) -> State:
    """Spend ``token`` at the vault ``url`` and save the state to ``path``."""
    fingerprint = ca_fingerprint(token)
    pem = fetch_pinned_ca(url, fingerprint)
    vault = Vault(url, None, pinned_context(pem))
    body = {
        "token": token.strip(),
        "hostname": hostname or socket.gethostname(),
        "agent_version": f"rescue-{__version__}",
    }
    doc = vault.post_json("/enroll", body, retry=False)  # spends the token: never sent twice
    try:
        state = State(url=vault.url, host=str(doc["host"]), token=str(doc["token"]), ca=pem)
    except (KeyError, TypeError):
        raise TransferError("the vault's answer to the enrollment lacks the host or the token") from None
    state.save(path)
    return state
