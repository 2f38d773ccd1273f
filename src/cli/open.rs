//! How every command opens its store: `--store URL` (a directory, `keyring:[SERVICE]` or
//! `etcd://HOST:PORT[,...]/PREFIX`) and the options a shared store needs to be reached
//! (`--store-key`, `--etcd-*`), shared by `serve`, `exec`, `login`, `import` and every
//! `store` command.

use std::path::PathBuf;
use std::sync::Arc;

use clap::Args;

use super::Failure;
use crate::backend::etcd::{EtcdOptions, DEFAULT_LOCK_TTL};
use crate::backend::seal::DataKey;
use crate::backend::url::StoreUrl;
use crate::backend::{Backend, EtcdBackend, FileBackend, KeyringBackend};
use crate::secret::Secret;

/// `--store STORE` and the options to reach it.
#[derive(Args, Debug, Clone)]
pub struct StoreArg {
    /// The store: a directory (DIR or file:DIR), the OS keyring (keyring: or
    /// keyring:SERVICE), or an etcd cluster (etcd://HOST:PORT[,HOST:PORT...]/PREFIX)
    /// [default: the directory $XDG_DATA_HOME/credproxy, else ~/.local/share/credproxy]
    #[arg(long, value_name = "STORE")]
    pub store: Option<PathBuf>,
    /// How to reach a shared store.
    #[command(flatten)]
    pub access: StoreAccess,
}

/// What a shared (etcd) store needs besides its URL: the data key that seals every value
/// before it leaves the host, and the cluster's TLS and authentication. Never a secret on
/// the command line: the password and keys are files.
#[derive(Args, Debug, Clone, Default)]
pub struct StoreAccess {
    /// The data key of an etcd store: a file of exactly 32 random bytes, 0600, owned by
    /// you, or keyring:[SERVICE] for one kept in the OS keyring (make either with
    /// `credproxy store new-key FILE|keyring:`); every host of a fleet uses the same key
    #[arg(long, value_name = "FILE|keyring:")]
    pub store_key: Option<PathBuf>,
    /// etcd over TLS: the CA certificate (PEM) that signed the members' certificates
    #[arg(long, value_name = "FILE")]
    pub etcd_ca: Option<PathBuf>,
    /// etcd client certificate (PEM), with --etcd-key: authenticate by certificate
    #[arg(long, value_name = "FILE", requires = "etcd_key")]
    pub etcd_cert: Option<PathBuf>,
    /// The private key (PEM) of --etcd-cert
    #[arg(long, value_name = "FILE", requires = "etcd_cert")]
    pub etcd_key: Option<PathBuf>,
    /// etcd user name, with --etcd-password-file: authenticate by password
    #[arg(long, value_name = "USER", requires = "etcd_password_file")]
    pub etcd_user: Option<String>,
    /// A file holding the etcd user's password (first line)
    #[arg(long, value_name = "FILE", requires = "etcd_user")]
    pub etcd_password_file: Option<PathBuf>,
    /// The refresh lock's lease TTL on an etcd store (not an option: the longest refresh
    /// plus a margin, see [`DEFAULT_LOCK_TTL`]).
    #[arg(skip)]
    pub lock_ttl: Option<std::time::Duration>,
}

/// Opens the store named by `--store` (the default directory without one), as the host's
/// store commands use it: without a read cache.
pub fn open_store(arg: &StoreArg) -> Result<Arc<dyn Backend>, Failure> {
    open_backend(arg, false)
}

/// Parses `--store` (the default directory without one).
pub fn store_url(arg: &StoreArg) -> Result<StoreUrl, Failure> {
    match &arg.store {
        Some(value) => {
            let text = value.to_str().ok_or_else(|| {
                Failure::usage("--store: the value is not valid UTF-8".to_owned())
            })?;
            text.parse::<StoreUrl>()
                .map_err(|e| Failure::usage(format!("--store: {e}")))
        }
        None => Ok(StoreUrl::File(FileBackend::default_dir().ok_or_else(
            || {
                Failure::new(
                "cannot find a home for the store: set XDG_DATA_HOME or HOME, or pass --store DIR",
            )
            },
        )?)),
    }
}

/// Opens the store named by `--store`; `cached`: the store keeps its read cache (as
/// `serve` and `exec` run it).
pub fn open_backend(arg: &StoreArg, cached: bool) -> Result<Arc<dyn Backend>, Failure> {
    open_url(&store_url(arg)?, &arg.access, cached)
}

/// Opens the store at `url` with `access`; `cached` as in [`open_backend`].
pub fn open_url(
    url: &StoreUrl,
    access: &StoreAccess,
    cached: bool,
) -> Result<Arc<dyn Backend>, Failure> {
    if !matches!(url, StoreUrl::Etcd { .. }) {
        refuse_etcd_options(access)?;
    }
    match url {
        StoreUrl::File(dir) => {
            let backend = FileBackend::open(dir).map_err(|e| {
                Failure::new(format!(
                    "cannot open the store: {e}; check the directory or pass --store DIR"
                ))
            })?;
            Ok(if cached {
                Arc::new(backend.with_read_cache())
            } else {
                Arc::new(backend)
            })
        }
        StoreUrl::Keyring { service } => Ok(Arc::new(
            KeyringBackend::open(Some(service))
                .map_err(|e| Failure::new(format!("cannot open the keyring store: {e}")))?,
        )),
        StoreUrl::Etcd { endpoints, prefix } => {
            let options = etcd_options(endpoints, prefix, access, cached)?;
            Ok(Arc::new(EtcdBackend::open(options).map_err(|e| {
                Failure::new(format!("cannot open the etcd store: {e}"))
            })?))
        }
    }
}

/// Gathers what an etcd store needs: the data key (required), TLS files, the user and
/// the password from its file.
fn etcd_options(
    endpoints: &[String],
    prefix: &str,
    access: &StoreAccess,
    cached: bool,
) -> Result<EtcdOptions, Failure> {
    let key_file = access.store_key.as_ref().ok_or_else(|| {
        Failure::usage(
            "an etcd store needs its data key: --store-key FILE (32 random bytes, 0600; make \
             one with `credproxy store new-key FILE` and give every host the same file)"
                .to_owned(),
        )
    })?;
    let data_key = load_data_key(key_file)?;
    let user = match (&access.etcd_user, &access.etcd_password_file) {
        (Some(user), Some(file)) => Some((user.clone(), read_password(file)?)),
        _ => None,
    };
    Ok(EtcdOptions {
        endpoints: endpoints.to_vec(),
        prefix: prefix.to_owned(),
        data_key,
        ca: access.etcd_ca.clone(),
        client_cert: access.etcd_cert.clone().zip(access.etcd_key.clone()),
        user,
        cached,
        lock_ttl: access.lock_ttl.unwrap_or(DEFAULT_LOCK_TTL),
    })
}

/// `--store-key`: a key file, or `keyring:[SERVICE]` for the data key kept in the OS
/// keyring (`credproxy store new-key keyring:` makes one).
pub fn load_data_key(value: &std::path::Path) -> Result<DataKey, Failure> {
    if let Some(service) = value.to_str().and_then(|v| v.strip_prefix("keyring:")) {
        let service = (!service.is_empty()).then_some(service);
        let keyring = KeyringBackend::open(service)
            .map_err(|e| Failure::new(format!("--store-key {}: {e}", value.display())))?;
        return keyring
            .data_key()
            .map_err(|e| Failure::new(format!("--store-key {}: {e}", value.display())))?
            .ok_or_else(|| {
                Failure::new(format!(
                    "--store-key {}: the keyring holds no data key for service {}; make one \
                     with `credproxy store new-key {}` (or use a key file)",
                    value.display(),
                    keyring.service(),
                    value.display()
                ))
            });
    }
    DataKey::load(value).map_err(|e| Failure::new(e.to_string()))
}

/// The first line of `--etcd-password-file`, which must not be readable by group or
/// others (a password kept in a world-readable file is no longer a secret).
fn read_password(path: &std::path::Path) -> Result<Secret, Failure> {
    use std::os::unix::fs::MetadataExt;
    let shown = path.display();
    let meta = std::fs::metadata(path)
        .map_err(|e| Failure::new(format!("--etcd-password-file {shown}: {e}")))?;
    if meta.mode() & 0o077 != 0 {
        return Err(Failure::new(format!(
            "--etcd-password-file {shown}: readable by group or others; chmod 600 it"
        )));
    }
    let text = std::fs::read_to_string(path)
        .map_err(|e| Failure::new(format!("--etcd-password-file {shown}: {e}")))?;
    let text = zeroize::Zeroizing::new(text);
    let line = text.lines().next().unwrap_or("");
    if line.is_empty() {
        return Err(Failure::new(format!(
            "--etcd-password-file {shown}: the first line (the password) is empty"
        )));
    }
    Ok(Secret::new(line.to_owned()))
}

/// The etcd options mean nothing to a directory or keyring store: say so rather than
/// ignore them (a data key given to a file store would suggest it encrypts).
fn refuse_etcd_options(access: &StoreAccess) -> Result<(), Failure> {
    let given = [
        ("--store-key", access.store_key.is_some()),
        ("--etcd-ca", access.etcd_ca.is_some()),
        ("--etcd-cert", access.etcd_cert.is_some()),
        ("--etcd-key", access.etcd_key.is_some()),
        ("--etcd-user", access.etcd_user.is_some()),
        ("--etcd-password-file", access.etcd_password_file.is_some()),
    ];
    match given.iter().find(|(_, set)| *set) {
        Some((flag, _)) => Err(Failure::usage(format!(
            "{flag} is for an etcd store (--store etcd://...), not this one"
        ))),
        None => Ok(()),
    }
}
