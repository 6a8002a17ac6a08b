//! `kv-server certs`: every certificate a cluster needs, in one command.
//!
//! Writes into `--out DIR`:
//! - `ca.pem`, `ca.key` — a new cluster CA (ECDSA P-256). Every replica
//!   and client trusts `ca.pem`; keep `ca.key` somewhere safe (it signs
//!   identities) — the replicas never need it.
//! - `replica-N.pem`, `replica-N.key` for every replica N of the replica
//!   file: DNS SAN `replica-N` (how peers verify it) and the hosts of its
//!   client and peer addresses (how clients verify it), for both server
//!   and client authentication.
//! - `admin`, `writer`, `reader` `.pem`/`.key` — client identities with
//!   the roles `admin`, `write` and `read` (see `kv_api::tls`).
//!
//! Keys are written 0600, certificates 0644; nothing is overwritten (an
//! existing file is an error, so a CA is never replaced by accident).
//! The names are a contract: the README's secure set-up and the tests use
//! them.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use kv_api::replicas::Replicas;
use kv_api::tls::{replica_name, Role};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};

/// The client identities written, with their roles.
pub const CLIENTS: [(&str, Role); 3] = [
    ("admin", Role::Admin),
    ("writer", Role::Write),
    ("reader", Role::Read),
];

/// What `kv-server certs` was asked for.
pub struct Request {
    /// The replicas to make certificates for.
    pub replicas: Replicas,
    /// Where to write them.
    pub out: PathBuf,
    /// How long the replica and client certificates are valid.
    pub valid_for: Duration,
    /// Shift the validity window this far into the past (tests make
    /// expired certificates with it).
    pub backdate: Duration,
    /// How long the CA is valid.
    pub ca_valid_for: Duration,
}

/// The host part of `host:port` (brackets of an IPv6 address removed).
fn host_of(addr: &str) -> &str {
    let host = addr.rsplit_once(':').map_or(addr, |(h, _)| h);
    host.trim_start_matches('[').trim_end_matches(']')
}

fn window(params: &mut CertificateParams, valid_for: Duration, backdate: Duration) {
    // A day of slack before now for clocks that disagree a little.
    let start = time::OffsetDateTime::now_utc() - backdate - Duration::from_secs(24 * 3600);
    params.not_before = start;
    params.not_after = start + valid_for + Duration::from_secs(24 * 3600);
}

/// Writes `contents` to a new file `dir/name` with `mode`; an existing file
/// is an error.
fn write_new(dir: &Path, name: &str, contents: &str, mode: u32) -> Result<PathBuf> {
    let path = dir.join(name);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&path)
        .with_context(|| {
            format!(
                "cannot create {} (certs never overwrites: move the old files away, or \
                 choose another --out)",
                path.display()
            )
        })?;
    f.write_all(contents.as_bytes())
        .and_then(|()| f.sync_all())
        .with_context(|| format!("cannot write {}", path.display()))?;
    Ok(path)
}

/// Generates and writes everything; returns the files written.
pub fn generate(req: &Request) -> Result<Vec<PathBuf>> {
    std::fs::create_dir_all(&req.out)
        .with_context(|| format!("cannot create {}", req.out.display()))?;
    for (name, _) in CLIENTS {
        if req
            .replicas
            .replicas
            .iter()
            .any(|r| format!("replica-{}", r.id) == name)
        {
            bail!("internal: client name {name} clashes with a replica's");
        }
    }
    let mut written = Vec::new();

    let ca_key = KeyPair::generate().context("generating the CA key")?;
    let mut ca = CertificateParams::new(Vec::<String>::new()).context("CA parameters")?;
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    // A name of its own: TLS finds a certificate's issuer by name, so two
    // CAs named alike would make one's certificates look like forgeries of
    // the other's ("bad signature") instead of strangers' ("unknown
    // issuer"), and a rotation would trust two CAs of one name.
    let ca_name = format!("kvpaxos cluster CA {:016x}", rand::random::<u64>());
    ca.distinguished_name.push(DnType::CommonName, ca_name);
    ca.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    window(&mut ca, req.ca_valid_for, req.backdate);
    let ca_cert = ca.self_signed(&ca_key).context("signing the CA")?;
    written.push(write_new(&req.out, "ca.pem", &ca_cert.pem(), 0o644)?);
    written.push(write_new(
        &req.out,
        "ca.key",
        &ca_key.serialize_pem(),
        0o600,
    )?);
    let issuer = Issuer::from_params(&ca, &ca_key);

    let mut leaf = |file: &str, common_name: &str, sans: Vec<String>, server: bool| -> Result<()> {
        let key = KeyPair::generate().context("generating a key")?;
        let mut p = CertificateParams::new(sans)
            .with_context(|| format!("{file}: a name is not a valid DNS name or IP address"))?;
        p.distinguished_name.push(DnType::CommonName, common_name);
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        p.extended_key_usages = if server {
            vec![
                ExtendedKeyUsagePurpose::ServerAuth,
                ExtendedKeyUsagePurpose::ClientAuth,
            ]
        } else {
            vec![ExtendedKeyUsagePurpose::ClientAuth]
        };
        p.use_authority_key_identifier_extension = true;
        window(&mut p, req.valid_for, req.backdate);
        let cert = p
            .signed_by(&key, &issuer)
            .with_context(|| format!("signing {file}"))?;
        written.push(write_new(
            &req.out,
            &format!("{file}.pem"),
            &cert.pem(),
            0o644,
        )?);
        written.push(write_new(
            &req.out,
            &format!("{file}.key"),
            &key.serialize_pem(),
            0o600,
        )?);
        Ok(())
    };

    for r in &req.replicas.replicas {
        let name = replica_name(r.id);
        let mut sans = vec![name.clone()];
        for host in [host_of(&r.client_addr), host_of(&r.peer_addr)] {
            if !sans.iter().any(|s| s == host) {
                sans.push(host.to_string());
            }
        }
        leaf(&name, &format!("kvpaxos {name}"), sans, true)?;
    }
    for (name, role) in CLIENTS {
        leaf(
            name,
            &format!("kvpaxos {name}"),
            vec![role.san().to_string()],
            false,
        )?;
    }
    Ok(written)
}

#[cfg(test)]
mod tests {
    use super::*;
    use kv_api::tls::{Tls, TlsFiles};

    fn replicas(dir: &Path) -> Replicas {
        let f = dir.join("replica");
        std::fs::write(
            &f,
            "1 127.0.0.1:7001 127.0.0.1:7101\n2 db2.example:7002 10.0.0.2:7102\n",
        )
        .unwrap();
        Replicas::load(&f).unwrap()
    }

    #[test]
    fn writes_every_identity_with_its_names_and_roles_and_never_overwrites() {
        let dir = std::env::temp_dir().join(format!("kv-certs-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let req = Request {
            replicas: replicas(&dir),
            out: dir.join("tls"),
            valid_for: Duration::from_secs(3600),
            backdate: Duration::ZERO,
            ca_valid_for: Duration::from_secs(7200),
        };
        let written = generate(&req).unwrap();
        assert_eq!(written.len(), 2 + 2 * 2 + 3 * 2);
        let load = |name: &str| {
            Tls::load(&TlsFiles {
                ca: req.out.join("ca.pem"),
                cert: req.out.join(format!("{name}.pem")),
                key: req.out.join(format!("{name}.key")),
            })
            .unwrap()
        };
        let r2 = load("replica-2");
        assert!(kv_api::tls::names(r2.cert(), "replica-2"));
        assert!(!kv_api::tls::names(r2.cert(), "replica-1"));
        assert!(kv_api::tls::names(r2.cert(), "db2.example"));
        assert_eq!(kv_api::tls::replica_of(r2.cert(), [1, 2]), Some(2));
        assert_eq!(kv_api::tls::role_of(r2.cert()), None);
        let ip = kv_api::tls::server_name_of("10.0.0.2:7102").unwrap();
        let cert = webpki::EndEntityCert::try_from(r2.cert()).unwrap();
        assert!(cert.verify_is_valid_for_subject_name(&ip).is_ok());
        for (name, role) in CLIENTS {
            let c = load(name);
            assert_eq!(kv_api::tls::role_of(c.cert()), Some(role), "{name}");
            assert_eq!(kv_api::tls::replica_of(c.cert(), [1, 2]), None);
        }
        use std::os::unix::fs::PermissionsExt;
        let mode = |f: &str| {
            std::fs::metadata(req.out.join(f))
                .unwrap()
                .permissions()
                .mode()
                & 0o777
        };
        assert_eq!(mode("ca.key"), 0o600);
        assert_eq!(mode("replica-1.key"), 0o600);
        assert_eq!(mode("ca.pem"), 0o644);
        let again = generate(&req).unwrap_err();
        assert!(
            format!("{again:#}").contains("never overwrites"),
            "{again:#}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
