"""`dingyuan agent restore`: an enrolled agent restores its own host's snapshot from the vault,
in full and as a delta, bit-exact; another host's snapshot is refused."""

from __future__ import annotations

import random
from pathlib import Path

from protectkit import Agent, Vault, cli, sha256_file

CHUNK = 64 << 10


def test_an_agent_restores_its_hosts_snapshot_in_full_and_as_a_delta(tmp_path: Path) -> None:
    rng = random.Random(8)
    image = tmp_path / "disk.img"
    with open(image, "wb") as f:
        f.truncate(32 << 20)
        for _ in range(20):
            f.seek(rng.randrange(0, (32 << 20) - CHUNK))
            f.write(rng.randbytes(rng.randrange(1, 2 * CHUNK)))
    vault = Vault(tmp_path)
    repo = ["--repo", str(vault.dir / "repository"), "--passphrase-file", str(vault.passfile)]
    for host in ("srv9", "other"):
        cli("backup", str(image), "--volume", "disk", "--host", host, *repo)
    vault.start()  # indexes both hosts' snapshots
    try:
        agent = Agent(tmp_path, vault, "srv9")
        state = ["--state-dir", str(agent.state)]
        target = tmp_path / "restored.img"
        done = cli("agent", "restore", *state, "disk@latest", str(target), "--yes")
        assert "restore of snapshot" in done.stdout
        assert sha256_file(target) == sha256_file(image)

        with open(target, "r+b") as f:  # damage three chunks
            for i in (3, 100, 400):
                f.seek(i * CHUNK + 17)
                f.write(b"damage")
        done = cli("agent", "restore", *state, "disk@latest", str(target), "--delta", "--yes")
        assert "fetched=3" in done.stdout, done.stdout
        assert sha256_file(target) == sha256_file(image)

        other = vault.snapshots("other", "disk")[-1]["id"]
        refused = cli("agent", "restore", *state, other, str(tmp_path / "x.img"), "--yes", check=False)
        assert refused.returncode != 0 and not (tmp_path / "x.img").exists()
    finally:
        vault.stop()
