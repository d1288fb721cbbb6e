//! A headless-Chromium harness for browser tests: spawns `chromedriver` on a free loopback port,
//! opens a W3C WebDriver session (through the `fantoccini` client) and offers the few helpers the
//! dashboard tests need.
//!
//! # Using it from a test
//!
//! Cargo only builds `tests/*.rs` as test crates, so this file is included by path:
//!
//! ```ignore
//! #[path = "support/browser.rs"]
//! mod browser;
//!
//! use browser::Browser;
//!
//! #[tokio::test]
//! async fn login_page() -> Result<(), browser::BrowserError> {
//!     let browser = Browser::start().await?;
//!     browser.goto("http://127.0.0.1:PORT/login").await?;
//!     browser.wait_for("form#login", browser::DEFAULT_TIMEOUT).await?;
//!     browser.fill("input[name=token]", "s3cret").await?;
//!     browser.click("button[type=submit]").await?;
//!     browser.wait_until("location.pathname === '/'", browser::DEFAULT_TIMEOUT).await?;
//!     browser.screenshot(browser::screenshot_path("login.png")).await?;
//!     browser.close().await
//! }
//! ```
//!
//! # What it needs
//!
//! `chromedriver` (env `CHROMEDRIVER`, else `chromedriver` on `PATH`, else
//! `/usr/bin/chromedriver`) and Chromium (env `CHROME_BIN`, else `chromium`, `chromium-browser`
//! or `google-chrome` on `PATH`); on Debian: `apt-get install chromium chromium-driver`.
//! Chromium runs with `--headless=new --no-sandbox` (the tests run as root).
//!
//! # Cleanup
//!
//! Call [`Browser::close`] at the end of a test: it deletes the session (chromedriver then quits
//! Chromium) and kills chromedriver. If a test panics first, `Drop` deletes the session with a
//! short blocking request and the chromedriver child is killed (`kill_on_drop`), so no Chromium
//! is left behind either way.
//!
//! Waiting is done only by the bounded polling helpers ([`Browser::wait_for`],
//! [`Browser::wait_until`]), which poll every [`POLL_INTERVAL`].

// Each test crate that includes this module uses only part of it.
#![allow(dead_code)]

use std::io::{Read as _, Write as _};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use fantoccini::error::{CmdError, NewSessionError};
use fantoccini::wd::Capabilities;
use fantoccini::{Client, ClientBuilder, Locator};
use http_body_util::{BodyExt as _, Empty};
use hyper::body::Bytes;
use hyper_util::client::legacy::Client as HttpClient;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde_json::{Value, json};
use tokio::process::{Child, Command};

/// A DOM element handle, as returned by [`Browser::find`] and friends.
pub(crate) use fantoccini::elements::Element;

/// A sensible bound for [`Browser::wait_for`] / [`Browser::wait_until`] on a loopback server.
pub(crate) const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);
/// How often the waiting helpers poll.
pub(crate) const POLL_INTERVAL: Duration = Duration::from_millis(50);
/// How long chromedriver may take to answer `/status` with `ready: true`.
const DRIVER_READY_TIMEOUT: Duration = Duration::from_secs(10);
/// How long Chromium may take to start when the session is opened.
const SESSION_TIMEOUT: Duration = Duration::from_secs(60);
/// Page-load bound for [`Browser::goto`] (chromedriver's own default is 300 s).
const PAGE_LOAD_TIMEOUT: Duration = Duration::from_secs(30);
/// Bound for synchronous scripts run by [`Browser::execute`].
const SCRIPT_TIMEOUT: Duration = Duration::from_secs(10);

const INSTALL_HINT: &str = "install them with `apt-get install chromium chromium-driver`";

/// Chromium's command line in every session.
pub(crate) const CHROME_ARGS: &[&str] = &[
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--window-size=1400,1000",
];

/// Why a browser operation failed. `Debug` prints the message (a test returning
/// `Result<(), BrowserError>` shows it as is).
#[derive(thiserror::Error)]
pub(crate) enum BrowserError {
    /// No usable chromedriver binary.
    #[error("chromedriver not found: {0}; {INSTALL_HINT} (or set CHROMEDRIVER)")]
    DriverNotFound(String),
    /// No usable Chromium binary.
    #[error("Chromium not found: {0}; {INSTALL_HINT} (or set CHROME_BIN)")]
    ChromiumNotFound(String),
    /// chromedriver could not be spawned.
    #[error("could not start {path}: {source}")]
    Spawn {
        path: PathBuf,
        source: std::io::Error,
    },
    /// chromedriver did not become ready (or exited) in time.
    #[error("chromedriver on port {port} did not become ready: {reason}")]
    DriverNotReady { port: u16, reason: String },
    /// chromedriver refused or failed to open a session (Chromium did not start, ...).
    #[error("could not open a WebDriver session: {0}")]
    Session(Box<NewSessionError>),
    /// A WebDriver command failed.
    #[error("{action}: {source}")]
    Command {
        action: String,
        source: Box<CmdError>,
    },
    /// A bounded wait ran out.
    #[error("timed out after {timeout:?} waiting for {what}{}", last_error_suffix(.last_error))]
    Timeout {
        what: String,
        timeout: Duration,
        last_error: Option<String>,
    },
    /// A local file operation failed.
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

impl std::fmt::Debug for BrowserError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Display::fmt(self, f)
    }
}

fn last_error_suffix(last: &Option<String>) -> String {
    last.as_ref()
        .map(|e| format!(" (last error: {e})"))
        .unwrap_or_default()
}

fn cmd_err(action: impl Into<String>) -> impl FnOnce(CmdError) -> BrowserError {
    let action = action.into();
    move |source| BrowserError::Command {
        action,
        source: Box::new(source),
    }
}

/// A cookie as the browser holds it (what WebDriver's Get All Cookies reports).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct CookieInfo {
    pub(crate) name: String,
    pub(crate) value: String,
    pub(crate) http_only: bool,
    pub(crate) secure: bool,
    /// `"Strict"`, `"Lax"` or `"None"`, as the browser reports it.
    pub(crate) same_site: Option<String>,
    pub(crate) path: Option<String>,
}

/// A headless Chromium behind its own chromedriver; see the module docs.
#[derive(Debug)]
pub(crate) struct Browser {
    client: Client,
    driver: Child,
    port: u16,
    session_id: Option<String>,
    closed: bool,
}

impl Browser {
    /// Finds chromedriver and Chromium, starts chromedriver on a free loopback port and opens a
    /// headless session.
    pub(crate) async fn start() -> Result<Self, BrowserError> {
        let driver_path = find_chromedriver()?;
        let chrome_path = find_chromium()?;
        let mut attempt = 0;
        loop {
            attempt += 1;
            let port = free_port()?;
            let mut driver = Command::new(&driver_path)
                .arg(format!("--port={port}"))
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .kill_on_drop(true)
                .spawn()
                .map_err(|source| BrowserError::Spawn {
                    path: driver_path.clone(),
                    source,
                })?;
            match wait_driver_ready(&mut driver, port).await {
                Ok(()) => return Self::open_session(driver, port, &chrome_path).await,
                // The port was probably taken between our probe and chromedriver's bind.
                Err(ReadyError::Exited(_)) if attempt < 3 => {}
                Err(ReadyError::Exited(reason) | ReadyError::TimedOut(reason)) => {
                    let _ = driver.kill().await;
                    return Err(BrowserError::DriverNotReady { port, reason });
                }
            }
        }
    }

    async fn open_session(
        mut driver: Child,
        port: u16,
        chrome_path: &Path,
    ) -> Result<Self, BrowserError> {
        let mut caps = Capabilities::new();
        caps.insert("browserName".into(), json!("chrome"));
        caps.insert(
            "goog:chromeOptions".into(),
            json!({ "args": CHROME_ARGS, "binary": chrome_path }),
        );
        caps.insert(
            "timeouts".into(),
            json!({
                "implicit": 0,
                "pageLoad": PAGE_LOAD_TIMEOUT.as_millis() as u64,
                "script": SCRIPT_TIMEOUT.as_millis() as u64,
            }),
        );
        let url = format!("http://127.0.0.1:{port}");
        let mut builder = ClientBuilder::new(HttpConnector::new());
        builder.capabilities(caps);
        let client = match tokio::time::timeout(SESSION_TIMEOUT, builder.connect(&url)).await {
            Ok(Ok(client)) => client,
            Ok(Err(e)) => {
                let _ = driver.kill().await;
                return Err(BrowserError::Session(Box::new(e)));
            }
            Err(_) => {
                let _ = driver.kill().await;
                return Err(BrowserError::Timeout {
                    what: "the WebDriver session (Chromium start)".into(),
                    timeout: SESSION_TIMEOUT,
                    last_error: None,
                });
            }
        };
        let session_id = client.session_id().await.map_err(cmd_err("session id"))?;
        Ok(Self {
            client,
            driver,
            port,
            session_id,
            closed: false,
        })
    }

    /// The underlying fantoccini client, for anything the helpers do not cover.
    pub(crate) fn client(&self) -> &Client {
        &self.client
    }

    /// Navigates to `url` and waits for the page load (bounded by the session's 30 s page-load
    /// timeout).
    pub(crate) async fn goto(&self, url: &str) -> Result<(), BrowserError> {
        self.client
            .goto(url)
            .await
            .map_err(cmd_err(format!("goto {url}")))
    }

    /// The current top-level URL.
    pub(crate) async fn current_url(&self) -> Result<String, BrowserError> {
        self.client
            .current_url()
            .await
            .map(String::from)
            .map_err(cmd_err("current_url"))
    }

    /// The first element matching `css`, now (no waiting).
    pub(crate) async fn find(&self, css: &str) -> Result<Element, BrowserError> {
        self.client
            .find(Locator::Css(css))
            .await
            .map_err(cmd_err(format!("find {css:?}")))
    }

    /// Every element matching `css`, now (possibly none).
    pub(crate) async fn find_all(&self, css: &str) -> Result<Vec<Element>, BrowserError> {
        self.client
            .find_all(Locator::Css(css))
            .await
            .map_err(cmd_err(format!("find_all {css:?}")))
    }

    /// Polls until an element matches `css`, for at most `timeout`.
    pub(crate) async fn wait_for(
        &self,
        css: &str,
        timeout: Duration,
    ) -> Result<Element, BrowserError> {
        poll(format!("an element matching {css:?}"), timeout, || async {
            match self.client.find(Locator::Css(css)).await {
                Ok(element) => Ok(Some(element)),
                Err(e) => Err(e.to_string()),
            }
        })
        .await
    }

    /// Polls until the JavaScript expression `js_expr` (e.g. `"document.title === 'Fleet'"`) is
    /// truthy, for at most `timeout`. Script errors while polling (the page may be navigating)
    /// count as "not yet" and are reported if the wait times out.
    pub(crate) async fn wait_until(
        &self,
        js_expr: &str,
        timeout: Duration,
    ) -> Result<(), BrowserError> {
        let script = format!("return !!({js_expr});");
        poll(format!("`{js_expr}`"), timeout, || async {
            match self.client.execute(&script, Vec::new()).await {
                Ok(Value::Bool(true)) => Ok(Some(())),
                Ok(_) => Ok(None),
                Err(e) => Err(e.to_string()),
            }
        })
        .await
    }

    /// The rendered text of the first element matching `css`.
    pub(crate) async fn text(&self, css: &str) -> Result<String, BrowserError> {
        self.find(css)
            .await?
            .text()
            .await
            .map_err(cmd_err(format!("text of {css:?}")))
    }

    /// Clicks the first element matching `css`.
    pub(crate) async fn click(&self, css: &str) -> Result<(), BrowserError> {
        self.find(css)
            .await?
            .click()
            .await
            .map_err(cmd_err(format!("click {css:?}")))
    }

    /// Clears the first field matching `css` and types `text` into it.
    pub(crate) async fn fill(&self, css: &str, text: &str) -> Result<(), BrowserError> {
        let field = self.find(css).await?;
        field
            .clear()
            .await
            .map_err(cmd_err(format!("clear {css:?}")))?;
        field
            .send_keys(text)
            .await
            .map_err(cmd_err(format!("type into {css:?}")))
    }

    /// Runs `js` as a function body (use `return` for a result; `arguments[i]` are `args`) and
    /// returns its JSON result.
    pub(crate) async fn execute(&self, js: &str, args: Vec<Value>) -> Result<Value, BrowserError> {
        self.client
            .execute(js, args)
            .await
            .map_err(cmd_err("execute script"))
    }

    /// Writes a PNG screenshot of the viewport to `path`, creating its parent directories.
    pub(crate) async fn screenshot(&self, path: impl AsRef<Path>) -> Result<(), BrowserError> {
        let path = path.as_ref();
        let png = self
            .client
            .screenshot()
            .await
            .map_err(cmd_err("screenshot"))?;
        let io_err = |source| BrowserError::Io {
            path: path.to_path_buf(),
            source,
        };
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(io_err)?;
        }
        std::fs::write(path, png).map_err(io_err)
    }

    /// Every cookie visible to the current page, HttpOnly ones included.
    pub(crate) async fn cookies(&self) -> Result<Vec<CookieInfo>, BrowserError> {
        let cookies = self
            .client
            .get_all_cookies()
            .await
            .map_err(cmd_err("get cookies"))?;
        Ok(cookies
            .into_iter()
            .map(|c| CookieInfo {
                name: c.name().to_owned(),
                value: c.value().to_owned(),
                http_only: c.http_only().unwrap_or(false),
                secure: c.secure().unwrap_or(false),
                same_site: c.same_site().map(|s| s.to_string()),
                path: c.path().map(str::to_owned),
            })
            .collect())
    }

    /// Deletes the session (Chromium quits) and stops chromedriver.
    pub(crate) async fn close(mut self) -> Result<(), BrowserError> {
        self.closed = true;
        let closed = self
            .client
            .clone()
            .close()
            .await
            .map_err(cmd_err("delete session"));
        let _ = self.driver.kill().await;
        closed
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        if self.closed {
            return;
        }
        // Not closed (a failing test): delete the session so that chromedriver quits Chromium,
        // with a blocking request since `Drop` cannot await; then `kill_on_drop` ends
        // chromedriver itself.
        if let Some(id) = &self.session_id {
            delete_session_blocking(self.port, id);
        }
    }
}

/// Best effort: `DELETE /session/{id}` over a plain blocking socket, bounded by a few seconds.
fn delete_session_blocking(port: u16, session_id: &str) {
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let Ok(mut stream) = TcpStream::connect_timeout(&addr, Duration::from_secs(1)) else {
        return;
    };
    let _ = stream.set_write_timeout(Some(Duration::from_secs(2)));
    let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
    let request = format!(
        "DELETE /session/{session_id} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\
         Content-Length: 0\r\nConnection: close\r\n\r\n"
    );
    if stream.write_all(request.as_bytes()).is_ok() {
        // Wait for the start of the answer: chromedriver replies once Chromium has quit (it may
        // keep the connection open, so do not read to the end).
        let mut buf = [0_u8; 512];
        let _ = stream.read(&mut buf);
    }
}

/// Polls `attempt` every [`POLL_INTERVAL`] until it yields a value, for at most `timeout`.
/// `Err` from an attempt is remembered and the polling goes on.
async fn poll<T, F, Fut>(what: String, timeout: Duration, mut attempt: F) -> Result<T, BrowserError>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<Option<T>, String>>,
{
    let deadline = Instant::now() + timeout;
    let mut last_error = None;
    loop {
        match attempt().await {
            Ok(Some(value)) => return Ok(value),
            Ok(None) => {}
            Err(e) => last_error = Some(e),
        }
        if Instant::now() >= deadline {
            return Err(BrowserError::Timeout {
                what,
                timeout,
                last_error,
            });
        }
        tokio::time::sleep(POLL_INTERVAL).await;
    }
}

enum ReadyError {
    Exited(String),
    TimedOut(String),
}

/// Polls chromedriver's `/status` until it reports `ready: true`.
async fn wait_driver_ready(driver: &mut Child, port: u16) -> Result<(), ReadyError> {
    let http: HttpClient<HttpConnector, Empty<Bytes>> =
        HttpClient::builder(TokioExecutor::new()).build(HttpConnector::new());
    let uri: hyper::Uri = format!("http://127.0.0.1:{port}/status")
        .parse()
        .expect("valid status URI");
    let deadline = Instant::now() + DRIVER_READY_TIMEOUT;
    loop {
        if let Ok(Some(status)) = driver.try_wait() {
            return Err(ReadyError::Exited(format!(
                "chromedriver exited with {status}"
            )));
        }
        let probe = async {
            let response = http.get(uri.clone()).await.map_err(|e| e.to_string())?;
            let body = response
                .into_body()
                .collect()
                .await
                .map_err(|e| e.to_string())?
                .to_bytes();
            let status: Value = serde_json::from_slice(&body).map_err(|e| e.to_string())?;
            Ok::<bool, String>(status["value"]["ready"] == Value::Bool(true))
        };
        let last = match tokio::time::timeout(Duration::from_secs(1), probe).await {
            Ok(Ok(true)) => return Ok(()),
            Ok(Ok(false)) => "/status says not ready".to_owned(),
            Ok(Err(e)) => e,
            Err(_) => "/status did not answer within 1 s".to_owned(),
        };
        if Instant::now() >= deadline {
            return Err(ReadyError::TimedOut(format!(
                "not ready after {DRIVER_READY_TIMEOUT:?} ({last})"
            )));
        }
        tokio::time::sleep(POLL_INTERVAL).await;
    }
}

/// A loopback port that was free a moment ago.
fn free_port() -> Result<u16, BrowserError> {
    TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .and_then(|listener| listener.local_addr())
        .map(|addr| addr.port())
        .map_err(|source| BrowserError::Io {
            path: "127.0.0.1:0".into(),
            source,
        })
}

fn find_chromedriver() -> Result<PathBuf, BrowserError> {
    if let Some(value) = non_empty_env("CHROMEDRIVER") {
        return resolve_program(&value).ok_or_else(|| {
            BrowserError::DriverNotFound(format!("CHROMEDRIVER={value} is not an executable"))
        });
    }
    which("chromedriver")
        .or_else(|| {
            is_executable(Path::new("/usr/bin/chromedriver"))
                .then(|| "/usr/bin/chromedriver".into())
        })
        .ok_or_else(|| {
            BrowserError::DriverNotFound("not on PATH nor at /usr/bin/chromedriver".into())
        })
}

fn find_chromium() -> Result<PathBuf, BrowserError> {
    if let Some(value) = non_empty_env("CHROME_BIN") {
        return resolve_program(&value).ok_or_else(|| {
            BrowserError::ChromiumNotFound(format!("CHROME_BIN={value} is not an executable"))
        });
    }
    ["chromium", "chromium-browser", "google-chrome"]
        .into_iter()
        .find_map(which)
        .ok_or_else(|| {
            BrowserError::ChromiumNotFound(
                "none of chromium, chromium-browser, google-chrome is on PATH".into(),
            )
        })
}

fn non_empty_env(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.trim().is_empty())
}

/// A path (absolute or relative) or a bare program name looked up on `PATH`.
fn resolve_program(value: &str) -> Option<PathBuf> {
    if value.contains('/') {
        let path = PathBuf::from(value);
        is_executable(&path).then_some(path)
    } else {
        which(value)
    }
}

fn which(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|candidate| is_executable(candidate))
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt as _;
    path.metadata()
        .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// `target/screenshots/<file_name>`: `target/` is `$CARGO_TARGET_DIR` when set (a relative one
/// is taken from the workspace root), else the workspace's `target/`.
pub(crate) fn screenshot_path(file_name: &str) -> PathBuf {
    let manifest_dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    let workspace = manifest_dir.parent().unwrap_or(manifest_dir);
    let target = match std::env::var_os("CARGO_TARGET_DIR").filter(|v| !v.is_empty()) {
        Some(dir) => workspace.join(dir),
        None => workspace.join("target"),
    };
    target.join("screenshots").join(file_name)
}
