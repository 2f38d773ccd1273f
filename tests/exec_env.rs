//! What `credproxy exec` passes to CMD's environment (issue 13 item 10).
//!
//! - By default CMD inherits `exec`'s environment; `exec` then warns once, on stderr, naming
//!   (never showing) the variables whose names look like credentials (`*_API_KEY`,
//!   `*_TOKEN`, `*_SECRET`, ...) and saying how to keep them out.
//! - `--clear-env` starts CMD from an empty environment like `env -i`: only
//!   `LLXPRT_CREDENTIAL_SOCKET` and the `--keep-env NAME` variables; CMD is still found
//!   through `exec`'s own `PATH`.

mod common;

use std::collections::BTreeSet;

use common::process::{self, path_str, strings, Env, Fixture, Run, Stdin, BIN};

/// Host variables that must never reach CMD under `--clear-env`, nor any log.
const HOST_SECRETS: &[(&str, &str)] = &[
    ("OPENAI_API_KEY", "CANARY-ENV-OPENAI-71f0"),
    ("ANTHROPIC_API_KEY", "CANARY-ENV-ANTHROPIC-2b9c"),
    ("GH_TOKEN", "CANARY-ENV-GH-c3d4"),
    ("Client_Secret", "CANARY-ENV-CLIENT-88e1"),
];

/// A harmless host variable.
const PLAIN: (&str, &str) = ("CREDPROXY_PLAIN_VAR", "plain-value");

fn exec(f: &Fixture, opts: &[&str], cmd: &[&str], envs: &[(&str, &str)]) -> Run {
    let mut args = strings(&["exec", "--store"]);
    args.push(path_str(&f.store));
    args.push("--socket-dir".into());
    args.push(path_str(&f.sock));
    args.extend(strings(&["--allow", "anthropic"]));
    args.extend(strings(opts));
    args.push("--".into());
    args.extend(strings(cmd));
    let run = process::run(BIN, &args, Stdin::Null, Env::ISOLATED.with(envs));
    for (_, value) in HOST_SECRETS {
        assert!(!run.stderr.contains(value), "a value on stderr: {run:?}");
    }
    run
}

fn host_env() -> Vec<(&'static str, &'static str)> {
    let mut envs = HOST_SECRETS.to_vec();
    envs.push(PLAIN);
    envs
}

/// The variable names in `env` output.
fn names(stdout: &str) -> BTreeSet<String> {
    stdout
        .lines()
        .filter_map(|l| l.split_once('='))
        .map(|(name, _)| name.to_owned())
        .collect()
}

fn warnings(run: &Run) -> Vec<&str> {
    run.stderr
        .lines()
        .filter(|l| l.contains("look like credentials"))
        .collect()
}

#[test]
fn clear_env_leaves_cmd_only_the_socket_variable() {
    let f = Fixture::new();
    // `env` by name: found through exec's PATH although CMD gets none.
    let run = exec(&f, &["--clear-env"], &["env"], &host_env());
    assert_eq!(run.code(), Some(0), "{run:?}");
    assert_eq!(
        names(&run.stdout),
        BTreeSet::from(["LLXPRT_CREDENTIAL_SOCKET".to_owned()]),
        "{run:?}"
    );
    for (_, value) in HOST_SECRETS {
        assert!(!run.stdout.contains(value), "{value} reached CMD: {run:?}");
    }
    assert_eq!(warnings(&run), Vec::<&str>::new(), "nothing to warn about");
}

#[test]
fn keep_env_passes_exactly_the_named_variables() {
    let f = Fixture::new();
    let run = exec(
        &f,
        &[
            "--clear-env",
            "--keep-env",
            PLAIN.0,
            "--keep-env",
            "PATH",
            "--keep-env",
            "CREDPROXY_UNSET_VAR",
        ],
        &["env"],
        &host_env(),
    );
    assert_eq!(run.code(), Some(0), "{run:?}");
    assert_eq!(
        names(&run.stdout),
        BTreeSet::from(["LLXPRT_CREDENTIAL_SOCKET", "PATH", PLAIN.0].map(str::to_owned)),
        "{run:?}"
    );
    assert!(
        run.stdout.contains(&format!("{}={}\n", PLAIN.0, PLAIN.1)),
        "{run:?}"
    );
    for (_, value) in HOST_SECRETS {
        assert!(!run.stdout.contains(value), "{value} reached CMD: {run:?}");
    }
}

#[test]
fn under_clear_env_cmd_still_reaches_the_proxy() {
    let f = Fixture::new();
    f.seed_token("anthropic", "default", "at-env-test", "rt-env-test");
    let run = exec(
        &f,
        &["--clear-env"],
        &["sh", "-c", "exec \"$1\" token get anthropic", "sh", BIN],
        &host_env(),
    );
    assert_eq!(run.code(), Some(0), "{run:?}");
    assert!(run.stdout.contains("at-env-test"), "{run:?}");
}

#[test]
fn without_clear_env_exec_warns_once_naming_credential_like_variables() {
    let f = Fixture::new();
    let run = exec(&f, &[], &["true"], &host_env());
    assert_eq!(run.code(), Some(0), "{run:?}");
    let warned = warnings(&run);
    assert_eq!(warned.len(), 1, "one warning: {run:?}");
    let line = warned[0];
    for (name, _) in HOST_SECRETS {
        assert!(line.contains(name), "{name} not named: {line}");
    }
    assert!(!line.contains(PLAIN.0), "a plain variable named: {line}");
    assert!(line.contains("--clear-env"), "says how to stop it: {line}");
}

#[test]
fn no_warning_when_no_variable_looks_like_a_credential() {
    let f = Fixture::new();
    let run = exec(&f, &[], &["true"], &[PLAIN]);
    assert_eq!(run.code(), Some(0), "{run:?}");
    // The test's own environment may hold such names; only ours are checked.
    for (name, _) in HOST_SECRETS {
        assert!(!run.stderr.contains(name), "{run:?}");
    }
}

#[test]
fn keep_env_without_clear_env_or_with_a_bad_name_is_a_usage_error() {
    let f = Fixture::new();
    for opts in [
        &["--keep-env", "PATH"][..],
        &["--clear-env", "--keep-env", "A=B"][..],
        &["--clear-env", "--keep-env", ""][..],
    ] {
        let run = exec(&f, opts, &["true"], &[]);
        assert_eq!(run.code(), Some(2), "{opts:?}: {run:?}");
        assert_eq!(run.stdout, "", "{opts:?}");
        assert_eq!(f.sockets(), Vec::<std::path::PathBuf>::new());
    }
}

/// exec drops its own core-file limit to 0 (its memory holds secrets) but gives CMD the
/// user's limit back: CMD behaves as if started without credproxy.
#[test]
fn cmd_gets_the_users_core_limit_back() {
    let f = Fixture::new();
    let script = format!(
        "ulimit -c unlimited; exec {BIN} exec --store {} --socket-dir {} -- \
         sh -c 'ulimit -c; grep \"core file size\" /proc/$PPID/limits'",
        f.store_str(),
        f.sock_str()
    );
    let run = process::run("sh", &["-c", &script], Stdin::Null, Env::ISOLATED);
    assert_eq!(run.code(), Some(0), "{run:?}");
    let mut lines = run.stdout.lines();
    assert_eq!(lines.next(), Some("unlimited"), "{run:?}");
    // exec itself (CMD's parent) runs with a soft limit of 0.
    let exec_limit = lines.next().unwrap_or_default();
    assert!(
        exec_limit.split_whitespace().nth(4) == Some("0"),
        "exec's own core limit: {exec_limit:?}"
    );
}

/// Credential carriers without the usual endings are named too: an SSH agent socket (the
/// sandbox could sign with it), `*_APIKEY`, `*_CREDENTIALS`.
#[test]
fn the_warning_names_ssh_agents_and_credential_files() {
    let f = Fixture::new();
    let envs = [
        ("SSH_AUTH_SOCK", "/tmp/ssh-CANARY/agent.1"),
        ("ACME_APIKEY", "CANARY-APIKEY-55"),
        ("GOOGLE_APPLICATION_CREDENTIALS", "/home/u/CANARY-sa.json"),
    ];
    let run = exec(&f, &[], &["true"], &envs);
    assert_eq!(run.code(), Some(0), "{run:?}");
    for (name, value) in envs {
        assert!(run.stderr.contains(name), "{name} not named: {run:?}");
        assert!(!run.stderr.contains(value), "{name}'s value shown: {run:?}");
    }
}
