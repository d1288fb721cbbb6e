//! Running the `control-panel` binary in a test: a fresh data directory, a free operator port,
//! waiting (bounded) until it answers, and a clean SIGTERM stop. Included by path, with
//! `support/http.rs` as `mod http`:
//!
//! ```ignore
//! #[path = "support/http.rs"]
//! mod http;
//! #[path = "support/panel.rs"]
//! mod panel;
//! ```

#![allow(dead_code)]

use std::process::Stdio;
use std::time::Duration;

use hyper::body::Bytes;
use tokio::process::Command;

/// A port nothing listens on right now (the control panel binds it a moment later).
pub(crate) fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// `(status, headers, body)` of one request, or `None` while nothing listens.
pub(crate) async fn send(
    port: u16,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> Option<(u16, hyper::HeaderMap, Bytes)> {
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    let r = crate::http::try_send(addr, method, path, headers, body.to_owned()).await?;
    Some((r.status, r.headers, r.body))
}

/// How to start the control panel beyond its data directory and ports.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Options<'a> {
    /// More `serve` arguments.
    pub(crate) extra: &'a [&'a str],
    /// `RUST_LOG`.
    pub(crate) log_filter: &'a str,
    /// Run it under `ulimit -S -n soft; ulimit -H -n hard` (through `sh`: a `pre_exec` hook would
    /// need unsafe code).
    pub(crate) open_files: Option<(u64, u64)>,
}

impl Default for Options<'_> {
    fn default() -> Self {
        Self {
            extra: &[],
            log_filter: "warn",
            open_files: None,
        }
    }
}

/// Starts `control-panel serve` on `data`, its log in `log` (outside the data directory, whose
/// files must be private).
pub(crate) fn start(
    data: &std::path::Path,
    log: &std::path::Path,
    operator_port: u16,
    extra: &[&str],
) -> tokio::process::Child {
    start_with(
        data,
        log,
        operator_port,
        Options {
            extra,
            ..Options::default()
        },
    )
}

/// [`start`] with [`Options`].
pub(crate) fn start_with(
    data: &std::path::Path,
    log: &std::path::Path,
    operator_port: u16,
    options: Options<'_>,
) -> tokio::process::Child {
    let bin = env!("CARGO_BIN_EXE_control-panel");
    let mut cmd = match options.open_files {
        None => Command::new(bin),
        Some((soft, hard)) => {
            let mut sh = Command::new("sh");
            sh.args([
                "-c",
                &format!("ulimit -S -n {soft} && ulimit -H -n {hard} && exec \"$0\" \"$@\""),
                bin,
            ]);
            sh
        }
    };
    cmd.args(["serve", "--data-dir"])
        .arg(data)
        .args(["--operator-listen", &format!("127.0.0.1:{operator_port}")]);
    if !options.extra.contains(&"--agent-listen") {
        cmd.args(["--agent-listen", "127.0.0.1:0"]);
    }
    // Its log (tracing writes to stdout, a failure to start to stderr), for a look when a test
    // fails.
    let log = std::fs::File::create(log).unwrap();
    cmd.args(options.extra)
        .env("RUST_LOG", options.log_filter)
        .env("NO_COLOR", "1")
        .env_remove("FLEET_CA_KEK")
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .kill_on_drop(true)
        .spawn()
        .unwrap()
}

/// Waits (bounded) until the login page, which is public, answers.
pub(crate) async fn wait_up(operator_port: u16, child: &mut tokio::process::Child) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        if let Some((200, _, body)) = send(operator_port, "GET", "/login", &[], "").await {
            assert!(String::from_utf8_lossy(&body).contains("Operator token"));
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the control panel did not come up"
        );
        assert!(child.try_wait().unwrap().is_none(), "it exited early");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// SIGTERM, and a clean exit within a bounded time.
pub(crate) async fn stop(mut child: tokio::process::Child) {
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
