//! Store URLs: which backend a `--store` value names.
//!
//! | value | store |
//! |---|---|
//! | `DIR`, `file:DIR` | the file store in `DIR` (the default kind) |
//! | `keyring:`, `keyring:SERVICE` | the OS keyring (Secret Service, Keychain) under the service name (default `credproxy`) |
//! | `etcd://HOST:PORT[,HOST:PORT...]/PREFIX` | an etcd cluster, keys under `PREFIX/` |
//!
//! A value with `://` and another scheme, or an etcd URL with credentials in it
//! (`user:password@`), is refused with a sentence saying what to write instead: a
//! password never goes on a command line.

use std::fmt;
use std::path::PathBuf;

/// The service name of keyring items when none is given.
pub const DEFAULT_KEYRING_SERVICE: &str = "credproxy";

/// Which store a `--store` value names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreUrl {
    /// The file store in this directory.
    File(PathBuf),
    /// The OS keyring, items under this service name.
    Keyring {
        /// The service name (1 to 64 of `A-Z a-z 0-9 . _ -`).
        service: String,
    },
    /// An etcd cluster.
    Etcd {
        /// `host:port` of each member, as given (IPv6 hosts in brackets).
        endpoints: Vec<String>,
        /// The key prefix, without leading or trailing `/`.
        prefix: String,
    },
}

/// Why a `--store` value is not a store URL. The text is for a person and never holds a
/// password.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct UrlError(String);

fn err(message: impl Into<String>) -> UrlError {
    UrlError(message.into())
}

fn is_service_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

fn check_endpoint(e: &str) -> Result<(), UrlError> {
    let (host, port) = if let Some(rest) = e.strip_prefix('[') {
        let (host, rest) = rest
            .split_once(']')
            .ok_or_else(|| err(format!("etcd member {e:?}: an IPv6 address ends with ]")))?;
        let port = rest.strip_prefix(':').ok_or_else(|| {
            err(format!(
                "etcd member {e:?}: write HOST:PORT, for example [::1]:2379"
            ))
        })?;
        (host, port)
    } else {
        e.rsplit_once(':').ok_or_else(|| {
            err(format!(
                "etcd member {e:?}: write HOST:PORT, for example 127.0.0.1:2379"
            ))
        })?
    };
    let host_ok = !host.is_empty()
        && host
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b':'));
    if !host_ok {
        return Err(err(format!(
            "etcd member {e:?}: not a host name or address"
        )));
    }
    match port.parse::<u16>() {
        Ok(p) if p > 0 => Ok(()),
        _ => Err(err(format!(
            "etcd member {e:?}: the port is a number from 1 to 65535"
        ))),
    }
}

impl std::str::FromStr for StoreUrl {
    type Err = UrlError;

    fn from_str(value: &str) -> Result<StoreUrl, UrlError> {
        if value.is_empty() {
            return Err(err(
                "the store is empty: pass a directory, keyring: or etcd://...",
            ));
        }
        if let Some(rest) = value.strip_prefix("etcd://") {
            let (hosts, prefix) = rest.split_once('/').ok_or_else(|| {
                err("an etcd store needs a key prefix: etcd://HOST:PORT[,HOST:PORT...]/PREFIX")
            })?;
            if hosts.contains('@') {
                return Err(err(
                    "an etcd store URL never carries credentials: give the user with \
                     --etcd-user and the password in a file with --etcd-password-file",
                ));
            }
            let endpoints: Vec<String> = hosts.split(',').map(str::to_owned).collect();
            if endpoints.iter().any(String::is_empty) {
                return Err(err(
                    "an etcd store needs at least one HOST:PORT, comma-separated",
                ));
            }
            for e in &endpoints {
                check_endpoint(e)?;
            }
            let prefix = prefix.trim_matches('/');
            let prefix_ok = !prefix.is_empty()
                && prefix.len() <= 128
                && prefix.split('/').all(|part| {
                    !part.is_empty()
                        && part != "."
                        && part != ".."
                        && part
                            .bytes()
                            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
                });
            if !prefix_ok {
                return Err(err(
                    "the etcd key prefix is 1 to 128 characters of A-Z a-z 0-9 . _ - in \
                     parts separated by /",
                ));
            }
            return Ok(StoreUrl::Etcd {
                endpoints,
                prefix: prefix.to_owned(),
            });
        }
        if let Some(service) = value.strip_prefix("keyring:") {
            let service = if service.is_empty() {
                DEFAULT_KEYRING_SERVICE
            } else {
                service
            };
            if !is_service_name(service) {
                return Err(err(
                    "a keyring service name is 1 to 64 characters of A-Z a-z 0-9 . _ -",
                ));
            }
            return Ok(StoreUrl::Keyring {
                service: service.to_owned(),
            });
        }
        if let Some(dir) = value.strip_prefix("file:") {
            if dir.is_empty() {
                return Err(err("file: needs a directory: file:DIR"));
            }
            return Ok(StoreUrl::File(PathBuf::from(dir)));
        }
        if let Some((scheme, _)) = value.split_once("://") {
            return Err(err(format!(
                "unknown store kind {scheme:?}: use a directory (or file:DIR), keyring: or \
                 etcd://HOST:PORT/PREFIX"
            )));
        }
        Ok(StoreUrl::File(PathBuf::from(value)))
    }
}

impl fmt::Display for StoreUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StoreUrl::File(dir) => write!(f, "file:{}", dir.display()),
            StoreUrl::Keyring { service } => write!(f, "keyring:{service}"),
            StoreUrl::Etcd { endpoints, prefix } => {
                write!(f, "etcd://{}/{prefix}", endpoints.join(","))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Result<StoreUrl, UrlError> {
        s.parse()
    }

    #[test]
    fn kinds() {
        assert_eq!(parse("/srv/store"), Ok(StoreUrl::File("/srv/store".into())));
        assert_eq!(parse("rel/dir:x"), Ok(StoreUrl::File("rel/dir:x".into())));
        assert_eq!(parse("file:/a"), Ok(StoreUrl::File("/a".into())));
        assert_eq!(
            parse("keyring:"),
            Ok(StoreUrl::Keyring {
                service: "credproxy".into()
            })
        );
        assert_eq!(
            parse("keyring:team.ci"),
            Ok(StoreUrl::Keyring {
                service: "team.ci".into()
            })
        );
        assert_eq!(
            parse("etcd://127.0.0.1:2379,[::1]:2380,etcd-2.internal:2379/fleet/creds/"),
            Ok(StoreUrl::Etcd {
                endpoints: vec![
                    "127.0.0.1:2379".into(),
                    "[::1]:2380".into(),
                    "etcd-2.internal:2379".into()
                ],
                prefix: "fleet/creds".into()
            })
        );
        let url = parse("etcd://h:1/p").expect("url");
        assert_eq!(url.to_string(), "etcd://h:1/p");
        assert_eq!(parse(&url.to_string()), Ok(url));
    }

    #[test]
    fn refusals_say_what_to_write_and_never_echo_a_password() {
        for bad in [
            "",
            "file:",
            "keyring:bad name",
            "keyring:a/b",
            "etcd://h:1",
            "etcd://h:1/",
            "etcd:///p",
            "etcd://h/p",
            "etcd://h:0/p",
            "etcd://h:99999/p",
            "etcd://h:1,/p",
            "etcd://[::1/p",
            "etcd://h:1/../x",
            "etcd://h:1/a//b",
            "s3://bucket/x",
        ] {
            let e = parse(bad).expect_err(bad);
            assert!(!e.to_string().is_empty(), "{bad}");
        }
        let e = parse("etcd://root:hunter2@h:1/p").expect_err("credentials");
        assert!(!e.to_string().contains("hunter2"), "{e}");
        assert!(e.to_string().contains("--etcd-password-file"), "{e}");
    }
}
