//! credproxy: a credential proxy for sandboxed processes.
//!
//! A host program (an AI coding agent's runtime, a sandbox launcher) starts the proxy with
//! [`Supervisor::start`] before it spawns the sandbox. The proxy listens on a private Unix
//! socket and answers typed requests from inside the sandbox (`get_token`,
//! `get_api_key`, ...) over protocol v1 (PROTOCOL.md), compatible with the llxprt-code v1
//! sandbox client. It strips every refresh token, enforces the loaded profile,
//! rate-limits each connection and cleans everything up on shutdown.
//!
//! The server is an actix actor system:
//! - [`Supervisor`] owns the socket (directory, bind 0600, stale sweep, accept, peer check,
//!   session registry) and runs the shutdown sequence;
//! - [`session::Session`], one per connection, owns framing, handshake, deadlines, the
//!   rate limiter, the in-flight bound, request checks and dispatch;
//! - [`store::CredentialStore`] owns the [`backend`] (memory or file), sanitize and merge,
//!   per provider:bucket ordering and the `get_token` counters;
//! - [`policy::ScopePolicy`] holds the [`policy::Profile`] and answers scope decisions;
//! - [`refresh::Refresher`] keeps OAuth tokens fresh on the host (PROTOCOL.md §14): single
//!   flight per provider:bucket, renewal timers, the store's per-bucket refresh lock, with
//!   the HTTP side in [`oauth`]. [`Config::refresh`] sets it up (token endpoints, margins,
//!   an injected clock).
//!
//! They talk only through typed messages, each defined next to the actor that handles it.
//! The inside-the-sandbox side is [`client::Client`].
//!
//! Every process that holds secrets hardens itself first, as ssh-agent does ([`harden`]:
//! not dumpable, so no process of the same uid can `ptrace` it or read its memory through
//! `/proc`, and no core files), and keeps long-lived secrets on pages of their own that
//! are left out of core dumps and locked against swap ([`memory::LockedBytes`]).
//! [`Supervisor::start`] does so for a host program unless
//! [`Config::harden_process`] is turned off.
// Audited exceptions: `memory` (malloc_trim; the pages of `memory::LockedBytes`),
// `harden` (a pre_exec hook; PT_DENY_ATTACH on macOS) and `handover` (owning an inherited
// descriptor; a pre_exec dup2). tests/unsafe_code.rs pins them.
#![deny(unsafe_code)]
#![deny(missing_docs)]

pub mod backend;
pub mod capability;
pub mod cli;
pub mod client;
pub mod codec;
pub mod config;
pub mod envelope;
pub mod error;
pub mod handover;
pub mod harden;
pub mod import;
pub mod memory;
pub mod names;
pub mod oauth;
pub mod outbox;
pub mod policy;
pub mod profile;
pub mod protocol;
pub mod rate_limit;
pub mod refresh;
pub mod secret;
pub mod secret_json;
pub mod session;
pub mod socket;
pub mod source;
pub mod store;
pub mod supervisor;
pub mod token;
pub mod trust;

pub use config::{Config, Limits};
pub use error::{Error, Result};
pub use supervisor::{ServerHandle, Shutdown, ShutdownReport, Supervisor};
