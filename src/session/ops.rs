//! The operations of a session: each checked request becomes plain async code over typed
//! messages (scope with the `ScopePolicy`, then the `CredentialStore`, the `Refresher` or
//! the command `Sources`), ending in the reply's data or a wire rejection. Internal errors
//! never cross: every failure maps to a wire code and a short sentence here.

use std::sync::Arc;

use serde_json::json;

use super::Shared;
use crate::policy::{self, Decision, ListKind, Subject};
use crate::protocol::{ErrorCode, Rejection, ReplyData, Request, MAX_SERVED_TOKEN_LEN};
use crate::refresh::engine::{Changed, Refresh};
use crate::refresh::flow::{FlowError, FlowOutput, Reason};
use crate::refresh::BucketKey;
use crate::source::engine::{Fetch, Held};
use crate::source::SourceTarget;
use crate::store;

fn internal() -> Rejection {
    Rejection::new(
        ErrorCode::InternalError,
        "the credential store failed; see the host's log",
    )
}

fn not_found(what: &str) -> Rejection {
    Rejection::new(ErrorCode::NotFound, format!("no {what} stored"))
}

/// Asks the policy about `subject`; on `Allow` the subject comes back, so the names in it
/// move on to the store without a copy.
async fn scope(shared: &Shared, subject: Subject) -> Result<Subject, Rejection> {
    let checked = shared
        .policy
        .send(policy::Check(subject))
        .await
        .map_err(|_| internal())?;
    let subject = checked.subject;
    match checked.decision {
        Decision::Allow => Ok(subject),
        // The names are only formatted on a refusal.
        Decision::Unauthorized => Err(Rejection::new(
            ErrorCode::Unauthorized,
            format!(
                "UNAUTHORIZED: {} is outside the loaded profile",
                match &subject {
                    Subject::Read { provider, bucket } | Subject::Write { provider, bucket } => {
                        format!("{provider}:{bucket}")
                    }
                    Subject::Provider(p) => format!("provider {p}"),
                    Subject::Key(k) => format!("API key {k}"),
                }
            ),
        )),
        Decision::Forbidden => Err(Rejection::new(
            ErrorCode::Forbidden,
            "the credential proxy is read-only",
        )),
    }
}

async fn filtered(
    shared: &Shared,
    kind: ListKind,
    names: Vec<String>,
) -> Result<Vec<String>, Rejection> {
    shared
        .policy
        .send(policy::Filter { kind, names })
        .await
        .map_err(|_| internal())
}

/// The subject the policy decides on for `request` (`None` for the lists, which the
/// policy filters instead).
pub(super) fn subject_of(request: &Request) -> Option<Subject> {
    Some(match request {
        Request::GetToken { provider, bucket }
        | Request::GetBucketStats { provider, bucket }
        | Request::RefreshToken { provider, bucket } => Subject::Read {
            provider: provider.clone(),
            bucket: bucket.clone(),
        },
        Request::SaveToken {
            provider, bucket, ..
        }
        | Request::RemoveToken { provider, bucket } => Subject::Write {
            provider: provider.clone(),
            bucket: bucket.clone(),
        },
        Request::ListBuckets { provider } => Subject::Provider(provider.clone()),
        Request::GetApiKey { name } | Request::HasApiKey { name } => Subject::Key(name.clone()),
        Request::ListProviders | Request::ListApiKeys | Request::Cancel { .. } => return None,
    })
}

/// True when `subject` is what the policy decides on for `request` (no copy).
pub(super) fn is_subject_of(subject: &Subject, request: &Request) -> bool {
    match (subject, request) {
        (
            Subject::Read { provider, bucket },
            Request::GetToken {
                provider: p,
                bucket: b,
            }
            | Request::GetBucketStats {
                provider: p,
                bucket: b,
            }
            | Request::RefreshToken {
                provider: p,
                bucket: b,
            },
        )
        | (
            Subject::Write { provider, bucket },
            Request::SaveToken {
                provider: p,
                bucket: b,
                ..
            }
            | Request::RemoveToken {
                provider: p,
                bucket: b,
            },
        ) => provider == p && bucket == b,
        (Subject::Provider(provider), Request::ListBuckets { provider: p }) => provider == p,
        (Subject::Key(name), Request::GetApiKey { name: n } | Request::HasApiKey { name: n }) => {
            name == n
        }
        _ => false,
    }
}

/// Runs one checked request: scope (unless the session knows the policy allows its
/// subject), then the store. The flag is true when the policy answered `Allow` for the
/// request's subject during this call.
/// `gate` decides between a write and its cancellation (save and remove only).
pub(super) async fn execute(
    shared: Arc<Shared>,
    request: Request,
    known: bool,
    gate: Option<store::WriteGate>,
) -> (Result<ReplyData, Rejection>, bool) {
    let allowed = std::cell::Cell::new(false);
    let result = run(&shared, request, known, &allowed, gate).await;
    (result, allowed.get())
}

async fn run(
    sh: &Shared,
    request: Request,
    known: bool,
    allowed: &std::cell::Cell<bool>,
    gate: Option<store::WriteGate>,
) -> Result<ReplyData, Rejection> {
    let store = &sh.store;
    let check = |subject: Subject| async move {
        if known {
            return Ok(subject);
        }
        let subject = scope(sh, subject).await?;
        allowed.set(true);
        Ok(subject)
    };
    let read = |provider, bucket| Subject::Read { provider, bucket };
    let write = |provider, bucket| Subject::Write { provider, bucket };
    match request {
        Request::GetToken { provider, bucket } => {
            let (provider, bucket) = check(read(provider, bucket)).await?.into_names();
            if is_sourced_token(sh, &provider, &bucket) {
                return sourced_token(sh, provider, bucket, false).await;
            }
            // The names are kept (copied) only for a provider that may need a refresh.
            let gate = Some(&sh.refresh).filter(|g| g.covers(&provider));
            let names = gate.map(|_| (provider.clone(), bucket.clone()));
            let token = match store.send(store::GetToken { provider, bucket }).await {
                Ok(Ok(Some(token))) => token,
                Ok(Ok(None)) => return Err(not_found("token")),
                _ => return Err(internal()),
            };
            if let (Some(gate), Some((provider, bucket))) = (gate, names) {
                let now = gate.clock.now();
                if token.has_refresh_token()
                    && crate::refresh::schedule::is_due(token.expiry(), now, gate.margin)
                {
                    return refresh(sh, provider, bucket, Reason::Due, Some(token)).await;
                }
            }
            Ok(ReplyData::Token(token))
        }
        Request::RefreshToken { provider, bucket } => {
            let (provider, bucket) = check(read(provider, bucket)).await?.into_names();
            if is_sourced_token(sh, &provider, &bucket) {
                return sourced_token(sh, provider, bucket, true).await;
            }
            refresh(sh, provider, bucket, Reason::Explicit, None).await
        }
        Request::SaveToken {
            provider,
            bucket,
            token,
        } => {
            let (provider, bucket) = check(write(provider, bucket)).await?.into_names();
            if is_sourced_token(sh, &provider, &bucket) {
                return Err(sourced_write(&provider, &bucket));
            }
            let save = store::SaveToken {
                provider,
                bucket,
                token,
                gate,
            };
            let key = BucketKey {
                provider: save.provider.clone(),
                bucket: save.bucket.clone(),
            };
            match store.send(save).await {
                Ok(Ok(store::Saved::Written)) => {
                    sh.refresher.do_send(Changed { key });
                    Ok(ReplyData::Json(json!({})))
                }
                Ok(Ok(store::Saved::Invalid(e))) => {
                    Err(Rejection::new(ErrorCode::InvalidRequest, e.to_string()))
                }
                // Nobody waits for a cancelled request; its reply was `CANCELLED`.
                Ok(Ok(store::Saved::Cancelled)) => Err(Rejection::new(
                    ErrorCode::Cancelled,
                    "the request was cancelled by the client",
                )),
                Ok(Ok(store::Saved::TooLarge)) => Err(Rejection::new(
                    ErrorCode::InvalidRequest,
                    format!(
                        "token too large: merged with the stored token it would exceed \
                         {MAX_SERVED_TOKEN_LEN} bytes and could not be served"
                    ),
                )),
                _ => Err(internal()),
            }
        }
        Request::RemoveToken { provider, bucket } => {
            let (provider, bucket) = check(write(provider, bucket)).await?.into_names();
            if is_sourced_token(sh, &provider, &bucket) {
                return Err(sourced_write(&provider, &bucket));
            }
            let key = BucketKey {
                provider: provider.clone(),
                bucket: bucket.clone(),
            };
            match store
                .send(store::RemoveToken {
                    provider,
                    bucket,
                    gate,
                })
                .await
            {
                Ok(Ok(())) => {
                    sh.refresher.do_send(Changed { key });
                    Ok(ReplyData::Json(json!({})))
                }
                _ => Err(internal()),
            }
        }
        Request::ListProviders => {
            let mut all = store
                .send(store::ListProviders)
                .await
                .map_err(|_| internal())?;
            merge_names(&mut all, sh.source_index.providers());
            let providers = filtered(sh, ListKind::Providers, all).await?;
            Ok(ReplyData::Json(json!({ "providers": providers })))
        }
        Request::ListBuckets { provider } => {
            let (provider, _) = check(Subject::Provider(provider)).await?.into_names();
            let mut all = store
                .send(store::ListBuckets {
                    provider: provider.clone(),
                })
                .await
                .map_err(|_| internal())?;
            merge_names(&mut all, sh.source_index.buckets(&provider));
            let buckets = filtered(sh, ListKind::Buckets(provider), all).await?;
            Ok(ReplyData::Json(json!({ "buckets": buckets })))
        }
        Request::GetBucketStats { provider, bucket } => {
            let (provider, bucket) = check(read(provider, bucket)).await?.into_names();
            let sourced = is_sourced_token(sh, &provider, &bucket);
            match store
                .send(store::GetStats {
                    provider,
                    bucket: bucket.clone(),
                    sourced,
                })
                .await
            {
                Ok(Ok(Some(stats))) => {
                    let mut data = json!({
                        "bucket": bucket,
                        "requestCount": stats.request_count,
                        "percentage": stats.percentage,
                    });
                    if let Some(ms) = stats.last_used {
                        data["lastUsed"] = json!(ms);
                    }
                    Ok(ReplyData::Json(data))
                }
                Ok(Ok(None)) => Err(not_found("token")),
                _ => Err(internal()),
            }
        }
        Request::GetApiKey { name } => {
            let (name, _) = check(Subject::Key(name)).await?.into_names();
            if sh.source_index.has_key(&name) {
                let target = SourceTarget::Key { name };
                return match fetch(sh, target.clone(), false).await? {
                    Held::Key(key) => Ok(ReplyData::Json(json!({ "key": key.expose() }))),
                    Held::Token(_) => Err(internal()),
                };
            }
            match store.send(store::GetKey { name }).await {
                Ok(Ok(Some(key))) => Ok(ReplyData::Json(json!({ "key": key.expose() }))),
                Ok(Ok(None)) => Err(not_found("API key")),
                _ => Err(internal()),
            }
        }
        Request::ListApiKeys => {
            let mut all = store.send(store::ListKeys).await.map_err(|_| internal())?;
            merge_names(&mut all, sh.source_index.keys());
            let keys = filtered(sh, ListKind::Keys, all).await?;
            Ok(ReplyData::Json(json!({ "keys": keys })))
        }
        // The session answers `cancel` itself; it never reaches here.
        Request::Cancel { .. } => Err(Rejection::invalid("cancel is answered by the session")),
        Request::HasApiKey { name } => {
            let (name, _) = check(Subject::Key(name)).await?.into_names();
            if sh.source_index.has_key(&name) {
                return Ok(ReplyData::Json(json!({ "exists": true })));
            }
            match store.send(store::GetKey { name }).await {
                Ok(Ok(key)) => Ok(ReplyData::Json(json!({ "exists": key.is_some() }))),
                _ => Err(internal()),
            }
        }
    }
}

/// True when provider:bucket is served by a command source.
fn is_sourced_token(sh: &Shared, provider: &str, bucket: &str) -> bool {
    !sh.source_index.is_empty() && sh.source_index.has_token(provider, bucket)
}

/// Adds the names `sources` serve to a store list, sorted, without duplicates.
fn merge_names<'a>(all: &mut Vec<String>, sources: impl Iterator<Item = &'a String>) {
    let before = all.len();
    all.extend(sources.cloned());
    if all.len() != before {
        all.sort();
        all.dedup();
    }
}

/// The refusal of a save or removal of a token a command source serves.
fn sourced_write(provider: &str, bucket: &str) -> Rejection {
    Rejection::new(
        ErrorCode::Forbidden,
        format!(
            "{provider}:{bucket} is served from a command on the host (the profile's \
             token_command); it cannot be changed from the sandbox"
        ),
    )
}

/// The value of a command source.
async fn fetch(sh: &Shared, target: SourceTarget, explicit: bool) -> Result<Held, Rejection> {
    let Some(sources) = &sh.sources else {
        return Err(internal());
    };
    let label = target.to_string();
    // A run is bounded by its own timeout; this bounds the wait whatever happens to it.
    let fetch = sources.send(Fetch { target, explicit });
    match tokio::time::timeout(SOURCE_WAIT, fetch).await {
        Err(_) => Err(Rejection::new(
            ErrorCode::RefreshFailed,
            format!("the command on the host that provides {label} did not answer in time"),
        )),
        Ok(Ok(Ok(held))) => Ok(held),
        Ok(Ok(Err(_))) => Err(Rejection::new(
            ErrorCode::RefreshFailed,
            format!(
                "the command on the host that provides {label} failed and no valid value is \
                 left; it is retried in the background (the host's log says why)"
            ),
        )),
        Ok(Err(_)) => Err(internal()),
    }
}

/// The longest a request waits for a command source (its run is bounded by 30 s).
const SOURCE_WAIT: std::time::Duration = std::time::Duration::from_secs(45);

/// `get_token` (or `refresh_token`) of a token a command source serves; counted for
/// stats like a stored one.
async fn sourced_token(
    sh: &Shared,
    provider: String,
    bucket: String,
    explicit: bool,
) -> Result<ReplyData, Rejection> {
    let target = SourceTarget::Token {
        provider: provider.clone(),
        bucket: bucket.clone(),
    };
    match fetch(sh, target, explicit).await? {
        Held::Token(token) => {
            sh.store.do_send(store::CountGet { provider, bucket });
            Ok(ReplyData::Token(token))
        }
        Held::Key(_) => Err(internal()),
    }
}

/// Refreshes `provider:bucket` through the engine (single flight) and answers as
/// PROTOCOL.md §14 says for `reason`.
async fn refresh(
    sh: &Shared,
    provider: String,
    bucket: String,
    reason: Reason,
    read: Option<crate::token::ServedToken>,
) -> Result<ReplyData, Rejection> {
    let key = BucketKey { provider, bucket };
    let output = match sh
        .refresher
        .send(Refresh {
            key: key.clone(),
            reason,
        })
        .await
    {
        Ok(output) => output,
        // The engine is gone (shutdown): the token read stands in, while valid.
        Err(_) => FlowOutput::failed_without_token(FlowError::Failed),
    };
    if output.went_upstream {
        // A read of the store begun before this refresh wrote must not answer a later
        // get_token.
        sh.store.do_send(store::Wrote);
    }
    match output.answer(reason, sh.refresh.clock.now(), read.as_ref()) {
        Ok(Some(token)) => Ok(ReplyData::Token(token)),
        Ok(None) => Err(not_found("token")),
        Err(e) => Err(refresh_rejection(e, &key)),
    }
}

/// The wire answer for a refresh that gave no token. The sentences name the
/// provider:bucket and what to do, never a cause from upstream.
fn refresh_rejection(e: FlowError, key: &BucketKey) -> Rejection {
    match e {
        FlowError::NotAvailable => Rejection::new(
            ErrorCode::RefreshNotAvailable,
            format!(
                "{key} cannot be refreshed on the host: the provider has no token endpoint \
                 configured, the stored token has no refresh token, or refresh is turned off"
            ),
        ),
        FlowError::Reauth => {
            let import = crate::import::Source::ALL
                .into_iter()
                .find(|s| s.provider() == key.provider)
                .map(|s| {
                    format!(
                        "log in with the {0} CLI, then run `credproxy store import {0} --bucket {1}`, or ",
                        s.name(),
                        key.bucket
                    )
                })
                .unwrap_or_default();
            Rejection::new(
                ErrorCode::ReauthRequired,
                format!(
                    "the host's login for {key} has expired or was revoked: log in again on \
                     the host ({import}save a new token with `credproxy store token set {} \
                     --bucket {}`)",
                    key.provider, key.bucket
                ),
            )
        }
        FlowError::Failed => Rejection::new(
            ErrorCode::RefreshFailed,
            format!("refreshing {key} failed; try again later (the host's log says why)"),
        ),
        FlowError::Store => internal(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::token::Token;

    fn requests() -> Vec<Request> {
        let token = || {
            Token::from_value(serde_json::json!({"access_token":"a","expiry":1,"token_type":"B"}))
                .expect("token")
        };
        let (p, b) = (|| "p".to_owned(), || "b".to_owned());
        vec![
            Request::GetToken {
                provider: p(),
                bucket: b(),
            },
            Request::GetBucketStats {
                provider: p(),
                bucket: b(),
            },
            Request::SaveToken {
                provider: p(),
                bucket: b(),
                token: token(),
            },
            Request::RemoveToken {
                provider: p(),
                bucket: b(),
            },
            Request::ListBuckets { provider: p() },
            Request::GetApiKey { name: p() },
            Request::HasApiKey { name: p() },
            Request::ListProviders,
            Request::ListApiKeys,
        ]
    }

    /// The remembered-subject check matches exactly the subject the policy was asked
    /// about: a subject remembered for one request kind never stands in for another
    /// (a read for a write, a provider for a key of the same name).
    #[test]
    fn a_remembered_subject_matches_only_its_own_kind_of_request() {
        for request in requests() {
            let Some(subject) = subject_of(&request) else {
                assert!(matches!(
                    request,
                    Request::ListProviders | Request::ListApiKeys
                ));
                continue;
            };
            for other in requests() {
                let same_subject = subject_of(&other).as_ref() == Some(&subject);
                assert_eq!(
                    is_subject_of(&subject, &other),
                    same_subject,
                    "{subject:?} against {:?}",
                    other.op()
                );
            }
        }
        let read = Subject::Read {
            provider: "p".into(),
            bucket: "other".into(),
        };
        assert!(!is_subject_of(&read, &requests()[0]), "bucket compared");
    }
}
