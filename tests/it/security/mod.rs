//! Issue 12 over the wire: TLS and mTLS with certificate rotation, caller
//! grants, every bound exceeded, and Redis credentials, each against a real
//! server (and real `redis-server` / `redis-sentinel` processes) with
//! certificates the tests make themselves.

mod bounds;
mod callers;
mod config;
mod redis_auth;
mod tls;

use std::time::Duration;

use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};

use crate::common::certs::Leaf;

/// A free loopback address, for a metrics listener.
fn free_addr() -> String {
    format!("127.0.0.1:{}", crate::common::free_port())
}

/// A TLS channel to `addr` trusting `ca`, presenting `identity` if given,
/// checking the server's name against `domain`.
pub(crate) async fn tls_channel(
    addr: std::net::SocketAddr,
    ca_pem: &str,
    identity: Option<&Leaf>,
    domain: &str,
) -> Result<Channel, tonic::transport::Error> {
    let mut tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(ca_pem))
        .domain_name(domain);
    if let Some(id) = identity {
        tls = tls.identity(Identity::from_pem(&id.cert, &id.key));
    }
    Channel::from_shared(format!("https://{addr}"))
        .expect("url")
        .tls_config(tls)?
        .connect_timeout(Duration::from_secs(5))
        .connect()
        .await
}

/// A plain HTTP/1.1 GET over any stream; the whole answer.
async fn http_get<S>(mut s: S, path: &str) -> std::io::Result<String>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes())
        .await?;
    let mut out = Vec::new();
    s.read_to_end(&mut out).await?;
    Ok(String::from_utf8_lossy(&out).into_owned())
}

/// The value of the metric line that starts with `series`, or 0.
fn metric(body: &str, series: &str) -> f64 {
    body.lines()
        .find(|l| l.starts_with(series))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}
