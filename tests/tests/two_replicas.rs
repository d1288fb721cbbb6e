//! Two control-plane replicas on one PostgreSQL database, each with its own agent server over
//! real mutual TLS on loopback: agents spread over both, both summaries converge, an agent that
//! moves from replica A to replica B keeps its identity, a command enqueued on A is delivered
//! through B, and when the sweeper replica dies the other takes the sweep over with no status
//! change recorded twice or lost.

use std::sync::Arc;
use std::time::Duration;

use fleet_agent_proto::HeartbeatRequest;
use fleet_agent_proto::client::{self, AgentClient, Endpoint};
use fleet_agent_proto::runner::CommandRunner;
use fleet_agent_proto::server::{AgentServer, ServerConfig, tls_config};
use fleet_core::command::CommandQuery;
use fleet_core::store::StatusChangeQuery;
use fleet_core::{
    Clock, CommandKind, CommandState, Filter, Fleet, InstanceId, ManualClock, MaxUses, NewCommand,
    NewToken, Status, SystemClock, SystemInfo, TenantScope,
};
use fleet_store_postgres::PgStore;
use fleet_store_postgres::testing::TestDatabase;
use tokio::net::TcpListener;

struct Replica {
    fleet: Fleet<PgStore>,
    endpoint: Endpoint,
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<()>,
}

async fn replica(url: &str, clock: &ManualClock) -> Replica {
    let store = PgStore::connect(url).await.expect("connect");
    store.migrate().await.expect("migrate");
    // Both replicas load the one CA the first of them stored. One manual clock decides status
    // on both (it starts at the real time: rustls checks certificates against that).
    let fleet = Fleet::builder(store)
        .key_encryption_key(fleet_core::testing::kek())
        .clock(clock.clone())
        .sweep_lag(Duration::from_secs(1))
        .open()
        .await
        .expect("open");
    let cert = fleet
        .ca()
        .issue_server(
            &["localhost".into()],
            SystemClock.now(),
            Duration::from_secs(3600),
        )
        .expect("server certificate");
    let tls = tls_config(fleet.ca().cert_der(), &cert).expect("tls");
    let server = Arc::new(AgentServer::new(
        fleet.clone(),
        tls,
        ServerConfig::default(),
    ));
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let endpoint = Endpoint {
        server_name: "localhost".into(),
        address: listener.local_addr().expect("addr").to_string(),
    };
    let (stop, rx) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        server
            .serve(listener, async {
                let _ = rx.await;
            })
            .await
            .expect("serve");
    });
    Replica {
        fleet,
        endpoint,
        stop,
        task,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_share_agents_identities_and_commands() {
    let db = TestDatabase::create_or_panic().await;
    let clock = ManualClock::new(SystemClock.now());
    let a = replica(&db.url, &clock).await;
    let b = replica(&db.url, &clock).await;
    let lease = Duration::from_secs(10);
    assert!(
        a.fleet.claim_sweeper(lease).await.expect("claim"),
        "a sweeps"
    );
    assert!(!b.fleet.claim_sweeper(lease).await.expect("claim"));
    assert_eq!(
        a.fleet.ca().fingerprint(),
        b.fleet.ca().fingerprint(),
        "one CA for the fleet"
    );
    let token = a
        .fleet
        .create_token(
            &TenantScope::All,
            NewToken {
                max_uses: MaxUses::Limited(6),
                ..NewToken::default()
            },
        )
        .await
        .expect("token");

    // Six agents enroll, alternately through A and B, and heartbeat where they enrolled.
    let mut agents = Vec::new();
    for i in 0..6 {
        let at = if i % 2 == 0 { &a } else { &b };
        let identity = client::enroll(
            &at.endpoint,
            &token.join,
            SystemInfo::with_hostname(format!("agent-{i}")),
            None,
        )
        .await
        .expect("enroll");
        let agent = AgentClient::new(at.endpoint.clone(), identity.clone()).expect("client");
        agent
            .heartbeat(&HeartbeatRequest::default())
            .await
            .expect("heartbeat");
        agents.push(identity);
    }
    for r in [&a, &b] {
        r.fleet.flush_heartbeats().await.expect("flush");
    }
    for r in [&a, &b] {
        r.fleet.sync().await.expect("sync");
    }
    let on_a = a.fleet.summary(&Filter::all(), &TenantScope::All);
    let on_b = b.fleet.summary(&Filter::all(), &TenantScope::All);
    assert_eq!((on_a.total, on_a.online), (6, 6), "{on_a:?}");
    assert_eq!((on_b.total, on_b.online), (6, 6), "{on_b:?}");

    // Agent 0 enrolled through A; a command is queued on A; the agent moves to B.
    let moved = &agents[0];
    let queued = a
        .fleet
        .enqueue(
            &TenantScope::All,
            NewCommand::for_instance(moved.instance_id, CommandKind::new("ping").expect("kind")),
        )
        .await
        .expect("enqueue");
    b.fleet.sync().await.expect("sync");
    let on_b_client = AgentClient::new(b.endpoint.clone(), moved.clone()).expect("client");
    let reply = on_b_client
        .heartbeat(&HeartbeatRequest::default())
        .await
        .expect("the same certificate works on B");
    assert_eq!(
        reply.commands.iter().map(|c| c.id).collect::<Vec<_>>(),
        vec![queued.commands[0].id],
        "the command queued on A arrives through B"
    );
    let mut runner = CommandRunner::new(|| serde_json::Value::Null);
    runner.run(&reply.commands);
    on_b_client
        .heartbeat(&HeartbeatRequest {
            command_results: runner.pending_results(),
            ..HeartbeatRequest::default()
        })
        .await
        .expect("result");
    let history = a
        .fleet
        .commands(
            &TenantScope::All,
            CommandQuery {
                instance: Some(moved.instance_id),
                limit: 10,
                ..CommandQuery::default()
            },
        )
        .await
        .expect("history");
    assert_eq!(
        history[0].state,
        CommandState::Succeeded,
        "A sees B's result"
    );
    let seen_on_b = b
        .fleet
        .get(&TenantScope::All, moved.instance_id)
        .expect("known to B");
    assert_eq!(seen_on_b.hostname, "agent-0", "same identity, same record");

    // Agent 3 (on B) goes quiet; the others keep heartbeating where they are. A, the sweeper,
    // records the warning; B, which received agent 3's last heartbeat, only follows.
    let heartbeat_all_but_3 = || async {
        for (i, id) in agents.iter().enumerate() {
            if i == 3 {
                continue;
            }
            let at = if i % 2 == 0 && i != 0 { &a } else { &b };
            AgentClient::new(at.endpoint.clone(), id.clone())
                .expect("client")
                .heartbeat(&HeartbeatRequest::default())
                .await
                .expect("heartbeat");
        }
    };
    let quiet = agents[3].instance_id;
    for _ in 0..5 {
        clock.advance(Duration::from_secs(15));
        heartbeat_all_but_3().await;
        for r in [&a, &b] {
            r.fleet.flush_heartbeats().await.expect("flush");
        }
        for r in [&a, &b] {
            r.fleet.sync().await.expect("sync");
            r.fleet.claim_sweeper(lease).await.expect("claim");
            r.fleet.sweep_report();
        }
    }
    for r in [&a, &b] {
        r.fleet.flush_heartbeats().await.expect("flush");
        assert_eq!(r.fleet.view().status(quiet), Some(Status::Warning));
    }
    let on_a = a.fleet.summary(&Filter::all(), &TenantScope::All);
    assert_eq!((on_a.online, on_a.warning), (5, 1), "{on_a:?}");

    // A dies. B takes the sweep over once A's lease ran out and records the offline.
    let _ = a.stop.send(());
    a.task.await.expect("stopped");
    drop(a.fleet);
    for _ in 0..20 {
        clock.advance(Duration::from_secs(15));
        for (i, id) in agents.iter().enumerate() {
            if i != 3 {
                AgentClient::new(b.endpoint.clone(), id.clone())
                    .expect("client")
                    .heartbeat(&HeartbeatRequest::default())
                    .await
                    .expect("heartbeat");
            }
        }
        b.fleet.flush_heartbeats().await.expect("flush");
        b.fleet.sync().await.expect("sync");
        b.fleet.claim_sweeper(lease).await.expect("claim");
        b.fleet.sweep_report();
    }
    assert!(b.fleet.is_sweeper(), "b took over");
    b.fleet.flush_heartbeats().await.expect("flush");
    let history = b
        .fleet
        .status_changes(
            &TenantScope::All,
            &StatusChangeQuery {
                limit: 100,
                ..StatusChangeQuery::default()
            },
        )
        .await
        .expect("history");
    let path: Vec<(InstanceId, Status, Status)> = history
        .iter()
        .rev()
        .map(|c| (c.instance, c.transition.from, c.transition.to))
        .collect();
    assert_eq!(
        path,
        vec![
            (quiet, Status::Online, Status::Warning),
            (quiet, Status::Warning, Status::Offline)
        ],
        "each change once, none lost, nobody else stale"
    );

    let _ = b.stop.send(());
    b.task.await.expect("stopped");
}
