#!/usr/bin/env bash
# One host-side refresh on the etcd store, traced: a 3-member cluster (bench/etcd_cluster.sh),
# one expired token, one `credproxy serve` with RUST_LOG=debug, a token endpoint on
# 127.0.0.1 (python3) answering after 100 ms, and two get_token in a row on one
# connection. Prints each get_token's latency, when the token endpoint answered, and
# copies serve's debug log (tonic/h2 frames of every etcd RPC, timestamped) to LOG, for
# reading by hand where the refresh's time goes. Debug logging slows serve down a little.
#
#   bench/refresh_trace.sh                      # LOG=/tmp/credproxy-refresh-trace.log
#   ETCD_DATA=/dev/shm ETCD_BASE=25790 UPSTREAM_PORT=25899 bench/refresh_trace.sh
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
ETCD_BASE=${ETCD_BASE:-24790}
ETCD_DATA=${ETCD_DATA:-}
UPSTREAM_PORT=${UPSTREAM_PORT:-24899}
LOG=${LOG:-/tmp/credproxy-refresh-trace.log}
TARGET=${CARGO_TARGET_DIR:-$ROOT/target}
# shellcheck source=bench/etcd_cluster.sh
. "$ROOT/bench/etcd_cluster.sh"

OUT=$(mktemp -d /tmp/credproxy-trace-XXXXXX)
chmod 700 "$OUT"
ETCD_DIR_OURS=$OUT/etcd
if [ -n "$ETCD_DATA" ]; then ETCD_DIR_OURS=$(mktemp -d "$ETCD_DATA/credproxy-etcd-XXXXXX"); fi
SPID=
UPID=
stop_pid() {
  local pid=$1 _
  kill -TERM "$pid" 2>/dev/null || return 0
  for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  kill -KILL "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
}
cleanup() {
  set +e
  [ -n "$SPID" ] && stop_pid "$SPID"
  [ -n "$UPID" ] && stop_pid "$UPID"
  etcd_stop
  rm -rf "$ETCD_DIR_OURS" "$OUT"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# The same build as bench/fleet.sh (with an example, so the same features), not a second one.
cargo build --release --bin credproxy --example fleet_storm >&2
BIN=$TARGET/release/credproxy
etcd_start "$ETCD_DIR_OURS" "$ETCD_BASE"
head -c 32 /dev/urandom >"$OUT/key"
chmod 600 "$OUT/key"
STORE="etcd://$(etcd_endpoints)/trace"

python3 - "$UPSTREAM_PORT" 2>"$OUT/upstream.log" <<'PY' &
import http.server, json, sys, time
class H(http.server.BaseHTTPRequestHandler):
    def do_POST(self):
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        time.sleep(0.1)
        b = json.dumps({"access_token": "at-new", "token_type": "Bearer", "expires_in": 3600,
                        "refresh_token": "rt-new"}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(b)))
        self.end_headers()
        self.wfile.write(b)
    def log_message(self, *a):
        sys.stderr.write("%.3f token endpoint answers\n" % time.time())
        sys.stderr.flush()
http.server.HTTPServer(("127.0.0.1", int(sys.argv[1])), H).serve_forever()
PY
UPID=$!
printf 'allow_all = true\nrate_limit = 0\n\n[provider.anthropic]\ntoken_url = "http://127.0.0.1:%s/oauth/token"\n' \
  "$UPSTREAM_PORT" >"$OUT/profile.toml"
printf '{"access_token":"at-old","refresh_token":"rt-old","expiry":%d,"token_type":"Bearer"}' \
  $(($(date +%s) - 10)) | "$BIN" store token set anthropic --store "$STORE" --store-key "$OUT/key" 2>/dev/null
mkdir -m 700 "$OUT/sock"
RUST_LOG=debug "$BIN" serve --store "$STORE" --store-key "$OUT/key" --profile "$OUT/profile.toml" \
  --socket-dir "$OUT/sock" >"$OUT/serve.out" 2>"$OUT/serve.err" &
SPID=$!
for _ in $(seq 200); do [ -s "$OUT/serve.out" ] && break; sleep 0.05; done
sleep 1
python3 - "$(sed -n 's/^LLXPRT_CREDENTIAL_SOCKET=//p' "$OUT/serve.out")" <<'PY'
import json, socket, struct, sys, time
def send(s, o):
    b = json.dumps(o).encode()
    s.sendall(struct.pack(">I", len(b)) + b)
def recv(s):
    n = struct.unpack(">I", s.recv(4, socket.MSG_WAITALL))[0]
    return json.loads(s.recv(n, socket.MSG_WAITALL))
s = socket.socket(socket.AF_UNIX)
s.connect(sys.argv[1])
send(s, {"v": 1, "op": "handshake", "payload": {"minVersion": 1, "maxVersion": 1}})
recv(s)
for i in range(2):
    t = time.time()
    send(s, {"id": str(i), "op": "get_token", "payload": {"provider": "anthropic"}})
    r = recv(s)
    print("%.3f get_token %d sent: %.1f ms, %s" % (t, i, (time.time() - t) * 1e3, r["data"]["access_token"]))
PY
sleep 0.5
cat "$OUT/upstream.log"
cp "$OUT/serve.err" "$LOG"
echo "serve's debug log: $LOG (UTC timestamps; the lines above are epoch seconds)"
