//! One wrapper for the test backends that must behave differently from a plain store:
//! slow, gated, failing or counting. [`Hooked`] delegates every call to the backend it
//! wraps after its [`Hook`] has run; the hook sleeps, waits, counts or fails the call.

use std::fmt::Debug;
use std::sync::Arc;

use credproxy::backend::{Backend, RefreshLock, RefreshState, RefreshWrite, SaveMode, StoreError};
use credproxy::secret::Secret;
use credproxy::token::Token;

/// The backend call a [`Hook`] runs before.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Call<'a> {
    GetToken { provider: &'a str, bucket: &'a str },
    SaveToken { provider: &'a str, bucket: &'a str },
    RemoveToken,
    ListProviders,
    ListBuckets,
    GetKey,
    SetKey,
    RemoveKey,
    ListKeys,
    RefreshLock,
    RefreshState,
    FinishRefresh,
}

/// What a test backend does before each call; an `Err` is returned instead of the call.
pub trait Hook: Debug + Send + Sync + 'static {
    fn before(&self, call: Call<'_>) -> Result<(), StoreError>;

    /// Runs before the wrapped backend is cleared (shutdown), e.g. to open a gate.
    fn on_clear(&self) {}
}

/// `inner` with `hook` run before every call; `blocking` says whether the store must run
/// its calls on its worker threads (as for the file backend).
#[derive(Debug)]
pub struct Hooked<H: Hook> {
    pub inner: Arc<dyn Backend>,
    pub hook: H,
    pub blocking: bool,
}

impl<H: Hook> Backend for Hooked<H> {
    fn is_blocking(&self) -> bool {
        self.blocking
    }
    fn get_token(&self, provider: &str, bucket: &str) -> Result<Option<Token>, StoreError> {
        self.hook.before(Call::GetToken { provider, bucket })?;
        self.inner.get_token(provider, bucket)
    }
    fn save_token(
        &self,
        provider: &str,
        bucket: &str,
        incoming: &Token,
        mode: SaveMode,
    ) -> Result<(), StoreError> {
        self.hook.before(Call::SaveToken { provider, bucket })?;
        self.inner.save_token(provider, bucket, incoming, mode)
    }
    fn remove_token(&self, provider: &str, bucket: &str) -> Result<bool, StoreError> {
        self.hook.before(Call::RemoveToken)?;
        self.inner.remove_token(provider, bucket)
    }
    fn list_providers(&self) -> Result<Vec<String>, StoreError> {
        self.hook.before(Call::ListProviders)?;
        self.inner.list_providers()
    }
    fn list_buckets(&self, provider: &str) -> Result<Vec<String>, StoreError> {
        self.hook.before(Call::ListBuckets)?;
        self.inner.list_buckets(provider)
    }
    fn get_key(&self, name: &str) -> Result<Option<Secret>, StoreError> {
        self.hook.before(Call::GetKey)?;
        self.inner.get_key(name)
    }
    fn set_key(&self, name: &str, key: &Secret) -> Result<(), StoreError> {
        self.hook.before(Call::SetKey)?;
        self.inner.set_key(name, key)
    }
    fn remove_key(&self, name: &str) -> Result<bool, StoreError> {
        self.hook.before(Call::RemoveKey)?;
        self.inner.remove_key(name)
    }
    fn list_keys(&self) -> Result<Vec<String>, StoreError> {
        self.hook.before(Call::ListKeys)?;
        self.inner.list_keys()
    }
    fn refresh_lock(&self, provider: &str, bucket: &str) -> Result<RefreshLock, StoreError> {
        self.hook.before(Call::RefreshLock)?;
        self.inner.refresh_lock(provider, bucket)
    }
    fn refresh_state(&self, provider: &str, bucket: &str) -> Result<RefreshState, StoreError> {
        self.hook.before(Call::RefreshState)?;
        self.inner.refresh_state(provider, bucket)
    }
    fn finish_refresh(
        &self,
        provider: &str,
        bucket: &str,
        decide: &mut dyn FnMut(Option<&Token>) -> RefreshWrite,
    ) -> Result<bool, StoreError> {
        self.hook.before(Call::FinishRefresh)?;
        self.inner.finish_refresh(provider, bucket, decide)
    }
    fn clear(&self) {
        self.hook.on_clear();
        self.inner.clear();
    }
}

/// A hook that makes `get_token` take `0` longer.
#[derive(Debug)]
pub struct SlowGet(pub std::time::Duration);

impl Hook for SlowGet {
    fn before(&self, call: Call<'_>) -> Result<(), StoreError> {
        if let Call::GetToken { .. } = call {
            std::thread::sleep(self.0);
        }
        Ok(())
    }
}
