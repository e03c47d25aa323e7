//! Every bound of the gRPC listener, exceeded: message size, streams per
//! connection, keepalive, connection age, calls in flight, batch size and
//! Envoy descriptors. Each gets its documented answer, and the server keeps
//! serving others.

use std::time::Duration;

use tokio::time::Instant;

use envoy_types::pb::envoy::extensions::common::ratelimit::v3::{
    RateLimitDescriptor, rate_limit_descriptor::Entry,
};
use envoy_types::pb::envoy::service::ratelimit::v3::RateLimitRequest;
use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_service_client::RateLimitServiceClient;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tollgate::pb::tollgate::v1::ShouldAllowBatchRequest;
use tonic::Code;

use super::{free_addr, http_get, metric};
use crate::common::{TestServer, ask, req};

const SCOPES: &str = "
scopes:
  - name: s
    limits: [{name: per-user, per: identity, capacity: 1000000, refill_period: 1s}]
";

/// Raw HTTP/2 frames, for a client that breaks the rules a real client
/// library keeps (more streams than allowed, unanswered pings).
mod raw {
    use super::*;

    pub(super) const HEADERS: u8 = 1;
    pub(super) const RST_STREAM: u8 = 3;
    pub(super) const SETTINGS: u8 = 4;
    pub(super) const PING: u8 = 6;
    pub(super) const GOAWAY: u8 = 7;

    pub(super) fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
        let len = payload.len() as u32;
        let mut f = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags];
        f.extend_from_slice(&stream.to_be_bytes());
        f.extend_from_slice(payload);
        f
    }

    /// A HEADERS frame opening a `ShouldAllow` call, body not yet sent.
    /// HPACK "literal without indexing, new name", no Huffman.
    pub(super) fn open_call(stream: u32) -> Vec<u8> {
        let mut block = Vec::new();
        for (name, value) in [
            (":method", "POST"),
            (":scheme", "http"),
            (":path", "/tollgate.v1.RateLimiter/ShouldAllow"),
            (":authority", "localhost"),
            ("content-type", "application/grpc"),
            ("te", "trailers"),
        ] {
            block.push(0);
            block.push(name.len() as u8);
            block.extend_from_slice(name.as_bytes());
            block.push(value.len() as u8);
            block.extend_from_slice(value.as_bytes());
        }
        frame(HEADERS, 0x4, stream, &block)
    }

    /// Connects, sends the preface and empty SETTINGS, and acknowledges
    /// the server's; returns the stream and the server's settings payload.
    pub(super) async fn connect(addr: std::net::SocketAddr) -> (TcpStream, Vec<u8>) {
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
            .await
            .unwrap();
        s.write_all(&frame(SETTINGS, 0, 0, &[])).await.unwrap();
        loop {
            let (kind, flags, _, payload) = read(&mut s).await.expect("server settings");
            if kind == SETTINGS && flags & 1 == 0 {
                s.write_all(&frame(SETTINGS, 1, 0, &[])).await.unwrap();
                return (s, payload);
            }
        }
    }

    /// The next frame, or `None` at end of stream.
    pub(super) async fn read<R: AsyncReadExt + Unpin>(s: &mut R) -> Option<(u8, u8, u32, Vec<u8>)> {
        let mut head = [0u8; 9];
        s.read_exact(&mut head).await.ok()?;
        let len = (head[0] as usize) << 16 | (head[1] as usize) << 8 | head[2] as usize;
        let stream = u32::from_be_bytes([head[5], head[6], head[7], head[8]]) & 0x7fff_ffff;
        let mut payload = vec![0u8; len];
        s.read_exact(&mut payload).await.ok()?;
        Some((head[3], head[4], stream, payload))
    }

    /// The value of setting `id` in a SETTINGS payload.
    pub(super) fn setting(payload: &[u8], id: u16) -> Option<u32> {
        payload.chunks(6).find_map(|c| {
            (u16::from_be_bytes([c[0], c[1]]) == id)
                .then(|| u32::from_be_bytes([c[2], c[3], c[4], c[5]]))
        })
    }
}

#[tokio::test]
async fn a_10_mb_message_is_refused_and_others_are_served() {
    let server = TestServer::start(SCOPES).await;
    let mut c = server
        .client()
        .await
        .max_encoding_message_size(64 << 20)
        .max_decoding_message_size(64 << 20);
    let huge = req("s", &"x".repeat(10 << 20), "op");
    let e = c.should_allow(huge).await.unwrap_err();
    assert_eq!(e.code(), Code::OutOfRange, "{e:?}");
    assert!(e.message().contains("4194304"), "{e:?}");
    assert!(ask(&mut c, req("s", "alice", "op")).await.allowed);
}

#[tokio::test]
async fn a_call_with_too_much_metadata_is_refused_and_others_are_served() {
    let server = TestServer::start(SCOPES).await;
    let mut c = server.client().await;
    let mut call = tonic::Request::new(req("s", "alice", "op"));
    let big: tonic::metadata::MetadataValue<_> = "x".repeat(64 * 1024).parse().unwrap();
    call.metadata_mut().insert("x-padding", big);
    let e = c.should_allow(call).await.unwrap_err();
    // Far over the limit, h2 closes the connection: GOAWAY ENHANCE_YOUR_CALM.
    assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
    assert!(format!("{e:?}").contains("header_list"), "{e:?}");
    assert!(ask(&mut c, req("s", "alice", "op")).await.allowed);
}

#[tokio::test]
async fn ten_thousand_streams_on_one_connection_are_refused_past_the_cap() {
    let server = TestServer::start(SCOPES).await;
    let (s, settings) = raw::connect(server.addr).await;
    // SETTINGS_MAX_CONCURRENT_STREAMS (0x3) is advertised.
    assert_eq!(raw::setting(&settings, 3), Some(100));
    let (mut rd, mut wr) = s.into_split();
    let writer = tokio::spawn(async move {
        let mut all = Vec::new();
        for i in 0..10_000u32 {
            all.extend(raw::open_call(2 * i + 1));
        }
        // The server may hang up part-way; that is one of the answers.
        let _ = wr.write_all(&all).await;
        wr
    });
    let (mut refused, mut goaway) = (0u32, None);
    let reading = async {
        while let Some((kind, _, _, payload)) = raw::read(&mut rd).await {
            match kind {
                // REFUSED_STREAM (0x7): this stream was over the cap.
                raw::RST_STREAM if payload == [0, 0, 0, 7] => refused += 1,
                raw::GOAWAY => goaway = Some(u32::from_be_bytes(payload[4..8].try_into().unwrap())),
                _ => {}
            }
        }
    };
    let _ = tokio::time::timeout(Duration::from_secs(10), reading).await;
    let _keep = writer.await;
    assert!(refused >= 900, "only {refused} streams refused");
    // After 1024 refusals the connection is told to go away
    // (ENHANCE_YOUR_CALM, 0xb), or every stream past 100 was refused.
    assert!(
        goaway == Some(0xb) || refused == 9_900,
        "refused {refused}, goaway {goaway:?}"
    );
    // Everyone else is still served.
    let mut c = server.client().await;
    assert!(ask(&mut c, req("s", "alice", "op")).await.allowed);
}

#[tokio::test]
async fn a_peer_that_never_answers_keepalive_pings_is_disconnected() {
    let server = TestServer::start(&format!(
        "grpc: {{keepalive_interval: 100ms, keepalive_timeout: 200ms}}\n{SCOPES}"
    ))
    .await;
    let (mut s, _) = raw::connect(server.addr).await;
    let started = Instant::now();
    let (mut pinged, mut closed) = (false, false);
    let watch = async {
        loop {
            match raw::read(&mut s).await {
                Some((raw::PING, flags, _, _)) if flags & 1 == 0 => pinged = true,
                Some(_) => {}
                None => {
                    closed = true;
                    return;
                }
            }
        }
    };
    let _ = tokio::time::timeout(Duration::from_secs(5), watch).await;
    assert!(pinged, "the server never pinged");
    assert!(closed, "an unanswered ping did not close the connection");
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn an_aged_connection_gets_goaway_then_is_closed_after_the_grace() {
    let server = TestServer::start(&format!(
        "grpc: {{max_connection_age: 300ms, max_connection_age_grace: 400ms}}\n{SCOPES}"
    ))
    .await;
    let (mut s, _) = raw::connect(server.addr).await;
    // A call that never sends its body stays in flight past the age.
    s.write_all(&raw::open_call(1)).await.unwrap();
    let started = Instant::now();
    let (mut goaway_at, mut closed_at) = (None, None);
    let watch = async {
        loop {
            match raw::read(&mut s).await {
                Some((raw::GOAWAY, ..)) => {
                    goaway_at.get_or_insert(started.elapsed());
                }
                Some(_) => {}
                None => {
                    closed_at = Some(started.elapsed());
                    return;
                }
            }
        }
    };
    let _ = tokio::time::timeout(Duration::from_secs(5), watch).await;
    let goaway_at = goaway_at.expect("GOAWAY at max_connection_age");
    let closed_at = closed_at.expect("closed after the grace");
    assert!(goaway_at >= Duration::from_millis(250), "{goaway_at:?}");
    assert!(goaway_at < Duration::from_millis(650), "{goaway_at:?}");
    assert!(closed_at >= Duration::from_millis(600), "{closed_at:?}");
    assert!(closed_at < Duration::from_millis(1500), "{closed_at:?}");
    // A client that reconnects is served as before.
    let mut c = server.client().await;
    assert!(ask(&mut c, req("s", "alice", "op")).await.allowed);
}

#[tokio::test]
async fn calls_past_max_in_flight_get_resource_exhausted_at_once() {
    let metrics = free_addr();
    let server = TestServer::start(&format!(
        "grpc: {{max_in_flight: 4}}\nmetrics: {{listen: \"{metrics}\"}}\n{SCOPES}"
    ))
    .await;
    // Four calls that send headers but never a body hold every place.
    let tcp = TcpStream::connect(server.addr).await.unwrap();
    let (h2, conn) = h2::client::handshake(tcp).await.unwrap();
    tokio::spawn(conn);
    let mut held = Vec::new();
    for _ in 0..4 {
        let mut h2 = h2.clone().ready().await.unwrap();
        let call = http::Request::post(format!(
            "http://{}/tollgate.v1.RateLimiter/ShouldAllow",
            server.addr
        ))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(())
        .unwrap();
        held.push(h2.send_request(call, false).unwrap());
    }
    tokio::time::sleep(Duration::from_millis(200)).await;

    let mut c = server.client().await;
    let started = Instant::now();
    let e = c.should_allow(req("s", "alice", "op")).await.unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
    assert!(e.message().contains("grpc.max_in_flight"), "{e:?}");
    assert!(started.elapsed() < Duration::from_millis(500));
    // Health is never shed.
    let mut health = tonic_health::pb::health_client::HealthClient::new(server.channel().await);
    let status = health
        .check(tonic_health::pb::HealthCheckRequest::default())
        .await
        .expect("health answers at the cap");
    assert_eq!(status.into_inner().status, 1);
    let tcp = TcpStream::connect(&metrics).await.unwrap();
    let body = http_get(tcp, "/metrics").await.unwrap();
    assert_eq!(metric(&body, "tollgate_calls_shed_total"), 1.0, "{body}");

    // Once the held calls go, places free up.
    drop(held);
    drop(h2);
    let mut served = false;
    for _ in 0..50 {
        if c.should_allow(req("s", "alice", "op")).await.is_ok() {
            served = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(served, "places were never released");
}

#[tokio::test]
async fn a_batch_of_100_000_is_refused_before_anything_is_taken() {
    let server = TestServer::start(SCOPES).await;
    let mut c = server.client().await;
    let batch = ShouldAllowBatchRequest {
        requests: (0..100_000).map(|_| req("s", "bob", "op")).collect(),
        atomic: false,
    };
    let e = c.should_allow_batch(batch).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    assert_eq!(
        e.message(),
        "requests: has 100000 entries; the most allowed is 256 (grpc.max_batch)"
    );
    let bob = ask(&mut c, req("s", "bob", "op")).await;
    assert_eq!(bob.remaining, 999_999, "the refused batch took nothing");
}

#[tokio::test]
async fn an_envoy_request_with_10_000_descriptors_is_refused() {
    let server = TestServer::start(SCOPES).await;
    let mut rls = RateLimitServiceClient::new(server.channel().await);
    let descriptor = RateLimitDescriptor {
        entries: vec![Entry {
            key: "user".into(),
            value: "alice".into(),
        }],
        ..Default::default()
    };
    let request = RateLimitRequest {
        domain: "s".into(),
        descriptors: vec![descriptor.clone(); 10_000],
        ..Default::default()
    };
    let e = rls.should_rate_limit(request).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    assert_eq!(
        e.message(),
        "descriptors: has 10000 entries; the most allowed is 64 (grpc.max_envoy_descriptors)"
    );
    let ok = rls
        .should_rate_limit(RateLimitRequest {
            domain: "s".into(),
            descriptors: vec![descriptor],
            ..Default::default()
        })
        .await;
    assert!(ok.is_ok(), "{ok:?}");
}
