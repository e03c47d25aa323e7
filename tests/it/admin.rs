//! `tollgate.v1.Admin` over the wire, and the `top` and `explain` commands
//! against real servers.

use std::process::Command;

use tollgate::pb::tollgate::v1::admin_client::AdminClient;
use tollgate::pb::tollgate::v1::{
    ExplainRequest, RankBy, TopIdentitiesRequest, UtilizationRequest, Window,
};
use tonic::transport::Channel;

use crate::common::{TestServer, ask, req, sha256_hex, with_token};

const BIN: &str = env!("CARGO_BIN_EXE_tollgate");

const CONFIG: &str = "
scopes:
  - name: demo
    limits:
      - {name: per-user, per: identity, capacity: 3, refill_period: 1h}
      # One token back per 36 s: the explain test reads 99999 exactly,
      # which a refill every 36 ms (1h) raced on a loaded machine.
      - {name: global, per: scope, capacity: 100000, refill_period: 1000h}
      - {name: premium, per: identity, capacity: 50, refill_period: 1h, when: {tier: premium}}
";

async fn admin(server: &TestServer) -> AdminClient<Channel> {
    AdminClient::new(server.channel().await)
}

/// alice decides 10 times (7 denied), u0..u6 4 times each (1 denied each).
async fn traffic(server: &TestServer) {
    let mut c = server.client().await;
    for _ in 0..10 {
        ask(&mut c, req("demo", "alice", "op")).await;
    }
    for u in 0..7 {
        for _ in 0..4 {
            ask(&mut c, req("demo", &format!("u{u}"), "op")).await;
        }
    }
}

fn top_request(rule: &str, by: RankBy) -> TopIdentitiesRequest {
    TopIdentitiesRequest {
        scope: "demo".into(),
        rule: rule.into(),
        window: Window::Window1m.into(),
        by: by.into(),
        limit: 3,
    }
}

#[tokio::test]
async fn top_identities_rank_callers_by_decisions_and_by_denials() {
    let server = TestServer::start(CONFIG).await;
    traffic(&server).await;
    let mut a = admin(&server).await;
    let top = a
        .top_identities(top_request("per-user", RankBy::Decisions))
        .await
        .expect("top")
        .into_inner();
    assert_eq!(top.rules.len(), 1);
    let t = &top.rules[0];
    assert_eq!((t.total, t.error_bound), (38, 0));
    let got: Vec<(&str, u64)> = t
        .identities
        .iter()
        .map(|c| (c.identity.as_str(), c.count))
        .collect();
    assert_eq!(got, [("alice", 10), ("u0", 4), ("u1", 4)]);
    assert_eq!(t.absent_at_most, 4, "the list was cut at 3 of 8");

    let denials = a
        .top_identities(top_request("", RankBy::Denials))
        .await
        .expect("top")
        .into_inner();
    let rules: Vec<&str> = denials.rules.iter().map(|r| r.rule.as_str()).collect();
    assert_eq!(rules, ["global", "per-user"], "every rule seen, sorted");
    let per_user = &denials.rules[1];
    assert_eq!(per_user.total, 14);
    assert_eq!(per_user.identities[0].identity, "alice");
    assert_eq!(per_user.identities[0].count, 7);
    assert!(
        denials.rules[0].identities.is_empty(),
        "global never denied"
    );
    server.shutdown().await;
}

#[tokio::test]
async fn utilization_reports_fill_denied_share_and_capacity_hints() {
    let server = TestServer::start(CONFIG).await;
    traffic(&server).await;
    let mut a = admin(&server).await;
    let u = a
        .utilization(UtilizationRequest {
            scope: "demo".into(),
            window: Window::Window5m.into(),
        })
        .await
        .expect("utilization")
        .into_inner();
    let names: Vec<&str> = u.rules.iter().map(|r| r.rule.as_str()).collect();
    assert_eq!(names, ["per-user", "global", "premium"], "config order");
    let per_user = &u.rules[0];
    assert_eq!((per_user.decisions, per_user.denials), (38, 14));
    assert_eq!(per_user.capacity, 3);
    assert!((per_user.denied_share - 14.0 / 38.0).abs() < 1e-9);
    assert_eq!(per_user.remaining_histogram.iter().sum::<u64>(), 38);
    // Left empty: 14 denials and each caller's third call (8).
    assert_eq!(per_user.remaining_histogram[0], 22);
    assert_eq!(per_user.denied_identities, 8);
    let kinds: Vec<(&str, f64)> = per_user
        .hints
        .iter()
        .map(|h| (h.kind.as_str(), h.figure))
        .collect();
    assert_eq!(kinds.len(), 2, "{kinds:?}");
    assert_eq!(kinds[0], ("many_identities_denied", 8.0));
    assert_eq!(kinds[1].0, "runs_nearly_empty");
    assert!((kinds[1].1 - 22.0 / 38.0).abs() < 1e-9);
    assert!(u.rules[1].hints.is_empty(), "global runs nearly full");
    assert_eq!(u.rules[2].decisions, 0, "premium never applied");
    assert_eq!(per_user.decisions_per_second.iter().sum::<u32>(), 38);
    server.shutdown().await;
}

#[tokio::test]
async fn explain_takes_nothing_and_says_why_a_limit_does_not_apply() {
    let server = TestServer::start(CONFIG).await;
    let mut a = admin(&server).await;
    let explain = || ExplainRequest {
        request: Some(req("demo", "dave", "op")),
    };
    for _ in 0..5 {
        let e = a.explain(explain()).await.expect("explain").into_inner();
        assert!(e.scope_configured);
        assert!(e.decision.expect("decision").allowed);
    }
    // Five explanations took nothing: dave's first real call finds 3.
    let mut c = server.client().await;
    assert_eq!(ask(&mut c, req("demo", "dave", "op")).await.remaining, 2);
    let e = a.explain(explain()).await.expect("explain").into_inner();
    let limits: Vec<(&str, bool, Option<u64>, &str)> = e
        .limits
        .iter()
        .map(|l| {
            let remaining = l.bucket.as_ref().map(|b| b.remaining);
            (
                l.rule.as_str(),
                l.applies,
                remaining,
                l.skipped_because.as_str(),
            )
        })
        .collect();
    assert_eq!(
        limits,
        [
            ("per-user", true, Some(2), ""),
            ("global", true, Some(99999), ""),
            ("premium", false, None, "needs attributes tier=premium"),
        ]
    );
    let bad = a
        .top_identities(TopIdentitiesRequest {
            window: 9,
            ..Default::default()
        })
        .await
        .expect_err("unknown window");
    assert_eq!(bad.code(), tonic::Code::InvalidArgument);
    server.shutdown().await;
}

fn run(args: &[&str]) -> String {
    let out = Command::new(BIN).args(args).output().expect("run tollgate");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{args:?}: {stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn top_merges_replicas_and_explain_prints_each_limit() {
    let (one, two) = (
        TestServer::start(CONFIG).await,
        TestServer::start(CONFIG).await,
    );
    let (mut c1, mut c2) = (one.client().await, two.client().await);
    for _ in 0..4 {
        ask(&mut c1, req("demo", "erin", "op")).await;
        ask(&mut c2, req("demo", "erin", "op")).await;
    }
    ask(&mut c2, req("demo", "fay", "op")).await;
    let screen = tokio::task::block_in_place(|| {
        run(&["top", "-n", "1", "--addr", &one.url(), "--addr", &two.url()])
    });
    assert!(screen.contains("2 replica(s)"), "{screen}");
    let erin = screen
        .lines()
        .find(|l| l.trim_start().starts_with("erin"))
        .unwrap_or_else(|| panic!("erin missing: {screen}"));
    assert_eq!(erin.split_whitespace().nth(1), Some("8"), "{screen}");
    assert!(screen.contains("demo/per-user"), "{screen}");
    assert!(
        !screen.contains("\x1b["),
        "no screen control codes off a terminal"
    );

    let explained = tokio::task::block_in_place(|| {
        run(&[
            "explain",
            "--addr",
            &one.url(),
            "--scope",
            "demo",
            "--identity",
            "erin",
        ])
    });
    assert!(explained.starts_with("would be DENIED"), "{explained}");
    assert!(explained.contains("per-user"), "{explained}");
    assert!(
        explained.contains("does not apply: needs attributes tier=premium"),
        "{explained}"
    );
    one.shutdown().await;
    two.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_callers_granted_admin_may_call_the_admin_rpcs() {
    let yaml = format!(
        "callers:
  - {{name: app, token_sha256: {}, scopes: [\"*\"]}}
  - {{name: ops, token_sha256: {}, scopes: [\"*\"], admin: true}}
{CONFIG}",
        sha256_hex("app-token"),
        sha256_hex("ops-token")
    );
    let server = TestServer::start(&yaml).await;
    let mut a = admin(&server).await;
    let top = || top_request("", RankBy::Decisions);
    let refused = a
        .top_identities(with_token("app-token", top()))
        .await
        .expect_err("app has no admin grant");
    assert_eq!(refused.code(), tonic::Code::PermissionDenied);
    assert!(
        refused.message().starts_with("TopIdentities: "),
        "{refused:?}"
    );
    let anonymous = a.utilization(UtilizationRequest::default()).await;
    assert_eq!(
        anonymous.expect_err("no credentials").code(),
        tonic::Code::Unauthenticated
    );
    let explain = ExplainRequest {
        request: Some(req("demo", "x", "op")),
    };
    let refused = a.explain(with_token("app-token", explain.clone())).await;
    assert_eq!(
        refused.expect_err("no admin grant").code(),
        tonic::Code::PermissionDenied
    );
    a.top_identities(with_token("ops-token", top()))
        .await
        .expect("ops is granted admin");
    a.explain(with_token("ops-token", explain))
        .await
        .expect("ops is granted admin");
    let url = server.url();
    let screen = tokio::task::block_in_place(|| run(&["top", "-n", "1", "--addr", &url]));
    assert!(
        screen.contains("unreachable") && screen.contains("no credentials"),
        "{screen}"
    );
    let screen = tokio::task::block_in_place(|| {
        run(&["top", "-n", "1", "--addr", &url, "--token", "ops-token"])
    });
    assert!(screen.contains("demo/per-user"), "{screen}");
    server.shutdown().await;
}
