//! The control panel's operator API over real HTTP on loopback: authentication, tokens, summary,
//! lists with filters and cursors, detail, tag/group edits, deregistration, and bad input.

use std::sync::Arc;

use fleet_core::testing::{key_and_csr, request};
use fleet_core::{Fleet, ManualClock, MemoryStore, Timestamp};
use fleet_examples::operator::OperatorApi;
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use tokio::net::{TcpListener, TcpStream};

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

async fn call(
    api: &Api,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: Option<Value>,
) -> (u16, Value) {
    let tcp = TcpStream::connect(api.addr).await.unwrap();
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .unwrap();
    tokio::spawn(conn);
    let mut req = hyper::Request::builder()
        .method(method)
        .uri(path)
        .header("host", "localhost");
    if let Some(t) = token {
        req = req.header("authorization", format!("Bearer {t}"));
    }
    let bytes = body
        .map(|b| serde_json::to_vec(&b).unwrap())
        .unwrap_or_default();
    let resp = sender
        .send_request(req.body(Full::new(Bytes::from(bytes))).unwrap())
        .await
        .unwrap();
    let status = resp.status().as_u16();
    let bytes = resp.into_body().collect().await.unwrap().to_bytes();
    (
        status,
        serde_json::from_slice(&bytes).unwrap_or(Value::Null),
    )
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
    let (_, listed) = call(&api, "GET", "/api/v1/tokens", op, None).await;
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
    let (status, detail) = call(&api, "GET", &format!("/api/v1/tokens/{id}"), op, None).await;
    assert_eq!(status, 200);
    assert_eq!(detail["token"]["uses"], 2);
    assert_eq!(detail["ledger"].as_array().unwrap().len(), 2);

    // Summary and list, filtered; a bad filter gives its position.
    let (_, summary) = call(&api, "GET", "/api/v1/summary", op, None).await;
    assert_eq!(
        (summary["total"].as_u64(), summary["online"].as_u64()),
        (Some(2), Some(2))
    );
    let (_, summary) = call(&api, "GET", "/api/v1/summary?filter=text%3Aweb", op, None).await;
    assert_eq!(summary["total"], 1);
    let (status, err) = call(&api, "GET", "/api/v1/instances?filter=env%3D", op, None).await;
    assert_eq!(
        (
            status,
            err["error"]["code"].as_str(),
            err["error"]["position"].as_u64()
        ),
        (400, Some("invalid_filter"), Some(4))
    );
    let (_, page) = call(
        &api,
        "GET",
        "/api/v1/instances?limit=1&filter=env%3Dprod%20group%3Aweb",
        op,
        None,
    )
    .await;
    assert_eq!(page["items"].as_array().unwrap().len(), 1);
    let cursor = page["next_cursor"].as_str().unwrap().to_owned();
    let (_, rest) = call(
        &api,
        "GET",
        &format!("/api/v1/instances?limit=1&cursor={cursor}&filter=env%3Dprod"),
        op,
        None,
    )
    .await;
    assert_eq!(rest["items"].as_array().unwrap().len(), 1);
    assert_ne!(rest["items"][0]["id"], page["items"][0]["id"]);
    assert_eq!(rest["next_cursor"], Value::Null);
    let (status, _) = call(&api, "GET", "/api/v1/instances?limit=0", op, None).await;
    assert_eq!(status, 400);

    // Detail: status, system info, certificate expiry.
    let (status, one) = call(
        &api,
        "GET",
        &format!("/api/v1/instances/{}", ids[0]),
        op,
        None,
    )
    .await;
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
    let (_, summary) = call(
        &api,
        "GET",
        "/api/v1/summary?filter=tier%3Dcritical%20group%3Adatabase-servers",
        op,
        None,
    )
    .await;
    assert_eq!(summary["total"], 1);

    // Uptime and alerts: 30 s later nothing has changed status, so uptime is 100 %.
    api.clock.advance(std::time::Duration::from_secs(30));
    let (status, up) = call(
        &api,
        "GET",
        &format!("/api/v1/instances/{}/uptime", ids[0]),
        op,
        None,
    )
    .await;
    assert_eq!(status, 200, "{up}");
    assert_eq!(up["uptime_percent"], 100.0);
    let (status, _) = call(
        &api,
        "GET",
        &format!("/api/v1/instances/{}/uptime?from=yesterday", ids[0]),
        op,
        None,
    )
    .await;
    assert_eq!(status, 400);
    let (status, alerts) = call(&api, "GET", "/api/v1/alerts?limit=10", op, None).await;
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
    let (status, _) = call(&api, "GET", "/api/v1/nothing-here", op, None).await;
    assert_eq!(status, 404);

    let _ = api.stop.send(());
    api.task.await.unwrap().unwrap();
}
