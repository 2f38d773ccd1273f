//! When a token is refreshed (PROTOCOL.md §14): the settings, the "due" rule of
//! `get_token` and the renewal time with its jitter (the cooldown after a success is kept
//! in the store, `RefreshState::refreshed_at`, so every process sees it). Pure
//! functions of the clock, so the engine and its tests agree on every boundary.

use std::time::Duration;

/// The refresh settings of a server (`--refresh-margin`, `--renew-before`,
/// `--no-refresh`, and the profile keys of the same names).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RefreshSettings {
    /// False: tokens are served as stored (protocol version 1 behaviour).
    pub enabled: bool,
    /// `get_token` refreshes a token that expires within this margin (or has expired).
    pub margin: Duration,
    /// Renewal refreshes a token this long before it expires, plus up to a fifth of it at
    /// random.
    pub renew_before: Duration,
    /// After a successful refresh of a provider:bucket, an explicit refresh returns the
    /// current token without going upstream for this long.
    pub cooldown: Duration,
}

impl Default for RefreshSettings {
    fn default() -> Self {
        RefreshSettings {
            enabled: true,
            margin: Duration::from_secs(60),
            renew_before: Duration::from_secs(300),
            cooldown: Duration::from_secs(30),
        }
    }
}

/// True when a token expiring at `expiry` (epoch seconds) must be refreshed before a
/// `get_token` at `now` answers: it expires within `margin`, or has expired.
pub fn is_due(expiry: u64, now: u64, margin: Duration) -> bool {
    expiry <= now.saturating_add(margin.as_secs())
}

/// How long from `now` until a token expiring at `expiry` is renewed, or `None` when it
/// has expired (renewal never runs after expiry; the next `get_token` refreshes it).
///
/// The lead is `renew_before` plus `jitter` (0.0 to 1.0) times a fifth of it, so servers
/// sharing a store spread their renewals. When the token's whole `lifetime` is known (it
/// was just issued with `expires_in`), the lead is at most half of it, so a provider that
/// issues tokens shorter than the lead is not asked again at once after every renewal.
pub fn renewal_delay(
    expiry: u64,
    now: u64,
    renew_before: Duration,
    jitter: f64,
    lifetime: Option<Duration>,
) -> Option<Duration> {
    if expiry <= now {
        return None;
    }
    let jitter = jitter.clamp(0.0, 1.0);
    let mut lead = renew_before + renew_before.mul_f64(jitter / 5.0);
    if let Some(lifetime) = lifetime {
        lead = lead.min(lifetime / 2);
    }
    let remaining = Duration::from_secs(expiry - now);
    Some(remaining.saturating_sub(lead))
}

/// The provider:bucket a refresh is for. An omitted bucket is `"default"` before a key is
/// ever made, so both share one flight, one cooldown and one mark.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BucketKey {
    /// The provider.
    pub provider: String,
    /// The bucket (`"default"` when the request named none).
    pub bucket: String,
}

impl BucketKey {
    /// The key of `provider` and `bucket` (`None`: the default bucket).
    pub fn new(provider: &str, bucket: Option<&str>) -> BucketKey {
        BucketKey {
            provider: provider.to_owned(),
            bucket: bucket.unwrap_or(crate::names::DEFAULT_BUCKET).to_owned(),
        }
    }
}

impl std::fmt::Display for BucketKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.provider, self.bucket)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn due_within_the_margin_or_expired() {
        let m = Duration::from_secs(60);
        assert!(!is_due(1_061, 1_000, m));
        assert!(is_due(1_060, 1_000, m));
        assert!(is_due(1_000, 1_000, m));
        assert!(is_due(5, 1_000, m));
        assert!(is_due(u64::MAX, u64::MAX - 10, m));
        assert!(!is_due(1_001, 1_000, Duration::ZERO));
    }

    #[test]
    fn renewal_comes_five_to_six_minutes_before_expiry() {
        let rb = Duration::from_secs(300);
        let now = 10_000;
        let expiry = now + 3_600;
        assert_eq!(
            renewal_delay(expiry, now, rb, 0.0, None),
            Some(Duration::from_secs(3_300))
        );
        assert_eq!(
            renewal_delay(expiry, now, rb, 1.0, None),
            Some(Duration::from_secs(3_240))
        );
        let mid = renewal_delay(expiry, now, rb, 0.5, None).expect("some");
        assert!(mid > Duration::from_secs(3_240) && mid < Duration::from_secs(3_300));
        // Jitter outside 0..=1 is clamped.
        assert_eq!(
            renewal_delay(expiry, now, rb, 7.0, None),
            Some(Duration::from_secs(3_240))
        );
    }

    #[test]
    fn renewal_is_immediate_inside_the_lead_and_never_after_expiry() {
        let rb = Duration::from_secs(300);
        assert_eq!(
            renewal_delay(1_100, 1_000, rb, 0.0, None),
            Some(Duration::ZERO)
        );
        assert_eq!(renewal_delay(1_000, 1_000, rb, 0.0, None), None);
        assert_eq!(renewal_delay(900, 1_000, rb, 0.0, None), None);
    }

    #[test]
    fn a_short_lived_token_is_renewed_at_half_its_life() {
        let rb = Duration::from_secs(300);
        // A provider issuing 4-minute tokens: renew after 2 minutes, not at once.
        assert_eq!(
            renewal_delay(1_240, 1_000, rb, 1.0, Some(Duration::from_secs(240))),
            Some(Duration::from_secs(120))
        );
        // A long lifetime leaves the lead alone.
        assert_eq!(
            renewal_delay(4_600, 1_000, rb, 0.0, Some(Duration::from_secs(3_600))),
            Some(Duration::from_secs(3_300))
        );
    }

    #[test]
    fn an_omitted_bucket_is_the_default_bucket() {
        assert_eq!(
            BucketKey::new("anthropic", None),
            BucketKey::new("anthropic", Some("default"))
        );
        assert_ne!(
            BucketKey::new("anthropic", None),
            BucketKey::new("anthropic", Some("work"))
        );
        assert_eq!(BucketKey::new("a", None).to_string(), "a:default");
    }
}
