//! The web dashboard in a real headless Chromium, driven over WebDriver: log in, the summary
//! against the API, filters by status and tag, hostname search, server detail, a tag edit, a token
//! created and revoked, an instance going warning while the page is open, deregistration,
//! logout; and a tenant-scoped operator who never sees another tenant's instance.
//!
//! Needs `chromium` and `chromedriver` (`.ci/run` installs them). Screenshots go to
//! `target/screenshots/`.

#[path = "support/browser.rs"]
mod browser;

use std::sync::Arc;
use std::time::Duration;

use browser::{Browser, DEFAULT_TIMEOUT, screenshot_path};
use fleet_core::testing::enroll_with;
use fleet_core::{
    App, Clock, Fleet, Groups, Heartbeat, InstanceId, ManualClock, MemoryStore, MetricsSample,
    NewToken, SystemClock, Tags, TenantId, TenantScope,
};
use fleet_examples::operator::OperatorApi;
use serde_json::Value;
use tokio::net::TcpListener;

/// The browser tests of this file take turns: two Chromiums on a two-core CI machine would
/// only make each other slow.
static ONE_BROWSER: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

const OPERATOR: &str = "global-operator-token-for-the-browser-test";
const ACME: &str = "acme-operator-token-for-the-browser-test";

struct Server {
    fleet: Fleet<Arc<MemoryStore>>,
    clock: ManualClock,
    api: Arc<OperatorApi<Arc<MemoryStore>>>,
    base: String,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<std::io::Result<()>>,
}

impl Server {
    async fn start() -> Self {
        // The fleet's clock starts at the real time so "last seen … ago" reads sensibly in the
        // browser; the test moves it by hand.
        let clock = ManualClock::new(SystemClock.now());
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
        let base = format!("http://{}", listener.local_addr().unwrap());
        let (stop, rx) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(Arc::clone(&api).serve(listener, async {
            let _ = rx.await;
        }));
        Self {
            fleet,
            clock,
            api,
            base,
            stop: Some(stop),
            task,
        }
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    async fn shutdown(mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        self.task.await.unwrap().unwrap();
    }

    /// Enrolls `host` with a fresh token carrying `tags`, `groups` and `tenant`.
    async fn enroll(
        &self,
        host: &str,
        tags: &[(&str, &str)],
        groups: &[&str],
        tenant: Option<&str>,
    ) -> InstanceId {
        let token = NewToken {
            tags: Tags::from_pairs(tags.iter().copied()).unwrap(),
            groups: Groups::from_names(groups.iter().copied()).unwrap(),
            tenant: tenant.map(|t| TenantId::new(t).unwrap()),
            ..NewToken::default()
        };
        enroll_with(&self.fleet, token, host).await
    }

    /// Commands queued for `instance` (every instance: `None`), newest first.
    async fn commands(&self, instance: Option<InstanceId>) -> Vec<fleet_core::Command> {
        self.fleet
            .commands(
                &TenantScope::All,
                fleet_core::command::CommandQuery {
                    instance,
                    limit: 10,
                    ..Default::default()
                },
            )
            .await
            .unwrap()
    }

    /// A heartbeat with a metrics sample (and the apps list), as an agent sends it.
    fn beat(&self, id: InstanceId, n: u64) {
        let sample = MetricsSample {
            cpu_percent: Some(10.0 + (n % 7) as f64 * 9.0),
            memory_used_bytes: Some((4 + n % 5) << 30),
            memory_total_bytes: Some(16 << 30),
            disk_used_bytes: Some((40 + n % 3) << 30),
            disk_total_bytes: Some(100 << 30),
            network_rx_bytes: Some(n * 5_000_000),
            network_tx_bytes: Some(n * 1_000_000),
            uptime_secs: Some(3 * 86_400 + n * 10),
            load_1m: Some(0.4),
            ..MetricsSample::default()
        };
        self.fleet
            .heartbeat(
                id,
                Heartbeat {
                    metrics: Some(sample),
                    apps: Some(vec![
                        App {
                            name: "postgresql".into(),
                            version: Some("15.8".into()),
                        },
                        App {
                            name: "nginx".into(),
                            version: Some("1.22".into()),
                        },
                    ]),
                },
            )
            .unwrap();
    }
}

async fn login(b: &Browser, server: &Server, token: &str) {
    b.goto(&server.url("/")).await.unwrap();
    b.wait_until("location.pathname === '/login'", DEFAULT_TIMEOUT)
        .await
        .unwrap();
    b.fill("#token", token).await.unwrap();
    b.click("#login-form button[type=submit]").await.unwrap();
    on_page(b, "fleet").await;
}

/// Waits until the dashboard has drawn `page` with its data; on failure says what is shown.
async fn on_page(b: &Browser, page: &str) {
    let js = format!("document.documentElement.dataset.page === '{page}'");
    if let Err(e) = b.wait_until(&js, DEFAULT_TIMEOUT).await {
        let shown = b
            .execute(
                "return location.href + ' | ' + document.body.innerText",
                vec![],
            )
            .await;
        panic!("{e}; the browser shows: {shown:?}");
    }
}

/// The hostnames in the instance table, in order.
async fn rows(b: &Browser) -> Vec<String> {
    let v = b
        .execute(
            "return [...document.querySelectorAll('#instances tbody tr[data-id] a.hostname')].map(a => a.textContent)",
            vec![],
        )
        .await
        .unwrap();
    serde_json::from_value(v).unwrap()
}

/// Waits until the instance table shows exactly `want` (in any order).
async fn wait_rows(b: &Browser, want: &[&str]) {
    let mut want: Vec<String> = want.iter().map(|s| s.to_string()).collect();
    want.sort();
    let js = format!(
        "JSON.stringify([...document.querySelectorAll('#instances tbody tr[data-id] a.hostname')].map(a => a.textContent).sort()) === {:?}",
        serde_json::to_string(&want).unwrap()
    );
    if let Err(e) = b.wait_until(&js, DEFAULT_TIMEOUT).await {
        panic!("rows {:?}, want {want:?}: {e}", rows(b).await);
    }
}

async fn card(b: &Browser, id: &str) -> String {
    b.text(&format!("#{id} .value")).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboard_in_a_real_browser() {
    let _turn = ONE_BROWSER.lock().await;
    let server = Server::start().await;
    let web1 = server
        .enroll(
            "web-01",
            &[("env", "prod"), ("role", "web")],
            &["frontend"],
            None,
        )
        .await;
    let web2 = server
        .enroll(
            "web-02",
            &[("env", "staging"), ("role", "web")],
            &["frontend"],
            None,
        )
        .await;
    let db1 = server
        .enroll(
            "db-01",
            &[("env", "prod"), ("role", "db")],
            &["database-servers"],
            Some("acme"),
        )
        .await;
    for n in 0..12 {
        for id in [web1, web2, db1] {
            server.beat(id, n);
        }
        server.clock.advance(Duration::from_secs(15));
    }

    let b = Browser::start().await.unwrap();

    // Without a session every page goes to the login page, which remembers where it was going.
    b.goto(&server.url("/tokens")).await.unwrap();
    b.wait_for("#login-form", DEFAULT_TIMEOUT).await.unwrap();
    let url = b.current_url().await.unwrap();
    assert!(url.ends_with("/login?next=%2Ftokens"), "{url}");
    b.fill("#token", "not-the-token").await.unwrap();
    b.click("#login-form button[type=submit]").await.unwrap();
    b.wait_for("#login-error", DEFAULT_TIMEOUT).await.unwrap();
    assert!(
        b.cookies().await.unwrap().is_empty(),
        "no session for a wrong token"
    );

    // Logging in: an HttpOnly, SameSite=Strict session cookie, invisible to scripts.
    login(&b, &server, OPERATOR).await;
    let cookies = b.cookies().await.unwrap();
    let session = cookies
        .iter()
        .find(|c| c.name == "fleet_session")
        .expect("session cookie");
    assert!(session.http_only, "{session:?}");
    assert_eq!(session.same_site.as_deref(), Some("Strict"), "{session:?}");
    let visible = b.execute("return document.cookie", vec![]).await.unwrap();
    assert_eq!(visible, Value::from(""), "scripts cannot read the session");

    // The summary cards say what the API says (asked by the page's own session).
    let summary = b
        .execute(
            "return fetch('/api/v1/summary').then(r => r.json())",
            vec![],
        )
        .await
        .unwrap();
    let n = |k: &str| summary[k].as_u64().unwrap().to_string();
    let gib = |k: &str| {
        format!(
            "{:.1} GiB",
            summary[k].as_f64().unwrap() / (1u64 << 30) as f64
        )
    };
    assert_eq!(card(&b, "card-total").await, n("total"));
    assert_eq!(card(&b, "card-online").await, n("online"));
    assert_eq!(card(&b, "card-warning").await, n("warning"));
    assert_eq!(card(&b, "card-offline").await, n("offline"));
    assert_eq!(
        card(&b, "card-health").await,
        format!("{:.1} %", summary["health_percent"].as_f64().unwrap())
    );
    assert_eq!(
        card(&b, "card-cpu").await,
        format!("{:.1} %", summary["cpu_avg_percent"].as_f64().unwrap())
    );
    assert_eq!(card(&b, "card-memory").await, gib("memory_used_bytes"));
    let sub = b.text("#card-memory .sub").await.unwrap();
    assert_eq!(sub, format!("of {}", gib("memory_total_bytes")));
    assert_eq!(
        card(&b, "card-disk").await,
        format!(
            "{:.0} GiB",
            summary["disk_used_bytes"].as_f64().unwrap() / (1u64 << 30) as f64
        )
    );
    assert_eq!(summary["total"], 3);
    wait_rows(&b, &["web-01", "web-02", "db-01"]).await;
    b.screenshot(screenshot_path("dashboard.png"))
        .await
        .unwrap();

    // Filter by status: the URL carries it, the cards and rows follow.
    b.click("button[data-status=warning]").await.unwrap();
    b.wait_until("location.search === '?status=warning'", DEFAULT_TIMEOUT)
        .await
        .unwrap();
    b.wait_for("#instances td.empty", DEFAULT_TIMEOUT)
        .await
        .unwrap();
    assert_eq!(card(&b, "card-total").await, "0");
    b.click("button[data-status=online]").await.unwrap();
    b.wait_until("location.search === '?status=online'", DEFAULT_TIMEOUT)
        .await
        .unwrap();
    wait_rows(&b, &["web-01", "web-02", "db-01"]).await;

    // Pages of two: the next page holds the rest, and the first page comes back.
    b.goto(&server.url("/?per_page=2")).await.unwrap();
    b.wait_for("#page-next", DEFAULT_TIMEOUT).await.unwrap();
    let first = rows(&b).await;
    assert_eq!(first.len(), 2);
    b.click("#page-next").await.unwrap();
    b.wait_for("#page-first", DEFAULT_TIMEOUT).await.unwrap();
    let second = rows(&b).await;
    assert_eq!(second.len(), 1, "{first:?} then {second:?}");
    assert!(!first.contains(&second[0]));
    assert!(
        b.find("#page-next").await.is_err(),
        "no page after the last"
    );
    b.click("#page-first").await.unwrap();
    b.wait_for("#page-next", DEFAULT_TIMEOUT).await.unwrap();
    assert_eq!(rows(&b).await, first);

    // A group filter.
    b.goto(&server.url("/")).await.unwrap();
    b.wait_for("#filter-group", DEFAULT_TIMEOUT).await.unwrap();
    b.fill("#filter-group", "database-servers").await.unwrap();
    b.click("#filter-apply").await.unwrap();
    b.wait_until(
        "location.search === '?group=database-servers'",
        DEFAULT_TIMEOUT,
    )
    .await
    .unwrap();
    wait_rows(&b, &["db-01"]).await;

    // A tenant, for an operator of every tenant.
    b.goto(&server.url("/")).await.unwrap();
    b.wait_for("#filter-tenant", DEFAULT_TIMEOUT).await.unwrap();
    b.fill("#filter-tenant", "acme").await.unwrap();
    b.click("#filter-apply").await.unwrap();
    b.wait_until("location.search === '?tenant=acme'", DEFAULT_TIMEOUT)
        .await
        .unwrap();
    wait_rows(&b, &["db-01"]).await;

    // Filter by tag, then a hostname search; a shared URL opens the same view.
    b.goto(&server.url("/")).await.unwrap();
    b.wait_for("#filter-tag", DEFAULT_TIMEOUT).await.unwrap();
    b.fill("#filter-tag", "env=prod").await.unwrap();
    b.click("#filter-apply").await.unwrap();
    b.wait_until("location.search === '?tag=env%3Dprod'", DEFAULT_TIMEOUT)
        .await
        .unwrap();
    wait_rows(&b, &["web-01", "db-01"]).await;
    b.wait_until(
        "document.querySelector('#card-total .value')?.textContent === '2'",
        DEFAULT_TIMEOUT,
    )
    .await
    .unwrap();
    // A command for every instance the filter selects: one batch, two commands.
    b.click("#bulk summary").await.unwrap();
    b.fill("#bulk-kind", "collect-inventory").await.unwrap();
    b.click("#bulk-send").await.unwrap();
    b.wait_for("#bulk-message .ok", DEFAULT_TIMEOUT)
        .await
        .unwrap();
    assert!(
        b.text("#bulk-message")
            .await
            .unwrap()
            .starts_with("Queued 2 commands")
    );
    let queued = server.commands(None).await;
    let mut targets: Vec<InstanceId> = queued.iter().map(|c| c.instance).collect();
    targets.sort();
    let mut want = vec![web1, db1];
    want.sort();
    assert_eq!(targets, want, "the filter's instances, and only those");
    assert!(
        queued
            .iter()
            .all(|c| c.kind.as_str() == "collect-inventory")
    );
    b.goto(&server.url("/?q=db-0")).await.unwrap();
    wait_rows(&b, &["db-01"]).await;
    assert_eq!(b.text("#filter-expr").await.unwrap(), "text:\"db-0\"");
    b.goto(&server.url("/?tag=env%3D")).await.unwrap();
    b.wait_for(".error", DEFAULT_TIMEOUT).await.unwrap();
    let msg = b.text(".error").await.unwrap();
    assert!(msg.contains("at position 4"), "{msg}");

    // Server detail: system info, graphs from the recent samples, apps, and a tag edit.
    b.goto(&server.url("/?q=web-01")).await.unwrap();
    wait_rows(&b, &["web-01"]).await;
    b.click("a.hostname").await.unwrap();
    on_page(&b, "detail").await;
    assert!(
        b.current_url()
            .await
            .unwrap()
            .ends_with(&format!("/instances/{web1}"))
    );
    assert_eq!(b.text("#detail-hostname").await.unwrap(), "web-01");
    let lines = b
        .execute(
            "return document.querySelectorAll('#graphs svg.chart path.line').length",
            vec![],
        )
        .await
        .unwrap();
    assert!(
        lines.as_u64().unwrap() >= 5,
        "cpu, memory, disk, rx, tx: {lines}; {:?}",
        b.text("#graphs").await
    );
    let points = b
        .execute(
            "return document.querySelector('#graph-cpu path.line').getAttribute('d').split(/[ML]/).length - 1",
            vec![],
        )
        .await
        .unwrap();
    let recent = server
        .fleet
        .recent_metrics(&TenantScope::All, web1, fleet_core::Timestamp::UNIX_EPOCH)
        .unwrap();
    assert!(recent.len() >= 10, "a point per 15 s sample: {recent:?}");
    assert_eq!(
        points.as_u64(),
        Some(recent.len() as u64),
        "a point per sample"
    );
    assert!(b.text("#apps").await.unwrap().contains("postgresql"));
    b.screenshot(screenshot_path("detail.png")).await.unwrap();

    b.fill("#tags-input", "env=prod\nrole=web\nowner=team-a")
        .await
        .unwrap();
    b.click("#tags-save").await.unwrap();
    b.wait_until(
        "document.querySelector('#labels-message')?.textContent === 'Tags saved.'",
        DEFAULT_TIMEOUT,
    )
    .await
    .unwrap();
    let tags = server.fleet.get(&TenantScope::All, web1).unwrap().tags;
    assert_eq!(
        tags.get("owner").map(|v| v.as_str()),
        Some("team-a"),
        "{tags:?}"
    );
    // A bad tag is refused with the server's message, and nothing changes.
    b.fill("#tags-input", "bad key=x").await.unwrap();
    b.click("#tags-save").await.unwrap();
    b.wait_for("#labels-message .error", DEFAULT_TIMEOUT)
        .await
        .unwrap();
    assert_eq!(
        server.fleet.get(&TenantScope::All, web1).unwrap().tags,
        tags
    );

    // A command from the detail page: queued, and in the page's command history.
    b.fill("#command-kind", "ping").await.unwrap();
    b.fill("#command-payload", "{\"note\": \"from the browser\"}")
        .await
        .unwrap();
    b.click("#command-send").await.unwrap();
    b.wait_for("#command-message .ok", DEFAULT_TIMEOUT)
        .await
        .unwrap();
    b.wait_until(
        "[...document.querySelectorAll('#commands tr[data-command] td:first-child')].some(td => td.textContent === 'ping')",
        DEFAULT_TIMEOUT,
    )
    .await
    .unwrap();
    let pings = server.commands(Some(web1)).await;
    let ping = pings
        .iter()
        .find(|c| c.kind.as_str() == "ping")
        .expect("the ping is queued");
    assert_eq!(ping.state, fleet_core::CommandState::Queued);
    assert!(
        ping.payload.as_str().contains("from the browser"),
        "{:?}",
        ping.payload
    );
    // A payload that is not JSON is refused in the page; nothing is queued.
    b.fill("#command-payload", "{not json").await.unwrap();
    b.click("#command-send").await.unwrap();
    b.wait_for("#command-message .error", DEFAULT_TIMEOUT)
        .await
        .unwrap();
    let after = server.commands(Some(web1)).await;
    assert_eq!(after.len(), pings.len());

    // Registration tokens: create one (the join string is shown once), then revoke it.
    b.goto(&server.url("/tokens")).await.unwrap();
    on_page(&b, "tokens").await;
    b.fill("#token-description", "browser-made").await.unwrap();
    b.fill("#token-max-uses", "5").await.unwrap();
    b.click("#token-create").await.unwrap();
    b.wait_for("#join-string", DEFAULT_TIMEOUT).await.unwrap();
    let join = b.text("#join-string").await.unwrap();
    b.screenshot(screenshot_path("tokens.png")).await.unwrap();
    assert!(join.starts_with("fleet1."), "{join}");
    let made = server
        .fleet
        .list_tokens(&TenantScope::All)
        .await
        .unwrap()
        .into_iter()
        .find(|t| t.description == "browser-made")
        .expect("the token exists");
    assert!(join.contains(made.id.as_str()));
    let row = format!("tr[data-token='{}']", made.id.as_str());
    b.wait_for(&format!("{row}[data-state=active]"), DEFAULT_TIMEOUT)
        .await
        .unwrap();
    b.click(&format!("{row} button.revoke")).await.unwrap();
    b.wait_for(&format!("{row}[data-state=revoked]"), DEFAULT_TIMEOUT)
        .await
        .unwrap();
    let revoked = server
        .fleet
        .get_token(&TenantScope::All, &made.id)
        .await
        .unwrap();
    assert!(revoked.revoked_at.is_some());

    // A used token's history: the enrollment, with the instance it made.
    let used = server
        .fleet
        .list_tokens(&TenantScope::All)
        .await
        .unwrap()
        .into_iter()
        .find(|t| t.uses == 1 && t.tags.get("role").map(|v| v.as_str()) == Some("db"))
        .expect("db-01's token");
    b.click(&format!(
        "tr[data-token='{}'] button.history",
        used.id.as_str()
    ))
    .await
    .unwrap();
    b.wait_for("#token-history table", DEFAULT_TIMEOUT)
        .await
        .unwrap();
    let history = b.text("#token-history").await.unwrap();
    assert!(history.contains("enrolled"), "{history}");
    assert!(history.contains(&db1.to_string()), "{history}");

    // An instance goes warning while the dashboard is open: the others keep heartbeating.
    b.goto(&server.url("/")).await.unwrap();
    wait_rows(&b, &["web-01", "web-02", "db-01"]).await;
    server.clock.advance(Duration::from_secs(61));
    server.beat(web1, 20);
    server.beat(web2, 20);
    let changes = server.fleet.sweep();
    assert_eq!(changes.len(), 1, "{changes:?}");
    b.wait_until(
        "document.querySelector('tr[data-status=warning] a.hostname')?.textContent === 'db-01'",
        DEFAULT_TIMEOUT,
    )
    .await
    .unwrap();
    assert_eq!(card(&b, "card-warning").await, "1");
    b.goto(&server.url("/health")).await.unwrap();
    b.wait_for(
        &format!("#alerts tr[data-instance='{db1}']"),
        DEFAULT_TIMEOUT,
    )
    .await
    .unwrap();
    assert_eq!(b.text("#health-percent").await.unwrap(), "66.7 %");
    let alert = b
        .text(&format!("#alerts tr[data-instance='{db1}']"))
        .await
        .unwrap();
    assert!(alert.contains("db-01 went online → warning"), "{alert}");
    b.screenshot(screenshot_path("health.png")).await.unwrap();

    // Deregistering from the detail page asks once more, then the instance is gone.
    b.goto(&server.url(&format!("/instances/{db1}")))
        .await
        .unwrap();
    b.wait_for("#deregister", DEFAULT_TIMEOUT).await.unwrap();
    b.click("#deregister").await.unwrap();
    assert!(
        server.fleet.get(&TenantScope::All, db1).is_some(),
        "not yet"
    );
    b.click("#deregister-confirm").await.unwrap();
    b.wait_until("location.pathname === '/'", DEFAULT_TIMEOUT)
        .await
        .unwrap();
    wait_rows(&b, &["web-01", "web-02"]).await;
    assert!(
        b.text("#deregistered")
            .await
            .unwrap()
            .contains(&db1.to_string())
    );
    assert!(server.fleet.get(&TenantScope::All, db1).is_none());

    // Logging out ends the session: the pages ask for a login again.
    b.click("#logout").await.unwrap();
    b.wait_until("location.pathname === '/login'", DEFAULT_TIMEOUT)
        .await
        .unwrap();
    b.goto(&server.url("/")).await.unwrap();
    b.wait_for("#login-form", DEFAULT_TIMEOUT).await.unwrap();
    assert_eq!(server.api.auth().session_count(), 0);

    b.close().await.unwrap();
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenant_operator_sees_only_its_tenant() {
    let _turn = ONE_BROWSER.lock().await;
    let server = Server::start().await;
    let mine = server
        .enroll("acme-web", &[("env", "prod")], &[], Some("acme"))
        .await;
    let theirs = server
        .enroll("globex-web", &[("env", "prod")], &[], Some("globex"))
        .await;
    let untenanted = server
        .enroll("shared-web", &[("env", "prod")], &[], None)
        .await;
    for id in [mine, theirs, untenanted] {
        server.beat(id, 1);
    }

    let b = Browser::start().await.unwrap();
    login(&b, &server, ACME).await;
    wait_rows(&b, &["acme-web"]).await;
    assert_eq!(card(&b, "card-total").await, "1");
    assert_eq!(b.text("#who").await.unwrap(), "tenant acme");
    assert!(
        b.find("#filter-tenant").await.is_err(),
        "no tenant filter for a tenant operator"
    );
    // A search for another tenant's host finds nothing.
    b.goto(&server.url("/?q=globex")).await.unwrap();
    b.wait_for("#instances td.empty", DEFAULT_TIMEOUT)
        .await
        .unwrap();
    // Its detail page, opened by URL, does not exist for this operator.
    b.goto(&server.url(&format!("/instances/{theirs}")))
        .await
        .unwrap();
    b.wait_for("#not-found", DEFAULT_TIMEOUT).await.unwrap();
    // Nor can the page's own session change it through the API.
    let status = b
        .execute(
            "const csrf = document.querySelector('meta[name=fleet-csrf]').content;
             return fetch(arguments[0], {method: 'PUT', headers: {'Content-Type': 'application/json', 'X-CSRF-Token': csrf}, body: '{\"owner\":\"acme\"}'}).then(r => r.status)",
            vec![Value::from(format!("/api/v1/instances/{theirs}/tags"))],
        )
        .await
        .unwrap();
    assert_eq!(status, Value::from(404));
    assert!(
        server
            .fleet
            .get(&TenantScope::All, theirs)
            .unwrap()
            .tags
            .get("owner")
            .is_none()
    );
    // A write without the CSRF header is refused even with the session cookie.
    let status = b
        .execute(
            "return fetch(arguments[0], {method: 'PUT', headers: {'Content-Type': 'application/json'}, body: '{\"owner\":\"acme\"}'}).then(r => r.status)",
            vec![Value::from(format!("/api/v1/instances/{mine}/tags"))],
        )
        .await
        .unwrap();
    assert_eq!(status, Value::from(403));
    // Tokens it makes belong to its tenant.
    b.goto(&server.url("/tokens")).await.unwrap();
    on_page(&b, "tokens").await;
    b.fill("#token-description", "acme-made").await.unwrap();
    b.click("#token-create").await.unwrap();
    b.wait_for("#join-string", DEFAULT_TIMEOUT).await.unwrap();
    let tokens = server.fleet.list_tokens(&TenantScope::All).await.unwrap();
    let made = tokens
        .iter()
        .find(|t| t.description == "acme-made")
        .unwrap();
    assert_eq!(made.tenant.as_ref().map(|t| t.as_str()), Some("acme"));
    // The fleet-wide trend is not shown to it.
    b.goto(&server.url("/health")).await.unwrap();
    on_page(&b, "health").await;
    assert!(
        b.text("#trend")
            .await
            .unwrap()
            .contains("operators without a tenant")
    );
    b.screenshot(screenshot_path("tenant-dashboard.png"))
        .await
        .unwrap();

    b.close().await.unwrap();
    server.shutdown().await;
}

/// Text an instance reports is shown as it is, except for characters that are invisible or
/// change how the text around them reads (issue 16, finding 15): a hostname with U+202E RIGHT-TO-
/// LEFT OVERRIDE (which would show `web` U+202E `gpj.exe` as `webexe.jpg`) and an app name with U+200B ZERO
/// WIDTH SPACE are drawn with the escape `\u{202E}` / `\u{200B}` in its own style, in the fleet
/// table, the detail page's heading and system table, and the apps list; the raw characters are
/// in no visible text of the page.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hidden_characters_from_instances_are_shown_escaped() {
    let _turn = ONE_BROWSER.lock().await;
    let server = Server::start().await;
    let host = "web\u{202E}gpj.exe";
    let id = server.enroll(host, &[("env", "prod")], &[], None).await;
    server
        .fleet
        .heartbeat(
            id,
            Heartbeat {
                metrics: None,
                apps: Some(vec![App {
                    name: "ng\u{200B}inx".into(),
                    version: Some("1.22".into()),
                }]),
            },
        )
        .unwrap();
    let shown = "web\\u{202E}gpj.exe";

    let b = Browser::start().await.unwrap();
    login(&b, &server, OPERATOR).await;
    wait_rows(&b, &[shown]).await;
    // The escape is one element of its own, styled apart from the text around it.
    let esc = b
        .execute(
            "const a = document.querySelector('#instances a.hostname');
             const e = a.querySelector('span.esc');
             const r = e.getBoundingClientRect();
             return {text: e.textContent, width: r.width,
                     background: getComputedStyle(e).backgroundColor,
                     around: getComputedStyle(a).backgroundColor};",
            vec![],
        )
        .await
        .unwrap();
    assert_eq!(esc["text"], "\\u{202E}", "{esc}");
    assert!(esc["width"].as_f64().unwrap() > 0.0, "{esc}");
    assert_ne!(esc["background"], esc["around"], "a distinct style: {esc}");
    let body = b
        .execute("return document.body.innerText", vec![])
        .await
        .unwrap();
    let body = body.as_str().unwrap();
    assert!(body.contains(shown), "{body}");
    assert!(
        !body.contains('\u{202E}'),
        "the raw override is shown: {body:?}"
    );

    b.goto(&server.url(&format!("/instances/{id}")))
        .await
        .unwrap();
    on_page(&b, "detail").await;
    assert_eq!(b.text("#detail-hostname").await.unwrap(), shown);
    let system = b.text("#system").await.unwrap();
    assert!(system.contains(shown), "{system}");
    let apps = b.text("#apps").await.unwrap();
    assert!(apps.contains("ng\\u{200B}inx"), "{apps}");
    let body = b
        .execute("return document.body.innerText", vec![])
        .await
        .unwrap();
    let body = body.as_str().unwrap();
    for raw in ['\u{202E}', '\u{200B}'] {
        assert!(
            !body.contains(raw),
            "U+{:04X} is shown raw: {body:?}",
            raw as u32
        );
    }
    b.screenshot(screenshot_path("hidden-characters.png"))
        .await
        .unwrap();

    b.close().await.unwrap();
    server.shutdown().await;
}
