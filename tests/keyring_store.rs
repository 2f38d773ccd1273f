//! The keyring store against a real Secret Service, each test in its own D-Bus session
//! with its own gnome-keyring-daemon (started by `.ci/with-keyring`), so locking or
//! stopping the daemon touches no other test: the `credproxy store` commands end to end
//! on `--store keyring:SERVICE`, a locked collection and a stopped daemon giving a clear
//! error quickly, and no secret in any output.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

const ACCESS: &str = "AT-CANARY-kr-7f3a";
const REFRESH: &str = "RT-CANARY-kr-91c2";

/// Runs `script` (bash) inside a fresh D-Bus session with an unlocked gnome-keyring;
/// `$BIN` is the credproxy binary. `None` (with a note, or a failure under CI) when
/// dbus-run-session or gnome-keyring-daemon is missing.
fn in_keyring_session(script: &str) -> Option<(String, String, Duration)> {
    let have = |tool: &str| {
        Command::new("sh")
            .args(["-c", &format!("command -v {tool}")])
            .output()
            .map(|o| o.status.success())
            .unwrap_or(false)
    };
    if !have("dbus-run-session") || !have("gnome-keyring-daemon") || !have("secret-tool") {
        let why = "dbus-run-session, gnome-keyring-daemon or secret-tool is missing (apt-get install dbus gnome-keyring libsecret-tools)";
        if std::env::var_os("CI").is_some() {
            panic!("CI is set but {why}; .ci/run installs them");
        }
        eprintln!("note: skipping a keyring test: {why}");
        return None;
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let start = Instant::now();
    let out = Command::new("dbus-run-session")
        .arg("--")
        .arg(root.join(".ci/with-keyring"))
        .args(["bash", "-c", script])
        .env("BIN", env!("CARGO_BIN_EXE_credproxy"))
        .env_remove("DBUS_SESSION_BUS_ADDRESS")
        .output()
        .expect("run dbus-run-session");
    Some((
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
        start.elapsed(),
    ))
}

fn assert_no_secret(text: &str) {
    assert!(!text.contains(ACCESS), "access token leaked: {text}");
    assert!(!text.contains(REFRESH), "refresh token leaked: {text}");
}

/// `store token set`, `list`, `status`, `store key set/list` work on the keyring, the
/// items are found by attributes, and no output holds a secret.
#[test]
fn store_commands_end_to_end_without_leaking() {
    let script = format!(
        r#"set -e
S=keyring:credproxy-e2e
echo '{{"access_token":"{ACCESS}","refresh_token":"{REFRESH}","expiry":4102444800,"token_type":"Bearer"}}' \
  | "$BIN" store token set anthropic --bucket work --store $S
echo LIST; "$BIN" store token list --store $S
echo STATUS; "$BIN" store token status --store $S
echo ITEMS; secret-tool search --all service credproxy-e2e kind token 2>&1 | grep '^attribute' | sort
echo LOOKUP; secret-tool lookup service credproxy-e2e kind token provider anthropic bucket work | grep -c {REFRESH}
"#
    );
    let Some((out, err, _)) = in_keyring_session(&script) else {
        return;
    };
    assert!(out.contains("LIST\nanthropic:work\n"), "{out}\n{err}");
    assert!(out.contains("anthropic:work: expires in"), "{out}\n{err}");
    assert!(out.contains("attribute.application = credproxy"), "{out}");
    assert!(out.contains("attribute.bucket = work"), "{out}");
    // The secret is in the keyring item (read back by secret-tool), not printed by us.
    assert!(out.trim_end().ends_with("LOOKUP\n1"), "{out}\n{err}");
    assert_no_secret(&out.replace("LOOKUP\n1", ""));
    assert_no_secret(&err);
}

/// A locked collection: a clear error saying what to do, within seconds, no prompt.
#[test]
fn a_locked_keyring_gives_a_clear_error_quickly() {
    let script = format!(
        r#"echo '{{"access_token":"{ACCESS}","refresh_token":"{REFRESH}","expiry":4102444800,"token_type":"Bearer"}}' \
  | "$BIN" store token set anthropic --store keyring:credproxy-locked
dbus-send --session --print-reply --dest=org.freedesktop.secrets /org/freedesktop/secrets \
  org.freedesktop.Secret.Service.Lock array:objpath:/org/freedesktop/secrets/collection/login >/dev/null
start=$(date +%s%N)
"$BIN" store token status --store keyring:credproxy-locked; echo "rc=$?"
echo "ms=$(( ($(date +%s%N) - start) / 1000000 ))"
"#
    );
    let Some((out, err, _)) = in_keyring_session(&script) else {
        return;
    };
    assert!(!out.contains("rc=0"), "{out}\n{err}");
    assert!(err.contains("the keyring is locked"), "{err}");
    assert!(err.contains("--store DIR"), "{err}");
    let ms: u64 = out
        .lines()
        .find_map(|l| l.strip_prefix("ms="))
        .and_then(|v| v.parse().ok())
        .expect("timing");
    assert!(ms < 4000, "took {ms} ms");
    assert_no_secret(&out);
    assert_no_secret(&err);
}

/// A stopped (hung) daemon: an error after the 5 s call timeout, never a hang.
#[test]
fn a_stopped_daemon_gives_an_error_within_the_timeout() {
    let script = r#"pid=$(dbus-send --session --print-reply --dest=org.freedesktop.DBus /org/freedesktop/DBus \
  org.freedesktop.DBus.GetConnectionUnixProcessID string:org.freedesktop.secrets | awk '/uint32/ {print $2}')
[ -n "$pid" ] || { echo "no keyring daemon owns org.freedesktop.secrets" >&2; exit 1; }
kill -STOP "$pid"
start=$(date +%s%N)
timeout 30 "$BIN" store key list --store keyring:credproxy-stopped; echo "rc=$?"
echo "ms=$(( ($(date +%s%N) - start) / 1000000 ))"
kill -CONT "$pid"
"#;
    let Some((out, err, _)) = in_keyring_session(script) else {
        return;
    };
    assert!(
        !out.contains("rc=0") && !out.contains("rc=124"),
        "{out}\n{err}"
    );
    assert!(err.contains("did not answer within 5 s"), "{err}");
    let ms: u64 = out
        .lines()
        .find_map(|l| l.strip_prefix("ms="))
        .and_then(|v| v.parse().ok())
        .expect("timing");
    assert!((4500..12_000).contains(&ms), "took {ms} ms");
}

/// The keyring daemon restarted under a running server: the server's kept Secret Service
/// session is broken, and the next request is answered all the same (the backend drops
/// the session and tries once more on a fresh one), with no restart of the server.
#[test]
fn a_restarted_daemon_is_reconnected_to() {
    let script = format!(
        r#"set -u
S=keyring:credproxy-restart
echo '{{"access_token":"{ACCESS}","refresh_token":"{REFRESH}","expiry":4102444800,"token_type":"Bearer"}}' \
  | "$BIN" store token set anthropic --store $S
out=$(mktemp)
"$BIN" serve --store $S --allow-all >"$out" 2>/dev/null &
serve=$!
for _ in $(seq 100); do [ -s "$out" ] && break; sleep 0.05; done
export $(head -1 "$out")
"$BIN" token get anthropic >/dev/null; echo "before=$?"
owner() {{ dbus-send --session --print-reply --dest=org.freedesktop.DBus /org/freedesktop/DBus \
  org.freedesktop.DBus.GetConnectionUnixProcessID string:org.freedesktop.secrets 2>/dev/null | awk '/uint32/ {{print $2}}'; }}
pid=$(owner)
kill "$pid"
for _ in $(seq 100); do [ -z "$(owner)" ] && break; sleep 0.05; done
printf 'ci-keyring' | gnome-keyring-daemon --unlock --components=secrets >/dev/null
for _ in $(seq 100); do [ -n "$(owner)" ] && break; sleep 0.05; done
[ "$(owner)" != "$pid" ] && echo "restarted"
"$BIN" token get anthropic; echo "after=$?"
kill "$serve"; wait "$serve"
"#
    );
    let Some((out, err, _)) = in_keyring_session(&script) else {
        return;
    };
    assert!(out.contains("before=0"), "{out}\n{err}");
    assert!(out.contains("restarted"), "{out}\n{err}");
    assert!(out.contains("after=0"), "{out}\n{err}");
    assert!(out.contains(ACCESS), "the token was served: {out}");
    assert!(!out.contains(REFRESH), "{out}");
    assert_no_secret(&err);
}

/// A server over the keyring store, logging at trace level, through gets, a save from
/// the sandbox, a key read and then a locked keyring (errors logged): no access token,
/// refresh token or API key in its log, and the locked keyring is logged as such.
#[test]
fn a_server_on_the_keyring_logs_no_secret() {
    let script = format!(
        r#"set -u
S=keyring:credproxy-logs
echo '{{"access_token":"{ACCESS}","refresh_token":"{REFRESH}","expiry":4102444800,"token_type":"Bearer"}}' \
  | "$BIN" store token set anthropic --store $S
printf 'KEY-CANARY-kr-55aa' | "$BIN" store key set openai --store $S
out=$(mktemp); log=$(mktemp)
RUST_LOG=trace "$BIN" serve --store $S --allow-all >"$out" 2>"$log" &
serve=$!
for _ in $(seq 100); do [ -s "$out" ] && break; sleep 0.05; done
export $(head -1 "$out")
"$BIN" token get anthropic >/dev/null; echo "get=$?"
echo '{{"access_token":"AT-CANARY-kr-save","expiry":4102444800,"token_type":"Bearer"}}' | "$BIN" token save anthropic; echo "save=$?"
"$BIN" key get openai >/dev/null; echo "key=$?"
dbus-send --session --print-reply --dest=org.freedesktop.secrets /org/freedesktop/secrets \
  org.freedesktop.Secret.Service.Lock array:objpath:/org/freedesktop/secrets/collection/login >/dev/null
"$BIN" token get anthropic >/dev/null 2>&1; echo "locked=$?"
kill "$serve"; wait "$serve"
echo LOG; cat "$log"
"#
    );
    let Some((out, err, _)) = in_keyring_session(&script) else {
        return;
    };
    assert!(out.contains("get=0"), "{out}\n{err}");
    assert!(out.contains("save=0"), "{out}\n{err}");
    assert!(out.contains("key=0"), "{out}\n{err}");
    assert!(
        out.contains("locked=5"),
        "INTERNAL_ERROR when locked: {out}\n{err}"
    );
    let log = out.split("LOG\n").nth(1).expect("log");
    assert!(log.contains("the keyring is locked"), "{log}");
    for canary in [ACCESS, REFRESH, "AT-CANARY-kr-save", "KEY-CANARY-kr-55aa"] {
        assert!(!log.contains(canary), "{canary} in the log: {log}");
        assert!(!err.contains(canary), "{canary} in stderr");
    }
}

/// `store new-key keyring:` stores a data key as an item of the service (64 hex
/// characters, never printed) and refuses to replace it.
#[test]
fn a_data_key_in_the_keyring_is_made_once() {
    let script = r#"
"$BIN" store new-key keyring:credproxy-dk; echo "first=$?"
"$BIN" store new-key keyring:credproxy-dk; echo "second=$?"
secret-tool lookup application credproxy service credproxy-dk kind datakey | tr -d '\n' | wc -c
"#;
    let Some((out, err, _)) = in_keyring_session(script) else {
        return;
    };
    assert!(out.contains("first=0"), "{out}\n{err}");
    assert!(out.contains("second=3"), "{out}\n{err}");
    assert!(err.contains("already has a data key"), "{err}");
    assert!(out.trim_end().ends_with("64"), "{out}");
}
