#!/usr/bin/env bash
# Local single-node Apache Kafka (KRaft, combined broker+controller) from Maven
# Central jars -- no tarball. See ops/kafka/README.md.
#
#   kafka.sh start [--port N|0|auto]   start (or report the running broker)
#   kafka.sh stop [--keep-data|--kill] SIGTERM, wait, SIGKILL (--kill: at once); keeps data
#   kafka.sh restart [--port N]        stop + start on the same data and port
#   kafka.sh status                    exit 0 running, 3 not running
#   kafka.sh clean                     stop, then delete data, logs and state
#   kafka.sh resolve                   only download the jars into .cache/lib
#   kafka.sh tool NAME|CLASS [ARGS]    run a Kafka CLI class (topics, consumer-groups, ...)
#
# stdout carries only KEY=VALUE lines (eval-friendly); messages go to stderr.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
CACHE_DIR="$(realpath -m "${KAFKA_CACHE_DIR:-$HERE/.cache}")"
RUN_DIR="$(realpath -m "${KAFKA_RUN_DIR:-$HERE/.run}")"
LIB_DIR="$CACHE_DIR/lib"
PROBE_DIR="$CACHE_DIR/probe"
DATA_DIR="$RUN_DIR/data"
PID_FILE="$RUN_DIR/kafka.pid"
STATE_FILE="$RUN_DIR/kafka.env"
PROPS_FILE="$RUN_DIR/server.properties"
LOG4J_FILE="$RUN_DIR/log4j2.properties"
LOG_FILE="$RUN_DIR/kafka.log"

HOST=127.0.0.1
DEFAULT_PORT=9092
START_TIMEOUT="${KAFKA_START_TIMEOUT:-90}"
STOP_TIMEOUT="${KAFKA_STOP_TIMEOUT:-30}"
HEAP_OPTS="${KAFKA_HEAP_OPTS:--Xmx512m -Xms256m}"
JVM_PERF_OPTS="${KAFKA_JVM_PERFORMANCE_OPTS:--server -XX:+UseG1GC -XX:MaxGCPauseMillis=20 -XX:InitiatingHeapOccupancyPercent=35 -XX:+ExplicitGCInvokesConcurrent -XX:MaxInlineLevel=15 -Djava.awt.headless=true}"
EXTRA_JAVA_OPTS="${KAFKA_OPTS:-}"
AUTO_CREATE_TOPICS="${KAFKA_AUTO_CREATE_TOPICS:-false}"
LOG_LEVEL="${KAFKA_LOG_LEVEL:-INFO}"

if [[ -n "${JAVA_HOME:-}" && -x "$JAVA_HOME/bin/java" ]]; then
  JAVA="$JAVA_HOME/bin/java"
  JAVAC="$JAVA_HOME/bin/javac"
else
  JAVA="$(command -v java || true)"
  JAVAC="$(command -v javac || true)"
fi
MVN="${MVN:-mvn}"

log() { printf 'kafka.sh: %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }
now() { printf '%s' "${EPOCHREALTIME:-$(date +%s.%N)}"; }
elapsed() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }'; }
sha() { sha256sum "$@" | awk '{print $1}' | sha256sum | cut -c1-16; }

usage() { sed -n '2,14s/^# \{0,1\}//p' "${BASH_SOURCE[0]}"; }

# ---------------------------------------------------------------- processes --

# Alive and not a zombie (an unreaped child would still answer kill -0).
pid_alive() {
  local pid="$1" state
  [[ "$pid" =~ ^[0-9]+$ ]] || return 1
  [[ -r "/proc/$pid/stat" ]] || { kill -0 "$pid" 2>/dev/null; return; }
  state="$(awk '{ sub(/^.*\) /, ""); print $1 }' "/proc/$pid/stat" 2>/dev/null || true)"
  [[ -n "$state" && "$state" != Z ]]
}

# The pid is our broker: alive and running kafka.Kafka on this run dir's config.
is_our_broker() {
  local pid="$1" cmd
  pid_alive "$pid" || return 1
  [[ -r "/proc/$pid/cmdline" ]] || return 0
  cmd="$(tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null || true)"
  [[ "$cmd" == *kafka.Kafka*"$PROPS_FILE"* ]]
}

# Prints the pid of the running broker; removes a stale pid file.
running_pid() {
  local pid
  [[ -f "$PID_FILE" ]] || return 1
  pid="$(tr -dc '0-9' <"$PID_FILE")"
  if [[ -n "$pid" ]] && is_our_broker "$pid"; then
    printf '%s' "$pid"
    return 0
  fi
  rm -f "$PID_FILE"
  return 1
}

state_get() {
  [[ -f "$STATE_FILE" ]] || return 0
  sed -n "s/^$1=//p" "$STATE_FILE" | tail -n 1
}

# ------------------------------------------------------------------- ports --

port_in_use() {
  local port="$1"
  if command -v ss >/dev/null 2>&1; then
    [[ -n "$(ss -Htln "( sport = :$port )" 2>/dev/null)" ]]
  else
    (: <>"/dev/tcp/$HOST/$port") 2>/dev/null
  fi
}

# A free port below the Linux ephemeral range (32768+), so outgoing connections
# cannot grab it between our check and the broker's bind.
free_port() {
  local avoid="${1:-}" port i
  for ((i = 0; i < 200; i++)); do
    port=$((20000 + RANDOM % 12000))
    [[ "$port" == "$avoid" ]] && continue
    port_in_use "$port" || { printf '%s' "$port"; return 0; }
  done
  die "could not find a free port"
}

valid_port() { [[ "$1" =~ ^[0-9]+$ ]] && ((10#$1 >= 1 && 10#$1 <= 65535)); }

# -------------------------------------------------------------------- jars --

# Copies the runtime jars listed by pom.xml into .cache/lib (local repo in
# .cache/m2). A stamp of pom.xml's hash makes later runs a no-op.
resolve_jars() {
  local stamp tmp
  stamp="$(sha "$HERE/pom.xml")"
  if [[ -f "$LIB_DIR/.stamp" && "$(cat "$LIB_DIR/.stamp")" == "$stamp" ]]; then
    return 0
  fi
  command -v "$MVN" >/dev/null 2>&1 || die "maven ('$MVN') not found; it is needed once to fetch the Kafka jars"
  mkdir -p "$CACHE_DIR"
  log "resolving Kafka jars from Maven Central into $LIB_DIR ..."
  local t0
  t0="$(now)"
  tmp="$LIB_DIR.tmp.$$"
  rm -rf "$tmp"
  if ! "$MVN" -B -q -ntp -Dstyle.color=never -f "$HERE/pom.xml" \
      -Dmaven.repo.local="$CACHE_DIR/m2" \
      dependency:copy-dependencies -DincludeScope=runtime -DoutputDirectory="$tmp" \
      >"$CACHE_DIR/mvn.log" 2>&1; then
    tail -n 40 "$CACHE_DIR/mvn.log" >&2 || true
    rm -rf "$tmp"
    die "maven dependency resolution failed (full log: $CACHE_DIR/mvn.log)"
  fi
  ls "$tmp"/kafka_2.13-*.jar >/dev/null 2>&1 || die "kafka_2.13 jar missing after resolution"
  printf '%s\n' "$stamp" >"$tmp/.stamp"
  rm -rf "$LIB_DIR" "$PROBE_DIR"
  mv "$tmp" "$LIB_DIR"
  log "jars resolved in $(elapsed "$t0")s ($(find "$LIB_DIR" -name '*.jar' | wc -l) jars)"
}

kafka_version() {
  local jar
  jar="$(find "$LIB_DIR" -maxdepth 1 -name 'kafka_2.13-*.jar' | head -n 1)"
  jar="${jar##*/kafka_2.13-}"
  printf '%s' "${jar%.jar}"
}

# Compiles KafkaProbe.java (readiness check) once into .cache/probe.
build_probe() {
  local stamp
  stamp="$(sha "$HERE/KafkaProbe.java" "$LIB_DIR/.stamp")"
  [[ -f "$PROBE_DIR/.stamp" && "$(cat "$PROBE_DIR/.stamp")" == "$stamp" ]] && return 0
  [[ -n "$JAVAC" && -x "$JAVAC" ]] || return 1
  rm -rf "$PROBE_DIR"
  mkdir -p "$PROBE_DIR"
  "$JAVAC" -nowarn -d "$PROBE_DIR" -cp "$LIB_DIR/*" "$HERE/KafkaProbe.java" >&2
  printf '%s\n' "$stamp" >"$PROBE_DIR/.stamp"
}

# log4j2 config for short-lived client JVMs (probe: OFF, tools: WARN), on stderr.
client_log4j() {
  local level="$1" file="$CACHE_DIR/log4j2-client-$1.properties"
  if [[ ! -f "$file" ]]; then
    mkdir -p "$CACHE_DIR"
    cat >"$file" <<EOF
status = error
appender.err.type = Console
appender.err.name = STDERR
appender.err.target = SYSTEM_ERR
appender.err.layout.type = PatternLayout
appender.err.layout.pattern = %p %m (%c)%n
rootLogger.level = $level
rootLogger.appenderRef.err.ref = STDERR
EOF
  fi
  printf '%s' "$file"
}

# ------------------------------------------------------------------ config --

write_config() {
  local port="$1" cport="$2"
  cat >"$PROPS_FILE" <<EOF
# Generated by ops/kafka/kafka.sh on every start -- edit the script, not this.
process.roles=broker,controller
node.id=1
controller.quorum.voters=1@$HOST:$cport
listeners=PLAINTEXT://$HOST:$port,CONTROLLER://$HOST:$cport
advertised.listeners=PLAINTEXT://$HOST:$port
inter.broker.listener.name=PLAINTEXT
controller.listener.names=CONTROLLER
listener.security.protocol.map=CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT
log.dirs=$DATA_DIR

num.partitions=1
default.replication.factor=1
min.insync.replicas=1
auto.create.topics.enable=$AUTO_CREATE_TOPICS
delete.topic.enable=true
group.initial.rebalance.delay.ms=0

# single node: internal topics with RF 1; few partitions so first use is quick
offsets.topic.replication.factor=1
offsets.topic.num.partitions=1
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
transaction.state.log.num.partitions=1
share.coordinator.state.topic.replication.factor=1
share.coordinator.state.topic.min.isr=1

# modest threads for a 2-core box
num.network.threads=2
num.io.threads=4
num.recovery.threads.per.data.dir=1
EOF
  if [[ -n "${KAFKA_EXTRA_CONFIG:-}" ]]; then
    printf '\n# KAFKA_EXTRA_CONFIG (later keys win)\n%s\n' "$KAFKA_EXTRA_CONFIG" >>"$PROPS_FILE"
  fi

  if [[ -n "${KAFKA_LOG4J_CONFIG:-}" ]]; then
    cp "$KAFKA_LOG4J_CONFIG" "$LOG4J_FILE"
  else
    # shutdownHook=disable: otherwise log4j2's own hook stops logging in the
    # middle of Kafka's shutdown and the end of the shutdown never reaches the log.
    cat >"$LOG4J_FILE" <<EOF
status = warn
shutdownHook = disable
appender.out.type = Console
appender.out.name = STDOUT
appender.out.layout.type = PatternLayout
appender.out.layout.pattern = [%d] %p %m (%c)%n
rootLogger.level = $LOG_LEVEL
rootLogger.appenderRef.out.ref = STDOUT
logger.request.name = kafka.request.logger
logger.request.level = WARN
logger.channel.name = kafka.network.RequestChannel\$
logger.channel.level = WARN
logger.statechange.name = state.change.logger
logger.statechange.level = WARN
EOF
  fi
}

write_state() {
  cat >"$STATE_FILE" <<EOF
KAFKA_BOOTSTRAP=$HOST:$1
PORT=$1
CONTROLLER_PORT=$2
CLUSTER_ID=$3
KAFKA_VERSION=$4
EOF
}

new_cluster_id() {
  # Kafka Uuid: 16 random bytes, base64url without padding; never starting with '-'.
  local id
  while :; do
    id="$(head -c 16 /dev/urandom | base64 | tr '+/' '-_' | tr -d '=\n')"
    [[ "$id" != -* && ${#id} -eq 22 ]] && break
  done
  printf '%s' "$id"
}

java_cmd() {
  local -a heap perf extra
  read -r -a heap <<<"$HEAP_OPTS"
  read -r -a perf <<<"$JVM_PERF_OPTS"
  read -r -a extra <<<"$EXTRA_JAVA_OPTS"
  JAVA_CMD=("$JAVA" "${heap[@]}" "${perf[@]}" "${extra[@]}"
    "-Dlog4j2.configurationFile=$LOG4J_FILE" -cp "$LIB_DIR/*")
}

# ------------------------------------------------------------------ locking --

lock_run_dir() {
  mkdir -p "$RUN_DIR"
  if command -v flock >/dev/null 2>&1; then
    exec 9>"$RUN_DIR/.lock"
    flock -w $((START_TIMEOUT + STOP_TIMEOUT + 300)) 9 || die "could not lock $RUN_DIR"
  fi
}

# ---------------------------------------------------------------- commands --

cmd_start() {
  local req_port="${KAFKA_PORT:-}" explicit=0 pid port cport cid version t0 remaining rc
  [[ -n "$req_port" ]] && explicit=1
  while (($#)); do
    case "$1" in
      --port) [[ $# -ge 2 ]] || die "--port needs a value"; req_port="$2"; explicit=1; shift 2 ;;
      --port=*) req_port="${1#--port=}"; explicit=1; shift ;;
      *) die "start: unknown argument '$1'" ;;
    esac
  done
  [[ "$req_port" == auto ]] && req_port=0
  if ((explicit)) && [[ "$req_port" != 0 ]]; then
    valid_port "$req_port" || die "invalid port '$req_port'"
  fi

  lock_run_dir
  if pid="$(running_pid)"; then
    port="$(state_get PORT)"
    if ((explicit)) && [[ "$req_port" != 0 && "$req_port" != "$port" ]]; then
      die "already running at $HOST:$port (pid $pid), not on requested port $req_port; stop it first"
    fi
    log "already running at $HOST:$port (pid $pid)"
    printf 'KAFKA_BOOTSTRAP=%s:%s\n' "$HOST" "$port"
    return 0
  fi

  t0="$(now)"
  [[ -n "$JAVA" ]] || die "java not found (Kafka 4.x needs Java 17+)"
  resolve_jars
  version="$(kafka_version)"

  local formatted=0
  [[ -f "$DATA_DIR/meta.properties" ]] && formatted=1

  # Port: explicit (--port / KAFKA_PORT) > previous run on this data > 9092 > any free.
  if ((explicit)); then
    if [[ "$req_port" == 0 ]]; then
      port="$(free_port)"
    else
      port="$req_port"
      port_in_use "$port" && die "port $port is already in use"
    fi
  elif ((formatted)) && [[ -n "$(state_get PORT)" ]]; then
    port="$(state_get PORT)"
    port_in_use "$port" && die "port $port (used by this data dir before) is in use; pass --port N or run clean"
  elif ! port_in_use "$DEFAULT_PORT"; then
    port="$DEFAULT_PORT"
  else
    port="$(free_port)"
    log "port $DEFAULT_PORT is busy, using $port"
  fi
  cport="$(state_get CONTROLLER_PORT)"
  if [[ -z "$cport" || "$cport" == "$port" ]] || port_in_use "$cport"; then
    cport="$(free_port "$port")"
  fi

  mkdir -p "$DATA_DIR"
  write_config "$port" "$cport"
  java_cmd

  cid="$(state_get CLUSTER_ID)"
  if ((formatted)); then
    [[ -n "$cid" ]] || cid="$(sed -n 's/^cluster.id=//p' "$DATA_DIR/meta.properties")"
  else
    cid="$(new_cluster_id)"
    log "formatting $DATA_DIR (cluster id $cid)"
    if ! "$JAVA" -Xmx256m -XX:TieredStopAtLevel=1 -XX:+UseSerialGC \
        "-Dlog4j2.configurationFile=$(client_log4j WARN)" -cp "$LIB_DIR/*" \
        kafka.tools.StorageTool format -t "$cid" -c "$PROPS_FILE" >"$RUN_DIR/format.log" 2>&1; then
      cat "$RUN_DIR/format.log" >&2
      die "storage format failed"
    fi
  fi
  write_state "$port" "$cport" "$cid" "$version"

  [[ -f "$LOG_FILE" ]] && mv -f "$LOG_FILE" "$LOG_FILE.1"
  # setsid: own session, so a caller's Ctrl-C or process-group kill does not hit
  # the broker; 9>&- keeps the run-dir lock from leaking into it.
  local -a launcher=(nohup)
  command -v setsid >/dev/null 2>&1 && launcher=(setsid nohup)
  "${launcher[@]}" "${JAVA_CMD[@]}" kafka.Kafka "$PROPS_FILE" >"$LOG_FILE" 2>&1 </dev/null 9>&- &
  pid=$!
  disown "$pid" 2>/dev/null || true
  printf '%s\n' "$pid" >"$PID_FILE"

  remaining=$(awk -v t="$START_TIMEOUT" -v e="$(elapsed "$t0")" 'BEGIN { r = int((t - e) * 1000); print (r < 5000 ? 5000 : r) }')
  rc=0
  if build_probe; then
    "$JAVA" -Xmx64m -XX:TieredStopAtLevel=1 -XX:+UseSerialGC \
      "-Dlog4j2.configurationFile=$(client_log4j OFF)" \
      -cp "$PROBE_DIR:$LIB_DIR/*" KafkaProbe "$HOST:$port" "$remaining" "$pid" >/dev/null || rc=$?
  else
    # No javac: fall back to the broker's own "started" log line plus an open port.
    log "javac not found; waiting for the 'Kafka Server started' log line instead"
    rc=1
    local deadline=$((SECONDS + remaining / 1000))
    while ((SECONDS < deadline)); do
      pid_alive "$pid" || { rc=2; break; }
      if grep -q 'Kafka Server started' "$LOG_FILE" 2>/dev/null && port_in_use "$port"; then rc=0; break; fi
      sleep 0.2
    done
  fi

  if ((rc != 0)); then
    log "broker did not become ready (probe exit $rc); last log lines from $LOG_FILE:"
    tail -n 60 "$LOG_FILE" >&2 || true
    if pid_alive "$pid"; then
      kill -KILL "$pid" 2>/dev/null || true
    fi
    rm -f "$PID_FILE"
    die "start failed after $(elapsed "$t0")s"
  fi
  local took
  took="$(elapsed "$t0")"
  log "Kafka $version ready at $HOST:$port (pid $pid, controller :$cport) in ${took}s; log: $LOG_FILE"
  printf 'KAFKA_BOOTSTRAP=%s:%s\nKAFKA_START_SECONDS=%s\n' "$HOST" "$port" "$took"
}

stop_broker() {
  local signal="${1:-TERM}" pid t0
  if ! pid="$(running_pid)"; then
    log "not running (run dir $RUN_DIR)"
    return 0
  fi
  t0="$(now)"
  kill "-$signal" "$pid" 2>/dev/null || true
  local deadline=$((SECONDS + STOP_TIMEOUT))
  while pid_alive "$pid" && ((SECONDS < deadline)); do sleep 0.2; done
  if pid_alive "$pid"; then
    log "pid $pid still alive after ${STOP_TIMEOUT}s, sending SIGKILL"
    kill -KILL "$pid" 2>/dev/null || true
    for _ in $(seq 50); do pid_alive "$pid" || break; sleep 0.1; done
  fi
  rm -f "$PID_FILE"
  log "stopped (pid $pid, SIG$signal) in $(elapsed "$t0")s; data kept in $DATA_DIR"
}

cmd_stop() {
  local signal=TERM
  while (($#)); do
    case "$1" in
      --keep-data) shift ;; # stop never deletes data; accepted for clarity
      --kill) signal=KILL; shift ;; # crash it (no clean shutdown) to test recovery
      *) die "stop: unknown argument '$1'" ;;
    esac
  done
  lock_run_dir
  stop_broker "$signal"
}

cmd_status() {
  local pid
  if pid="$(running_pid)"; then
    printf 'running at %s:%s (pid %s, Kafka %s, run dir %s)\n' \
      "$HOST" "$(state_get PORT)" "$pid" "$(state_get KAFKA_VERSION)" "$RUN_DIR"
    printf 'KAFKA_BOOTSTRAP=%s:%s\n' "$HOST" "$(state_get PORT)"
    return 0
  fi
  printf 'not running (run dir %s%s)\n' "$RUN_DIR" \
    "$([[ -f "$DATA_DIR/meta.properties" ]] && echo ", formatted data kept")"
  return 3
}

cmd_clean() {
  [[ $# -eq 0 ]] || die "clean takes no arguments"
  lock_run_dir
  stop_broker
  rm -rf "$DATA_DIR"
  rm -f "$PID_FILE" "$STATE_FILE" "$PROPS_FILE" "$LOG4J_FILE" "$LOG_FILE" "$LOG_FILE.1" \
    "$RUN_DIR/format.log"
  log "removed data, logs and state in $RUN_DIR"
}

cmd_tool() {
  [[ $# -ge 1 ]] || die "usage: kafka.sh tool NAME|MAIN_CLASS [ARGS...]"
  local cls="$1"
  shift
  case "$cls" in
    topics) cls=org.apache.kafka.tools.TopicCommand ;;
    consumer-groups) cls=org.apache.kafka.tools.consumer.group.ConsumerGroupCommand ;;
    console-consumer) cls=org.apache.kafka.tools.consumer.ConsoleConsumer ;;
    console-producer) cls=org.apache.kafka.tools.ConsoleProducer ;;
    get-offsets) cls=org.apache.kafka.tools.GetOffsetShell ;;
    metadata-quorum) cls=org.apache.kafka.tools.MetadataQuorumCommand ;;
    configs) cls=org.apache.kafka.tools.ConfigCommand ;;
    storage) cls=kafka.tools.StorageTool ;;
  esac
  resolve_jars
  exec "$JAVA" -Xmx256m -XX:TieredStopAtLevel=1 \
    "-Dlog4j2.configurationFile=$(client_log4j WARN)" -cp "$LIB_DIR/*" "$cls" "$@"
}

main() {
  local cmd="${1:-help}"
  [[ $# -gt 0 ]] && shift
  case "$cmd" in
    start) cmd_start "$@" ;;
    stop) cmd_stop "$@" ;;
    restart | restart-keep-data) cmd_stop; cmd_start "$@" ;;
    status) cmd_status "$@" ;;
    clean) cmd_clean "$@" ;;
    resolve) resolve_jars; log "Kafka $(kafka_version) jars in $LIB_DIR" ;;
    tool) cmd_tool "$@" ;;
    help | -h | --help) usage ;;
    *) usage >&2; die "unknown command '$cmd'" ;;
  esac
}

main "$@"
