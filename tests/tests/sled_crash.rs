//! Crash test of the sled store: a child process runs mixed load (enrollments, tag edits,
//! deregistrations, heartbeats) and is killed with SIGKILL at a random moment, 20 times
//! (`FLEET_CRASH_ITERATIONS` for more) on the same store. After every kill the store reopens and:
//!
//! - no acknowledged enrollment, tag edit, deregistration/revocation or token use is lost;
//! - no token is used more than its limit, and no instance exists that was never enrolled;
//! - the rebuilt live view's summary equals a recount from the store;
//! - every heartbeat acknowledged before the last completed flush is persisted (the loss is at
//!   most one flush interval).

use std::collections::{HashMap, HashSet};
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use fleet_core::staleness::Status;
use fleet_core::{Filter, Fleet, InstanceId, TenantScope};
use fleet_store_sled::SledStore;

#[derive(Debug, Default)]
struct Expected {
    tokens: HashMap<String, u32>,
    enrolled: HashMap<String, Vec<InstanceId>>,
    exhausted: HashSet<String>,
    alive: HashSet<InstanceId>,
    deleted: HashMap<InstanceId, String>,
    tags: HashMap<InstanceId, u64>,
    persisted_hb: HashMap<InstanceId, i64>,
}

/// What the in-flight operation was when the kill landed.
#[derive(Debug, Clone, PartialEq)]
enum InFlight {
    None,
    Enroll(String),
    Tag(InstanceId, u64),
    Del(InstanceId),
}

fn run_child(dir: &std::path::Path, seed: u64, kill_after: Duration) -> Vec<String> {
    let mut child = Command::new(env!("CARGO_BIN_EXE_sled-crash-child"))
        .arg(dir)
        .arg(seed.to_string())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn the crash child");
    let stdout = child.stdout.take().expect("stdout");
    let (tx, rx) = mpsc::channel();
    let reader = std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let mut lines = Vec::new();
    // Wait for READY (the store is open), then let it run for `kill_after`.
    let ready_deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match rx.recv_timeout(Duration::from_millis(100)) {
            Ok(l) => {
                let ready = l == "READY";
                lines.push(l);
                if ready {
                    break;
                }
            }
            Err(mpsc::RecvTimeoutError::Timeout) if Instant::now() < ready_deadline => {}
            Err(e) => {
                let _ = child.kill();
                panic!("the child did not get ready ({e:?}); it printed {lines:?}");
            }
        }
    }
    std::thread::sleep(kill_after);
    child.kill().expect("SIGKILL the child");
    let status = child.wait().expect("wait");
    assert!(!status.success(), "the child must have been killed");
    reader.join().expect("reader");
    lines.extend(rx.try_iter());
    lines
}

fn apply(expected: &mut Expected, lines: &[String]) -> InFlight {
    let mut in_flight = InFlight::None;
    let mut hb_since_flush: HashMap<InstanceId, i64> = HashMap::new();
    for line in lines {
        let parts: Vec<&str> = line.split(' ').collect();
        let id = |i: usize| parts[i].parse::<InstanceId>().expect("instance id");
        match parts.as_slice() {
            ["READY"] => {}
            ["FLUSHED"] => {
                for (i, t) in hb_since_flush.drain() {
                    expected.persisted_hb.insert(i, t);
                }
            }
            ["TOKEN", t, max] => {
                expected
                    .tokens
                    .insert((*t).to_string(), max.parse().expect("max"));
            }
            ["INTENT", "ENROLL", t] => in_flight = InFlight::Enroll((*t).to_string()),
            ["INTENT", "TAG", _, v] => in_flight = InFlight::Tag(id(2), v.parse().expect("v")),
            ["INTENT", "DEL", _] => in_flight = InFlight::Del(id(2)),
            ["ENROLL", t, _, _] => {
                expected
                    .enrolled
                    .entry((*t).to_string())
                    .or_default()
                    .push(id(2));
                expected.alive.insert(id(2));
                in_flight = InFlight::None;
            }
            ["EXHAUSTED", t] => {
                expected.exhausted.insert((*t).to_string());
                in_flight = InFlight::None;
            }
            ["TAG", _, v] => {
                expected.tags.insert(id(1), v.parse().expect("v"));
                in_flight = InFlight::None;
            }
            ["DEL", _, serial] => {
                expected.alive.remove(&id(1));
                expected.deleted.insert(id(1), (*serial).to_string());
                expected.persisted_hb.remove(&id(1));
                hb_since_flush.remove(&id(1));
                in_flight = InFlight::None;
            }
            ["HB", _, ms] => {
                hb_since_flush.insert(id(1), ms.parse().expect("ms"));
            }
            _ => panic!("unexpected line from the child: {line:?}"),
        }
    }
    in_flight
}

async fn verify(dir: &std::path::Path, expected: &Expected, in_flight: &InFlight) {
    let store = SledStore::open(dir).await.expect("reopen after SIGKILL");
    let fleet = Fleet::builder(store)
        .key_encryption_key(fleet_core::testing::kek())
        .open()
        .await
        .expect("rebuild the live view");
    let store = fleet.store();

    // Instances: every acknowledged enrollment survives unless deleted; nothing unexpected.
    let mut listed = HashMap::new();
    let mut after = None;
    loop {
        let page = fleet_core::store::InstanceStore::list_instances(store, after, 500)
            .await
            .expect("list");
        let Some(last) = page.last().map(|i| i.id) else {
            break;
        };
        for i in page {
            listed.insert(i.id, i);
        }
        after = Some(last);
    }
    for id in &expected.alive {
        let gone_in_flight = *in_flight == InFlight::Del(*id);
        assert!(
            listed.contains_key(id) || gone_in_flight,
            "acknowledged enrollment {id} was lost"
        );
    }
    for (id, serial) in &expected.deleted {
        assert!(
            !listed.contains_key(id),
            "acknowledged deregistration of {id} was lost"
        );
        if serial != "-" {
            let revoked = fleet_core::store::CertificateStore::revoked_certificates(store)
                .await
                .expect("revoked");
            assert!(
                revoked.iter().any(|r| r.serial.to_string() == *serial),
                "revocation of {serial} was lost"
            );
        }
    }
    let unexpected: Vec<_> = listed
        .keys()
        .filter(|id| !expected.alive.contains(id))
        .collect();
    let allowed = usize::from(matches!(in_flight, InFlight::Enroll(_)));
    assert!(
        unexpected.len() <= allowed,
        "instances nobody enrolled: {unexpected:?} (in flight: {in_flight:?})"
    );

    // Token uses: never over the limit, never fewer than acknowledged.
    for (t, max) in &expected.tokens {
        let id = fleet_core::TokenId::new(t.clone()).expect("token id");
        let token = fleet_core::store::TokenStore::get_token(store, &id)
            .await
            .expect("get")
            .expect("acknowledged token lost");
        let acked = expected.enrolled.get(t).map_or(0, Vec::len) as u32;
        let maybe = u32::from(*in_flight == InFlight::Enroll(t.clone()));
        assert!(
            token.uses <= *max,
            "token {t} used {} times, limit {max}",
            token.uses
        );
        assert!(
            token.uses >= acked && token.uses <= acked + maybe,
            "token {t}: {} uses stored, {acked} acknowledged",
            token.uses
        );
    }

    // Tag edits: the last acknowledged value (or the one in flight).
    for (id, v) in &expected.tags {
        let Some(inst) = listed.get(id) else { continue };
        let stored: u64 = inst
            .tags
            .get("v")
            .map(|v| v.as_str().parse().expect("v"))
            .unwrap_or(0);
        let in_flight_value = match in_flight {
            InFlight::Tag(i, x) if i == id => Some(*x),
            _ => None,
        };
        assert!(
            stored == *v || Some(stored) == in_flight_value,
            "{id}: tag v={stored}, acknowledged {v}"
        );
    }

    // Heartbeats acknowledged before the last completed flush are persisted.
    for (id, ms) in &expected.persisted_hb {
        let Some(inst) = listed.get(id) else { continue };
        assert!(
            inst.last_seen.as_unix_millis() >= *ms,
            "{id}: last seen {} lost (flushed {ms})",
            inst.last_seen
        );
    }

    // The rebuilt live view's summary equals a recount from the store.
    let summary = fleet.summary(&Filter::all(), &TenantScope::All);
    let policy = fleet.policy();
    let now = fleet.now();
    let mut counts = [0u64; 3];
    for inst in listed.values() {
        let s = policy.status_at(inst.last_seen, now);
        counts[Status::ALL.iter().position(|x| *x == s).expect("status")] += 1;
    }
    assert_eq!(summary.total, listed.len() as u64);
    assert_eq!(
        [summary.online, summary.warning, summary.offline],
        counts,
        "summary differs from a recount"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sled_store_survives_sigkill() {
    let iterations: u64 = std::env::var("FLEET_CRASH_ITERATIONS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20);
    let dir = tempfile::tempdir().expect("temp dir");
    let store_dir = dir.path().join("db");
    let mut expected = Expected::default();
    let mut seed = u64::from(std::process::id()) ^ 0x9E37_79B9_7F4A_7C15;
    let started = Instant::now();
    for i in 0..iterations {
        seed = seed
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        let kill_after = Duration::from_millis(50 + (seed >> 33) % 400);
        let dir_for_child = store_dir.clone();
        let lines =
            tokio::task::spawn_blocking(move || run_child(&dir_for_child, seed, kill_after))
                .await
                .expect("child");
        let in_flight = apply(&mut expected, &lines);
        verify(&store_dir, &expected, &in_flight).await;
        eprintln!(
            "iteration {i}: killed after {kill_after:?}, {} lines, {} instances alive, in flight {in_flight:?}",
            lines.len(),
            expected.alive.len()
        );
        // The in-flight operation may or may not have landed; settle the expectations from the
        // store so that the next round starts from what is actually there.
        settle(&store_dir, &mut expected, &in_flight).await;
    }
    eprintln!("{iterations} kills in {:?}", started.elapsed());
    assert!(
        !expected.alive.is_empty(),
        "the load must have enrolled something"
    );
}

async fn settle(dir: &std::path::Path, expected: &mut Expected, in_flight: &InFlight) {
    let store = SledStore::open(dir).await.expect("reopen");
    match in_flight {
        InFlight::None => {}
        InFlight::Enroll(t) => {
            let count = fleet_core::store::InstanceStore::count_instances(&store)
                .await
                .expect("count") as usize;
            if count > expected.alive.len() {
                let mut after = None;
                loop {
                    let page = fleet_core::store::InstanceStore::list_instances(&store, after, 500)
                        .await
                        .expect("list");
                    let Some(last) = page.last().map(|i| i.id) else {
                        break;
                    };
                    for i in page {
                        if expected.alive.insert(i.id) {
                            expected.enrolled.entry(t.clone()).or_default().push(i.id);
                        }
                    }
                    after = Some(last);
                }
            }
        }
        InFlight::Tag(id, v) => {
            let inst = fleet_core::store::InstanceStore::get_instance(&store, *id)
                .await
                .expect("get");
            if inst
                .and_then(|i| i.tags.get("v").map(|x| x.as_str() == v.to_string()))
                .unwrap_or(false)
            {
                expected.tags.insert(*id, *v);
            }
        }
        InFlight::Del(id) => {
            if fleet_core::store::InstanceStore::get_instance(&store, *id)
                .await
                .expect("get")
                .is_none()
            {
                expected.alive.remove(id);
                expected.deleted.insert(*id, "-".into());
                expected.persisted_hb.remove(id);
            }
        }
    }
}
