//! Configuration from a replica file or the environment:
//! [`Client::from_replica_file`], [`Client::from_env`] and
//! [`ClientBuilder::from_env`].

use std::ffi::OsString;
use std::path::{Path, PathBuf};

use kv_api::replicas::Replicas;
use kv_api::tls::TlsFiles;

use crate::client::{Client, ClientBuilder};
use crate::error::{Error, Result};

/// The environment variable naming the replicas: a replica file, or a
/// comma-separated list of `host:port` client addresses.
pub const ENV_REPLICAS: &str = "KV_REPLICAS";
/// The environment variable naming the CA certificates (PEM) to trust; with
/// [`ENV_TLS_CERT`] and [`ENV_TLS_KEY`] the client speaks TLS.
pub const ENV_TLS_CA: &str = "KV_TLS_CA";
/// The environment variable naming this client's certificate (PEM).
pub const ENV_TLS_CERT: &str = "KV_TLS_CERT";
/// The environment variable naming this client's private key (PEM).
pub const ENV_TLS_KEY: &str = "KV_TLS_KEY";

/// Loads a replica file, as an SDK error that names the file.
pub(crate) fn load_replicas(path: &Path) -> Result<Replicas> {
    Ok(Replicas::load(path)?)
}

impl Client {
    /// A client for every replica of a replica file (one `ID CLIENT_ADDR
    /// PEER_ADDR` a line), with the defaults: 5 s budget per operation, no
    /// TLS. The common case in one line:
    ///
    /// ```no_run
    /// # fn demo() -> Result<(), kv_client::Error> {
    /// let client = kv_client::Client::from_replica_file("replica")?;
    /// # Ok(()) }
    /// ```
    ///
    /// Does not connect (that happens on first use). A file that cannot be
    /// read or is malformed gives [`Error::InvalidArgument`], whose message
    /// names the file (and the line). For other settings, use
    /// [`Client::builder`] with [`Replicas::load`](crate::Replicas::load).
    pub fn from_replica_file(path: impl AsRef<Path>) -> Result<Client> {
        Client::builder()
            .replicas(load_replicas(path.as_ref())?)
            .build()
    }

    /// A client configured from the environment, with the defaults for
    /// everything else: see [`ClientBuilder::from_env`].
    pub fn from_env() -> Result<Client> {
        ClientBuilder::from_env()?.build()
    }
}

impl ClientBuilder {
    /// A builder configured from the environment, to which more settings
    /// (a timeout, say) may be added before [`ClientBuilder::build`]:
    ///
    /// - `KV_REPLICAS` (required): a replica file, if a file by that name
    ///   exists; otherwise a comma-separated list of `host:port` client
    ///   addresses (`127.0.0.1:7001,127.0.0.1:7002`; spaces around the
    ///   commas are ignored).
    /// - `KV_TLS_CA`, `KV_TLS_CERT`, `KV_TLS_KEY` (all three or none): the
    ///   PEM files of [`ClientBuilder::tls`]; without them the client
    ///   speaks plain TCP. They are read by [`ClientBuilder::build`].
    ///
    /// An empty variable counts as unset. Fails with
    /// [`Error::InvalidArgument`], naming the variable, if `KV_REPLICAS` is
    /// unset, names a replica file that is malformed, or is neither a file
    /// nor a list of addresses, or if only some of the TLS variables are
    /// set.
    pub fn from_env() -> Result<ClientBuilder> {
        from_lookup(|name| std::env::var_os(name))
    }
}

/// [`ClientBuilder::from_env`] with the variables read through `var`.
pub(crate) fn from_lookup(var: impl Fn(&str) -> Option<OsString>) -> Result<ClientBuilder> {
    let var = |name: &str| var(name).filter(|v| !v.is_empty());
    let Some(replicas) = var(ENV_REPLICAS) else {
        return Err(Error::InvalidArgument(format!(
            "{ENV_REPLICAS} is not set: name a replica file or list the replicas' \
             host:port addresses, comma separated"
        )));
    };
    let mut builder = Client::builder();
    let path = Path::new(&replicas);
    builder = if path.is_file() {
        let r = load_replicas(path)
            .map_err(|e| Error::InvalidArgument(format!("{ENV_REPLICAS}: {}", bare(e))))?;
        builder.replicas(r)
    } else {
        builder.addrs(addresses(&replicas)?)
    };
    let tls = [ENV_TLS_CA, ENV_TLS_CERT, ENV_TLS_KEY].map(|name| var(name).map(PathBuf::from));
    builder = match tls {
        [Some(ca), Some(cert), Some(key)] => builder.tls(TlsFiles { ca, cert, key }),
        [None, None, None] => builder,
        partial => {
            let missing: Vec<&str> = [ENV_TLS_CA, ENV_TLS_CERT, ENV_TLS_KEY]
                .into_iter()
                .zip(&partial)
                .filter(|(_, v)| v.is_none())
                .map(|(name, _)| name)
                .collect();
            return Err(Error::InvalidArgument(format!(
                "TLS needs {ENV_TLS_CA}, {ENV_TLS_CERT} and {ENV_TLS_KEY} together; \
                 {} not set",
                missing.join(" and ")
            )));
        }
    };
    Ok(builder)
}

/// The message of an [`Error::InvalidArgument`], without its prefix.
fn bare(e: Error) -> String {
    match e {
        Error::InvalidArgument(m) => m,
        other => other.to_string(),
    }
}

/// `KV_REPLICAS` as a list of `host:port` addresses.
fn addresses(value: &std::ffi::OsStr) -> Result<Vec<String>> {
    let refuse = |why: String| {
        Error::InvalidArgument(format!(
            "{ENV_REPLICAS}={}: {why} (it must name an existing replica file or list \
             host:port addresses, comma separated)",
            value.to_string_lossy()
        ))
    };
    let text = value.to_str().ok_or_else(|| refuse("not UTF-8".into()))?;
    let mut addrs = Vec::new();
    for item in text.split(',').map(str::trim).filter(|a| !a.is_empty()) {
        let ok = item
            .rsplit_once(':')
            .is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok());
        if !ok {
            return Err(refuse(format!(
                "no such file, and {item:?} is not a host:port address"
            )));
        }
        addrs.push(item.to_string());
    }
    if addrs.is_empty() {
        return Err(refuse("no address in it".into()));
    }
    Ok(addrs)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    /// `from_lookup` over a fixed set of variables.
    fn env(vars: &[(&str, &str)]) -> Result<ClientBuilder> {
        let vars: HashMap<String, OsString> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), OsString::from(v)))
            .collect();
        from_lookup(|name| vars.get(name).cloned())
    }

    fn addrs_of(b: Result<ClientBuilder>) -> Vec<String> {
        b.expect("configured")
            .build()
            .expect("built")
            .addrs()
            .to_vec()
    }

    fn message(r: Result<impl std::fmt::Debug>) -> String {
        match r {
            Err(Error::InvalidArgument(m)) => m,
            other => panic!("expected InvalidArgument, got {other:?}"),
        }
    }

    /// A fresh temporary directory for one test.
    fn scratch(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!(
            "kv-client-config-{name}-{}-{:?}",
            std::process::id(),
            std::time::SystemTime::now()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn from_replica_file_names_a_missing_file() {
        let path = scratch("missing").join("no-such-replica-file");
        let m = message(Client::from_replica_file(&path));
        assert!(m.contains(&path.display().to_string()), "{m}");
        assert!(m.contains("cannot read the replica file"), "{m}");
    }

    #[test]
    fn from_replica_file_names_the_bad_line() {
        let path = scratch("bad").join("replica");
        std::fs::write(&path, "1 h:1 h:2\n2 nonsense\n").unwrap();
        let m = message(Client::from_replica_file(&path));
        assert!(m.contains(&format!("{}:2", path.display())), "{m}");
    }

    #[test]
    fn from_replica_file_takes_every_client_address_in_file_order() {
        let path = scratch("good").join("replica");
        std::fs::write(&path, "# ids\n2 h:12 h:22\n1 h:11 h:21\n").unwrap();
        let c = Client::from_replica_file(&path).unwrap();
        assert_eq!(c.addrs(), ["h:12", "h:11"]);
    }

    #[test]
    fn kv_replicas_may_list_addresses() {
        assert_eq!(
            addrs_of(env(&[(ENV_REPLICAS, "127.0.0.1:7001, [::1]:7002,h:7003,")])),
            ["127.0.0.1:7001", "[::1]:7002", "h:7003"]
        );
        assert_eq!(addrs_of(env(&[(ENV_REPLICAS, "h:1")])), ["h:1"]);
    }

    #[test]
    fn kv_replicas_may_name_a_replica_file() {
        let path = scratch("env-file").join("replica");
        std::fs::write(&path, "1 h:11 h:21\n2 h:12 h:22\n").unwrap();
        let value = path.to_str().unwrap();
        assert_eq!(addrs_of(env(&[(ENV_REPLICAS, value)])), ["h:11", "h:12"]);
        std::fs::write(&path, "1 h:11\n").unwrap();
        let m = message(env(&[(ENV_REPLICAS, value)]));
        assert!(m.starts_with(&format!("{ENV_REPLICAS}: {value}:1")), "{m}");
    }

    #[test]
    fn kv_replicas_unset_empty_or_neither_is_refused_by_name() {
        for vars in [&[][..], &[(ENV_REPLICAS, "")][..]] {
            let m = message(env(vars));
            assert!(m.starts_with("KV_REPLICAS is not set"), "{m}");
        }
        for bad in ["no-such-file", "h:1,h", "h:port", ":7001", " , "] {
            let m = message(env(&[(ENV_REPLICAS, bad)]));
            assert!(m.starts_with(&format!("KV_REPLICAS={bad}: ")), "{m}");
        }
        let m = message(env(&[(ENV_REPLICAS, "replica-typo")]));
        assert!(m.contains("no such file"), "{m}");
    }

    #[test]
    fn tls_variables_go_together() {
        let b = env(&[
            (ENV_REPLICAS, "h:1"),
            (ENV_TLS_CA, "ca.pem"),
            (ENV_TLS_CERT, "c.pem"),
            (ENV_TLS_KEY, "c.key"),
        ])
        .unwrap();
        // The files are read by build(): these do not exist, and the
        // message names the first one read.
        let m = message(b.build());
        assert!(m.contains("ca.pem"), "{m}");

        let m = message(env(&[(ENV_REPLICAS, "h:1"), (ENV_TLS_CERT, "c.pem")]));
        assert!(m.contains("KV_TLS_CA and KV_TLS_KEY not set"), "{m}");
        // Without any, plain TCP.
        assert_eq!(addrs_of(env(&[(ENV_REPLICAS, "h:1")])), ["h:1"]);
    }
}
