//! Host-side refresh (PROTOCOL.md §14): keeping OAuth access tokens fresh on the host so
//! the sandbox never holds a refresh token and never sees an expired token.
//!
//! - [`schedule`]: the settings and the timing rules (due within the margin, renewal lead
//!   with jitter, cooldown), pure functions of the clock.
//!
//! The HTTP side (presets, the grant, the retrying client) is [`crate::oauth`].

pub mod schedule;

pub use schedule::{BucketKey, Cooldowns, RefreshSettings};
