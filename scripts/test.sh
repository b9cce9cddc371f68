#!/usr/bin/env bash
# THE test command: installs everything the tests need (Debian 12, as root) and runs the whole suite.
#   sudo bash scripts/test.sh [PYTEST ARGS...]
# Steps: apt packages -> .venv (python3 from PATH, >= 3.11) -> pip install -e '.[test]' -> ruff check ->
# ruff format --check -> mypy (strict) -> lint-imports (when configured) -> python -m pytest "$@" (with
# no arguments: the long_wait tests in a second pytest process alongside the rest).
# A second run skips apt when every package is installed and pip when pyproject.toml is unchanged.
# Every check runs even after an earlier one failed; the exit status is non-zero when any failed.
set -euo pipefail
# shellcheck source=scripts/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
cd "$DY_ROOT"

# Debian packages the test suite uses (add new ones here).
TEST_DEBS=(
    python3 python3-venv python3-pip
    e2fsprogs curl
    xfsprogs btrfs-progs util-linux mount
    qemu-utils
    libnbd-bin python3-libnbd nbdkit
    fuse3
    ntfs-3g fdisk psmisc  # mounting exports: mkntfs, ntfs-3g and ntfsfix; sfdisk; fuser
    postgresql postgresql-client postgresql-contrib  # the server, pgbench, amcheck
    mariadb-server mariadb-client  # mariadbd and mariadb-install-db: tests run private servers
    qemu-system-x86 seabios ovmf extlinux syslinux-common syslinux-efi dosfstools mtools busybox-static linux-image-cloud-amd64 libvirt-clients libxml2-utils  # VM boots of a test system (BIOS and UEFI); virt-xml-validate (and its xmllint)
    libiscsi-bin tgt qemu-block-extra ipxe-qemu  # iSCSI: libiscsi's tools and conformance suite, the reference target, qemu's iscsi:// driver, iPXE sanboot
)

stop_new_service() {
    # installing mariadb-server or tgt may start and enable a system service: the tests never use
    # it (each runs a private server on a socket or port of its own, and tgt's would hold the
    # iSCSI port), so when this run installed the package, stop and disable it rather than leave a
    # server running (one that was there before is left alone)
    command -v systemctl >/dev/null && [ -d /run/systemd/system ] || return 0
    local unit=$1
    if systemctl is-enabled --quiet "$unit" 2>/dev/null || systemctl is-active --quiet "$unit" 2>/dev/null; then
        if systemctl disable --now --quiet "$unit"; then
            echo "services: stopped and disabled $unit"
        else
            echo "services: could not stop $unit (the tests do not need it)"
        fi
    fi
}

link_system_python_modules() {
    # python3-libnbd is built for Debian's /usr/bin/python3; link its module into the venv when the
    # venv's interpreter can load the extension (same CPython minor version), so tests can `import nbd`.
    local vpy="$DY_VENV/bin/python" site dist=/usr/lib/python3/dist-packages f
    "$vpy" -c 'import nbd' 2>/dev/null && { echo "nbd: importable in the venv"; return 0; }
    site=$("$vpy" -c 'import sysconfig; print(sysconfig.get_paths()["platlib"])')
    for f in "$dist"/nbd.py "$dist"/libnbdmod.*.so; do
        [ -e "$f" ] || continue
        case $f in
        *.so) "$vpy" -c "import importlib.machinery as m, sys; \
sys.exit(not any('$f'.endswith(s) for s in m.EXTENSION_SUFFIXES))" || continue ;;
        esac
        ln -sfn "$f" "$site/$(basename "$f")"
    done
    if "$vpy" -c 'import nbd' 2>/dev/null; then
        echo "nbd: linked python3-libnbd into the venv"
    else
        rm -f "$site/nbd.py" "$site"/libnbdmod.*.so
        echo "nbd: python3-libnbd does not load in $("$vpy" -V); tests that need it will skip or fail"
    fi
}

FAILED=()
run_check() {  # run_check NAME CMD...: runs one check with a header and its time, remembers failures
    local name=$1 start rc=0
    shift
    dy_section "$name"
    start=$SECONDS
    "$@" || rc=$?
    if [ "$rc" -eq 0 ]; then
        echo "-- $name: ok ($((SECONDS - start)) s)"
    else
        echo "-- $name: FAILED with status $rc ($((SECONDS - start)) s)"
        FAILED+=("$name")
    fi
}

dy_section "system packages"
NEW_MARIADB=$(dy_missing_debs mariadb-server)
NEW_TGT=$(dy_missing_debs tgt)
dy_apt_ensure "${TEST_DEBS[@]}"
[ -z "$NEW_MARIADB" ] || stop_new_service mariadb.service
[ -z "$NEW_TGT" ] || stop_new_service tgt.service

dy_section "virtualenv and package"
dy_venv_ensure
dy_pip_install test
link_system_python_modules
export PATH="$DY_VENV/bin:$PATH"
export VIRTUAL_ENV="$DY_VENV"

run_check "ruff check" ruff check .
run_check "ruff format --check" ruff format --check .
run_check "mypy (strict)" mypy
if [ -f .importlinter ] || grep -q '^\[tool\.importlinter\]' pyproject.toml \
    || { [ -f setup.cfg ] && grep -q '^\[importlinter\]' setup.cfg; }; then
    run_check "import-linter" lint-imports
else
    dy_section "import-linter"
    echo "-- skipped: no import-linter configuration (.importlinter or [tool.importlinter])"
fi
# The whole suite (no arguments) runs as two pytest processes at once: the tests marked long_wait
# (minutes of a protected load, spent mostly waiting) in the background, everything else in the
# foreground; the background run's output is shown once the foreground run has ended, and either
# failing fails the run. With arguments, one pytest runs whatever they select.
ALONGSIDE_PID=""
stop_alongside() {  # an interrupted run interrupts the background pytest too, which then cleans up
    [ -n "$ALONGSIDE_PID" ] || return 0
    kill -INT "$ALONGSIDE_PID" 2>/dev/null || true
    wait "$ALONGSIDE_PID" 2>/dev/null || true
    ALONGSIDE_PID=""
    cat "$ALONGSIDE_LOG"
}
alongside_result() {  # the background pytest's output and exit status
    local rc=0
    wait "$ALONGSIDE_PID" || rc=$?
    ALONGSIDE_PID=""
    cat "$ALONGSIDE_LOG"
    return "$rc"
}
if [ "$#" -eq 0 ]; then
    ALONGSIDE_LOG=$(mktemp)
    trap 'stop_alongside; rm -f "$ALONGSIDE_LOG"' EXIT
    trap 'exit 130' INT
    trap 'exit 143' TERM
    # a process group of its own: a Ctrl-C reaches the foreground pytest, the EXIT trap this one
    # (once: a second SIGINT would cut its clean-up short); no cache, the foreground run keeps it;
    # -rP: what the passed tests printed too (their pause and RPO figures, to watch the margins)
    set -m
    python -m pytest -m long_wait -p no:cacheprovider -rP </dev/null >"$ALONGSIDE_LOG" 2>&1 &
    ALONGSIDE_PID=$!
    set +m
    run_check "pytest" python -m pytest -m "not long_wait" </dev/null
    run_check "pytest -m long_wait (ran alongside)" alongside_result
else
    run_check "pytest" python -m pytest "$@" </dev/null
fi

dy_section "summary"
if [ "${#FAILED[@]}" -ne 0 ]; then
    echo "FAILED: ${FAILED[*]}"
    exit 1
fi
echo "all checks passed"
