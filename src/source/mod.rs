//! Command-backed sources: credentials that come from a program on the host
//! (`gcloud auth print-access-token`, `op read ...`, a Kubernetes exec credential plugin)
//! instead of the store, configured in the profile:
//!
//! ```toml
//! [[token_command]]
//! provider = "gcloud"            # served through get_token as gcloud:default
//! bucket = "default"
//! command = ["gcloud", "auth", "print-access-token"]
//! ttl = 2700                     # seconds, when the output carries no expiry
//!
//! [[key_command]]
//! name = "openai"                # served through get_api_key
//! command = ["op", "read", "op://Private/OpenAI/credential"]
//! ttl = 3600
//! ```
//!
//! - [`output`]: what the command printed, read as a credential and its expiry.
//! - [`run`]: running the command (no shell, stdin closed, timeout, output cap, its
//!   process group killed when it overruns or at shutdown).
//! - [`engine`]: the [`Sources`](engine::Sources) actor: values in memory only, one run at
//!   a time per source, renewal ahead of expiry, retries with backoff, wiped at shutdown.
//!
//! A source shadows a stored token or key of the same name; the profile's scope still
//! decides who may read it.

pub mod engine;
pub mod output;
pub mod run;

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

pub use engine::Sources;

/// What a source serves.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum SourceTarget {
    /// A token, through `get_token` of provider:bucket.
    Token {
        /// The provider.
        provider: String,
        /// The bucket.
        bucket: String,
    },
    /// An API key, through `get_api_key`.
    Key {
        /// The key name.
        name: String,
    },
}

impl std::fmt::Display for SourceTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SourceTarget::Token { provider, bucket } => write!(f, "{provider}:{bucket}"),
            SourceTarget::Key { name } => write!(f, "key {name}"),
        }
    }
}

/// One `[[token_command]]` or `[[key_command]]` of the profile.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SourceSpec {
    /// What it serves.
    pub target: SourceTarget,
    /// The program and its arguments (no shell).
    pub command: Vec<String>,
    /// How long a value lives when the output gives no expiry.
    pub ttl: Option<Duration>,
}

/// How sources run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SourceSettings {
    /// One run at most this long, then its process group is killed.
    pub timeout: Duration,
    /// A value's life when neither the output nor the source gives one.
    pub default_ttl: Duration,
    /// The first pause before a failed source is run again; it doubles up to
    /// [`SourceSettings::retry_max`].
    pub retry_min: Duration,
    /// The longest pause between retries.
    pub retry_max: Duration,
    /// An explicit refresh (`refresh_token`) within this long of the last good run
    /// returns the current value.
    pub cooldown: Duration,
}

impl Default for SourceSettings {
    fn default() -> Self {
        SourceSettings {
            timeout: Duration::from_secs(30),
            default_ttl: Duration::from_secs(3600),
            retry_min: Duration::from_secs(5),
            retry_max: Duration::from_secs(300),
            cooldown: Duration::from_secs(30),
        }
    }
}

/// Which names are served by sources, for the sessions' quick checks and the lists.
#[derive(Debug, Clone, Default)]
pub struct SourceIndex {
    tokens: BTreeMap<String, BTreeSet<String>>,
    keys: BTreeSet<String>,
}

impl SourceIndex {
    /// The index of `specs`.
    pub fn new(specs: &[SourceSpec]) -> SourceIndex {
        let mut index = SourceIndex::default();
        for spec in specs {
            match &spec.target {
                SourceTarget::Token { provider, bucket } => {
                    index
                        .tokens
                        .entry(provider.clone())
                        .or_default()
                        .insert(bucket.clone());
                }
                SourceTarget::Key { name } => {
                    index.keys.insert(name.clone());
                }
            }
        }
        index
    }

    /// True when no source is configured.
    pub fn is_empty(&self) -> bool {
        self.tokens.is_empty() && self.keys.is_empty()
    }

    /// True when provider:bucket is served by a source.
    pub fn has_token(&self, provider: &str, bucket: &str) -> bool {
        self.tokens
            .get(provider)
            .is_some_and(|b| b.contains(bucket))
    }

    /// True when the key `name` is served by a source.
    pub fn has_key(&self, name: &str) -> bool {
        self.keys.contains(name)
    }

    /// The providers with a token source.
    pub fn providers(&self) -> impl Iterator<Item = &String> {
        self.tokens.keys()
    }

    /// The buckets of `provider` with a token source.
    pub fn buckets(&self, provider: &str) -> impl Iterator<Item = &String> {
        self.tokens.get(provider).into_iter().flatten()
    }

    /// The key names with a source.
    pub fn keys(&self) -> impl Iterator<Item = &String> {
        self.keys.iter()
    }
}
