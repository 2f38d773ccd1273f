//! End to end through a real sandbox: `credproxy exec` around bubblewrap (`bwrap`) as the
//! README's recipe runs it: a fresh mount namespace in which only the socket **file** (plus
//! the binary and the read-only system directories it needs) is visible, and an
//! environment cleared down to `PATH` and the socket variable. The sandbox gets its token;
//! so does one in its own user namespace; a sandbox running as another real uid is refused
//! by the proxy's peer check even when the file modes let it connect; and a sandbox cannot
//! see, reach, remove or replace the socket of a second proxy of the same user in the same
//! directory (which it could when the recipe bound the whole directory: the control test).
//!
//! When bwrap is missing or cannot create namespaces here, each test prints why and
//! returns early.

mod common;

use std::fs;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::PathBuf;

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

/// The sandbox's fixed options: a fresh mount namespace (and every other namespace bwrap
/// can unshare) with /usr read-only and the binary at /credproxy. The socket is added by
/// [`RECIPE`] once its path is known.
fn bwrap_args(extra: &[&str]) -> Vec<String> {
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

/// The README's bubblewrap recipe, as the shell `exec` runs: bind the socket file alone at
/// its own path, clear the environment, pass the socket variable; "$@" holds the fixed
/// options, `--` and the command.
const RECIPE: &str = r#"s=$LLXPRT_CREDENTIAL_SOCKET
exec bwrap --bind "$s" "$s" --clearenv --setenv PATH /usr/bin:/bin \
    --setenv LLXPRT_CREDENTIAL_SOCKET "$s" "$@""#;

/// The recipe this project used to publish, binding the socket's whole directory and
/// passing the host environment: kept only as the control that shows what the file bind
/// closes.
const OLD_RECIPE: &str = r#"d=$(dirname "$LLXPRT_CREDENTIAL_SOCKET")
exec bwrap --bind "$d" "$d" "$@""#;

/// The command for `exec`: `recipe` with the fixed options `options` and the command
/// `inside` run in the sandbox.
fn sandboxed(recipe: &str, options: &[String], inside: &[String]) -> Vec<String> {
    let mut cmd = strings(&["/bin/sh", "-c", recipe, "sh"]);
    cmd.extend_from_slice(options);
    cmd.push("--".to_owned());
    cmd.extend_from_slice(inside);
    cmd
}

/// `Ok` when bwrap can build the sandbox and run the binary in it; otherwise why not.
fn sandbox_available() -> Result<(), String> {
    probe("bwrap", &strings(&["--ro-bind", "/", "/", "true"]))
        .map_err(|e| format!("bwrap cannot create a sandbox here: {e}"))?;
    let mut args = bwrap_args(&[]);
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
fn a_sandbox_seeing_only_the_socket_file_gets_the_token() {
    if skip(sandbox_available(), "fresh mount namespace") {
        return;
    }
    let f = Fixture::seeded();
    let mut inside = strings(&["/bin/sh", "-c", INSIDE, "sh"]);
    // Host paths the sandbox must not see: the store, the tempdir's other files, the
    // binary's real path, this checkout.
    inside.extend([
        path_str(&f.store),
        path_str(&f.store.join("tokens")),
        BIN.to_owned(),
        env!("CARGO_MANIFEST_DIR").to_owned(),
    ]);
    let run = f.exec(&sandboxed(RECIPE, &bwrap_args(&[]), &inside));
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
    let options = bwrap_args(&["--unshare-user", "--uid", "1000", "--gid", "1000"]);
    let script = format!("echo \"uid=$(id -u)\"\n{INSIDE}");
    let inside = strings(&["/bin/sh", "-c", &script, "sh", &path_str(&f.store)]);
    let run = f.exec(&sandboxed(RECIPE, &options, &inside));
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
s=$LLXPRT_CREDENTIAL_SOCKET
bwrap --bind "$s" "$s" "$@" -- /credproxy token get anthropic >/dev/null; echo "root-rc=$?"
setpriv --reuid={FOREIGN} --regid={FOREIGN} --clear-groups bwrap --bind "$s" "$s" "$@" -- /bin/sh -c '
    echo "uid=$(id -u)"; ls -l "$LLXPRT_CREDENTIAL_SOCKET" | cut -c1-10
    /credproxy token get anthropic; echo "foreign-rc=$?"'
"#
    );
    let mut cmd = strings(&["/bin/sh", "-c", &script, "sh", &path_str(&f.sock)]);
    cmd.extend(bwrap_args(&[]));
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

/// What a sandbox tries against a second proxy of the same user whose socket path it was
/// told (`$1`): list the socket directory, use the other proxy, remove its socket and put
/// a file of its own at that path; and ask its own proxy for the key its profile lacks.
const NEIGHBOUR: &str = r#"other=$1
echo "listing: $(ls -A "$(dirname "$LLXPRT_CREDENTIAL_SOCKET")" | tr '\n' ' ')"
test -e "$other" && echo "visible"
/credproxy key get openai --socket "$other"; echo "reach-rc=$?"
/credproxy key get openai; echo "own-rc=$?"
rm -f "$other"; echo "rm-rc=$?"
echo fake > "$other"; echo "replace-rc=$?"
rm -f "$LLXPRT_CREDENTIAL_SOCKET" 2>/dev/null; echo "rm-own-rc=$?"
echo "host-env: ${ANTHROPIC_API_KEY:-none}""#;

/// The second proxy of the fixture's user: same socket directory, same store, a wider
/// profile (everything). Returns it and its socket's inode.
fn neighbour(f: &Fixture) -> (common::process::Server, u64) {
    let server = f.start_serve(&["--allow-all"], Env::ISOLATED);
    let inode = fs::symlink_metadata(&server.socket)
        .expect("the neighbour's socket")
        .ino();
    (server, inode)
}

/// `credproxy exec --allow anthropic -- CMD` in the fixture's socket directory with a host
/// environment holding an API key.
fn exec_beside(f: &Fixture, cmd: &[String]) -> Run {
    let mut args = strings(&[
        "exec",
        "--store",
        &path_str(&f.store),
        "--socket-dir",
        &path_str(&f.sock),
        "--allow",
        "anthropic",
        "--",
    ]);
    args.extend_from_slice(cmd);
    let env = Env::ISOLATED.with(&[("ANTHROPIC_API_KEY", HOST_KEY)]);
    try_run(BIN, &args, Stdin::Null, env).expect("spawn credproxy exec")
}

/// An API key in the host shell's environment, which no sandbox may see.
const HOST_KEY: &str = "CANARY-HOST-ENV-5c1f";

/// The neighbour's API key: its profile allows it, the sandbox's proxy's does not.
const NEIGHBOUR_KEY: &str = "CANARY-OPENAI-91d3";

#[test]
fn a_sandbox_cannot_see_reach_remove_or_replace_another_proxy_of_the_same_user() {
    if skip(sandbox_available(), "second proxy") {
        return;
    }
    let f = Fixture::seeded();
    f.seed_key("openai", NEIGHBOUR_KEY);
    let (mut server, inode) = neighbour(&f);
    let other = server.socket.clone();

    let inside = strings(&["/bin/sh", "-c", NEIGHBOUR, "sh", &path_str(&other)]);
    let run = exec_beside(&f, &sandboxed(RECIPE, &bwrap_args(&[]), &inside));
    CANARIES.check_run("credproxy exec", &run);
    assert_eq!(f.sockets(), vec![other.clone()], "sockets after exec");
    assert_eq!(run.status.code(), Some(0), "{run:?}");
    let lines: Vec<&str> = run.stdout.lines().collect();
    // It sees one socket, its own (the neighbour's name is not in the listing).
    let listing = lines[0]
        .strip_prefix("listing: ")
        .expect("listing line")
        .trim();
    assert!(
        listing.ends_with(".sock") && !listing.contains(' '),
        "{run:?}"
    );
    assert!(!other.to_string_lossy().ends_with(listing), "{run:?}");
    assert_eq!(
        lines[1..],
        [
            "reach-rc=4",   // no such socket in its world
            "own-rc=3",     // its own proxy refuses the key outside the profile
            "rm-rc=0",      // nothing there to remove...
            "replace-rc=0", // ...and a file made there stays in the sandbox's own tmpfs
            "rm-own-rc=1",  // its own socket is a mount point: it cannot be removed
            "host-env: none",
        ],
        "{run:?}"
    );
    assert!(!run.stdout.contains(NEIGHBOUR_KEY), "{run:?}");

    // On the host the neighbour's socket is the same inode, and it still serves.
    let meta = fs::symlink_metadata(&other).expect("the neighbour's socket is still there");
    assert!(
        meta.file_type().is_socket() && meta.ino() == inode,
        "{meta:?}"
    );
    let got = try_run(
        BIN,
        &["key", "get", "openai", "--socket", &path_str(&other)],
        Stdin::Null,
        Env::ISOLATED,
    )
    .expect("run key get");
    assert_eq!(got.stdout, format!("{NEIGHBOUR_KEY}\n"), "{got:?}");
    server.signal(nix::sys::signal::Signal::SIGTERM);
    server.child.wait_exit("the neighbour");
}

/// The control: with the directory bound (the old recipe) the same sandbox lists the
/// neighbour's socket, reads its API key through it, and deletes it. This is the finding
/// the socket-file bind closes, and proof that the probes above can see it.
#[test]
fn the_old_directory_recipe_let_a_sandbox_use_and_delete_another_proxy() {
    if skip(sandbox_available(), "old recipe") {
        return;
    }
    let f = Fixture::seeded();
    f.seed_key("openai", NEIGHBOUR_KEY);
    let (mut server, _) = neighbour(&f);
    let other = server.socket.clone();

    let inside = strings(&["/bin/sh", "-c", NEIGHBOUR, "sh", &path_str(&other)]);
    let run = exec_beside(&f, &sandboxed(OLD_RECIPE, &bwrap_args(&[]), &inside));
    assert!(run.stdout.contains("visible\n"), "{run:?}");
    assert!(
        run.stdout
            .contains(&format!("{NEIGHBOUR_KEY}\nreach-rc=0\n")),
        "{run:?}"
    );
    assert!(
        run.stdout.contains(&format!("host-env: {HOST_KEY}")),
        "{run:?}"
    );
    assert!(
        fs::symlink_metadata(&other).map_or(true, |m| !m.file_type().is_socket()),
        "the sandbox could not remove the neighbour's socket: {run:?}"
    );
    server.signal(nix::sys::signal::Signal::SIGTERM);
    server.child.wait_exit("the neighbour");
}
