//! The operator listener of the control panel (plain HTTP; bind it to loopback or put it behind
//! a TLS proxy): the web dashboard ([`dashboard`]), the JSON operator API, and `/metrics`
//! ([`metrics`]).
//!
//! Every API route needs `Authorization: Bearer <operator token>` or the session cookie of a
//! browser that logged in at `/login` (see [`auth`]); a cookie-authenticated write also needs the
//! session's `X-CSRF-Token`. Without either: 401 `unauthorized`. An operator token may be limited
//! to one tenant ([`OperatorApi::tenant_token`]): then every list, summary, detail and change is
//! that tenant's (other instances answer 404), and the fleet-wide routes — creating or deleting
//! policies, `/api/v1/trends`, `/metrics` — answer 403 `forbidden`.
//!
//! | route | what |
//! |---|---|
//! | `GET /login`, `POST /login` (form `token`, `next`) | the login page; a good token sets the session cookie and redirects to `next` |
//! | `POST /logout` | ends the session (needs `X-CSRF-Token`) |
//! | `GET /`, `/instances/{id}`, `/health`, `/tokens` | dashboard pages (a session, else a redirect to `/login`) |
//! | `GET /assets/…` | the dashboard's script, stylesheet and icon (public, compiled in) |
//! | `GET /metrics` | Prometheus text format (global operators) |
//! | `GET /api/v1/openapi.json` | the OpenAPI 3.1 document of these routes |
//! | `GET /api/v1/session` | the caller's tenant, and for a browser session its CSRF token and expiry |
//! | `POST /api/v1/tokens` | create a registration token; the secret and join string are in this reply only |
//! | `GET /api/v1/tokens` | list tokens |
//! | `GET /api/v1/tokens/{id}` | one token with its ledger |
//! | `POST /api/v1/tokens/{id}/revoke` | revoke |
//! | `GET /api/v1/summary?filter=EXPR` | fleet summary for a filter |
//! | `GET /api/v1/instances?filter=EXPR&limit=N&cursor=C` | a page of instances |
//! | `GET /api/v1/instances/{id}` | one instance's detail |
//! | `PUT /api/v1/instances/{id}/tags` / `.../groups` | replace tags (object) / groups (array) |
//! | `DELETE /api/v1/instances/{id}` | deregister and revoke |
//! | `GET /api/v1/instances/{id}/uptime?from=T&to=T` | exact uptime % over a window (default: the last 30 days) |
//! | `GET /api/v1/alerts?instance=ID&filter=EXPR&since=T&until=T&limit=N` | status changes (`items`; `filter` selects instances by tag, group, tenant… as in the fleet view) and fleet-level alerts (`fleet`, for fleet-wide queries), newest first |
//! | `GET /api/v1/trends?from=T&to=T` | fleet trend buckets (health %, status counts), oldest first (default: the last 30 days) |
//! | `GET /api/v1/instances/{id}/metrics?since=T` | recent metrics points for graphs (default: the last hour) |
//! | `POST /api/v1/commands` | enqueue for an instance, a filter or a group (`NewCommand`); 201 with the report |
//! | `GET /api/v1/commands?instance=ID&batch=ID&state=S&before=ID&limit=N` | commands, newest first; `next` pages on |
//! | `GET /api/v1/commands/{id}` | one command |
//! | `POST /api/v1/commands/{id}/cancel` | cancel a queued command (409 once delivered or finished) |
//! | `GET /api/v1/instances/{id}/commands?before=ID&limit=N` | the instance's command history, newest first |
//! | `POST /api/v1/policies` | create a compliance policy (`NewPolicy`); 409 when the name is taken |
//! | `GET /api/v1/policies` | list policies |
//! | `DELETE /api/v1/policies/{name}` | delete a policy |
//! | `GET /api/v1/policies/results` | fleet compliance % per policy |
//! | `GET /api/v1/instances/{id}/policies` | the instance's policies with pass/fail and the reason (also in its detail) |
//!
//! Times in queries are RFC 3339 (`2026-11-24T15:00:00Z`). Every reply carries
//! `Server-Timing: app;dur=MS`, the time the handler took (what `fleet-bench query` reports as
//! server time).
//!
//! Errors are `{"error": {"code": "...", "message": "..."}}`; a bad filter answers 400
//! `invalid_filter` with `field: "filter"` and the `position` of the mistake, and a filter beyond
//! one of the limits of [`fleet_core::filter`] 400 `filter_too_large`, also naming the limit
//! (`limit`, e.g. `max_total_values`) and its value (`max`). A body that does not arrive within
//! the listener's body deadline answers 408 `request_timeout`, a connection over the cap 503
//! `busy` ([`listener`]), and a wrong operator token — at `/login` or as a bearer — from a source
//! over its budget 429 `rate_limited` with `Retry-After` (a correct token is never refused by it).
//!
//! `X-Forwarded-Proto` and `X-Forwarded-For` count only from a configured proxy ([`proxy`]);
//! the `Origin` check compares scheme and host.

pub mod auth;
pub mod background;
pub mod dashboard;
pub mod listener;
pub mod metrics;
pub mod proxy;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use fleet_core::command::CommandQuery;
use fleet_core::store::{FleetStore, StatusChangeQuery};
use fleet_core::token::MaxUses;
use fleet_core::{
    BatchId, CommandId, CommandState, Cursor, Filter, Fleet, FleetAlertQuery, FleetError, Groups,
    InstanceId, NewCommand, NewPolicy, NewToken, PolicyName, Tags, TenantId, TenantScope,
    Timestamp, TokenId,
};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Bytes;
use hyper::{Method, Request, Response, StatusCode};
use serde::{Deserialize, Serialize};
use tokio::net::TcpListener;

use auth::{Auth, Site, Via, check_csrf};
use fleet_core::limiter::{Attempt, AttemptLimit, AttemptLimiter};
use listener::{BodyError, ListenerConfig, PeerAddr, RequestBody};
use proxy::{Client, Scheme, TrustedProxies};

/// Every route of the operator API as `(method, path template)`, the list the OpenAPI document
/// (`GET /api/v1/openapi.json`) is checked against. `{id}` / `{name}` are path parameters.
pub const API_ROUTES: &[(&str, &str)] = &[
    ("GET", "/api/v1/openapi.json"),
    ("GET", "/api/v1/session"),
    ("POST", "/api/v1/tokens"),
    ("GET", "/api/v1/tokens"),
    ("GET", "/api/v1/tokens/{id}"),
    ("POST", "/api/v1/tokens/{id}/revoke"),
    ("GET", "/api/v1/summary"),
    ("GET", "/api/v1/instances"),
    ("GET", "/api/v1/instances/{id}"),
    ("DELETE", "/api/v1/instances/{id}"),
    ("PUT", "/api/v1/instances/{id}/tags"),
    ("PUT", "/api/v1/instances/{id}/groups"),
    ("GET", "/api/v1/instances/{id}/uptime"),
    ("GET", "/api/v1/instances/{id}/metrics"),
    ("GET", "/api/v1/instances/{id}/commands"),
    ("GET", "/api/v1/instances/{id}/policies"),
    ("GET", "/api/v1/alerts"),
    ("GET", "/api/v1/trends"),
    ("POST", "/api/v1/commands"),
    ("GET", "/api/v1/commands"),
    ("GET", "/api/v1/commands/{id}"),
    ("POST", "/api/v1/commands/{id}/cancel"),
    ("POST", "/api/v1/policies"),
    ("GET", "/api/v1/policies"),
    ("GET", "/api/v1/policies/results"),
    ("DELETE", "/api/v1/policies/{name}"),
    ("GET", "/metrics"),
];

/// Largest operator request body (room for a command payload of 64 KiB).
const MAX_BODY: usize = 256 * 1024;

type Body = Full<Bytes>;

fn json<T: Serialize>(status: StatusCode, value: &T) -> Response<Body> {
    let bytes = serde_json::to_vec(value).unwrap_or_else(|_| b"{}".to_vec());
    let mut r = Response::new(Full::new(Bytes::from(bytes)));
    *r.status_mut() = status;
    r.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
    // Replies carry fleet data and, once, a token's secret: never kept by a browser or proxy.
    r.headers_mut().insert(
        hyper::header::CACHE_CONTROL,
        hyper::header::HeaderValue::from_static("no-store"),
    );
    r
}

fn error(status: StatusCode, code: &str, message: impl Into<String>) -> Response<Body> {
    let mut r = json(
        status,
        &serde_json::json!({"error": {"code": code, "message": message.into()}}),
    );
    if status == StatusCode::SERVICE_UNAVAILABLE {
        r.headers_mut().insert(
            hyper::header::RETRY_AFTER,
            hyper::header::HeaderValue::from_static("5"),
        );
    }
    r
}

fn fleet_error(e: &FleetError) -> Response<Body> {
    match e {
        FleetError::InstanceNotFound(_) | FleetError::TokenNotFound(_) => {
            error(StatusCode::NOT_FOUND, "not_found", e.to_string())
        }
        FleetError::CommandNotFound(_)
        | FleetError::Store(fleet_core::StoreError::NotFound { .. }) => {
            error(StatusCode::NOT_FOUND, "not_found", e.to_string())
        }
        FleetError::CommandNotCancellable { .. } => {
            error(StatusCode::CONFLICT, "not_cancellable", e.to_string())
        }
        FleetError::Store(fleet_core::StoreError::AlreadyExists { kind, id }) => error(
            StatusCode::CONFLICT,
            "already_exists",
            format!("{kind} {id} already exists"),
        ),
        FleetError::Invalid(_) => error(StatusCode::BAD_REQUEST, "invalid_input", e.to_string()),
        FleetError::Filter(f) => filter_error(f),
        e if e.is_unavailable() => error(
            StatusCode::SERVICE_UNAVAILABLE,
            "store_unavailable",
            e.to_string(),
        ),
        e => error(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string()),
    }
}

/// A filter refused: 400 `invalid_filter` for a syntax error, 400 `filter_too_large` naming the
/// limit (`limit`: its name, `max`: its value; see [`fleet_core::FilterLimit`]) for one beyond a
/// limit. Both carry `field: "filter"` and the 0-based character `position`.
fn filter_error(f: &fleet_core::FilterParseError) -> Response<Body> {
    let body = match f.limit {
        None => serde_json::json!({"error": {
            "code": "invalid_filter",
            "message": f.to_string(),
            "field": "filter",
            "position": f.position,
        }}),
        Some(limit) => serde_json::json!({"error": {
            "code": "filter_too_large",
            "message": f.to_string(),
            "field": "filter",
            "position": f.position,
            "limit": limit.name(),
            "max": limit.max(),
        }}),
    };
    json(StatusCode::BAD_REQUEST, &body)
}

/// An optional RFC 3339 time parameter; the error is the message for a 400 reply.
fn time_param(q: &BTreeMap<String, String>, name: &str) -> Result<Option<Timestamp>, String> {
    match q.get(name) {
        None => Ok(None),
        Some(v) => Timestamp::parse_rfc3339(v)
            .map(Some)
            .map_err(|e| format!("{name}: not an RFC 3339 time ({e})")),
    }
}

/// `max_uses` as operators write it: a number, or `"unlimited"`.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum MaxUsesInput {
    Count(u32),
    Word(String),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateToken {
    #[serde(default)]
    max_uses: Option<MaxUsesInput>,
    #[serde(default)]
    expires_in_secs: Option<u64>,
    #[serde(default)]
    tenant: Option<TenantId>,
    #[serde(default)]
    tags: Tags,
    #[serde(default)]
    groups: Groups,
    #[serde(default)]
    description: String,
    #[serde(default)]
    allow_reenroll: bool,
}

/// The operator API and the web dashboard over a fleet.
#[derive(Debug)]
pub struct OperatorApi<S> {
    fleet: Fleet<S>,
    auth: Auth,
    listener: ListenerConfig,
    proxies: TrustedProxies,
    /// Wrong operator tokens per source, at `POST /login` and in `Authorization: Bearer`.
    limiter: AttemptLimiter,
    /// Where filtered queries run ([`background`]).
    queries: background::QueryPool,
}

fn query(req: &Request<RequestBody>) -> BTreeMap<String, String> {
    req.uri()
        .query()
        .map(|q| form_urlencoded::parse(q.as_bytes()).into_owned().collect())
        .unwrap_or_default()
}

/// The whole body, read under the body deadline of the listener ([`RequestBody`]): 413 past
/// 256 KiB, 408 when it does not arrive in time (and, on HTTP/1.1, the connection is closed
/// after the reply: the rest of the body is never read). What a refusal leaves unread the
/// listener reads before the answer goes out ([`listener`]).
async fn body_bytes(req: Request<RequestBody>) -> Result<Bytes, Response<Body>> {
    let http1 = req.version() <= hyper::Version::HTTP_11;
    match Limited::new(req.into_body(), MAX_BODY).collect().await {
        Ok(c) => Ok(c.to_bytes()),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => Err(error(
            StatusCode::PAYLOAD_TOO_LARGE,
            "body_too_large",
            "the body limit is 256 KiB",
        )),
        Err(e) => {
            let (status, code) = match e.downcast_ref::<BodyError>() {
                Some(BodyError::Timeout(_)) => (StatusCode::REQUEST_TIMEOUT, "request_timeout"),
                _ => (StatusCode::BAD_REQUEST, "body_incomplete"),
            };
            let mut r = error(status, code, e.to_string());
            if http1 {
                r.headers_mut().insert(
                    hyper::header::CONNECTION,
                    hyper::header::HeaderValue::from_static("close"),
                );
            }
            Err(r)
        }
    }
}

/// 429 `rate_limited` with `Retry-After` (whole seconds, rounded up).
fn rate_limited(retry_after: Duration) -> Response<Body> {
    let secs = (retry_after.as_secs() + u64::from(retry_after.subsec_nanos() > 0)).max(1);
    let mut r = error(
        StatusCode::TOO_MANY_REQUESTS,
        "rate_limited",
        format!(
            "too many wrong operator tokens from this address; a correct one is still accepted, \
             others are refused for {secs} s"
        ),
    );
    r.headers_mut().insert(
        hyper::header::RETRY_AFTER,
        hyper::header::HeaderValue::from(secs),
    );
    r
}

/// The verdict on a presented operator token, under the failed-attempt limiter.
#[derive(Debug)]
enum Checked<T> {
    /// The token is right.
    Right(T),
    /// The token is wrong (and counted).
    Wrong,
    /// The token is wrong and its source is over budget: answer 429.
    Limited(Duration),
}

async fn body_json<T: serde::de::DeserializeOwned>(
    req: Request<RequestBody>,
) -> Result<T, Response<Body>> {
    let bytes = body_bytes(req).await?;
    serde_json::from_slice(&bytes).map_err(|e| {
        error(
            StatusCode::BAD_REQUEST,
            "malformed_request",
            format!("invalid JSON: {e}"),
        )
    })
}

/// Like [`body_json`], but when the body does not decode because the filter at `pointer` (a JSON
/// pointer) is refused, the reply is that filter's error (`invalid_filter` or `filter_too_large`
/// naming the limit), as for a `filter` query parameter, rather than `malformed_request`.
async fn body_json_with_filter<T: serde::de::DeserializeOwned>(
    req: Request<RequestBody>,
    pointer: &str,
) -> Result<T, Response<Body>> {
    let bytes = body_bytes(req).await?;
    serde_json::from_slice(&bytes).map_err(|e| {
        let refused = serde_json::from_slice::<serde_json::Value>(&bytes)
            .ok()
            .and_then(|v| {
                v.pointer(pointer)
                    .and_then(|f| f.as_str())
                    .map(Filter::parse)
            });
        match refused {
            Some(Err(f)) => filter_error(&f),
            _ => error(
                StatusCode::BAD_REQUEST,
                "malformed_request",
                format!("invalid JSON: {e}"),
            ),
        }
    })
}

/// A token as operators see it: everything but the hash of its secret, which only the store
/// needs (and which would let anyone who reads it test guesses offline).
fn token_view(t: &fleet_core::RegistrationToken) -> serde_json::Value {
    let mut v = serde_json::to_value(t).unwrap_or_default();
    if let Some(o) = v.as_object_mut() {
        o.remove("secret_hash");
    }
    v
}

fn forbidden(what: &str) -> Response<Body> {
    error(
        StatusCode::FORBIDDEN,
        "forbidden",
        format!("{what} concerns the whole fleet: it needs an operator token without a tenant"),
    )
}

/// The OpenAPI 3 document of this API, served at `GET /api/v1/openapi.json`.
pub const OPENAPI: &str = include_str!("openapi.json");

impl<S: FleetStore> OperatorApi<S> {
    /// An API answering to the bearer `operator_token`, with global (all-tenant) scope.
    pub fn new(fleet: Fleet<S>, operator_token: &str) -> Self {
        Self {
            fleet,
            auth: Auth::new(operator_token),
            listener: ListenerConfig::default(),
            proxies: TrustedProxies::default(),
            limiter: AttemptLimiter::default(),
            queries: background::QueryPool::new(
                std::thread::available_parallelism().map_or(2, std::num::NonZero::get),
            ),
        }
    }

    /// Serves with `config`'s connection cap and deadlines (default: [`ListenerConfig::default`]).
    #[must_use]
    pub fn listener_config(mut self, config: ListenerConfig) -> Self {
        self.listener = config;
        self
    }

    /// Believes `X-Forwarded-Proto` and `X-Forwarded-For` from these peers only (default: from
    /// none); see [`proxy`].
    #[must_use]
    pub fn trusted_proxies(mut self, proxies: TrustedProxies) -> Self {
        self.proxies = proxies;
        self
    }

    /// Limits wrong operator tokens per source — at `POST /login` and as bearer tokens — as
    /// [`fleet_core::limiter`] does for enrollment (default: [`AttemptLimit::default`], 20 a
    /// minute). Over the budget a wrong token is answered 429 `rate_limited` with `Retry-After`;
    /// a correct one is never refused because of others' failures.
    #[must_use]
    pub fn login_limit(mut self, limit: AttemptLimit) -> Self {
        self.limiter = AttemptLimiter::new(limit);
        self
    }

    /// Checks a presented token with `check` under the limiter: the attempt is reserved before
    /// the token is looked at (so concurrent guesses cannot overrun the budget) and given back
    /// when the token is right.
    fn guarded<T>(
        &self,
        client: &Client,
        now: Timestamp,
        check: impl FnOnce() -> Option<T>,
    ) -> Checked<T> {
        match self.limiter.begin(client.ip, now) {
            Attempt::Counted(reservation) => match check() {
                Some(t) => {
                    reservation.succeeded();
                    Checked::Right(t)
                }
                None => Checked::Wrong,
            },
            Attempt::OverBudget { retry_after } => match check() {
                Some(t) => Checked::Right(t),
                None => Checked::Limited(retry_after),
            },
        }
    }

    /// Also accepts `token`, limited to `tenant`: everything it lists, reads and changes — API
    /// and dashboard — is that tenant's, and fleet-wide routes (policies, trends, `/metrics`)
    /// answer 403.
    #[must_use]
    pub fn tenant_token(mut self, tenant: TenantId, token: &str) -> Self {
        self.auth.add_tenant_token(tenant, token);
        self
    }

    /// The operator tokens and browser sessions.
    pub fn auth(&self) -> &Auth {
        &self.auth
    }

    /// Handles one request: the dashboard's pages and assets, login and logout, `/metrics` and
    /// the JSON API.
    pub async fn handle(&self, req: Request<RequestBody>) -> Response<Body> {
        let now = self.fleet.now();
        let path = req.uri().path().to_owned();
        let peer = req.extensions().get::<PeerAddr>().map(|p| p.0);
        let client = self.proxies.client(peer, req.headers());
        match (req.method().clone(), path.as_str()) {
            (Method::GET, "/login") => {
                return dashboard::login_page(StatusCode::OK, None, &query(&req));
            }
            (Method::POST, "/login") => return self.login(req, now, &client).await,
            (Method::POST, "/logout") => return self.logout(&req, now, &client),
            (Method::GET, p) if p.starts_with("/assets/") => return dashboard::asset(p),
            (Method::GET, p) if dashboard::is_page(p) => {
                return match self.auth.session(req.headers(), now) {
                    Some(caller) => dashboard::shell(&caller),
                    None => dashboard::to_login(req.uri()),
                };
            }
            _ => {}
        }
        // A bearer token is a guess like a login: counted, and limited, the same way.
        let caller = if req.headers().contains_key(hyper::header::AUTHORIZATION) {
            match self.guarded(&client, now, || self.auth.caller(req.headers(), now)) {
                Checked::Right(c) => Some(c),
                Checked::Wrong => None,
                Checked::Limited(retry_after) => return rate_limited(retry_after),
            }
        } else {
            self.auth.caller(req.headers(), now)
        };
        let Some(caller) = caller else {
            return error(
                StatusCode::UNAUTHORIZED,
                "unauthorized",
                "send Authorization: Bearer <operator token>, or log in at /login",
            );
        };
        let site = Site::of(client.scheme, req.headers(), req.uri());
        if let Err(e) = check_csrf(&caller, req.method(), req.headers(), site) {
            return error(StatusCode::FORBIDDEN, "csrf_failed", e.to_string());
        }
        let global = caller.scope == TenantScope::All;
        let scope = caller.scope.clone();
        let parts: Vec<&str> = path.trim_matches('/').split('/').collect();
        let method = req.method().clone();
        match (method, parts.as_slice()) {
            (Method::GET, ["metrics"]) => {
                if !global {
                    return forbidden("/metrics");
                }
                let mut r = Response::new(Full::new(Bytes::from(metrics::render(&self.fleet))));
                r.headers_mut().insert(
                    hyper::header::CONTENT_TYPE,
                    hyper::header::HeaderValue::from_static(metrics::CONTENT_TYPE),
                );
                r
            }
            (Method::GET, ["api", "v1", "openapi.json"]) => {
                let mut r = Response::new(Full::new(Bytes::from_static(OPENAPI.as_bytes())));
                r.headers_mut().insert(
                    hyper::header::CONTENT_TYPE,
                    hyper::header::HeaderValue::from_static("application/json"),
                );
                r
            }
            (Method::GET, ["api", "v1", "session"]) => {
                let (csrf, expires_at) = match &caller.via {
                    Via::Bearer => (None, None),
                    Via::Session { csrf, expires_at } => (Some(csrf.as_str()), Some(*expires_at)),
                };
                json(
                    StatusCode::OK,
                    &serde_json::json!({"tenant": caller.tenant(), "csrf": csrf, "expires_at": expires_at}),
                )
            }
            (Method::POST, ["api", "v1", "tokens"]) => self.create_token(req, &scope).await,
            (Method::GET, ["api", "v1", "tokens"]) => match self.fleet.list_tokens(&scope).await {
                Ok(tokens) => json(
                    StatusCode::OK,
                    &serde_json::json!({"items": tokens.iter().map(token_view).collect::<Vec<_>>()}),
                ),
                Err(e) => fleet_error(&e),
            },
            (Method::GET, ["api", "v1", "tokens", id]) => {
                let Ok(id) = TokenId::new(*id) else {
                    return error(StatusCode::NOT_FOUND, "not_found", "no such token");
                };
                let token = match self.fleet.get_token(&scope, &id).await {
                    Ok(t) => t,
                    Err(e) => return fleet_error(&e),
                };
                match self.fleet.token_ledger(&scope, &id, 1000).await {
                    Ok(ledger) => json(
                        StatusCode::OK,
                        &serde_json::json!({"token": token_view(&token), "ledger": ledger}),
                    ),
                    Err(e) => fleet_error(&e),
                }
            }
            (Method::POST, ["api", "v1", "tokens", id, "revoke"]) => {
                let Ok(id) = TokenId::new(*id) else {
                    return error(StatusCode::NOT_FOUND, "not_found", "no such token");
                };
                match self.fleet.revoke_token(&scope, &id).await {
                    Ok(t) => json(StatusCode::OK, &token_view(&t)),
                    Err(e) => fleet_error(&e),
                }
            }
            (Method::GET, ["api", "v1", "summary"]) => {
                match Filter::parse(query(&req).get("filter").map_or("", String::as_str)) {
                    Ok(f) if f.is_all() && scope == TenantScope::All => {
                        json(StatusCode::OK, &self.fleet.summary(&f, &scope))
                    }
                    Ok(f) => {
                        let scope = scope.clone();
                        match self
                            .off_worker(move |fleet| fleet.summary(&f, &scope))
                            .await
                        {
                            Ok(s) => json(StatusCode::OK, &s),
                            Err(r) => r,
                        }
                    }
                    Err(e) => fleet_error(&FleetError::Filter(e)),
                }
            }
            (Method::GET, ["api", "v1", "instances"]) => self.list(&req, &scope).await,
            (Method::GET, ["api", "v1", "instances", id]) => {
                let Ok(id) = id.parse::<InstanceId>() else {
                    return error(StatusCode::NOT_FOUND, "not_found", "no such instance");
                };
                match self.fleet.detail(&scope, id).await {
                    Ok(d) => {
                        let cert =
                            fleet_core::store::InstanceStore::get_instance(self.fleet.store(), id)
                                .await
                                .ok()
                                .flatten()
                                .and_then(|i| i.certificate);
                        let mut v = serde_json::to_value(&d).unwrap_or_default();
                        v["certificate"] = serde_json::to_value(cert).unwrap_or_default();
                        match self.fleet.policy_results(&scope, id).await {
                            Ok(p) => v["policies"] = serde_json::to_value(p).unwrap_or_default(),
                            Err(e) => return fleet_error(&e),
                        }
                        json(StatusCode::OK, &v)
                    }
                    Err(e) => fleet_error(&e),
                }
            }
            (Method::PUT, ["api", "v1", "instances", id, "tags"]) => {
                let Ok(id) = id.parse::<InstanceId>() else {
                    return error(StatusCode::NOT_FOUND, "not_found", "no such instance");
                };
                let tags: Tags = match body_json(req).await {
                    Ok(t) => t,
                    Err(r) => return r,
                };
                match self.fleet.set_tags(&scope, id, tags).await {
                    Ok(()) => json(StatusCode::OK, &serde_json::json!({"ok": true})),
                    Err(e) => fleet_error(&e),
                }
            }
            (Method::PUT, ["api", "v1", "instances", id, "groups"]) => {
                let Ok(id) = id.parse::<InstanceId>() else {
                    return error(StatusCode::NOT_FOUND, "not_found", "no such instance");
                };
                let groups: Groups = match body_json(req).await {
                    Ok(g) => g,
                    Err(r) => return r,
                };
                match self.fleet.set_groups(&scope, id, groups).await {
                    Ok(()) => json(StatusCode::OK, &serde_json::json!({"ok": true})),
                    Err(e) => fleet_error(&e),
                }
            }
            (Method::GET, ["api", "v1", "alerts"]) => self.alerts(&req, &scope).await,
            (Method::GET, ["api", "v1", "instances", id, "uptime"]) => {
                let Ok(id) = id.parse::<InstanceId>() else {
                    return error(StatusCode::NOT_FOUND, "not_found", "no such instance");
                };
                let q = query(&req);
                let now = self.fleet.now();
                let (from, to) = match (time_param(&q, "from"), time_param(&q, "to")) {
                    (Ok(f), Ok(t)) => (
                        f.unwrap_or(now.saturating_sub(Duration::from_secs(30 * 86_400))),
                        t.unwrap_or(now),
                    ),
                    (Err(m), _) | (_, Err(m)) => {
                        return error(StatusCode::BAD_REQUEST, "invalid_input", m);
                    }
                };
                match self.fleet.uptime(&scope, id, from, to).await {
                    Ok(pct) => json(
                        StatusCode::OK,
                        &serde_json::json!({"instance": id, "from": from, "to": to, "uptime_percent": pct}),
                    ),
                    Err(e) => fleet_error(&e),
                }
            }
            (Method::GET, ["api", "v1", "trends"]) => {
                if !global {
                    return forbidden("the fleet trend");
                }
                self.trends(&req).await
            }
            (Method::GET, ["api", "v1", "instances", id, "metrics"]) => {
                let Ok(id) = id.parse::<InstanceId>() else {
                    return error(StatusCode::NOT_FOUND, "not_found", "no such instance");
                };
                let since = match time_param(&query(&req), "since") {
                    Ok(s) => {
                        s.unwrap_or(self.fleet.now().saturating_sub(Duration::from_secs(3600)))
                    }
                    Err(m) => return error(StatusCode::BAD_REQUEST, "invalid_input", m),
                };
                match self.fleet.recent_metrics(&scope, id, since) {
                    Ok(items) => json(StatusCode::OK, &serde_json::json!({"items": items})),
                    Err(e) => fleet_error(&e),
                }
            }
            (Method::POST, ["api", "v1", "commands"]) => {
                let new: NewCommand = match body_json_with_filter(req, "/target/filter").await {
                    Ok(n) => n,
                    Err(r) => return r,
                };
                match self.fleet.enqueue(&scope, new).await {
                    Ok(report) => json(StatusCode::CREATED, &report),
                    Err(e) => fleet_error(&e),
                }
            }
            (Method::GET, ["api", "v1", "commands"]) => self.commands(&req, &scope, None).await,
            (Method::GET, ["api", "v1", "instances", id, "commands"]) => {
                let Ok(id) = id.parse::<InstanceId>() else {
                    return error(StatusCode::NOT_FOUND, "not_found", "no such instance");
                };
                if self.fleet.get(&scope, id).is_none() {
                    return fleet_error(&FleetError::InstanceNotFound(id));
                }
                self.commands(&req, &scope, Some(id)).await
            }
            (Method::GET, ["api", "v1", "commands", id]) => {
                let Ok(id) = id.parse::<CommandId>() else {
                    return error(StatusCode::NOT_FOUND, "not_found", "no such command");
                };
                match self.fleet.command(&scope, id).await {
                    Ok(c) => json(StatusCode::OK, &c),
                    Err(e) => fleet_error(&e),
                }
            }
            (Method::POST, ["api", "v1", "commands", id, "cancel"]) => {
                let Ok(id) = id.parse::<CommandId>() else {
                    return error(StatusCode::NOT_FOUND, "not_found", "no such command");
                };
                match self.fleet.cancel_command(&scope, id).await {
                    Ok(c) => json(StatusCode::OK, &c),
                    Err(e) => fleet_error(&e),
                }
            }
            (Method::POST, ["api", "v1", "policies"]) => {
                if !global {
                    return forbidden("a policy");
                }
                let new: NewPolicy = match body_json_with_filter(req, "/filter").await {
                    Ok(n) => n,
                    Err(r) => return r,
                };
                match self.fleet.create_policy(new).await {
                    Ok(p) => json(StatusCode::CREATED, &p),
                    Err(e) => fleet_error(&e),
                }
            }
            (Method::GET, ["api", "v1", "policies"]) if !global => forbidden("the policy list"),
            (Method::GET, ["api", "v1", "policies"]) => match self.fleet.policies().await {
                Ok(items) => json(StatusCode::OK, &serde_json::json!({"items": items})),
                Err(e) => fleet_error(&e),
            },
            (Method::GET, ["api", "v1", "policies", "results"]) => {
                match self.fleet.compliance(&scope).await {
                    Ok(mut items) => {
                        // A tenant operator hears only of policies that apply to its instances.
                        if !global {
                            items.retain(|c| c.applicable > 0);
                        }
                        json(StatusCode::OK, &serde_json::json!({"items": items}))
                    }
                    Err(e) => fleet_error(&e),
                }
            }
            (Method::DELETE, ["api", "v1", "policies", name]) => {
                if !global {
                    return forbidden("a policy");
                }
                let Ok(name) = PolicyName::new(*name) else {
                    return error(StatusCode::NOT_FOUND, "not_found", "no such policy");
                };
                match self.fleet.delete_policy(&name).await {
                    Ok(()) => json(StatusCode::OK, &serde_json::json!({"ok": true})),
                    Err(e) => fleet_error(&e),
                }
            }
            (Method::GET, ["api", "v1", "instances", id, "policies"]) => {
                let Ok(id) = id.parse::<InstanceId>() else {
                    return error(StatusCode::NOT_FOUND, "not_found", "no such instance");
                };
                match self.fleet.policy_results(&scope, id).await {
                    Ok(items) => json(StatusCode::OK, &serde_json::json!({"items": items})),
                    Err(e) => fleet_error(&e),
                }
            }
            (Method::DELETE, ["api", "v1", "instances", id]) => {
                let Ok(id) = id.parse::<InstanceId>() else {
                    return error(StatusCode::NOT_FOUND, "not_found", "no such instance");
                };
                match self.fleet.deregister(&scope, id).await {
                    Ok(()) => json(StatusCode::OK, &serde_json::json!({"ok": true})),
                    Err(e) => fleet_error(&e),
                }
            }
            _ => error(
                StatusCode::NOT_FOUND,
                "not_found",
                format!("no route {} {}", req.method(), req.uri().path()),
            ),
        }
    }

    async fn login(
        &self,
        req: Request<RequestBody>,
        now: Timestamp,
        client: &Client,
    ) -> Response<Body> {
        let site = Site::of(client.scheme, req.headers(), req.uri());
        if let Err(e) = auth::same_origin(req.headers(), site) {
            return dashboard::login_page(
                StatusCode::FORBIDDEN,
                Some(&e.to_string()),
                &query(&req),
            );
        }
        let headers = req.headers().clone();
        let bytes = match body_bytes(req).await {
            Ok(b) => b,
            Err(r) => return r,
        };
        let form: BTreeMap<String, String> = form_urlencoded::parse(&bytes).into_owned().collect();
        let token = form.get("token").map_or("", |t| t.trim());
        match self.guarded(client, now, || self.auth.token_scope(token)) {
            Checked::Right(_) => {}
            Checked::Wrong => {
                return dashboard::login_page(
                    StatusCode::UNAUTHORIZED,
                    Some("That is not an operator token."),
                    &form,
                );
            }
            Checked::Limited(retry_after) => return rate_limited(retry_after),
        }
        match self.auth.login(token, &headers, now) {
            Ok(Some((id, _))) => {
                let next = dashboard::safe_next(form.get("next").map(String::as_str));
                // Behind a trusted TLS-terminating proxy that says so, the cookie is HTTPS-only.
                let secure = client.scheme == Scheme::Https;
                let mut r = Response::new(Full::new(Bytes::new()));
                *r.status_mut() = StatusCode::SEE_OTHER;
                if let (Ok(loc), Ok(cookie)) = (
                    hyper::header::HeaderValue::from_str(next),
                    hyper::header::HeaderValue::from_str(&auth::session_cookie(&id, secure)),
                ) {
                    r.headers_mut().insert(hyper::header::LOCATION, loc);
                    r.headers_mut().insert(hyper::header::SET_COOKIE, cookie);
                }
                r
            }
            Err(e) => error(
                StatusCode::SERVICE_UNAVAILABLE,
                "unavailable",
                format!("cannot start a session: {e}"),
            ),
            Ok(None) => dashboard::login_page(
                StatusCode::UNAUTHORIZED,
                Some("That is not an operator token."),
                &form,
            ),
        }
    }

    /// Ends the caller's session. Only a live session with its CSRF token clears the cookie: a
    /// cross-site form cannot log an operator out (the browser would accept the clearing
    /// `Set-Cookie` of a top-level navigation even though it did not send the cookie).
    fn logout(
        &self,
        req: &Request<RequestBody>,
        now: Timestamp,
        client: &Client,
    ) -> Response<Body> {
        let site = Site::of(client.scheme, req.headers(), req.uri());
        if let Err(e) = auth::same_origin(req.headers(), site) {
            return error(StatusCode::FORBIDDEN, "csrf_failed", e.to_string());
        }
        let mut r = Response::new(Full::new(Bytes::new()));
        *r.status_mut() = StatusCode::NO_CONTENT;
        if let Some(caller) = self.auth.session(req.headers(), now) {
            if let Err(e) = check_csrf(&caller, req.method(), req.headers(), site) {
                return error(StatusCode::FORBIDDEN, "csrf_failed", e.to_string());
            }
            self.auth.logout(req.headers());
            if let Ok(v) = hyper::header::HeaderValue::from_str(&auth::clear_cookie()) {
                r.headers_mut().insert(hyper::header::SET_COOKIE, v);
            }
        }
        r
    }

    async fn alerts(&self, req: &Request<RequestBody>, scope: &TenantScope) -> Response<Body> {
        let q = query(req);
        let instance = match q.get("instance").map(|i| i.parse::<InstanceId>()) {
            None => None,
            Some(Ok(i)) => Some(i),
            Some(Err(e)) => return error(StatusCode::BAD_REQUEST, "invalid_input", e.to_string()),
        };
        let (since, until) = match (time_param(&q, "since"), time_param(&q, "until")) {
            (Ok(s), Ok(u)) => (s, u),
            (Err(m), _) | (_, Err(m)) => return error(StatusCode::BAD_REQUEST, "invalid_input", m),
        };
        let limit = match q.get("limit").map(|l| l.parse::<usize>()) {
            None => 100,
            Some(Ok(n)) if (1..=10_000).contains(&n) => n,
            Some(_) => {
                return error(
                    StatusCode::BAD_REQUEST,
                    "invalid_input",
                    "limit must be from 1 to 10000",
                );
            }
        };
        let filter = match Filter::parse(q.get("filter").map_or("", String::as_str)) {
            Ok(f) => f,
            Err(e) => return fleet_error(&FleetError::Filter(e)),
        };
        let query = StatusChangeQuery {
            instance,
            since,
            until,
            limit,
        };
        let items = match self
            .fleet
            .status_changes_matching(scope, &query, &filter)
            .await
        {
            Ok(items) => items,
            Err(e) => return fleet_error(&e),
        };
        // Fleet-level alerts concern the whole fleet: only for an unscoped, fleet-wide query.
        let fleet = if instance.is_none() && filter.is_all() && *scope == TenantScope::All {
            let q = FleetAlertQuery {
                since,
                until,
                limit,
            };
            match self.fleet.fleet_alerts(&q).await {
                Ok(a) => a,
                Err(e) => return fleet_error(&e),
            }
        } else {
            Vec::new()
        };
        // Each change with the instance's hostname (null once it was deregistered), so a list
        // of alerts reads without one lookup per line.
        let items: Vec<serde_json::Value> = items
            .iter()
            .map(|c| {
                let mut v = serde_json::to_value(c).unwrap_or_default();
                v["hostname"] = self
                    .fleet
                    .get(scope, c.instance)
                    .map_or(serde_json::Value::Null, |i| i.hostname.into());
                v
            })
            .collect();
        json(
            StatusCode::OK,
            &serde_json::json!({"items": items, "fleet": fleet}),
        )
    }

    async fn trends(&self, req: &Request<RequestBody>) -> Response<Body> {
        let q = query(req);
        let now = self.fleet.now();
        let (from, to) = match (time_param(&q, "from"), time_param(&q, "to")) {
            (Ok(f), Ok(t)) => (
                f.unwrap_or(now.saturating_sub(Duration::from_secs(30 * 86_400))),
                t.unwrap_or(now.saturating_add(Duration::from_secs(1))),
            ),
            (Err(m), _) | (_, Err(m)) => return error(StatusCode::BAD_REQUEST, "invalid_input", m),
        };
        match self.fleet.trends(from, to).await {
            Ok(items) => json(StatusCode::OK, &serde_json::json!({"items": items})),
            Err(e) => fleet_error(&e),
        }
    }

    async fn commands(
        &self,
        req: &Request<RequestBody>,
        scope: &TenantScope,
        instance: Option<InstanceId>,
    ) -> Response<Body> {
        let q = query(req);
        let bad = |m: String| error(StatusCode::BAD_REQUEST, "invalid_input", m);
        let mut query = CommandQuery {
            instance,
            limit: 100,
            ..CommandQuery::default()
        };
        // On /instances/{id}/commands the path names the instance (checked against the scope).
        if instance.is_none()
            && let Some(i) = q.get("instance")
        {
            match i.parse::<InstanceId>() {
                Ok(i) => query.instance = Some(i),
                Err(e) => return bad(e.to_string()),
            }
        }
        if let Some(b) = q.get("batch") {
            match b.parse::<BatchId>() {
                Ok(b) => query.batch = Some(b),
                Err(e) => return bad(e.to_string()),
            }
        }
        if let Some(st) = q.get("state") {
            match st.parse::<CommandState>() {
                Ok(st) => query.state = Some(st),
                Err(e) => return bad(e.to_string()),
            }
        }
        if let Some(b) = q.get("before") {
            match b.parse::<CommandId>() {
                Ok(b) => query.before = Some(b),
                Err(e) => return bad(e.to_string()),
            }
        }
        match q.get("limit").map(|l| l.parse::<usize>()) {
            None => {}
            Some(Ok(n)) if (1..=fleet_core::MAX_PAGE_SIZE).contains(&n) => query.limit = n,
            Some(_) => return bad("limit must be from 1 to 1000".into()),
        }
        let limit = query.limit;
        match self.fleet.commands(scope, query).await {
            Ok(items) => {
                let next = (items.len() == limit)
                    .then(|| items.last().map(|c| c.id))
                    .flatten();
                json(
                    StatusCode::OK,
                    &serde_json::json!({"items": items, "next": next}),
                )
            }
            Err(e) => fleet_error(&e),
        }
    }

    /// Runs a query that evaluates a filter off the async workers — so that they, and the
    /// heartbeats they serve, are never stuck behind it — on the query pool's lower-priority
    /// threads ([`background`]): the query takes the view's lock a step at a time
    /// ([`fleet_core::live::query`]), and the scheduler serves heartbeats first.
    async fn off_worker<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Fleet<S>) -> T + Send + 'static,
    ) -> Result<T, Response<Body>> {
        let fleet = self.fleet.clone();
        self.queries
            .run(move || f(&fleet))
            .await
            .map_err(|e| match e {
                background::NotRun::Busy => error(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "busy",
                    "too many filtered queries are waiting; retry shortly",
                ),
                background::NotRun::Failed => error(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "internal",
                    "the query failed",
                ),
            })
    }

    async fn list(&self, req: &Request<RequestBody>, scope: &TenantScope) -> Response<Body> {
        let q = query(req);
        let filter = match Filter::parse(q.get("filter").map_or("", String::as_str)) {
            Ok(f) => f,
            Err(e) => return fleet_error(&FleetError::Filter(e)),
        };
        let limit = match q.get("limit").map(|l| l.parse::<usize>()) {
            None => 100,
            Some(Ok(n)) if (1..=fleet_core::MAX_PAGE_SIZE).contains(&n) => n,
            Some(_) => {
                return error(
                    StatusCode::BAD_REQUEST,
                    "invalid_input",
                    "limit must be from 1 to 1000",
                );
            }
        };
        let cursor = match q.get("cursor").map(|c| c.parse::<Cursor>()) {
            None => None,
            Some(Ok(c)) => Some(c),
            Some(Err(e)) => return error(StatusCode::BAD_REQUEST, "invalid_input", e.to_string()),
        };
        let scope = scope.clone();
        match self
            .off_worker(move |fleet| fleet.list(&filter, &scope, cursor, limit))
            .await
        {
            Ok(page) => json(StatusCode::OK, &page),
            Err(r) => r,
        }
    }

    async fn create_token(&self, req: Request<RequestBody>, scope: &TenantScope) -> Response<Body> {
        let input: CreateToken = match body_json(req).await {
            Ok(i) => i,
            Err(r) => return r,
        };
        let max_uses = match input.max_uses {
            None => MaxUses::default(),
            Some(MaxUsesInput::Count(n)) => MaxUses::Limited(n),
            Some(MaxUsesInput::Word(w)) if w == "unlimited" => MaxUses::Unlimited,
            Some(MaxUsesInput::Word(w)) => {
                return error(
                    StatusCode::BAD_REQUEST,
                    "invalid_input",
                    format!("max_uses must be a number or \"unlimited\", not {w:?}"),
                );
            }
        };
        let new = NewToken {
            expires_in: input.expires_in_secs.map(Duration::from_secs),
            max_uses,
            tenant: input.tenant,
            tags: input.tags,
            groups: input.groups,
            description: input.description,
            allow_reenroll: input.allow_reenroll,
        };
        match self.fleet.create_token(scope, new).await {
            Ok(created) => json(
                StatusCode::CREATED,
                &serde_json::json!({
                    "id": created.token.id,
                    "token": created.presented.to_string(),
                    "join": created.join.to_string(),
                    "ca_sha256": created.join.ca_sha256,
                    "expires_at": created.token.expires_at,
                    "max_uses": created.token.max_uses,
                }),
            ),
            Err(e) => fleet_error(&e),
        }
    }

    /// Serves plain HTTP/1.1 and HTTP/2 on `listener` (bind it to loopback) until `shutdown`
    /// completes, with the connection cap and deadlines of [`listener`].
    pub async fn serve(
        self: Arc<Self>,
        listener: TcpListener,
        shutdown: impl Future<Output = ()>,
    ) -> std::io::Result<()> {
        let config = self.listener.clone();
        listener::serve(listener, &config, shutdown, move |req| {
            let api = Arc::clone(&self);
            async move {
                let started = std::time::Instant::now();
                let mut resp = api.handle(req).await;
                // The server's own time, for clients that measure us (fleet-bench).
                let ms = started.elapsed().as_secs_f64() * 1000.0;
                if let Ok(v) = hyper::header::HeaderValue::from_str(&format!("app;dur={ms:.3}")) {
                    resp.headers_mut().insert("server-timing", v);
                }
                resp
            }
        })
        .await
    }
}
