//! `fleet-bench`: end-to-end performance of the fleet server over real mutual TLS on loopback,
//! measured against a bare hyper + rustls server in the same run.
//!
//! ```text
//! cargo run --release -p fleet-examples --bin fleet-bench -- heartbeat
//! cargo run --release -p fleet-examples --bin fleet-bench -- enroll
//! cargo run --release -p fleet-examples --bin fleet-bench -- reconnect
//! cargo run --release -p fleet-examples --bin fleet-bench -- query --instances 1000000
//! cargo run --release -p fleet-examples --bin fleet-bench -- filter --instances 50000
//! cargo run --release -p fleet-examples --bin fleet-bench -- all --quick --json
//! ```
//!
//! The server runs in a child process pinned to `--server-cpu` (default CPU 0 on a machine with
//! two or more) and this process, the load generator, to `--load-cpu` (default CPU 1), so the
//! figures read "per server core"; the server's CPU time and memory come from its own
//! `/proc/<pid>`, never the load generator's. With `--store postgres` the database server runs
//! unpinned and its CPU is not in the server figures.
//!
//! Exits non-zero if any request failed or a scenario could not run; goals missed are reported,
//! not fatal. `--json` prints one JSON object per scenario on stdout.

#![forbid(unsafe_code)]

use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};
use fleet_examples::bench::child::{self, ChildArgs, StoreKind};
use fleet_examples::bench::run::{self, Machine, Options, Report, Scenario};
use serde_json::Value;

#[derive(Parser, Debug)]
#[command(
    name = "fleet-bench",
    version,
    about = "End-to-end fleet server benchmarks over mutual TLS"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run a scenario.
    #[command(flatten)]
    Run(Box<RunCommand>),
    /// The server process of a run (started by fleet-bench itself).
    #[command(hide = true)]
    Child(ChildArgs),
}

#[derive(Subcommand, Debug)]
enum RunCommand {
    /// A bare hyper + rustls server answering a fixed reply: the transport's floor.
    Baseline(Args),
    /// Keep-alive mutual-TLS heartbeats: the baseline, the fleet server's maximum rate, then
    /// paced at 70 % of it for latency.
    Heartbeat(Args),
    /// Registrations with a multi-use token, each on a fresh connection.
    Enroll(Args),
    /// Every agent reconnecting at once (full handshakes) after a server restart; memory per
    /// idle connection.
    Reconnect(Args),
    /// Summary, filtered page and free-text search through the operator API.
    Query(Args),
    /// Heartbeat latency (paced at --rate, default 2,000/s) idle and while --query-clients
    /// tenant-scoped operators send the heaviest allowed filter (or --filter) in a loop.
    Filter(Args),
    /// Every scenario (heartbeat, enroll, reconnect, query, filter).
    All(Args),
}

#[derive(clap::Args, Debug, Clone)]
struct Args {
    /// The fleet server's store.
    #[arg(long, value_enum, default_value_t = StoreKind::Sled)]
    store: StoreKind,
    /// Connections (heartbeat, baseline: 64), concurrent registrations (enroll: 16) or agents
    /// (reconnect: 2,000).
    #[arg(long)]
    agents: Option<usize>,
    /// Seconds measured per phase.
    #[arg(long, default_value_t = 10.0)]
    duration: f64,
    /// Synthetic instances for `query` and `filter`.
    #[arg(long, default_value_t = 100_000)]
    instances: usize,
    /// Operator clients sending the filter in a loop (`filter`).
    #[arg(long, default_value_t = 4)]
    query_clients: usize,
    /// The filter they send (`filter`; default: the heaviest the API accepts).
    #[arg(long)]
    filter: Option<String>,
    /// Persist every heartbeat before answering instead of batching (heartbeat).
    #[arg(long)]
    write_through: bool,
    /// Paced heartbeat rate per second (heartbeat: 70 % of the measured maximum; filter:
    /// 2,000/s).
    #[arg(long)]
    rate: Option<f64>,
    /// A few seconds in all: tiny counts, one-second phases (CI keeps the harness alive).
    #[arg(long)]
    quick: bool,
    /// CPUs of the server child (`taskset -c` list). Default: 0 when there are two or more.
    #[arg(long)]
    server_cpu: Option<String>,
    /// CPUs of the load generator. Default: 1 when there are two or more.
    #[arg(long)]
    load_cpu: Option<String>,
    /// Run unpinned.
    #[arg(long, conflicts_with_all = ["server_cpu", "load_cpu"])]
    no_pin: bool,
    /// PostgreSQL URL for `--store postgres` (default: a throwaway server for the run).
    #[arg(long, env = "FLEET_DATABASE_URL")]
    database_url: Option<String>,
    /// Keep the server's files under this directory (default: a temporary one, removed).
    #[arg(long)]
    dir: Option<std::path::PathBuf>,
    /// Longest the whole run may take, in seconds.
    #[arg(long, default_value_t = 1800)]
    timeout: u64,
    /// One JSON object per scenario on stdout.
    #[arg(long)]
    json: bool,
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Child(args) => tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()?
            .block_on(child::run(args)),
        Command::Run(cmd) => {
            let (scenario, args) = match *cmd {
                RunCommand::Baseline(a) => (Scenario::Baseline, a),
                RunCommand::Heartbeat(a) => (Scenario::Heartbeat, a),
                RunCommand::Enroll(a) => (Scenario::Enroll, a),
                RunCommand::Reconnect(a) => (Scenario::Reconnect, a),
                RunCommand::Query(a) => (Scenario::Query, a),
                RunCommand::Filter(a) => (Scenario::Filter, a),
                RunCommand::All(a) => (Scenario::All, a),
            };
            // The load generator is one thread: the figures are the server's, per core.
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?
                .block_on(bench(scenario, args))
        }
    }
}

async fn bench(scenario: Scenario, args: Args) -> Result<()> {
    let cores = std::thread::available_parallelism().map_or(1, usize::from);
    let (server_cpu, load_cpu) = if args.no_pin {
        (None, None)
    } else if cores >= 2 {
        (
            Some(args.server_cpu.clone().unwrap_or_else(|| "0".into())),
            Some(args.load_cpu.clone().unwrap_or_else(|| "1".into())),
        )
    } else {
        (args.server_cpu.clone(), args.load_cpu.clone())
    };
    // A throwaway PostgreSQL server is started before pinning, so it runs unpinned.
    let mut database_url = args.database_url.clone();
    let _db = if args.store == StoreKind::Postgres && database_url.is_none() {
        let db = fleet_store_postgres::testing::TestDatabase::create()
            .await
            .context("starting a throwaway PostgreSQL server (or pass --database-url)")?;
        database_url = Some(db.url.clone());
        Some(db)
    } else {
        None
    };
    if let Some(cpus) = &load_cpu {
        fleet_examples::bench::procfs::pin(std::process::id(), cpus)?;
    }
    let quick = args.quick;
    let opts = Options {
        store: args.store,
        agents: args.agents,
        duration: if quick {
            Duration::from_secs(1)
        } else {
            Duration::try_from_secs_f64(args.duration)
                .ok()
                .filter(|d| *d >= Duration::from_millis(100) && *d <= Duration::from_secs(3600))
                .with_context(|| {
                    format!("--duration {}: give 0.1 to 3600 seconds", args.duration)
                })?
        },
        warmup: if quick {
            Duration::from_millis(300)
        } else {
            Duration::from_secs(1)
        },
        instances: args.instances,
        write_through: args.write_through,
        rate: match args.rate {
            Some(r) if !(r.is_finite() && r > 0.0) => bail!("--rate {r}: give a positive rate"),
            r => r,
        },
        quick,
        server_cpu: server_cpu.clone(),
        dir: args.dir.clone(),
        database_url,
        start_timeout: Duration::from_secs(args.timeout),
        query_clients: args.query_clients,
        filter: args.filter.clone(),
    };
    let machine = Machine::probe(cores, server_cpu, load_cpu);
    let reports =
        tokio::time::timeout(Duration::from_secs(args.timeout), run::run(scenario, &opts))
            .await
            .map_err(|_| {
                anyhow::anyhow!("the run took longer than --timeout {} s", args.timeout)
            })??;
    let date = fleet_core::Clock::now(&fleet_core::SystemClock).to_rfc3339();
    let mut failed = 0;
    for mut report in reports {
        failed += run::failures(&report);
        if let Some(map) = report.as_object_mut() {
            map.insert("machine".into(), serde_json::to_value(&machine)?);
            map.insert("date".into(), Value::String(date.clone()));
            map.insert("quick".into(), Value::Bool(quick));
        }
        if args.json {
            println!("{}", serde_json::to_string(&report)?);
        } else {
            print_human(&report);
        }
    }
    if failed > 0 {
        bail!("{failed} request(s) failed");
    }
    Ok(())
}

fn f(v: &Value, path: &[&str]) -> f64 {
    let mut cur = v;
    for p in path {
        match cur.get(p) {
            Some(next) => cur = next,
            None => return f64::NAN,
        }
    }
    cur.as_f64().unwrap_or(f64::NAN)
}

fn phase_line(name: &str, p: &Value) {
    println!(
        "  {name:<22} {:>10.0}/s  p50 {:>7.3} ms  p99 {:>7.3} ms  p99.9 {:>7.3} ms  server {:>6.1} µs CPU/op ({:>3.0} % of its core → {:>7.0}/s per core)  failed {}",
        f(p, &["rate"]),
        f(p, &["latency", "p50_ms"]),
        f(p, &["latency", "p99_ms"]),
        f(p, &["latency", "p999_ms"]),
        f(p, &["cpu_us_per_op"]),
        f(p, &["server_core_utilisation"]) * 100.0,
        f(p, &["capacity_per_core"]),
        p.get("failed").and_then(Value::as_u64).unwrap_or(0),
    );
    if let Some(e) = p.get("first_error").and_then(Value::as_str) {
        println!("  {:<22} first error: {e}", "");
    }
}

fn print_human(r: &Report) {
    let name = r.get("scenario").and_then(Value::as_str).unwrap_or("?");
    let m = &r["machine"];
    println!(
        "== {name} ({} cores, {}; server on CPU {}, load on CPU {}{})",
        m["cores"],
        m["cpu"].as_str().unwrap_or("?"),
        m["server_cpu"].as_str().unwrap_or("any"),
        m["load_cpu"].as_str().unwrap_or("any"),
        if r["quick"].as_bool() == Some(true) {
            "; quick"
        } else {
            ""
        },
    );
    match name {
        "baseline" => {
            phase_line("baseline, max", &r["max"]);
            phase_line(
                &format!("baseline, paced {:.0}/s", f(r, &["paced", "target_rate"])),
                &r["paced"]["phase"],
            );
        }
        "heartbeat" => {
            phase_line("baseline, max", &r["baseline"]);
            phase_line(
                &format!(
                    "baseline, paced {:.0}/s",
                    f(r, &["baseline_paced", "target_rate"])
                ),
                &r["baseline_paced"]["phase"],
            );
            phase_line("fleet, max", &r["max"]);
            phase_line(
                &format!("fleet, paced {:.0}/s", f(r, &["paced", "target_rate"])),
                &r["paced"]["phase"],
            );
            println!(
                "  heartbeat ÷ baseline {:.2}; {} connections, {} B requests; server RSS {:.1} MiB idle, {:.1} MiB peak",
                f(r, &["ratio_to_baseline"]),
                r["connections"],
                r["request_bytes"],
                f(r, &["server_rss_idle_mib"]),
                f(r, &["server_peak_rss_mib"]),
            );
        }
        "enroll" => {
            phase_line("enroll", &r["enroll"]);
            if r["csr_pool_exhausted"].as_bool() == Some(true) {
                println!("  (the pre-made CSRs ran out before the time did)");
            }
        }
        "reconnect" => {
            phase_line("reconnect + heartbeat", &r["reconnect"]);
            println!(
                "  {} agents; server restart {:.2} s; RSS per idle connection {:.1} KiB after the storm, {:.1} KiB opened one at a time ({})",
                r["agents"],
                f(r, &["restart_s"]),
                f(r, &["rss_per_idle_connection_kib"]),
                f(r, &["rss_per_idle_connection_steady_kib"]),
                r["steady_connections"],
            );
        }
        "query" => {
            println!(
                "  {} instances (populated in {:.1} s, view rebuilt in {:.2} s); live view {:.0} B/instance; server RSS {:.0} MiB",
                r["instances"],
                f(r, &["populate_s"]),
                f(r, &["open_s"]),
                f(r, &["live_view_bytes_per_instance"]),
                f(r, &["server_rss_mib"]),
            );
            if let Some(q) = r["queries"].as_object() {
                for (op, v) in q {
                    println!(
                        "  {op:<18} server p50 {:>8.3} ms  p99 {:>8.3} ms | client p50 {:>8.3} ms  p99 {:>8.3} ms  ({} requests, {} items)",
                        f(v, &["server", "p50_ms"]),
                        f(v, &["server", "p99_ms"]),
                        f(v, &["client", "p50_ms"]),
                        f(v, &["client", "p99_ms"]),
                        v["requests"],
                        v["items"],
                    );
                }
            }
        }
        "filter" => {
            println!(
                "  {} instances; {} operator clients of tenant {} sending a {} B filter (selects {}); heartbeats paced at {:.0}/s over {} connections",
                r["instances"],
                r["query_clients"],
                r["tenant"].as_str().unwrap_or("?"),
                r["filter_bytes"],
                r["filter_selects"],
                f(r, &["heartbeat_rate"]),
                r["connections"],
            );
            println!(
                "  one query alone        server p50 {:>8.3} ms  p99 {:>8.3} ms",
                f(r, &["query_alone", "server", "p50_ms"]),
                f(r, &["query_alone", "server", "p99_ms"]),
            );
            phase_line("heartbeats, idle", &r["idle"]);
            phase_line("heartbeats, filtering", &r["loaded"]);
            phase_line("heartbeats, idle again", &r["idle_after"]);
            let q = &r["queries"];
            println!(
                "  queries under load     {:>10.0}/s  client p50 {:>7.3} ms  p99 {:>7.3} ms  server p50 {:>7.3} ms  p99 {:>7.3} ms  failed {}",
                f(q, &["rate"]),
                f(q, &["client", "p50_ms"]),
                f(q, &["client", "p99_ms"]),
                f(q, &["server", "p50_ms"]),
                f(q, &["server", "p99_ms"]),
                q["failed"],
            );
            if let Some(e) = q.get("first_error").and_then(Value::as_str) {
                println!("  {:<22} first error: {e}", "");
            }
        }
        _ => {}
    }
    if let Some(goals) = r["goals"].as_array() {
        for g in goals {
            println!(
                "  goal {:<36} {:>8} measured {:>10.2}  {}",
                g["goal"].as_str().unwrap_or("?"),
                g["target"].as_str().unwrap_or("?"),
                g["measured"].as_f64().unwrap_or(f64::NAN),
                if g["met"].as_bool() == Some(true) {
                    "met"
                } else {
                    "MISSED"
                },
            );
        }
    }
}
