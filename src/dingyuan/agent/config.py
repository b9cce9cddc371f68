"""The agent's state directory and its enrollment with a vault.

Layout (default ``/var/lib/dingyuan-agent``)::

    agent.json          vault URL, host name, API token, chunk-id key (0600)
    ca.pem              the vault's CA, pinned at enrollment
    volumes/NAME.leaves the last committed snapshot's chunk ids of each volume (leafcache.py)

Enrollment (``dingyuan agent enroll URL TOKEN``): the one-time token ``dye1.<CA SHA-256>.<secret>``
names the fingerprint of the vault's CA, so the agent fetches the CA over an unverified
connection, accepts it only if its fingerprint matches, and from then on talks to the vault over
TLS verified against it. It spends the token for its own API token and the repository's chunk-id
key (which lets it compute chunk ids; it cannot decrypt anything).
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import httpx
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from .. import __version__
from ..errors import AgentConfigError, UsageError, VaultRefused, VaultUnreachable
from ..protocol import API
from .client import VaultClient

DEFAULT_STATE_DIR = Path("/var/lib/dingyuan-agent")
CONFIG_NAME = "agent.json"


@dataclass
class AgentConfig:
    url: str
    host: str
    token: str
    id_key: str  # hex
    repository_id: str

    @staticmethod
    def path(state_dir: Path) -> Path:
        return state_dir / CONFIG_NAME

    @classmethod
    def load(cls, state_dir: Path) -> AgentConfig:
        path = cls.path(state_dir)
        try:
            doc = json.loads(path.read_text())
            return cls(**{k: str(doc[k]) for k in ("url", "host", "token", "id_key", "repository_id")})
        except FileNotFoundError:
            raise AgentConfigError(
                path=str(path), detail="not enrolled yet: run 'dingyuan agent enroll URL TOKEN'"
            ) from None
        except (ValueError, KeyError, TypeError) as e:
            raise AgentConfigError(path=str(path), detail=f"unreadable: {e}") from None

    def save(self, state_dir: Path) -> None:
        state_dir.mkdir(parents=True, exist_ok=True)
        path = self.path(state_dir)
        tmp = path.with_name(path.name + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(asdict(self), f, indent=2)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)

    def client(self, state_dir: Path) -> VaultClient:
        return VaultClient(self.url, self.token, state_dir / "ca.pem")


def parse_enrollment_token(token: str) -> tuple[str, str]:
    """(CA fingerprint as lower-case hex, the whole token)."""
    parts = token.strip().split(".")
    if len(parts) != 3 or parts[0] != "dye1" or len(parts[1]) != 64:
        raise UsageError("an enrollment token looks like dye1.<64 hex digits>.<secret>: copy it whole")
    try:
        bytes.fromhex(parts[1])
    except ValueError:
        raise UsageError("the enrollment token's CA fingerprint is not hex: copy the token whole") from None
    return parts[1].lower(), token.strip()


def fetch_pinned_ca(url: str, fingerprint: str) -> bytes:
    """The vault's CA certificate (PEM), accepted only if its SHA-256 is ``fingerprint``."""
    try:
        r = httpx.get(url.rstrip("/") + API + "/ca", verify=False, timeout=30.0)  # pinned below
    except httpx.TransportError as e:
        raise VaultUnreachable(url=url, detail=str(e) or type(e).__name__) from None
    if r.status_code != 200:
        raise VaultRefused(status=r.status_code, method="GET", path=API + "/ca", detail=r.text[:200])
    pem = r.content
    try:
        der = x509.load_pem_x509_certificate(pem).public_bytes(Encoding.DER)
    except ValueError:
        raise VaultRefused(
            status=200, method="GET", path=API + "/ca", detail="not a PEM certificate"
        ) from None
    if hashlib.sha256(der).hexdigest() != fingerprint:
        raise UsageError(
            f"the CA served at {url} does not match the enrollment token's fingerprint: "
            "wrong address, or someone is in the middle; enrollment stopped"
        )
    return pem


def enroll(url: str, token: str, state_dir: Path, hostname: str | None = None) -> AgentConfig:
    """Enroll with the vault at ``url`` using a one-time ``token``; save and return the config."""
    fp, token = parse_enrollment_token(token)
    pem = fetch_pinned_ca(url, fp)
    state_dir.mkdir(parents=True, exist_ok=True)
    (state_dir / "ca.pem").write_bytes(pem)
    client = VaultClient(url, None, state_dir / "ca.pem")
    try:
        body = {"token": token, "hostname": hostname or socket.gethostname(), "agent_version": __version__}
        doc: dict[str, Any] = client.call("POST", "/enroll", json=body).json()
    finally:
        client.close()
    cfg = AgentConfig(
        url=url.rstrip("/"),
        host=str(doc["host"]),
        token=str(doc["token"]),
        id_key=str(doc["id_key"]),
        repository_id=str(doc["repository_id"]),
    )
    cfg.save(state_dir)
    return cfg
