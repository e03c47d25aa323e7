//! Reservations and priority through `tollgate_client::Client`, against the
//! real Tollgate binary: a settle for less gives tokens back, a second
//! settle and a forged token are told apart, a settle with Tollgate stopped
//! is an error to retry (never a made-up success), and SHEDDABLE is denied
//! before CRITICAL against a limit with headroom.

use std::time::Duration;

use tollgate_client::{
    Client, DecisionRequest, Error, FailureCause, FailureMode, Priority, Reservation,
};

use crate::support::Tollgate;

/// Refills over an hour, so no whole token comes back while a test runs: a
/// count seen is exactly what was taken and given back.
const LIMITS: &str = "
scopes:
  - name: llm
    limits:
      - name: tokens
        per: identity
        capacity: 100
        refill_period: 1h
  - name: agents
    limits:
      - name: shared
        per: identity
        capacity: 10
        refill_period: 1h
        headroom: { normal: 10%, sheddable: 30% }
";

fn client(tollgate: &Tollgate) -> Client {
    Client::builder(tollgate.endpoint())
        .deadline(Duration::from_secs(2))
        .build()
        .unwrap()
}

/// Reserves `estimate` tokens of identity `who` in scope llm.
fn reserve(who: &str, estimate: u32) -> DecisionRequest {
    DecisionRequest::new("llm")
        .with_identity(who)
        .with_cost(estimate)
        .with_settle_within(Duration::from_secs(60))
}

/// Tokens `who` has left in scope llm, from a dry run.
async fn left(client: &Client, who: &str) -> u64 {
    let dry = DecisionRequest::new("llm")
        .with_identity(who)
        .with_dry_run(true);
    client.should_allow(&dry).await.unwrap().remaining
}

/// Reserves and returns the reservation of an allowed decision.
async fn reserved(client: &Client, who: &str, estimate: u32) -> Reservation {
    let d = client.should_allow(&reserve(who, estimate)).await.unwrap();
    assert!(d.allowed && !d.degraded, "{d:?}");
    d.reservation
        .expect("an allowed reservation carries a token")
}

#[tokio::test]
async fn a_reservation_settled_for_less_gives_the_difference_back() {
    let tollgate = Tollgate::start(LIMITS);
    let client = client(&tollgate);
    let reservation = reserved(&client, "alice", 80).await;
    assert_eq!(left(&client, "alice").await, 20);

    let settled = client.settle(&reservation, 30).await.unwrap();
    assert_eq!(settled.estimate, 80);
    assert_eq!(settled.buckets.len(), 1, "{settled:?}");
    assert_eq!(settled.buckets[0].rule, "tokens");
    assert_eq!(settled.buckets[0].remaining, 70, "50 of the 80 came back");
    assert_eq!(left(&client, "alice").await, 70);

    // A plain request carries no reservation.
    let plain = DecisionRequest::new("llm").with_identity("alice");
    assert_eq!(client.should_allow(&plain).await.unwrap().reservation, None);
}

#[tokio::test]
async fn a_second_settle_is_already_settled_and_a_forged_token_is_invalid() {
    let tollgate = Tollgate::start(LIMITS);
    let client = client(&tollgate);
    let reservation = reserved(&client, "bob", 10).await;
    client.settle(&reservation, 10).await.unwrap();

    let err = client.settle(&reservation, 0).await.unwrap_err();
    assert!(matches!(err, Error::AlreadySettled(_)), "{err:?}");
    assert_eq!(
        left(&client, "bob").await,
        90,
        "a refused settle gives nothing"
    );

    // One character changed in the middle, where every bit counts.
    let mut forged = reservation.into_string().into_bytes();
    let i = forged.len() / 2;
    forged[i] = if forged[i] == b'A' { b'B' } else { b'A' };
    let forged = String::from_utf8(forged).unwrap();
    for token in [forged.as_str(), "not-a-reservation", ""] {
        let err = client
            .settle(&Reservation::new(token), 0)
            .await
            .unwrap_err();
        assert!(
            matches!(err, Error::InvalidReservation(_)),
            "{token:?}: {err:?}"
        );
        assert!(err.is_invalid_input());
    }
}

#[tokio::test]
async fn an_expired_reservation_is_refused_and_its_estimate_stands() {
    let tollgate = Tollgate::start(LIMITS);
    let client = client(&tollgate);
    let ask = reserve("carol", 40).with_settle_within(Duration::from_millis(50));
    let reservation = client
        .should_allow(&ask)
        .await
        .unwrap()
        .reservation
        .unwrap();
    tokio::time::sleep(Duration::from_millis(150)).await;
    let err = client.settle(&reservation, 0).await.unwrap_err();
    assert!(matches!(err, Error::ReservationExpired(_)), "{err:?}");
    assert_eq!(left(&client, "carol").await, 60);
}

#[tokio::test]
async fn a_settle_with_tollgate_stopped_is_unavailable_even_when_failing_open() {
    let mut tollgate = Tollgate::start(LIMITS);
    let client = Client::builder(tollgate.endpoint())
        .deadline(Duration::from_secs(2))
        .failure_mode(FailureMode::Open)
        .circuit_breaker(1, Duration::from_secs(60))
        .build()
        .unwrap();
    let reservation = reserved(&client, "dave", 10).await;
    tollgate.stop();

    let err = client.settle(&reservation, 5).await.unwrap_err();
    assert!(
        matches!(&err, Error::Unavailable(cause) if *cause != FailureCause::CircuitOpen),
        "{err:?}"
    );
    // The failure opened the breaker: the next settle is refused here, at
    // once, and is still an error to retry rather than a success.
    let err = client.settle(&reservation, 5).await.unwrap_err();
    assert!(
        matches!(err, Error::Unavailable(FailureCause::CircuitOpen)),
        "{err:?}"
    );
    // A decision, by contrast, fails open, and reserves nothing.
    let d = client.should_allow(&reserve("dave", 10)).await.unwrap();
    assert!(d.allowed && d.degraded && d.reservation.is_none(), "{d:?}");
}

#[tokio::test]
async fn sheddable_is_denied_before_critical_against_a_limit_with_headroom() {
    let tollgate = Tollgate::start(LIMITS);
    let client = client(&tollgate);
    let ask = |p: Priority| {
        DecisionRequest::new("agents")
            .with_identity("crew")
            .with_priority(p)
    };
    // Of 10, SHEDDABLE must leave 3 and NORMAL 1; CRITICAL may take all.
    for i in 0..7 {
        let d = client
            .should_allow(&ask(Priority::Sheddable))
            .await
            .unwrap();
        assert!(d.allowed, "sheddable call {i}: {d:?}");
    }
    let shed = client
        .should_allow(&ask(Priority::Sheddable))
        .await
        .unwrap();
    assert!(!shed.allowed, "3 left: SHEDDABLE must leave them");
    assert!(shed.retry_after.is_some(), "{shed:?}");
    let allowed = async |p: Priority| client.should_allow(&ask(p)).await.unwrap().allowed;
    assert!(allowed(Priority::Normal).await && allowed(Priority::Normal).await);
    assert!(
        !allowed(Priority::Normal).await,
        "1 left: NORMAL must leave it"
    );
    assert!(allowed(Priority::Critical).await, "CRITICAL takes the last");
    assert!(!allowed(Priority::Critical).await, "and then there is none");
}
