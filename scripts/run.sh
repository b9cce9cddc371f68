#!/usr/bin/env bash
# THE run command: installs dingyuan into .venv and runs a demo on embedded defaults.
#   sudo bash scripts/run.sh
# The demo lives in ./demo (recreated on every run): an encrypted repository, a 64 MiB sparse disk image,
# a full and an incremental backup, a restore compared byte for byte, and a repository verification.
set -euo pipefail
# shellcheck source=scripts/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
cd "$DY_ROOT"

DEMO=demo
DISK=$DEMO/disk.img
RESTORED=$DEMO/restored.img
VOLUME=demo-disk
export DINGYUAN_REPO=./$DEMO/repo
export DINGYUAN_CACHE_DIR=./$DEMO/cache
export DINGYUAN_PASSPHRASE="dingyuan-demo-passphrase"

dy_section "install"
dy_apt_ensure python3 python3-venv python3-pip
dy_venv_ensure
if dy_pip_installed_any; then
    echo "pip: dingyuan up to date (pyproject.toml unchanged since the last install)"
else
    dy_pip_install ""
fi
export PATH="$DY_VENV/bin:$PATH"
dingyuan --help >/dev/null 2>&1 || dy_die "the dingyuan CLI does not run yet (try: $DY_VENV/bin/dingyuan --help)"

dy() {  # echoes, then runs, one dingyuan command
    printf '\n$ dingyuan %s\n' "$*"
    dingyuan "$@"
}

write_at() {  # write_at FILE MIB_OFFSET SOURCE KIB: writes KIB KiB of SOURCE at MIB_OFFSET MiB (+ 4 KiB steps)
    dd if="$3" of="$1" bs=4K count=$(($4 / 4)) seek=$(($2 * 256)) conv=notrunc status=none
}

dy_section "demo data"
rm -rf "$DEMO"
mkdir -p "$DEMO"
echo "repository:  $DINGYUAN_REPO"
echo "passphrase:  $DINGYUAN_PASSPHRASE   (DINGYUAN_PASSPHRASE)"
echo "cache:       $DINGYUAN_CACHE_DIR"
# A 64 MiB sparse disk: random (incompressible) extents, text (compressible) extents, holes in between.
seq -f "%06g demo log line: the quick brown fox jumps over the lazy dog" 1 20000 > "$DEMO/text.bin"
truncate -s 64M "$DISK"
for mib in 0 7 19 33 50; do write_at "$DISK" "$mib" /dev/urandom 512; done
for mib in 3 12 27 41 60; do write_at "$DISK" "$mib" "$DEMO/text.bin" 1024; done
echo "disk image:  $DISK, $(du -k --apparent-size "$DISK" | cut -f1) KiB apparent," \
    "$(du -k "$DISK" | cut -f1) KiB allocated"

dy_section "repository and first backup"
dy repo init --encryption aes-256-gcm
dy backup "$DISK" --volume "$VOLUME"

dy_section "change some blocks, back up again"
for mib in 7 45; do write_at "$DISK" "$mib" /dev/urandom 64; done
dd if="$DEMO/text.bin" of="$DISK" bs=1K count=16 seek=$((62 * 1024)) conv=notrunc status=none
echo "changed 64 KiB at 7 MiB and 45 MiB, 16 KiB at 62 MiB"
dy backup "$DISK" --volume "$VOLUME"
dy snapshot list
dy snapshot show "$VOLUME@latest"

dy_section "restore and compare"
dy restore "$VOLUME@latest" "$RESTORED"
printf '\n$ cmp %s %s\n' "$DISK" "$RESTORED"
cmp "$DISK" "$RESTORED"
echo "restored image is bit-exact"

dy_section "verify the repository"
dy verify --read-data

dy_section "done"
echo "demo files are in ./$DEMO; try: DINGYUAN_REPO=$DINGYUAN_REPO DINGYUAN_PASSPHRASE=$DINGYUAN_PASSPHRASE" \
    "$DY_VENV/bin/dingyuan snapshot list"
