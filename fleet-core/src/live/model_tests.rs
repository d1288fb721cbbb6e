//! Model-based property test: after any sequence of registrations, heartbeats, tag/group edits,
//! deletions, clock moves and sweeps, the live view's summaries, filtered lists and lookups equal
//! a naive recomputation over all instances.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::time::Duration;

use proptest::prelude::*;

use super::query::{self, ArenaMode, Tuning};
use super::{Cursor, LiveView};
use crate::filter::{Filter, TagSelector, Term};
use crate::metrics::{CounterReading, MetricsSample, NetworkRates};
use crate::staleness::{Event, StalenessPolicy, StalenessState, Status};
use crate::summary::{Accumulator, Contribution};
use crate::{
    GroupName, Groups, Instance, InstanceId, SystemInfo, TagKey, TagValue, Tags, TenantId,
    TenantScope, Timestamp,
};

const T0: i64 = 1_700_000_000_000;

#[derive(Debug, Clone)]
enum Op {
    Register {
        host: u8,
        tenant: Option<u8>,
        tags: Vec<(u8, u8)>,
        groups: Vec<u8>,
    },
    Heartbeat {
        who: usize,
        metrics: Option<(Option<u16>, Option<u32>, u64, u64)>,
    },
    SetTags {
        who: usize,
        tags: Vec<(u8, u8)>,
    },
    SetGroups {
        who: usize,
        groups: Vec<u8>,
    },
    Delete {
        who: usize,
    },
    Advance {
        ms: u32,
    },
    ClockBack {
        ms: u32,
    },
    Sweep,
}

const KEYS: [&str; 3] = ["env", "tier", "example.com/team"];
const VALUES: [&str; 3] = ["prod", "dev", "x"];
const HOSTS: [&str; 4] = ["web-01", "Web-02", "db-1", "cache"];

fn op() -> impl Strategy<Value = Op> {
    let tags = || prop::collection::vec((0u8..3, 0u8..3), 0..3);
    let groups = || prop::collection::vec(0u8..3, 0..3);
    prop_oneof![
        3 => (0u8..4, prop::option::of(0u8..3), tags(), groups())
            .prop_map(|(host, tenant, tags, groups)| Op::Register { host, tenant, tags, groups }),
        6 => (any::<usize>(), prop::option::of((prop::option::of(0u16..=1000), prop::option::of(0u32..1000), 0u64..10_000, 0u64..10_000)))
            .prop_map(|(who, metrics)| Op::Heartbeat { who, metrics }),
        1 => (any::<usize>(), tags()).prop_map(|(who, tags)| Op::SetTags { who, tags }),
        1 => (any::<usize>(), groups()).prop_map(|(who, groups)| Op::SetGroups { who, groups }),
        1 => any::<usize>().prop_map(|who| Op::Delete { who }),
        4 => (0u32..200_000).prop_map(|ms| Op::Advance { ms }),
        1 => (0u32..100_000).prop_map(|ms| Op::ClockBack { ms }),
        3 => Just(Op::Sweep),
    ]
}

fn term() -> impl Strategy<Value = Term> {
    let k = || (0usize..3).prop_map(|i| TagKey::new(KEYS[i]).unwrap());
    let v = || (0usize..3).prop_map(|i| TagValue::new(VALUES[i]).unwrap());
    prop_oneof![
        prop::collection::vec(
            prop_oneof![
                Just(Status::Online),
                Just(Status::Warning),
                Just(Status::Offline)
            ],
            1..3
        )
        .prop_map(Term::Status),
        prop::collection::vec(
            (0u8..4).prop_map(|g| GroupName::new(format!("g{g}")).unwrap()),
            1..3
        )
        .prop_map(Term::Group),
        prop::collection::vec(
            (0u8..4).prop_map(|t| TenantId::new(format!("t{t}")).unwrap()),
            1..3
        )
        .prop_map(Term::Tenant),
        prop::collection::vec(
            prop_oneof![
                Just("web"),
                Just("WEB-0"),
                Just("10.0.0.1"),
                Just("-1"),
                Just("zzz")
            ],
            1..3
        )
        .prop_map(|v| Term::Text(v.into_iter().map(String::from).collect())),
        k().prop_map(|k| Term::Tag(TagSelector::Exists(k))),
        k().prop_map(|k| Term::Tag(TagSelector::Absent(k))),
        (k(), v()).prop_map(|(k, v)| Term::Tag(TagSelector::Eq(k, v))),
        (k(), v()).prop_map(|(k, v)| Term::Tag(TagSelector::NotEq(k, v))),
        (k(), prop::collection::vec(v(), 1..3)).prop_map(|(k, v)| Term::Tag(TagSelector::In(k, v))),
        (k(), prop::collection::vec(v(), 1..3))
            .prop_map(|(k, v)| Term::Tag(TagSelector::NotIn(k, v))),
    ]
}

fn filter() -> impl Strategy<Value = Filter> {
    prop::collection::vec(term(), 0..3).prop_map(|t| t.into_iter().fold(Filter::all(), Filter::and))
}

fn scope() -> impl Strategy<Value = TenantScope> {
    prop_oneof![
        2 => Just(TenantScope::All),
        1 => (0u8..4).prop_map(|t| TenantScope::Tenant(TenantId::new(format!("t{t}")).unwrap())),
    ]
}

fn make_tags(pairs: &[(u8, u8)]) -> Tags {
    Tags::from_pairs(
        pairs
            .iter()
            .map(|&(k, v)| (KEYS[k as usize], VALUES[v as usize])),
    )
    .unwrap()
}

fn make_groups(gs: &[u8]) -> Groups {
    Groups::from_names(gs.iter().map(|g| format!("g{g}"))).unwrap()
}

/// The naive model of one instance.
#[derive(Debug, Clone)]
struct Model {
    inst: Instance,
    state: StalenessState,
    sample: Option<MetricsSample>,
    sampled_at: Timestamp,
    rates: NetworkRates,
}

impl Model {
    fn contribution(&self) -> Contribution {
        Contribution::from_sample(self.state.status, self.sample.as_ref(), self.rates)
    }
}

/// Ways of stepping a query: the default, a step per instance (arena searched or not), and small
/// steps.
const TUNINGS: [Tuning; 5] = [
    Tuning::DEFAULT,
    Tuning {
        budget: 1,
        arena: ArenaMode::Never,
    },
    Tuning {
        budget: 1,
        arena: ArenaMode::Always,
    },
    Tuning {
        budget: 1,
        arena: ArenaMode::Auto,
    },
    Tuning {
        budget: 40,
        arena: ArenaMode::Auto,
    },
];

fn check(
    view: &LiveView,
    models: &BTreeMap<InstanceId, Model>,
    f: &Filter,
    scope: &TenantScope,
) -> Result<(), TestCaseError> {
    for tuning in TUNINGS {
        check_tuned(view, models, f, scope, tuning)?;
    }
    Ok(())
}

fn check_tuned(
    view: &LiveView,
    models: &BTreeMap<InstanceId, Model>,
    f: &Filter,
    scope: &TenantScope,
    tuning: Tuning,
) -> Result<(), TestCaseError> {
    let mut acc = Accumulator::default();
    let mut want_ids = Vec::new();
    for m in models.values() {
        if scope.allows(m.inst.tenant.as_ref()) && f.matches(&m.inst, m.state.status) {
            acc.add(&m.contribution());
            want_ids.push(m.inst.id);
        }
    }
    prop_assert_eq!(
        query::summary(view, f, scope, tuning),
        acc.finish(),
        "summary of {} in {:?} ({:?})",
        f,
        scope,
        tuning
    );
    let mut matching = query::matching(view, f, scope, tuning);
    matching.sort();
    let mut want_sorted = want_ids.clone();
    want_sorted.sort();
    prop_assert_eq!(matching, want_sorted, "matching {} in {:?}", f, scope);
    // Every page, following cursors with a small page size.
    let mut got_ids = Vec::new();
    let mut cursor: Option<Cursor> = None;
    loop {
        let page = query::list(view, f, scope, cursor, 2, tuning);
        for item in &page.items {
            let m = &models[&item.id];
            prop_assert_eq!(item.status, m.state.status);
            prop_assert_eq!(&item.tags, &m.inst.tags);
            prop_assert_eq!(&item.groups, &m.inst.groups);
            prop_assert_eq!(&item.hostname, &m.inst.system.hostname);
            prop_assert_eq!(&item.ip_addresses, &m.inst.system.ip_addresses);
            prop_assert_eq!(&item.tenant, &m.inst.tenant);
            prop_assert_eq!(item.last_seen, m.state.last_heartbeat);
        }
        got_ids.extend(page.items.iter().map(|i| i.id));
        match page.next_cursor {
            Some(c) => cursor = Some(c),
            None => break,
        }
    }
    let n = got_ids.len();
    got_ids.sort();
    got_ids.dedup();
    prop_assert_eq!(n, got_ids.len(), "a list returned an instance twice");
    want_ids.sort();
    prop_assert_eq!(got_ids, want_ids, "list of {} in {:?}", f, scope);
    Ok(())
}

fn run(
    ops: Vec<Op>,
    filters: Vec<(Filter, TenantScope)>,
    recovery: u32,
) -> Result<(), TestCaseError> {
    let policy = StalenessPolicy {
        warning_after: Duration::from_secs(60),
        offline_after: Duration::from_secs(300),
        heartbeat_interval: None,
        recovery_heartbeats: recovery,
    };
    let mut view = LiveView::new(policy.clone()).unwrap();
    let mut models: BTreeMap<InstanceId, Model> = BTreeMap::new();
    let mut order: Vec<InstanceId> = Vec::new();
    let mut now = T0;
    let mut seq = 0;
    let pick =
        |order: &Vec<InstanceId>, who: usize| (!order.is_empty()).then(|| order[who % order.len()]);
    for op in ops {
        let at = Timestamp::from_unix_millis(now);
        match op {
            Op::Register {
                host,
                tenant,
                tags,
                groups,
            } => {
                let n = models.len() as u8;
                let inst = Instance {
                    id: InstanceId::random(),
                    tenant: tenant.map(|t| TenantId::new(format!("t{t}")).unwrap()),
                    system: SystemInfo {
                        hostname: HOSTS[host as usize].to_string(),
                        ip_addresses: vec![
                            IpAddr::from([10, 0, 0, n]),
                            IpAddr::from([0xfe80, 0, 0, 0, 0, 0, 0, u16::from(n)]),
                        ],
                        ..SystemInfo::default()
                    },
                    tags: make_tags(&tags),
                    groups: make_groups(&groups),
                    registered_at: at,
                    last_seen: at,
                    metrics: None,
                    apps: Vec::new(),
                    certificate: None,
                    next_certificate: None,
                };
                seq += 1;
                prop_assert!(view.upsert(&inst, seq, at));
                order.push(inst.id);
                models.insert(
                    inst.id,
                    Model {
                        inst,
                        state: StalenessState::new(at),
                        sample: None,
                        sampled_at: at,
                        rates: NetworkRates::default(),
                    },
                );
            }
            Op::Heartbeat { who, metrics } => {
                let Some(id) = pick(&order, who) else {
                    continue;
                };
                let sample = metrics.map(|(cpu, mem, rx, tx)| MetricsSample {
                    cpu_percent: cpu.map(|c| f64::from(c) / 10.0),
                    memory_used_bytes: mem.map(u64::from),
                    memory_total_bytes: mem.map(|m| u64::from(m) * 2),
                    network_rx_bytes: Some(rx),
                    network_tx_bytes: Some(tx),
                    ..MetricsSample::default()
                });
                let got = view.heartbeat(id, at, sample.as_ref());
                let m = models.get_mut(&id).unwrap();
                let (state, tr) = policy.step(m.state, Event::Heartbeat, at);
                prop_assert_eq!(got, Some(tr));
                m.state = state;
                if let Some(s) = sample {
                    let prev = m.sample.as_ref().map(|p| CounterReading {
                        at: m.sampled_at,
                        rx: p.network_rx_bytes,
                        tx: p.network_tx_bytes,
                    });
                    m.rates = prev.map_or_else(NetworkRates::default, |p| {
                        NetworkRates::between(
                            p,
                            CounterReading {
                                at,
                                rx: s.network_rx_bytes,
                                tx: s.network_tx_bytes,
                            },
                        )
                    });
                    m.sample = Some(s);
                    m.sampled_at = at;
                }
            }
            Op::SetTags { who, tags } => {
                let Some(id) = pick(&order, who) else {
                    continue;
                };
                let tags = make_tags(&tags);
                seq += 1;
                prop_assert!(view.set_labels(id, Some(&tags), None, seq));
                // An outdated version changes nothing.
                prop_assert!(!view.set_labels(id, Some(&Tags::new()), None, seq - 1));
                models.get_mut(&id).unwrap().inst.tags = tags;
            }
            Op::SetGroups { who, groups } => {
                let Some(id) = pick(&order, who) else {
                    continue;
                };
                let groups = make_groups(&groups);
                seq += 1;
                prop_assert!(view.set_labels(id, None, Some(&groups), seq));
                models.get_mut(&id).unwrap().inst.groups = groups;
            }
            Op::Delete { who } => {
                let Some(id) = pick(&order, who) else {
                    continue;
                };
                seq += 1;
                prop_assert!(view.remove(id, seq));
                prop_assert!(!view.remove(id, seq));
                order.retain(|x| *x != id);
                models.remove(&id);
            }
            Op::Advance { ms } => now += i64::from(ms),
            Op::ClockBack { ms } => now -= i64::from(ms),
            Op::Sweep => {
                let mut changes = view.sweep(at);
                for m in models.values_mut() {
                    let (state, tr) = policy.step(m.state, Event::Tick, at);
                    for t in tr {
                        let pos = changes
                            .iter()
                            .position(|c| c.instance == m.inst.id && c.transition == t);
                        prop_assert!(pos.is_some(), "sweep missed {:?} of {}", t, m.inst.id);
                        if let Some(p) = pos {
                            changes.remove(p);
                        }
                    }
                    m.state = state;
                }
                prop_assert!(
                    changes.is_empty(),
                    "sweep reported changes the model did not: {:?}",
                    changes
                );
            }
        }
        prop_assert_eq!(view.len(), models.len());
        for (id, m) in &models {
            prop_assert_eq!(view.status(*id), Some(m.state.status));
        }
    }
    for (f, scope) in &filters {
        check(&view, &models, f, scope)?;
    }
    check(&view, &models, &Filter::all(), &TenantScope::All)?;
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn live_view_equals_naive_recomputation(
        ops in prop::collection::vec(op(), 1..60),
        filters in prop::collection::vec((filter(), scope()), 1..6),
        recovery in prop_oneof![3 => Just(1u32), 1 => Just(2u32)],
    ) {
        run(ops, filters, recovery)?;
    }
}
