#!/usr/bin/env bash
# get_token under steady load on every store backend, in one run, beside
# ../shared/loadgen's limitserver (the floor): loadgen --mode steady --connections 64,
# --op get_token --payload '{"provider":"anthropic"}', against
#
#   limit    limitserver (answers {} without parsing the payload)
#   mem      examples/bench_server (the memory store, in process)
#   file     credproxy serve --store DIR
#   keyring  credproxy serve --store keyring:SERVICE (gnome-keyring on a private D-Bus
#            session: the script re-runs itself under `dbus-run-session -- .ci/with-keyring`;
#            skipped, with a note, when either is missing or NO_KEYRING=1)
#   etcd     credproxy serve --store etcd://3 members/bench --store-key K (its watch-fed
#            read cache on), on a 3-member cluster started here (bench/etcd_cluster.sh)
#
# Every serve runs with --allow-all --rate-limit 0 and host-side refresh on; the same
# token (a refresh token, expiry 4102444800: never due) is stored in each store first. A
# fresh server for every run; the runs are interleaved, REPS times, and the median kept.
# "etcd cores" is the CPU the three etcd members used during the etcd runs (warm-up
# included), in cores: what the cache leaves to etcd.
#
#   bench/backends.sh                 # DUR=5 seconds per run, REPS=3
#   DUR=10 REPS=5 ETCD_BASE=25790 bench/backends.sh
#   KEEP=1 bench/backends.sh          # keep the raw loadgen JSON (path printed at the end)
#   ETCD_DATA=/dev/shm bench/backends.sh   # the members' data directories there (tmpfs)
# The build goes to $CARGO_TARGET_DIR when set (loadgen into its loadgen/ subdirectory).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD

# The keyring part needs a Secret Service on a D-Bus session of its own: run the whole
# script there (the other scenarios do not notice).
KEYRING_NOTE=
if [ -n "${NO_KEYRING:-}" ]; then
  KEYRING_NOTE="keyring skipped: NO_KEYRING is set"
elif [ -z "${CREDPROXY_BENCH_IN_KEYRING:-}" ]; then
  if command -v dbus-run-session >/dev/null && command -v gnome-keyring-daemon >/dev/null; then
    export CREDPROXY_BENCH_IN_KEYRING=1
    exec dbus-run-session -- "$ROOT/.ci/with-keyring" "$ROOT/bench/backends.sh" "$@"
  fi
  KEYRING_NOTE="keyring skipped: dbus-run-session or gnome-keyring-daemon is missing"
fi

DUR=${DUR:-5}
REPS=${REPS:-3}
CONNS=${CONNS:-64}
LOADGEN_SRC=${LOADGEN_SRC:-../shared/loadgen}
ETCD_BASE=${ETCD_BASE:-24790}
ETCD_DATA=${ETCD_DATA:-}
TARGET=${CARGO_TARGET_DIR:-$ROOT/target}
# shellcheck source=bench/etcd_cluster.sh
. "$ROOT/bench/etcd_cluster.sh"

OUT=$(mktemp -d /tmp/credproxy-backends-XXXXXX)
chmod 700 "$OUT"
ETCD_DIR_OURS=$OUT/etcd
if [ -n "$ETCD_DATA" ]; then ETCD_DIR_OURS=$(mktemp -d "$ETCD_DATA/credproxy-etcd-XXXXXX"); fi
SPID=
MEMFD=

stop_pid() { # TERM, then KILL after 5 s
  local pid=$1 _
  kill -TERM "$pid" 2>/dev/null || return 0
  for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  kill -KILL "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
}

cleanup() {
  set +e
  if [ -n "$MEMFD" ]; then exec 3>&-; MEMFD=; fi
  [ -n "$SPID" ] && stop_pid "$SPID"
  etcd_stop
  rm -rf "$ETCD_DIR_OURS"
  if [ -n "${KEEP:-}" ]; then
    echo "raw results kept: $OUT" >&2
  else
    rm -rf "$OUT"
  fi
  # .ci/with-keyring's own directory (the keyring's XDG dirs): nothing else uses it.
  if [ -n "${CREDPROXY_BENCH_IN_KEYRING:-}" ] && [ -n "${XDG_RUNTIME_DIR:-}" ]; then
    local kdir
    kdir=$(dirname "$XDG_RUNTIME_DIR")
    if [ -d "$kdir/data" ] && [ -d "$kdir/run" ] && [ "$(basename "$XDG_RUNTIME_DIR")" = run ]; then
      rm -rf "$kdir"
    fi
  fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

echo "building (release)..." >&2
cargo build --release --bin credproxy --example bench_server >&2
# loadgen is built once into the target directory and kept there.
CARGO_TARGET_DIR="$TARGET/loadgen" cargo build --release --manifest-path "$LOADGEN_SRC/Cargo.toml" >&2
LG="$TARGET/loadgen/release"
BIN="$TARGET/release/credproxy"
BS="$TARGET/release/examples/bench_server"

TOKEN='{"access_token":"bench-access-token","refresh_token":"bench-refresh-token","expiry":4102444800,"token_type":"Bearer"}'
mkdir -m 700 "$OUT/sock"

# The file store.
printf '%s' "$TOKEN" | "$BIN" store token set anthropic --store "$OUT/store" 2>/dev/null

# The keyring: a service name of this run's own.
KEYRING_STORE="keyring:credproxy-bench-$$"
SERVERS="limit mem file keyring etcd"
if [ -z "$KEYRING_NOTE" ]; then
  if ! printf '%s' "$TOKEN" | "$BIN" store token set anthropic --store "$KEYRING_STORE" 2>"$OUT/keyring-seed.err"; then
    KEYRING_NOTE="keyring skipped: storing the token failed: $(tr '\n' ' ' <"$OUT/keyring-seed.err")"
  fi
fi
[ -z "$KEYRING_NOTE" ] || SERVERS="limit mem file etcd"

# The etcd cluster and its store.
echo "starting a 3-member etcd cluster (clients on $((ETCD_BASE + 1))..$((ETCD_BASE + 3)))..." >&2
etcd_start "$ETCD_DIR_OURS" "$ETCD_BASE"
head -c 32 /dev/urandom >"$OUT/etcd.key"
chmod 600 "$OUT/etcd.key"
ETCD_STORE="etcd://$(etcd_endpoints)/bench"
printf '%s' "$TOKEN" | "$BIN" store token set anthropic --store "$ETCD_STORE" --store-key "$OUT/etcd.key"

start_serve() { # serve on "$@" (the store arguments)
  : >"$OUT/serve.out"
  "$BIN" serve "$@" --allow-all --rate-limit 0 --socket-dir "$OUT/sock" >"$OUT/serve.out" 2>"$OUT/serve.err" &
  SPID=$!
  local _
  for _ in $(seq 200); do [ -s "$OUT/serve.out" ] && break; sleep 0.05; done
  if ! [ -s "$OUT/serve.out" ]; then
    echo "serve $* did not start: $(tail -5 "$OUT/serve.err")" >&2
    return 1
  fi
  SOCK=$(sed -n 's/^LLXPRT_CREDENTIAL_SOCKET=//p' "$OUT/serve.out")
}
start_file() { start_serve --store "$OUT/store"; }
start_keyring() { start_serve --store "$KEYRING_STORE"; }
start_etcd() { start_serve --store "$ETCD_STORE" --store-key "$OUT/etcd.key"; }
start_mem() {
  rm -f "$OUT/mem.in" "$OUT/mem.out"
  mkfifo "$OUT/mem.in"
  "$BS" <"$OUT/mem.in" >"$OUT/mem.out" 2>"$OUT/mem.err" &
  SPID=$!
  exec 3>"$OUT/mem.in"
  MEMFD=1
  local _
  for _ in $(seq 100); do grep -q '^PID=' "$OUT/mem.out" 2>/dev/null && break; sleep 0.05; done
  SOCK=$(grep SOCKET "$OUT/mem.out" | cut -d= -f2)
}
start_limit() {
  rm -f "$OUT/limit.sock"
  "$LG/limitserver" --socket "$OUT/limit.sock" >/dev/null 2>&1 &
  SPID=$!
  local _
  for _ in $(seq 100); do [ -S "$OUT/limit.sock" ] && break; sleep 0.05; done
  SOCK="$OUT/limit.sock"
}
stop_server() {
  if [ -n "$MEMFD" ]; then echo >&3; exec 3>&-; MEMFD=; fi
  stop_pid "$SPID"
  SPID=
}

run() { # server rep
  local server=$1 rep=$2 t0 t1 c0 c1
  if ! "start_$server"; then
    stop_server
    echo "{\"failed\": true}" >"$OUT/r-$server-$rep.json"
    return 0
  fi
  c0=$(etcd_cpu_ticks)
  t0=$(date +%s.%N)
  "$LG/loadgen" --socket "$SOCK" --connections "$CONNS" --duration "$DUR" --mode steady \
    --op get_token --payload '{"provider":"anthropic"}' --server-pid "$SPID" --json \
    2>/dev/null | tail -1 >"$OUT/r-$server-$rep.json" || true
  t1=$(date +%s.%N)
  c1=$(etcd_cpu_ticks)
  echo "$c0 $c1 $t0 $t1 $(getconf CLK_TCK)" >"$OUT/etcdcpu-$server-$rep.txt"
  if [ "$server" != limit ] && [ "$server" != mem ] && ! kill -0 "$SPID" 2>/dev/null; then
    echo "$server: the server exited during the run: $(tail -5 "$OUT/serve.err")" >&2
  fi
  stop_server
}

for rep in $(seq "$REPS"); do
  for server in $SERVERS; do
    echo "rep $rep/$REPS: $server" >&2
    run "$server" "$rep"
  done
done

python3 - "$OUT" "$CONNS" "$DUR" "$REPS" "$KEYRING_NOTE" <<'PY'
import json, glob, os, statistics, sys
out, conns, dur, reps, note = sys.argv[1:6]
order = ["limit", "mem", "file", "keyring", "etcd"]
label = {"limit": "limitserver", "mem": "memory (bench_server)", "file": "file (serve)",
         "keyring": "keyring (serve)", "etcd": "etcd, cached (serve)"}
rows, failed, cores = {}, {}, {}
for f in glob.glob(os.path.join(out, "r-*.json")):
    _, server, rep = os.path.basename(f)[:-5].split("-")
    try:
        d = json.load(open(f))
    except Exception:
        d = {"failed": True}
    if d.get("failed"):
        failed[server] = failed.get(server, 0) + 1
        continue
    rows.setdefault(server, []).append(d)
    c0, c1, t0, t1, hz = open(os.path.join(out, f"etcdcpu-{server}-{rep}.txt")).read().split()
    cores.setdefault(server, []).append((int(c1) - int(c0)) / int(hz) / (float(t1) - float(t0)))
def med(ds, f):
    return statistics.median(f(d) for d in ds)
print(f"steady get_token, {conns} connections, DUR={dur} s, median of REPS={reps}")
print(f"{'server':<22} {'req/s':>9} {'p50 us':>8} {'p99 us':>9} {'srv us/req':>10} {'errors':>6} {'etcd cores':>10} {'other load':>10}")
for server in order:
    if server not in rows:
        if server in failed:
            print(f"{label[server]:<22} failed to start in {failed[server]} run(s)")
        continue
    ds = rows[server]
    errs = sum(d["errors"] for d in ds)
    print(f"{label[server]:<22} {med(ds, lambda d: d['ok_rps']):>9.0f} "
          f"{med(ds, lambda d: d['latency_us']['p50']):>8.1f} {med(ds, lambda d: d['latency_us']['p99']):>9.1f} "
          f"{med(ds, lambda d: d.get('server_cpu_us_per_reply') or 0):>10.2f} {errs:>6} "
          f"{statistics.median(cores[server]):>10.3f} {med(ds, lambda d: d.get('other_load_cores') or 0):>10.2f}")
    codes = {}
    for d in ds:
        for k, v in (d.get("errors_by_code") or {}).items():
            codes[k] = codes.get(k, 0) + v
    if codes:
        print(f"{'':<22} errors by code (all runs): {codes}")
lim = rows.get("limit")
for server in order[1:]:
    ours = rows.get(server)
    if lim and ours:
        r = med(ours, lambda d: d['ok_rps']) / med(lim, lambda d: d['ok_rps'])
        p = med(ours, lambda d: d['latency_us']['p99']) / med(lim, lambda d: d['latency_us']['p99'])
        c = med(ours, lambda d: d.get('server_cpu_us_per_reply') or 0) / max(med(lim, lambda d: d.get('server_cpu_us_per_reply') or 0), 1e-9)
        print(f"ratio {server}/limit: throughput {r:.2f}x, p99 {p:.2f}x, server CPU per request {c:.2f}x")
if note:
    print(note)
PY
