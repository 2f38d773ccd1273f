//! `credproxy store import claude-code|codex|gemini-cli`: another CLI's login file, written
//! here in its real format, is stored whole under the right provider, served sanitized
//! through a real server, and never changed; malformed files store nothing and say which
//! field is wrong without a secret.

mod common;

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use base64::Engine as _;
use common::process::{path_str, run, Canaries, Env, Fixture, Stdin, BIN};
use serde_json::{json, Value};

const AT: &str = "CANARY-IMPORT-AT-11aa";
const RT: &str = "CANARY-IMPORT-RT-22bb";

const CANARIES: Canaries = Canaries {
    never: &[RT],
    not_logged: &[AT],
};

/// `credproxy store import ARGS --store DIR` with `HOME` set to `home`.
fn import(f: &Fixture, home: &Path, args: &[&str]) -> common::process::Run {
    let mut all = vec!["store", "import"];
    all.extend_from_slice(args);
    all.extend_from_slice(&["--store", f.store_str()]);
    let home = path_str(home);
    let run = run(
        BIN,
        &all,
        Stdin::Null,
        Env::ISOLATED.with(&[("HOME", home.as_str())]),
    );
    CANARIES.check_run("store import", &run);
    run
}

/// The token stored for `provider:default`, read back through a real server.
fn served(f: &Fixture, provider: &str) -> Value {
    let server = f.start_serve(&["--allow", provider], Env::ISOLATED);
    let mut raw = server.connect();
    let reply = raw.call("1", "get_token", json!({"provider": provider}));
    common::data(&reply).clone()
}

fn stored_file(f: &Fixture, provider: &str) -> Value {
    let text = fs::read(f.store.join(format!("tokens/{provider}/default.json"))).expect("stored");
    serde_json::from_slice(&text).expect("json")
}

fn jwt(claims: Value) -> String {
    let enc = |v: &Value| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string());
    format!("{}.{}.sig", enc(&json!({"alg": "RS256"})), enc(&claims))
}

#[test]
fn a_claude_code_login_is_imported_from_its_default_file() {
    let f = Fixture::new();
    let home = tempfile::tempdir().expect("home");
    let file = home.path().join(".claude/.credentials.json");
    fs::create_dir_all(file.parent().expect("parent")).expect("mkdir");
    let text = json!({"claudeAiOauth": {"accessToken": AT, "refreshToken": RT,
        "expiresAt": 4_102_444_800_000u64, "scopes": ["user:inference"], "subscriptionType": "pro"}})
    .to_string();
    fs::write(&file, &text).expect("write");
    let before = fs::metadata(&file).expect("meta");

    let run = import(&f, home.path(), &["claude-code"]);
    assert_eq!(run.code(), Some(0), "{run:?}");
    assert!(
        run.stderr
            .contains("imported the claude-code login as anthropic:default (expires in")
            && run.stderr.contains("refreshable")
            && run.stderr.contains("rotates refresh tokens"),
        "{run:?}"
    );
    // Stored whole, refresh token included, in our shape.
    let stored = stored_file(&f, "anthropic");
    assert_eq!(stored["refresh_token"], RT);
    assert_eq!(stored["expiry"], 4_102_444_800u64);
    // Served without it.
    let data = served(&f, "anthropic");
    assert_eq!(
        data,
        json!({"access_token": AT, "expiry": 4_102_444_800u64, "token_type": "Bearer",
               "scope": "user:inference", "subscriptionType": "pro"})
    );
    // The source file is untouched.
    let after = fs::metadata(&file).expect("meta");
    assert_eq!(fs::read_to_string(&file).expect("read"), text);
    assert_eq!(
        (before.mtime(), before.mtime_nsec(), before.ino()),
        (after.mtime(), after.mtime_nsec(), after.ino())
    );
}

#[test]
fn a_codex_login_gets_its_expiry_from_the_access_token() {
    let f = Fixture::new();
    let home = tempfile::tempdir().expect("home");
    let access = jwt(json!({"exp": 4_102_444_000u64, "canary": AT}));
    let file = home.path().join("auth.json");
    fs::write(
        &file,
        json!({"OPENAI_API_KEY": null, "tokens": {"id_token": jwt(json!({"email": "a@b"})),
            "access_token": access, "refresh_token": RT, "account_id": "acct-9"},
            "last_refresh": "2026-11-30T08:00:00Z"})
        .to_string(),
    )
    .expect("write");
    let run = import(
        &f,
        home.path(),
        &["codex", "--from", &path_str(&file), "--bucket", "work"],
    );
    assert_eq!(run.code(), Some(0), "{run:?}");
    assert!(run.stderr.contains("as codex:work"), "{run:?}");
    let text = fs::read(f.store.join("tokens/codex/work.json")).expect("stored");
    let stored: Value = serde_json::from_slice(&text).expect("json");
    assert_eq!(stored["expiry"], 4_102_444_000u64);
    assert_eq!(stored["account_id"], "acct-9");
    assert_eq!(stored["refresh_token"], RT);
}

#[test]
fn a_gemini_cli_login_is_imported() {
    let f = Fixture::new();
    let home = tempfile::tempdir().expect("home");
    let file = home.path().join(".gemini/oauth_creds.json");
    fs::create_dir_all(file.parent().expect("parent")).expect("mkdir");
    fs::write(
        &file,
        json!({"access_token": AT, "refresh_token": RT, "token_type": "Bearer",
            "scope": "https://www.googleapis.com/auth/cloud-platform",
            "expiry_date": 4_102_444_800_999u64})
        .to_string(),
    )
    .expect("write");
    let run = import(&f, home.path(), &["gemini-cli"]);
    assert_eq!(run.code(), Some(0), "{run:?}");
    let data = served(&f, "gemini");
    assert_eq!(data["access_token"], AT);
    assert_eq!(data["expiry"], 4_102_444_800u64);
    assert!(data.get("refresh_token").is_none());
}

#[test]
fn malformed_or_missing_files_store_nothing() {
    let f = Fixture::new();
    let home = tempfile::tempdir().expect("home");
    let bad = home.path().join("bad.json");
    for (source, content, says) in [
        (
            "claude-code",
            json!({"claudeAiOauth": {"refreshToken": RT}}).to_string(),
            "the file has no claudeAiOauth.accessToken",
        ),
        (
            "codex",
            json!({"OPENAI_API_KEY": RT}).to_string(),
            "the file has no tokens",
        ),
        (
            "gemini-cli",
            format!("{{\"refresh_token\": \"{RT}\", "),
            "not valid JSON",
        ),
    ] {
        fs::write(&bad, &content).expect("write");
        let run = import(&f, home.path(), &[source, "--from", &path_str(&bad)]);
        assert_eq!(run.code(), Some(1), "{run:?}");
        assert!(
            run.stderr.contains(says) && run.stderr.contains("nothing was stored"),
            "{source}: {run:?}"
        );
    }
    // The CLI's own file absent.
    let run = import(&f, home.path(), &["claude-code"]);
    assert_eq!(run.code(), Some(1), "{run:?}");
    assert!(run.stderr.contains(".claude/.credentials.json"), "{run:?}");
    // An unknown source is a usage error.
    let run = import(&f, home.path(), &["claude"]);
    assert_eq!(run.code(), Some(2), "{run:?}");
    assert!(
        !f.store.join("tokens").exists()
            || fs::read_dir(f.store.join("tokens"))
                .expect("dir")
                .next()
                .is_none()
    );
}

#[test]
fn a_host_list_that_cannot_write_its_output_fails() {
    let f = Fixture::new();
    f.seed_token("anthropic", "default", AT, RT);
    let out = fs::OpenOptions::new()
        .write(true)
        .open("/dev/full")
        .expect("/dev/full");
    let status = std::process::Command::new(BIN)
        .args(["store", "token", "list", "--store", f.store_str()])
        .stdout(out)
        .stderr(std::process::Stdio::piped())
        .output()
        .expect("run");
    assert_eq!(status.status.code(), Some(1), "{status:?}");
    assert!(String::from_utf8_lossy(&status.stderr).contains("cannot write the output"));
}
