//! TLS for the listeners, with certificates that follow their files.
//!
//! tonic's own TLS builds its rustls config once, so a rotated certificate
//! would need a restart. Here each listener holds its rustls config behind
//! an [`ArcSwap`]: every new connection handshakes with the config current
//! at that moment, and a task re-reads the files every `reload_interval`,
//! swapping in a new config when their bytes change and it builds. Open
//! connections keep the config they started with, so a rotation drops no
//! call. A half-written rotation (a new cert beside the old key) does not
//! build and is logged; the old config keeps serving until the files agree.
//!
//! Handshakes run on their own tasks, each bounded by
//! [`HANDSHAKE_TIMEOUT`], so a client that connects and says nothing delays
//! no one else's accept.

use std::io;
use std::net::SocketAddr;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use arc_swap::ArcSwap;
use rustls::RootCertStore;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ServerConfig, WebPkiClientVerifier};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;
use tokio_stream::{Stream, StreamExt as _};
use tokio_util::sync::CancellationToken;
use tonic::transport::server::{Connected, TcpIncoming};

use super::{PeerInfo, UNAUTHENTICATED};
use crate::config::{ConfigError, TlsConfig};
use crate::observe::Observer;

/// The longest a TLS handshake may take before the connection is dropped.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// The most handshakes in progress at once, per listener; a connection
/// arriving past it is closed at once, so a flood of silent connections
/// costs at most this many tasks.
pub const MAX_HANDSHAKES: usize = 1024;

/// ALPN for the gRPC listener.
pub const ALPN_H2: &[u8] = b"h2";
/// ALPN for the metrics listener (HTTP/1.1 only).
pub const ALPN_HTTP1: &[u8] = b"http/1.1";

/// A listener's TLS settings and its current rustls config.
#[derive(Debug, Clone)]
pub struct Tls {
    settings: TlsConfig,
    at: &'static str,
    alpn: &'static [u8],
    current: Arc<ArcSwap<ServerConfig>>,
}

/// The files' bytes, to tell when they change.
type Files = (Vec<u8>, Vec<u8>, Option<Vec<u8>>);

impl Tls {
    /// Reads and checks the files of `settings` (the config field `at`,
    /// for errors), for a listener speaking `alpn`.
    pub fn load(
        settings: &TlsConfig,
        at: &'static str,
        alpn: &'static [u8],
    ) -> Result<Self, ConfigError> {
        let files = read_files(settings, at)?;
        let config = server_config(&files, at, alpn)?;
        Ok(Self {
            settings: settings.clone(),
            at,
            alpn,
            current: Arc::new(ArcSwap::from_pointee(config)),
        })
    }

    /// Re-reads the files every `reload_interval` until `stopped`.
    pub fn spawn_reloader(&self, stopped: CancellationToken) {
        let this = self.clone();
        tokio::spawn(async move {
            let mut last = read_files(&this.settings, this.at).ok();
            let mut tick = tokio::time::interval(this.settings.reload_interval);
            tick.tick().await;
            loop {
                tokio::select! {
                    () = stopped.cancelled() => return,
                    _ = tick.tick() => {}
                }
                let files = match read_files(&this.settings, this.at) {
                    Ok(files) => files,
                    Err(e) => {
                        tracing::warn!(error = %e, "TLS files unreadable; keeping the current certificate");
                        continue;
                    }
                };
                if last.as_ref() == Some(&files) {
                    continue;
                }
                match server_config(&files, this.at, this.alpn) {
                    Ok(config) => {
                        this.current.store(Arc::new(config));
                        tracing::info!(listener = this.at, "TLS certificate reloaded");
                    }
                    Err(e) => tracing::warn!(
                        error = %e,
                        "new TLS files refused; keeping the current certificate"
                    ),
                }
                last = Some(files);
            }
        });
    }

    fn acceptor(&self) -> TlsAcceptor {
        TlsAcceptor::from(self.current.load_full())
    }
}

fn read_files(settings: &TlsConfig, at: &str) -> Result<Files, ConfigError> {
    let read = |field: &str, path: &Path| {
        std::fs::read(path).map_err(|e| {
            ConfigError::one(format!("{at}.{field}: cannot read {}: {e}", path.display()))
        })
    };
    Ok((
        read("cert", &settings.cert)?,
        read("key", &settings.key)?,
        settings
            .client_ca
            .as_deref()
            .map(|p| read("client_ca", p))
            .transpose()?,
    ))
}

/// Builds the rustls config from PEM bytes, with `ring` as the provider.
fn server_config(files: &Files, at: &str, alpn: &[u8]) -> Result<ServerConfig, ConfigError> {
    let (cert, key, client_ca) = files;
    let fail =
        |field: &str, e: &dyn std::fmt::Display| ConfigError::one(format!("{at}.{field}: {e}"));
    let chain = CertificateDer::pem_slice_iter(cert)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| fail("cert", &e))?;
    if chain.is_empty() {
        return Err(fail("cert", &"holds no PEM certificate"));
    }
    let key = PrivateKeyDer::from_pem_slice(key).map_err(|e| fail("key", &e))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| fail("cert", &e))?;
    let builder = match client_ca {
        Some(ca) => {
            let mut roots = RootCertStore::empty();
            for c in CertificateDer::pem_slice_iter(ca) {
                let c = c.map_err(|e| fail("client_ca", &e))?;
                roots.add(c).map_err(|e| fail("client_ca", &e))?;
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(roots.into(), provider)
                .build()
                .map_err(|e| fail("client_ca", &e))?;
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    // rustls checks here that the key belongs to the certificate.
    let mut config = builder
        .with_single_cert(chain, key)
        .map_err(|e| fail("key", &e))?;
    config.alpn_protocols = vec![alpn.to_vec()];
    Ok(config)
}

/// The DNS and URI SANs of a certificate.
fn sans(cert: &CertificateDer<'_>) -> Vec<String> {
    use x509_parser::extensions::GeneralName;
    let Ok((_, x509)) = x509_parser::parse_x509_certificate(cert) else {
        return Vec::new();
    };
    let Ok(Some(ext)) = x509.subject_alternative_name() else {
        return Vec::new();
    };
    ext.value
        .general_names
        .iter()
        .filter_map(|name| match name {
            GeneralName::DNSName(s) | GeneralName::URI(s) => Some((*s).to_owned()),
            _ => None,
        })
        .collect()
}

/// An accepted connection: plain TCP or TLS, with what is known of its peer.
#[derive(Debug)]
pub struct Conn {
    io: Io,
    peer: PeerInfo,
}

#[derive(Debug)]
enum Io {
    Plain(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
}

impl Conn {
    /// The peer's address and certificate names.
    pub fn peer(&self) -> &PeerInfo {
        &self.peer
    }
}

/// `listener`'s connections, Nagle off and TCP keepalive on.
pub fn incoming(listener: TcpListener) -> TcpIncoming {
    TcpIncoming::from(listener)
        .with_nodelay(Some(true))
        .with_keepalive(Some(Duration::from_secs(60)))
}

/// Takes the TCP connections of `incoming` (a listener's, see [`incoming`],
/// or with a runtime per core, the core's share of them), handshaking TLS
/// when `tls` is set, each handshake on its own task. Connections arrive on
/// the returned channel; dropping it stops taking them. A failed handshake
/// (no client certificate, one from another CA, not TLS at all) is an access
/// refusal: counted and audited through `observer` as API `tls`.
pub fn accept(
    mut incoming: impl Stream<Item = io::Result<TcpStream>> + Send + Unpin + 'static,
    tls: Option<Tls>,
    observer: Arc<Observer>,
) -> mpsc::Receiver<Conn> {
    let (tx, rx) = mpsc::channel(64);
    let handshakes = Arc::new(tokio::sync::Semaphore::new(MAX_HANDSHAKES));
    tokio::spawn(async move {
        loop {
            let tcp = tokio::select! {
                () = tx.closed() => return,
                next = incoming.next() => match next {
                    Some(Ok(tcp)) => tcp,
                    Some(Err(e)) => {
                        // Out of file descriptors, most likely: back off.
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                    None => return,
                },
            };
            let remote_addr = tcp.peer_addr().ok();
            match &tls {
                None => {
                    let peer = PeerInfo {
                        remote_addr,
                        sans: Arc::from([]),
                    };
                    if tx
                        .send(Conn {
                            io: Io::Plain(tcp),
                            peer,
                        })
                        .await
                        .is_err()
                    {
                        return;
                    }
                }
                Some(tls) => {
                    let Ok(permit) = handshakes.clone().try_acquire_owned() else {
                        tracing::debug!(?remote_addr, "too many TLS handshakes; closed");
                        continue;
                    };
                    let (acceptor, tx) = (tls.acceptor(), tx.clone());
                    let (observer, at) = (observer.clone(), tls.at);
                    tokio::spawn(async move {
                        if let Err(why) = handshake(acceptor, tcp, remote_addr, tx).await {
                            let why = format!("{at}: TLS handshake from {remote_addr:?}: {why}");
                            observer.refused("tls", UNAUTHENTICATED, "", &why);
                        }
                        drop(permit);
                    });
                }
            }
        }
    });
    rx
}

/// Completes one handshake and hands the connection on; says why not.
async fn handshake(
    acceptor: TlsAcceptor,
    tcp: TcpStream,
    remote_addr: Option<SocketAddr>,
    tx: mpsc::Sender<Conn>,
) -> Result<(), String> {
    let stream = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
        Ok(Ok(stream)) => stream,
        Ok(Err(e)) => return Err(e.to_string()),
        Err(_) => return Err(format!("timed out after {HANDSHAKE_TIMEOUT:?}")),
    };
    let sans = stream
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|chain| chain.first())
        .map(sans)
        .unwrap_or_default();
    let peer = PeerInfo {
        remote_addr,
        sans: sans.into(),
    };
    let conn = Conn {
        io: Io::Tls(Box::new(stream)),
        peer,
    };
    // The server may be stopping; that is no refusal.
    let _ = tx.send(conn).await;
    Ok(())
}

impl AsyncRead for Conn {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match &mut self.io {
            Io::Plain(io) => Pin::new(io).poll_read(cx, buf),
            Io::Tls(io) => Pin::new(io.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Conn {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match &mut self.io {
            Io::Plain(io) => Pin::new(io).poll_write(cx, buf),
            Io::Tls(io) => Pin::new(io.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.io {
            Io::Plain(io) => Pin::new(io).poll_flush(cx),
            Io::Tls(io) => Pin::new(io.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.io {
            Io::Plain(io) => Pin::new(io).poll_shutdown(cx),
            Io::Tls(io) => Pin::new(io.as_mut()).poll_shutdown(cx),
        }
    }
}

impl Connected for Conn {
    type ConnectInfo = PeerInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.peer.clone()
    }
}

/// The metrics listener over [`accept`], for axum.
#[derive(Debug)]
pub struct MetricsListener {
    conns: mpsc::Receiver<Conn>,
    local: SocketAddr,
}

impl MetricsListener {
    /// Serves `listener`, over TLS when `tls` is set, reporting refused
    /// handshakes to `observer`.
    pub fn new(
        listener: TcpListener,
        tls: Option<Tls>,
        observer: Arc<Observer>,
    ) -> io::Result<Self> {
        let local = listener.local_addr()?;
        Ok(Self {
            conns: accept(incoming(listener), tls, observer),
            local,
        })
    }
}

impl axum::serve::Listener for MetricsListener {
    type Io = Conn;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.conns.recv().await {
            Some(conn) => {
                let addr = conn.peer.remote_addr.unwrap_or(self.local);
                (conn, addr)
            }
            // The accept task only ends when this receiver is gone.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> io::Result<Self::Addr> {
        Ok(self.local)
    }
}
