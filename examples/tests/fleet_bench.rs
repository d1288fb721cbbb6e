//! `fleet-bench --quick`: every scenario runs end to end (real TLS on loopback, a real server
//! child process, its usage read from /proc) and reports figures that hang together. Goals are
//! not asserted here (a debug build on a shared CI machine says nothing about speed); zero
//! failed requests and a clean exit are.

use std::process::Command;

use serde_json::Value;

fn bench(args: &[&str]) -> Vec<Value> {
    let out = Command::new(env!("CARGO_BIN_EXE_fleet-bench"))
        .args(args)
        .args(["--quick", "--json", "--timeout", "600"])
        .output()
        .expect("running fleet-bench");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "fleet-bench {args:?} failed ({}):\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect()
}

fn num(v: &Value, path: &[&str]) -> f64 {
    let mut cur = v;
    for p in path {
        cur = cur.get(p).unwrap_or_else(|| panic!("no {path:?} in {v}"));
    }
    cur.as_f64()
        .unwrap_or_else(|| panic!("{path:?} is not a number in {v}"))
}

fn phase_is_sane(v: &Value, path: &[&str]) {
    let p = {
        let mut cur = v;
        for k in path {
            cur = &cur[k];
        }
        cur
    };
    assert!(num(p, &["ok"]) > 0.0, "{path:?}: nothing succeeded: {p}");
    assert_eq!(num(p, &["failed"]), 0.0, "{path:?}: {p}");
    assert!(num(p, &["rate"]) > 0.0, "{p}");
    assert!(
        num(p, &["cpu_us_per_op"]) > 0.0,
        "server CPU read from /proc: {p}"
    );
    let l = &p["latency"];
    assert!(
        num(l, &["p50_ms"]) > 0.0
            && num(l, &["p50_ms"]) <= num(l, &["p99_ms"])
            && num(l, &["p99_ms"]) <= num(l, &["p999_ms"])
            && num(l, &["p999_ms"]) <= num(l, &["max_ms"]),
        "{path:?}: percentiles out of order: {l}"
    );
}

#[test]
fn heartbeat_compares_with_the_baseline_in_the_same_run() {
    let r = bench(&["heartbeat", "--store", "memory"]);
    assert_eq!(r.len(), 1);
    let r = &r[0];
    assert_eq!(r["scenario"], "heartbeat");
    phase_is_sane(r, &["baseline"]);
    phase_is_sane(r, &["baseline_paced", "phase"]);
    phase_is_sane(r, &["max"]);
    phase_is_sane(r, &["paced", "phase"]);
    let ratio = num(r, &["ratio_to_baseline"]);
    let expected = num(r, &["max", "rate"]) / num(r, &["baseline", "rate"]);
    assert!((ratio - expected).abs() < 1e-9, "{ratio} vs {expected}");
    assert!(num(r, &["server_peak_rss_mib"]) > 1.0);
    assert!(num(r, &["machine", "cores"]) >= 1.0);
    assert!(r["goals"].as_array().is_some_and(|g| g.len() == 4), "{r}");
}

#[test]
fn write_through_heartbeats_on_sled() {
    let r = bench(&["heartbeat", "--store", "sled", "--write-through"]);
    assert_eq!(r[0]["write_through"], true);
    phase_is_sane(&r[0], &["max"]);
}

#[test]
fn enrollments_each_on_a_fresh_connection() {
    let r = bench(&["enroll"]);
    phase_is_sane(&r[0], &["enroll"]);
}

#[test]
fn reconnect_after_a_restart_and_idle_memory() {
    let r = bench(&["reconnect", "--agents", "40"]);
    let r = &r[0];
    phase_is_sane(r, &["reconnect"]);
    assert_eq!(
        num(r, &["reconnect", "ok"]),
        40.0,
        "every agent came back: {r}"
    );
    // The 40 that came back, plus 10 opened one at a time for the steady-state figure.
    assert_eq!(num(r, &["steady_connections"]), 10.0);
    assert_eq!(num(r, &["idle_connections"]), 50.0);
    assert!(num(r, &["rss_per_idle_connection_steady_kib"]).is_finite());
    assert!(num(r, &["restart_s"]) > 0.0);
}

#[test]
fn reconnect_refuses_a_memory_store() {
    let out = Command::new(env!("CARGO_BIN_EXE_fleet-bench"))
        .args(["reconnect", "--store", "memory", "--quick"])
        .output()
        .expect("running fleet-bench");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("needs a persistent store"), "{err}");
}

#[test]
fn queries_through_the_operator_api() {
    let r = bench(&["query", "--instances", "3000"]);
    let r = &r[0];
    assert_eq!(
        num(r, &["instances"]),
        2000.0,
        "--quick caps the fleet at 2,000"
    );
    for op in ["summary", "summary_filtered", "page_filtered", "search"] {
        let q = &r["queries"][op];
        assert!(num(q, &["requests"]) >= 3.0, "{op}: {q}");
        assert!(
            num(q, &["server", "p50_ms"]) > 0.0,
            "{op}: Server-Timing read: {q}"
        );
        assert!(
            num(q, &["server", "p50_ms"]) <= num(q, &["client", "p50_ms"]),
            "{op}: the server's own time is within the round trip: {q}"
        );
    }
    // 10 % role=db, half of them in prod: a full first page; the needle matches 1,000.
    assert_eq!(num(&r["queries"]["page_filtered"], &["items"]), 100.0);
    assert_eq!(num(&r["queries"]["search"], &["items"]), 100.0);
    let per = num(r, &["live_view_bytes_per_instance"]);
    assert!(per > 50.0 && per < 4096.0, "{per}");
}

#[test]
fn heartbeats_while_tenant_operators_send_the_heaviest_filter() {
    let r = bench(&["filter", "--store", "memory"]);
    let r = &r[0];
    assert_eq!(r["scenario"], "filter");
    for phase in ["idle", "loaded", "idle_after"] {
        phase_is_sane(r, &[phase]);
    }
    // The tenant sees one synthetic instance in eight, and its heaviest filter selects them all.
    assert_eq!(num(r, &["instances"]), 2000.0);
    assert_eq!(num(r, &["filter_selects"]), 250.0);
    assert!(num(r, &["queries", "ok"]) > 0.0, "{r}");
    assert_eq!(num(r, &["queries", "failed"]), 0.0, "{r}");
    assert!(num(r, &["p50_loaded_over_idle"]).is_finite());
    assert!(r["goals"].as_array().is_some_and(|g| g.len() == 3), "{r}");
}

#[test]
fn the_filter_scenario_reports_a_refused_filter_as_failed() {
    // The 1,024 two-letter text values of issue 16: over the total-values limit.
    let letter = |n: usize| char::from(b'a' + (n % 26) as u8);
    let issue: Vec<String> = (0..64)
        .map(|t| {
            let v: Vec<String> = (0..16)
                .map(|i| {
                    let n = t * 16 + i;
                    format!("{}{}", letter(n / 26), letter(n))
                })
                .collect();
            format!("text:{}", v.join("|"))
        })
        .collect();
    let out = Command::new(env!("CARGO_BIN_EXE_fleet-bench"))
        .args(["filter", "--store", "memory", "--quick", "--json"])
        .args(["--filter", &issue.join(" ")])
        .output()
        .expect("running fleet-bench");
    assert!(!out.status.success(), "a refused query is a failure");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let r: Value = serde_json::from_str(stdout.lines().next().unwrap_or("")).expect("a report");
    let e = r["queries"]["first_error"].as_str().unwrap_or("");
    assert!(e.contains("400") && e.contains("max_total_values"), "{e}");
}

#[test]
fn heartbeat_and_enroll_on_postgres() {
    let r = bench(&["heartbeat", "--store", "postgres"]);
    assert_eq!(r[0]["store"], "postgres");
    phase_is_sane(&r[0], &["max"]);
    let r = bench(&["enroll", "--store", "postgres"]);
    phase_is_sane(&r[0], &["enroll"]);
}
