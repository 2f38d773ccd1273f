#!/usr/bin/env bash
# Soak test of `credproxy serve` (file store, default rate limit of 60 requests/s per
# connection) driven by ../shared/loadgen. Two parts, each against a fresh server:
#
# 1. Load: CONNS connections at RATE get_token requests/s each for DUR seconds (paced, one
#    request in flight per connection, under the 60/s limit). Checks: zero errors; after
#    every client has disconnected, the server's open fds back to the baseline (polled
#    for up to 10 s); its RSS within 10 % of the baseline (polled for up to 3 s more: the
#    server gives memory back 250 ms after its last connection closed). The baseline (fds, VmRSS) is
#    taken after a warm-up of a few requests on one connection.
# 2. Idle: IDLE connections, each handshaken, then held idle for IDLE_DUR seconds. Reports
#    the RSS per idle connection ((max RSS while held - RSS before) / connections), and
#    checks that every connection is still open late in the hold: the 5 s handshake
#    deadline must not close connections that completed their handshake.
#
# Ends with a summary table for BENCHMARKS.md; exits 1 if any check FAILs. The reduced
# CI-size variant is `cargo test --test soak` (tests/soak.rs).
#
#   bench/soak.sh                              # 1000 x 50/s x 30 s; 10,000 idle for 10 s
#   CONNS=200 DUR=10 IDLE=2000 bench/soak.sh   # smaller
#   ROUNDS=3 bench/soak.sh                     # 3 load rounds on one server: RSS growth
#                                              # between rounds tells a leak from allocator
#                                              # high-water retention
# Env: CONNS RATE DUR ROUNDS IDLE IDLE_DUR LOADGEN_SRC LOADGEN_TARGET (CARGO_TARGET_DIR of
# the loadgen build; default a fresh temporary directory).
set -euo pipefail
cd "$(dirname "$0")/.."
CONNS=${CONNS:-1000}
RATE=${RATE:-50}
DUR=${DUR:-30}
ROUNDS=${ROUNDS:-1}
IDLE=${IDLE:-10000}
IDLE_DUR=${IDLE_DUR:-10}
LOADGEN_SRC=${LOADGEN_SRC:-../shared/loadgen}
OUT=$(mktemp -d /tmp/credproxy-soak-XXXXXX)
chmod 700 "$OUT"
LOADGEN_TARGET=${LOADGEN_TARGET:-$OUT/loadgen-target}
# The server's handshake deadline (PROTOCOL.md §11): idle connections must outlive it.
HANDSHAKE_DEADLINE_S=5
PAYLOAD='{"provider":"anthropic"}'

SPID=
cleanup() {
  if [ -n "$SPID" ]; then kill -TERM "$SPID" 2>/dev/null || true; wait "$SPID" 2>/dev/null || true; fi
}
trap cleanup EXIT

LOAD_PRE=$(cut -d' ' -f1-3 /proc/loadavg)
echo "building (release)..." >&2
cargo build --release --bin credproxy >&2
CARGO_TARGET_DIR="$LOADGEN_TARGET" cargo build --release --manifest-path "$LOADGEN_SRC/Cargo.toml" >&2
LG="$LOADGEN_TARGET/release/loadgen"
BIN=target/release/credproxy

# 10,000 connections need as many descriptors in the server and in loadgen (both inherit
# this limit). Root may raise the hard limit; otherwise take the hard limit.
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
NOFILE=$(ulimit -n)
echo "ulimit -n: $NOFILE" >&2
for need in "$CONNS" "$IDLE"; do
  if [ "$NOFILE" != unlimited ] && [ "$NOFILE" -lt $((need + 64)) ]; then
    echo "warning: ulimit -n $NOFILE is below $need connections + 64; expect connect errors" >&2
  fi
done
LOAD_START=$(cut -d' ' -f1-3 /proc/loadavg)
echo "load average before the build: $LOAD_PRE; after it: $LOAD_START ($(nproc) CPUs)" >&2

mkdir -m 700 "$OUT/sock"
printf '{"access_token":"soak-access-token","refresh_token":"soak-refresh-token","expiry":4102444800,"token_type":"Bearer"}' \
  | "$BIN" store token set anthropic --store "$OUT/store" >/dev/null 2>&1

rss_kib() { awk '/^VmRSS:/{print $2}' "/proc/$1/status"; }
hwm_kib() { awk '/^VmHWM:/{print $2}' "/proc/$1/status"; }
fds() { ls "/proc/$1/fd" | wc -l; }
now_ms() { date +%s%3N; }

# Starts `credproxy serve` with the default rate limit; sets SPID and SOCK.
start_server() { # name
  "$BIN" serve --store "$OUT/store" --allow-all --socket-dir "$OUT/sock" \
    >"$OUT/$1.serve.out" 2>"$OUT/$1.serve.err" &
  SPID=$!
  for _ in $(seq 200); do
    [ -s "$OUT/$1.serve.out" ] && break
    kill -0 "$SPID" 2>/dev/null || break
    sleep 0.05
  done
  SOCK=$(sed -n 's/^LLXPRT_CREDENTIAL_SOCKET=//p' "$OUT/$1.serve.out")
  if [ -z "$SOCK" ]; then
    echo "credproxy serve did not start; stderr:" >&2
    cat "$OUT/$1.serve.err" >&2
    exit 1
  fi
}
stop_server() {
  kill -TERM "$SPID" 2>/dev/null || true
  local rc=0
  wait "$SPID" 2>/dev/null || rc=$?
  SPID=
  return "$rc"
}
# A few requests on one connection: the server's allocator, store pool and code paths are
# touched before the baseline is taken.
warm_up() {
  "$LG" --socket "$SOCK" --connections 1 --requests 20 --warmup 0 \
    --op get_token --payload "$PAYLOAD" >/dev/null 2>&1
  sleep 0.5
}
# Samples the server's VmRSS every 0.2 s into $1 until $2 exists.
sample_rss() { # file stopfile
  local max=0 r
  while [ ! -e "$2" ]; do
    r=$(rss_kib "$SPID" 2>/dev/null || echo 0)
    [ "${r:-0}" -gt "$max" ] && max=$r
    echo "$max" >"$1"
    sleep 0.2
  done
}

# ---- 1. load soak ------------------------------------------------------------------------
echo "soak: $CONNS connections x $RATE/s x ${DUR}s, $ROUNDS round(s), default rate limit" >&2
start_server soak
warm_up
BASE_FDS=$(fds "$SPID")
BASE_RSS=$(rss_kib "$SPID")
echo "baseline: fds=$BASE_FDS rss=${BASE_RSS}KiB" >&2
: >"$OUT/soak.rounds"
for round in $(seq "$ROUNDS"); do
  rm -f "$OUT/stop"
  sample_rss "$OUT/soak.peak.$round" "$OUT/stop" &
  SAMPLER=$!
  lg_rc=0
  "$LG" --socket "$SOCK" --connections "$CONNS" --rate "$RATE" --duration "$DUR" \
    --op get_token --payload "$PAYLOAD" --server-pid "$SPID" --json \
    >"$OUT/soak.$round.json" 2>"$OUT/soak.$round.err" || lg_rc=$?
  t0=$(now_ms)
  # Every client has disconnected: wait (up to 10 s) for the server to close its side.
  while [ "$(fds "$SPID")" -gt "$BASE_FDS" ] && [ $(($(now_ms) - t0)) -lt 10000 ]; do sleep 0.05; done
  back_ms=$(($(now_ms) - t0))
  touch "$OUT/stop"
  wait "$SAMPLER" || true
  # The server gives freed memory back a moment after its last connection closed
  # (src/memory.rs): poll RSS for up to 3 s, until within 10 % of the baseline.
  t1=$(now_ms)
  while [ "$(rss_kib "$SPID")" -gt $((BASE_RSS * 110 / 100)) ] && [ $(($(now_ms) - t1)) -lt 3000 ]; do sleep 0.05; done
  rss_ms=$(($(now_ms) - t1))
  echo "$round $lg_rc $(fds "$SPID") $back_ms $(rss_kib "$SPID") $(cat "$OUT/soak.peak.$round") $(hwm_kib "$SPID") $rss_ms" >>"$OUT/soak.rounds"
  cat "$OUT/soak.$round.err" >&2
done
soak_stop_rc=0
stop_server || soak_stop_rc=$?

# ---- 2. idle connections -----------------------------------------------------------------
echo "idle: $IDLE connections held for ${IDLE_DUR}s" >&2
start_server idle
warm_up
IDLE_BASE_FDS=$(fds "$SPID")
IDLE_BASE_RSS=$(rss_kib "$SPID")
"$LG" --socket "$SOCK" --mode idle --connections "$IDLE" --duration "$IDLE_DUR" --json \
  >"$OUT/idle.json" 2>"$OUT/idle.err" &
LGPID=$!
# The hold starts when loadgen reports every connection established.
hold_start=
while kill -0 "$LGPID" 2>/dev/null; do
  if grep -q 'connections established' "$OUT/idle.err" 2>/dev/null; then hold_start=$(now_ms); break; fi
  sleep 0.05
done
idle_peak=$IDLE_BASE_RSS
late_fds=0
late_at_ms=0
if [ -n "$hold_start" ]; then
  # Sample until 0.5 s before loadgen lets go; the last fd count is the "late in the hold"
  # one (taken past the handshake deadline when IDLE_DUR > HANDSHAKE_DEADLINE_S + 0.5).
  stop_at=$((hold_start + IDLE_DUR * 1000 - 500))
  while kill -0 "$LGPID" 2>/dev/null && [ "$(now_ms)" -lt "$stop_at" ]; do
    r=$(rss_kib "$SPID" 2>/dev/null || echo 0)
    [ "$r" -gt "$idle_peak" ] && idle_peak=$r
    late_fds=$(fds "$SPID")
    late_at_ms=$(($(now_ms) - hold_start))
    sleep 0.25
  done
fi
idle_rc=0
wait "$LGPID" || idle_rc=$?
IDLE_HWM=$(hwm_kib "$SPID")
idle_stop_rc=0
stop_server || idle_stop_rc=$?
cat "$OUT/idle.err" >&2

# ---- report ------------------------------------------------------------------------------
rc=0
python3 - "$OUT" <<PY || rc=$?
import json, sys
out = sys.argv[1]
conns, rate, dur, rounds = $CONNS, $RATE, $DUR, $ROUNDS
idle_n, idle_dur = $IDLE, $IDLE_DUR
base_fds, base_rss = $BASE_FDS, $BASE_RSS
idle_base_fds, idle_base_rss = $IDLE_BASE_FDS, $IDLE_BASE_RSS
idle_peak, idle_hwm = $idle_peak, $IDLE_HWM
late_fds, late_at_s = $late_fds, $late_at_ms / 1000
hold_seen = "$hold_start" != ""
handshake_deadline = $HANDSHAKE_DEADLINE_S
stop_rcs = ($soak_stop_rc, $idle_stop_rc)
nofile, load_pre, load_start = "$NOFILE", "$LOAD_PRE", "$LOAD_START"

def last_json(path):
    try:
        return json.loads(open(path).read().strip().splitlines()[-1])
    except Exception:
        return None

checks = []
def check(ok, what):
    checks.append(ok)
    print(f"{'PASS' if ok else 'FAIL'}: {what}")

rows = []
for line in open(f"{out}/soak.rounds"):
    r, rc, fds_after, back_ms, rss_after, peak, hwm, rss_ms = map(int, line.split())
    rows.append(dict(round=r, rc=rc, fds_after=fds_after, back_ms=back_ms,
                     rss_after=rss_after, peak=max(peak, rss_after), hwm=hwm, rss_ms=rss_ms,
                     lg=last_json(f"{out}/soak.{r}.json")))

print()
print(f"== soak: {conns} connections x {rate} req/s x {dur} s, get_token, file store, rate limit 60/s (default)")
total_ok = total_err = 0
errors = {}
for row in rows:
    d = row["lg"]
    if d is None:
        print(f"round {row['round']}: loadgen failed (exit {row['rc']}); see {out}/soak.{row['round']}.err")
        total_err += 1
        errors["loadgen-failed"] = errors.get("loadgen-failed", 0) + 1
        continue
    total_ok += d["ok"]
    setup_err = conns - d["established"]
    total_err += d["errors"] + setup_err
    for k, v in list(d["errors_by_code"].items()) + [("setup:" + k, v) for k, v in d["setup_errors_by_code"].items()]:
        errors[k] = errors.get(k, 0) + v
    offered = conns * rate
    lat = d["latency_us"]
    row["summary"] = d
    print(f"round {row['round']}: ok={d['ok']} errors={d['errors']} setup_errors={setup_err} established={d['established']}/{conns}"
          f" by code={d['errors_by_code'] or {}}")
    print(f"  throughput {d['ok_rps']:.0f} ok/s of {offered} offered ({100 * d['ok_rps'] / offered:.1f} %)"
          f"; latency p50 {lat['p50'] / 1000:.2f} ms, p99 {lat['p99'] / 1000:.2f} ms, max {lat['max'] / 1000:.1f} ms")
    print(f"  server cpu {d.get('server_cpu_us_per_reply', float('nan')):.1f} us/request"
          f" ({d['server_cpu_s']['user'] + d['server_cpu_s']['sys']:.1f} s over {d['window_s']:.1f} s);"
          f" other load on the machine {d.get('other_load_cores', float('nan')):.2f} cores")
    print(f"  fds: baseline {base_fds}, after {row['fds_after']} ({row['back_ms'] / 1000:.2f} s after loadgen exit)")
    print(f"  rss: baseline {base_rss} KiB, peak {row['peak']} KiB (VmHWM {row['hwm']} KiB), after {row['rss_after']} KiB"
          f" = {row['rss_after'] / base_rss:.2f} x baseline ({row['rss_ms'] / 1000:.2f} s after the fds)")
if len(rows) > 1:
    print(f"rss after each round (KiB): {[r['rss_after'] for r in rows]};"
          f" growth round 1 -> {len(rows)}: {rows[-1]['rss_after'] - rows[0]['rss_after']} KiB")
last = rows[-1]
check(total_err == 0 and total_ok > 0, f"zero errors ({total_ok} ok, {total_err} errors {errors or ''})")
check(all(r["fds_after"] <= base_fds for r in rows),
      f"fds back to baseline ({base_fds} -> {', '.join(str(r['fds_after']) for r in rows)})")
ratio = last["rss_after"] / base_rss
check(ratio <= 1.10, f"RSS within 10% of baseline after disconnect ({base_rss} -> {last['rss_after']} KiB, {ratio:.2f} x, {last['rss_ms'] / 1000:.2f} s after the fds)")
check(stop_rcs[0] == 0, f"server exited 0 on SIGTERM after the soak (exit {stop_rcs[0]})")

print()
print(f"== idle: {idle_n} connections, handshaken, held {idle_dur} s")
d = last_json(f"{out}/idle.json")
established = d["established"] if d else 0
held = late_fds - idle_base_fds
per_conn = (idle_peak - idle_base_rss) / established if established else float("nan")
if d:
    print(f"established {established}/{idle_n} in {d['setup_s']:.2f} s; setup errors {d['setup_errors_by_code'] or {}}")
print(f"server fds: baseline {idle_base_fds}, {late_fds} at {late_at_s:.1f} s into the hold -> {held} connections still open")
print(f"rss: before {idle_base_rss} KiB, max while held {idle_peak} KiB (VmHWM {idle_hwm} KiB)"
      f" -> {per_conn:.2f} KiB per idle connection")
check(established == idle_n, f"all {idle_n} idle connections established ({established})")
check(hold_seen and late_at_s > handshake_deadline and held >= established,
      f"idle connections outlive the {handshake_deadline} s handshake deadline ({held} open at {late_at_s:.1f} s)")
check(per_conn <= 10, f"RSS per idle connection <= 10 KiB (goal): {per_conn:.2f} KiB")
check(stop_rcs[1] == 0, f"server exited 0 on SIGTERM after the idle test (exit {stop_rcs[1]})")

s = rows[-1].get("summary")
mib = lambda k: f"{k / 1024:.1f}"
print()
print("| soak (bench/soak.sh) | result |")
print("|---|---|")
print(f"| load | {conns} conns x {rate} req/s x {dur} s, get_token, file store, rate limit 60/s{'' if rounds == 1 else f', {rounds} rounds'} |")
if s:
    print(f"| requests ok / errors | {total_ok} / {total_err} |")
    print(f"| throughput, achieved / offered | {s['ok_rps']:.0f} / {conns * rate} req/s ({100 * s['ok_rps'] / (conns * rate):.0f} %) |")
    print(f"| latency p50 / p99 | {s['latency_us']['p50'] / 1000:.2f} / {s['latency_us']['p99'] / 1000:.2f} ms |")
    print(f"| server CPU per request | {s.get('server_cpu_us_per_reply', float('nan')):.1f} us |")
print(f"| open fds baseline / after | {base_fds} / {last['fds_after']} (after {last['back_ms'] / 1000:.2f} s) |")
print(f"| RSS baseline / peak / after | {mib(base_rss)} / {mib(max(r['peak'] for r in rows))} / {mib(last['rss_after'])} MiB (after = {ratio:.2f} x baseline, {last['rss_ms'] / 1000:.2f} s after the fds) |")
print(f"| idle connections | {established} established, {held} still open at {late_at_s:.1f} s of {idle_dur} s |")
print(f"| RSS idle: before / held | {mib(idle_base_rss)} / {mib(idle_peak)} MiB |")
print(f"| RSS per idle connection | {per_conn:.2f} KiB |")
other = f"{s['other_load_cores']:.2f}" if s and "other_load_cores" in s else "?"
print(f"| machine | {__import__('os').cpu_count()} CPUs; load avg before build {load_pre}, at soak start {load_start};"
      f" other load during the soak {other} cores; ulimit -n {nofile} |")
print(f"| checks | {sum(checks)}/{len(checks)} PASS |")
sys.exit(0 if all(checks) else 1)
PY
echo "raw results: $OUT" >&2
exit "$rc"
