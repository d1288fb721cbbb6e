//! Who may use the operator listener, over real HTTP on loopback: pages redirect to the login
//! page without a session; login sets an HttpOnly, SameSite=Strict cookie; cookie writes need the
//! CSRF header and a same-origin `Origin`; sessions end at logout and at expiry (manual clock);
//! and an operator token scoped to a tenant sees and changes only that tenant, API and pages.

#[path = "support/http.rs"]
mod http;

use std::sync::Arc;
use std::time::Duration;

use fleet_core::testing::enroll_with;
use fleet_core::{
    Fleet, InstanceId, ManualClock, MemoryStore, NewToken, TenantId, TenantScope, Timestamp,
};
use fleet_examples::operator::OperatorApi;
use fleet_examples::operator::auth::SESSION_TTL;
use http::Reply;
use serde_json::{Value, json};
use tokio::net::TcpListener;

const OPERATOR: &str = "global-operator-token";
const ACME: &str = "acme-operator-token";

struct Api {
    fleet: Fleet<Arc<MemoryStore>>,
    clock: ManualClock,
    api: Arc<OperatorApi<Arc<MemoryStore>>>,
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
    let api = Arc::new(
        OperatorApi::new(fleet.clone(), OPERATOR)
            .tenant_token(TenantId::new("acme").unwrap(), ACME),
    );
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, rx) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(Arc::clone(&api).serve(listener, async {
        let _ = rx.await;
    }));
    Api {
        fleet,
        clock,
        api,
        addr,
        stop,
        task,
    }
}

async fn send(api: &Api, method: &str, path: &str, headers: &[(&str, &str)], body: &str) -> Reply {
    http::send(api.addr, method, path, headers, body.to_owned()).await
}

/// Logs in with `token`; returns the `Cookie` header value and the CSRF token.
async fn login(api: &Api, token: &str) -> (String, String) {
    let form = format!("token={token}&next=%2Ftokens");
    let r = send(
        api,
        "POST",
        "/login",
        &[("content-type", "application/x-www-form-urlencoded")],
        &form,
    )
    .await;
    assert_eq!(r.status, 303, "{}", r.text());
    assert_eq!(r.header("location"), "/tokens");
    let set = r.header("set-cookie").to_owned();
    for flag in ["HttpOnly", "SameSite=Strict", "Path=/"] {
        assert!(set.contains(flag), "{set}");
    }
    let cookie = set.split(';').next().unwrap().to_owned();
    let page = send(api, "GET", "/", &[("cookie", &cookie)], "").await;
    assert_eq!(page.status, 200);
    let html = page.text();
    let csrf = html
        .split("name=\"fleet-csrf\" content=\"")
        .nth(1)
        .and_then(|s| s.split('"').next())
        .unwrap()
        .to_owned();
    assert!(csrf.len() >= 20, "{csrf}");
    (cookie, csrf)
}

async fn enroll(api: &Api, host: &str, tenant: Option<&str>) -> InstanceId {
    let token = NewToken {
        tenant: tenant.map(|t| TenantId::new(t).unwrap()),
        ..NewToken::default()
    };
    enroll_with(&api.fleet, token, host).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pages_need_a_session_and_logins_make_one() {
    let api = start().await;
    let id = enroll(&api, "web-01", None).await;

    // Without a session, every page sends the browser to the login page.
    for page in [
        "/",
        "/health",
        "/tokens",
        &format!("/instances/{id}"),
        "/?status=online",
    ] {
        let r = send(&api, "GET", page, &[], "").await;
        assert_eq!(r.status, 303, "{page}");
        let next = form_urlencoded::byte_serialize(page.as_bytes()).collect::<String>();
        assert_eq!(
            r.header("location"),
            format!("/login?next={next}"),
            "{page}"
        );
        assert!(r.body.is_empty(), "{page}: nothing of the fleet is sent");
    }
    // A bearer token does not open pages either: pages are for browser sessions.
    let r = send(
        &api,
        "GET",
        "/",
        &[("authorization", &format!("Bearer {OPERATOR}"))],
        "",
    )
    .await;
    assert_eq!(r.status, 303);
    // The login page and the assets are public, and carry no fleet data.
    let r = send(&api, "GET", "/login?next=%2Ftokens", &[], "").await;
    assert_eq!(r.status, 200);
    assert!(r.text().contains(r#"name="next" value="/tokens""#));
    assert!(
        r.header("content-security-policy")
            .contains("script-src 'self'")
    );
    for asset in ["/assets/app.js", "/assets/app.css", "/assets/icon.svg"] {
        let r = send(&api, "GET", asset, &[], "").await;
        assert_eq!(r.status, 200, "{asset}");
        assert!(!r.body.is_empty());
    }
    assert_eq!(
        send(&api, "GET", "/assets/nope.js", &[], "").await.status,
        404
    );
    // The login page never sends anyone off-site.
    let r = send(&api, "GET", "/login?next=%2F%2Fevil.example", &[], "").await;
    assert!(r.text().contains(r#"name="next" value="/""#));

    // A wrong token: 401, the form again with a message, no cookie, no session.
    let r = send(
        &api,
        "POST",
        "/login",
        &[("content-type", "application/x-www-form-urlencoded")],
        "token=wrong",
    )
    .await;
    assert_eq!(r.status, 401);
    assert!(r.text().contains("not an operator token"));
    assert!(r.headers.get("set-cookie").is_none());
    assert_eq!(api.api.auth().session_count(), 0);
    // A cross-site login form is refused.
    let r = send(
        &api,
        "POST",
        "/login",
        &[
            ("content-type", "application/x-www-form-urlencoded"),
            ("origin", "http://evil.example"),
        ],
        &format!("token={OPERATOR}"),
    )
    .await;
    assert_eq!(r.status, 403);
    assert_eq!(api.api.auth().session_count(), 0);

    // Logged in: pages and the API answer to the cookie.
    let (cookie, csrf) = login(&api, OPERATOR).await;
    let c = [("cookie", cookie.as_str())];
    assert_eq!(send(&api, "GET", "/health", &c, "").await.status, 200);
    let s = send(&api, "GET", "/api/v1/session", &c, "").await;
    assert_eq!(s.json()["csrf"], Value::from(csrf.as_str()));
    assert_eq!(s.json()["tenant"], Value::Null);
    let summary = send(&api, "GET", "/api/v1/summary", &c, "").await;
    assert_eq!(summary.json()["total"], 1);
    assert_eq!(summary.header("cache-control"), "no-store", "never cached");

    // A write with the cookie needs the CSRF header, and a same-origin Origin if any.
    let tags = r#"{"env":"prod"}"#;
    let path = format!("/api/v1/instances/{id}/tags");
    let r = send(&api, "PUT", &path, &c, tags).await;
    assert_eq!((r.status, r.code().as_deref()), (403, Some("csrf_failed")));
    let r = send(
        &api,
        "PUT",
        &path,
        &[c[0], ("x-csrf-token", "forged")],
        tags,
    )
    .await;
    assert_eq!(r.status, 403);
    let origin = "http://evil.example";
    let r = send(
        &api,
        "PUT",
        &path,
        &[c[0], ("x-csrf-token", &csrf), ("origin", origin)],
        tags,
    )
    .await;
    assert_eq!(r.status, 403);
    assert!(
        api.fleet
            .get(&TenantScope::All, id)
            .unwrap()
            .tags
            .is_empty(),
        "refused writes change nothing"
    );
    let own = format!("http://{}", api.addr);
    let r = send(
        &api,
        "PUT",
        &path,
        &[c[0], ("x-csrf-token", &csrf), ("origin", &own)],
        tags,
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(
        api.fleet
            .get(&TenantScope::All, id)
            .unwrap()
            .tags
            .get("env")
            .map(|v| v.as_str()),
        Some("prod")
    );

    // A wrong bearer token is not rescued by a good cookie.
    let r = send(
        &api,
        "GET",
        "/api/v1/summary",
        &[c[0], ("authorization", "Bearer wrong")],
        "",
    )
    .await;
    assert_eq!(r.status, 401);

    // Another site cannot log the operator out: no cookie is cleared, the session lives.
    let r = send(&api, "POST", "/logout", &[("origin", origin)], "").await;
    assert_eq!(r.status, 403);
    assert!(r.headers.get("set-cookie").is_none());
    let r = send(&api, "POST", "/logout", &[], "").await;
    assert!(
        r.headers.get("set-cookie").is_none(),
        "no session, nothing to clear"
    );
    assert_eq!(
        send(&api, "GET", "/api/v1/summary", &c, "").await.status,
        200
    );

    // Logout needs the CSRF header too, then the cookie is dead.
    assert_eq!(send(&api, "POST", "/logout", &c, "").await.status, 403);
    let r = send(
        &api,
        "POST",
        "/logout",
        &[c[0], ("x-csrf-token", &csrf)],
        "",
    )
    .await;
    assert_eq!(r.status, 204);
    assert!(r.header("set-cookie").contains("Max-Age=0"));
    assert_eq!(
        send(&api, "GET", "/api/v1/summary", &c, "").await.status,
        401
    );
    assert_eq!(send(&api, "GET", "/", &c, "").await.status, 303);

    // Sessions expire by the fleet's clock.
    let (cookie, _) = login(&api, OPERATOR).await;
    let c = [("cookie", cookie.as_str())];
    api.clock.advance(SESSION_TTL - Duration::from_secs(1));
    assert_eq!(
        send(&api, "GET", "/api/v1/summary", &c, "").await.status,
        200
    );
    api.clock.advance(Duration::from_secs(1));
    assert_eq!(
        send(&api, "GET", "/api/v1/summary", &c, "").await.status,
        401
    );
    assert_eq!(send(&api, "GET", "/tokens", &c, "").await.status, 303);

    let _ = api.stop.send(());
    api.task.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenant_token_sees_and_changes_only_its_tenant() {
    let api = start().await;
    let mine = enroll(&api, "acme-01", Some("acme")).await;
    let theirs = enroll(&api, "globex-01", Some("globex")).await;
    let shared = enroll(&api, "shared-01", None).await;
    let bearer = format!("Bearer {ACME}");
    let a = [("authorization", bearer.as_str())];

    let list = send(&api, "GET", "/api/v1/instances", &a, "").await.json();
    let ids: Vec<&str> = list["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, [mine.to_string()]);
    assert_eq!(
        send(&api, "GET", "/api/v1/summary", &a, "").await.json()["total"],
        1
    );
    assert_eq!(
        send(&api, "GET", "/api/v1/session", &a, "").await.json()["tenant"],
        "acme"
    );
    for other in [theirs, shared] {
        for (m, p, body) in [
            ("GET", format!("/api/v1/instances/{other}"), ""),
            (
                "PUT",
                format!("/api/v1/instances/{other}/tags"),
                r#"{"x":"y"}"#,
            ),
            (
                "PUT",
                format!("/api/v1/instances/{other}/groups"),
                r#"["g"]"#,
            ),
            ("DELETE", format!("/api/v1/instances/{other}"), ""),
            ("GET", format!("/api/v1/instances/{other}/metrics"), ""),
            ("GET", format!("/api/v1/instances/{other}/commands"), ""),
        ] {
            let r = send(&api, m, &p, &a, body).await;
            assert_eq!(r.status, 404, "{m} {p}: {}", r.text());
        }
        let inst = api.fleet.get(&TenantScope::All, other).unwrap();
        assert!(
            inst.tags.is_empty() && inst.groups.is_empty(),
            "nothing changed"
        );
    }
    // A command aimed at another tenant's instance is refused; a filter reaches only its own.
    let r = send(
        &api,
        "POST",
        "/api/v1/commands",
        &a,
        &json!({"target": {"instance": theirs}, "kind": "ping"}).to_string(),
    )
    .await;
    assert_eq!(r.status, 404, "{}", r.text());
    // Fleet-wide routes are for global operators.
    for (m, p, body) in [
        ("GET", "/metrics", ""),
        ("GET", "/api/v1/trends", ""),
        (
            "POST",
            "/api/v1/policies",
            r#"{"name":"x","rule":{"max_cpu_percent":90}}"#,
        ),
        ("DELETE", "/api/v1/policies/x", ""),
    ] {
        let r = send(&api, m, p, &a, body).await;
        assert_eq!(
            (r.status, r.code().as_deref()),
            (403, Some("forbidden")),
            "{m} {p}"
        );
    }
    assert!(api.fleet.policies().await.unwrap().is_empty());
    // Its tokens are its tenant's, and it cannot make one for another.
    let r = send(&api, "POST", "/api/v1/tokens", &a, r#"{"tenant":"globex"}"#).await;
    assert_eq!(r.status, 400, "{}", r.text());
    let r = send(&api, "POST", "/api/v1/tokens", &a, "{}").await;
    assert_eq!(r.status, 201);
    let listed = send(&api, "GET", "/api/v1/tokens", &a, "").await.json();
    let tenants: Vec<&Value> = listed["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| &t["tenant"])
        .collect();
    assert!(
        !tenants.is_empty() && tenants.iter().all(|t| *t == "acme"),
        "{tenants:?}"
    );
    // The same holds through a browser session made with the tenant token.
    let (cookie, _) = login(&api, ACME).await;
    let page = send(&api, "GET", "/", &[("cookie", &cookie)], "").await;
    assert!(
        page.text()
            .contains(r#"name="fleet-tenant" content="acme""#)
    );
    let r = send(
        &api,
        "GET",
        &format!("/api/v1/instances/{theirs}"),
        &[("cookie", &cookie)],
        "",
    )
    .await;
    assert_eq!(r.status, 404);
    // Everything else another tenant owns answers 404 (or, for lists, leaves it out).
    let g = format!("Bearer {OPERATOR}");
    let global = [("authorization", g.as_str())];
    let globex_token = api
        .fleet
        .create_token(
            &TenantScope::All,
            NewToken {
                tenant: Some(TenantId::new("globex").unwrap()),
                ..NewToken::default()
            },
        )
        .await
        .unwrap()
        .token
        .id;
    let queued = send(
        &api,
        "POST",
        "/api/v1/commands",
        &global,
        &json!({"target": {"instance": theirs}, "kind": "ping"}).to_string(),
    )
    .await
    .json();
    let command = queued["commands"][0]["id"].as_str().unwrap().to_owned();
    let batch = queued["batch"].as_str().map(str::to_owned);
    for (policy, filter) in [("everyone", ""), ("globex-only", "tenant:globex")] {
        let r = send(
            &api,
            "POST",
            "/api/v1/policies",
            &global,
            &json!({"name": policy, "filter": filter, "rule": {"tag_present": "env"}}).to_string(),
        )
        .await;
        assert_eq!(r.status, 201, "{}", r.text());
    }
    // Every instance goes quiet long enough to be warning: each now has an alert.
    api.clock.advance(Duration::from_secs(61));
    assert_eq!(api.fleet.sweep().len(), 3);
    for p in [
        format!("/api/v1/alerts?instance={theirs}"),
        "/api/v1/alerts?filter=tenant%3Aglobex".to_owned(),
    ] {
        let seen = send(&api, "GET", &p, &global, "").await.json();
        assert_eq!(
            seen["items"].as_array().map(Vec::len),
            Some(1),
            "{p}: {seen}"
        );
    }
    let own = send(&api, "GET", "/api/v1/alerts", &a, "").await.json();
    let own: Vec<&str> = own["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["instance"].as_str().unwrap())
        .collect();
    assert_eq!(own, [mine.to_string()], "only its own instance's alert");
    let tok = globex_token.as_str();
    for (m, p) in [
        ("GET", format!("/api/v1/tokens/{tok}")),
        ("POST", format!("/api/v1/tokens/{tok}/revoke")),
        ("GET", format!("/api/v1/commands/{command}")),
        ("POST", format!("/api/v1/commands/{command}/cancel")),
        ("GET", format!("/api/v1/instances/{theirs}/uptime")),
        ("GET", format!("/api/v1/instances/{theirs}/policies")),
    ] {
        let r = send(&api, m, &p, &a, "").await;
        assert_eq!(r.status, 404, "{m} {p}: {}", r.text());
    }
    let token = api
        .fleet
        .get_token(&TenantScope::All, &globex_token)
        .await
        .unwrap();
    assert!(
        token.revoked_at.is_none(),
        "the refused revoke changed nothing"
    );
    let cmd = send(
        &api,
        "GET",
        &format!("/api/v1/commands/{command}"),
        &global,
        "",
    )
    .await;
    assert_eq!(
        cmd.json()["state"],
        "queued",
        "the refused cancel changed nothing"
    );
    let lists = [
        "/api/v1/tokens".to_owned(),
        "/api/v1/commands".to_owned(),
        format!("/api/v1/commands?instance={theirs}"),
        format!("/api/v1/alerts?instance={theirs}"),
        "/api/v1/alerts?filter=tenant%3Aglobex".to_owned(),
    ]
    .into_iter()
    .chain(batch.map(|b| format!("/api/v1/commands?batch={b}")));
    for p in lists {
        let r = send(&api, "GET", &p, &a, "").await;
        let body = r.text();
        assert!(r.status == 200 || r.status == 404, "{p}: {}", r.status);
        for secret in [theirs.to_string(), tok.to_owned(), command.clone()] {
            assert!(
                !body.contains(&secret),
                "{p} shows another tenant's {secret}: {body}"
            );
        }
    }
    // Policy results: only the policies that apply to its own instances.
    let results = send(&api, "GET", "/api/v1/policies/results", &a, "")
        .await
        .json();
    let names: Vec<&str> = results["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["policy"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["everyone"]);
    assert_eq!(results["items"][0]["applicable"], 1);
    // A command for a filter reaches only its own instances.
    let r = send(
        &api,
        "POST",
        "/api/v1/commands",
        &a,
        &json!({"target": {"filter": ""}, "kind": "ping"}).to_string(),
    )
    .await;
    assert_eq!(r.status, 201, "{}", r.text());
    let report = r.json();
    assert_eq!(report["targeted"], 1);
    assert_eq!(report["commands"][0]["instance"], mine.to_string());

    // The global operator still sees everyone.
    let all = send(&api, "GET", "/api/v1/summary", &[("authorization", &g)], "").await;
    assert_eq!(all.json()["total"], 3);
    assert_eq!(
        send(&api, "GET", "/metrics", &[("authorization", &g)], "")
            .await
            .status,
        200
    );

    let _ = api.stop.send(());
    api.task.await.unwrap().unwrap();
}
