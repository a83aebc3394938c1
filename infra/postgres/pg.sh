#!/usr/bin/env bash
# A private PostgreSQL cluster on loopback, from Debian's packages: no Docker, no system service.
#
#   infra/postgres/pg.sh up     [--dir DIR] [--port PORT]   start (initdb'ing DIR on first use)
#   infra/postgres/pg.sh down   [--dir DIR]                 stop (fast shutdown, waits)
#   infra/postgres/pg.sh status [--dir DIR]                 exit 0 when up, 3 when down
#   infra/postgres/pg.sh url    [--dir DIR]                 print the cluster's URL
#
# When no server binaries are found (/usr/lib/postgresql/*/bin), `up` installs Debian's
# `postgresql` with apt-get first. DIR (default var/postgres in the repository) holds data/,
# the socket, postgres.log and port; data survives `down`, so `up` again restarts the same
# cluster. PORT defaults to the one DIR last ran on, else 5433. The server listens on
# 127.0.0.1 only, with trust authentication for the superuser `postgres`: a development and
# test cluster, never a production one. PostgreSQL refuses to run as root, so when run as root
# the cluster runs as the `postgres` user (created by the Debian package) and DIR is given to it.
# Environment: PG_SERVER_OPTS (more `-c name=value` server options, e.g. `-c fsync=off` for
# throwaway test clusters), PG_START_TIMEOUT (seconds, default 60).
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$HERE/../.." && pwd)"

usage() {
    sed -n '4,8p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//' >&2
    exit 2
}

cmd="${1:-}"
[ -n "$cmd" ] || usage
shift
DIR="$REPO/var/postgres"
PORT=""
while [ $# -gt 0 ]; do
    case "$1" in
        --dir) DIR="$2"; shift 2 ;;
        --port) PORT="$2"; shift 2 ;;
        *) usage ;;
    esac
done
mkdir -p "$DIR"
DIR="$(cd "$DIR" && pwd)"
DATA="$DIR/data"
LOG_FILE="$DIR/postgres.log"
if [ -z "$PORT" ]; then
    PORT="$(cat "$DIR/port" 2>/dev/null || true)"
    PORT="${PORT:-5433}"
fi

pg_bin() {
    local bin
    bin="$(compgen -G "/usr/lib/postgresql/*/bin" | sort -V | tail -n 1 || true)"
    [ -n "$bin" ] && [ -x "$bin/initdb" ] && echo "$bin"
}

install_postgres() {
    echo "pg.sh: no PostgreSQL server binaries; installing Debian's postgresql" >&2
    local sudo=()
    [ "$(id -u)" = 0 ] || sudo=(sudo)
    export DEBIAN_FRONTEND=noninteractive
    "${sudo[@]}" apt-get update -qq
    "${sudo[@]}" apt-get install -y -qq postgresql > /dev/null
}

# Runs a command as the cluster's owner: ourselves, or `postgres` when we are root.
as_owner() {
    if [ "$(id -u)" = 0 ]; then
        runuser -u postgres -- "$@"
    else
        "$@"
    fi
}

BIN=""
need_bin() {
    BIN="$(pg_bin || true)"
    if [ -z "$BIN" ]; then
        install_postgres
        BIN="$(pg_bin || true)"
        [ -n "$BIN" ] || { echo "pg.sh: installing postgresql gave no server binaries" >&2; exit 1; }
    fi
}

running() {
    [ -f "$DATA/postmaster.pid" ] && [ -n "$BIN" ] && as_owner "$BIN/pg_ctl" -D "$DATA" status > /dev/null 2>&1
}

url() {
    echo "postgresql://postgres@127.0.0.1:$PORT/postgres"
}

up() {
    need_bin
    if running; then
        echo "pg.sh: already up on 127.0.0.1:$(cat "$DIR/port") ($DIR)"
        return 0
    fi
    if (exec 3<>"/dev/tcp/127.0.0.1/$PORT") 2>/dev/null; then
        echo "pg.sh: port $PORT is taken by another process" >&2
        return 1
    fi
    if [ "$(id -u)" = 0 ]; then
        id postgres > /dev/null 2>&1 || { echo "pg.sh: no 'postgres' user to run as" >&2; exit 1; }
        chown -R postgres: "$DIR"
        chmod 700 "$DIR"
        if ! runuser -u postgres -- test -w "$DIR"; then
            echo "pg.sh: the postgres user cannot reach $DIR (a parent directory is closed to it)" >&2
            return 1
        fi
    fi
    if [ ! -f "$DATA/PG_VERSION" ]; then
        as_owner "$BIN/initdb" -D "$DATA" -U postgres --auth=trust --encoding=UTF8 \
            --no-locale > "$DIR/initdb.log" 2>&1 || {
            echo "pg.sh: initdb failed:" >&2
            tail -n 30 "$DIR/initdb.log" >&2
            return 1
        }
    fi
    echo "$PORT" > "$DIR/port"
    [ "$(id -u)" = 0 ] && chown postgres: "$DIR/port"
    local opts="-p $PORT -k $DIR -c listen_addresses=127.0.0.1 ${PG_SERVER_OPTS:-}"
    if ! as_owner "$BIN/pg_ctl" -D "$DATA" -l "$LOG_FILE" -o "$opts" \
        -t "${PG_START_TIMEOUT:-60}" -w start > /dev/null; then
        echo "pg.sh: the server did not start; the end of $LOG_FILE:" >&2
        tail -n 40 "$LOG_FILE" >&2
        return 1
    fi
    local deadline=$((SECONDS + ${PG_START_TIMEOUT:-60}))
    until "$BIN/pg_isready" -q -h 127.0.0.1 -p "$PORT"; do
        if [ "$SECONDS" -ge "$deadline" ]; then
            echo "pg.sh: the server does not accept connections on 127.0.0.1:$PORT" >&2
            return 1
        fi
        sleep 0.1
    done
    echo "pg.sh: up on $(url) ($DIR)"
}

down() {
    BIN="$(pg_bin || true)"
    if running; then
        as_owner "$BIN/pg_ctl" -D "$DATA" -m fast -w stop > /dev/null
        echo "pg.sh: stopped ($DIR)"
    else
        echo "pg.sh: not running ($DIR)"
    fi
}

status() {
    BIN="$(pg_bin || true)"
    if running && "$BIN/pg_isready" -q -h 127.0.0.1 -p "$PORT"; then
        echo "up ($(url), $DIR)"
    else
        echo "down ($DIR)"
        return 3
    fi
}

case "$cmd" in
    up) up ;;
    down) down ;;
    status) status ;;
    url) url ;;
    *) usage ;;
esac
