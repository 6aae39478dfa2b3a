# Shared by scripts/test and scripts/check; sourced, not run.
#
# Environment:
#   HITZ_VENV  the virtualenv to create/use (default: <repo>/.venv). Point it
#              elsewhere to try the scripts without touching the shared venv.

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
VENV=${HITZ_VENV:-$REPO/.venv}
VENV=$(realpath -m "$VENV")
cd "$REPO" || exit 1
# What the test suite needs from Debian 12 (the examples and the integration
# tests compile C with the host `cc`; bazel-bootstrap is Bazel 4.2.3, the real
# REAPI client of tests/integration/test_bazel_interop.py). bubblewrap is only
# for bench/run.py.
APT_PACKAGES=(python3-venv gcc make libc6-dev libseccomp2 bazel-bootstrap)

LOG=$(mktemp)
trap 'rm -f "$LOG"' EXIT

# quietly CMD...: run CMD with its output kept aside; show it only on failure.
quietly() {
    if ! "$@" >"$LOG" 2>&1; then
        cat "$LOG" >&2
        echo "error: \`$*\` failed" >&2
        return 1
    fi
}

as_root() {
    if [[ $(id -u) -eq 0 ]]; then
        "$@"
    elif command -v sudo >/dev/null; then
        sudo "$@"
    else
        echo "error: \`$1\` needs root and \`sudo\` is not installed" >&2
        return 1
    fi
}

# ensure_apt_packages: install the missing ones; nothing (and no network) if
# all are there already.
# ensure_apt_packages [PKG...]: the given packages (default: APT_PACKAGES).
ensure_apt_packages() {
    local missing=() pkg
    (($# > 0)) || set -- "${APT_PACKAGES[@]}"
    for pkg in "$@"; do
        if ! dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q 'ok installed'; then
            missing+=("$pkg")
        fi
    done
    if ((${#missing[@]} > 0)); then
        echo "installing ${missing[*]} with apt-get" >&2
        quietly as_root apt-get update || return 1
        quietly as_root env DEBIAN_FRONTEND=noninteractive \
            apt-get install -y --no-install-recommends "${missing[@]}" || return 1
    fi
}

# find_python: the first python3 on PATH that is at least 3.11.
find_python() {
    local py
    for py in python3 python3.13 python3.12 python3.11; do
        if command -v "$py" >/dev/null &&
            "$py" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
            command -v "$py"
            return 0
        fi
    done
    echo "error: no python3 >= 3.11 on PATH" >&2
    return 1
}

# ensure_venv: create $VENV if it is missing or broken, and install hitz with
# its dev extras whenever pyproject.toml changed since the last install.
ensure_venv() {
    local python stamp want
    if ! "$VENV/bin/python" -c 'import sys' >/dev/null 2>&1; then
        python=$(find_python)
        echo "creating $VENV with $python" >&2
        rm -rf "$VENV"
        quietly "$python" -m venv "$VENV"
    fi
    stamp="$VENV/.hitz-dev-installed"
    want=$(sha256sum pyproject.toml | cut -d' ' -f1)
    if [[ ! -f $stamp || $(cat "$stamp") != "$want" || ! -x $VENV/bin/pytest ]]; then
        echo "installing hitz and its dev tools into $VENV" >&2
        quietly "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check \
            -e '.[dev]'
        echo "$want" >"$stamp"
    fi
}

run_lint() {
    # --extend-exclude: a HITZ_VENV inside the repo is not project code.
    quietly "$VENV/bin/ruff" check --extend-exclude "$VENV" .
}

run_typecheck() {
    # Strictness and options come from [tool.mypy] in pyproject.toml. The
    # code imports itself as hitz.executor / hitz.sandbox, which exist only
    # through pyproject's package-dir mapping; setuptools' editable install
    # serves that mapping with an import hook mypy cannot follow. So mypy gets
    # the same layout as symlinks (hitz/executor -> executor/, ...) and checks
    # the packages by name, each file once, under its real module name.
    local shadow="$VENV/mypy-path"
    mkdir -p "$shadow/hitz"
    ln -sfn "$REPO/executor" "$shadow/hitz/executor"
    ln -sfn "$REPO/sandbox" "$shadow/hitz/sandbox"
    ln -sfn "$REPO/protos/gen" "$shadow/hitz/protos"
    if ! MYPYPATH="$shadow" "$VENV/bin/mypy" -p hitz.executor -p hitz.sandbox >"$LOG" 2>&1; then
        sed "s|$shadow/hitz/||g" "$LOG" >&2 # report repo paths, not the symlinks
        echo "error: \`mypy\` failed" >&2
        return 1
    fi
}
