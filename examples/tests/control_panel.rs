//! The `control-panel` binary as a user runs it: a fresh data directory, demo agents enrolling
//! over mutual TLS, the dashboard's login, `/metrics`, a tenant operator token written 0600, and
//! a clean exit on SIGTERM.

#[path = "support/http.rs"]
mod http;
#[path = "support/panel.rs"]
mod panel;

use std::os::unix::fs::PermissionsExt;
use std::process::Stdio;
use std::time::Duration;

use panel::{free_port, send, start, stop, wait_up};
use serde_json::Value;

/// Every path under `dir`, with its metadata.
fn walk(dir: &std::path::Path, out: &mut Vec<(std::path::PathBuf, std::fs::Metadata)>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        let meta = std::fs::symlink_metadata(&path).unwrap();
        if meta.is_dir() {
            walk(&path, out);
        }
        out.push((path, meta));
    }
}

/// Runs `control-panel serve` on `data` when it is expected to refuse to start: its output.
fn serve_until_exit(data: &std::path::Path) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_control-panel"))
        .args(["serve", "--data-dir"])
        .arg(data)
        .args(["--agent-listen", "127.0.0.1:0"])
        .args(["--operator-listen", &format!("127.0.0.1:{}", free_port())])
        .env("RUST_LOG", "warn")
        .env_remove("FLEET_CA_KEK")
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

/// A local account that is not the control panel's reads nothing of its data directory, and
/// nothing in it — the sled files included — holds the CA private key in the clear (it is
/// sealed with a key-encryption key in `ca.kek`, so a copy of `data/db` alone cannot sign).
/// A data directory others can read is refused unless `--insecure-permissions`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_data_directory_is_private_and_holds_no_clear_ca_key() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let log = tmp.path().join("control-panel.log");
    let port = free_port();
    let mut child = start(&data, &log, port, &["--demo-agents", "2"]);
    wait_up(port, &mut child).await;
    // The demo agents enroll: the CA has signed.
    let token = std::fs::read_to_string(data.join("operator-token")).unwrap();
    let bearer = format!("Bearer {}", token.trim());
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let (_, _, body) = send(
            port,
            "GET",
            "/api/v1/summary",
            &[("authorization", &bearer)],
            "",
        )
        .await
        .unwrap();
        let s: Value = serde_json::from_slice(&body).unwrap();
        if s["online"] == 2 {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "agents: {s}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    stop(child).await;

    let mode = |m: &std::fs::Metadata| m.permissions().mode() & 0o777;
    assert_eq!(mode(&std::fs::metadata(&data).unwrap()), 0o700);
    let mut all = Vec::new();
    walk(&data, &mut all);
    assert!(
        all.iter().any(|(p, _)| p.starts_with(data.join("db"))),
        "the sled store is in the data directory"
    );
    for (path, meta) in &all {
        if meta.is_dir() {
            assert_eq!(
                mode(meta),
                0o700,
                "{} is a directory others can enter",
                path.display()
            );
        } else {
            assert_eq!(
                mode(meta),
                0o600,
                "{} is readable by others",
                path.display()
            );
            if path.file_name().is_some_and(|n| n == "ca.kek") {
                continue;
            }
            let bytes = std::fs::read(path).unwrap();
            assert!(
                !fleet_core::testing::holds_clear_private_key(&bytes),
                "{} holds a private key in the clear",
                path.display()
            );
        }
    }

    // A directory others can read is refused, naming it and its mode, and nothing starts.
    std::fs::set_permissions(&data, std::fs::Permissions::from_mode(0o755)).unwrap();
    let out = serve_until_exit(&data);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!("{} is mode 755", data.display()))
            && err.contains("--insecure-permissions"),
        "{err}"
    );
    // ... unless told so.
    let port = free_port();
    let mut child = start(&data, &log, port, &["--insecure-permissions"]);
    wait_up(port, &mut child).await;
    stop(child).await;

    // Without the key-encryption key the copy of the store does not open.
    std::fs::set_permissions(&data, std::fs::Permissions::from_mode(0o700)).unwrap();
    std::fs::rename(data.join("ca.kek"), tmp.path().join("ca.kek.away")).unwrap();
    let out = serve_until_exit(&data);
    assert!(
        !out.status.success(),
        "a fresh key must not unseal the old CA"
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("key-encryption key"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn control_panel_serves_agents_the_dashboard_and_metrics() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let operator_port = free_port();
    let mut child = start(
        &data,
        &tmp.path().join("control-panel.log"),
        operator_port,
        &["--demo-agents", "3", "--tenant-token", "acme"],
    );
    wait_up(operator_port, &mut child).await;
    let dir = &data;

    // The token files exist, 0600, and the tenant one is a different token.
    let token = std::fs::read_to_string(dir.join("operator-token")).unwrap();
    let acme = std::fs::read_to_string(dir.join("operator-token.acme")).unwrap();
    assert_ne!(token.trim(), acme.trim());
    for f in ["operator-token", "operator-token.acme", "ca.kek"] {
        let mode = std::fs::metadata(dir.join(f)).unwrap().permissions().mode();
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
    stop(child).await;
}

/// Rotating the key-encryption key (`control-panel reseal-ca`): afterwards the store opens with
/// the new key only — the old one, which may have been copied with the store, unseals nothing —
/// and the CA, the instances and the agents' certificates are the same.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reseal_ca_rotates_the_key_encryption_key() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let log = tmp.path().join("control-panel.log");
    let port = free_port();
    let mut child = start(&data, &log, port, &[]);
    wait_up(port, &mut child).await;
    stop(child).await;
    let ca_before = std::fs::read_to_string(data.join("ca.pem")).unwrap();
    let new_key = tmp.path().join("new.kek");
    let reseal = |key: &std::path::Path| {
        std::process::Command::new(env!("CARGO_BIN_EXE_control-panel"))
            .args(["reseal-ca", "--data-dir"])
            .arg(&data)
            .arg("--new-ca-kek-file")
            .arg(key)
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            .env_remove("FLEET_CA_KEK")
            .stdin(Stdio::null())
            .output()
            .unwrap()
    };
    let out = reseal(&new_key);
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        std::fs::metadata(&new_key).unwrap().permissions().mode() & 0o777,
        0o600,
        "the new key is private"
    );
    // The old key (still the default `ca.kek`) no longer opens the store, and says why.
    let out = serve_until_exit(&data);
    assert!(!out.status.success(), "the old key must not unseal the CA");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("sealed with key-encryption key"), "{err}");
    // The new one does, with the same CA.
    let port = free_port();
    let key_arg = new_key.to_str().unwrap().to_owned();
    let mut child = start(&data, &log, port, &["--ca-kek-file", &key_arg]);
    wait_up(port, &mut child).await;
    stop(child).await;
    assert_eq!(
        std::fs::read_to_string(data.join("ca.pem")).unwrap(),
        ca_before,
        "the same CA"
    );
    // Resealing under the key in use is refused.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_control-panel"))
        .args(["reseal-ca", "--data-dir"])
        .arg(&data)
        .arg("--ca-kek-file")
        .arg(&new_key)
        .arg("--new-ca-kek-file")
        .arg(&new_key)
        .env_remove("FLEET_CA_KEK")
        .output()
        .unwrap();
    assert!(
        !out.status.success(),
        "a rotation to the same key is refused"
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("is the current one"), "{err}");
}
