//! TLS and mTLS on the gRPC listener, certificate rotation under load, and
//! TLS on the metrics listener.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use tollgate::pb::tollgate::v1::rate_limiter_client::RateLimiterClient;

use super::{free_addr, http_get, metric, tls_channel};
use crate::common::certs::{Ca, TlsFiles};
use crate::common::{TestServer, req};

const SCOPES: &str = "
scopes:
  - name: a-1
    limits: [{name: per-user, per: identity, capacity: 1000000, refill_period: 1s}]
";

#[tokio::test]
async fn mtls_serves_a_trusted_client_and_refuses_others_at_the_handshake() {
    let (ca, other_ca) = (Ca::new("trusted"), Ca::new("other"));
    let files = TlsFiles::new(&ca.server(&[]), Some(&ca));
    let metrics = free_addr();
    let server = TestServer::start(&format!(
        "tls: {}\nmetrics: {{listen: \"{metrics}\"}}\n{SCOPES}",
        files.yaml("10s")
    ))
    .await;

    let good = ca.client("spiffe://test/ns/edge/sa/gateway");
    let channel = tls_channel(server.addr, &ca.pem, Some(&good), "localhost")
        .await
        .expect("a trusted client connects");
    let answer = RateLimiterClient::new(channel)
        .should_allow(req("a-1", "alice", "op"))
        .await
        .expect("a trusted client is served");
    assert!(answer.into_inner().allowed);

    // With TLS 1.3 the client learns of the refusal at its first read, so
    // the connect or the first call fails; either way nothing is served.
    let refused =
        async |identity| match tls_channel(server.addr, &ca.pem, identity, "localhost").await {
            Err(e) => format!("connect: {e:?}"),
            Ok(channel) => match RateLimiterClient::new(channel)
                .should_allow(req("a-1", "mallory", "op"))
                .await
            {
                Ok(_) => panic!("served without a trusted client certificate"),
                Err(status) => format!("call: {status:?}"),
            },
        };
    let without = refused(None).await;
    assert!(without.contains("alert"), "{without}");
    let stranger = other_ca.client("spiffe://test/ns/edge/sa/gateway");
    let foreign = refused(Some(&stranger)).await;
    assert!(foreign.contains("alert"), "{foreign}");

    // Plaintext gRPC to a TLS port gets nowhere either.
    let mut plain = RateLimiterClient::new(
        tonic::transport::Channel::from_shared(server.url())
            .unwrap()
            .connect_lazy(),
    );
    assert!(plain.should_allow(req("a-1", "x", "op")).await.is_err());

    // Each refused handshake is an access refusal: counted (and audited).
    let series = "tollgate_access_denied_total{api=\"tls\",caller=\"_unauthenticated\"}";
    let mut refusals = 0.0;
    for _ in 0..50 {
        let tcp = tokio::net::TcpStream::connect(&metrics).await.unwrap();
        refusals = metric(&http_get(tcp, "/metrics").await.unwrap(), series);
        if refusals >= 3.0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(refusals >= 3.0, "{refusals} refused handshakes counted");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificates_rotate_under_steady_load_without_a_failed_call() {
    let ca = Ca::new("rotation");
    let files = TlsFiles::new(&ca.server(&[]), Some(&ca));
    let server = TestServer::start(&format!("tls: {}\n{SCOPES}", files.yaml("50ms"))).await;
    let client_cert = ca.client("spiffe://test/load");

    let (stop, ok, failed) = (
        Arc::new(AtomicBool::new(false)),
        Arc::new(AtomicU64::new(0)),
        Arc::new(AtomicU64::new(0)),
    );
    let mut load = Vec::new();
    for worker in 0..8 {
        let (stop, ok, failed) = (stop.clone(), ok.clone(), failed.clone());
        let (ca_pem, client_cert, addr) = (ca.pem.clone(), client_cert.clone(), server.addr);
        load.push(tokio::spawn(async move {
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                // Half the workers keep one connection, half reconnect for
                // every call, so both open and new connections see the swap.
                let channel = tls_channel(addr, &ca_pem, Some(&client_cert), "localhost").await;
                let mut calls = if worker % 2 == 0 { 50 } else { 1 };
                let mut client = match channel {
                    Ok(c) => RateLimiterClient::new(c),
                    Err(e) => {
                        eprintln!("connect failed: {e:?}");
                        failed.fetch_add(1, Ordering::Relaxed);
                        continue;
                    }
                };
                while calls > 0 && !stop.load(Ordering::Relaxed) {
                    n += 1;
                    match client
                        .should_allow(req("a-1", &format!("u{n}"), "op"))
                        .await
                    {
                        Ok(_) => ok.fetch_add(1, Ordering::Relaxed),
                        Err(e) => {
                            eprintln!("call failed: {e:?}");
                            failed.fetch_add(1, Ordering::Relaxed)
                        }
                    };
                    calls -= 1;
                }
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(400)).await;
    // The new certificate also names `rotated.test`: a client that checks
    // for that name connects only once the new certificate is served.
    files.install(&ca.server(&["rotated.test"]));
    let mut rotated = false;
    for _ in 0..100 {
        if tls_channel(server.addr, &ca.pem, Some(&client_cert), "rotated.test")
            .await
            .is_ok()
        {
            rotated = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Keep the load on until it has made enough calls to mean something,
    // however busy the machine is (bounded, so a stuck server still fails).
    for _ in 0..200 {
        if ok.load(Ordering::Relaxed) > 150 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    stop.store(true, Ordering::Relaxed);
    for task in load {
        task.await.expect("load task");
    }
    assert!(rotated, "the rotated certificate was never served");
    let (ok, failed) = (ok.load(Ordering::Relaxed), failed.load(Ordering::Relaxed));
    assert!(ok > 100, "too little load to mean anything: {ok} calls");
    assert_eq!(failed, 0, "{failed} of {} calls failed", ok + failed);
}

#[tokio::test]
async fn a_broken_rotation_keeps_the_old_certificate() {
    let ca = Ca::new("broken");
    let files = TlsFiles::new(&ca.server(&[]), None);
    let server = TestServer::start(&format!("tls: {}\n{SCOPES}", files.yaml("20ms"))).await;
    // A key that does not belong to the certificate: refused, logged.
    let other = ca.server(&[]);
    std::fs::write(files.key(), other.key).unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let channel = tls_channel(server.addr, &ca.pem, None, "localhost")
        .await
        .expect("the old certificate still serves");
    RateLimiterClient::new(channel)
        .should_allow(req("a-1", "alice", "op"))
        .await
        .expect("served");
}

#[tokio::test]
async fn the_metrics_listener_speaks_tls() {
    let ca = Ca::new("metrics");
    let files = TlsFiles::new(&ca.server(&[]), None);
    let addr = free_addr();
    let yaml = format!(
        "metrics: {{listen: \"{addr}\", tls: {}}}\n{SCOPES}",
        files.yaml("10s")
    );
    let server = TestServer::start(&yaml).await;
    // Let the server task run far enough to bind the metrics port.
    let mut c = server.client().await;
    c.should_allow(req("a-1", "alice", "op")).await.unwrap();

    let mut roots = rustls::RootCertStore::empty();
    for c in rustls::pki_types::CertificateDer::pem_slice_iter(ca.pem.as_bytes()) {
        roots.add(c.unwrap()).unwrap();
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let tcp = tokio::net::TcpStream::connect(&addr).await.unwrap();
    let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect("localhost".try_into().unwrap(), tcp)
        .await
        .expect("TLS handshake with the metrics listener");
    let body = http_get(tls, "/metrics").await.unwrap();
    assert!(body.starts_with("HTTP/1.1 200"), "{body}");
    assert!(body.contains("tollgate_decisions"), "{body}");

    // Plain HTTP gets no metrics.
    let tcp = tokio::net::TcpStream::connect(&addr).await.unwrap();
    let plain = http_get(tcp, "/metrics").await.unwrap_or_default();
    assert!(!plain.contains("tollgate_decisions"), "{plain}");
}

use rustls::pki_types::pem::PemObject as _;
