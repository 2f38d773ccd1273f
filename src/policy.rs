//! The `ScopePolicy` actor and the profile it holds (PROTOCOL.md §8).
//!
//! A [`Profile`] says which providers (all of their buckets, or a list), which API key
//! names, and whether writes are allowed. Nothing is allowed unless the profile allows it.
//! The actor answers typed decision messages and filters the list operations.

use std::collections::{BTreeMap, BTreeSet};

use actix::{Actor, Context, Handler, Message, MessageResult};

use crate::names::{self, NameKind};

/// Which buckets of a provider a profile allows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BucketScope {
    /// Every bucket.
    All,
    /// Only these buckets.
    Only(BTreeSet<String>),
}

/// The loaded profile: what the sandbox may reach.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Profile {
    /// Everything is allowed (`--allow-all`).
    pub allow_all: bool,
    /// Allowed providers and their buckets.
    pub providers: BTreeMap<String, BucketScope>,
    /// Allowed API key names.
    pub keys: BTreeSet<String>,
    /// `save_token` and `remove_token` are refused with `FORBIDDEN`.
    pub read_only: bool,
}

/// A scope decision.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Go ahead.
    Allow,
    /// Outside the profile (`UNAUTHORIZED`).
    Unauthorized,
    /// Inside the profile but not in this mode (`FORBIDDEN`, read-only).
    Forbidden,
}

impl Profile {
    /// Adds an `--allow` spec: `PROVIDER` (every bucket, and the API key named PROVIDER)
    /// or `PROVIDER:BUCKET[,BUCKET...]` (those buckets, and the key). Grants add up.
    pub fn allow(&mut self, spec: &str) -> Result<(), String> {
        let (provider, buckets) = match spec.split_once(':') {
            None => (spec, None),
            Some((p, b)) => (p, Some(b)),
        };
        names::check(NameKind::Provider, provider).map_err(|e| format!("--allow {spec:?}: {e}"))?;
        let scope = match buckets {
            None => BucketScope::All,
            Some(list) => {
                let mut set = BTreeSet::new();
                for b in list.split(',') {
                    names::check(NameKind::Bucket, b)
                        .map_err(|e| format!("--allow {spec:?}: {e}"))?;
                    set.insert(b.to_owned());
                }
                BucketScope::Only(set)
            }
        };
        let entry = self
            .providers
            .entry(provider.to_owned())
            .or_insert_with(|| BucketScope::Only(BTreeSet::new()));
        match (entry, scope) {
            (BucketScope::All, _) => {}
            (entry, BucketScope::All) => *entry = BucketScope::All,
            (BucketScope::Only(have), BucketScope::Only(add)) => have.extend(add),
        }
        // The provider's own API key comes with it; provider names may hold '@', key names
        // may not, so only grant a key whose name is a valid key name.
        if names::is_valid(NameKind::Key, provider) {
            self.keys.insert(provider.to_owned());
        }
        Ok(())
    }

    /// Adds an `--allow-key NAME`.
    pub fn allow_key(&mut self, name: &str) -> Result<(), String> {
        names::check(NameKind::Key, name).map_err(|e| format!("--allow-key {name:?}: {e}"))?;
        self.keys.insert(name.to_owned());
        Ok(())
    }

    /// True when the profile allows nothing at all.
    pub fn allows_nothing(&self) -> bool {
        !self.allow_all && self.providers.is_empty() && self.keys.is_empty()
    }

    /// May the sandbox use `provider` at all?
    pub fn allows_provider(&self, provider: &str) -> bool {
        self.allow_all || self.providers.contains_key(provider)
    }

    /// May the sandbox use `provider:bucket`?
    pub fn allows_bucket(&self, provider: &str, bucket: &str) -> bool {
        if self.allow_all {
            return true;
        }
        match self.providers.get(provider) {
            Some(BucketScope::All) => true,
            Some(BucketScope::Only(set)) => set.contains(bucket),
            None => false,
        }
    }

    /// May the sandbox read the API key `name`?
    pub fn allows_key(&self, name: &str) -> bool {
        self.allow_all || self.keys.contains(name)
    }

    /// The decision for a token operation; `write` for `save_token`/`remove_token`.
    /// Outside the profile wins over read-only.
    pub fn decide_token(&self, provider: &str, bucket: &str, write: bool) -> Decision {
        if !self.allows_bucket(provider, bucket) {
            Decision::Unauthorized
        } else if write && self.read_only {
            Decision::Forbidden
        } else {
            Decision::Allow
        }
    }
}

/// The actor holding the loaded profile.
#[derive(Debug)]
pub struct ScopePolicy {
    profile: Profile,
}

impl ScopePolicy {
    /// A policy actor for `profile` (start it with `Actor::start`).
    pub fn new(profile: Profile) -> Self {
        ScopePolicy { profile }
    }
}

impl Actor for ScopePolicy {
    type Context = Context<Self>;
}

/// What a decision is about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Subject {
    /// `provider:bucket` for reading (`get_token`, `get_bucket_stats`).
    Read {
        /// Provider.
        provider: String,
        /// Bucket.
        bucket: String,
    },
    /// `provider:bucket` for writing (`save_token`, `remove_token`).
    Write {
        /// Provider.
        provider: String,
        /// Bucket.
        bucket: String,
    },
    /// A provider as a whole (`list_buckets`).
    Provider(String),
    /// An API key name (`get_api_key`, `has_api_key`).
    Key(String),
}

impl Subject {
    /// The names the subject carries: provider and bucket; or the provider, or the key
    /// name, with an empty second name.
    pub fn into_names(self) -> (String, String) {
        match self {
            Subject::Read { provider, bucket } | Subject::Write { provider, bucket } => {
                (provider, bucket)
            }
            Subject::Provider(name) | Subject::Key(name) => (name, String::new()),
        }
    }
}

/// Asks for the decision on one subject. The subject comes back with the decision, so
/// the caller can pass its names on without copying them.
#[derive(Debug, Message)]
#[rtype(result = "Checked")]
pub struct Check(pub Subject);

/// The answer to [`Check`].
#[derive(Debug)]
pub struct Checked {
    /// The decision.
    pub decision: Decision,
    /// The subject asked about.
    pub subject: Subject,
}

impl Handler<Check> for ScopePolicy {
    type Result = MessageResult<Check>;

    fn handle(&mut self, msg: Check, _: &mut Context<Self>) -> Self::Result {
        let p = &self.profile;
        let decision = match &msg.0 {
            Subject::Read { provider, bucket } => p.decide_token(provider, bucket, false),
            Subject::Write { provider, bucket } => p.decide_token(provider, bucket, true),
            Subject::Provider(provider) if p.allows_provider(provider) => Decision::Allow,
            Subject::Key(name) if p.allows_key(name) => Decision::Allow,
            Subject::Provider(_) | Subject::Key(_) => Decision::Unauthorized,
        };
        MessageResult(Checked {
            decision,
            subject: msg.0,
        })
    }
}

/// Which list is being filtered.
#[derive(Debug, Clone)]
pub enum ListKind {
    /// Provider names.
    Providers,
    /// Bucket names of one provider.
    Buckets(String),
    /// API key names.
    Keys,
}

/// Keeps only the names the profile allows.
#[derive(Debug, Message)]
#[rtype(result = "Vec<String>")]
pub struct Filter {
    /// Which list.
    pub kind: ListKind,
    /// The names to filter.
    pub names: Vec<String>,
}

impl Handler<Filter> for ScopePolicy {
    type Result = MessageResult<Filter>;

    fn handle(&mut self, mut msg: Filter, _: &mut Context<Self>) -> Self::Result {
        let p = &self.profile;
        msg.names.retain(|n| match &msg.kind {
            ListKind::Providers => p.allows_provider(n),
            ListKind::Buckets(provider) => p.allows_bucket(provider, n),
            ListKind::Keys => p.allows_key(n),
        });
        MessageResult(msg.names)
    }
}

/// Shutdown step: forget the profile and stop.
#[derive(Debug, Message)]
#[rtype(result = "()")]
pub struct Clear;

impl Handler<Clear> for ScopePolicy {
    type Result = ();

    fn handle(&mut self, _: Clear, ctx: &mut Context<Self>) {
        self.profile = Profile::default();
        actix::ActorContext::stop(ctx);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allow_specs() {
        let mut p = Profile::default();
        assert!(p.allows_nothing());
        p.allow("anthropic").expect("ok");
        p.allow("gemini:default,work").expect("ok");
        assert!(p.allows_bucket("anthropic", "anything"));
        assert!(p.allows_bucket("gemini", "work") && !p.allows_bucket("gemini", "other"));
        assert!(p.allows_key("anthropic") && p.allows_key("gemini") && !p.allows_key("openai"));
        assert!(!p.allows_provider("openai"));
        p.allow("gemini").expect("ok");
        assert!(p.allows_bucket("gemini", "other"));
        p.allow("gemini:x").expect("ok");
        assert!(
            p.allows_bucket("gemini", "other"),
            "a narrower grant never narrows"
        );
        assert!(p.allow("bad/name").is_err());
        assert!(p.allow("p:").is_err());
        assert!(p.allow_key("a@b").is_err());
    }

    #[test]
    fn decisions() {
        let mut p = Profile::default();
        p.allow("a:default").expect("ok");
        p.read_only = true;
        assert_eq!(p.decide_token("a", "default", false), Decision::Allow);
        assert_eq!(p.decide_token("a", "default", true), Decision::Forbidden);
        assert_eq!(p.decide_token("a", "x", true), Decision::Unauthorized);
        assert_eq!(
            p.decide_token("b", "default", false),
            Decision::Unauthorized
        );
        let all = Profile {
            allow_all: true,
            ..Profile::default()
        };
        assert_eq!(all.decide_token("z", "y", true), Decision::Allow);
    }
}
