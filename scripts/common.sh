# Shared helpers for scripts/test.sh and scripts/run.sh. Source it; do not run it.
# shellcheck shell=bash

DY_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
DY_VENV="$DY_ROOT/.venv"
DY_MIN_PYTHON="3.11"
# Root's tools (mkfs.ext4, losetup, ...) live in sbin; some minimal environments leave it out of PATH.
export PATH="$PATH:/usr/local/sbin:/usr/sbin:/sbin"
export DEBIAN_FRONTEND=noninteractive PIP_NO_INPUT=1 PIP_DISABLE_PIP_VERSION_CHECK=1

dy_section() {  # dy_section TITLE: a header that stands out in a long CI log
    if [ -t 1 ]; then
        printf '\n\033[1m==== %s ====\033[0m\n' "$*"
    else
        printf '\n==== %s ====\n' "$*"
    fi
}

dy_die() {
    printf 'error: %s\n' "$*" >&2
    exit 1
}

dy_missing_debs() {  # prints the packages among "$@" that dpkg does not report as installed
    local pkg
    for pkg in "$@"; do
        if [ "$(dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null)" != "install ok installed" ]; then
            printf '%s\n' "$pkg"
        fi
    done
}

dy_apt_ensure() {  # dy_apt_ensure PKG...: installs the missing ones (apt-get update only when needed)
    local missing sudo=()
    command -v dpkg-query >/dev/null || dy_die "this script expects Debian 12 (dpkg-query not found)"
    mapfile -t missing < <(dy_missing_debs "$@")
    if [ "${#missing[@]}" -eq 0 ]; then
        echo "apt: all ${#} packages already installed"
        return 0
    fi
    if [ "$(id -u)" -ne 0 ]; then
        command -v sudo >/dev/null || dy_die "missing packages (${missing[*]}); run as root"
        sudo=(sudo -n)
    fi
    echo "apt: installing ${missing[*]}"
    "${sudo[@]}" apt-get update -q
    "${sudo[@]}" apt-get install -y -q --no-install-recommends "${missing[@]}"
}

dy_python_ok() {  # dy_python_ok PYTHON: true when it runs and is >= DY_MIN_PYTHON
    "$1" -c "import sys; sys.exit(sys.version_info < tuple(map(int, '$DY_MIN_PYTHON'.split('.'))))" \
        2>/dev/null
}

dy_venv_ensure() {  # creates .venv with python3 from PATH unless a working one is there
    local py
    py=$(command -v python3) || dy_die "python3 not found in PATH"
    dy_python_ok "$py" || dy_die "$py is $("$py" -V 2>&1); dingyuan needs Python >= $DY_MIN_PYTHON"
    if [ -x "$DY_VENV/bin/python" ] && dy_python_ok "$DY_VENV/bin/python" \
        && "$DY_VENV/bin/python" -m pip --version >/dev/null 2>&1; then
        echo "venv: reusing $DY_VENV ($("$DY_VENV/bin/python" -V))"
        return 0
    fi
    echo "venv: creating $DY_VENV with $py ($("$py" -V))"
    rm -rf "$DY_VENV"
    "$py" -m venv "$DY_VENV"
}

dy_stamp_value() {  # what an install depends on: the project metadata and the interpreter
    { sha256sum "$DY_ROOT/pyproject.toml"; "$DY_VENV/bin/python" -VV; } | sha256sum | cut -d' ' -f1
}

dy_pip_install() {  # dy_pip_install [EXTRAS]: editable install, skipped when pyproject.toml is unchanged
    local extras=${1:-} spec="." stamp value
    [ -n "$extras" ] && spec=".[$extras]"
    stamp="$DY_VENV/.dingyuan-installed${extras:+-$extras}"
    value=$(dy_stamp_value)
    if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$value" ] && [ -x "$DY_VENV/bin/dingyuan" ]; then
        echo "pip: $spec up to date (pyproject.toml unchanged since the last install)"
        return 0
    fi
    echo "pip: installing -e '$spec'"
    rm -f "$stamp"
    (cd "$DY_ROOT" && "$DY_VENV/bin/python" -m pip install -q -e "$spec")
    printf '%s\n' "$value" > "$stamp"
}

dy_pip_installed_any() {  # true when some install stamp matches the current pyproject.toml
    local value stamp
    [ -x "$DY_VENV/bin/dingyuan" ] || return 1
    value=$(dy_stamp_value)
    for stamp in "$DY_VENV"/.dingyuan-installed*; do
        [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$value" ] && return 0
    done
    return 1
}
