//! A complete credproxy session on a built-in default, in one command:
//!
//! ```sh
//! cargo run --release --example quickstart
//! ```
//!
//! 1. seeds a temporary file store with demo credentials, as `credproxy store` does;
//! 2. runs `credproxy exec` around a sandboxed child (bubblewrap when it works here, else a
//!    plain child) that reads a token and an API key through the socket;
//! 3. shows that the refresh token never reached the sandbox and that everything was
//!    cleaned up.
//!
//! This program is the `credproxy` command line itself when given arguments (it calls
//! [`credproxy::cli::main`]), so the example needs nothing else built: the store commands,
//! `exec` and the commands inside the sandbox are all this same binary.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};

const DEMO_TOKEN: &str = r#"{"access_token":"demo-access-token","refresh_token":"demo-refresh-token-stays-on-the-host","expiry":4102444800,"token_type":"Bearer","scope":"demo"}"#;
const DEMO_KEY: &str = "demo-api-key";

fn main() -> ExitCode {
    if std::env::args_os().len() > 1 {
        return credproxy::cli::main();
    }
    match quickstart() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("quickstart: {e}");
            ExitCode::FAILURE
        }
    }
}

type Result<T> = std::result::Result<T, Box<dyn std::error::Error>>;

fn quickstart() -> Result<()> {
    let me = std::env::current_exe()?;
    let work = tempfile::Builder::new()
        .prefix("credproxy-quickstart-")
        .tempdir()?;
    let store = work.path().join("store");
    let sockets = work.path().join("sock");
    std::fs::create_dir(&sockets)?;
    std::fs::set_permissions(
        &sockets,
        std::os::unix::fs::PermissionsExt::from_mode(0o700),
    )?;

    println!("1. Seeding a demo store at {}", store.display());
    run_with_stdin(&me, &["store", "token", "set", "demo"], &store, DEMO_TOKEN)?;
    run_with_stdin(
        &me,
        &["store", "key", "set", "demo"],
        &store,
        &format!("{DEMO_KEY}\n"),
    )?;

    let (sandbox, how) = match bwrap_args(&me) {
        Some(args) => (
            args,
            "a bubblewrap sandbox (fresh namespaces; only the socket file is shared)",
        ),
        None => (
            vec![
                "sh".into(),
                "-c".into(),
                INSIDE.replace("/credproxy", &shell_quote(&me)),
            ],
            "a plain child process (bubblewrap is not available here)",
        ),
    };
    println!("2. Running `credproxy exec --allow demo -- ...` around {how}");
    let output = Command::new(&me)
        .args(["exec", "--allow", "demo", "--store"])
        .arg(&store)
        .arg("--socket-dir")
        .arg(&sockets)
        .arg("--")
        .args(&sandbox)
        .env("RUST_LOG", "warn")
        .env("INSIDE", INSIDE)
        .stderr(Stdio::inherit())
        .output()?;
    let text = String::from_utf8_lossy(&output.stdout);
    let mut lines = text.lines();
    let token_line = lines.next().unwrap_or_default();
    let key_line = lines.next().unwrap_or_default();
    println!("   the sandbox read the token: {token_line}");
    println!("   the sandbox read the API key: {key_line}");
    let seen: Vec<&str> = lines.collect();
    println!(
        "   the sandbox sees in the socket directory: {} (its own socket only)",
        seen.join(" ")
    );
    if !output.status.success() {
        return Err(format!("the sandbox failed ({})", output.status).into());
    }
    let token: serde_json::Value = serde_json::from_str(token_line)?;
    let refresh_seen = token.get("refresh_token").is_some() || text.contains("demo-refresh-token");
    println!("   refresh token visible inside the sandbox: {refresh_seen}");

    let leftovers: Vec<_> = std::fs::read_dir(&sockets)?
        .flatten()
        .map(|e| e.path())
        .collect();
    println!(
        "3. After exec: sockets left in {}: {}",
        sockets.display(),
        leftovers.len()
    );
    println!(
        "   the store still holds the refresh token on the host: {}",
        store_has_refresh(&store)?
    );
    if refresh_seen || !leftovers.is_empty() || key_line != DEMO_KEY || seen.len() != 1 {
        return Err("the session did not behave as expected".into());
    }
    println!("Done: the sandbox got what its profile allows, never the refresh token, and nothing was left behind.");
    Ok(())
}

fn run_with_stdin(me: &Path, args: &[&str], store: &Path, input: &str) -> Result<()> {
    let mut child = Command::new(me)
        .args(args)
        .arg("--store")
        .arg(store)
        .stdin(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()?;
    child
        .stdin
        .take()
        .ok_or("no stdin")?
        .write_all(input.as_bytes())?;
    let status = child.wait()?;
    if !status.success() {
        return Err(format!("`credproxy {}` failed ({status})", args.join(" ")).into());
    }
    Ok(())
}

fn store_has_refresh(store: &Path) -> Result<bool> {
    let text = std::fs::read_to_string(store.join("tokens/demo/default.json"))?;
    Ok(text.contains("demo-refresh-token-stays-on-the-host"))
}

/// What the sandbox runs: the token, the key, then what it sees of the socket directory.
const INSIDE: &str = "/credproxy token get demo && /credproxy key get demo \
    && ls -A \"$(dirname \"$LLXPRT_CREDENTIAL_SOCKET\")\"";

/// The command `exec` runs: a shell on the host that starts bubblewrap once the socket
/// exists, with only `/usr` (read-only), this binary and the socket **file** visible (not
/// its directory, which other proxies of the same user share), and an environment that
/// holds nothing but `PATH` and the socket variable. `None` when bubblewrap cannot run here.
fn bwrap_args(me: &Path) -> Option<Vec<String>> {
    let works = Command::new("bwrap")
        .args(["--ro-bind", "/", "/", "--unshare-all", "true"])
        .stderr(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    if !works {
        return None;
    }
    // The fixed options go in as "$@"; the socket's path is only known once `exec` runs
    // the shell, so the script adds the bind and the variable itself.
    let script = r#"s=$LLXPRT_CREDENTIAL_SOCKET
exec bwrap "$@" --bind "$s" "$s" --clearenv --setenv PATH /usr/bin:/bin \
    --setenv LLXPRT_CREDENTIAL_SOCKET "$s" -- /bin/sh -c "$INSIDE""#;
    let mut args: Vec<String> = ["sh", "-c", script, "sh", "--ro-bind", "/usr", "/usr"]
        .map(String::from)
        .to_vec();
    for (link, target) in [
        ("/bin", "usr/bin"),
        ("/lib", "usr/lib"),
        ("/lib64", "usr/lib64"),
    ] {
        if PathBuf::from(link).exists() {
            args.extend(["--symlink".into(), target.into(), link.into()]);
        }
    }
    args.extend([
        "--ro-bind".into(),
        me.to_string_lossy().into_owned(),
        "/credproxy".into(),
    ]);
    args.extend(
        [
            "--proc",
            "/proc",
            "--dev",
            "/dev",
            "--unshare-all",
            "--die-with-parent",
        ]
        .map(String::from),
    );
    Some(args)
}

fn shell_quote(path: &Path) -> String {
    format!("'{}'", path.to_string_lossy().replace('\'', r"'\''"))
}
