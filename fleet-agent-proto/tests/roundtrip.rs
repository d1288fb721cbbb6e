//! Every protocol message survives JSON serialization unchanged (property tests), and the
//! documented example bodies parse.

use fleet_agent_proto::*;
use fleet_core::{App, CommandId, InstanceId, MetricsSample, SystemInfo, Timestamp};
use proptest::prelude::*;

fn text() -> impl Strategy<Value = String> {
    "[ -~é\\n\"\\\\]{0,40}"
}

fn opt_u64() -> impl Strategy<Value = Option<u64>> {
    prop::option::of(any::<u64>())
}

fn opt_f64() -> impl Strategy<Value = Option<f64>> {
    // Finite values only: JSON has no NaN or infinity.
    prop::option::of(-1.0e12f64..1.0e12)
}

fn metrics() -> impl Strategy<Value = MetricsSample> {
    (
        (
            opt_f64(),
            opt_u64(),
            opt_u64(),
            opt_u64(),
            opt_u64(),
            opt_u64(),
        ),
        (
            opt_u64(),
            opt_u64(),
            opt_f64(),
            opt_f64(),
            opt_f64(),
            prop::option::of(-1_000_000_000_000i64..4_000_000_000_000),
        ),
    )
        .prop_map(
            |((cpu, mu, mt, du, dt, rx), (tx, up, l1, l5, l15, at))| MetricsSample {
                cpu_percent: cpu,
                memory_used_bytes: mu,
                memory_total_bytes: mt,
                disk_used_bytes: du,
                disk_total_bytes: dt,
                network_rx_bytes: rx,
                network_tx_bytes: tx,
                uptime_secs: up,
                load_1m: l1,
                load_5m: l5,
                load_15m: l15,
                agent_time: at.map(Timestamp::from_unix_millis),
            },
        )
}

fn system() -> impl Strategy<Value = SystemInfo> {
    (
        text(),
        prop::collection::vec(any::<std::net::IpAddr>(), 0..4),
        prop::option::of(text()),
        prop::option::of(text()),
    )
        .prop_map(|(hostname, ip_addresses, os, agent_version)| SystemInfo {
            hostname,
            ip_addresses,
            os,
            os_version: None,
            arch: Some("x86_64".into()),
            agent_version,
        })
}

fn apps() -> impl Strategy<Value = Vec<App>> {
    prop::collection::vec(
        (text(), prop::option::of(text())).prop_map(|(name, version)| App { name, version }),
        0..4,
    )
}

fn result() -> impl Strategy<Value = CommandResult> {
    (
        any::<u128>(),
        any::<bool>(),
        prop::option::of(any::<i32>()),
        text(),
        any::<bool>(),
    )
        .prop_map(|(id, ok, exit_code, output, truncated)| CommandResult {
            id: CommandId::from_u128(id),
            outcome: if ok {
                CommandOutcome::Succeeded
            } else {
                CommandOutcome::Failed
            },
            exit_code,
            output,
            truncated,
        })
}

fn json_value() -> impl Strategy<Value = serde_json::Value> {
    prop_oneof![
        Just(serde_json::Value::Null),
        any::<bool>().prop_map(serde_json::Value::from),
        any::<i64>().prop_map(serde_json::Value::from),
        text().prop_map(serde_json::Value::from),
        prop::collection::btree_map(text(), any::<u32>(), 0..3).prop_map(|m| serde_json::json!(m)),
    ]
}

fn round_trip<T>(value: &T) -> Result<(), TestCaseError>
where
    T: serde::Serialize + serde::de::DeserializeOwned + PartialEq + std::fmt::Debug,
{
    let json = serde_json::to_string(value).map_err(|e| TestCaseError::fail(e.to_string()))?;
    let back: T =
        serde_json::from_str(&json).map_err(|e| TestCaseError::fail(format!("{e}: {json}")))?;
    prop_assert_eq!(&back, value, "{}", json);
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn enroll_request(token in text(), csr in text(), system in system(), prev in prop::option::of(text())) {
        round_trip(&EnrollRequest { token, csr_pem: csr, system, previous_certificate_pem: prev })?;
    }

    #[test]
    fn enroll_response(id in any::<u128>(), cert in text(), ca in text(), secs in any::<u64>()) {
        round_trip(&EnrollResponse { instance_id: InstanceId::from_u128(id), certificate_pem: cert, ca_pem: ca, heartbeat_interval_secs: secs })?;
    }

    #[test]
    fn heartbeat_request(sequence in opt_u64(), metrics in prop::option::of(metrics()), apps in prop::option::of(apps()), results in prop::collection::vec(result(), 0..3)) {
        round_trip(&HeartbeatRequest { sequence, metrics, apps, command_results: results })?;
    }

    #[test]
    fn heartbeat_response(cmds in prop::collection::vec((any::<u128>(), text(), json_value()), 0..3), secs in any::<u64>(), bundle in prop::option::of(text()), renew_now in any::<bool>()) {
        let commands = cmds.into_iter().map(|(id, kind, payload)| AgentCommand { id: CommandId::from_u128(id), kind, payload }).collect();
        round_trip(&HeartbeatResponse { commands, next_heartbeat_secs: secs, ca_bundle_pem: bundle, renew_now })?;
    }

    #[test]
    fn renew_messages(csr in text(), cert in text()) {
        round_trip(&RenewRequest { csr_pem: csr })?;
        round_trip(&RenewResponse { certificate_pem: cert })?;
    }

    #[test]
    fn error_bodies(i in 0..ErrorCode::ALL.len(), message in text()) {
        round_trip(&ErrorBody::new(ErrorCode::ALL[i], message))?;
    }
}

#[test]
fn documented_examples_parse() {
    let enroll: EnrollRequest = serde_json::from_str(
        r#"{"token": "abcd1234.0123456789abcdefghijklmnopqrstuv", "csr_pem": "-----BEGIN CERTIFICATE REQUEST-----...",
            "system": {"hostname": "web-01", "ip_addresses": ["10.0.0.5"], "os": "Cloud OS", "arch": "x86_64", "agent_version": "0.1.0"}}"#,
    )
    .unwrap();
    assert_eq!(enroll.system.hostname, "web-01");
    let minimal: EnrollRequest =
        serde_json::from_str(r#"{"token":"t","csr_pem":"c","system":{"hostname":"h"}}"#).unwrap();
    assert!(minimal.system.os.is_none());
    let hb: HeartbeatRequest = serde_json::from_str(
        r#"{"sequence": 1, "metrics": {"cpu_percent": 12.5, "memory_used_bytes": 1, "memory_total_bytes": 2,
            "disk_used_bytes": 1, "disk_total_bytes": 2, "network_rx_bytes": 10, "network_tx_bytes": 20,
            "uptime_secs": 3600}, "apps": [{"name": "nginx", "version": "1.25"}], "command_results": []}"#,
    )
    .unwrap();
    assert_eq!(hb.metrics.and_then(|m| m.cpu_percent), Some(12.5));
    assert_eq!(
        serde_json::from_str::<HeartbeatRequest>("{}").unwrap(),
        HeartbeatRequest::default()
    );
}

#[test]
fn unknown_fields_are_refused() {
    assert!(serde_json::from_str::<HeartbeatRequest>(r#"{"metrics": {}, "cpu": 1}"#).is_err());
    assert!(serde_json::from_str::<HeartbeatRequest>(r#"{"metrics": {"cpu": 1}}"#).is_err());
    assert!(
        serde_json::from_str::<EnrollRequest>(
            r#"{"token":"t","csr_pem":"c","system":{"hostname":"h"},"tenant":"x"}"#
        )
        .is_err()
    );
    assert!(serde_json::from_str::<RenewRequest>(r#"{"csr_pem":"c","instance_id":"x"}"#).is_err());
}
