//! In-process enrollment throughput: token check, CSR validation (with signature verification),
//! certificate signing and the MemoryStore commit, on one core.
//!
//! `taskset -c 1 cargo bench -p fleet-core --bench enroll`

use std::hint::black_box;
use std::time::Duration;

use criterion::{Criterion, criterion_group, criterion_main};
use fleet_core::{
    EnrollRequest, Fleet, ManualClock, MaxUses, MemoryStore, NewToken, SystemInfo, TenantScope,
    Timestamp,
};

const CSRS: usize = 2_000;

fn benches(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("runtime");
    let clock = ManualClock::new(Timestamp::from_unix_secs(1_790_000_000));
    let fleet = rt
        .block_on(
            Fleet::builder(MemoryStore::new())
                .clock(clock.clone())
                .open(),
        )
        .expect("fleet");
    let token = rt
        .block_on(fleet.create_token(
            &TenantScope::All,
            NewToken {
                max_uses: MaxUses::Unlimited,
                ..NewToken::default()
            },
        ))
        .expect("token")
        .presented
        .to_string();
    // Agents make their keys; the server's work starts at the CSR.
    let csrs: Vec<String> = (0..CSRS)
        .map(|_| {
            let key = rcgen::KeyPair::generate().expect("key");
            rcgen::CertificateParams::default()
                .serialize_request(&key)
                .expect("csr")
                .pem()
                .expect("pem")
        })
        .collect();
    let mut i = 0usize;
    c.bench_function("enroll_p256_memory_store", |b| {
        b.iter(|| {
            if i.is_multiple_of(CSRS) {
                // Past the retry window, so a reused CSR is a new enrollment, not a retry.
                clock.advance(Duration::from_secs(601));
            }
            let req = EnrollRequest {
                token: token.clone(),
                csr_pem: csrs[i % CSRS].clone(),
                system: SystemInfo::with_hostname(format!("node-{i}")),
                ..EnrollRequest::default()
            };
            i += 1;
            black_box(rt.block_on(fleet.enroll(req)).expect("enroll"));
        });
    });
}

criterion_group!(enroll, benches);
criterion_main!(enroll);
