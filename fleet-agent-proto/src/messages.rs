//! The request and response bodies of protocol v1.
//!
//! Requests reject unknown fields (a typo in an agent is an error, not silently ignored);
//! optional fields may be omitted.

use fleet_core::{
    App, Command, CommandId, CommandOutcome, InstanceId, MetricsSample, ReportedResult, SystemInfo,
};
use serde::{Deserialize, Serialize};

/// `POST /v1/enroll`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EnrollRequest {
    /// The registration token (`<id>.<secret>`) or the whole join string.
    pub token: String,
    /// The agent's CSR (PEM).
    pub csr_pem: String,
    /// What the agent reports about its machine (only `hostname` is required).
    pub system: SystemInfo,
    /// For re-enrollment after the certificate expired: that certificate (PEM).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub previous_certificate_pem: Option<String>,
}

/// Reply to a successful enrollment.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EnrollResponse {
    /// The instance's identity.
    pub instance_id: InstanceId,
    /// Its client certificate (PEM).
    pub certificate_pem: String,
    /// The fleet CA certificate (PEM), to trust for the server and to pin.
    pub ca_pem: String,
    /// How often to heartbeat.
    pub heartbeat_interval_secs: u64,
}

/// `POST /v1/heartbeat`. `{}` is a valid liveness-only heartbeat.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HeartbeatRequest {
    /// A counter the agent increments per heartbeat (diagnostics only; replays are harmless).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sequence: Option<u64>,
    /// A metrics sample.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metrics: Option<MetricsSample>,
    /// The installed-apps list, when it changed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub apps: Option<Vec<App>>,
    /// Results of commands the agent ran since its last heartbeat.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub command_results: Vec<CommandResult>,
}

/// Reply to a heartbeat.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HeartbeatResponse {
    /// Commands to run (at-least-once: the agent de-duplicates by id).
    pub commands: Vec<AgentCommand>,
    /// Seconds until the next heartbeat.
    pub next_heartbeat_secs: u64,
    /// The CA certificates to trust from now on (PEM, the signing one first), sent when the
    /// request's [`CA_SET_HEADER`](crate::CA_SET_HEADER) names another set: a CA rotation began,
    /// was promoted or ended. The agent replaces the roots it checks the server against with
    /// these (the reply came over a connection the old roots authenticated) and keeps them
    /// ([`client::AgentClient::trust_ca_bundle`](crate::client::AgentClient::trust_ca_bundle)).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_bundle_pem: Option<String>,
    /// The agent's certificate was signed by a CA that no longer signs: renew now rather than
    /// at the usual point of its lifetime, before that CA is retired.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub renew_now: bool,
}

/// `POST /v1/renew`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RenewRequest {
    /// A CSR for the new certificate (PEM).
    pub csr_pem: String,
}

/// Reply to a renewal.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RenewResponse {
    /// The new client certificate (PEM); the old one stays valid until this one is first used.
    pub certificate_pem: String,
}

/// A command for the agent to run. Part of a reply, so fields a newer server adds are ignored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AgentCommand {
    /// The command's id; results refer to it, and the agent de-duplicates by it (delivery is at
    /// least once).
    pub id: CommandId,
    /// What to do, e.g. `ping`; agents refuse kinds they do not know with a failed result.
    pub kind: String,
    /// Arguments, as the kind defines them.
    #[serde(default)]
    pub payload: serde_json::Value,
}

impl From<&Command> for AgentCommand {
    fn from(c: &Command) -> Self {
        Self {
            id: c.id,
            kind: c.kind.to_string(),
            payload: c.payload.value(),
        }
    }
}

/// The result of a command, reported in a later heartbeat.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CommandResult {
    /// The command's id.
    pub id: CommandId,
    /// How it ended.
    pub outcome: CommandOutcome,
    /// Exit code, if it ran a process.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit_code: Option<i32>,
    /// Output; the server keeps at most [`MAX_COMMAND_OUTPUT`](crate::MAX_COMMAND_OUTPUT) bytes.
    #[serde(default)]
    pub output: String,
    /// Whether the agent already cut `output` (the server also marks output it cuts itself).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub truncated: bool,
}

impl From<CommandResult> for ReportedResult {
    fn from(r: CommandResult) -> Self {
        // `Fleet::exchange` cuts the output to the limit and keeps the agent's flag.
        Self {
            id: r.id,
            outcome: r.outcome,
            result: fleet_core::CommandResult {
                exit_code: r.exit_code,
                output: r.output,
                truncated: r.truncated,
            },
        }
    }
}
