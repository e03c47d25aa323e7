//! The transport, below the API: what the listeners accept and how a
//! connection is wrapped before gRPC sees it.
//!
//! - [`tls`]: the listeners' TLS, with certificates re-read when their files
//!   change, and the peer's verified names;
//! - [`cancel`]: connections that the stop sequence (or their maximum age)
//!   can cut from outside;
//! - [`bounds`]: the cap on calls in flight, a tower layer on the server.
//!
//! It knows nothing of rate limits: the API reads [`PeerInfo`] from each
//! request to authorise its caller.

use std::net::SocketAddr;
use std::sync::Arc;

pub mod bounds;
pub mod cancel;
pub mod tls;

/// The `caller` label and audit name of a call no caller matched.
pub const UNAUTHENTICATED: &str = "_unauthenticated";

/// What the transport knows about the other end of a connection; tonic puts
/// it in every request's extensions.
#[derive(Debug, Clone, Default)]
pub struct PeerInfo {
    /// The client's address.
    pub remote_addr: Option<SocketAddr>,
    /// The DNS and URI SANs of the verified client certificate; empty
    /// without TLS or without a client certificate.
    pub sans: Arc<[String]>,
}
