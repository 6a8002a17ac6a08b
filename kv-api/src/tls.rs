//! TLS as both ends of kvpaxos use it (feature `tls`): loading the PEM
//! files, the rustls configurations, the stream that is TLS or plain TCP,
//! and the names certificates carry.
//!
//! # Identities
//!
//! Every certificate is signed by the cluster's CA (`--tls-ca`, a PEM file
//! that may hold several CA certificates: during a rotation the old and the
//! new one are both trusted). Who a certificate belongs to is read from its
//! DNS subject alternative names, the same field a client checks a server's
//! host name against, so no X.509 parser beyond rustls's own is needed:
//!
//! | SAN | who | what it may do |
//! |---|---|---|
//! | `replica-N` | replica N | speak the peer protocol as N (its messages must say `from: N`) |
//! | `read.role.kvpaxos` | a client | reads and `status` |
//! | `write.role.kvpaxos` | a client | the above, and writes |
//! | `admin.role.kvpaxos` | a client | the above, and fault injection |
//!
//! A replica's certificate also names its hosts (IP or DNS SANs of its
//! client and peer addresses), so that clients verify the replica they
//! dial by its address as any TLS client does; replicas verify each other
//! by `replica-N`. `kv-server certs` writes all of these.
//!
//! Only TLS 1.3 is offered (both ends are ours), with the `ring` provider.

use std::fmt;
use std::io;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

use crate::ReplicaId;

/// The DNS SAN that names replica `id`.
pub fn replica_name(id: ReplicaId) -> String {
    format!("replica-{id}")
}

/// What a client certificate allows, in increasing order: each role may do
/// what the ones before it may.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Role {
    /// Reads and `status`.
    Read,
    /// Reads and writes.
    Write,
    /// Everything, fault injection included.
    Admin,
}

impl Role {
    /// Every role, lowest first.
    pub const ALL: [Role; 3] = [Role::Read, Role::Write, Role::Admin];

    /// The DNS SAN that grants this role.
    pub fn san(self) -> &'static str {
        match self {
            Role::Read => "read.role.kvpaxos",
            Role::Write => "write.role.kvpaxos",
            Role::Admin => "admin.role.kvpaxos",
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Role::Read => "read",
            Role::Write => "write",
            Role::Admin => "admin",
        })
    }
}

/// Whether the end-entity certificate `cert` carries the DNS name `name`.
/// Unparseable certificates carry nothing.
pub fn names(cert: &CertificateDer<'_>, name: &str) -> bool {
    webpki::EndEntityCert::try_from(cert).is_ok_and(|c| carries(&c, name))
}

/// Whether the parsed certificate `cert` carries the DNS name `name`.
fn carries(cert: &webpki::EndEntityCert<'_>, name: &str) -> bool {
    ServerName::try_from(name).is_ok_and(|n| cert.verify_is_valid_for_subject_name(&n).is_ok())
}

/// The highest role `cert` grants, if any.
pub fn role_of(cert: &CertificateDer<'_>) -> Option<Role> {
    let cert = webpki::EndEntityCert::try_from(cert).ok()?;
    Role::ALL
        .into_iter()
        .rev()
        .find(|role| carries(&cert, role.san()))
}

/// Which of `ids` the certificate names (the first, if it names several).
pub fn replica_of(
    cert: &CertificateDer<'_>,
    ids: impl IntoIterator<Item = ReplicaId>,
) -> Option<ReplicaId> {
    let cert = webpki::EndEntityCert::try_from(cert).ok()?;
    ids.into_iter()
        .find(|id| carries(&cert, &replica_name(*id)))
}

/// The name a replica verifies a peer's certificate against when it dials
/// replica `id`.
pub fn replica_server_name(id: ReplicaId) -> ServerName<'static> {
    ServerName::try_from(replica_name(id)).expect("replica-N is a valid DNS name")
}

/// The name a client verifies a server's certificate against when it dials
/// `addr` (`host:port`): the host, as an IP address or a DNS name.
pub fn server_name_of(addr: &str) -> Result<ServerName<'static>, TlsError> {
    let host = match addr.rsplit_once(':') {
        Some((host, _port)) => host,
        None => addr,
    };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    ServerName::try_from(host.to_string()).map_err(|_| TlsError::Name(addr.to_string()))
}

/// The three PEM files of one identity.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TlsFiles {
    /// The CA certificates trusted to sign the other side's certificate.
    pub ca: PathBuf,
    /// This side's certificate (and any intermediates), leaf first.
    pub cert: PathBuf,
    /// This side's private key.
    pub key: PathBuf,
}

/// Why the TLS files could not be used.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A file could not be read or holds no usable PEM item.
    #[error("{path}: {problem}")]
    File {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        problem: String,
    },
    /// rustls refused the combination (a key that does not match the
    /// certificate, a CA it cannot use).
    #[error("TLS set-up: {0}")]
    Config(String),
    /// An address whose host is neither an IP address nor a DNS name.
    #[error("{0}: the host is not a name a certificate can carry")]
    Name(String),
}

fn file_error(path: &Path, problem: impl fmt::Display) -> TlsError {
    TlsError::File {
        path: path.to_path_buf(),
        problem: problem.to_string(),
    }
}

/// One identity, loaded: the CAs it trusts, its certificate chain and key.
/// Cheap to clone.
#[derive(Clone)]
pub struct Tls {
    roots: Arc<RootCertStore>,
    chain: Vec<CertificateDer<'static>>,
    key: Arc<PrivateKeyDer<'static>>,
}

impl fmt::Debug for Tls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Tls")
            .field("cas", &self.roots.len())
            .field("chain", &self.chain.len())
            .finish_non_exhaustive()
    }
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

impl Tls {
    /// Reads and checks the three files; the errors name the file.
    pub fn load(files: &TlsFiles) -> Result<Tls, TlsError> {
        let cas: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&files.ca)
            .map_err(|e| file_error(&files.ca, format!("cannot read CA certificates: {e}")))?
            .collect::<Result<_, _>>()
            .map_err(|e| file_error(&files.ca, format!("cannot read CA certificates: {e}")))?;
        if cas.is_empty() {
            return Err(file_error(&files.ca, "holds no CERTIFICATE"));
        }
        let mut roots = RootCertStore::empty();
        for ca in cas {
            roots
                .add(ca)
                .map_err(|e| file_error(&files.ca, format!("not a usable CA certificate: {e}")))?;
        }
        let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&files.cert)
            .map_err(|e| file_error(&files.cert, format!("cannot read the certificate: {e}")))?
            .collect::<Result<_, _>>()
            .map_err(|e| file_error(&files.cert, format!("cannot read the certificate: {e}")))?;
        if chain.is_empty() {
            return Err(file_error(&files.cert, "holds no CERTIFICATE"));
        }
        let key = PrivateKeyDer::from_pem_file(&files.key)
            .map_err(|e| file_error(&files.key, format!("cannot read the private key: {e}")))?;
        let tls = Tls {
            roots: Arc::new(roots),
            chain,
            key: Arc::new(key),
        };
        // Both configurations check that the key matches the certificate.
        tls.client_config()?;
        Ok(tls)
    }

    /// This identity's certificate (the leaf).
    pub fn cert(&self) -> &CertificateDer<'static> {
        &self.chain[0]
    }

    /// A client configuration: verifies the server against the CAs (and
    /// the name it is dialled by) and presents this identity.
    pub fn client_config(&self) -> Result<Arc<ClientConfig>, TlsError> {
        let config = ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| TlsError::Config(e.to_string()))?
            .with_root_certificates(self.roots.clone())
            .with_client_auth_cert(self.chain.clone(), self.key.clone_key())
            .map_err(|e| TlsError::Config(e.to_string()))?;
        Ok(Arc::new(config))
    }

    /// A server configuration: presents this identity and demands a client
    /// certificate signed by one of the CAs.
    pub fn server_config(&self) -> Result<Arc<ServerConfig>, TlsError> {
        let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
            self.roots.clone(),
            provider(),
        )
        .build()
        .map_err(|e| TlsError::Config(e.to_string()))?;
        let config = ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| TlsError::Config(e.to_string()))?
            .with_client_cert_verifier(verifier)
            .with_single_cert(self.chain.clone(), self.key.clone_key())
            .map_err(|e| TlsError::Config(e.to_string()))?;
        Ok(Arc::new(config))
    }
}

impl Tls {
    /// A server configuration that asks for a client certificate signed by
    /// one of the CAs but also serves clients without one (a certificate
    /// that is presented is still verified): for the admin listener, whose
    /// health probes come from orchestrators that present none, while its
    /// other pages check the certificate's role.
    pub fn server_config_optional_client(&self) -> Result<Arc<ServerConfig>, TlsError> {
        let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
            self.roots.clone(),
            provider(),
        )
        .allow_unauthenticated()
        .build()
        .map_err(|e| TlsError::Config(e.to_string()))?;
        let config = ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| TlsError::Config(e.to_string()))?
            .with_client_cert_verifier(verifier)
            .with_single_cert(self.chain.clone(), self.key.clone_key())
            .map_err(|e| TlsError::Config(e.to_string()))?;
        Ok(Arc::new(config))
    }
}

/// A connection that is plain TCP or TLS over TCP, either side.
#[derive(Debug)]
pub enum Stream {
    /// Plain TCP.
    Plain(TcpStream),
    /// TLS (boxed: the TLS state is large).
    Tls(Box<tokio_rustls::TlsStream<TcpStream>>),
}

impl Stream {
    /// The peer's end-entity certificate, on a TLS connection that has one.
    pub fn peer_cert(&self) -> Option<CertificateDer<'static>> {
        match self {
            Stream::Plain(_) => None,
            Stream::Tls(s) => s.get_ref().1.peer_certificates()?.first().cloned(),
        }
    }

    /// Sets TCP_NODELAY on the underlying socket.
    pub fn set_nodelay(&self, on: bool) -> io::Result<()> {
        match self {
            Stream::Plain(s) => s.set_nodelay(on),
            Stream::Tls(s) => s.get_ref().0.set_nodelay(on),
        }
    }
}

/// Connects a TCP stream `tcp` as a TLS client verifying the server as
/// `name`.
pub async fn connect(
    config: Arc<ClientConfig>,
    name: ServerName<'static>,
    tcp: TcpStream,
) -> io::Result<Stream> {
    let s = tokio_rustls::TlsConnector::from(config)
        .connect(name, tcp)
        .await?;
    Ok(Stream::Tls(Box::new(tokio_rustls::TlsStream::Client(s))))
}

/// Connects to `addr` as a client: TCP with Nagle off (small request and
/// response messages must not wait for delayed ACKs), then TLS if `tls`
/// is given, the server verified against the name given with it.
pub async fn dial(
    addr: &str,
    tls: Option<(Arc<ClientConfig>, ServerName<'static>)>,
) -> io::Result<Stream> {
    let tcp = TcpStream::connect(addr).await?;
    tcp.set_nodelay(true)?;
    match tls {
        None => Ok(Stream::Plain(tcp)),
        Some((config, name)) => connect(config, name, tcp).await,
    }
}

/// Completes the server side of a TLS handshake on `tcp`.
pub async fn accept(config: Arc<ServerConfig>, tcp: TcpStream) -> io::Result<Stream> {
    let s = tokio_rustls::TlsAcceptor::from(config).accept(tcp).await?;
    Ok(Stream::Tls(Box::new(tokio_rustls::TlsStream::Server(s))))
}

impl AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_flush(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Stream::Plain(s) => s.is_write_vectored(),
            Stream::Tls(s) => s.is_write_vectored(),
        }
    }
}
