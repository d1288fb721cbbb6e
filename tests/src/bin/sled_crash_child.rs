//! The victim of the sled crash test (`tests/tests/sled_crash.rs`): runs mixed load against a
//! SledStore until it is killed with SIGKILL, printing one line per acknowledged operation.
//!
//! Usage: `sled-crash-child <store-dir> <seed>`. Operations run one at a time, so at most one is
//! in flight when the kill lands; it is announced with an `INTENT` line before it starts. Lines:
//!
//! ```text
//! READY
//! TOKEN <id> <max-uses>
//! INTENT ENROLL <token>          ENROLL <token> <instance> <serial>     EXHAUSTED <token>
//! INTENT TAG <instance> <v>      TAG <instance> <v>
//! INTENT DEL <instance>          DEL <instance> <serial>
//! HB <instance> <unix-ms>
//! FLUSHED                        (every HB line above it is persisted)
//! ```

use std::io::Write;
use std::time::{Duration, Instant};

use fleet_core::store::InstanceStore;
use fleet_core::testing::key_and_csr;
use fleet_core::{
    EnrollError, EnrollRequest, Filter, Fleet, Heartbeat, MaxUses, MetricsSample, NewToken,
    SystemInfo, Tags, TenantScope,
};
use fleet_store_sled::SledStore;

/// How often heartbeats are flushed to the store.
const FLUSH_EVERY: Duration = Duration::from_millis(100);
/// The child stops by itself after this long, should nobody kill it.
const MAX_RUN: Duration = Duration::from_secs(30);

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        // xorshift64*
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

fn say(line: &str) {
    let mut out = std::io::stdout().lock();
    // A failed write means the parent is gone; there is nobody left to report to.
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let dir = args
        .next()
        .ok_or("usage: sled-crash-child <store-dir> <seed>")?;
    let seed: u64 = args.next().ok_or("missing seed")?.parse()?;
    let mut rng = Rng(seed | 1);

    let store = SledStore::open(&dir).await?;
    let fleet = Fleet::builder(store)
        .key_encryption_key(fleet_core::testing::kek())
        .open()
        .await?;
    say("READY");
    let token = fleet
        .create_token(
            &TenantScope::All,
            NewToken {
                max_uses: MaxUses::Limited(8),
                ..NewToken::default()
            },
        )
        .await?;
    say(&format!("TOKEN {} 8", token.token.id));
    let presented = token.presented.to_string();

    let started = Instant::now();
    let mut last_flush = Instant::now();
    let mut tag_counter = seed % 1_000_000 * 1000;
    while started.elapsed() < MAX_RUN {
        if last_flush.elapsed() >= FLUSH_EVERY {
            fleet.flush_heartbeats().await?;
            say("FLUSHED");
            last_flush = Instant::now();
        }
        let ids = fleet.view().matching(&Filter::all(), &TenantScope::All);
        match rng.below(10) {
            0..=3 => {
                say(&format!("INTENT ENROLL {}", token.token.id));
                let req = EnrollRequest {
                    token: presented.clone(),
                    csr_pem: key_and_csr().1,
                    system: SystemInfo::with_hostname(format!(
                        "crash-{seed}-{}",
                        rng.next() % 10_000
                    )),
                    ..EnrollRequest::default()
                };
                match fleet.enroll(req).await {
                    Ok(e) => say(&format!(
                        "ENROLL {} {} {}",
                        token.token.id, e.instance, e.certificate.record.serial
                    )),
                    Err(EnrollError::TokenExhausted) => {
                        say(&format!("EXHAUSTED {}", token.token.id));
                    }
                    Err(e) => return Err(e.into()),
                }
            }
            4 | 5 if !ids.is_empty() => {
                let id = ids[rng.below(ids.len())];
                tag_counter += 1;
                say(&format!("INTENT TAG {id} {tag_counter}"));
                fleet
                    .set_tags(
                        &TenantScope::All,
                        id,
                        Tags::from_pairs([("v", tag_counter.to_string())])?,
                    )
                    .await?;
                say(&format!("TAG {id} {tag_counter}"));
            }
            6 if ids.len() > 10 => {
                let id = ids[rng.below(ids.len())];
                let serial = fleet
                    .store()
                    .get_instance(id)
                    .await?
                    .and_then(|i| i.certificate)
                    .map(|c| c.serial.to_string());
                say(&format!("INTENT DEL {id}"));
                fleet.deregister(&TenantScope::All, id).await?;
                say(&format!(
                    "DEL {id} {}",
                    serial.unwrap_or_else(|| "-".into())
                ));
            }
            _ if !ids.is_empty() => {
                let id = ids[rng.below(ids.len())];
                let metrics = MetricsSample {
                    cpu_percent: Some(rng.below(1000) as f64 / 10.0),
                    ..MetricsSample::default()
                };
                let ack = fleet.heartbeat(
                    id,
                    Heartbeat {
                        metrics: Some(metrics),
                        apps: None,
                    },
                )?;
                let _ = ack;
                let seen = fleet
                    .get(&TenantScope::All, id)
                    .map(|v| v.last_seen.as_unix_millis())
                    .unwrap_or(0);
                say(&format!("HB {id} {seen}"));
            }
            _ => tokio::task::yield_now().await,
        }
    }
    Ok(())
}
