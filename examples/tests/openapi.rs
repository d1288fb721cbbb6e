//! The OpenAPI document of the operator API (`examples/src/operator/openapi.json`) against the
//! server it describes: the same routes as `API_ROUTES`; every documented operation, called on
//! a real `OperatorApi` on loopback, answers with a documented status, content type and a body
//! that fits the documented schema (required properties, types, enums, closed objects); every
//! request body example fits its schema and is accepted; every query parameter example is
//! accepted; every route refuses a caller without credentials (or with a wrong token or cookie)
//! with 401; a tenant-scoped operator gets 403 on the fleet-wide routes and 404 for another
//! tenant's instance; a cookie-authenticated write without `X-CSRF-Token` gets 403; and
//! `GET /api/v1/session` and `GET /api/v1/openapi.json` answer what the document says.
//!
//! The test collects every disagreement and reports them together.

#[path = "support/http.rs"]
mod http;

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use fleet_core::testing::{key_and_csr, request};
use fleet_core::{
    CommandKind, Fleet, Groups, Heartbeat, ManualClock, MaxUses, MemoryStore, MetricsSample,
    NewCommand, NewPolicy, NewToken, TenantId, TenantScope, Timestamp,
};
use fleet_examples::operator::{API_ROUTES, OperatorApi};
use hyper::body::Bytes;
use serde_json::{Value, json};
use tokio::net::TcpListener;

/// The document, as the server serves it (`include_str!` there too).
const DOCUMENT: &str = include_str!("../src/operator/openapi.json");
const OPERATOR: &str = "openapi-operator-token";
/// An operator token limited to tenant `acme`.
const TENANT_OPERATOR: &str = "openapi-acme-operator-token";
/// The routes a tenant-scoped operator may not use.
const FLEET_WIDE: [(&str, &str); 5] = [
    ("GET", "/api/v1/policies"),
    ("POST", "/api/v1/policies"),
    ("DELETE", "/api/v1/policies/{name}"),
    ("GET", "/api/v1/trends"),
    ("GET", "/metrics"),
];
const METHODS: [&str; 8] = [
    "get", "put", "post", "delete", "patch", "head", "options", "trace",
];

/// The reply to one request.
struct Reply {
    status: u16,
    content_type: Option<String>,
    server_timing: Option<String>,
    bytes: Bytes,
}

impl Reply {
    fn json(&self) -> Option<Value> {
        serde_json::from_slice(&self.bytes).ok()
    }

    /// The media type without parameters (`text/plain; version=0.0.4` → `text/plain`).
    fn media_type(&self) -> Option<String> {
        self.content_type.as_deref().map(|c| {
            c.split(';')
                .next()
                .unwrap_or("")
                .trim()
                .to_ascii_lowercase()
        })
    }

    /// Whether this is the router's fallback: no such route at all.
    fn is_no_route(&self) -> bool {
        self.json().is_some_and(|b| {
            b["error"]["code"] == "not_found"
                && b["error"]["message"]
                    .as_str()
                    .is_some_and(|m| m.starts_with("no route"))
        })
    }

    fn describe(&self) -> String {
        let text = String::from_utf8_lossy(&self.bytes);
        let cut: String = text.chars().take(300).collect();
        format!("{} {cut}", self.status)
    }
}

/// How a request authenticates.
#[derive(Debug, Clone, Copy)]
enum Cred<'a> {
    None,
    Bearer(&'a str),
    /// The `fleet_session` cookie, without the CSRF header.
    Cookie(&'a str),
}

async fn call(
    addr: std::net::SocketAddr,
    method: &str,
    path: &str,
    cred: Cred<'_>,
    body: Option<&Value>,
) -> Reply {
    let credential = match cred {
        Cred::None => None,
        Cred::Bearer(t) => Some(("authorization", format!("Bearer {t}"))),
        Cred::Cookie(c) => Some(("cookie", format!("fleet_session={c}"))),
    };
    let mut headers: Vec<(&str, &str)> = credential.iter().map(|(k, v)| (*k, v.as_str())).collect();
    if body.is_some() {
        headers.push(("content-type", "application/json"));
    }
    let bytes = body
        .map(|b| serde_json::to_vec(b).unwrap())
        .unwrap_or_default();
    let reply = http::send(addr, method, path, &headers, bytes).await;
    let header = |name: &str| {
        reply
            .headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    let status = reply.status;
    let content_type = header("content-type");
    let server_timing = header("server-timing");
    let bytes = reply.body;
    Reply {
        status,
        content_type,
        server_timing,
        bytes,
    }
}

/// The `error.code` of an error reply.
fn error_code(reply: &Reply) -> Option<String> {
    reply.json()?["error"]["code"].as_str().map(str::to_owned)
}

/// Follows `$ref`s (local JSON pointers) until a value that is not a reference.
fn resolve<'a>(doc: &'a Value, mut v: &'a Value) -> &'a Value {
    for _ in 0..32 {
        let Some(r) = v.get("$ref").and_then(Value::as_str) else {
            return v;
        };
        match r.strip_prefix('#').and_then(|p| doc.pointer(p)) {
            Some(target) => v = target,
            None => return &Value::Null,
        }
    }
    v
}

fn type_matches(value: &Value, ty: &str) -> bool {
    match ty {
        "null" => value.is_null(),
        "boolean" => value.is_boolean(),
        "string" => value.is_string(),
        "number" => value.is_number(),
        "integer" => value.is_u64() || value.is_i64(),
        "array" => value.is_array(),
        "object" => value.is_object(),
        _ => false,
    }
}

/// Checks `value` against `schema` (the subset of JSON Schema this document uses: `$ref`,
/// `allOf`/`anyOf`/`oneOf`, `type`, `enum`, `required`, `properties`, `additionalProperties`,
/// `items`), pushing one message per mismatch.
fn check(doc: &Value, value: &Value, schema: &Value, at: &str, errors: &mut Vec<String>) {
    let schema = resolve(doc, schema);
    if schema.is_null() {
        errors.push(format!("{at}: dangling $ref in the document"));
        return;
    }
    if let Some(all) = schema.get("allOf").and_then(Value::as_array) {
        for s in all {
            check(doc, value, s, at, errors);
        }
    }
    for (key, exactly_one) in [("anyOf", false), ("oneOf", true)] {
        if let Some(alts) = schema.get(key).and_then(Value::as_array) {
            let fitting = alts
                .iter()
                .filter(|s| {
                    let mut e = Vec::new();
                    check(doc, value, s, at, &mut e);
                    e.is_empty()
                })
                .count();
            if fitting == 0 || (exactly_one && fitting > 1) {
                errors.push(format!(
                    "{at}: {value} fits {fitting} of the {} alternatives of {key}",
                    alts.len()
                ));
            }
        }
    }
    if let Some(ty) = schema.get("type") {
        let types: Vec<&str> = match ty {
            Value::String(t) => vec![t.as_str()],
            Value::Array(ts) => ts.iter().filter_map(Value::as_str).collect(),
            _ => Vec::new(),
        };
        if !types.iter().any(|t| type_matches(value, t)) {
            errors.push(format!("{at}: {value} is not of type {ty}"));
            return;
        }
    }
    if let Some(allowed) = schema.get("enum").and_then(Value::as_array)
        && !allowed.contains(value)
    {
        errors.push(format!("{at}: {value} is not one of {allowed:?}"));
    }
    if let Some(obj) = value.as_object() {
        if let Some(required) = schema.get("required").and_then(Value::as_array) {
            for name in required.iter().filter_map(Value::as_str) {
                if !obj.contains_key(name) {
                    errors.push(format!("{at}: required property `{name}` is missing"));
                }
            }
        }
        let props = schema.get("properties").and_then(Value::as_object);
        for (name, v) in obj {
            let here = format!("{at}.{name}");
            match (
                props.and_then(|p| p.get(name)),
                schema.get("additionalProperties"),
            ) {
                (Some(s), _) => check(doc, v, s, &here, errors),
                (None, Some(Value::Bool(false))) => {
                    errors.push(format!("{at}: property `{name}` is not documented"));
                }
                (None, Some(s)) if s.is_object() => check(doc, v, s, &here, errors),
                (None, _) => {}
            }
        }
    }
    if let (Some(items), Some(arr)) = (schema.get("items"), value.as_array()) {
        for (i, v) in arr.iter().enumerate() {
            check(doc, v, items, &format!("{at}[{i}]"), errors);
        }
    }
}

/// The documented response for `status` (exact code, then `4XX`-style ranges, then `default`).
fn documented_response<'a>(doc: &'a Value, op: &'a Value, status: u16) -> Option<&'a Value> {
    let responses = op.get("responses")?;
    let range = format!("{}XX", status / 100);
    [status.to_string(), range, "default".to_owned()]
        .iter()
        .find_map(|k| responses.get(k))
        .map(|r| resolve(doc, r))
}

/// Checks one reply against the operation's documentation.
fn check_reply(doc: &Value, op: &Value, what: &str, reply: &Reply, failures: &mut Vec<String>) {
    if reply.is_no_route() {
        failures.push(format!(
            "{what}: the server has no such route ({})",
            reply.describe()
        ));
    }
    match reply.server_timing.as_deref() {
        Some(t) if t.starts_with("app;dur=") => {}
        other => failures.push(format!("{what}: Server-Timing is {other:?}")),
    }
    let Some(response) = documented_response(doc, op, reply.status) else {
        failures.push(format!(
            "{what}: status {} is not documented ({})",
            reply.status,
            reply.describe()
        ));
        return;
    };
    let Some(content) = response.get("content").and_then(Value::as_object) else {
        return;
    };
    let Some(media) = reply.media_type() else {
        failures.push(format!(
            "{what}: no Content-Type, documented {:?}",
            content.keys()
        ));
        return;
    };
    let Some(documented) = content.get(&media) else {
        failures.push(format!(
            "{what}: Content-Type {media} is not documented for {} ({:?})",
            reply.status,
            content.keys()
        ));
        return;
    };
    if media == "application/json" {
        let Some(body) = reply.json() else {
            failures.push(format!(
                "{what}: the body is not JSON ({})",
                reply.describe()
            ));
            return;
        };
        if let Some(schema) = documented.get("schema") {
            let mut errors = Vec::new();
            check(doc, &body, schema, "body", &mut errors);
            for e in errors {
                failures.push(format!("{what}: {e}"));
            }
        }
    }
}

/// The operation's request body example (media type `example`, else the schema's), if any.
fn body_example(doc: &Value, op: &Value) -> Option<(Value, Value)> {
    let media = op.pointer("/requestBody/content/application~1json")?;
    let schema = media.get("schema").cloned().unwrap_or(json!({}));
    let example = media
        .get("example")
        .or_else(|| resolve(doc, &schema).pointer("/examples/0"))
        .or_else(|| resolve(doc, &schema).get("example"))?;
    Some((example.clone(), schema))
}

/// Records that exist, to fill path parameters with.
struct Ids {
    /// A session cookie of the fleet-wide operator.
    session: String,
    token: String,
    instance: String,
    /// Deregistered by `DELETE /api/v1/instances/{id}` (the others keep using `instance`).
    doomed: String,
    command: String,
    policy: String,
}

fn fill_path(method: &str, path: &str, ids: &Ids) -> Result<String, String> {
    let id = if path.starts_with("/api/v1/tokens/") {
        &ids.token
    } else if path == "/api/v1/instances/{id}" && method == "DELETE" {
        &ids.doomed
    } else if path.starts_with("/api/v1/instances/") {
        &ids.instance
    } else if path.starts_with("/api/v1/commands/") {
        &ids.command
    } else {
        ""
    };
    let filled = path.replace("{id}", id).replace("{name}", &ids.policy);
    if filled.contains('{') || (path.contains("{id}") && id.is_empty()) {
        return Err(format!("the test cannot fill the parameters of {path}"));
    }
    Ok(filled)
}

/// A valid body for a write without a documented example.
fn minimal_body(method: &str, path: &str, ids: &Ids) -> Option<Value> {
    Some(match (method, path) {
        ("POST", "/api/v1/tokens") => json!({}),
        ("PUT", "/api/v1/instances/{id}/tags") => json!({"env": "prod"}),
        ("PUT", "/api/v1/instances/{id}/groups") => json!(["web"]),
        ("POST", "/api/v1/commands") => {
            json!({"target": {"instance": ids.instance}, "kind": "ping"})
        }
        ("POST", "/api/v1/policies") => json!({"name": "minimal", "rule": {"tag_present": "env"}}),
        _ => return None,
    })
}

/// Every `(METHOD, path)` the document describes, with its operation.
fn operations(doc: &Value) -> Vec<(String, String, Value)> {
    let mut ops = Vec::new();
    for (path, item) in doc["paths"].as_object().into_iter().flatten() {
        for (method, op) in item.as_object().into_iter().flatten() {
            if METHODS.contains(&method.as_str()) {
                ops.push((method.to_ascii_uppercase(), path.clone(), op.clone()));
            }
        }
    }
    ops
}

/// The document alone: version, the route list, security, path parameters, responses.
fn static_checks(doc: &Value, failures: &mut Vec<String>) {
    let version = doc["openapi"].as_str().unwrap_or("");
    assert!(version.starts_with("3."), "not OpenAPI 3.x: {version:?}");
    assert!(doc["paths"].is_object(), "no `paths` object");

    let documented: BTreeSet<(String, String)> = operations(doc)
        .into_iter()
        .map(|(m, p, _)| (m, p))
        .collect();
    let served: BTreeSet<(String, String)> = API_ROUTES
        .iter()
        .map(|(m, p)| ((*m).to_owned(), (*p).to_owned()))
        .collect();
    let undocumented: Vec<_> = served.difference(&documented).collect();
    let unserved: Vec<_> = documented.difference(&served).collect();
    if !undocumented.is_empty() || !unserved.is_empty() {
        failures.push(format!(
            "routes differ: in API_ROUTES but not in the document: {undocumented:?}; \
             in the document but not in API_ROUTES: {unserved:?}"
        ));
    }

    if doc["security"].as_array().is_none_or(Vec::is_empty) {
        failures.push("no global `security` requirement".to_owned());
    }
    for (method, path, op) in operations(doc) {
        let what = format!("{method} {path}");
        if op
            .get("security")
            .and_then(Value::as_array)
            .is_some_and(|s| {
                s.is_empty()
                    || s.iter()
                        .any(|r| r.as_object().is_some_and(|o| o.is_empty()))
            })
        {
            failures.push(format!("{what}: documented as not needing authentication"));
        }
        let params: Vec<Value> = op["parameters"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|p| resolve(doc, p).clone())
            .collect();
        let templated: Vec<&str> = path
            .split('/')
            .filter_map(|s| s.strip_prefix('{')?.strip_suffix('}'))
            .collect();
        for name in &templated {
            if !params
                .iter()
                .any(|p| p["in"] == "path" && p["name"] == *name && p["required"] == true)
            {
                failures.push(format!("{what}: path parameter `{name}` is not documented"));
            }
        }
        for p in params.iter().filter(|p| p["in"] == "path") {
            if !templated.iter().any(|n| p["name"] == *n) {
                failures.push(format!(
                    "{what}: documents path parameter {} not in the path",
                    p["name"]
                ));
            }
        }
        let codes: Vec<&String> = op["responses"]
            .as_object()
            .into_iter()
            .flatten()
            .map(|(k, _)| k)
            .collect();
        if !codes.iter().any(|c| c.starts_with('2')) {
            failures.push(format!("{what}: no 2xx response documented"));
        }
        if !codes.iter().any(|c| *c == "401") {
            failures.push(format!("{what}: 401 is not documented"));
        }
        if let Some((example, schema)) = body_example(doc, &op) {
            let mut errors = Vec::new();
            check(doc, &example, &schema, "example", &mut errors);
            for e in errors {
                failures.push(format!("{what}: request {e}"));
            }
        }
    }
}

/// A fleet with a token, two enrolled instances (metrics, status changes, trend samples), a
/// queued command and a policy, served on loopback.
async fn start() -> (
    std::net::SocketAddr,
    Ids,
    tokio::sync::oneshot::Sender<()>,
    tokio::task::JoinHandle<std::io::Result<()>>,
) {
    let clock = ManualClock::new(Timestamp::from_unix_secs(1_790_000_000));
    let fleet = Fleet::builder(Arc::new(MemoryStore::new()))
        .clock(clock.clone())
        .open()
        .await
        .unwrap();
    let created = fleet
        .create_token(
            &TenantScope::All,
            NewToken {
                max_uses: MaxUses::Limited(5),
                groups: Groups::from_names(["web"]).unwrap(),
                description: "openapi test".into(),
                ..NewToken::default()
            },
        )
        .await
        .unwrap();
    let secret = created.presented.to_string();
    let mut instances = Vec::new();
    for host in ["web-01", "web-02"] {
        let e = fleet
            .enroll(request(&secret, &key_and_csr().1, host))
            .await
            .unwrap();
        instances.push(e.instance);
    }
    let beat = || Heartbeat {
        metrics: Some(MetricsSample {
            cpu_percent: Some(42.0),
            ..MetricsSample::default()
        }),
        apps: None,
    };
    for _ in 0..3 {
        clock.advance(Duration::from_secs(15));
        fleet.heartbeat(instances[0], beat()).unwrap();
        fleet.sweep();
    }
    // Long enough for both to go stale, then one recovers: status changes to list.
    clock.advance(Duration::from_secs(400));
    fleet.sweep();
    fleet.heartbeat(instances[0], beat()).unwrap();
    fleet.sweep();
    let report = fleet
        .enqueue(
            &TenantScope::All,
            NewCommand::for_instance(instances[0], CommandKind::new("ping").unwrap()),
        )
        .await
        .unwrap();
    let policy: NewPolicy = serde_json::from_value(
        json!({"name": "setup-policy", "filter": "group:web", "rule": {"agent_version_at_least": "1.0.0"}}),
    )
    .unwrap();
    fleet.create_policy(policy).await.unwrap();
    // Every route is called with a wrong bearer token, from one address: more wrong tokens than
    // the login limiter's default budget, which `operator_limits.rs` tests on its own.
    let api = OperatorApi::new(fleet.clone(), OPERATOR)
        .tenant_token(TenantId::new("acme").unwrap(), TENANT_OPERATOR)
        .login_limit(fleet_core::limiter::AttemptLimit {
            max_failures: 10_000,
            ..Default::default()
        });
    let (session, _) = api
        .auth()
        .login(OPERATOR, &hyper::HeaderMap::new(), fleet.now())
        .unwrap()
        .unwrap();
    let ids = Ids {
        session,
        token: created.token.id.to_string(),
        instance: instances[0].to_string(),
        doomed: instances[1].to_string(),
        command: report.commands[0].id.to_string(),
        policy: "setup-policy".to_owned(),
    };

    let api = Arc::new(api);
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, rx) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(api.serve(listener, async {
        let _ = rx.await;
    }));
    (addr, ids, stop, task)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openapi_document_matches_the_server() {
    let doc: Value = serde_json::from_str(DOCUMENT).expect("openapi.json is not valid JSON");
    let mut failures = Vec::new();
    static_checks(&doc, &mut failures);

    let (addr, ids, stop, task) = start().await;
    let mut ops = operations(&doc);
    // Deletions last, so the records the other routes read still exist.
    ops.sort_by_key(|(m, _, _)| m == "DELETE");

    for (method, path, op) in &ops {
        let what = format!("{method} {path}");
        let url = match fill_path(method, path, &ids) {
            Ok(u) => u,
            Err(e) => {
                failures.push(format!("{what}: {e}"));
                continue;
            }
        };

        // Without credentials, with a wrong token, or with a wrong cookie: 401 `unauthorized`.
        for cred in [
            Cred::None,
            Cred::Bearer("not-the-operator-token"),
            Cred::Cookie("not-a-session"),
        ] {
            let reply = call(addr, method, &url, cred, None).await;
            let who = format!("{what} with {cred:?}");
            if reply.status != 401 || error_code(&reply).as_deref() != Some("unauthorized") {
                failures.push(format!(
                    "{who}: expected 401 unauthorized, got {}",
                    reply.describe()
                ));
            }
            check_reply(&doc, op, &who, &reply, &mut failures);
        }

        // With the operator token and a valid body: a documented 2xx.
        let body = if op.get("requestBody").is_some() {
            match body_example(&doc, op)
                .map(|(e, _)| e)
                .or_else(|| minimal_body(method, path, &ids))
            {
                Some(b) => Some(b),
                None => {
                    failures.push(format!(
                        "{what}: no example body and no minimal body in the test"
                    ));
                    continue;
                }
            }
        } else {
            None
        };
        // A tenant-scoped operator: 403 on the fleet-wide routes, 404 for another tenant's
        // instance, a documented answer everywhere.
        let who = format!("{what} as a tenant operator");
        let reply = call(
            addr,
            method,
            &url,
            Cred::Bearer(TENANT_OPERATOR),
            body.as_ref(),
        )
        .await;
        if FLEET_WIDE.contains(&(method.as_str(), path.as_str())) {
            if reply.status != 403 || error_code(&reply).as_deref() != Some("forbidden") {
                failures.push(format!(
                    "{who}: expected 403 forbidden, got {}",
                    reply.describe()
                ));
            }
        } else if path.starts_with("/api/v1/instances/{id}") && reply.status != 404 {
            failures.push(format!(
                "{who}: expected 404 for an instance without a tenant, got {}",
                reply.describe()
            ));
        }
        check_reply(&doc, op, &who, &reply, &mut failures);

        // The session cookie without `X-CSRF-Token`: writes answer 403 `csrf_failed`.
        if method != "GET" {
            let who = format!("{what} with the session cookie and no CSRF token");
            let reply = call(
                addr,
                method,
                &url,
                Cred::Cookie(&ids.session),
                body.as_ref(),
            )
            .await;
            if reply.status != 403 || error_code(&reply).as_deref() != Some("csrf_failed") {
                failures.push(format!(
                    "{who}: expected 403 csrf_failed, got {}",
                    reply.describe()
                ));
            }
            check_reply(&doc, op, &who, &reply, &mut failures);
        }

        // The operator token and a valid body: a documented 2xx.
        let reply = call(addr, method, &url, Cred::Bearer(OPERATOR), body.as_ref()).await;
        if !(200..300).contains(&reply.status) {
            failures.push(format!("{what}: expected a 2xx, got {}", reply.describe()));
        }
        check_reply(&doc, op, &what, &reply, &mut failures);
        if path == "/api/v1/openapi.json"
            && reply.status == 200
            && reply.json().as_ref() != Some(&doc)
        {
            failures.push(format!(
                "{what}: the served document differs from openapi.json"
            ));
        }
        if path == "/api/v1/session" && reply.status == 200 {
            let b = reply.json().unwrap_or_default();
            if !(b["tenant"].is_null() && b["csrf"].is_null() && b["expires_at"].is_null()) {
                failures.push(format!(
                    "{what}: a fleet-wide bearer caller has no tenant, csrf or expiry: {}",
                    reply.describe()
                ));
            }
        }

        // Every query parameter set to its documented example: still a documented 2xx.
        if method == "GET" {
            let query: Vec<(String, String)> = op["parameters"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|p| resolve(&doc, p))
                .filter(|p| p["in"] == "query")
                .filter_map(|p| {
                    let example = p.get("example")?;
                    let text = example
                        .as_str()
                        .map_or_else(|| example.to_string(), str::to_owned);
                    Some((p["name"].as_str()?.to_owned(), text))
                })
                .collect();
            if !query.is_empty() {
                let qs: String = form_urlencoded::Serializer::new(String::new())
                    .extend_pairs(&query)
                    .finish();
                let full = format!("{url}?{qs}");
                let reply = call(addr, method, &full, Cred::Bearer(OPERATOR), None).await;
                let what = format!("GET {path}?{qs}");
                if !(200..300).contains(&reply.status) {
                    failures.push(format!("{what}: expected a 2xx, got {}", reply.describe()));
                }
                check_reply(&doc, op, &what, &reply, &mut failures);
            }
        }
    }

    // A cookie session knows its CSRF token and expiry.
    if let Some((_, path, op)) = ops
        .iter()
        .find(|(m, p, _)| m == "GET" && p == "/api/v1/session")
    {
        let what = "GET /api/v1/session with the session cookie";
        let reply = call(addr, "GET", path, Cred::Cookie(&ids.session), None).await;
        let b = reply.json().unwrap_or_default();
        if reply.status != 200 || !b["csrf"].is_string() || !b["expires_at"].is_string() {
            failures.push(format!(
                "{what}: expected 200 with csrf and expires_at, got {}",
                reply.describe()
            ));
        }
        check_reply(&doc, op, what, &reply, &mut failures);
    }

    let _ = stop.send(());
    task.await.unwrap().unwrap();
    assert!(
        failures.is_empty(),
        "the OpenAPI document and the server disagree ({} findings):\n- {}",
        failures.len(),
        failures.join("\n- ")
    );
}

/// The schema checker itself catches what it is meant to catch.
#[test]
fn schema_checker_catches_mismatches() {
    let doc = json!({"components": {"schemas": {
        "Thing": {"type": "object", "required": ["id", "when"], "additionalProperties": false, "properties": {
            "id": {"type": "integer"},
            "when": {"type": ["string", "null"]},
            "state": {"type": "string", "enum": ["a", "b"]},
            "list": {"type": "array", "items": {"$ref": "#/components/schemas/Item"}},
            "pick": {"oneOf": [{"type": "integer"}, {"type": "string"}]}
        }},
        "Item": {"type": "object", "required": ["name"], "properties": {"name": {"type": "string"}}}
    }}});
    let schema = json!({"$ref": "#/components/schemas/Thing"});
    let errors = |v: Value| {
        let mut e = Vec::new();
        check(&doc, &v, &schema, "body", &mut e);
        e
    };
    assert_eq!(
        errors(json!({"id": 1, "when": null, "list": [{"name": "x"}], "pick": 2})),
        Vec::<String>::new()
    );
    for bad in [
        json!({"when": null}),
        json!({"id": 1.5, "when": null}),
        json!({"id": 1, "when": 3}),
        json!({"id": 1, "when": null, "state": "c"}),
        json!({"id": 1, "when": null, "extra": true}),
        json!({"id": 1, "when": null, "list": [{}]}),
        json!({"id": 1, "when": null, "pick": true}),
        json!([]),
    ] {
        assert_eq!(
            errors(bad.clone()).len(),
            1,
            "{bad}: {:?}",
            errors(bad.clone())
        );
    }
}
