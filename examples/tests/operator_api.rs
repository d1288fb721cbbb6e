//! The control panel's operator API over real HTTP on loopback: authentication, tokens, summary,
//! lists with filters and cursors, detail, tag/group edits, deregistration, and bad input.

#[path = "support/http.rs"]
mod http;

use std::sync::Arc;

use fleet_core::testing::{key_and_csr, request};
use fleet_core::{Fleet, ManualClock, MemoryStore, Timestamp};
use fleet_examples::operator::OperatorApi;
use serde_json::{Value, json};
use tokio::net::TcpListener;

const OPERATOR: &str = "s3cret-operator-token";

struct Api {
    fleet: Fleet<Arc<MemoryStore>>,
    clock: ManualClock,
    addr: std::net::SocketAddr,
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<std::io::Result<()>>,
}

async fn start() -> Api {
    let clock = ManualClock::new(Timestamp::from_unix_secs(1_790_000_000));
    let fleet = Fleet::builder(Arc::new(MemoryStore::new()))
        .clock(clock.clone())
        .open()
        .await
        .unwrap();
    let api = Arc::new(OperatorApi::new(fleet.clone(), OPERATOR));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, rx) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(api.serve(listener, async {
        let _ = rx.await;
    }));
    Api {
        fleet,
        clock,
        addr,
        stop,
        task,
    }
}

/// `GET path` with the operator token.
async fn get(api: &Api, path: &str) -> (u16, Value) {
    call(api, "GET", path, Some(OPERATOR), None).await
}

async fn call(
    api: &Api,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: Option<Value>,
) -> (u16, Value) {
    let bearer = token.map(|t| format!("Bearer {t}"));
    let headers: Vec<(&str, &str)> = bearer
        .iter()
        .map(|b| ("authorization", b.as_str()))
        .collect();
    let bytes = body
        .map(|b| serde_json::to_vec(&b).unwrap())
        .unwrap_or_default();
    let reply = http::send(api.addr, method, path, &headers, bytes).await;
    (reply.status, reply.json())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operator_api_end_to_end() {
    let api = start().await;
    let op = Some(OPERATOR);

    // Every route needs the operator token.
    for (m, p) in [
        ("GET", "/api/v1/summary"),
        ("GET", "/api/v1/tokens"),
        ("POST", "/api/v1/tokens"),
        ("GET", "/api/v1/instances"),
    ] {
        let (status, body) = call(&api, m, p, None, None).await;
        assert_eq!(
            (status, body["error"]["code"].as_str()),
            (401, Some("unauthorized")),
            "{m} {p}"
        );
        let (status, _) = call(&api, m, p, Some("wrong"), None).await;
        assert_eq!(status, 401);
    }

    // Tokens: create (secret shown once), list without secrets, detail with ledger, revoke.
    let (status, created) = call(&api, "POST", "/api/v1/tokens", op, Some(json!({"max_uses": 3, "expires_in_secs": 3600, "tags": {"env": "prod"}, "groups": ["web"], "description": "rollout"}))).await;
    assert_eq!(status, 201, "{created}");
    let secret = created["token"].as_str().unwrap().to_owned();
    assert!(created["join"].as_str().unwrap().starts_with("fleet1."));
    assert_eq!(
        created["ca_sha256"].as_str().unwrap(),
        api.fleet.ca().fingerprint().to_string()
    );
    let (_, listed) = get(&api, "/api/v1/tokens").await;
    assert_eq!(listed["items"].as_array().unwrap().len(), 1);
    assert!(
        !listed
            .to_string()
            .contains(secret.split('.').nth(1).unwrap()),
        "secrets are never listed"
    );
    let (status, bad) = call(
        &api,
        "POST",
        "/api/v1/tokens",
        op,
        Some(json!({"max_uses": "lots"})),
    )
    .await;
    assert_eq!(
        (status, bad["error"]["code"].as_str()),
        (400, Some("invalid_input"))
    );
    let (status, _) = call(
        &api,
        "POST",
        "/api/v1/tokens",
        op,
        Some(json!({"max_uses": "unlimited"})),
    )
    .await;
    assert_eq!(status, 201);

    // Two instances enroll with the token (as agents would, in process here).
    let mut ids = Vec::new();
    for host in ["web-01", "db-01"] {
        ids.push(
            api.fleet
                .enroll(request(&secret, &key_and_csr().1, host))
                .await
                .unwrap()
                .instance,
        );
    }
    let id = created["id"].as_str().unwrap();
    let (status, detail) = get(&api, &format!("/api/v1/tokens/{id}")).await;
    assert_eq!(status, 200);
    assert_eq!(detail["token"]["uses"], 2);
    assert_eq!(detail["ledger"].as_array().unwrap().len(), 2);

    // Summary and list, filtered; a bad filter gives its position.
    let (_, summary) = get(&api, "/api/v1/summary").await;
    assert_eq!(
        (summary["total"].as_u64(), summary["online"].as_u64()),
        (Some(2), Some(2))
    );
    let (_, summary) = get(&api, "/api/v1/summary?filter=text%3Aweb").await;
    assert_eq!(summary["total"], 1);
    let (status, err) = get(&api, "/api/v1/instances?filter=env%3D").await;
    assert_eq!(
        (
            status,
            err["error"]["code"].as_str(),
            err["error"]["position"].as_u64()
        ),
        (400, Some("invalid_filter"), Some(4))
    );
    let (_, page) = get(
        &api,
        "/api/v1/instances?limit=1&filter=env%3Dprod%20group%3Aweb",
    )
    .await;
    assert_eq!(page["items"].as_array().unwrap().len(), 1);
    let cursor = page["next_cursor"].as_str().unwrap().to_owned();
    let (_, rest) = get(
        &api,
        &format!("/api/v1/instances?limit=1&cursor={cursor}&filter=env%3Dprod"),
    )
    .await;
    assert_eq!(rest["items"].as_array().unwrap().len(), 1);
    assert_ne!(rest["items"][0]["id"], page["items"][0]["id"]);
    assert_eq!(rest["next_cursor"], Value::Null);
    let (status, _) = get(&api, "/api/v1/instances?limit=0").await;
    assert_eq!(status, 400);

    // Detail: status, system info, certificate expiry.
    let (status, one) = get(&api, &format!("/api/v1/instances/{}", ids[0])).await;
    assert_eq!(status, 200);
    assert_eq!(
        (one["hostname"].as_str(), one["status"].as_str()),
        (Some("web-01"), Some("online"))
    );
    assert!(one["certificate"]["not_after"].is_string(), "{one}");

    // Edits: tags and groups; invalid ones change nothing.
    let (status, _) = call(
        &api,
        "PUT",
        &format!("/api/v1/instances/{}/tags", ids[0]),
        op,
        Some(json!({"env": "staging", "tier": "critical"})),
    )
    .await;
    assert_eq!(status, 200);
    let (status, _) = call(
        &api,
        "PUT",
        &format!("/api/v1/instances/{}/tags", ids[0]),
        op,
        Some(json!({"bad key": "x"})),
    )
    .await;
    assert_eq!(status, 400);
    let (status, _) = call(
        &api,
        "PUT",
        &format!("/api/v1/instances/{}/groups", ids[0]),
        op,
        Some(json!(["database-servers"])),
    )
    .await;
    assert_eq!(status, 200);
    let (_, summary) = get(
        &api,
        "/api/v1/summary?filter=tier%3Dcritical%20group%3Adatabase-servers",
    )
    .await;
    assert_eq!(summary["total"], 1);

    // Uptime and alerts: 30 s later nothing has changed status, so uptime is 100 %.
    api.clock.advance(std::time::Duration::from_secs(30));
    let (status, up) = get(&api, &format!("/api/v1/instances/{}/uptime", ids[0])).await;
    assert_eq!(status, 200, "{up}");
    assert_eq!(up["uptime_percent"], 100.0);
    let (status, _) = get(
        &api,
        &format!("/api/v1/instances/{}/uptime?from=yesterday", ids[0]),
    )
    .await;
    assert_eq!(status, 400);
    let (status, alerts) = get(&api, "/api/v1/alerts?limit=10").await;
    assert_eq!(status, 200);
    assert_eq!(alerts["items"], json!([]));

    // Deregister; a second time is 404; revoke the token.
    let (status, _) = call(
        &api,
        "DELETE",
        &format!("/api/v1/instances/{}", ids[1]),
        op,
        None,
    )
    .await;
    assert_eq!(status, 200);
    let (status, _) = call(
        &api,
        "DELETE",
        &format!("/api/v1/instances/{}", ids[1]),
        op,
        None,
    )
    .await;
    assert_eq!(status, 404);
    let (status, revoked) = call(
        &api,
        "POST",
        &format!("/api/v1/tokens/{id}/revoke"),
        op,
        None,
    )
    .await;
    assert_eq!(status, 200);
    assert!(revoked["revoked_at"].is_string());
    let (status, _) = get(&api, "/api/v1/nothing-here").await;
    assert_eq!(status, 404);

    let _ = api.stop.send(());
    api.task.await.unwrap().unwrap();
}

/// Commands, policies, alerts, trends and recent metrics through the operator API: enqueue for
/// one instance (idempotent), for a group (one batch), list and page, cancel (409 once
/// delivered), bad input answered 400 with nothing queued; policies created, listed, evaluated
/// per instance and fleet-wide, deleted; alerts and trends after a sweep.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commands_policies_alerts_and_trends() {
    use fleet_core::{Heartbeat, MetricsSample, NewInstance, SystemInfo};
    use std::time::Duration;
    let api = start().await;
    let op = Some(OPERATOR);
    let mut ids = Vec::new();
    for n in 0..3 {
        let inst = api
            .fleet
            .register(NewInstance {
                system: SystemInfo {
                    agent_version: Some(format!("2.{n}.0")),
                    ..SystemInfo::with_hostname(format!("web-{n}"))
                },
                groups: fleet_core::Groups::from_names(if n < 2 { vec!["web"] } else { vec![] })
                    .unwrap(),
                ..NewInstance::default()
            })
            .await
            .unwrap();
        ids.push(inst.id);
    }
    for (m, p) in [
        ("GET", "/api/v1/commands"),
        ("POST", "/api/v1/commands"),
        ("GET", "/api/v1/policies"),
        ("GET", "/api/v1/trends"),
    ] {
        let (status, _) = call(&api, m, p, None, None).await;
        assert_eq!(status, 401, "{m} {p}");
    }

    // One instance, twice with the same idempotency key: one command.
    let one = json!({"target": {"instance": ids[0]}, "kind": "ping", "idempotency_key": "k1"});
    let (status, first) = call(&api, "POST", "/api/v1/commands", op, Some(one.clone())).await;
    assert_eq!(status, 201, "{first}");
    assert_eq!(
        (first["created"].as_u64(), first["batch"].is_null()),
        (Some(1), true)
    );
    let cmd_id = first["commands"][0]["id"].as_str().unwrap().to_owned();
    let (_, again) = call(&api, "POST", "/api/v1/commands", op, Some(one)).await;
    assert_eq!(
        (again["created"].as_u64(), again["existing"].as_u64()),
        (Some(0), Some(1))
    );
    assert_eq!(again["commands"][0]["id"].as_str(), Some(cmd_id.as_str()));

    // A group: one command per member, one batch.
    let (status, group) = call(&api, "POST", "/api/v1/commands", op, Some(json!({"target": {"group": "web"}, "kind": "collect-inventory", "payload": {"full": true}, "ttl_secs": 600}))).await;
    assert_eq!(status, 201, "{group}");
    assert_eq!(group["created"].as_u64(), Some(2));
    let batch = group["batch"].as_str().unwrap().to_owned();
    let (_, by_batch) = get(&api, &format!("/api/v1/commands?batch={batch}")).await;
    assert_eq!(by_batch["items"].as_array().unwrap().len(), 2);
    assert_eq!(by_batch["items"][0]["payload"]["full"], true);

    // Bad input: 400 and nothing queued.
    for bad in [
        json!({"target": {"instance": ids[0]}, "kind": "Bad Kind"}),
        json!({"target": {"instance": ids[0]}, "kind": "ping", "ttl_secs": 0}),
        json!({"target": {"filter": "status:"}, "kind": "ping"}),
        json!({"target": {"instance": ids[0]}, "kind": "ping", "extra": 1}),
    ] {
        let (status, body) = call(&api, "POST", "/api/v1/commands", op, Some(bad.clone())).await;
        assert_eq!(status, 400, "{bad} → {body}");
    }
    let (status, _) = call(
        &api,
        "POST",
        "/api/v1/commands",
        op,
        Some(json!({"target": {"instance": fleet_core::InstanceId::random()}, "kind": "ping"})),
    )
    .await;
    assert_eq!(status, 404);
    let (_, all) = get(&api, "/api/v1/commands?limit=2").await;
    assert_eq!(all["items"].as_array().unwrap().len(), 2);
    let next = all["next"].as_str().unwrap();
    let (_, rest) = get(&api, &format!("/api/v1/commands?limit=2&before={next}")).await;
    assert_eq!(
        rest["items"].as_array().unwrap().len(),
        1,
        "three commands in all"
    );
    assert_eq!(rest["next"], Value::Null);
    let (status, _) = get(&api, "/api/v1/commands?state=sleeping").await;
    assert_eq!(status, 400);

    // Instance history, cancel, and cancel after delivery.
    let (_, hist) = get(&api, &format!("/api/v1/instances/{}/commands", ids[0])).await;
    assert_eq!(hist["items"].as_array().unwrap().len(), 2);
    let (status, cancelled) = call(
        &api,
        "POST",
        &format!("/api/v1/commands/{cmd_id}/cancel"),
        op,
        None,
    )
    .await;
    assert_eq!(
        (status, cancelled["state"].as_str()),
        (200, Some("cancelled"))
    );
    let ex = api
        .fleet
        .exchange(ids[1], Heartbeat::default(), vec![])
        .await
        .unwrap();
    assert_eq!(ex.commands.len(), 1);
    let (status, body) = call(
        &api,
        "POST",
        &format!("/api/v1/commands/{}/cancel", ex.commands[0].id),
        op,
        None,
    )
    .await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (409, Some("not_cancellable"))
    );
    let (_, got) = get(&api, &format!("/api/v1/commands/{}", ex.commands[0].id)).await;
    assert_eq!(
        got["state"], "delivered",
        "the refused cancel changed nothing"
    );
    let (status, _) = get(
        &api,
        &format!("/api/v1/commands/{}", fleet_core::CommandId::from_u128(1)),
    )
    .await;
    assert_eq!(status, 404);

    // Policies.
    let policy = json!({"name": "agent-2-1", "filter": "group:web", "rule": {"agent_version_at_least": "2.1.0"}});
    let (status, created) = call(&api, "POST", "/api/v1/policies", op, Some(policy.clone())).await;
    assert_eq!(status, 201, "{created}");
    let (status, _) = call(&api, "POST", "/api/v1/policies", op, Some(policy)).await;
    assert_eq!(status, 409);
    let (status, _) = call(
        &api,
        "POST",
        "/api/v1/policies",
        op,
        Some(json!({"name": "x", "rule": {"disk_used_below_percent": 0.0}})),
    )
    .await;
    assert_eq!(status, 400);
    let (_, listed) = get(&api, "/api/v1/policies").await;
    assert_eq!(
        listed["items"].as_array().unwrap().len(),
        1,
        "the invalid one was not stored"
    );
    let (_, detail) = get(&api, &format!("/api/v1/instances/{}", ids[0])).await;
    assert_eq!(detail["policies"][0]["pass"], false);
    assert!(
        detail["policies"][0]["reason"]
            .as_str()
            .unwrap()
            .contains("2.0.0")
    );
    let (_, results) = get(&api, "/api/v1/policies/results").await;
    assert_eq!(results["items"][0]["applicable"], 2);
    assert_eq!(results["items"][0]["passing"], 1);
    assert_eq!(results["items"][0]["percent"], 50.0);
    let (status, _) = call(&api, "DELETE", "/api/v1/policies/agent-2-1", op, None).await;
    assert_eq!(status, 200);
    let (status, _) = call(&api, "DELETE", "/api/v1/policies/agent-2-1", op, None).await;
    assert_eq!(status, 404);

    // Metrics, alerts and trends.
    for _ in 0..3 {
        api.clock.advance(Duration::from_secs(15));
        let metrics = MetricsSample {
            cpu_percent: Some(42.0),
            ..MetricsSample::default()
        };
        api.fleet
            .heartbeat(
                ids[1],
                Heartbeat {
                    metrics: Some(metrics),
                    apps: None,
                },
            )
            .unwrap();
        api.fleet.sweep();
    }
    let (_, points) = get(&api, &format!("/api/v1/instances/{}/metrics", ids[1])).await;
    assert_eq!(points["items"].as_array().unwrap().len(), 3);
    assert_eq!(points["items"][2]["cpu_percent"], 42.0);
    api.clock.advance(Duration::from_secs(400));
    api.fleet.sweep();
    let (_, alerts) = get(&api, "/api/v1/alerts").await;
    assert!(alerts["items"].as_array().unwrap().len() >= 6, "{alerts}");
    assert!(
        alerts["fleet"].as_array().unwrap().is_empty(),
        "3 instances: below the mass minimum"
    );
    let (_, one) = get(&api, "/api/v1/alerts?filter=text:web-1").await;
    let items = one["items"].as_array().unwrap();
    assert!(!items.is_empty());
    assert!(
        items.iter().all(|c| c["instance"] == json!(ids[1])),
        "{one}"
    );
    assert!(one["fleet"].as_array().unwrap().is_empty());
    let (_, web) = get(&api, "/api/v1/alerts?filter=group:web").await;
    let web_ids: std::collections::HashSet<String> = web["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["instance"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(web_ids.len(), 2, "web-0 and web-1, not web-2");
    let (status, bad) = get(&api, "/api/v1/alerts?filter=status:").await;
    assert_eq!(
        (status, bad["error"]["code"].as_str()),
        (400, Some("invalid_filter"))
    );
    let (_, trends) = get(&api, "/api/v1/trends").await;
    let items = trends["items"].as_array().unwrap();
    assert!(!items.is_empty());
    assert!(
        items
            .iter()
            .map(|b| b["samples"].as_u64().unwrap())
            .sum::<u64>()
            >= 4
    );
    let (status, _) = get(&api, "/api/v1/trends?from=yesterday").await;
    assert_eq!(status, 400);

    let _ = api.stop.send(());
    api.task.await.unwrap().unwrap();
}

/// Each filter limit (fleet_core::filter) is refused with 400 `filter_too_large` naming the limit
/// and the field — as a query parameter and inside a command's or a policy's body — and nothing
/// is created.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn filter_limits_answer_400_naming_the_limit() {
    use fleet_core::{FilterLimit, NewInstance, SystemInfo};
    let api = start().await;
    let op = Some(OPERATOR);
    api.fleet
        .register(NewInstance {
            system: SystemInfo::with_hostname("web-0"),
            ..NewInstance::default()
        })
        .await
        .unwrap();
    let list = |prefix: &str, n: usize, sep: &str| {
        (0..n)
            .map(|i| format!("{prefix}{i}"))
            .collect::<Vec<_>>()
            .join(sep)
    };
    let groups_in_terms = |n: usize| {
        (0..n)
            .collect::<Vec<_>>()
            .chunks(64)
            .map(|c| {
                let v: Vec<String> = c.iter().map(|i| format!("g{i}")).collect();
                format!("group:{}", v.join("|"))
            })
            .collect::<Vec<_>>()
            .join(" ")
    };
    let long = "x".repeat(253);
    let cases = [
        (FilterLimit::Length, "a ".repeat(2049)),
        (FilterLimit::Terms, list("k", 65, " ")),
        (FilterLimit::Values, format!("group:{}", list("v", 65, "|"))),
        (FilterLimit::TotalValues, groups_in_terms(257)),
        (FilterLimit::TextLength, format!("text:{long}x")),
        (
            FilterLimit::TotalTextLength,
            format!("text:{}", [long.as_str(); 5].join("|")),
        ),
    ];
    let encode = |f: &str| form_urlencoded::byte_serialize(f.as_bytes()).collect::<String>();
    for (limit, filter) in &cases {
        for path in ["/api/v1/summary", "/api/v1/instances", "/api/v1/alerts"] {
            let (status, body) = get(&api, &format!("{path}?filter={}", encode(filter))).await;
            let e = &body["error"];
            assert_eq!(status, 400, "{limit} on {path}: {body}");
            assert_eq!(e["code"], "filter_too_large", "{limit} on {path}: {body}");
            assert_eq!(e["field"], "filter", "{body}");
            assert_eq!(e["limit"], limit.name(), "{body}");
            assert_eq!(e["max"].as_u64(), Some(limit.max() as u64), "{body}");
            assert!(e["position"].is_u64(), "{body}");
            assert!(
                e["message"].as_str().unwrap().contains(limit.name()),
                "the message names the limit: {body}"
            );
        }
        let (status, body) = call(
            &api,
            "POST",
            "/api/v1/commands",
            op,
            Some(json!({"target": {"filter": filter}, "kind": "ping"})),
        )
        .await;
        assert_eq!(
            (
                status,
                body["error"]["code"].as_str(),
                body["error"]["limit"].as_str()
            ),
            (400, Some("filter_too_large"), Some(limit.name())),
            "{body}"
        );
        let (status, body) = call(
            &api,
            "POST",
            "/api/v1/policies",
            op,
            Some(json!({"name": "big", "filter": filter, "rule": {"agent_version_at_least": "1.0.0"}})),
        )
        .await;
        assert_eq!(
            (
                status,
                body["error"]["code"].as_str(),
                body["error"]["limit"].as_str()
            ),
            (400, Some("filter_too_large"), Some(limit.name())),
            "{body}"
        );
    }
    // A syntax error keeps its own code, with the field too.
    let (status, body) = get(&api, "/api/v1/summary?filter=env%3D").await;
    assert_eq!(
        (
            status,
            body["error"]["code"].as_str(),
            body["error"]["field"].as_str()
        ),
        (400, Some("invalid_filter"), Some("filter"))
    );
    assert!(body["error"].get("limit").is_none());
    // Nothing was created.
    let (_, commands) = get(&api, "/api/v1/commands").await;
    assert_eq!(
        commands["items"].as_array().map(Vec::len),
        Some(0),
        "{commands}"
    );
    let (_, policies) = get(&api, "/api/v1/policies").await;
    assert_eq!(
        policies["items"].as_array().map(Vec::len),
        Some(0),
        "{policies}"
    );
    // At the limits, the same requests are answered.
    let heaviest = groups_in_terms(256);
    let (status, body) = get(
        &api,
        &format!("/api/v1/summary?filter={}", encode(&heaviest)),
    )
    .await;
    assert_eq!((status, body["total"].as_u64()), (200, Some(0)), "{body}");

    let _ = api.stop.send(());
    api.task.await.unwrap().unwrap();
}
