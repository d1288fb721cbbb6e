//! The web dashboard: a login page, one page shell for the fleet, server detail, fleet health and
//! registration tokens, and the script and stylesheet that fill it from the JSON API.
//!
//! Everything is compiled into the binary (`include_str!`): no font, script or image comes from
//! the internet, so the dashboard works on an air-gapped network. Pages are served only to a
//! logged-in session (others are sent to `/login`), with a Content-Security-Policy that allows
//! nothing but this origin's own script and style — no inline script, no `eval`.

use std::collections::BTreeMap;

use hyper::body::Bytes;
use hyper::header::{
    CACHE_CONTROL, CONTENT_SECURITY_POLICY, CONTENT_TYPE, HeaderValue, LOCATION, REFERRER_POLICY,
    X_CONTENT_TYPE_OPTIONS, X_FRAME_OPTIONS,
};
use hyper::{Response, StatusCode, Uri};

use super::Body;
use super::auth::{Caller, Via};

const SHELL: &str = include_str!("assets/index.html");
const LOGIN: &str = include_str!("assets/login.html");
const APP_JS: &str = include_str!("assets/app.js");
const APP_CSS: &str = include_str!("assets/app.css");
const ICON: &str = include_str!("assets/icon.svg");

const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; \
                   connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'";

/// Whether `path` is one of the dashboard's pages (`/`, `/health`, `/tokens`,
/// `/instances/{id}`).
pub fn is_page(path: &str) -> bool {
    match path {
        "/" | "/health" | "/tokens" => true,
        p => p.strip_prefix("/instances/").is_some_and(|id| {
            !id.is_empty() && !id.contains('/') && id.len() <= 64 && id.is_ascii()
        }),
    }
}

/// Escapes text for HTML content and quoted attribute values.
pub fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// Replaces each `{{name}}` of `template` with its value in one pass: a value is never scanned
/// for placeholders, so one value cannot inject into another.
fn fill(template: &str, values: &[(&str, &str)]) -> String {
    let mut out = String::with_capacity(template.len() + 256);
    let mut rest = template;
    while let Some(start) = rest.find("{{") {
        out.push_str(&rest[..start]);
        let after = &rest[start + 2..];
        match after.find("}}").and_then(|end| {
            let name = &after[..end];
            values
                .iter()
                .find(|(k, _)| *k == name)
                .map(|(_, v)| (*v, end))
        }) {
            Some((value, end)) => {
                out.push_str(value);
                rest = &after[end + 2..];
            }
            None => {
                out.push_str("{{");
                rest = after;
            }
        }
    }
    out.push_str(rest);
    out
}

fn page(status: StatusCode, html: String) -> Response<Body> {
    let mut r = Response::new(Body::new(Bytes::from(html)));
    *r.status_mut() = status;
    let h = r.headers_mut();
    h.insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/html; charset=utf-8"),
    );
    h.insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert(CONTENT_SECURITY_POLICY, HeaderValue::from_static(CSP));
    h.insert(X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    h.insert(X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(REFERRER_POLICY, HeaderValue::from_static("same-origin"));
    r
}

/// The page shell for a logged-in session: the script reads the CSRF token and the tenant from
/// its `<meta>` tags and draws the page the URL names.
pub fn shell(caller: &Caller) -> Response<Body> {
    let csrf = match &caller.via {
        Via::Session { csrf, .. } => csrf.as_str(),
        Via::Bearer => "",
    };
    let tenant = caller.tenant().map_or("", |t| t.as_str());
    let html = fill(
        SHELL,
        &[("csrf", &escape(csrf)), ("tenant", &escape(tenant))],
    );
    page(StatusCode::OK, html)
}

/// Where to go after logging in: a local path only (never `//host` or a full URL), else `/`.
pub fn safe_next(next: Option<&str>) -> &str {
    match next {
        Some(n)
            if n.starts_with('/')
                && !n.starts_with("//")
                && !n.contains('\\')
                && n.bytes().all(|b| b.is_ascii_graphic()) =>
        {
            n
        }
        _ => "/",
    }
}

/// The login page; `error` is shown above the form, `form` may carry `next`.
pub fn login_page(
    status: StatusCode,
    error: Option<&str>,
    form: &BTreeMap<String, String>,
) -> Response<Body> {
    let next = safe_next(form.get("next").map(String::as_str));
    let error = error.map_or(String::new(), |e| {
        format!(
            r#"<p class="error" id="login-error" role="alert">{}</p>"#,
            escape(e)
        )
    });
    let html = fill(LOGIN, &[("next", &escape(next)), ("error", &error)]);
    page(status, html)
}

/// Sends a browser without a session to the login page, remembering where it was going.
pub fn to_login(uri: &Uri) -> Response<Body> {
    let next = uri.path_and_query().map_or("/", |p| p.as_str());
    let location = format!(
        "/login?next={}",
        form_urlencoded::byte_serialize(next.as_bytes()).collect::<String>()
    );
    let mut r = Response::new(Body::new(Bytes::new()));
    *r.status_mut() = StatusCode::SEE_OTHER;
    if let Ok(v) = HeaderValue::from_str(&location) {
        r.headers_mut().insert(LOCATION, v);
    }
    r.headers_mut()
        .insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    r
}

/// A compiled-in asset under `/assets/`, or 404.
pub fn asset(path: &str) -> Response<Body> {
    let (body, kind) = match path {
        "/assets/app.js" => (APP_JS, "text/javascript; charset=utf-8"),
        "/assets/app.css" => (APP_CSS, "text/css; charset=utf-8"),
        "/assets/icon.svg" => (ICON, "image/svg+xml"),
        _ => {
            return super::error(StatusCode::NOT_FOUND, "not_found", "no such asset");
        }
    };
    let mut r = Response::new(Body::new(Bytes::from_static(body.as_bytes())));
    let h = r.headers_mut();
    h.insert(CONTENT_TYPE, HeaderValue::from_static(kind));
    // Assets change only with the binary; revalidate rather than risk a stale script.
    h.insert(CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    h.insert(X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pages_are_recognised() {
        for p in ["/", "/health", "/tokens", "/instances/abc"] {
            assert!(is_page(p), "{p}");
        }
        for p in [
            "/instances/",
            "/instances/a/b",
            "/api/v1/summary",
            "/nope",
            "/login",
        ] {
            assert!(!is_page(p), "{p}");
        }
    }

    #[test]
    fn next_stays_on_this_site() {
        assert_eq!(safe_next(Some("/instances/x?y=1")), "/instances/x?y=1");
        for bad in ["//evil.example", "https://evil.example", "/\\evil", "", "x"] {
            assert_eq!(safe_next(Some(bad)), "/", "{bad}");
        }
        assert_eq!(safe_next(None), "/");
    }

    #[test]
    fn placeholders_are_filled_once() {
        let t = "<p>{{a}}</p><i>{{b}}</i>{{unknown}}{{";
        assert_eq!(
            fill(t, &[("a", "{{b}}"), ("b", "x")]),
            "<p>{{b}}</p><i>x</i>{{unknown}}{{",
            "a value is not scanned again"
        );
        assert_eq!(safe_next(Some("/?q={x}")), "/?q={x}");
    }

    #[test]
    fn escaping_covers_attributes() {
        assert_eq!(
            escape(r#"<a href="x">'&"#),
            "&lt;a href=&quot;x&quot;&gt;&#39;&amp;"
        );
    }
}
