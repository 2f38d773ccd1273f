//! `credproxy store migrate --from STORE --to STORE`: copies every token (refresh token
//! included) and every API key from one store to another through the [`Backend`] trait, so
//! it works between any two kinds [`open_url`] opens (a directory, the keyring, etcd), then
//! reads everything back from the destination and compares. Nothing is ever removed from
//! either store.
//!
//! The steps, each finished before the next starts:
//!
//! 1. read the whole source (names, values, needs-login marks) into memory (wiped on drop);
//! 2. compare with the destination: an entry there with the same name and a different
//!    value is a conflict, and without `--overwrite` the command stops here, naming the
//!    conflicts, with nothing written;
//! 3. write what the destination lacks or holds differently (an equal entry is left as it
//!    is, so running the command again after a failure finishes the job);
//! 4. read every entry back from the destination and compare with what was read from the
//!    source, then read the source again: a value that changed there meanwhile (a server
//!    refreshed it) means the destination holds an older one, and that is a failure too.
//!
//! Refresh bookkeeping: a needs-login mark is carried (the destination's bucket is marked
//! through [`Backend::finish_refresh`] after the token is saved, since saving clears it).
//! `refreshed_at` is not: a copied token is saved as the host's `store token set` saves
//! one ([`SaveMode::Replace`]), which starts the bookkeeping over, and `refreshed_at` only
//! sets the 30 s cooldown and the "last refreshed" of `status`.

use std::ffi::OsString;
use std::os::unix::fs::MetadataExt;
use std::path::{Component, Path, PathBuf};
use std::sync::Arc;

use clap::Args;

use super::inside::exit;
use super::open::{open_url, StoreAccess};
use super::Failure;
use crate::backend::url::StoreUrl;
use crate::backend::{Backend, NeedsLogin, RefreshWrite, SaveMode, StoreError};
use crate::secret::Secret;
use crate::token::Token;

/// The exit statuses of `credproxy store migrate`, shown by its `--help`.
pub const MIGRATE_HELP: &str = "\
The destination keeps every entry it already has. One with the same name as a source
entry and an equal value is left as it is; one with a different value is a conflict:
without --overwrite nothing at all is written and the conflicts are named (never a value).
Stop the servers that use the source first: a token refreshed there during the copy
leaves the destination with an older refresh token (the command then fails and says so).
A needs-login mark is carried; the last-refresh time is not (a copied token is a new
login for the destination, as after `store token set`).

Exit status (the table of the token and key commands):
  0  everything copied and verified (stdout: one summary line), or, with --dry-run,
     the plan printed and nothing in the way
  2  usage error (a bad store URL, --from and --to the same store, a missing source
     directory, an etcd option for another kind of store)
  3  refused: the destination holds different values under names the source uses, and
     --overwrite was not given; nothing was written
  5  a store failed, or the verification found a difference; the message says what was
     copied and what was not; nothing was removed from either store
  6  cannot write the output";

/// `credproxy store migrate`
#[derive(Args, Debug)]
#[command(after_help = MIGRATE_HELP)]
pub struct MigrateArgs {
    /// The store to copy from, left unchanged: a directory (DIR or file:DIR), keyring: or
    /// keyring:SERVICE, or etcd://HOST:PORT[,HOST:PORT...]/PREFIX
    #[arg(long, value_name = "STORE")]
    from: OsString,
    /// The store to copy to (created when it is a directory that does not exist yet)
    #[arg(long, value_name = "STORE")]
    to: OsString,
    /// Replace the destination's entries that hold a different value under a name the
    /// source uses (without it, such a conflict stops the command before anything is
    /// written)
    #[arg(long)]
    overwrite: bool,
    /// Print what would be copied, one entry a line (names only), and write nothing
    #[arg(long)]
    dry_run: bool,
    /// How to reach an etcd store, on whichever side is one (both sides when both are)
    #[command(flatten)]
    access: StoreAccess,
}

/// One token of the source, as read.
struct TokenEntry {
    provider: String,
    bucket: String,
    token: Token,
    mark: Option<NeedsLogin>,
    plan: Plan,
}

/// One API key of the source, as read.
struct KeyEntry {
    name: String,
    key: Secret,
    plan: Plan,
}

/// What the destination holds under an entry's name, and so what is done with it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Plan {
    /// Nothing: written.
    New,
    /// The same value (and the same needs-login mark): left as it is.
    Equal,
    /// The same token with another needs-login mark: written again, mark and all.
    Mark,
    /// A different value: a conflict, replaced only with `--overwrite`.
    Differs,
}

impl Plan {
    fn writes(self) -> bool {
        self != Plan::Equal
    }

    /// What `--dry-run` says about the entry.
    fn describe(self, overwrite: bool) -> &'static str {
        match self {
            Plan::New => "copy",
            Plan::Equal => "already there, equal: left as it is",
            Plan::Mark => "already there, equal but for the needs-login mark: copy the mark",
            Plan::Differs if overwrite => "replace the destination's different value",
            Plan::Differs => "conflict: the destination holds a different value",
        }
    }
}

impl TokenEntry {
    fn name(&self) -> String {
        format!("token {}:{}", self.provider, self.bucket)
    }
}

impl KeyEntry {
    fn name(&self) -> String {
        format!("key {}", self.name)
    }
}

/// `n thing` / `n things`.
fn count(n: usize, thing: &str) -> String {
    if n == 1 {
        format!("1 {thing}")
    } else {
        format!("{n} {thing}s")
    }
}

/// `n entry` / `n entries`.
fn entries(n: usize) -> String {
    if n == 1 {
        "1 entry".to_owned()
    } else {
        format!("{n} entries")
    }
}

/// `names`, comma-separated, or "none".
fn list(names: &[String]) -> String {
    if names.is_empty() {
        "none".to_owned()
    } else {
        names.join(", ")
    }
}

fn store_failed(message: String) -> Failure {
    Failure::with_code(message, exit::INTERNAL)
}

fn parse_url(flag: &str, value: &OsString) -> Result<StoreUrl, Failure> {
    let text = value
        .to_str()
        .ok_or_else(|| Failure::usage(format!("{flag}: the value is not valid UTF-8")))?;
    text.parse::<StoreUrl>()
        .map_err(|e| Failure::usage(format!("{flag}: {e}")))
}

/// `path` made absolute, its longest existing prefix resolved (symlinks, `..`) and the rest
/// (which does not exist, so holds no symlink) applied as written.
fn resolved(path: &Path) -> PathBuf {
    let abs = if path.is_absolute() {
        path.to_owned()
    } else {
        match std::env::current_dir() {
            Ok(cwd) => cwd.join(path),
            Err(_) => path.to_owned(),
        }
    };
    let parts: Vec<Component> = abs.components().collect();
    for keep in (1..=parts.len()).rev() {
        let head: PathBuf = parts[..keep].iter().collect();
        if let Ok(mut out) = head.canonicalize() {
            for part in &parts[keep..] {
                match part {
                    Component::ParentDir => {
                        out.pop();
                    }
                    Component::CurDir => {}
                    other => out.push(other),
                }
            }
            return out;
        }
    }
    abs
}

/// True when `a` and `b` name one store (or may: two etcd URLs with the same prefix and a
/// member in common).
fn same_store(a: &StoreUrl, b: &StoreUrl) -> bool {
    match (a, b) {
        (StoreUrl::File(x), StoreUrl::File(y)) => {
            // Both present: the same directory however it is reached (a symlink, a bind
            // mount). Otherwise the resolved paths.
            match (std::fs::metadata(x), std::fs::metadata(y)) {
                (Ok(mx), Ok(my)) => mx.dev() == my.dev() && mx.ino() == my.ino(),
                _ => resolved(x) == resolved(y),
            }
        }
        (StoreUrl::Keyring { service: x }, StoreUrl::Keyring { service: y }) => x == y,
        (
            StoreUrl::Etcd {
                endpoints: e1,
                prefix: p1,
            },
            StoreUrl::Etcd {
                endpoints: e2,
                prefix: p2,
            },
        ) => {
            p1 == p2
                && e1
                    .iter()
                    .any(|e| e2.iter().any(|f| f.eq_ignore_ascii_case(e)))
        }
        _ => false,
    }
}

/// Opens one side; an open failure other than a usage error is a store failure (exit 5).
fn open_side(
    flag: &str,
    url: &StoreUrl,
    access: &StoreAccess,
) -> Result<Arc<dyn Backend>, Failure> {
    open_url(url, access, false).map_err(|f| {
        let code = if f.code == exit::USAGE {
            exit::USAGE
        } else {
            exit::INTERNAL
        };
        Failure::with_code(format!("{flag} {url}: {}", f.message), code)
    })
}

/// Everything in the source, sorted as the store lists it. An entry removed between the
/// listing and its read is left out.
fn read_source(source: &dyn Backend) -> Result<(Vec<TokenEntry>, Vec<KeyEntry>), StoreError> {
    let mut tokens = Vec::new();
    for provider in source.list_providers()? {
        for bucket in source.list_buckets(&provider)? {
            let Some(token) = source.get_token(&provider, &bucket)? else {
                continue;
            };
            let mark = source.refresh_state(&provider, &bucket)?.needs_login;
            tokens.push(TokenEntry {
                provider: provider.clone(),
                bucket,
                token,
                mark,
                plan: Plan::New,
            });
        }
    }
    let mut keys = Vec::new();
    for name in source.list_keys()? {
        if let Some(key) = source.get_key(&name)? {
            keys.push(KeyEntry {
                name,
                key,
                plan: Plan::New,
            });
        }
    }
    Ok((tokens, keys))
}

/// Compares every entry with what the destination holds under its name.
fn plan(
    dest: &dyn Backend,
    tokens: &mut [TokenEntry],
    keys: &mut [KeyEntry],
) -> Result<(), StoreError> {
    for entry in tokens.iter_mut() {
        entry.plan = match dest.get_token(&entry.provider, &entry.bucket)? {
            None => Plan::New,
            Some(held) if held != entry.token => Plan::Differs,
            Some(_) => {
                let mark = dest
                    .refresh_state(&entry.provider, &entry.bucket)?
                    .needs_login;
                if mark == entry.mark {
                    Plan::Equal
                } else {
                    Plan::Mark
                }
            }
        };
    }
    for entry in keys.iter_mut() {
        entry.plan = match dest.get_key(&entry.name)? {
            None => Plan::New,
            Some(held) if held != entry.key => Plan::Differs,
            Some(_) => Plan::Equal,
        };
    }
    Ok(())
}

/// Writes one token (and its needs-login mark) to the destination.
fn copy_token(dest: &dyn Backend, entry: &TokenEntry) -> Result<(), StoreError> {
    dest.save_token(
        &entry.provider,
        &entry.bucket,
        &entry.token,
        SaveMode::Replace,
    )?;
    if let Some(mark) = &entry.mark {
        // Saving cleared any mark; set the source's, only on the token just saved.
        dest.finish_refresh(&entry.provider, &entry.bucket, &mut |stored| {
            if stored == Some(&entry.token) {
                RefreshWrite::NeedsLogin(mark.clone())
            } else {
                RefreshWrite::Nothing
            }
        })?;
    }
    Ok(())
}

/// Why the destination's copy of a token is not what was read from the source, if it is
/// not.
fn check_token(dest: &dyn Backend, entry: &TokenEntry) -> Result<Option<&'static str>, StoreError> {
    match dest.get_token(&entry.provider, &entry.bucket)? {
        None => return Ok(Some("missing")),
        Some(held) if held != entry.token => return Ok(Some("a different token")),
        Some(_) => {}
    }
    let mark = dest
        .refresh_state(&entry.provider, &entry.bucket)?
        .needs_login;
    Ok((mark != entry.mark).then_some("a different needs-login mark"))
}

/// Why the destination's copy of a key is not what was read from the source, if it is not.
fn check_key(dest: &dyn Backend, entry: &KeyEntry) -> Result<Option<&'static str>, StoreError> {
    Ok(match dest.get_key(&entry.name)? {
        None => Some("missing"),
        Some(held) if held != entry.key => Some("a different key"),
        Some(_) => None,
    })
}

/// `credproxy store migrate`.
pub fn migrate(args: MigrateArgs) -> Result<(), Failure> {
    let from = parse_url("--from", &args.from)?;
    let to = parse_url("--to", &args.to)?;
    if same_store(&from, &to) {
        return Err(Failure::usage(format!(
            "--from {from} and --to {to} are the same store: nothing to migrate"
        )));
    }
    if let StoreUrl::File(dir) = &from {
        // Opening a file store creates it: a mistyped source would be an empty new store.
        if std::fs::symlink_metadata(dir).is_err() {
            return Err(Failure::usage(format!(
                "--from {from}: no such directory; nothing was written"
            )));
        }
    }
    // The etcd options go to the etcd side(s); with no etcd side, to both, so that the
    // store says they are not for it.
    let any_etcd = [&from, &to]
        .iter()
        .any(|u| matches!(u, StoreUrl::Etcd { .. }));
    let access_for = |url: &StoreUrl| {
        if !any_etcd || matches!(url, StoreUrl::Etcd { .. }) {
            args.access.clone()
        } else {
            StoreAccess::default()
        }
    };
    let source = open_side("--from", &from, &access_for(&from))?;
    let dest = open_side("--to", &to, &access_for(&to))?;

    let (mut tokens, mut keys) = read_source(&*source).map_err(|e| {
        store_failed(format!(
            "reading the source store {from} failed: {e}; nothing was written"
        ))
    })?;
    plan(&*dest, &mut tokens, &mut keys).map_err(|e| {
        store_failed(format!(
            "reading the destination store {to} failed: {e}; nothing was written"
        ))
    })?;
    let conflicts: Vec<String> = tokens
        .iter()
        .filter(|t| t.plan == Plan::Differs)
        .map(TokenEntry::name)
        .chain(
            keys.iter()
                .filter(|k| k.plan == Plan::Differs)
                .map(KeyEntry::name),
        )
        .collect();
    let refuse_conflicts = || {
        Failure::with_code(
            format!(
                "{to} already holds a different value for {}: {}; nothing was written; pass \
                 --overwrite to replace them with the source's",
                entries(conflicts.len()),
                list(&conflicts)
            ),
            exit::REFUSED,
        )
    };

    if args.dry_run {
        let mut text = String::new();
        for t in &tokens {
            let mark = if t.mark.is_some() {
                " (marked needs-login)"
            } else {
                ""
            };
            text.push_str(&format!(
                "{}{mark}: {}\n",
                t.name(),
                t.plan.describe(args.overwrite)
            ));
        }
        for k in &keys {
            text.push_str(&format!(
                "{}: {}\n",
                k.name(),
                k.plan.describe(args.overwrite)
            ));
        }
        let writes_t = tokens.iter().filter(|t| t.plan.writes()).count();
        let writes_k = keys.iter().filter(|k| k.plan.writes()).count();
        let would = format!(
            "copy {} and {} from {from} to {to}",
            count(writes_t, "token"),
            count(writes_k, "key")
        );
        if conflicts.is_empty() || args.overwrite {
            text.push_str(&format!("dry run: would {would}; nothing was written\n"));
        } else {
            text.push_str(&format!(
                "dry run: would copy nothing ({} in the way); with --overwrite it would \
                 {would}; nothing was written\n",
                count(conflicts.len(), "conflict")
            ));
        }
        emit(&text)?;
        if !conflicts.is_empty() && !args.overwrite {
            return Err(refuse_conflicts());
        }
        return Ok(());
    }
    if !conflicts.is_empty() && !args.overwrite {
        return Err(refuse_conflicts());
    }

    // Copy, stopping at the first failure.
    let mut copied: Vec<String> = Vec::new();
    let pending: Vec<String> = tokens
        .iter()
        .filter(|t| t.plan.writes())
        .map(TokenEntry::name)
        .chain(keys.iter().filter(|k| k.plan.writes()).map(KeyEntry::name))
        .collect();
    let stopped = |what: String, e: StoreError, copied: &[String]| {
        let not_copied: Vec<String> = pending
            .iter()
            .filter(|n| !copied.contains(n))
            .cloned()
            .collect();
        store_failed(format!(
            "writing the {what} to {to} failed: {e}; copied before that: {}; not copied: \
             {}; nothing was removed from either store; fix the cause and run the same \
             command again (what was copied is then left as it is)",
            list(copied),
            list(&not_copied)
        ))
    };
    for t in tokens.iter().filter(|t| t.plan.writes()) {
        copy_token(&*dest, t).map_err(|e| stopped(t.name(), e, &copied))?;
        copied.push(t.name());
    }
    for k in keys.iter().filter(|k| k.plan.writes()) {
        dest.set_key(&k.name, &k.key)
            .map_err(|e| stopped(k.name(), e, &copied))?;
        copied.push(k.name());
    }

    // Verify: the destination holds what was read, and the source still does.
    let mut wrong = Vec::new();
    let verify_failed = |e: StoreError| {
        store_failed(format!(
            "reading back from {to} to verify failed: {e}; written: {}; nothing was removed \
             from either store",
            list(&copied)
        ))
    };
    for t in &tokens {
        if let Some(why) = check_token(&*dest, t).map_err(verify_failed)? {
            wrong.push(format!("{} ({why})", t.name()));
        }
    }
    for k in &keys {
        if let Some(why) = check_key(&*dest, k).map_err(verify_failed)? {
            wrong.push(format!("{} ({why})", k.name()));
        }
    }
    if !wrong.is_empty() {
        return Err(store_failed(format!(
            "verification failed: {to} does not hold what was copied for {}: {} (was a \
             server on it writing?); written: {}; nothing was removed from either store",
            entries(wrong.len()),
            wrong.join(", "),
            list(&copied)
        )));
    }
    let (now_tokens, now_keys) = read_source(&*source).map_err(|e| {
        store_failed(format!(
            "reading the source store {from} again to verify failed: {e}; everything was \
             copied and read back equal; nothing was removed from either store"
        ))
    })?;
    let mut changed = Vec::new();
    for t in &tokens {
        let same = now_tokens
            .iter()
            .any(|n| n.provider == t.provider && n.bucket == t.bucket && n.token == t.token);
        if !same {
            changed.push(t.name());
        }
    }
    for k in &keys {
        if !now_keys.iter().any(|n| n.name == k.name && n.key == k.key) {
            changed.push(k.name());
        }
    }
    if !changed.is_empty() {
        return Err(store_failed(format!(
            "{from} changed while it was copied ({}): {to} holds the earlier value, and a \
             refresh token may have been rotated since; stop the servers that use {from} \
             and run the same command again with --overwrite; nothing was removed from \
             either store",
            list(&changed)
        )));
    }

    let copied_t = tokens.iter().filter(|t| t.plan.writes()).count();
    let copied_k = keys.iter().filter(|k| k.plan.writes()).count();
    let equal = tokens.len() + keys.len() - copied_t - copied_k;
    let mut notes = Vec::new();
    let replaced = tokens.iter().filter(|t| t.plan == Plan::Differs).count()
        + keys.iter().filter(|k| k.plan == Plan::Differs).count();
    if replaced > 0 {
        notes.push(format!("{replaced} replaced a different value"));
    }
    if equal > 0 {
        notes.push(format!("{equal} already there, equal"));
    }
    let marks = tokens.iter().filter(|t| t.mark.is_some()).count();
    if marks > 0 {
        notes.push(format!("{} carried", count(marks, "needs-login mark")));
    }
    let notes = if notes.is_empty() {
        String::new()
    } else {
        format!(" ({})", notes.join("; "))
    };
    emit(&format!(
        "copied {} and {} from {from} to {to}; verified {} and {}{notes}; nothing removed\n",
        count(copied_t, "token"),
        count(copied_k, "key"),
        count(tokens.len(), "token"),
        count(keys.len(), "key"),
    ))
}

/// Writes `text` to stdout and flushes; a failed write is exit 6.
fn emit(text: &str) -> Result<(), Failure> {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    out.write_all(text.as_bytes())
        .and_then(|()| out.flush())
        .map_err(|e| Failure::with_code(format!("cannot write the output: {e}"), exit::OUTPUT))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn url(s: &str) -> StoreUrl {
        s.parse().expect("url")
    }

    fn token(access: &str, refresh: &str) -> Token {
        Token::from_value(serde_json::json!({
            "access_token": access,
            "refresh_token": refresh,
            "expiry": 1_900_000_000u64,
            "token_type": "Bearer",
        }))
        .expect("token")
    }

    /// The steps over the trait alone (memory stores): read, plan, copy with the mark,
    /// verify, and a changed destination found by the verification.
    #[test]
    fn copy_and_verify_through_the_trait() {
        use crate::backend::MemoryBackend;
        let src = MemoryBackend::new();
        let dst = MemoryBackend::new();
        src.save_token("p", "a", &token("at1", "rt1"), SaveMode::Replace)
            .expect("save");
        src.save_token("p", "b", &token("at2", "rt2"), SaveMode::Replace)
            .expect("save");
        let mark = NeedsLogin {
            since: 5,
            status: 400,
            code: Some("invalid_grant".into()),
        };
        src.finish_refresh("p", "b", &mut |_| RefreshWrite::NeedsLogin(mark.clone()))
            .expect("mark");
        src.set_key("k", &Secret::from("key")).expect("key");
        dst.save_token("p", "a", &token("at1", "rt1"), SaveMode::Replace)
            .expect("save");
        dst.set_key("k", &Secret::from("other")).expect("key");

        let (mut tokens, mut keys) = read_source(&src).expect("read");
        plan(&dst, &mut tokens, &mut keys).expect("plan");
        let plans: Vec<Plan> = tokens.iter().map(|t| t.plan).collect();
        assert_eq!(plans, [Plan::Equal, Plan::New]);
        assert_eq!(keys[0].plan, Plan::Differs);
        assert_eq!(tokens[1].mark, Some(mark.clone()));

        for t in tokens.iter().filter(|t| t.plan.writes()) {
            copy_token(&dst, t).expect("copy");
        }
        dst.set_key("k", &keys[0].key).expect("key");
        for t in &tokens {
            assert_eq!(check_token(&dst, t).expect("check"), None, "{}", t.name());
        }
        assert_eq!(check_key(&dst, &keys[0]).expect("check"), None);
        assert_eq!(
            dst.refresh_state("p", "b").expect("state").needs_login,
            Some(mark)
        );
        assert_eq!(
            dst.get_token("p", "b")
                .expect("get")
                .expect("stored")
                .refresh_token(),
            Some("rt2")
        );

        // A refresh on the destination, or a save clearing the mark: both found.
        dst.save_token("p", "b", &token("at2", "rt2"), SaveMode::Replace)
            .expect("save");
        assert_eq!(
            check_token(&dst, &tokens[1]).expect("check"),
            Some("a different needs-login mark")
        );
        dst.save_token("p", "a", &token("at1", "rotated"), SaveMode::Replace)
            .expect("save");
        assert_eq!(
            check_token(&dst, &tokens[0]).expect("check"),
            Some("a different token")
        );
        // The source is as it was.
        let (again, _) = read_source(&src).expect("read");
        assert!(again.iter().zip(&tokens).all(|(a, b)| a.token == b.token));
    }

    #[test]
    fn the_same_store_however_it_is_written() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path().join("a");
        std::fs::create_dir(&dir).expect("mkdir");
        std::os::unix::fs::symlink(&dir, tmp.path().join("link")).expect("symlink");
        let d = dir.to_str().expect("utf-8");
        let t = tmp.path().to_str().expect("utf-8");
        assert!(same_store(&url(d), &url(&format!("file:{d}"))));
        assert!(same_store(&url(d), &url(&format!("{t}/link"))));
        assert!(same_store(&url(d), &url(&format!("{t}/a/../a/."))));
        // Not there yet: the resolved paths.
        assert!(same_store(
            &url(&format!("{t}/new")),
            &url(&format!("{t}/link/../new"))
        ));
        assert!(!same_store(&url(d), &url(&format!("{t}/new"))));
        assert!(same_store(&url("keyring:"), &url("keyring:credproxy")));
        assert!(!same_store(&url("keyring:a"), &url("keyring:b")));
        assert!(same_store(
            &url("etcd://h1:1,h2:2/p/"),
            &url("etcd://H2:2/p")
        ));
        assert!(!same_store(&url("etcd://h1:1/p"), &url("etcd://h1:1/q")));
        assert!(!same_store(&url("etcd://h1:1/p"), &url("etcd://h3:1/p")));
        assert!(!same_store(&url(d), &url("keyring:")));
    }
}
