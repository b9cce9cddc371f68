#!/usr/bin/env bash
# THE run command: installs dingyuan into .venv, then starts a vault on embedded defaults and an agent
# that protects a generated demo disk image, and leaves both running.
#   sudo bash scripts/run.sh          (re)start the demo: stops a running one, recreates ./demo
#   sudo bash scripts/run.sh stop     stop the demo's vault and agent
# What it does: vault init + vault serve (HTTPS API), a 64 MiB ext4 disk image, a policy (every 10 s,
# keep the last 20), an enrolled agent protecting the image; then it waits for a snapshot, changes the
# image, waits for the next one, restores that one and compares it byte for byte with the image.
# Environment: DINGYUAN_DEMO_LISTEN (HOST:PORT, default 127.0.0.1:8443), DINGYUAN_DEMO_DIR (default
# ./demo), DINGYUAN_SKIP_INSTALL=1 (no apt or pip: use the dingyuan found in PATH, else .venv's).
set -Eeuo pipefail
# shellcheck source=scripts/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
cd "$DY_ROOT"

DEMO=$(realpath -m "${DINGYUAN_DEMO_DIR:-$DY_ROOT/demo}")
LISTEN=${DINGYUAN_DEMO_LISTEN:-127.0.0.1:8443}
VAULT_DIR=$DEMO/vault
AGENT_DIR=$DEMO/agent
PASSFILE=$DEMO/passphrase
DISK=$DEMO/disk.img
RESTORED=$DEMO/restored.img
CA=$VAULT_DIR/tls/ca.pem
TOKEN_FILE=$VAULT_DIR/admin.token
HOST=demo-host
VOLUME=disk0
POLICY=demo-continuous
INTERVAL=10
MARKER=$DEMO/.dingyuan-demo  # lets a re-run recreate a DINGYUAN_DEMO_DIR it made itself

LISTEN_HOST=${LISTEN%:*}
LISTEN_PORT=${LISTEN##*:}
case $LISTEN_HOST in  # the address clients use: a wildcard listener is reached on loopback
0.0.0.0 | "") API_HOST=127.0.0.1 ;;
*) API_HOST=$LISTEN_HOST ;;
esac
VAULT_URL=https://$API_HOST:$LISTEN_PORT
API=$VAULT_URL/api/v1

show() {  # a path as the user types it: relative to the repository root when inside it
    case $1 in
    "$DY_ROOT"/*) printf '%s' "${1#"$DY_ROOT"/}" ;;
    *) printf '%s' "$1" ;;
    esac
}

dy() {  # echoes, then runs, one dingyuan command
    printf '\n$ dingyuan %s\n' "$*"
    dingyuan "$@"
}

# --- processes ------------------------------------------------------------------------------------

is_ours() {  # is_ours PID: a live dingyuan process (not some unrelated process that reused the pid)
    grep -qa dingyuan "/proc/$1/cmdline" 2>/dev/null
}

stop_pidfile() {  # stop_pidfile NAME: SIGTERM the process in $DEMO/NAME.pid, wait for it, remove the file
    local name=$1 file=$DEMO/$1.pid pid i
    [ -f "$file" ] || return 0
    pid=$(<"$file")
    if [[ $pid =~ ^[0-9]+$ ]] && is_ours "$pid"; then
        kill -TERM "$pid" 2>/dev/null || true
        for ((i = 0; i < 150; i++)); do  # 30 s: the vault gives running requests 10 s
            is_ours "$pid" || break
            sleep 0.2
        done
        if is_ours "$pid"; then
            echo "$name (pid $pid) ignored SIGTERM for 30 s: killing it"
            kill -KILL "$pid" 2>/dev/null || true
        fi
        echo "stopped the $name (pid $pid)"
    fi
    rm -f "$file"
}

stop_demo() {  # the agent first, so it does not see its vault go away in the middle of a backup
    stop_pidfile agent
    stop_pidfile vault
}

start_bg() {  # start_bg NAME CMD...: runs CMD detached (own session, no terminal), log and pid in $DEMO
    local name=$1
    shift
    # setsid: a terminal closing or Ctrl-C after this script ended must not stop the demo
    PYTHONUNBUFFERED=1 setsid "$@" </dev/null >"$DEMO/$name.log" 2>&1 &
    echo $! >"$DEMO/$name.pid"
    echo "started the $name (pid $!), log in $(show "$DEMO/$name.log")"
}

alive() {  # alive NAME: its process still runs and is not a zombie (not is_ours: right after the
    # fork, before setsid has exec'd dingyuan, the child's command line is still this script's)
    local stat
    [ -f "$DEMO/$1.pid" ] && stat=$(cat "/proc/$(<"$DEMO/$1.pid")/stat" 2>/dev/null) || return 1
    stat=${stat##*) }  # the fields after "(comm) ": the state comes first
    [ "${stat%% *}" != Z ]
}

# --- failures -------------------------------------------------------------------------------------

show_logs() {
    local log
    for log in "$DEMO/vault.log" "$DEMO/agent.log"; do
        [ -s "$log" ] || continue
        printf '\n---- last lines of %s ----\n' "$(show "$log")" >&2
        tail -n 25 "$log" >&2
    done
}

fail() {  # fail MESSAGE: the logs, the message, stop what this run started, exit 1
    trap - ERR
    if [ "$BASHPID" != "$$" ]; then  # in $(...): the message only; the caller's failure does the rest
        printf 'error: %s\n' "$*" >&2
        exit 1
    fi
    show_logs
    printf '\nerror: %s\n' "$*" >&2
    stop_demo >&2
    exit 1
}

on_error() {  # any command failing under set -e
    fail "'$BASH_COMMAND' failed (line ${BASH_LINENO[0]}); the demo's files are in $(show "$DEMO")"
}

# --- the API --------------------------------------------------------------------------------------

api() {  # api METHOD PATH [JSON]: one call as the admin; prints the response body, fails on >= 400
    local method=$1 path=$2 body=${3:-} args=()
    [ -n "$body" ] && args=(-H "Content-Type: application/json" --data "$body")
    # the token goes in through a config on stdin, not on the command line (other users see that)
    curl -sS --fail-with-body --cacert "$CA" -X "$method" "${args[@]}" -K - "$API$path" \
        <<<"header = \"Authorization: Bearer $(<"$TOKEN_FILE")\""
}

json() {  # json EXPR: evaluates a Python expression over the JSON document on stdin (bound to d)
    python3 -c 'import json, sys; d = json.load(sys.stdin); print(eval(sys.argv[1]))' "$1"
}

port_free() {  # port_free HOST PORT: nothing listens there (we could bind it ourselves)
    python3 - "$1" "$2" <<'EOF'
import socket, sys
host, port = sys.argv[1] or "0.0.0.0", int(sys.argv[2])
family = socket.AF_INET6 if ":" in host else socket.AF_INET
with socket.socket(family) as s:
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        s.bind((host.strip("[]"), port))
    except OSError as e:
        sys.exit(f"{host}:{port}: {e.strerror}")
EOF
}

snapshot_after() {  # snapshot_after EPOCH: id of the newest snapshot taken after EPOCH (or nothing)
    api GET "/snapshots?host=$HOST&volume=$VOLUME" | python3 -c '
import json, sys
from datetime import datetime
after = float(sys.argv[1])
newer = [s for s in json.load(sys.stdin) if datetime.fromisoformat(s["time"]).timestamp() > after]
print(newer[0]["id"] if newer else "")' "$1"
}

wait_snapshot() {  # wait_snapshot EPOCH WHAT: waits (60 s at most) for a snapshot taken after EPOCH
    local after=$1 what=$2 id="" start=$SECONDS
    printf 'waiting for %s' "$what"
    while [ -z "$id" ]; do
        alive vault || { echo; fail "the vault stopped"; }
        alive agent || { echo; fail "the agent stopped"; }
        ((SECONDS - start < 60)) || { echo; fail "no snapshot after 60 s"; }
        sleep 1
        printf '.'
        id=$(snapshot_after "$after")
    done
    printf ' snapshot %s after %d s\n' "${id:0:12}" $((SECONDS - start))
    SNAPSHOT=$id
}

# --- steps ----------------------------------------------------------------------------------------

install() {
    dy_section "install"
    if [ "${DINGYUAN_SKIP_INSTALL:-}" = 1 ]; then
        echo "DINGYUAN_SKIP_INSTALL=1: no apt, no pip"
        if ! command -v dingyuan >/dev/null && [ -x "$DY_VENV/bin/dingyuan" ]; then
            export PATH="$DY_VENV/bin:$PATH"
        fi
    else
        # libnbd-bin .. psmisc: what `dingyuan mount` and `restore-files` run (nbdfuse, nbdkit's cow
        # filter, FUSE, sfdisk, ntfs-3g, fuser)
        dy_apt_ensure python3 python3-venv python3-pip curl e2fsprogs util-linux \
            libnbd-bin nbdkit fuse3 fdisk ntfs-3g psmisc
        dy_venv_ensure
        if dy_pip_installed_any; then
            echo "pip: dingyuan up to date (pyproject.toml unchanged since the last install)"
        else
            dy_pip_install ""
        fi
        export PATH="$DY_VENV/bin:$PATH"
    fi
    local tool
    for tool in python3 curl mkfs.ext4 debugfs e2fsck setsid; do
        command -v "$tool" >/dev/null || dy_die "$tool not found (run without DINGYUAN_SKIP_INSTALL)"
    done
    dingyuan --help >/dev/null 2>&1 || dy_die "the dingyuan CLI does not run (try: dingyuan --help)"
    DINGYUAN=dingyuan  # how the summary tells the user to run it
    case $(command -v dingyuan) in "$DY_VENV"/*) DINGYUAN=$(show "$DY_VENV")/bin/dingyuan ;; esac
}

prepare_dir() {
    dy_section "demo directory"
    stop_demo
    if [ -e "$DEMO" ] && [ ! -e "$MARKER" ] && [ "$DEMO" != "$DY_ROOT/demo" ] \
        && [ -n "$(ls -A "$DEMO" 2>/dev/null)" ]; then
        dy_die "$DEMO is not empty and not a demo directory: choose another DINGYUAN_DEMO_DIR"
    fi
    [[ $LISTEN_PORT =~ ^[0-9]+$ ]] || dy_die "DINGYUAN_DEMO_LISTEN=$LISTEN: use HOST:PORT"
    port_free "$LISTEN_HOST" "$LISTEN_PORT" \
        || dy_die "cannot listen on $LISTEN: something else uses it (see: ss -ltnp 'sport = :$LISTEN_PORT');" \
            "stop it, or choose another address with DINGYUAN_DEMO_LISTEN=127.0.0.1:PORT"
    rm -rf "$DEMO"
    mkdir -p "$DEMO"
    : >"$MARKER"
    echo "recreated $(show "$DEMO")"
}

start_vault() {
    dy_section "vault"
    (umask 077 && head -c 24 /dev/urandom | base64 >"$PASSFILE")
    echo "generated a repository passphrase in $(show "$PASSFILE") (mode 0600)"
    local extra=()
    case $API_HOST in
    127.0.0.1 | localhost) ;;
    *) extra=(--hostname "$API_HOST") ;;  # the server certificate must name the address we call
    esac
    dy vault init --dir "$VAULT_DIR" --passphrase-file "$PASSFILE" "${extra[@]}"
    local exports=() what port
    for what in nbd:10809 iscsi:3260; do  # the export listeners' default ports, or off if taken
        port=${what#*:}
        if port_free 127.0.0.1 "$port" 2>/dev/null; then
            exports+=("--${what%%:*}-listen" "127.0.0.1:$port")
        else
            exports+=("--${what%%:*}-listen" off)
            echo "port $port is taken (another ${what%%:*} server?): ${what%%:*} exports are off in this demo"
        fi
    done
    start_bg vault dingyuan vault serve --dir "$VAULT_DIR" --passphrase-file "$PASSFILE" --listen "$LISTEN" \
        "${exports[@]}" --log-level warning
    local i
    for ((i = 0; i < 300; i++)); do
        alive vault || fail "the vault exited"
        if curl -sf --cacert "$CA" "$API/health" >/dev/null 2>&1; then
            echo "the vault answers at $API/"
            return 0
        fi
        sleep 0.1
    done
    fail "the vault did not answer at $API/health within 30 s"
}

make_disk() {
    dy_section "demo disk image"
    # an ext4 file system built from a directory (mkfs.ext4 -d: no mount, no loop device):
    # text that compresses, random data that does not, and free space that stays a hole
    local seed=$DEMO/seed i
    mkdir -p "$seed/etc" "$seed/var/log" "$seed/srv/data" "$seed/home/demo"
    echo "$HOST" >"$seed/etc/hostname"
    seq -f "%06g demo log line: the quick brown fox jumps over the lazy dog" 1 30000 >"$seed/var/log/app.log"
    for i in 1 2 3 4 5 6; do head -c 1M /dev/urandom >"$seed/srv/data/blob-$i.bin"; done
    echo "a file of the demo disk, protected by dingyuan" >"$seed/home/demo/readme.txt"
    truncate -s 64M "$DISK"
    mkfs.ext4 -q -F -L dingyuan-demo -E root_owner=0:0 -d "$seed" "$DISK"
    rm -rf "$seed"
    echo "$(show "$DISK"): 64 MiB ext4, $(du -k "$DISK" | cut -f1) KiB allocated (sparse)"
}

protect() {
    dy_section "policy, agent and volume (REST API as the admin)"
    printf '\n$ POST /api/v1/policies\n'
    api POST /policies "{\"name\": \"$POLICY\", \"schedule\": \"interval\", \
\"interval_seconds\": $INTERVAL, \"retention\": {\"keep_last\": 20}}"
    local token
    printf '\n\n$ POST /api/v1/enrollments\n'
    token=$(api POST /enrollments "{\"host\": \"$HOST\"}" | json 'd["token"]')
    echo "one-time enrollment token for $HOST: ${token:0:20}..."
    dy agent enroll --state-dir "$AGENT_DIR" "$VAULT_URL" "$token"
    printf '\n$ POST /api/v1/hosts/%s/volumes\n' "$HOST"
    api POST "/hosts/$HOST/volumes" "{\"name\": \"$VOLUME\", \"source\": \"$DISK\", \"policy\": \"$POLICY\"}"
    echo
    start_bg agent dingyuan agent run --state-dir "$AGENT_DIR"
}

change_and_verify() {
    dy_section "first snapshot"
    wait_snapshot 0 "the first (full) snapshot of $HOST:$VOLUME"
    local first=$SNAPSHOT changed

    dy_section "change the image, next snapshot"
    date >"$DEMO/changed.txt"
    echo "written after snapshot ${first:0:12}" >>"$DEMO/changed.txt"
    debugfs -w -R "write $DEMO/changed.txt /home/demo/changed.txt" "$DISK" >/dev/null 2>&1 \
        || fail "debugfs could not write into $DISK"
    changed=$(date +%s.%N)
    echo "wrote /home/demo/changed.txt into the image's file system (debugfs, no mount)"
    # the image stays as it is from here on, so the next snapshot must restore to exactly it
    wait_snapshot "$changed" "the next (incremental) snapshot, taken after the change"
    dy status --dir "$VAULT_DIR"

    dy_section "restore the new snapshot and compare"
    dy restore "$SNAPSHOT" "$RESTORED" --repo "$VAULT_DIR/repository" --passphrase-file "$PASSFILE" \
        --cache-dir "$DEMO/restore-cache"
    printf '\n$ cmp %s %s\n' "$(show "$DISK")" "$(show "$RESTORED")"
    cmp "$DISK" "$RESTORED" || fail "the restored image differs from the image the snapshot captured"
    echo "restored image is bit-exact"
    e2fsck -fn "$RESTORED" >/dev/null 2>&1 || fail "e2fsck finds the restored file system damaged"
    printf 'its file system is clean; /home/demo/changed.txt in it says: %s\n' \
        "$(debugfs -R 'cat /home/demo/changed.txt' "$RESTORED" 2>/dev/null | tail -n 1)"
}

summary() {
    local fp
    fp=$(api GET /ca | python3 -c '
import base64, hashlib, sys
pem = sys.stdin.read()
der = base64.b64decode("".join(pem.split("-----")[2].split()))
hex = hashlib.sha256(der).hexdigest().upper()
print(":".join(hex[i : i + 2] for i in range(0, 64, 2)))')  # as vault init and serve print it
    dy_section "the vault and the agent keep running"
    cat <<EOF
API          $API/   (docs: $API/docs)
CA           $(show "$CA")   SHA-256 $fp
admin token  $(show "$TOKEN_FILE")   (mode 0600; send it as Authorization: Bearer)
passphrase   $(show "$PASSFILE")
volume       $HOST:$VOLUME = $(show "$DISK"), policy $POLICY (every $INTERVAL s, keep the last 20)
logs         $(show "$DEMO/vault.log"), $(show "$DEMO/agent.log")

Try, as root in $DY_ROOT (the vault's files are root's):
  curl -s --cacert $(show "$CA") -H "Authorization: Bearer \$(cat $(show "$TOKEN_FILE"))" \\
      '$API/snapshots?host=$HOST&volume=$VOLUME'
  $DINGYUAN status --dir $(show "$VAULT_DIR")
Stop both:
  sudo bash scripts/run.sh stop
EOF
}

main() {
    case ${1:-start} in
    stop)
        if [ -f "$DEMO/vault.pid" ] || [ -f "$DEMO/agent.pid" ]; then
            stop_demo
        else
            echo "no demo running (no vault.pid or agent.pid in $(show "$DEMO"))"
        fi
        return 0
        ;;
    start) ;;
    *) dy_die "usage: bash scripts/run.sh [stop]" ;;
    esac
    local start
    install
    start=$SECONDS
    prepare_dir
    trap on_error ERR
    start_vault
    make_disk
    protect
    change_and_verify
    trap - ERR
    summary
    echo "(the demo took $((SECONDS - start)) s after installation)"
}

main "$@"
