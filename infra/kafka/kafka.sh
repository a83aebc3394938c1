#!/usr/bin/env bash
# A real single-node Apache Kafka broker (KRaft, broker + controller in one JVM) on loopback,
# from Kafka's own jars on Maven Central: no Docker, no tarball.
#
#   infra/kafka/kafka.sh up     [--dir DIR] [--port PORT]   start (formatting DIR on first use)
#   infra/kafka/kafka.sh down   [--dir DIR]                 stop: SIGTERM, wait, then SIGKILL
#   infra/kafka/kafka.sh status [--dir DIR]                 exit 0 when up, 3 when down
#   infra/kafka/kafka.sh classpath                          print the broker's classpath
#
# PORT (default: the one DIR last ran on, else 9092) is the client listener; the controller
# listens on PORT+1. DIR (default var/kafka in the repository) holds server.properties, data/,
# broker.log and broker.pid; data survives `down`, so `up` again restarts the same cluster.
# `up` when already up is a no-op.
# The classpath is resolved by Maven once and cached in target/classpath.txt (the jars stay in
# the local Maven repository, ~/.m2), so later starts need no network and no Maven.
# Environment: KAFKA_HEAP_OPTS (default -Xms256m -Xmx512m), KAFKA_JVM_OPTS (more JVM options),
# KAFKA_START_TIMEOUT (seconds, default 120).
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$HERE/../.." && pwd)"
CP_FILE="$HERE/target/classpath.txt"

usage() {
    sed -n '5,9p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//' >&2
    exit 2
}

cmd="${1:-}"
[ -n "$cmd" ] || usage
shift
DIR="$REPO/var/kafka"
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
if [ -z "$PORT" ]; then
    # The port this DIR last ran on, else Kafka's usual one.
    PORT="$(sed -n 's|^listeners=PLAINTEXT://127.0.0.1:\([0-9]*\),.*|\1|p' \
        "$DIR/server.properties" 2>/dev/null || true)"
    PORT="${PORT:-9092}"
fi
PID_FILE="$DIR/broker.pid"
LOG_FILE="$DIR/broker.log"
CONTROLLER_PORT=$((PORT + 1))

classpath() {
    local stale=0 jar out
    if [ ! -s "$CP_FILE" ] || [ "$HERE/pom.xml" -nt "$CP_FILE" ]; then
        stale=1
    else
        # The local Maven repository may have been cleaned since the cache was written.
        IFS=: read -r -a jars < "$CP_FILE" || true  # no newline at its end
        for jar in "${jars[@]}"; do
            [ -f "$jar" ] || { stale=1; break; }
        done
    fi
    if [ "$stale" = 1 ]; then
        echo "kafka.sh: resolving the broker's jars with Maven (first run downloads them)" >&2
        mkdir -p "$HERE/target"
        if ! out="$(mvn -q -B -f "$HERE/pom.xml" dependency:build-classpath \
            -Dmdep.includeScope=runtime -Dmdep.outputFile="$CP_FILE.tmp" 2>&1)"; then
            echo "$out" >&2
            echo "kafka.sh: Maven could not resolve the broker's jars" >&2
            return 1
        fi
        mv "$CP_FILE.tmp" "$CP_FILE"
    fi
    cat "$CP_FILE"
}

running_pid() {
    local pid
    [ -f "$PID_FILE" ] || return 1
    pid="$(cat "$PID_FILE")"
    [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null || return 1
    # Guard against a recycled pid: it must still be our broker.
    tr '\0' ' ' < "/proc/$pid/cmdline" 2>/dev/null | grep -q "kafka.Kafka $DIR/server.properties" \
        || return 1
    echo "$pid"
}

port_open() {
    (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null
}

cluster_id() {
    # Kafka's Uuid text form: 16 random bytes, URL-safe base64 without padding, and (as
    # Uuid.randomUuid ensures) not starting with '-', which a command line would take as a flag.
    local id
    while :; do
        id="$(head -c 16 /dev/urandom | base64 | tr '+/' '-_' | tr -d '=\n')"
        [ "${id:0:1}" != "-" ] && { echo "$id"; return; }
    done
}

java_opts() {
    # shellcheck disable=SC2086
    echo ${KAFKA_HEAP_OPTS:--Xms256m -Xmx512m} -Djava.awt.headless=true \
        "-Dlog4j2.configurationFile=$HERE/log4j2.properties" "-Dkafka.logs.dir=$DIR" \
        ${KAFKA_JVM_OPTS:-}
}

up() {
    local pid cp deadline
    if pid="$(running_pid)"; then
        echo "kafka.sh: broker already up (pid $pid, $DIR)"
        return 0
    fi
    if port_open "$PORT" || port_open "$CONTROLLER_PORT"; then
        echo "kafka.sh: port $PORT or $CONTROLLER_PORT is taken by another process" >&2
        return 1
    fi
    cp="$(classpath)"
    sed -e "s|@PORT@|$PORT|g" -e "s|@CONTROLLER_PORT@|$CONTROLLER_PORT|g" \
        -e "s|@LOG_DIRS@|$DIR/data|g" "$HERE/server.properties" > "$DIR/server.properties"
    if [ ! -f "$DIR/data/meta.properties" ]; then
        # shellcheck disable=SC2046
        java $(java_opts) -XX:TieredStopAtLevel=1 -XX:+UseSerialGC -cp "$cp" \
            kafka.tools.StorageTool format --standalone \
            -t "$(cluster_id)" -c "$DIR/server.properties" >> "$LOG_FILE" 2>&1 || {
            echo "kafka.sh: formatting $DIR/data failed:" >&2
            tail -n 40 "$LOG_FILE" >&2
            return 1
        }
    fi
    # shellcheck disable=SC2046
    setsid nohup java $(java_opts) -XX:+UseG1GC -cp "$cp" kafka.Kafka "$DIR/server.properties" \
        >> "$LOG_FILE" 2>&1 < /dev/null &
    pid=$!
    echo "$pid" > "$PID_FILE"
    deadline=$((SECONDS + ${KAFKA_START_TIMEOUT:-120}))
    until port_open "$PORT"; do
        if ! kill -0 "$pid" 2>/dev/null; then
            echo "kafka.sh: the broker exited during start-up; the end of $LOG_FILE:" >&2
            tail -n 60 "$LOG_FILE" >&2
            rm -f "$PID_FILE"
            return 1
        fi
        if [ "$SECONDS" -ge "$deadline" ]; then
            echo "kafka.sh: the broker did not listen on 127.0.0.1:$PORT in time; the end of $LOG_FILE:" >&2
            tail -n 60 "$LOG_FILE" >&2
            stop_pid "$pid"
            return 1
        fi
        sleep 0.2
    done
    echo "kafka.sh: broker up on 127.0.0.1:$PORT (pid $pid, $DIR)"
}

stop_pid() {
    local pid="$1" _
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 1 150); do  # 30 s for a controlled shutdown
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.2
    done
    if kill -0 "$pid" 2>/dev/null; then
        echo "kafka.sh: the broker ignored SIGTERM for 30 s; killing it" >&2
        kill -KILL "$pid" 2>/dev/null || true
        while kill -0 "$pid" 2>/dev/null; do sleep 0.1; done
    fi
    rm -f "$PID_FILE"
}

down() {
    local pid
    if pid="$(running_pid)"; then
        stop_pid "$pid"
        echo "kafka.sh: broker stopped ($DIR)"
    else
        rm -f "$PID_FILE"
        echo "kafka.sh: broker not running ($DIR)"
    fi
}

status() {
    local pid
    if pid="$(running_pid)" && port_open "$PORT"; then
        echo "up (pid $pid, 127.0.0.1:$PORT, $DIR)"
    elif [ -n "${pid:-}" ]; then
        echo "starting or stopping (pid $pid, $DIR)"
        return 3
    else
        echo "down ($DIR)"
        return 3
    fi
}

case "$cmd" in
    up) up ;;
    down) down ;;
    status) status ;;
    classpath) classpath ;;
    *) usage ;;
esac
