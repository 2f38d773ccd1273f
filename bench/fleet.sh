#!/usr/bin/env bash
# The fleet refresh storm (examples/fleet_storm.rs) on a 3-member etcd cluster started
# here (bench/etcd_cluster.sh) and stopped at the end: N = 1, 3 and 10 `credproxy serve`
# sharing one etcd store, one expired token, a token endpoint on 127.0.0.1 answering after
# LATENCY_MS; REQUESTS concurrent get_token spread over the servers, ROUNDS rounds per N.
#
#   bench/fleet.sh                                   # LATENCY_MS=100 REQUESTS=300 ROUNDS=5
#   LATENCY_MS=50 ROUNDS=10 SERVERS=1,3 ETCD_BASE=25790 bench/fleet.sh
#   ETCD_DATA=/dev/shm bench/fleet.sh       # the members' data directories there (tmpfs)
# The build goes to $CARGO_TARGET_DIR when set.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
LATENCY_MS=${LATENCY_MS:-100}
REQUESTS=${REQUESTS:-300}
ROUNDS=${ROUNDS:-5}
SERVERS=${SERVERS:-1,3,10}
ETCD_BASE=${ETCD_BASE:-24790}
ETCD_DATA=${ETCD_DATA:-}
TARGET=${CARGO_TARGET_DIR:-$ROOT/target}
# shellcheck source=bench/etcd_cluster.sh
. "$ROOT/bench/etcd_cluster.sh"

OUT=$(mktemp -d /tmp/credproxy-fleet-XXXXXX)
chmod 700 "$OUT"
ETCD_DIR_OURS=$OUT/etcd
if [ -n "$ETCD_DATA" ]; then ETCD_DIR_OURS=$(mktemp -d "$ETCD_DATA/credproxy-etcd-XXXXXX"); fi
cleanup() {
  set +e
  etcd_stop
  rm -rf "$ETCD_DIR_OURS" "$OUT"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

echo "building (release)..." >&2
cargo build --release --bin credproxy --example fleet_storm >&2

echo "starting a 3-member etcd cluster (clients on $((ETCD_BASE + 1))..$((ETCD_BASE + 3)))..." >&2
etcd_start "$ETCD_DIR_OURS" "$ETCD_BASE"
head -c 32 /dev/urandom >"$OUT/etcd.key"
chmod 600 "$OUT/etcd.key"

# Not exec'd: the trap stops the cluster when the storm ends, however it ends.
"$TARGET/release/examples/fleet_storm" "$TARGET/release/credproxy" \
  "etcd://$(etcd_endpoints)/fleet" "$OUT/etcd.key" "$LATENCY_MS" "$REQUESTS" "$ROUNDS" "$SERVERS"
