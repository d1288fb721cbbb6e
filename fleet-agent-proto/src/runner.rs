//! The agent side of commands: run the built-in kinds, refuse everything else, de-duplicate
//! redeliveries, and hand results to the next heartbeats until the server has them.
//!
//! Built-in kinds (nothing else is ever executed):
//!
//! | kind | does | result |
//! |---|---|---|
//! | `ping` | nothing | succeeded, output `pong` |
//! | `collect-inventory` | asks the agent's inventory source | succeeded, output the inventory as JSON |
//! | `restart-agent` | asks the agent to restart once the result is delivered | succeeded, output `restarting` |
//!
//! Any other kind ends `failed` with an output naming the kinds this agent runs.
//!
//! Delivery is at least once: a command the server delivers again (its lease ran out before the
//! result arrived) is recognised by id and not run twice; its result, if still unsent, goes with
//! the next heartbeat. Results leave the queue only when [`acknowledge`](CommandRunner::acknowledge)
//! says a heartbeat carrying them succeeded.
//!
//! ```
//! use fleet_agent_proto::runner::CommandRunner;
//! use fleet_agent_proto::{AgentCommand, CommandOutcome};
//! use fleet_core::CommandId;
//!
//! let mut runner = CommandRunner::new(|| serde_json::json!({ "hostname": "web-01" }));
//! let ping = AgentCommand { id: CommandId::from_u128(1), kind: "ping".into(), payload: Default::default() };
//! let rm = AgentCommand { id: CommandId::from_u128(2), kind: "rm-rf".into(), payload: Default::default() };
//! runner.run(&[ping.clone(), rm, ping]);
//! let results = runner.pending_results();
//! assert_eq!(results.len(), 2, "the redelivered ping ran once");
//! assert_eq!(results[0].output, "pong");
//! assert_eq!(results[1].outcome, CommandOutcome::Failed);
//! runner.acknowledge(results.len());
//! assert!(runner.pending_results().is_empty());
//! ```

use std::collections::{HashSet, VecDeque};

use fleet_core::{CommandId, CommandOutcome};

use crate::{AgentCommand, CommandResult, MAX_COMMAND_OUTPUT};

/// The kinds this runner executes.
pub const BUILTIN_KINDS: [&str; 3] = ["ping", "collect-inventory", "restart-agent"];
/// How many command ids the runner remembers for de-duplication.
pub const REMEMBERED_IDS: usize = 4096;
/// Most bytes of results (as JSON) put into one heartbeat; the rest follow in the next ones.
/// Well under the server's heartbeat body limit.
pub const RESULTS_BUDGET: usize = 128 * 1024;

/// Runs commands; see the module docs.
pub struct CommandRunner {
    inventory: Box<dyn Fn() -> serde_json::Value + Send + Sync>,
    seen: HashSet<CommandId>,
    order: VecDeque<CommandId>,
    pending: VecDeque<CommandResult>,
    restart_after: Option<CommandId>,
    restart_due: bool,
}

impl std::fmt::Debug for CommandRunner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CommandRunner")
            .field("remembered", &self.order.len())
            .field("pending", &self.pending.len())
            .field("restart_due", &self.restart_due)
            .finish_non_exhaustive()
    }
}

impl CommandRunner {
    /// A runner whose `collect-inventory` reports what `inventory` returns.
    pub fn new(inventory: impl Fn() -> serde_json::Value + Send + Sync + 'static) -> Self {
        Self {
            inventory: Box::new(inventory),
            seen: HashSet::new(),
            order: VecDeque::new(),
            pending: VecDeque::new(),
            restart_after: None,
            restart_due: false,
        }
    }

    /// Runs the commands not seen before, in order, queueing their results.
    pub fn run(&mut self, commands: &[AgentCommand]) {
        for c in commands {
            if !self.seen.insert(c.id) {
                continue;
            }
            self.order.push_back(c.id);
            if self.order.len() > REMEMBERED_IDS
                && let Some(old) = self.order.pop_front()
            {
                self.seen.remove(&old);
            }
            let (outcome, exit_code, output) = match c.kind.as_str() {
                "ping" => (CommandOutcome::Succeeded, Some(0), "pong".to_owned()),
                "collect-inventory" => (
                    CommandOutcome::Succeeded,
                    Some(0),
                    (self.inventory)().to_string(),
                ),
                "restart-agent" => {
                    self.restart_after = Some(c.id);
                    (CommandOutcome::Succeeded, Some(0), "restarting".to_owned())
                }
                other => (
                    CommandOutcome::Failed,
                    None,
                    format!(
                        "unknown command kind {other:?}; this agent runs only: {}",
                        BUILTIN_KINDS.join(", ")
                    ),
                ),
            };
            let result = fleet_core::CommandResult::new(exit_code, output);
            self.pending.push_back(CommandResult {
                id: c.id,
                outcome,
                exit_code: result.exit_code,
                output: result.output,
                truncated: result.truncated,
            });
        }
    }

    /// The results to send with the next heartbeat, oldest first, within [`RESULTS_BUDGET`]
    /// (always at least one when any is pending). Output is already cut to
    /// [`MAX_COMMAND_OUTPUT`].
    pub fn pending_results(&self) -> Vec<CommandResult> {
        let mut out = Vec::new();
        let mut used = 0;
        for r in &self.pending {
            // Escaping can grow output up to six times; count generously.
            let size = 128 + r.output.len().min(MAX_COMMAND_OUTPUT) * 6;
            if !out.is_empty() && used + size > RESULTS_BUDGET {
                break;
            }
            used += size;
            out.push(r.clone());
        }
        out
    }

    /// A heartbeat carrying the first `n` pending results succeeded: forget them.
    pub fn acknowledge(&mut self, n: usize) {
        for r in self.pending.drain(..n.min(self.pending.len())) {
            if self.restart_after == Some(r.id) {
                self.restart_due = true;
            }
        }
    }

    /// Whether the agent should restart now: a `restart-agent` command ran, its result reached
    /// the server, and so did every other result — so nothing that ran is forgotten by the new
    /// process and run again when redelivered. Call it after [`run`](Self::run) has handled the
    /// latest reply's commands.
    pub fn restart_due(&self) -> bool {
        self.restart_due && self.pending.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cmd(n: u128, kind: &str) -> AgentCommand {
        AgentCommand {
            id: CommandId::from_u128(n),
            kind: kind.into(),
            payload: serde_json::Value::Null,
        }
    }

    #[test]
    fn builtins_run_and_unknown_kinds_fail() {
        let mut r = CommandRunner::new(|| serde_json::json!({"apps": ["nginx"]}));
        r.run(&[cmd(1, "ping"), cmd(2, "collect-inventory"), cmd(3, "sh")]);
        let got = r.pending_results();
        assert_eq!(got.len(), 3);
        assert_eq!(
            (got[0].outcome, got[0].output.as_str()),
            (CommandOutcome::Succeeded, "pong")
        );
        assert_eq!(got[1].output, r#"{"apps":["nginx"]}"#);
        assert_eq!(got[2].outcome, CommandOutcome::Failed);
        assert!(got[2].output.contains("\"sh\""));
        assert_eq!(got[2].exit_code, None);
    }

    #[test]
    fn redeliveries_run_once_and_results_stay_until_acknowledged() {
        let mut r = CommandRunner::new(|| serde_json::Value::Null);
        r.run(&[cmd(1, "ping")]);
        r.run(&[cmd(1, "ping")]);
        assert_eq!(r.pending_results().len(), 1);
        r.acknowledge(0);
        assert_eq!(
            r.pending_results().len(),
            1,
            "a failed heartbeat keeps the result"
        );
        r.acknowledge(1);
        r.run(&[cmd(1, "ping")]);
        assert!(r.pending_results().is_empty(), "already ran and reported");
    }

    #[test]
    fn restart_is_due_only_after_every_result_is_delivered() {
        let mut r = CommandRunner::new(|| serde_json::Value::Null);
        r.run(&[cmd(1, "ping"), cmd(2, "restart-agent"), cmd(3, "ping")]);
        assert!(!r.restart_due());
        r.acknowledge(1);
        assert!(!r.restart_due());
        r.acknowledge(1);
        assert!(!r.restart_due(), "the third result is not delivered yet");
        r.run(&[cmd(4, "ping")]);
        r.acknowledge(1);
        assert!(!r.restart_due(), "nor the fourth, from a later reply");
        r.acknowledge(1);
        assert!(r.restart_due());
    }

    #[test]
    fn cut_output_says_so_on_the_wire() {
        let big = "y".repeat(MAX_COMMAND_OUTPUT + 10);
        let mut r = CommandRunner::new(move || serde_json::Value::String(big.clone()));
        r.run(&[cmd(1, "collect-inventory")]);
        let res = r.pending_results().remove(0);
        assert!(res.truncated);
        let json = serde_json::to_value(&res).unwrap();
        assert_eq!(json["truncated"], true);
        let core: fleet_core::ReportedResult = res.into();
        assert!(
            core.result.truncated,
            "the flag survives into the stored result"
        );
        assert_eq!(core.result.output.len(), MAX_COMMAND_OUTPUT);
    }

    #[test]
    fn results_are_split_across_heartbeats_within_the_budget() {
        let big = "x".repeat(MAX_COMMAND_OUTPUT);
        let mut r = CommandRunner::new(move || serde_json::Value::String(big.clone()));
        let cmds: Vec<AgentCommand> = (0..6).map(|n| cmd(n, "collect-inventory")).collect();
        r.run(&cmds);
        let first = r.pending_results();
        assert!(!first.is_empty() && first.len() < 6);
        let body = serde_json::to_vec(&first).unwrap();
        assert!(body.len() <= RESULTS_BUDGET);
        assert!(first.iter().all(|x| x.output.len() <= MAX_COMMAND_OUTPUT));
        r.acknowledge(first.len());
        assert_eq!(r.pending.len(), 6 - first.len());
    }
}
