//! End to end through a real sandbox: `credproxy exec` around bubblewrap (`bwrap`), with a
//! fresh mount namespace in which only the socket's directory (plus the binary and the
//! read-only system directories it needs) is visible. The sandbox gets its token; so does
//! one in its own user namespace; a sandbox running as another real uid is refused by the
//! proxy's peer check even when the file modes let it connect.
//!
//! When bwrap is missing or cannot create namespaces here, each test prints why and
//! returns early.

mod common;

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use common::process::{
    path_str, sanitized, strings, token_json, try_run, Canaries, Env, Fixture, Run, Stdin, BIN,
};
use serde_json::Value;

const CANARY_AT: &str = "CANARY-AT-b7d2";
const CANARY_RT: &str = "CANARY-RT-3a95";
const CANARY_KEY: &str = "CANARY-KEY-e04c";

/// The refresh token anywhere, the access token and the key in a log.
const CANARIES: Canaries = Canaries {
    never: &[CANARY_RT],
    not_logged: &[CANARY_AT, CANARY_KEY],
};

/// The uid and gid of the foreign sandbox (nobody).
const FOREIGN: &str = "65534";

// ---------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------

/// Runs `program args`, which must succeed, or says why it did not.
fn probe(program: &str, args: &[String]) -> Result<(), String> {
    match try_run(program, args, Stdin::Null, Env::ISOLATED) {
        Err(e) => Err(format!("cannot run {program}: {e}")),
        Ok(run) if run.status.success() => Ok(()),
        Ok(run) => Err(format!(
            "`{program} {}` failed ({}): {}",
            args.join(" "),
            run.status,
            run.stderr.trim_end()
        )),
    }
}

/// The sandbox: a fresh mount namespace (and every other namespace bwrap can unshare)
/// with /usr read-only, the binary at /credproxy, and `sock_dir` bound at its own path.
fn bwrap_args(sock_dir: &Path, extra: &[&str]) -> Vec<String> {
    let sock = path_str(sock_dir);
    let mut args = strings(&[
        "--ro-bind",
        "/usr",
        "/usr",
        "--symlink",
        "usr/lib",
        "/lib",
        "--symlink",
        "usr/lib64",
        "/lib64",
        "--symlink",
        "usr/bin",
        "/bin",
        "--ro-bind",
        BIN,
        "/credproxy",
        "--bind",
        &sock,
        &sock,
        "--proc",
        "/proc",
        "--dev",
        "/dev",
        "--unshare-all",
        "--die-with-parent",
    ]);
    args.extend(strings(extra));
    args
}

/// `Ok` when bwrap can build the sandbox and run the binary in it; otherwise why not.
fn sandbox_available() -> Result<(), String> {
    probe("bwrap", &strings(&["--ro-bind", "/", "/", "true"]))
        .map_err(|e| format!("bwrap cannot create a sandbox here: {e}"))?;
    let dir = tempfile::tempdir().expect("tempdir");
    let mut args = bwrap_args(dir.path(), &[]);
    args.extend(strings(&["--", "/credproxy", "--version"]));
    probe("bwrap", &args).map_err(|e| format!("the sandbox cannot run credproxy: {e}"))
}

/// Prints why a test is skipped and returns true when it must be.
fn skip(reason: Result<(), String>, test: &str) -> bool {
    match reason {
        Ok(()) => false,
        Err(why) => {
            println!("skipped {test}: {why}");
            true
        }
    }
}

impl Fixture {
    /// The store: anthropic:default with canaries, and the API key anthropic.
    fn seeded() -> Fixture {
        let f = Fixture::new();
        f.seed(
            &["token", "set", "anthropic"],
            token_json(CANARY_AT, CANARY_RT).as_bytes(),
        );
        f.seed_key("anthropic", CANARY_KEY);
        f
    }

    /// `credproxy exec --store S --socket-dir D --allow anthropic -- CMD...`
    fn exec(&self, cmd: &[String]) -> Run {
        let mut args = strings(&[
            "exec",
            "--store",
            &path_str(&self.store),
            "--socket-dir",
            &path_str(&self.sock),
            "--allow",
            "anthropic",
            "--",
        ]);
        args.extend_from_slice(cmd);
        let run = try_run(BIN, &args, Stdin::Null, Env::ISOLATED).expect("spawn credproxy exec");
        CANARIES.check_run("credproxy exec", &run);
        assert_eq!(self.sockets(), Vec::<PathBuf>::new(), "socket left behind");
        run
    }
}

/// The script run inside the sandbox: reports any host path it can see (given as
/// arguments), then fetches the token and the key.
const INSIDE: &str = r#"for p in "$@"; do test -e "$p" && echo "visible: $p"; done
/credproxy token get anthropic; echo "rc=$?"
/credproxy key get anthropic; echo "rc=$?""#;

/// Asserts the output of `INSIDE` after `prefix` lines: nothing of the host visible, the
/// sanitized token and the key obtained.
#[track_caller]
fn assert_inside_got_credentials(run: &Run, prefix: &[&str]) {
    assert_eq!(run.status.code(), Some(0), "{run:?}");
    let lines: Vec<&str> = run.stdout.lines().collect();
    let n = prefix.len();
    assert_eq!(lines.len(), n + 4, "{run:?}");
    assert_eq!(lines[..n], *prefix, "{run:?}");
    assert_eq!(
        serde_json::from_str::<Value>(lines[n]).unwrap_or_else(|e| panic!("{e}: {run:?}")),
        sanitized(CANARY_AT),
        "{run:?}"
    );
    assert_eq!(lines[n + 1..], ["rc=0", CANARY_KEY, "rc=0"], "{run:?}");
}

// ---------------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------------

#[test]
fn a_sandbox_seeing_only_the_socket_directory_gets_the_token() {
    if skip(sandbox_available(), "fresh mount namespace") {
        return;
    }
    let f = Fixture::seeded();
    let mut cmd = strings(&["bwrap"]);
    cmd.extend(bwrap_args(&f.sock, &[]));
    cmd.extend(strings(&["--", "/bin/sh", "-c", INSIDE, "sh"]));
    // Host paths the sandbox must not see: the store, the tempdir's other files, the
    // binary's real path, this checkout.
    cmd.extend([
        path_str(&f.store),
        path_str(&f.store.join("tokens")),
        BIN.to_owned(),
        env!("CARGO_MANIFEST_DIR").to_owned(),
    ]);
    let run = f.exec(&cmd);
    assert_inside_got_credentials(&run, &[]);
}

#[test]
fn a_sandbox_in_its_own_user_namespace_gets_the_token() {
    if skip(sandbox_available(), "--unshare-user") {
        return;
    }
    let userns = strings(&[
        "--ro-bind",
        "/",
        "/",
        "--unshare-user",
        "--uid",
        "1000",
        "--gid",
        "1000",
        "true",
    ]);
    if skip(
        probe("bwrap", &userns).map_err(|e| format!("no user namespace: {e}")),
        "--unshare-user",
    ) {
        return;
    }
    let f = Fixture::seeded();
    let mut cmd = strings(&["bwrap"]);
    cmd.extend(bwrap_args(
        &f.sock,
        &["--unshare-user", "--uid", "1000", "--gid", "1000"],
    ));
    let script = format!("echo \"uid=$(id -u)\"\n{INSIDE}");
    cmd.extend(strings(&["--", "/bin/sh", "-c", &script, "sh"]));
    cmd.push(path_str(&f.store));
    let run = f.exec(&cmd);
    // Inside it is uid 1000; the proxy sees the real uid behind it, which is its own.
    assert_inside_got_credentials(&run, &["uid=1000"]);
}

#[test]
fn a_sandbox_running_as_another_uid_is_refused_by_the_peer_check() {
    if skip(sandbox_available(), "foreign uid") {
        return;
    }
    if !nix::unistd::geteuid().is_root() {
        println!("skipped foreign uid: not root, cannot switch to uid {FOREIGN}");
        return;
    }
    let setpriv = |rest: &[String]| {
        let mut args = strings(&[
            &format!("--reuid={FOREIGN}"),
            &format!("--regid={FOREIGN}"),
            "--clear-groups",
        ]);
        args.extend_from_slice(rest);
        args
    };
    let check = setpriv(&strings(&["bwrap", "--ro-bind", "/", "/", "true"]));
    if skip(
        probe("setpriv", &check).map_err(|e| format!("no sandbox as uid {FOREIGN}: {e}")),
        "foreign uid",
    ) {
        return;
    }

    let f = Fixture::seeded();
    // Let uid 65534 reach the socket directory's path (the store itself stays 0700).
    fs::set_permissions(f.tmp.path(), fs::Permissions::from_mode(0o711)).expect("chmod tmp");
    // CMD relaxes the socket's modes once it exists, so that only the peer check stands;
    // runs the sandbox as root (the control), then as uid 65534.
    let script = format!(
        r#"sockdir=$1; shift
chmod 755 "$sockdir" && chmod 666 "$LLXPRT_CREDENTIAL_SOCKET" || exit 20
bwrap "$@" -- /credproxy token get anthropic >/dev/null; echo "root-rc=$?"
setpriv --reuid={FOREIGN} --regid={FOREIGN} --clear-groups bwrap "$@" -- /bin/sh -c '
    echo "uid=$(id -u)"; ls -l "$LLXPRT_CREDENTIAL_SOCKET" | cut -c1-10
    /credproxy token get anthropic; echo "foreign-rc=$?"'
"#
    );
    let mut cmd = strings(&["/bin/sh", "-c", &script, "sh", &path_str(&f.sock)]);
    cmd.extend(bwrap_args(&f.sock, &[]));
    let run = f.exec(&cmd);
    assert_eq!(run.status.code(), Some(0), "{run:?}");
    assert_eq!(
        run.stdout,
        format!("root-rc=0\nuid={FOREIGN}\nsrw-rw-rw-\nforeign-rc=4\n"),
        "{run:?}"
    );
    // The connection got through the file modes and was dropped by the proxy itself.
    assert!(
        run.stderr.contains("connection from a foreign uid refused")
            && run.stderr.contains(FOREIGN),
        "the proxy did not log the refusal: {run:?}"
    );
    let probe_line = run
        .stderr
        .lines()
        .find(|l| l.starts_with("credproxy: "))
        .unwrap_or_else(|| panic!("the refused command said nothing: {run:?}"));
    assert!(probe_line.contains("UNREACHABLE"), "{probe_line}");
}
