//! Self-test of the browser harness (`tests/support/browser.rs`): a real headless Chromium,
//! driven through chromedriver, against a one-page hyper server on loopback.
//!
//! Needs `chromium` and `chromedriver` (`apt-get install chromium chromium-driver`).

#[path = "support/browser.rs"]
mod browser;

use std::convert::Infallible;
use std::time::Duration;

use browser::{Browser, BrowserError, DEFAULT_TIMEOUT};
use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use serde_json::json;
use tokio::net::TcpListener;

const PAGE: &str = r#"<!doctype html>
<html>
<head><meta charset="utf-8"><title>smoke</title></head>
<body>
  <h1 id="msg">waiting</h1>
  <input id="name" value="old">
  <button id="go">Go</button>
  <ul><li>a</li><li>b</li><li>c</li></ul>
  <script>
    document.getElementById('go').addEventListener('click', () => {
      // Late on purpose: the test must wait for it, not race it.
      setTimeout(() => {
        document.getElementById('msg').textContent =
          'hello ' + document.getElementById('name').value;
      }, 200);
    });
  </script>
</body>
</html>
"#;

async fn page(req: Request<Incoming>) -> Result<Response<Full<Bytes>>, Infallible> {
    let response = if req.uri().path() == "/" {
        Response::builder()
            .header("content-type", "text/html; charset=utf-8")
            .header("set-cookie", "s=1; HttpOnly; SameSite=Strict; Path=/")
            .body(Full::new(Bytes::from_static(PAGE.as_bytes())))
    } else {
        Response::builder()
            .status(404)
            .body(Full::new(Bytes::from_static(b"not found")))
    };
    Ok(response.expect("valid response"))
}

/// Serves [`PAGE`] on `127.0.0.1:0`; returns the base URL and the server task.
async fn serve() -> (String, tokio::task::JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("local addr");
    let task = tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                continue;
            };
            tokio::spawn(async move {
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tcp), hyper::service::service_fn(page))
                    .await;
            });
        }
    });
    (format!("http://{addr}/"), task)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn browser_drives_a_page() -> Result<(), BrowserError> {
    let (base, server) = serve().await;
    let browser = Browser::start().await?;

    browser.goto(&base).await?;
    assert_eq!(browser.current_url().await?, base);
    browser.wait_for("#go", DEFAULT_TIMEOUT).await?;
    assert_eq!(browser.find_all("li").await?.len(), 3);
    assert_eq!(browser.text("#msg").await?, "waiting");

    browser.fill("#name", "fleet").await?;
    browser.click("#go").await?;
    browser
        .wait_until(
            "document.getElementById('msg').textContent === 'hello fleet'",
            DEFAULT_TIMEOUT,
        )
        .await?;
    assert_eq!(browser.text("#msg").await?, "hello fleet");
    assert_eq!(
        browser
            .execute("return arguments[0] + 1;", vec![json!(41)])
            .await?,
        json!(42)
    );

    // The cookie is HttpOnly: invisible to the page's JS, visible to WebDriver with its flags.
    assert_eq!(
        browser.execute("return document.cookie;", vec![]).await?,
        json!("")
    );
    let cookies = browser.cookies().await?;
    let session = cookies
        .iter()
        .find(|c| c.name == "s")
        .unwrap_or_else(|| panic!("no cookie `s` in {cookies:?}"));
    assert_eq!(session.value, "1");
    assert!(session.http_only, "{session:?}");
    assert_eq!(session.same_site.as_deref(), Some("Strict"), "{session:?}");
    assert_eq!(session.path.as_deref(), Some("/"), "{session:?}");

    // The waits are bounded and say what they waited for.
    let missing = browser
        .wait_for("#absent", Duration::from_millis(300))
        .await
        .expect_err("no such element");
    assert!(
        matches!(&missing, BrowserError::Timeout { what, .. } if what.contains("#absent")),
        "{missing}"
    );

    let shot = browser::screenshot_path("smoke.png");
    browser.screenshot(&shot).await?;
    let png = std::fs::read(&shot).expect("screenshot written");
    assert!(png.starts_with(b"\x89PNG\r\n\x1a\n"), "not a PNG: {shot:?}");

    browser.close().await?;
    server.abort();
    Ok(())
}
