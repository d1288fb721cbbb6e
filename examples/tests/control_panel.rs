//! The `control-panel` binary as a user runs it: a fresh data directory, demo agents enrolling
//! over mutual TLS, the dashboard's login, `/metrics`, a tenant operator token written 0600, and
//! a clean exit on SIGTERM.

#[path = "support/http.rs"]
mod http;

use std::os::unix::fs::PermissionsExt;
use std::process::Stdio;
use std::time::Duration;

use hyper::body::Bytes;
use serde_json::Value;
use tokio::process::Command;

/// A port nothing listens on right now (the control panel binds it a moment later).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// `(status, headers, body)` of one request, or `None` while nothing listens.
async fn send(
    port: u16,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> Option<(u16, hyper::HeaderMap, Bytes)> {
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    let r = http::try_send(addr, method, path, headers, body.to_owned()).await?;
    Some((r.status, r.headers, r.body))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn control_panel_serves_agents_the_dashboard_and_metrics() {
    let dir = tempfile::tempdir().unwrap();
    let operator_port = free_port();
    let mut child = Command::new(env!("CARGO_BIN_EXE_control-panel"))
        .args(["serve", "--data-dir"])
        .arg(dir.path())
        .args(["--agent-listen", "127.0.0.1:0"])
        .args(["--operator-listen", &format!("127.0.0.1:{operator_port}")])
        .args(["--demo-agents", "3", "--tenant-token", "acme"])
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        // Its log, for a look when this test fails.
        .stderr(std::fs::File::create(dir.path().join("control-panel.log")).unwrap())
        .kill_on_drop(true)
        .spawn()
        .unwrap();

    // Up within a bounded time; the login page is public.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        if let Some((200, _, body)) = send(operator_port, "GET", "/login", &[], "").await {
            assert!(String::from_utf8_lossy(&body).contains("Operator token"));
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the control panel did not come up"
        );
        assert!(child.try_wait().unwrap().is_none(), "it exited early");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // The token files exist, 0600, and the tenant one is a different token.
    let token = std::fs::read_to_string(dir.path().join("operator-token")).unwrap();
    let acme = std::fs::read_to_string(dir.path().join("operator-token.acme")).unwrap();
    assert_ne!(token.trim(), acme.trim());
    for f in ["operator-token", "operator-token.acme", "ca-key.pem"] {
        let mode = std::fs::metadata(dir.path().join(f))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600, "{f}");
    }
    let bearer = format!("Bearer {}", token.trim());
    let auth = [("authorization", bearer.as_str())];

    // The demo agents enroll and heartbeat over mutual TLS: the summary fills up.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let (status, _, body) = send(operator_port, "GET", "/api/v1/summary", &auth, "")
            .await
            .unwrap();
        assert_eq!(status, 200);
        let s: Value = serde_json::from_slice(&body).unwrap();
        if s["online"] == 3 && s["reporting"] == 3 {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "agents: {s}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // /metrics counts them, and their enrollments.
    let (status, headers, body) = send(operator_port, "GET", "/metrics", &auth, "")
        .await
        .unwrap();
    assert_eq!(status, 200);
    assert!(
        headers["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/plain; version=0.0.4")
    );
    let text = String::from_utf8_lossy(&body);
    assert!(
        text.contains("fleet_instances{status=\"online\",tenant=\"\"} 3\n"),
        "{text}"
    );
    assert!(
        text.contains("fleet_enrollments_total{outcome=\"enrolled\"} 3\n"),
        "{text}"
    );
    // The tenant operator sees none of them, and no metrics.
    let tenant = format!("Bearer {}", acme.trim());
    let (_, _, body) = send(
        operator_port,
        "GET",
        "/api/v1/summary",
        &[("authorization", &tenant)],
        "",
    )
    .await
    .unwrap();
    assert_eq!(serde_json::from_slice::<Value>(&body).unwrap()["total"], 0);
    let (status, _, _) = send(
        operator_port,
        "GET",
        "/metrics",
        &[("authorization", &tenant)],
        "",
    )
    .await
    .unwrap();
    assert_eq!(status, 403);

    // A browser login, then the dashboard page.
    let form = format!("token={}", token.trim());
    let (status, headers, _) = send(
        operator_port,
        "POST",
        "/login",
        &[("content-type", "application/x-www-form-urlencoded")],
        &form,
    )
    .await
    .unwrap();
    assert_eq!(status, 303);
    let cookie = headers["set-cookie"]
        .to_str()
        .unwrap()
        .split(';')
        .next()
        .unwrap()
        .to_owned();
    let (status, _, body) = send(operator_port, "GET", "/", &[("cookie", &cookie)], "")
        .await
        .unwrap();
    assert_eq!(status, 200);
    assert!(String::from_utf8_lossy(&body).contains("/assets/app.js"));

    // SIGTERM: a clean exit within a bounded time.
    let pid = child.id().unwrap().to_string();
    let kill = std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap();
    assert!(kill.success());
    let status = tokio::time::timeout(Duration::from_secs(30), child.wait())
        .await
        .expect("stopped within 30 s")
        .unwrap();
    assert!(status.success(), "{status:?}");
}
