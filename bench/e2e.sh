#!/usr/bin/env bash
# End-to-end load measurement: credproxy (file store via `credproxy serve`, and the memory
# store via examples/bench_server) against ../shared/loadgen's limitserver, the thinnest
# server of the protocol, in the same run. Prints one line per scenario; see BENCHMARKS.md.
# `file` is `credproxy serve` as shipped (host-side refresh on; the stored token has a
# refresh token and is not due, so every get_token passes the refresh check);
# `norefresh` is the same with --no-refresh, the version-1 path.
# `filev2` is `file` driven by the same loadgen with its handshake offering versions 1..2
# (a copy of ../shared/loadgen patched at its two handshake constants, nothing else), so
# every request runs on a version-2 session: v2 against v1 on the same server build.
#
#   bench/e2e.sh                 # DUR=5 seconds per run, REPS=3 repetitions (median kept)
#   DUR=10 REPS=5 bench/e2e.sh
set -euo pipefail
cd "$(dirname "$0")/.."
DUR=${DUR:-5}
REPS=${REPS:-3}
LOADGEN_SRC=${LOADGEN_SRC:-../shared/loadgen}
OUT=$(mktemp -d /tmp/credproxy-bench-XXXXXX)
chmod 700 "$OUT"

echo "building (release)..." >&2
cargo build --release --bin credproxy --example bench_server >&2
CARGO_TARGET_DIR="$OUT/loadgen-target" cargo build --release --manifest-path "$LOADGEN_SRC/Cargo.toml" >&2
LG="$OUT/loadgen-target/release"
# The version-2 loadgen: the same source, offering 1..2 and expecting version 2.
cp -r "$LOADGEN_SRC" "$OUT/loadgen-v2-src"
rm -rf "$OUT/loadgen-v2-src/target"
sed -i 's/"minVersion":1,"maxVersion":1/"minVersion":1,"maxVersion":2/; s/d.version == 1/d.version == 2/' \
  "$OUT/loadgen-v2-src/src/lib.rs" "$OUT/loadgen-v2-src/src/bin/loadgen.rs"
grep -q '"maxVersion":2' "$OUT/loadgen-v2-src/src/lib.rs"
grep -q 'd.version == 2' "$OUT/loadgen-v2-src/src/bin/loadgen.rs"
CARGO_TARGET_DIR="$OUT/loadgen-v2-target" cargo build --release --bin loadgen --manifest-path "$OUT/loadgen-v2-src/Cargo.toml" >&2
LGV2="$OUT/loadgen-v2-target/release/loadgen"
BIN=target/release/credproxy
BS=target/release/examples/bench_server

mkdir -m 700 "$OUT/sock"
printf '{"access_token":"bench-access-token","refresh_token":"bench-refresh-token","expiry":4102444800,"token_type":"Bearer"}' \
  | "$BIN" store token set anthropic --store "$OUT/store" 2>/dev/null

start_norefresh() { start_file --no-refresh; }
start_filev2() { start_file; }
start_file() {
  "$BIN" serve "$@" --store "$OUT/store" --allow-all --rate-limit 0 --socket-dir "$OUT/sock" >"$OUT/serve.out" 2>"$OUT/serve.err" &
  SPID=$!
  for _ in $(seq 100); do [ -s "$OUT/serve.out" ] && break; sleep 0.05; done
  SOCK=$(sed 's/^LLXPRT_CREDENTIAL_SOCKET=//' "$OUT/serve.out")
}
start_mem() {
  rm -f "$OUT/mem.in"; mkfifo "$OUT/mem.in"
  "$BS" <"$OUT/mem.in" >"$OUT/mem.out" 2>"$OUT/mem.err" &
  SPID=$!
  exec 3>"$OUT/mem.in"
  for _ in $(seq 100); do grep -q '^PID=' "$OUT/mem.out" 2>/dev/null && break; sleep 0.05; done
  SOCK=$(grep SOCKET "$OUT/mem.out" | cut -d= -f2)
}
start_limit() {
  rm -f "$OUT/limit.sock"
  "$LG/limitserver" --socket "$OUT/limit.sock" >/dev/null 2>&1 &
  SPID=$!
  for _ in $(seq 100); do [ -S "$OUT/limit.sock" ] && break; sleep 0.05; done
  SOCK="$OUT/limit.sock"
}
stop_server() {
  if [ "$1" = mem ]; then echo >&3; exec 3>&-; fi
  kill -TERM "$SPID" 2>/dev/null || true
  wait "$SPID" 2>/dev/null || true
}

run() { # server mode connections
  local server=$1 mode=$2 conns=$3
  "start_$server"
  local gen="$LG/loadgen"
  if [ "$server" = filev2 ]; then gen="$LGV2"; fi
  "$gen" --socket "$SOCK" --connections "$conns" --duration "$DUR" --mode "$mode" \
    --op get_token --payload '{"provider":"anthropic"}' --server-pid "$SPID" --json 2>/dev/null | tail -1
  stop_server "$server"
}

for rep in $(seq "$REPS"); do
  for scenario in "steady 1" "steady 64" "connect 8"; do
    set -- $scenario
    for server in limit mem file filev2 norefresh; do
      run "$server" "$1" "$2" > "$OUT/r-$server-$1-$2-$rep.json"
    done
  done
done

python3 - "$OUT" <<'PY'
import json, glob, os, statistics, sys
out = sys.argv[1]
rows = {}
for f in glob.glob(os.path.join(out, "r-*.json")):
    _, server, mode, conns, rep = os.path.basename(f)[:-5].split("-")
    try:
        d = json.load(open(f))
    except Exception:
        continue
    rows.setdefault((mode, int(conns), server), []).append(d)
def med(ds, f):
    return statistics.median(f(d) for d in ds)
print(f"{'scenario':<12} {'server':<9} {'req/s':>9} {'p50 us':>8} {'p99 us':>8} {'srv us/req':>10} {'errors':>6}")
for (mode, conns, server) in sorted(rows, key=lambda k: (k[0], k[1], ["limit", "mem", "file", "filev2", "norefresh"].index(k[2]))):
    ds = rows[(mode, conns, server)]
    print(f"{mode+' c='+str(conns):<12} {server:<9} {med(ds, lambda d: d['ok_rps']):>9.0f} "
          f"{med(ds, lambda d: d['latency_us']['p50']):>8.1f} {med(ds, lambda d: d['latency_us']['p99']):>8.1f} "
          f"{med(ds, lambda d: d.get('server_cpu_us_per_reply') or 0):>10.2f} {max(d['errors'] for d in ds):>6}")
for (mode, conns) in sorted({(m, c) for (m, c, _) in rows}):
    lim = rows.get((mode, conns, "limit"))
    for server in ("mem", "file", "filev2", "norefresh"):
        ours = rows.get((mode, conns, server))
        if lim and ours:
            r = med(ours, lambda d: d['ok_rps']) / med(lim, lambda d: d['ok_rps'])
            c = med(ours, lambda d: d.get('server_cpu_us_per_reply') or 0) / max(med(lim, lambda d: d.get('server_cpu_us_per_reply') or 0), 1e-9)
            print(f"ratio {mode} c={conns} {server}/limit: throughput {r:.2f}x, server CPU per request {c:.2f}x")
PY
echo "raw results: $OUT" >&2
