# Sourced by bench/backends.sh and bench/fleet.sh: a 3-member etcd cluster on 127.0.0.1
# (the recipe of docs/research/etcd3.sh) in a directory of the caller's, stopped by pid.
#
#   etcd_start DIR BASE   # members m1..m3: clients on BASE+1..3, peers on BASE+11..13
#   etcd_endpoints        # 127.0.0.1:BASE+1,127.0.0.1:BASE+2,127.0.0.1:BASE+3
#   etcd_cpu_ticks        # user+system clock ticks of the three members so far
#   etcd_stop             # TERM each member, KILL one still there after 5 s
#
# BASE defaults to 24790 (clients 24791..3, peers 24801..3); the ports must be free.

ETCD_DIR=
ETCD_BASE=${ETCD_BASE:-24790}
ETCD_PIDS=()

etcd_endpoints() {
  echo "127.0.0.1:$((ETCD_BASE + 1)),127.0.0.1:$((ETCD_BASE + 2)),127.0.0.1:$((ETCD_BASE + 3))"
}

etcd_start() {
  ETCD_DIR=$1
  ETCD_BASE=${2:-$ETCD_BASE}
  command -v etcd >/dev/null || { echo "etcd not found" >&2; return 1; }
  local i port
  for i in 1 2 3 11 12 13; do
    port=$((ETCD_BASE + i))
    if ss -ltnH "sport = :$port" 2>/dev/null | grep -q .; then
      echo "port $port is in use: pick another base (ETCD_BASE)" >&2
      return 1
    fi
  done
  local cluster="m1=http://127.0.0.1:$((ETCD_BASE + 11)),m2=http://127.0.0.1:$((ETCD_BASE + 12)),m3=http://127.0.0.1:$((ETCD_BASE + 13))"
  mkdir -p -m 700 "$ETCD_DIR"
  for i in 1 2 3; do
    mkdir -p -m 700 "$ETCD_DIR/m$i"
    etcd --name "m$i" --data-dir "$ETCD_DIR/m$i" \
      --listen-client-urls "http://127.0.0.1:$((ETCD_BASE + i))" \
      --advertise-client-urls "http://127.0.0.1:$((ETCD_BASE + i))" \
      --listen-peer-urls "http://127.0.0.1:$((ETCD_BASE + 10 + i))" \
      --initial-advertise-peer-urls "http://127.0.0.1:$((ETCD_BASE + 10 + i))" \
      --initial-cluster "$cluster" --initial-cluster-token "credproxy-bench-$$" \
      --initial-cluster-state new --log-level warn --logger zap >"$ETCD_DIR/m$i.log" 2>&1 &
    ETCD_PIDS+=($!)
  done
  local _
  for _ in $(seq 100); do
    if ETCDCTL_API=3 etcdctl --endpoints="$(etcd_endpoints)" --dial-timeout=1s \
      endpoint health >/dev/null 2>&1; then
      return 0
    fi
    sleep 0.2
  done
  echo "etcd cluster did not become healthy in 20 s; logs in $ETCD_DIR" >&2
  return 1
}

etcd_cpu_ticks() {
  local pid total=0 fields
  for pid in "${ETCD_PIDS[@]}"; do
    # Fields 14 and 15 of /proc/PID/stat (utime, stime), after the parenthesised name.
    fields=$(sed 's/^.*) //' "/proc/$pid/stat" 2>/dev/null) || continue
    set -- $fields
    total=$((total + ${12} + ${13}))
  done
  echo "$total"
}

etcd_stop() {
  local pid _
  [ "${#ETCD_PIDS[@]}" -gt 0 ] || return 0
  for pid in "${ETCD_PIDS[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  for pid in "${ETCD_PIDS[@]}"; do
    for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
  done
  ETCD_PIDS=()
}
