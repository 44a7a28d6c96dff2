//! TLS for both chat transports, on rustls with the `ring` provider.
//!
//! A server loads its certificate chain and key from PEM files into a
//! [`ServerTls`]; each transport makes an acceptor from it with its own
//! ALPN name ([`ALPN_SOCKET`], [`ALPN_GRPC`]). [`ServerTls::reload`] reads
//! the files again and swaps the new pair in for the next handshakes, so a
//! renewed certificate is picked up without a restart and without
//! disturbing connections already open; a pair that fails to load leaves
//! the old one serving.
//!
//! A client trusts either the system's roots or the CA certificates of a
//! PEM file ([`ClientTls`]), and checks the server's name: the host of the
//! address it dials, unless [`ClientTls::server_name`] says otherwise.
//!
//! Only TLS 1.3 and 1.2 with rustls' safe defaults are offered; session
//! tickets are on, so a reconnecting client skips the full handshake.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use rustls::crypto::CryptoProvider;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;

pub use tokio_rustls::{TlsAcceptor, TlsConnector, client, server};

/// The ALPN protocol name of the socket transport over TLS. The socket
/// protocol negotiates its own versions in its hello, so the name carries
/// none.
pub const ALPN_SOCKET: &[u8] = b"chat";

/// The ALPN protocol name of gRPC over TLS (HTTP/2), which gRPC clients
/// require the server to choose.
pub const ALPN_GRPC: &[u8] = b"h2";

/// Why TLS could not be set up. Never carries key material.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A file could not be read or parsed as PEM.
    #[error("cannot read {}: {reason}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// What went wrong.
        reason: String,
    },
    /// A certificate file held no certificate.
    #[error("{} holds no PEM certificate", path.display())]
    NoCertificate {
        /// The file.
        path: PathBuf,
    },
    /// A key file held no private key.
    #[error("{} holds no PEM private key (PKCS#8, PKCS#1 or SEC1)", path.display())]
    NoKey {
        /// The file.
        path: PathBuf,
    },
    /// The key does not belong to the certificate, or is of a kind rustls
    /// cannot sign with.
    #[error("the key in {} cannot serve the certificate in {}: {reason}", key.display(), cert.display())]
    KeyMismatch {
        /// The certificate file.
        cert: PathBuf,
        /// The key file.
        key: PathBuf,
        /// What rustls said.
        reason: String,
    },
    /// No root certificate could be trusted.
    #[error("no trusted root certificates: {0}")]
    NoRoots(String),
    /// The name to check the server's certificate against is not a DNS
    /// name or IP address.
    #[error("{0:?} is not a valid server name for TLS")]
    ServerName(String),
    /// rustls refused the configuration.
    #[error("TLS configuration: {0}")]
    Config(#[from] rustls::Error),
}

impl TlsError {
    /// A stable, machine-readable name for the kind of failure.
    pub fn code(&self) -> &'static str {
        match self {
            Self::Read { .. } => "tls_read",
            Self::NoCertificate { .. } => "tls_no_certificate",
            Self::NoKey { .. } => "tls_no_key",
            Self::KeyMismatch { .. } => "tls_key_mismatch",
            Self::NoRoots(_) => "tls_no_roots",
            Self::ServerName(_) => "tls_server_name",
            Self::Config(_) => "tls_config",
        }
    }
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn read_error(path: &Path, err: impl std::fmt::Display) -> TlsError {
    TlsError::Read {
        path: path.to_owned(),
        reason: err.to_string(),
    }
}

/// A server's certificate and key, shared by every acceptor made from it
/// and replaced in place by [`ServerTls::reload`].
#[derive(Clone)]
pub struct ServerTls {
    keys: Arc<Keys>,
}

impl std::fmt::Debug for ServerTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerTls")
            .field("cert", &self.keys.cert)
            .field("key", &self.keys.key)
            .finish_non_exhaustive()
    }
}

/// The files and the pair loaded from them last.
struct Keys {
    cert: PathBuf,
    key: PathBuf,
    provider: Arc<CryptoProvider>,
    current: RwLock<Arc<CertifiedKey>>,
}

impl std::fmt::Debug for Keys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Keys").field("cert", &self.cert).finish()
    }
}

impl ResolvesServerCert for Keys {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        // A poisoned lock still holds a complete pair: it is only ever
        // replaced whole.
        let current = self.current.read().unwrap_or_else(|p| p.into_inner());
        Some(Arc::clone(&current))
    }
}

impl ServerTls {
    /// Loads the certificate chain (leaf first) from `cert` and the private
    /// key from `key`, both PEM, and checks that they belong together.
    pub fn load(cert: impl Into<PathBuf>, key: impl Into<PathBuf>) -> Result<Self, TlsError> {
        let cert = cert.into();
        let key = key.into();
        let provider = provider();
        let pair = load_pair(&cert, &key, &provider)?;
        Ok(Self {
            keys: Arc::new(Keys {
                cert,
                key,
                provider,
                current: RwLock::new(Arc::new(pair)),
            }),
        })
    }

    /// Reads the files again and serves the new pair from the next
    /// handshake on. On error the pair in use stays.
    pub fn reload(&self) -> Result<(), TlsError> {
        let pair = load_pair(&self.keys.cert, &self.keys.key, &self.keys.provider)?;
        *self.keys.current.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(pair);
        Ok(())
    }

    /// The certificate file.
    pub fn cert_path(&self) -> &Path {
        &self.keys.cert
    }

    /// An acceptor that offers `alpn` (and accepts clients that ask for no
    /// protocol), with this certificate.
    pub fn acceptor(&self, alpn: &[u8]) -> Result<Acceptor, TlsError> {
        let mut config = ServerConfig::builder_with_provider(Arc::clone(&self.keys.provider))
            .with_safe_default_protocol_versions()?
            .with_no_client_auth()
            .with_cert_resolver(Arc::clone(&self.keys) as Arc<dyn ResolvesServerCert>);
        config.alpn_protocols = vec![alpn.to_vec()];
        config.ticketer = rustls::crypto::ring::Ticketer::new()?;
        Ok(Acceptor {
            inner: TlsAcceptor::from(Arc::new(config)),
            cert: self.keys.cert.clone(),
        })
    }
}

/// Accepts TLS connections for one transport: made by
/// [`ServerTls::acceptor`], cheap to clone, and serving whatever pair its
/// [`ServerTls`] holds at each handshake.
#[derive(Clone)]
pub struct Acceptor {
    inner: TlsAcceptor,
    cert: PathBuf,
}

impl std::fmt::Debug for Acceptor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Acceptor")
            .field("cert", &self.cert)
            .field("alpn", &self.inner.config().alpn_protocols)
            .finish_non_exhaustive()
    }
}

impl Acceptor {
    /// Runs the server side of the TLS handshake on `stream`.
    pub async fn accept<S: AsyncRead + AsyncWrite + Unpin>(
        &self,
        stream: S,
    ) -> io::Result<server::TlsStream<S>> {
        self.inner.accept(stream).await
    }
}

fn load_pair(cert: &Path, key: &Path, provider: &CryptoProvider) -> Result<CertifiedKey, TlsError> {
    let chain = CertificateDer::pem_file_iter(cert)
        .map_err(|e| read_error(cert, e))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| read_error(cert, e))?;
    if chain.is_empty() {
        return Err(TlsError::NoCertificate {
            path: cert.to_owned(),
        });
    }
    let private = match PrivateKeyDer::from_pem_file(key) {
        Ok(private) => private,
        Err(rustls_pki_types::pem::Error::NoItemsFound) => {
            return Err(TlsError::NoKey {
                path: key.to_owned(),
            });
        }
        Err(err) => return Err(read_error(key, err)),
    };
    let mismatch = |err: rustls::Error| TlsError::KeyMismatch {
        cert: cert.to_owned(),
        key: key.to_owned(),
        reason: err.to_string(),
    };
    let signing = provider
        .key_provider
        .load_private_key(private)
        .map_err(mismatch)?;
    let pair = CertifiedKey::new(chain, signing);
    pair.keys_match().map_err(mismatch)?;
    Ok(pair)
}

/// What a client trusts, and the name it expects the server's certificate
/// to carry.
#[derive(Clone)]
pub struct ClientTls {
    config: Arc<ClientConfig>,
    server_name: Option<ServerName<'static>>,
}

impl std::fmt::Debug for ClientTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientTls")
            .field("server_name", &self.server_name)
            .field("alpn", &self.config.alpn_protocols)
            .finish_non_exhaustive()
    }
}

impl ClientTls {
    /// Trusts the CA certificates in the PEM file at `path` (and nothing
    /// else).
    pub fn with_ca_file(path: impl AsRef<Path>) -> Result<Self, TlsError> {
        let path = path.as_ref();
        let pem = std::fs::read(path).map_err(|e| read_error(path, e))?;
        Self::with_ca_pem(&pem).map_err(|err| match err {
            TlsError::NoRoots(reason) => TlsError::Read {
                path: path.to_owned(),
                reason,
            },
            other => other,
        })
    }

    /// Trusts the CA certificates in `pem`.
    pub fn with_ca_pem(pem: &[u8]) -> Result<Self, TlsError> {
        let mut roots = RootCertStore::empty();
        for cert in CertificateDer::pem_slice_iter(pem) {
            let cert = cert.map_err(|e| TlsError::NoRoots(e.to_string()))?;
            roots.add(cert)?;
        }
        if roots.is_empty() {
            return Err(TlsError::NoRoots("no PEM certificate found".into()));
        }
        Self::with_roots(roots)
    }

    /// Trusts the operating system's root certificates (honouring
    /// `SSL_CERT_FILE` and `SSL_CERT_DIR`).
    pub fn system_roots() -> Result<Self, TlsError> {
        let found = rustls_native_certs::load_native_certs();
        let mut roots = RootCertStore::empty();
        let (_added, _unusable) = roots.add_parsable_certificates(found.certs);
        if roots.is_empty() {
            let why = found
                .errors
                .first()
                .map_or_else(|| "the system has none".to_string(), ToString::to_string);
            return Err(TlsError::NoRoots(why));
        }
        Self::with_roots(roots)
    }

    fn with_roots(roots: RootCertStore) -> Result<Self, TlsError> {
        let config = ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()?
            .with_root_certificates(roots)
            .with_no_client_auth();
        Ok(Self {
            config: Arc::new(config),
            server_name: None,
        })
    }

    /// Checks the server's certificate against `name` (a DNS name or an IP
    /// address) instead of the host of the address dialled.
    pub fn server_name(mut self, name: &str) -> Result<Self, TlsError> {
        let parsed = ServerName::try_from(name.to_string())
            .map_err(|_| TlsError::ServerName(name.to_string()))?;
        self.server_name = Some(parsed);
        Ok(self)
    }

    /// Runs the TLS handshake on `stream`, asking for `alpn` and checking
    /// the certificate against the server name (see
    /// [`ClientTls::server_name`]) or else the host part of `addr`
    /// (`host:port`, `[v6]:port`, or a URI).
    pub async fn connect(
        &self,
        stream: TcpStream,
        addr: &str,
        alpn: &[u8],
    ) -> io::Result<client::TlsStream<TcpStream>> {
        let name = match &self.server_name {
            Some(name) => name.clone(),
            None => {
                let host = host_of(addr);
                ServerName::try_from(host.to_string()).map_err(|_| {
                    io::Error::new(
                        io::ErrorKind::InvalidInput,
                        TlsError::ServerName(host.to_string()),
                    )
                })?
            }
        };
        let mut config = ClientConfig::clone(&self.config);
        config.alpn_protocols = vec![alpn.to_vec()];
        TlsConnector::from(Arc::new(config))
            .connect(name, stream)
            .await
    }
}

/// The `host:port` part of an address that may be a URI
/// (`https://host:port/` → `host:port`).
pub fn authority_of(addr: &str) -> &str {
    let rest = addr.split_once("://").map_or(addr, |(_, rest)| rest);
    rest.split('/').next().unwrap_or(rest)
}

/// The host part of `host:port`, `[v6]:port`, `v6` or a URI such as
/// `https://host:port/`.
pub fn host_of(addr: &str) -> &str {
    let rest = authority_of(addr);
    if let Some(bracketed) = rest.strip_prefix('[') {
        return bracketed.split(']').next().unwrap_or(bracketed);
    }
    // A bare IPv6 address has several colons and no port.
    if rest.matches(':').count() > 1 {
        return rest;
    }
    rest.rsplit_once(':').map_or(rest, |(host, _)| host)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    struct Pki {
        dir: tempfile::TempDir,
        ca_pem: String,
    }

    /// A CA and a leaf for localhost and 127.0.0.1 signed by it, written as
    /// `cert.pem` and `key.pem`.
    fn make_pki() -> Pki {
        let dir = tempfile::tempdir().unwrap();
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        // Each CA its own name, or a client would take one for the other
        // and fail on the signature instead of the issuer.
        let name = format!("chat test CA {}", dir.path().display());
        ca_params
            .distinguished_name
            .push(rcgen::DnType::CommonName, name);
        let ca = rcgen::CertifiedIssuer::self_signed(ca_params, ca_key).unwrap();
        write_leaf(&dir, &ca, "cert.pem", "key.pem");
        Pki {
            ca_pem: ca.pem(),
            dir,
        }
    }

    fn write_leaf(
        dir: &tempfile::TempDir,
        ca: &rcgen::CertifiedIssuer<'_, rcgen::KeyPair>,
        cert: &str,
        key: &str,
    ) {
        let leaf_key = rcgen::KeyPair::generate().unwrap();
        let params =
            rcgen::CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()])
                .unwrap();
        let leaf = params.signed_by(&leaf_key, ca).unwrap();
        std::fs::write(dir.path().join(cert), leaf.pem()).unwrap();
        std::fs::write(dir.path().join(key), leaf_key.serialize_pem()).unwrap();
    }

    /// Serves one TLS connection that echoes one line.
    async fn echo_once(acceptor: Acceptor) -> std::net::SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let acceptor = acceptor.clone();
                tokio::spawn(async move {
                    let Ok(mut tls) = acceptor.accept(stream).await else {
                        return;
                    };
                    let mut buf = [0u8; 5];
                    if tls.read_exact(&mut buf).await.is_ok() {
                        let _ = tls.write_all(&buf).await;
                        let _ = tls.shutdown().await;
                    }
                });
            }
        });
        addr
    }

    async fn hello(client: &ClientTls, addr: std::net::SocketAddr) -> io::Result<Vec<u8>> {
        let stream = TcpStream::connect(addr).await?;
        let mut tls = client
            .connect(stream, &addr.to_string(), ALPN_SOCKET)
            .await?;
        assert_eq!(tls.get_ref().1.alpn_protocol(), Some(ALPN_SOCKET));
        tls.write_all(b"hello").await?;
        let mut back = Vec::new();
        tls.read_to_end(&mut back).await?;
        Ok(back)
    }

    #[tokio::test]
    async fn a_client_trusting_the_ca_talks_to_the_server() {
        let pki = make_pki();
        let server = ServerTls::load(
            pki.dir.path().join("cert.pem"),
            pki.dir.path().join("key.pem"),
        )
        .unwrap();
        let addr = echo_once(server.acceptor(ALPN_SOCKET).unwrap()).await;
        let client = ClientTls::with_ca_pem(pki.ca_pem.as_bytes()).unwrap();
        assert_eq!(hello(&client, addr).await.unwrap(), b"hello");
        // By name as well as by address.
        let by_name = client.clone().server_name("localhost").unwrap();
        assert_eq!(hello(&by_name, addr).await.unwrap(), b"hello");
    }

    #[tokio::test]
    async fn a_client_refuses_an_unknown_ca_and_a_wrong_name() {
        let pki = make_pki();
        let other = make_pki();
        let server = ServerTls::load(
            pki.dir.path().join("cert.pem"),
            pki.dir.path().join("key.pem"),
        )
        .unwrap();
        let addr = echo_once(server.acceptor(ALPN_SOCKET).unwrap()).await;
        let stranger = ClientTls::with_ca_pem(other.ca_pem.as_bytes()).unwrap();
        let err = hello(&stranger, addr).await.unwrap_err();
        assert!(err.to_string().contains("UnknownIssuer"), "{err}");
        let wrong_name = ClientTls::with_ca_pem(pki.ca_pem.as_bytes())
            .unwrap()
            .server_name("chat.example.org")
            .unwrap();
        let err = hello(&wrong_name, addr).await.unwrap_err();
        assert!(err.to_string().contains("not valid for name"), "{err}");
    }

    #[tokio::test]
    async fn reload_serves_the_new_pair_and_keeps_the_old_on_error() {
        let pki = make_pki();
        let cert = pki.dir.path().join("cert.pem");
        let key = pki.dir.path().join("key.pem");
        let server = ServerTls::load(&cert, &key).unwrap();
        let addr = echo_once(server.acceptor(ALPN_SOCKET).unwrap()).await;
        let old_ca = ClientTls::with_ca_pem(pki.ca_pem.as_bytes()).unwrap();

        // A broken key file: reload fails and the old pair keeps serving.
        std::fs::write(&key, "not a key").unwrap();
        let err = server.reload().unwrap_err();
        assert_eq!(err.code(), "tls_no_key", "{err}");
        assert_eq!(hello(&old_ca, addr).await.unwrap(), b"hello");

        // A pair from another CA: after reload, only that CA is trusted.
        let renewed = make_pki();
        std::fs::copy(renewed.dir.path().join("cert.pem"), &cert).unwrap();
        std::fs::copy(renewed.dir.path().join("key.pem"), &key).unwrap();
        server.reload().unwrap();
        let new_ca = ClientTls::with_ca_pem(renewed.ca_pem.as_bytes()).unwrap();
        assert_eq!(hello(&new_ca, addr).await.unwrap(), b"hello");
        // A fresh client: one that connected before resumes its session
        // without seeing a certificate at all.
        let old_ca = ClientTls::with_ca_pem(pki.ca_pem.as_bytes()).unwrap();
        let err = hello(&old_ca, addr).await.unwrap_err();
        assert!(err.to_string().contains("UnknownIssuer"), "{err}");
    }

    #[test]
    fn a_key_that_is_not_the_certificates_is_refused() {
        let pki = make_pki();
        let other = make_pki();
        let err = ServerTls::load(
            pki.dir.path().join("cert.pem"),
            other.dir.path().join("key.pem"),
        )
        .unwrap_err();
        assert_eq!(err.code(), "tls_key_mismatch", "{err}");
        let err = ServerTls::load(
            pki.dir.path().join("missing.pem"),
            pki.dir.path().join("key.pem"),
        )
        .unwrap_err();
        assert_eq!(err.code(), "tls_read", "{err}");
        // The message names the file, never its contents.
        assert!(err.to_string().contains("missing.pem"), "{err}");
        let err = ClientTls::with_ca_file(pki.dir.path().join("key.pem")).unwrap_err();
        assert_eq!(err.code(), "tls_read", "{err}");
    }

    #[test]
    fn host_of_finds_the_host_in_every_address_form() {
        assert_eq!(host_of("localhost:7000"), "localhost");
        assert_eq!(host_of("127.0.0.1:7000"), "127.0.0.1");
        assert_eq!(host_of("[::1]:7000"), "::1");
        assert_eq!(host_of("::1"), "::1");
        assert_eq!(host_of("https://chat.example.org:443/"), "chat.example.org");
        assert_eq!(host_of("chat.example.org"), "chat.example.org");
        assert_eq!(
            authority_of("https://chat.example.org:443/"),
            "chat.example.org:443"
        );
        assert_eq!(authority_of("[::1]:7000"), "[::1]:7000");
    }
}
