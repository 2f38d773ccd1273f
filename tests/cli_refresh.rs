//! Host-side refresh from the command line (PROTOCOL.md §14), real binary, real store,
//! real socket, and a real token endpoint on 127.0.0.1:
//!
//! - `credproxy store token status [PROVIDER] [--json]`: expiry, refreshability, the
//!   needs-login mark and the last refresh of every stored token, never a secret;
//! - `credproxy store token refresh PROVIDER [--bucket B]`: one grant upstream, the rotated
//!   refresh token stored, the cooldown, and an exit status and a line for every failure;
//! - `--profile` on the store commands (its token endpoints; a bad one is a usage error
//!   naming its line);
//! - inside the sandbox, `credproxy token refresh` against `credproxy serve --profile`, and
//!   `REAUTH_REQUIRED` with its own exit status and the proxy's message.

mod common;

use std::fs;
use std::path::PathBuf;

use common::process::{self, Canaries, Env, Fixture, Run, Server, Stdin, BIN};
use common::token_endpoint::{Reply, TokenEndpoint};
use nix::sys::signal::Signal;
use serde_json::{json, Value};

/// Every refresh token and access token a test stores contains one of these: never in any
/// output of a host command, refresh tokens never in any output at all.
const RT: &str = "rt-CANARY";
const AT: &str = "at-CANARY";

const HOST_CANARIES: Canaries = Canaries {
    never: &[RT, AT],
    not_logged: &[],
};

const INSIDE_CANARIES: Canaries = Canaries {
    never: &[RT],
    not_logged: &[AT],
};

/// `serve` in its own process group (killed with it).
const SERVE_ENV: Env<'static> = Env {
    clear_socket: true,
    own_group: true,
    vars: &[],
};

fn now() -> u64 {
    credproxy::oauth::epoch_seconds(std::time::SystemTime::now())
}

/// A stored token: `access`, `refresh` (none when `None`), `expiry`.
fn token_json(access: &str, refresh: Option<&str>, expiry: u64) -> String {
    let mut token = json!({
        "access_token": access, "expiry": expiry, "token_type": "Bearer", "account_id": "acct-1"
    });
    if let Some(r) = refresh {
        token["refresh_token"] = json!(r);
    }
    token.to_string()
}

impl Run {
    #[track_caller]
    fn ok(&self) -> &Self {
        assert_eq!(self.code(), Some(0), "expected success: {self:?}");
        self
    }

    /// Exit `code`, nothing on stdout, and a last `credproxy: ` line on stderr (after any
    /// log lines) containing every needle; returns that line.
    #[track_caller]
    fn fails(&self, code: i32, needles: &[&str]) -> String {
        assert_eq!(self.code(), Some(code), "exit status: {self:?}");
        assert_eq!(self.stdout, "", "nothing on stdout on failure: {self:?}");
        let last = self.stderr.lines().last().unwrap_or_default();
        assert!(last.starts_with("credproxy: "), "{self:?}");
        for needle in needles {
            assert!(last.contains(needle), "stderr lacks {needle:?}: {self:?}");
        }
        last.to_owned()
    }
}

struct Host {
    f: Fixture,
    profile: PathBuf,
}

impl Host {
    /// A store and a profile whose `[provider.anthropic]` posts to `endpoint`.
    fn new(endpoint: &TokenEndpoint) -> Host {
        let f = Fixture::new();
        let profile = f.tmp.path().join("profile.toml");
        fs::write(
            &profile,
            format!(
                "# the servers' profile\n[provider.anthropic]\ntoken_url = \"{}\"\n",
                endpoint.url()
            ),
        )
        .expect("write profile");
        Host { f, profile }
    }

    fn profile_str(&self) -> &str {
        self.profile.to_str().expect("utf-8")
    }

    /// `credproxy store ARGS --store DIR --profile FILE`, checked for leaked secrets.
    fn store(&self, args: &[&str]) -> Run {
        self.store_stdin(args, b"")
    }

    fn store_stdin(&self, args: &[&str], stdin: &[u8]) -> Run {
        let mut all = vec!["store"];
        all.extend_from_slice(args);
        all.extend_from_slice(&[
            "--store",
            self.f.store_str(),
            "--profile",
            self.profile_str(),
        ]);
        let run = process::run(BIN, &all, Stdin::Pipe(stdin), Env::ISOLATED);
        HOST_CANARIES.check_run(&format!("{all:?}"), &run);
        run
    }

    /// Stores a token for provider:bucket.
    fn set(&self, provider: &str, bucket: &str, token: &str) {
        let run = self.store_stdin(
            &["token", "set", provider, "--bucket", bucket],
            token.as_bytes(),
        );
        run.ok();
    }

    /// The stored token file of provider:bucket, as JSON.
    fn stored(&self, provider: &str, bucket: &str) -> Value {
        let path = self
            .f
            .store
            .join("tokens")
            .join(provider)
            .join(format!("{bucket}.json"));
        let bytes = fs::read(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
        serde_json::from_slice(&bytes).expect("stored token is JSON")
    }

    /// `credproxy serve --store DIR --socket-dir SOCK --profile FILE EXTRA...`.
    fn serve(&self, extra: &[&str]) -> Server {
        let mut args = vec!["--profile", self.profile_str()];
        args.extend_from_slice(extra);
        self.f.start_serve(&args, SERVE_ENV)
    }
}

/// `credproxy ARGS --socket S` inside, checked for leaked refresh tokens.
fn inside(server: &Server, args: &[&str]) -> Run {
    let mut all = args.to_vec();
    all.extend_from_slice(&["--socket", server.socket_str()]);
    let run = process::run(BIN, &all, Stdin::Null, Env::ISOLATED);
    INSIDE_CANARIES.check_run(&format!("{all:?}"), &run);
    run
}

fn stop(server: Server) -> String {
    let stopped = server.stop(Signal::SIGTERM);
    assert!(stopped.status.success(), "{stopped:?}");
    INSIDE_CANARIES.absent("serve log", &stopped.stderr);
    stopped.stderr
}

/// The `provider:bucket: ...` line of `status` output.
#[track_caller]
fn line<'a>(out: &'a str, key: &str) -> &'a str {
    let prefix = format!("{key}: ");
    out.lines()
        .find(|l| l.starts_with(&prefix))
        .unwrap_or_else(|| panic!("no line for {key}: {out}"))
}

// ---------------------------------------------------------------------------------------
// store token status
// ---------------------------------------------------------------------------------------

#[test]
fn status_shows_expiry_refreshability_and_needs_login_and_never_a_secret() {
    let endpoint = TokenEndpoint::start("rt-CANARY-unused");
    endpoint.push([Reply::error(400, "invalid_grant", "revoked")]);
    let h = Host::new(&endpoint);
    let t = now();
    // (a) refreshable, expired 3 h ago
    h.set(
        "anthropic",
        "default",
        &token_json("at-CANARY-a", Some("rt-CANARY-a"), t - 3 * 3600),
    );
    // (b) no refresh token (a preset provider)
    h.set(
        "gemini",
        "default",
        &token_json("at-CANARY-b", None, t + 42 * 60),
    );
    // (c) a provider without a token endpoint
    h.set(
        "custom",
        "work",
        &token_json("at-CANARY-c", Some("rt-CANARY-c"), t + 2 * 3600),
    );
    // (d) needs login: the endpoint answers 400 invalid_grant
    h.set(
        "anthropic",
        "revoked",
        &token_json("at-CANARY-d", Some("rt-CANARY-d"), t + 600),
    );
    h.store(&["token", "refresh", "anthropic", "--bucket", "revoked"])
        .fails(7, &["anthropic:revoked", "invalid_grant"]);
    assert_eq!(endpoint.count(), 1);

    let run = h.store(&["token", "status"]);
    run.ok();
    let out = &run.stdout;
    let keys: Vec<&str> = out.lines().map(|l| l.split(": ").next().unwrap()).collect();
    assert_eq!(
        keys,
        [
            "anthropic:default",
            "anthropic:revoked",
            "custom:work",
            "gemini:default"
        ],
        "sorted: {out}"
    );
    assert_eq!(
        line(out, "anthropic:default"),
        "anthropic:default: expired 3 h ago; refreshable"
    );
    let revoked = line(out, "anthropic:revoked");
    assert!(
        revoked.starts_with("anthropic:revoked: expires in 10 min; refreshable; needs login (HTTP 400 invalid_grant, since "),
        "{revoked}"
    );
    assert_eq!(
        line(out, "custom:work"),
        "custom:work: expires in 2 h; not refreshable (no token endpoint for custom)"
    );
    assert_eq!(
        line(out, "gemini:default"),
        "gemini:default: expires in 42 min; not refreshable (no refresh token)"
    );

    // One provider only.
    let run = h.store(&["token", "status", "custom"]);
    run.ok();
    assert_eq!(run.stdout.lines().count(), 1, "{run:?}");
    assert!(run.stdout.starts_with("custom:work: "), "{run:?}");

    // JSON.
    let run = h.store(&["token", "status", "--json"]);
    run.ok();
    let all: Value = serde_json::from_str(&run.stdout).expect("JSON");
    let all = all.as_array().expect("array");
    assert_eq!(all.len(), 4);
    let by = |key: &str| {
        all.iter()
            .find(|e| format!("{}:{}", e["provider"], e["bucket"]).replace('"', "") == key)
            .unwrap_or_else(|| panic!("no {key} in {all:?}"))
    };
    let a = by("anthropic:default");
    assert_eq!(a["expiry"], t - 3 * 3600);
    let expires_in = a["expires_in"].as_i64().expect("expires_in");
    assert!((-3 * 3600 - 10..=-3 * 3600).contains(&expires_in), "{a}");
    assert_eq!(a["refreshable"], true);
    assert_eq!(a["needs_login"], Value::Null);
    assert_eq!(a["refreshed_at"], Value::Null);
    let d = by("anthropic:revoked");
    assert_eq!(d["refreshable"], true);
    assert_eq!(d["needs_login"]["status"], 400);
    assert_eq!(d["needs_login"]["code"], "invalid_grant");
    let since = d["needs_login"]["since"].as_u64().expect("since");
    assert!(since >= t && since <= now(), "{d}");
    assert_eq!(by("custom:work")["refreshable"], false);
    assert_eq!(by("gemini:default")["refreshable"], false);
    assert!(by("gemini:default")["expires_in"].as_i64().unwrap() > 0);
    let mut keys: Vec<&str> = a.as_object().unwrap().keys().map(String::as_str).collect();
    keys.sort_unstable();
    assert_eq!(
        keys,
        [
            "bucket",
            "expires_in",
            "expiry",
            "needs_login",
            "provider",
            "refreshable",
            "refreshed_at"
        ]
    );

    // A new token saved for the bucket clears the mark.
    h.set(
        "anthropic",
        "revoked",
        &token_json("at-CANARY-e", Some("rt-CANARY-e"), t + 600),
    );
    let run = h.store(&["token", "status", "anthropic"]);
    assert!(
        !line(&run.stdout, "anthropic:revoked").contains("needs login"),
        "{run:?}"
    );
}

#[test]
fn status_of_an_empty_store_prints_nothing_and_exits_0() {
    let endpoint = TokenEndpoint::start("rt-CANARY-0");
    let h = Host::new(&endpoint);
    let run = h.store(&["token", "status"]);
    run.ok();
    assert_eq!(run.stdout, "", "{run:?}");
    assert_eq!(run.stderr, "no tokens stored\n", "{run:?}");
    let run = h.store(&["token", "status", "--json"]);
    run.ok();
    assert_eq!(run.stdout, "[]\n", "{run:?}");
    let run = h.store(&["token", "status", "anthropic"]);
    run.ok();
    assert_eq!(
        (run.stdout.as_str(), run.stderr.as_str()),
        ("", "no tokens stored for anthropic\n")
    );
    h.store(&["token", "status", "Bad Name"]).fails(2, &[]);
}

#[test]
fn status_that_cannot_write_its_output_fails() {
    let endpoint = TokenEndpoint::start("rt-CANARY-0");
    let h = Host::new(&endpoint);
    h.set(
        "anthropic",
        "default",
        &token_json("at-CANARY-0", Some("rt-CANARY-0"), now() + 600),
    );
    for json in [false, true] {
        let mut args = vec![
            "store",
            "token",
            "status",
            "--store",
            h.f.store_str(),
            "--profile",
            h.profile_str(),
        ];
        if json {
            args.push("--json");
        }
        let full = fs::OpenOptions::new()
            .write(true)
            .open("/dev/full")
            .expect("/dev/full");
        let out = std::process::Command::new(BIN)
            .args(&args)
            .env_remove("RUST_LOG")
            .stdout(full)
            .stderr(std::process::Stdio::piped())
            .output()
            .expect("run");
        assert_eq!(out.status.code(), Some(1), "{out:?}");
        assert!(String::from_utf8_lossy(&out.stderr).contains("cannot write the output"));
    }
}

// ---------------------------------------------------------------------------------------
// store token refresh
// ---------------------------------------------------------------------------------------

#[test]
fn refresh_goes_upstream_once_stores_the_rotated_token_and_respects_the_cooldown() {
    let endpoint = TokenEndpoint::start("rt-CANARY-0");
    let h = Host::new(&endpoint);
    h.set(
        "anthropic",
        "default",
        &token_json("at-CANARY-0", Some("rt-CANARY-0"), now() - 10),
    );
    let run = h.store(&["token", "refresh", "anthropic"]);
    run.ok();
    assert_eq!(
        run.stdout, "refreshed anthropic:default: the new token expires in 60 min\n",
        "{run:?}"
    );
    for fresh in ["at-1", "rt-1"] {
        assert!(
            !run.stdout.contains(fresh) && !run.stderr.contains(fresh),
            "{run:?}"
        );
    }
    assert_eq!(endpoint.count(), 1);
    let sent = endpoint.received();
    assert_eq!(sent[0].param("grant_type"), Some("refresh_token"));
    assert_eq!(sent[0].param("refresh_token"), Some("rt-CANARY-0"));
    let stored = h.stored("anthropic", "default");
    assert_eq!(stored["refresh_token"], "rt-1", "{stored}");
    assert_eq!(stored["access_token"], "at-1");
    assert_eq!(stored["account_id"], "acct-1", "other fields kept");
    assert!(stored["expiry"].as_u64().unwrap() > now() + 3500);

    // Again within the cooldown: nothing upstream.
    let run = h.store(&["token", "refresh", "anthropic", "--bucket", "default"]);
    run.ok();
    assert!(
        run.stdout.starts_with("anthropic:default was refreshed ")
            && run.stdout.contains(
                " s ago, within the 30 s cooldown: not refreshed again (expires in 60 min)"
            ),
        "{run:?}"
    );
    assert_eq!(run.stdout.lines().count(), 1);
    assert_eq!(endpoint.count(), 1);
    assert_eq!(endpoint.reused(), 0);
    assert_eq!(h.stored("anthropic", "default")["refresh_token"], "rt-1");

    // status shows the refresh.
    let run = h.store(&["token", "status"]);
    let l = line(&run.stdout, "anthropic:default");
    assert!(
        l.starts_with("anthropic:default: expires in 60 min; refreshable; last refreshed ")
            && l.ends_with(" s ago"),
        "{l}"
    );
    let run = h.store(&["token", "status", "--json"]);
    let at = serde_json::from_str::<Value>(&run.stdout).unwrap()[0]["refreshed_at"]
        .as_u64()
        .expect("refreshed_at");
    assert!(at <= now() && at + 30 > now());
}

#[test]
fn refresh_failures_have_their_exit_status_and_say_what_to_do() {
    let endpoint = TokenEndpoint::start("rt-CANARY-ok");
    let h = Host::new(&endpoint);
    let t = now();
    h.set(
        "gemini",
        "default",
        &token_json("at-CANARY-g", None, t - 10),
    );
    h.set(
        "custom",
        "default",
        &token_json("at-CANARY-c", Some("rt-CANARY-c"), t - 10),
    );
    h.set(
        "anthropic",
        "default",
        &token_json("at-CANARY-a", Some("rt-CANARY-a"), t - 10),
    );

    // Not stored.
    h.store(&["token", "refresh", "anthropic", "--bucket", "other"])
        .fails(1, &["no token stored for anthropic:other"]);
    // No endpoint for the provider.
    h.store(&["token", "refresh", "custom"]).fails(
        3,
        &[
            "custom:default cannot be refreshed on the host",
            "no token endpoint is known for custom",
            "[provider.custom]",
            "--profile",
        ],
    );
    // No refresh token.
    h.store(&["token", "refresh", "gemini"]).fails(
        3,
        &[
            "gemini:default cannot be refreshed on the host",
            "no refresh token",
            "credproxy store import gemini-cli --bucket default",
        ],
    );
    // Bad names.
    h.store(&["token", "refresh", "Bad Name"]).fails(2, &[]);
    h.store(&["token", "refresh", "anthropic", "--bucket", "a/b"])
        .fails(2, &[]);
    assert_eq!(endpoint.count(), 0);

    // Transient failures, retried, then given up.
    endpoint.push([
        Reply::error(503, "temporarily_unavailable", "later"),
        Reply::error(503, "temporarily_unavailable", "later"),
        Reply::error(503, "temporarily_unavailable", "later"),
    ]);
    let run = h.store(&["token", "refresh", "anthropic"]);
    run.fails(
        8,
        &["refreshing anthropic:default failed; try again later; see the log above"],
    );
    assert!(
        run.stderr.contains("token refresh failed"),
        "the log: {run:?}"
    );
    assert_eq!(endpoint.count(), 3);

    // An auth failure: exactly what to run.
    endpoint.push([Reply::error(400, "invalid_grant", "revoked")]);
    let store = h.f.store_str();
    let last = h.store(&["token", "refresh", "anthropic"]).fails(
        7,
        &[
            "the host's login for anthropic:default is no longer valid",
            "(HTTP 400 invalid_grant, just now)",
            &format!("credproxy store import claude-code --bucket default --store {store}"),
            &format!("credproxy store token set anthropic --bucket default --store {store}"),
        ],
    );
    assert!(!last.contains("revoked\""), "no upstream body: {last}");
    assert_eq!(endpoint.count(), 4);
    // Marked: not sent again.
    h.store(&["token", "refresh", "anthropic"])
        .fails(7, &["(HTTP 400 invalid_grant, since ", "claude-code"]);
    assert_eq!(endpoint.count(), 4);
    assert_eq!(
        h.stored("anthropic", "default")["refresh_token"],
        "rt-CANARY-a"
    );
}

#[test]
fn refresh_help_documents_the_exit_statuses() {
    let run = process::run(
        BIN,
        &["store", "token", "refresh", "--help"],
        Stdin::Null,
        Env::ISOLATED,
    );
    run.ok();
    for (code, words) in [
        ("0", "refreshed"),
        ("1", "not found"),
        ("2", "usage"),
        ("3", "refused"),
        ("5", "store failed"),
        ("7", "new login"),
        ("8", "try again later"),
    ] {
        assert!(
            run.stdout
                .lines()
                .any(|l| l.trim_start().starts_with(code) && l.contains(words)),
            "no line for exit {code} ({words}): {}",
            run.stdout
        );
    }
    assert!(run.stdout.contains("--profile"));
    let run = process::run(
        BIN,
        &["store", "token", "--help"],
        Stdin::Null,
        Env::ISOLATED,
    );
    assert!(run.stdout.contains("status") && run.stdout.contains("refresh"));
}

// ---------------------------------------------------------------------------------------
// --profile
// ---------------------------------------------------------------------------------------

#[test]
fn a_bad_profile_is_a_usage_error_naming_its_line_on_every_store_command() {
    let endpoint = TokenEndpoint::start("rt-CANARY-0");
    let h = Host::new(&endpoint);
    fs::write(
        &h.profile,
        format!(
            "[provider.anthropic]\ntoken_url = \"{}\"\nbogus = 1\n",
            endpoint.url()
        ),
    )
    .unwrap();
    let token = token_json("at-CANARY-0", Some("rt-CANARY-0"), now() + 600);
    let import = h.f.tmp.path().join("creds.json");
    for args in [
        &["token", "set", "anthropic"][..],
        &["token", "remove", "anthropic"],
        &["token", "list"],
        &["token", "status"],
        &["token", "refresh", "anthropic"],
        &["key", "set", "k"],
        &["key", "remove", "k"],
        &["key", "list"],
        &["import", "claude-code", "--from", import.to_str().unwrap()],
    ] {
        let line = h.store_stdin(args, token.as_bytes()).fails(2, &[]);
        assert_eq!(
            line,
            format!(
                "credproxy: profile {}, line 3: unknown key `bogus` (expected one of token_url, \
                 client_id, client_secret_key, body, authorization_url, device_authorization_url, \
                 revocation_url, scopes, redirect_uri)",
                h.profile.display()
            ),
            "{args:?}"
        );
    }
    assert!(!h.f.store.exists(), "nothing was written");
    assert_eq!(endpoint.count(), 0);

    // A missing profile file too.
    fs::remove_file(&h.profile).unwrap();
    h.store(&["token", "list"])
        .fails(2, &[h.profile.to_str().unwrap()]);
}

#[test]
fn the_profile_names_the_endpoints_the_store_commands_see() {
    let endpoint = TokenEndpoint::start("rt-CANARY-0");
    let h = Host::new(&endpoint);
    let t = now();
    let run = h.store_stdin(
        &["token", "set", "custom"],
        token_json("at-CANARY-c", Some("rt-CANARY-c"), t + 600).as_bytes(),
    );
    run.ok();
    assert!(
        run.stderr.contains("no token endpoint is known for custom"),
        "{run:?}"
    );
    // With a [provider.custom] table, custom is refreshable; `refresh = false` (for the
    // servers) does not stop an explicit host command.
    fs::write(
        &h.profile,
        format!(
            "refresh = false\n[provider.custom]\ntoken_url = \"{}\"\nclient_id = \"cid\"\n",
            endpoint.url()
        ),
    )
    .unwrap();
    let run = h.store(&["token", "status"]);
    assert_eq!(
        run.stdout, "custom:default: expires in 10 min; refreshable\n",
        "{run:?}"
    );
    endpoint.push([Reply::token("at-CANARY-new", 7200, Some("rt-CANARY-new"))]);
    let run = h.store(&["token", "refresh", "custom"]);
    run.ok();
    assert_eq!(
        run.stdout,
        "refreshed custom:default: the new token expires in 2 h\n"
    );
    let sent = endpoint.received();
    assert_eq!(sent[0].param("client_id"), Some("cid"));
    assert_eq!(
        h.stored("custom", "default")["refresh_token"],
        "rt-CANARY-new"
    );
}

// ---------------------------------------------------------------------------------------
// Inside: credproxy token refresh
// ---------------------------------------------------------------------------------------

#[test]
fn inside_token_refresh_prints_the_fresh_token_without_its_refresh_token() {
    let endpoint = TokenEndpoint::start("rt-CANARY-0");
    let h = Host::new(&endpoint);
    // Valid for long: neither get_token nor renewal refreshes it on their own.
    h.set(
        "anthropic",
        "default",
        &token_json("at-CANARY-0", Some("rt-CANARY-0"), 1_900_000_000),
    );
    let server = h.serve(&["--allow", "anthropic"]);
    let run = inside(&server, &["token", "refresh", "anthropic"]);
    run.ok();
    assert_eq!(run.stderr, "");
    assert_eq!(run.stdout.lines().count(), 1, "{run:?}");
    let token: Value = serde_json::from_str(&run.stdout).expect("JSON");
    assert_eq!(token["access_token"], "at-1", "{token}");
    assert_eq!(token["account_id"], "acct-1");
    assert!(token.get("refresh_token").is_none(), "{token}");
    assert!(token["expiry"].as_u64().unwrap() > now() + 3500);
    assert_eq!(endpoint.count(), 1);
    assert_eq!(h.stored("anthropic", "default")["refresh_token"], "rt-1");

    // Printed exactly as `token get` prints it.
    let get = inside(&server, &["token", "get", "anthropic"]);
    get.ok();
    assert_eq!(get.stdout, run.stdout);

    // Within the cooldown: the same token, nothing upstream.
    let again = inside(
        &server,
        &["token", "refresh", "anthropic", "--bucket", "default"],
    );
    again.ok();
    assert_eq!(again.stdout, run.stdout);
    assert_eq!(endpoint.count(), 1);

    // The other outcomes: not stored, not refreshable.
    inside(
        &server,
        &["token", "refresh", "anthropic", "--bucket", "nope"],
    )
    .fails(1, &["NOT_FOUND"]);
    stop(server);
}

#[test]
fn inside_refresh_errors_map_to_their_exit_statuses_with_the_proxy_message() {
    let endpoint = TokenEndpoint::start("rt-CANARY-unused");
    endpoint.push([Reply::error(400, "invalid_grant", "revoked")]);
    let h = Host::new(&endpoint);
    h.set(
        "anthropic",
        "default",
        &token_json("at-CANARY-0", Some("rt-CANARY-0"), now() - 10),
    );
    h.set(
        "custom",
        "default",
        &token_json("at-CANARY-c", Some("rt-CANARY-c"), 1_900_000_000),
    );
    let server = h.serve(&["--allow", "anthropic", "--allow", "custom"]);
    // An expired token: get_token refreshes it, the endpoint refuses.
    let expected = "credproxy: REAUTH_REQUIRED: the host's login for anthropic:default has \
                    expired or was revoked: log in again on the host (log in with the \
                    claude-code CLI, then run `credproxy store import claude-code --bucket \
                    default`, or save a new token with `credproxy store token set anthropic \
                    --bucket default`)";
    let run = inside(&server, &["token", "get", "anthropic"]);
    run.fails(7, &[]);
    assert_eq!(run.stderr.trim_end(), expected, "verbatim: {run:?}");
    assert_eq!(endpoint.count(), 1);
    let run = inside(&server, &["token", "refresh", "anthropic"]);
    run.fails(7, &[]);
    assert_eq!(run.stderr.trim_end(), expected);
    assert_eq!(endpoint.count(), 1, "marked: not sent again");
    // The host's status shows the mark the server recorded.
    let status = h.store(&["token", "status", "anthropic"]);
    assert!(
        status
            .stdout
            .contains("needs login (HTTP 400 invalid_grant, since "),
        "{status:?}"
    );
    // Not refreshable.
    inside(&server, &["token", "refresh", "custom"]).fails(
        3,
        &["REFRESH_NOT_AVAILABLE: custom:default cannot be refreshed"],
    );
    // Transient: 503s after the retries.
    h.set(
        "anthropic",
        "default",
        &token_json("at-CANARY-1", Some("rt-CANARY-unused"), now() + 3600),
    );
    endpoint.push([
        Reply::error(503, "temporarily_unavailable", "later"),
        Reply::error(503, "temporarily_unavailable", "later"),
        Reply::error(503, "temporarily_unavailable", "later"),
    ]);
    inside(&server, &["token", "refresh", "anthropic"]).fails(
        8,
        &["REFRESH_FAILED: refreshing anthropic:default failed; try again later"],
    );
    stop(server);
}

#[test]
fn a_host_refresh_beside_a_running_server_is_seen_by_it() {
    let endpoint = TokenEndpoint::start("rt-CANARY-0");
    let h = Host::new(&endpoint);
    h.set(
        "anthropic",
        "default",
        &token_json("at-CANARY-0", Some("rt-CANARY-0"), 1_900_000_000),
    );
    let server = h.serve(&["--allow", "anthropic"]);
    inside(&server, &["token", "get", "anthropic"]).ok();
    h.store(&["token", "refresh", "anthropic"]).ok();
    assert_eq!(endpoint.count(), 1);
    // The server sees the refresh: within the cooldown, the new token, nothing upstream.
    let run = inside(&server, &["token", "refresh", "anthropic"]);
    run.ok();
    let token: Value = serde_json::from_str(&run.stdout).expect("JSON");
    assert_eq!(token["access_token"], "at-1", "{run:?}");
    assert_eq!(endpoint.count(), 1);
    assert_eq!(endpoint.reused(), 0);
    stop(server);
}

#[test]
fn token_help_documents_refresh_and_the_new_exit_statuses() {
    let run = process::run(BIN, &["token", "--help"], Stdin::Null, Env::ISOLATED);
    run.ok();
    assert!(run.stdout.contains("refresh"), "{}", run.stdout);
    for (code, words) in [
        ("7", "REAUTH_REQUIRED"),
        ("8", "REFRESH_FAILED"),
        ("3", "refused"),
    ] {
        assert!(
            run.stdout
                .lines()
                .any(|l| l.trim_start().starts_with(code) && l.contains(words)),
            "no line for exit {code} ({words}): {}",
            run.stdout
        );
    }
}
