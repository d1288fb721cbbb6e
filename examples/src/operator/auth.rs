//! Who is calling: operator tokens (each global or scoped to one tenant) and browser sessions.
//!
//! A script presents `Authorization: Bearer <operator token>`. A browser logs in once with the
//! token (`POST /login`) and then carries the session cookie [`SESSION_COOKIE`]: `HttpOnly` (no
//! script can read it), `SameSite=Strict` (no other site's page can make the browser send it) and
//! `Path=/`. Writes made with the cookie must also carry the session's CSRF token in
//! [`CSRF_HEADER`], which only a page served to that session knows, and a cross-origin `Origin`
//! is refused: two independent defences against cross-site requests.
//!
//! Only hashes are kept: the SHA-256 of each operator token and of each session id. Sessions live
//! in memory (a restart logs every browser out) and expire [`SESSION_TTL`] after login, by the
//! fleet's clock; each token holds at most [`MAX_SESSIONS_PER_TOKEN`].
//!
//! Behind a TLS-terminating reverse proxy, pass the browser's `Host` through (nginx:
//! `proxy_set_header Host $host;`) so that the `Origin` check compares like with like, set
//! `X-Forwarded-Proto: https` (nginx: `proxy_set_header X-Forwarded-Proto $scheme;`), and name
//! the proxy with `--trusted-proxy`: only then is the session cookie marked `Secure` and an
//! `https://` origin taken for this site's. The header is ignored from any other peer
//! ([`super::proxy`]), and the `Origin` check compares scheme and host.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use fleet_core::RandomError;
use fleet_core::token::TokenSecret;
use fleet_core::{Fingerprint, TenantId, TenantScope, Timestamp};
use hyper::header::{AUTHORIZATION, COOKIE, HOST, ORIGIN};
use hyper::{HeaderMap, Method, Uri};

use super::proxy::Scheme;
use subtle::ConstantTimeEq;

/// The session cookie's name.
pub const SESSION_COOKIE: &str = "fleet_session";
/// The header carrying the CSRF token on cookie-authenticated writes.
pub const CSRF_HEADER: &str = "x-csrf-token";
/// How long a browser session lasts after login.
pub const SESSION_TTL: Duration = Duration::from_secs(12 * 3600);
/// Most sessions one operator token may hold at once; logging in beyond this ends that token's
/// oldest session (so no token holder can push other operators out).
pub const MAX_SESSIONS_PER_TOKEN: usize = 1_000;

fn sha256(s: &str) -> [u8; 32] {
    *Fingerprint::of(s.as_bytes()).as_bytes()
}

/// One operator token: the hash of its secret and what it may see.
#[derive(Debug, Clone)]
struct OperatorToken {
    hash: [u8; 32],
    scope: TenantScope,
}

/// A live browser session.
#[derive(Debug, Clone)]
struct Session {
    /// The hash of the operator token that opened it.
    token: [u8; 32],
    scope: TenantScope,
    csrf: String,
    expires_at: Timestamp,
}

/// How a caller proved who it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Via {
    /// `Authorization: Bearer`.
    Bearer,
    /// The session cookie; writes must carry `csrf`.
    Session {
        /// The session's CSRF token.
        csrf: String,
        /// When the session ends.
        expires_at: Timestamp,
    },
}

/// An authenticated caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    /// What the caller may see and change.
    pub scope: TenantScope,
    /// How it authenticated.
    pub via: Via,
}

impl Caller {
    /// The tenant the caller is limited to, if any.
    pub fn tenant(&self) -> Option<&TenantId> {
        match &self.scope {
            TenantScope::All => None,
            TenantScope::Tenant(t) => Some(t),
        }
    }
}

/// Why a write made with the session cookie was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum CsrfError {
    /// The `X-CSRF-Token` header is missing or does not match the session.
    #[error("a write with the session cookie needs the session's X-CSRF-Token header")]
    Token,
    /// The request came from a page of another origin.
    #[error("cross-origin request refused")]
    Origin,
}

/// Operator tokens and browser sessions.
#[derive(Debug)]
pub struct Auth {
    tokens: Vec<OperatorToken>,
    sessions: Mutex<HashMap<[u8; 32], Session>>,
}

impl Auth {
    /// Accepts `token` with global (all-tenant) scope.
    pub fn new(token: &str) -> Self {
        Self {
            tokens: vec![OperatorToken {
                hash: sha256(token),
                scope: TenantScope::All,
            }],
            sessions: Mutex::new(HashMap::new()),
        }
    }

    /// Also accepts `token`, limited to `tenant`.
    pub fn add_tenant_token(&mut self, tenant: TenantId, token: &str) {
        self.tokens.push(OperatorToken {
            hash: sha256(token),
            scope: TenantScope::Tenant(tenant),
        });
    }

    /// The scope of an operator token, compared in constant time against every known token.
    /// An empty token is never one.
    pub fn token_scope(&self, presented: &str) -> Option<TenantScope> {
        if presented.is_empty() {
            return None;
        }
        let hash = sha256(presented);
        let mut found = None;
        for t in &self.tokens {
            if bool::from(t.hash.ct_eq(&hash)) {
                found = Some(t.scope.clone());
            }
        }
        found
    }

    /// Starts a session for an operator token and ends the one the request's cookie named, if
    /// any (a login never extends or reuses an earlier session). Returns the new cookie value,
    /// or `None` when the token is not an operator token.
    ///
    /// # Errors
    /// The system's random number generator failed.
    pub fn login(
        &self,
        presented: &str,
        headers: &HeaderMap,
        now: Timestamp,
    ) -> Result<Option<(String, Caller)>, RandomError> {
        let Some(scope) = self.token_scope(presented) else {
            return Ok(None);
        };
        let token = sha256(presented);
        let id = TokenSecret::random()?.expose().to_owned();
        let csrf = TokenSecret::random()?.expose().to_owned();
        let session = Session {
            token,
            scope: scope.clone(),
            csrf: csrf.clone(),
            expires_at: now.saturating_add(SESSION_TTL),
        };
        let caller = Caller {
            scope,
            via: Via::Session {
                csrf,
                expires_at: session.expires_at,
            },
        };
        let mut sessions = self.lock();
        if let Some(old) = cookie(headers, SESSION_COOKIE) {
            sessions.remove(&sha256(old));
        }
        let mine = |s: &Session| bool::from(s.token.ct_eq(&token));
        if sessions.values().filter(|s| mine(s)).count() >= MAX_SESSIONS_PER_TOKEN {
            sessions.retain(|_, s| s.expires_at > now);
            if sessions.values().filter(|s| mine(s)).count() >= MAX_SESSIONS_PER_TOKEN
                && let Some(oldest) = sessions
                    .iter()
                    .filter(|(_, s)| mine(s))
                    .min_by_key(|(_, s)| s.expires_at)
                    .map(|(k, _)| *k)
            {
                sessions.remove(&oldest);
            }
        }
        sessions.insert(sha256(&id), session);
        Ok(Some((id, caller)))
    }

    /// Ends the session named by the request's cookie, if any.
    pub fn logout(&self, headers: &HeaderMap) {
        if let Some(id) = cookie(headers, SESSION_COOKIE) {
            self.lock().remove(&sha256(id));
        }
    }

    /// How many sessions are live (expired ones are dropped lazily).
    pub fn session_count(&self) -> usize {
        self.lock().len()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<[u8; 32], Session>> {
        // A panic while holding this lock cannot leave the map inconsistent (every change is
        // one insert or remove), so a poisoned lock is still usable.
        self.sessions
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The session named by the request's cookie, if live at `now`.
    pub fn session(&self, headers: &HeaderMap, now: Timestamp) -> Option<Caller> {
        let id = cookie(headers, SESSION_COOKIE)?;
        let key = sha256(id);
        let mut sessions = self.lock();
        let s = sessions.get(&key)?;
        if s.expires_at <= now {
            sessions.remove(&key);
            return None;
        }
        Some(Caller {
            scope: s.scope.clone(),
            via: Via::Session {
                csrf: s.csrf.clone(),
                expires_at: s.expires_at,
            },
        })
    }

    /// The caller of an API request: a bearer token if one is presented (a wrong one is not
    /// rescued by a cookie), else the session cookie.
    pub fn caller(&self, headers: &HeaderMap, now: Timestamp) -> Option<Caller> {
        if let Some(v) = headers.get(AUTHORIZATION) {
            let presented = v.to_str().ok()?.strip_prefix("Bearer ")?;
            return self.token_scope(presented).map(|scope| Caller {
                scope,
                via: Via::Bearer,
            });
        }
        self.session(headers, now)
    }
}

/// This site as a browser names it in `Origin`: the scheme the client used (from a trusted
/// proxy's `X-Forwarded-Proto`, else `http`; see [`super::proxy`]) and the host it asked for
/// (`Host`, or the `:authority` of an HTTP/2 request).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Site<'a> {
    /// The scheme the client used.
    pub scheme: Scheme,
    /// The host (and port) the request was sent to, if it says.
    pub host: Option<&'a str>,
}

impl<'a> Site<'a> {
    /// The site a request with `headers` and `uri` was sent to, over `scheme`.
    pub fn of(scheme: Scheme, headers: &'a HeaderMap, uri: &'a Uri) -> Self {
        let host = headers
            .get(HOST)
            .and_then(|h| h.to_str().ok())
            .or_else(|| uri.authority().map(|a| a.as_str()));
        Self { scheme, host }
    }
}

/// Checks a write made with the session cookie: the CSRF header must match and an `Origin`, when
/// the browser sends one, must be `site`. Reads and bearer callers pass.
pub fn check_csrf(
    caller: &Caller,
    method: &Method,
    headers: &HeaderMap,
    site: Site<'_>,
) -> Result<(), CsrfError> {
    let Via::Session { csrf, .. } = &caller.via else {
        return Ok(());
    };
    if matches!(*method, Method::GET | Method::HEAD | Method::OPTIONS) {
        return Ok(());
    }
    same_origin(headers, site)?;
    let presented = headers
        .get(CSRF_HEADER)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    if bool::from(presented.as_bytes().ct_eq(csrf.as_bytes())) && !csrf.is_empty() {
        Ok(())
    } else {
        Err(CsrfError::Token)
    }
}

/// An `Origin` header, when present, must be `site`: the same scheme and the same host. A page
/// served over `http://` is another origin than this site behind an HTTPS proxy, and the other
/// way round (an `http://` page could be anyone's on the network path).
pub fn same_origin(headers: &HeaderMap, site: Site<'_>) -> Result<(), CsrfError> {
    let Some(origin) = headers.get(ORIGIN) else {
        return Ok(());
    };
    let origin_host = origin
        .to_str()
        .ok()
        .and_then(|o| o.split_once("://"))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case(site.scheme.as_str()))
        .map(|(_, host)| host);
    match (origin_host, site.host) {
        (Some(o), Some(h)) if o.eq_ignore_ascii_case(h) => Ok(()),
        _ => Err(CsrfError::Origin),
    }
}

/// The value of cookie `name` in the request's `Cookie` headers.
pub fn cookie<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get_all(COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v)
}

/// The `Set-Cookie` value that stores session `id` in the browser; `secure` adds `Secure` (the
/// page was served over HTTPS, by a proxy in front of this listener).
pub fn session_cookie(id: &str, secure: bool) -> String {
    format!(
        "{SESSION_COOKIE}={id}; HttpOnly; SameSite=Strict; Path=/; Max-Age={}{}",
        SESSION_TTL.as_secs(),
        if secure { "; Secure" } else { "" }
    )
}

/// The `Set-Cookie` value that removes the session cookie.
pub fn clear_cookie() -> String {
    format!("{SESSION_COOKIE}=; HttpOnly; SameSite=Strict; Path=/; Max-Age=0")
}

#[cfg(test)]
mod tests {
    use super::*;
    use hyper::header::HeaderValue;

    fn t0() -> Timestamp {
        Timestamp::from_unix_secs(1_790_000_000)
    }

    fn with_cookie(id: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(
            COOKIE,
            HeaderValue::from_str(&format!("other=1; {SESSION_COOKIE}={id}")).unwrap(),
        );
        h
    }

    #[test]
    fn tokens_map_to_their_scope() {
        let mut auth = Auth::new("global");
        auth.add_tenant_token(TenantId::new("acme").unwrap(), "acme-token");
        assert_eq!(auth.token_scope("global"), Some(TenantScope::All));
        assert_eq!(
            auth.token_scope("acme-token"),
            Some(TenantScope::Tenant(TenantId::new("acme").unwrap()))
        );
        assert_eq!(auth.token_scope("nope"), None);
        let empty = Auth::new("");
        assert_eq!(empty.token_scope(""), None, "an empty token never matches");
        assert_eq!(auth.token_scope(""), None);
    }

    #[test]
    fn sessions_expire_and_log_out() {
        let auth = Auth::new("global");
        assert!(
            auth.login("wrong", &HeaderMap::new(), t0())
                .unwrap()
                .is_none()
        );
        assert_eq!(auth.session_count(), 0, "a failed login stores nothing");
        let (id, caller) = auth
            .login("global", &HeaderMap::new(), t0())
            .unwrap()
            .unwrap();
        let h = with_cookie(&id);
        assert_eq!(auth.session(&h, t0()), Some(caller));
        assert!(auth.session(&with_cookie("forged"), t0()).is_none());
        let late = t0().saturating_add(SESSION_TTL);
        assert!(auth.session(&h, late).is_none(), "expired at the TTL");
        assert_eq!(auth.session_count(), 0, "an expired session is dropped");
        let (id, _) = auth
            .login("global", &HeaderMap::new(), t0())
            .unwrap()
            .unwrap();
        auth.logout(&with_cookie(&id));
        assert!(auth.session(&with_cookie(&id), t0()).is_none());
    }

    #[test]
    fn a_wrong_bearer_is_not_rescued_by_the_cookie() {
        let auth = Auth::new("global");
        let (id, _) = auth
            .login("global", &HeaderMap::new(), t0())
            .unwrap()
            .unwrap();
        let mut h = with_cookie(&id);
        h.insert(AUTHORIZATION, HeaderValue::from_static("Bearer wrong"));
        assert!(auth.caller(&h, t0()).is_none());
    }

    #[test]
    fn csrf_is_required_for_cookie_writes_only() {
        let auth = Auth::new("global");
        let (id, caller) = auth
            .login("global", &HeaderMap::new(), t0())
            .unwrap()
            .unwrap();
        let Via::Session { csrf, .. } = &caller.via else {
            panic!("a login makes a session");
        };
        let mut h = with_cookie(&id);
        let uri = Uri::from_static("/api/v1/tokens");
        let http = |_: &HeaderMap| Site {
            scheme: Scheme::Http,
            host: Some("127.0.0.1:8080"),
        };
        assert_eq!(check_csrf(&caller, &Method::GET, &h, http(&h)), Ok(()));
        assert_eq!(
            check_csrf(&caller, &Method::POST, &h, http(&h)),
            Err(CsrfError::Token)
        );
        h.insert(CSRF_HEADER, HeaderValue::from_str(csrf).unwrap());
        h.insert(HOST, HeaderValue::from_static("127.0.0.1:8080"));
        assert_eq!(check_csrf(&caller, &Method::POST, &h, http(&h)), Ok(()));
        h.insert(ORIGIN, HeaderValue::from_static("http://evil.example"));
        assert_eq!(
            check_csrf(&caller, &Method::DELETE, &h, http(&h)),
            Err(CsrfError::Origin)
        );
        h.insert(ORIGIN, HeaderValue::from_static("http://127.0.0.1:8080"));
        assert_eq!(check_csrf(&caller, &Method::PUT, &h, http(&h)), Ok(()));
        // The scheme counts: the same host over the other scheme is another origin.
        let https = Site {
            scheme: Scheme::Https,
            host: Some("127.0.0.1:8080"),
        };
        assert_eq!(Site::of(Scheme::Https, &h, &uri), https);
        assert_eq!(
            check_csrf(&caller, &Method::PUT, &h, https),
            Err(CsrfError::Origin)
        );
        h.insert(ORIGIN, HeaderValue::from_static("https://127.0.0.1:8080"));
        assert_eq!(check_csrf(&caller, &Method::PUT, &h, https), Ok(()));
        assert_eq!(
            check_csrf(&caller, &Method::PUT, &h, http(&h)),
            Err(CsrfError::Origin)
        );
        // HTTP/2 has no Host header: the authority of the request's URI is the host.
        let mut h2 = h.clone();
        h2.remove(HOST);
        let uri2 = Uri::from_static("https://127.0.0.1:8080/api/v1/tokens");
        assert_eq!(
            check_csrf(
                &caller,
                &Method::PUT,
                &h2,
                Site::of(Scheme::Https, &h2, &uri2)
            ),
            Ok(())
        );
        let bearer = Caller {
            scope: TenantScope::All,
            via: Via::Bearer,
        };
        assert_eq!(
            check_csrf(&bearer, &Method::POST, &HeaderMap::new(), http(&h)),
            Ok(())
        );
    }

    #[test]
    fn a_token_at_its_session_limit_ends_its_own_oldest() {
        let mut auth = Auth::new("global");
        auth.add_tenant_token(TenantId::new("acme").unwrap(), "acme-token");
        let none = HeaderMap::new();
        let (global, _) = auth.login("global", &none, t0()).unwrap().unwrap();
        let (first, _) = auth.login("acme-token", &none, t0()).unwrap().unwrap();
        let n = MAX_SESSIONS_PER_TOKEN as u64;
        for i in 1..n {
            let at = t0().saturating_add(Duration::from_secs(i));
            auth.login("acme-token", &none, at).unwrap().unwrap();
        }
        assert!(auth.session(&with_cookie(&first), t0()).is_some());
        // Still within every session's lifetime, so only acme's oldest can make room.
        let at = t0().saturating_add(Duration::from_secs(n));
        auth.login("acme-token", &none, at).unwrap().unwrap();
        assert_eq!(auth.session_count(), MAX_SESSIONS_PER_TOKEN + 1);
        assert!(auth.session(&with_cookie(&first), t0()).is_none());
        assert!(
            auth.session(&with_cookie(&global), t0()).is_some(),
            "another token's session is untouched"
        );
    }

    #[test]
    fn a_new_login_ends_the_session_it_replaces() {
        let auth = Auth::new("global");
        let (old, _) = auth
            .login("global", &HeaderMap::new(), t0())
            .unwrap()
            .unwrap();
        let (new, _) = auth
            .login("global", &with_cookie(&old), t0())
            .unwrap()
            .unwrap();
        assert!(auth.session(&with_cookie(&old), t0()).is_none());
        assert!(auth.session(&with_cookie(&new), t0()).is_some());
        assert_eq!(auth.session_count(), 1);
    }
}
