//! The in-memory backend: for tests and for host programs that embed credproxy and hand
//! it credentials they already hold. Everything is wiped by [`Backend::clear`] and on drop.
//!
//! Tokens are kept as JSON text in [`LockedBytes`] and keys as [`Secret`]s, so everything
//! this store holds for its whole life sits on pages excluded from core dumps and locked
//! against swap (see [`crate::memory`]); a [`Token`] is parsed back only for the rare
//! `get_token` (merge, tools), never to serve one.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

use super::{
    check_name as check, Backend, RefreshLock, RefreshState, RefreshWrite, SaveMode, StoreError,
};
use crate::memory::LockedBytes;
use crate::names::NameKind;
use crate::secret::Secret;
use crate::token::{ServedToken, Token};

/// A stored token (JSON text, with its refresh token) and its served form, both made once
/// when it is stored.
struct Stored {
    token: LockedBytes,
    served: ServedToken,
}

impl Stored {
    fn token(&self) -> Result<Token, StoreError> {
        // Written by Token::locked_json from a valid Token, so it always parses back.
        Token::from_json(self.token.as_slice()).map_err(|e| StoreError::Corrupt {
            path: "memory".into(),
            reason: e.to_string(),
        })
    }
}

#[derive(Default)]
struct Contents {
    /// provider → bucket → token; BTreeMaps so that lists come out sorted.
    tokens: BTreeMap<String, BTreeMap<String, Stored>>,
    keys: BTreeMap<String, Secret>,
    /// (provider, bucket) → refresh bookkeeping.
    states: HashMap<(String, String), RefreshState>,
    cleared: bool,
}

/// The refresh locks held: (provider, bucket) of each, and a condition to wait on.
#[derive(Default)]
struct RefreshLocks {
    held: Mutex<HashSet<(String, String)>>,
    freed: Condvar,
}

/// A held refresh lock of the memory backend; frees its key when dropped.
struct HeldRefresh {
    locks: Arc<RefreshLocks>,
    key: (String, String),
}

impl Drop for HeldRefresh {
    fn drop(&mut self) {
        let mut held = self.locks.held.lock().unwrap_or_else(|e| e.into_inner());
        held.remove(&self.key);
        drop(held);
        self.locks.freed.notify_all();
    }
}

/// An in-memory credential store.
#[derive(Default)]
pub struct MemoryBackend {
    contents: Mutex<Contents>,
    refresh_locks: Arc<RefreshLocks>,
}

impl std::fmt::Debug for MemoryBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryBackend").finish_non_exhaustive()
    }
}

impl MemoryBackend {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    /// Seeds a token (with its refresh token) for `provider:bucket`; for host programs.
    pub fn insert_token(
        &self,
        provider: &str,
        bucket: &str,
        token: Token,
    ) -> Result<(), StoreError> {
        self.save_token(provider, bucket, &token, SaveMode::Replace)
    }

    /// Seeds an API key; for host programs.
    pub fn insert_key(&self, name: &str, key: Secret) -> Result<(), StoreError> {
        self.set_key(name, &key)
    }

    fn lock(&self) -> Result<MutexGuard<'_, Contents>, StoreError> {
        // A poisoned lock only means another thread panicked mid-call; the maps are still
        // consistent because every mutation is a single insert or remove.
        let guard = self.contents.lock().unwrap_or_else(|e| e.into_inner());
        if guard.cleared {
            return Err(StoreError::Cleared);
        }
        Ok(guard)
    }
}

impl Backend for MemoryBackend {
    fn is_blocking(&self) -> bool {
        false
    }

    fn get_token(&self, provider: &str, bucket: &str) -> Result<Option<Token>, StoreError> {
        let c = self.lock()?;
        c.tokens
            .get(provider)
            .and_then(|b| b.get(bucket))
            .map(Stored::token)
            .transpose()
    }

    fn get_served_token(
        &self,
        provider: &str,
        bucket: &str,
    ) -> Result<Option<ServedToken>, StoreError> {
        let c = self.lock()?;
        Ok(c.tokens
            .get(provider)
            .and_then(|b| b.get(bucket))
            .map(|s| s.served.clone()))
    }

    /// Everything is in memory: always answered (unless cleared, which the store's
    /// ordinary path then reports).
    fn cached_token(&self, provider: &str, bucket: &str) -> Option<Option<ServedToken>> {
        self.get_served_token(provider, bucket).ok()
    }

    fn save_token(
        &self,
        provider: &str,
        bucket: &str,
        incoming: &Token,
        mode: SaveMode,
    ) -> Result<(), StoreError> {
        check(NameKind::Provider, provider)?;
        check(NameKind::Bucket, bucket)?;
        let mut c = self.lock()?;
        let stored = c.tokens.get(provider).and_then(|b| b.get(bucket));
        let token = match (mode, stored) {
            (SaveMode::Merge, Some(stored)) => stored.token()?.merge(incoming),
            _ => incoming.clone(),
        };
        super::check_storable(&token)?;
        let buckets = c.tokens.entry(provider.to_owned()).or_default();
        let stored = Stored {
            token: token.locked_json(),
            served: token.served(),
        };
        buckets.insert(bucket.to_owned(), stored);
        // A saved token clears the needs-login mark; a replaced one is a new login, whose
        // bookkeeping starts over (no cooldown from the old login's refresh).
        let key = (provider.to_owned(), bucket.to_owned());
        if mode == SaveMode::Replace {
            c.states.remove(&key);
        } else if let Some(state) = c.states.get_mut(&key) {
            state.needs_login = None;
        }
        Ok(())
    }

    fn remove_token(&self, provider: &str, bucket: &str) -> Result<bool, StoreError> {
        let mut c = self.lock()?;
        c.states.remove(&(provider.to_owned(), bucket.to_owned()));
        let Some(buckets) = c.tokens.get_mut(provider) else {
            return Ok(false);
        };
        let removed = buckets.remove(bucket).is_some();
        if buckets.is_empty() {
            c.tokens.remove(provider);
        }
        Ok(removed)
    }

    fn list_providers(&self) -> Result<Vec<String>, StoreError> {
        Ok(self.lock()?.tokens.keys().cloned().collect())
    }

    fn list_buckets(&self, provider: &str) -> Result<Vec<String>, StoreError> {
        let c = self.lock()?;
        Ok(c.tokens
            .get(provider)
            .map(|b| b.keys().cloned().collect())
            .unwrap_or_default())
    }

    fn get_key(&self, name: &str) -> Result<Option<Secret>, StoreError> {
        Ok(self.lock()?.keys.get(name).cloned())
    }

    fn set_key(&self, name: &str, key: &Secret) -> Result<(), StoreError> {
        check(NameKind::Key, name)?;
        self.lock()?.keys.insert(name.to_owned(), key.clone());
        Ok(())
    }

    fn remove_key(&self, name: &str) -> Result<bool, StoreError> {
        Ok(self.lock()?.keys.remove(name).is_some())
    }

    fn list_keys(&self) -> Result<Vec<String>, StoreError> {
        Ok(self.lock()?.keys.keys().cloned().collect())
    }

    fn refresh_lock(&self, provider: &str, bucket: &str) -> Result<RefreshLock, StoreError> {
        check(NameKind::Provider, provider)?;
        check(NameKind::Bucket, bucket)?;
        let key = (provider.to_owned(), bucket.to_owned());
        let locks = &self.refresh_locks;
        let mut held = locks.held.lock().unwrap_or_else(|e| e.into_inner());
        while held.contains(&key) {
            held = locks.freed.wait(held).unwrap_or_else(|e| e.into_inner());
        }
        held.insert(key.clone());
        Ok(RefreshLock::new(HeldRefresh {
            locks: Arc::clone(locks),
            key,
        }))
    }

    fn refresh_state(&self, provider: &str, bucket: &str) -> Result<RefreshState, StoreError> {
        check(NameKind::Provider, provider)?;
        check(NameKind::Bucket, bucket)?;
        let c = self.lock()?;
        Ok(c.states
            .get(&(provider.to_owned(), bucket.to_owned()))
            .cloned()
            .unwrap_or_default())
    }

    fn finish_refresh(
        &self,
        provider: &str,
        bucket: &str,
        decide: &mut dyn FnMut(Option<&Token>) -> RefreshWrite,
    ) -> Result<bool, StoreError> {
        check(NameKind::Provider, provider)?;
        check(NameKind::Bucket, bucket)?;
        let mut c = self.lock()?;
        let stored = c
            .tokens
            .get(provider)
            .and_then(|b| b.get(bucket))
            .map(Stored::token)
            .transpose()?;
        let key = (provider.to_owned(), bucket.to_owned());
        let decided = decide(stored.as_ref());
        if stored.is_none() {
            // Removal wins: nothing is written for a bucket without a token, whatever
            // the caller decided.
            return Ok(false);
        }
        match decided {
            RefreshWrite::Nothing => Ok(false),
            RefreshWrite::NeedsLogin(mark) => {
                c.states.entry(key).or_default().needs_login = Some(mark);
                Ok(true)
            }
            RefreshWrite::Token { token, at } => {
                super::check_storable(&token)?;
                let stored = Stored {
                    token: token.locked_json(),
                    served: token.served(),
                };
                c.tokens
                    .entry(provider.to_owned())
                    .or_default()
                    .insert(bucket.to_owned(), stored);
                let state = c.states.entry(key).or_default();
                state.refreshed_at = Some(at);
                state.needs_login = None;
                Ok(true)
            }
        }
    }

    fn clear(&self) {
        let mut c = self.contents.lock().unwrap_or_else(|e| e.into_inner());
        // Dropping the Tokens, ServedTokens and Secrets wipes their memory.
        c.tokens.clear();
        c.keys.clear();
        c.states.clear();
        c.cleared = true;
    }
}
