//! `GET /metrics`: the fleet in the Prometheus text exposition format 0.0.4, written by hand (the
//! format is a few lines of text per series).
//!
//! | family | type | labels |
//! |---|---|---|
//! | `fleet_instances` | gauge | `status` (online, warning, offline), `tenant` (`""` for none) |
//! | `fleet_heartbeats_total` | counter | |
//! | `fleet_enrollments_total` | counter | `outcome` ([`EnrollmentOutcome`]) |
//! | `fleet_commands_total` | counter | `state` (the state a command entered) |
//! | `fleet_sweep_duration_seconds` | histogram | |
//! | `fleet_store_operation_duration_seconds` | histogram | `op` ([`StoreOp`]: the store method) |
//!
//! Instance counts come from the live view (no store read); counters and histograms from
//! [`Fleet::telemetry`], counting since this control plane started.
//!
//! [`EnrollmentOutcome`]: fleet_core::EnrollmentOutcome
//! [`StoreOp`]: fleet_core::StoreOp

use std::borrow::Cow;

use std::fmt::{self, Write as _};

use fleet_core::store::FleetStore;
use fleet_core::{Fleet, HistogramSnapshot, Status, TelemetrySnapshot};

/// The `Content-Type` of [`render`]'s output.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// The fleet's metrics in the Prometheus text format 0.0.4 (serve with [`CONTENT_TYPE`]); see
/// the module docs for the families. Costs one pass over the live view's instance ids, in
/// chunks, and no store access.
pub fn render<S: FleetStore>(fleet: &Fleet<S>) -> String {
    let instances = instances_by_tenant(fleet);
    let telemetry = fleet.telemetry();
    let mut out = String::with_capacity(32 * 1024);
    // Writing to a String cannot fail.
    let _ = write_metrics(&mut out, &instances, &telemetry);
    out
}

/// Instance counts by tenant (`""` for none), each as `[online, warning, offline]`, sorted by
/// tenant; always holds the `""` tenant. From the live view's bitmaps: no instance is visited.
fn instances_by_tenant<S: FleetStore>(fleet: &Fleet<S>) -> Vec<(String, [u64; 3])> {
    let mut out: Vec<(String, [u64; 3])> = fleet
        .view()
        .status_counts_by_tenant()
        .into_iter()
        .map(|(t, c)| (t.map_or_else(String::new, |t| t.as_str().to_owned()), c))
        .collect();
    out.sort_unstable_by(|a, b| a.0.cmp(&b.0));
    out
}

/// A label value escaped for the text format: backslash, double quote and line feed.
fn escape_label(v: &str) -> Cow<'_, str> {
    if !v.contains(['\\', '"', '\n']) {
        return Cow::Borrowed(v);
    }
    let mut out = String::with_capacity(v.len() + 8);
    for c in v.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    Cow::Owned(out)
}

/// A `# HELP` text escaped for the text format: backslash and line feed.
fn escape_help(v: &str) -> String {
    v.replace('\\', "\\\\").replace('\n', "\\n")
}

fn header(out: &mut String, name: &str, kind: &str, help: &str) -> fmt::Result {
    writeln!(out, "# HELP {name} {}", escape_help(help))?;
    writeln!(out, "# TYPE {name} {kind}")
}

/// One histogram's `_bucket`, `_sum` and `_count` lines; `labels` is empty or `key="value",`.
fn histogram(out: &mut String, name: &str, labels: &str, h: &HistogramSnapshot) -> fmt::Result {
    for (le, n) in &h.buckets {
        writeln!(out, "{name}_bucket{{{labels}le=\"{le}\"}} {n}")?;
    }
    writeln!(out, "{name}_bucket{{{labels}le=\"+Inf\"}} {}", h.count)?;
    let labels = labels.trim_end_matches(',');
    let braces = |l: &str| {
        if l.is_empty() {
            String::new()
        } else {
            format!("{{{l}}}")
        }
    };
    writeln!(out, "{name}_sum{} {}", braces(labels), h.sum.as_secs_f64())?;
    writeln!(out, "{name}_count{} {}", braces(labels), h.count)
}

fn write_metrics(
    out: &mut String,
    instances: &[(String, [u64; 3])],
    t: &TelemetrySnapshot,
) -> fmt::Result {
    header(
        out,
        "fleet_instances",
        "gauge",
        "Instances by status and tenant (tenant=\"\" for instances without one), from the live view.",
    )?;
    for (tenant, counts) in instances {
        let tenant = escape_label(tenant);
        for (status, n) in Status::ALL.iter().zip(counts) {
            writeln!(
                out,
                "fleet_instances{{status=\"{}\",tenant=\"{tenant}\"}} {n}",
                status.as_str()
            )?;
        }
    }

    header(
        out,
        "fleet_heartbeats_total",
        "counter",
        "Heartbeats accepted since this control plane started; heartbeats per second is rate(fleet_heartbeats_total[1m]).",
    )?;
    writeln!(out, "fleet_heartbeats_total {}", t.heartbeats_total)?;

    header(
        out,
        "fleet_enrollments_total",
        "counter",
        "Enrollment attempts by outcome: enrolled, retried and reenrolled succeeded; the others are refusals and failures.",
    )?;
    for (outcome, n) in &t.enrollments {
        writeln!(
            out,
            "fleet_enrollments_total{{outcome=\"{}\"}} {n}",
            outcome.as_str()
        )?;
    }

    header(
        out,
        "fleet_commands_total",
        "counter",
        "Command state transitions by the state entered (queued at enqueue, delivered per delivery, then succeeded, failed, expired or cancelled).",
    )?;
    for (state, n) in &t.commands {
        writeln!(
            out,
            "fleet_commands_total{{state=\"{}\"}} {n}",
            state.as_str()
        )?;
    }

    header(
        out,
        "fleet_sweep_duration_seconds",
        "histogram",
        "Time taken by staleness sweeps (real time).",
    )?;
    histogram(out, "fleet_sweep_duration_seconds", "", &t.sweep_duration)?;

    header(
        out,
        "fleet_store_operation_duration_seconds",
        "histogram",
        "Time taken by store calls the fleet made, by store method (real time, as the fleet awaited them).",
    )?;
    for (op, h) in &t.store_operations {
        let labels = format!("op=\"{}\",", escape_label(op.as_str()));
        histogram(out, "fleet_store_operation_duration_seconds", &labels, h)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;
    use std::sync::Arc;
    use std::time::Duration;

    use fleet_core::testing::{DynStore, enroll_with, open_fleet};
    use fleet_core::{
        CommandKind, Heartbeat, Histogram, MemoryStore, NewCommand, NewInstance, NewToken,
        SystemInfo, TenantId, TenantScope,
    };

    use super::*;

    /// A sample line parsed: name, labels (unescaped), value.
    type Sample = (String, Vec<(String, String)>, f64);

    /// Parses one sample line of the text format strictly, or says what is wrong.
    fn parse_sample(line: &str) -> Result<Sample, String> {
        let name_end = line
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == ':'))
            .ok_or("no value")?;
        let name = &line[..name_end];
        if name.is_empty() || name.starts_with(|c: char| c.is_ascii_digit()) {
            return Err(format!("bad metric name in {line:?}"));
        }
        let mut rest = &line[name_end..];
        let mut labels = Vec::new();
        if let Some(r) = rest.strip_prefix('{') {
            rest = r;
            loop {
                if let Some(r) = rest.strip_prefix('}') {
                    rest = r;
                    break;
                }
                let eq = rest.find('=').ok_or("label without =")?;
                let key = &rest[..eq];
                if key.is_empty() || !key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
                    return Err(format!("bad label name {key:?}"));
                }
                rest = rest[eq + 1..].strip_prefix('"').ok_or("unquoted value")?;
                let mut value = String::new();
                let mut chars = rest.char_indices();
                let end = loop {
                    match chars.next().ok_or("unterminated value")? {
                        (_, '\\') => match chars.next().ok_or("dangling escape")?.1 {
                            '\\' => value.push('\\'),
                            '"' => value.push('"'),
                            'n' => value.push('\n'),
                            c => return Err(format!("bad escape \\{c}")),
                        },
                        (i, '"') => break i,
                        (_, '\n') => return Err("raw newline in value".into()),
                        (_, c) => value.push(c),
                    }
                };
                labels.push((key.to_owned(), value));
                rest = &rest[end + 1..];
                rest = rest.strip_prefix(',').unwrap_or(rest);
            }
        }
        let value = rest.strip_prefix(' ').ok_or("no space before value")?;
        let value = match value {
            "+Inf" => f64::INFINITY,
            "-Inf" => f64::NEG_INFINITY,
            v => v.parse::<f64>().map_err(|e| format!("value {v:?}: {e}"))?,
        };
        Ok((name.to_owned(), labels, value))
    }

    /// Every line is a HELP, a TYPE or a sample of the family the last TYPE declared.
    fn parse(text: &str) -> Vec<Sample> {
        assert!(text.ends_with('\n'), "the exposition ends with a line feed");
        let mut family: Option<(String, String)> = None;
        let mut helped = None;
        let mut samples = Vec::new();
        for line in text.lines() {
            if let Some(h) = line.strip_prefix("# HELP ") {
                helped = h.split(' ').next().map(str::to_owned);
            } else if let Some(t) = line.strip_prefix("# TYPE ") {
                let (name, kind) = t.split_once(' ').expect("TYPE name kind");
                assert_eq!(helped.as_deref(), Some(name), "HELP before TYPE for {name}");
                assert!(["counter", "gauge", "histogram"].contains(&kind));
                family = Some((name.to_owned(), kind.to_owned()));
            } else {
                let s = parse_sample(line).unwrap_or_else(|e| panic!("{line:?}: {e}"));
                let (fam, kind) = family.as_ref().expect("a TYPE before samples");
                let ok = if kind == "histogram" {
                    ["_bucket", "_sum", "_count"]
                        .iter()
                        .any(|suffix| s.0 == format!("{fam}{suffix}"))
                } else {
                    s.0 == *fam
                };
                assert!(ok, "{} outside its family {fam}", s.0);
                samples.push(s);
            }
        }
        samples
    }

    fn label<'a>(s: &'a Sample, key: &str) -> Option<&'a str> {
        s.1.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str())
    }

    fn value(samples: &[Sample], name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        samples
            .iter()
            .find(|s| s.0 == name && labels.iter().all(|(k, v)| label(s, k) == Some(v)))
            .map(|s| s.2)
    }

    #[test]
    fn label_values_are_escaped() {
        assert_eq!(escape_label("acme"), "acme");
        assert_eq!(escape_label(r#"a\b"c"#), r#"a\\b\"c"#);
        assert_eq!(escape_label("two\nlines"), "two\\nlines");
        assert_eq!(escape_help("a\\b\nc \"q\""), "a\\\\b\\nc \"q\"");
        // Through the renderer, and back through a strict parser.
        let weird = "we\"ird\\ten\nant".to_owned();
        let telemetry = TelemetrySnapshot {
            heartbeats_total: 0,
            enrollments: Vec::new(),
            commands: Vec::new(),
            sweep_duration: Histogram::new().snapshot(),
            store_operations: Vec::new(),
        };
        let mut out = String::new();
        write_metrics(&mut out, &[(weird.clone(), [1, 2, 3])], &telemetry).unwrap();
        let samples = parse(&out);
        assert_eq!(
            value(
                &samples,
                "fleet_instances",
                &[("tenant", &weird), ("status", "warning")]
            ),
            Some(2.0)
        );
        let total: f64 = samples
            .iter()
            .filter(|(name, _, _)| name == "fleet_instances")
            .map(|s| s.2)
            .sum();
        assert_eq!(
            total, 6.0,
            "the fleet size is the sum over tenants and statuses"
        );
    }

    #[test]
    fn histograms_end_with_inf_equal_to_count() {
        let h = Histogram::new();
        for ms in [0, 1, 3, 70, 20_000] {
            h.observe(Duration::from_millis(ms));
        }
        let mut out = String::new();
        histogram(&mut out, "x_seconds", "op=\"enroll\",", &h.snapshot()).unwrap();
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(
            lines.len(),
            fleet_core::telemetry::LATENCY_BUCKETS.len() + 3
        );
        assert_eq!(lines[0], "x_seconds_bucket{op=\"enroll\",le=\"0.0001\"} 1");
        assert_eq!(lines[3], "x_seconds_bucket{op=\"enroll\",le=\"0.001\"} 2");
        assert_eq!(lines[16], "x_seconds_bucket{op=\"enroll\",le=\"+Inf\"} 5");
        assert_eq!(lines[17], "x_seconds_sum{op=\"enroll\"} 20.074");
        assert_eq!(lines[18], "x_seconds_count{op=\"enroll\"} 5");
        let mut out = String::new();
        histogram(&mut out, "y_seconds", "", &Histogram::new().snapshot()).unwrap();
        assert!(
            out.contains("y_seconds_bucket{le=\"+Inf\"} 0\ny_seconds_sum 0\ny_seconds_count 0\n")
        );
    }

    #[tokio::test]
    async fn a_live_fleet_renders_parsable_text() {
        let store: DynStore = Arc::new(MemoryStore::new());
        let (fleet, clock) = open_fleet(&store).await;
        let acme = TenantId::new("acme").unwrap();
        for (n, tenant) in [None, Some(acme.clone()), Some(acme.clone())]
            .into_iter()
            .enumerate()
        {
            fleet
                .register(NewInstance {
                    tenant,
                    system: SystemInfo::with_hostname(format!("host-{n}")),
                    ..NewInstance::default()
                })
                .await
                .unwrap();
        }
        clock.advance(Duration::from_secs(90));
        fleet.sweep();
        let instance = enroll_with(&fleet, NewToken::default(), "web-01").await;
        fleet.heartbeat(instance, Heartbeat::default()).unwrap();
        fleet
            .enqueue(
                &TenantScope::All,
                NewCommand::for_instance(instance, CommandKind::new("ping").unwrap()),
            )
            .await
            .unwrap();

        let text = render(&fleet);
        let samples = parse(&text);
        let v = |name, labels: &[(&str, &str)]| value(&samples, name, labels);
        let inst = |status, tenant| v("fleet_instances", &[("status", status), ("tenant", tenant)]);
        assert_eq!(inst("warning", "acme"), Some(2.0));
        assert_eq!(inst("online", "acme"), Some(0.0));
        assert_eq!(inst("warning", ""), Some(1.0));
        assert_eq!(inst("online", ""), Some(1.0), "the enrolled one");
        assert_eq!(v("fleet_heartbeats_total", &[]), Some(1.0));
        assert_eq!(
            v("fleet_enrollments_total", &[("outcome", "enrolled")]),
            Some(1.0)
        );
        assert_eq!(
            v("fleet_enrollments_total", &[("outcome", "token_exhausted")]),
            Some(0.0)
        );
        assert_eq!(v("fleet_commands_total", &[("state", "queued")]), Some(1.0));
        assert_eq!(
            v("fleet_commands_total", &[("state", "delivered")]),
            Some(0.0)
        );
        assert_eq!(v("fleet_sweep_duration_seconds_count", &[]), Some(1.0));
        assert_eq!(
            v("fleet_sweep_duration_seconds_bucket", &[("le", "+Inf")]),
            Some(1.0)
        );
        assert_eq!(
            v(
                "fleet_store_operation_duration_seconds_count",
                &[("op", "enroll")]
            ),
            Some(1.0)
        );

        // Every histogram's buckets are cumulative and end with +Inf == _count.
        let mut series: HashMap<String, Vec<f64>> = HashMap::new();
        for s in samples.iter().filter(|s| s.0.ends_with("_bucket")) {
            let key = format!("{}{:?}", s.0, label(s, "op"));
            series.entry(key).or_default().push(s.2);
        }
        assert_eq!(series.len(), 1 + fleet_core::StoreOp::ALL.len());
        for s in samples.iter().filter(|s| s.0.ends_with("_count")) {
            let family = s.0.trim_end_matches("_count");
            let buckets = &series[&format!("{family}_bucket{:?}", label(s, "op"))];
            assert!(buckets.windows(2).all(|w| w[0] <= w[1]), "cumulative");
            assert_eq!(buckets.last(), Some(&s.2), "+Inf == count");
        }
    }

    /// The per-tenant counts (from the view's bitmaps) agree with the fleet's own per-tenant
    /// summaries, also after status changes and a deregistration.
    #[tokio::test]
    async fn instance_counts_by_tenant_match_the_summaries() {
        let store: DynStore = Arc::new(MemoryStore::new());
        let (fleet, clock) = open_fleet(&store).await;
        let tenants: Vec<TenantId> = (0..5)
            .map(|n| TenantId::new(format!("tenant-{n}")).unwrap())
            .collect();
        let mut ids = Vec::new();
        for n in 0..600u32 {
            ids.push(
                fleet
                    .register(NewInstance {
                        tenant: (n % 3 != 0).then(|| tenants[n as usize % 5].clone()),
                        system: SystemInfo::with_hostname(format!("host-{n}")),
                        ..NewInstance::default()
                    })
                    .await
                    .unwrap()
                    .id,
            );
        }
        // A third stays quiet long enough to go warning; one instance leaves.
        clock.advance(Duration::from_secs(90));
        for (n, id) in ids.iter().enumerate() {
            if n % 3 != 1 {
                fleet.heartbeat(*id, Heartbeat::default()).unwrap();
            }
        }
        fleet.sweep();
        fleet.deregister(&TenantScope::All, ids[1]).await.unwrap();

        let samples = parse(&render(&fleet));
        let rendered = |status: &str, tenant: &str| {
            samples
                .iter()
                .find(|(name, labels, _)| {
                    name == "fleet_instances"
                        && labels.contains(&("status".into(), status.into()))
                        && labels.contains(&("tenant".into(), tenant.into()))
                })
                .map(|s| s.2 as u64)
        };
        let mut tenanted = [0u64; 3];
        for t in &tenants {
            let s = fleet.summary(&fleet_core::Filter::all(), &TenantScope::Tenant(t.clone()));
            assert_eq!(
                [
                    rendered("online", t.as_str()),
                    rendered("warning", t.as_str()),
                    rendered("offline", t.as_str())
                ],
                [Some(s.online), Some(s.warning), Some(s.offline)],
                "{t}"
            );
            tenanted[0] += s.online;
            tenanted[1] += s.warning;
        }
        let all = fleet.summary(&fleet_core::Filter::all(), &TenantScope::All);
        assert!(all.warning > 0 && all.online > 0, "{all:?}");
        assert_eq!(rendered("online", ""), Some(all.online - tenanted[0]));
        assert_eq!(rendered("warning", ""), Some(all.warning - tenanted[1]));
        assert_eq!(all.total, 599);
    }
}
