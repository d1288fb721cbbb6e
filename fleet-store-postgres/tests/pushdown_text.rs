//! `text:` terms pushed down to SQL fold and match exactly as the live view does — on any
//! Unicode, not only ASCII — and so do tag and group terms (exact, case-sensitive).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::str::FromStr;
use std::sync::Arc;

use fleet_core::live::searchable_text;
use fleet_core::store::InstanceStore;
use fleet_core::testing::{T0, instance};
use fleet_core::{
    Filter, Fleet, Instance, InstanceId, LiveView, StalenessPolicy, Status, TagSelector, TagValue,
    Tags, TenantScope,
};
use fleet_store_postgres::PgStore;
use fleet_store_postgres::sqlx;
use fleet_store_postgres::sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use fleet_store_postgres::testing::TestDatabase;
use proptest::prelude::*;
use proptest::sample::Index;
use proptest::test_runner::{Config, TestCaseError, TestRunner};

/// Every id `filter` selects, paged through `list_matching` `page` at a time.
async fn pushed_down(store: &PgStore, filter: &Filter, page: usize) -> Vec<InstanceId> {
    let mut ids = Vec::new();
    let mut after = None;
    loop {
        let got = store
            .list_matching(filter, &TenantScope::All, after, page)
            .await
            .unwrap_or_else(|e| panic!("list_matching {filter:?}: {e} ({e:?})"));
        let Some(last) = got.last().map(|i| i.id) else {
            return ids;
        };
        ids.extend(got.iter().map(|i| i.id));
        after = Some(last);
    }
}

/// What a live view built from the store's records (as `Fleet::open` builds it) selects.
async fn live(store: &PgStore, filter: &Filter) -> Vec<InstanceId> {
    let mut view = LiveView::new(StalenessPolicy::default()).expect("policy");
    let mut after = None;
    loop {
        let page = store.list_instances(after, 500).await.expect("list");
        let Some(last) = page.last().map(|i| i.id) else {
            break;
        };
        for inst in &page {
            view.upsert(inst, 1, T0);
        }
        after = Some(last);
    }
    let mut ids = view.matching(filter, &TenantScope::All);
    ids.sort();
    ids
}

async fn fresh_store() -> (TestDatabase, Arc<PgStore>) {
    let db = TestDatabase::create_or_panic().await;
    let store = PgStore::connect(&db.url).await.expect("connect");
    store.migrate().await.expect("migrate");
    (db, Arc::new(store))
}

fn host(n: u32, hostname: &str) -> Instance {
    let mut inst = instance(n);
    inst.system.hostname = hostname.to_owned();
    inst
}

/// The defect the outside attack found: `ILIKE` folds with the database's locale, the live view
/// with Rust's `str::to_lowercase`; on non-ASCII text they disagree.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn non_ascii_text_is_folded_as_the_live_view_folds_it() {
    let (_db, store) = fresh_store().await;
    let hosts = [
        "STRASSE-ß",
        "STRAẞE",
        "İstanbul",
        "istanbul",
        "ÄRGER",
        "A\u{308}RGER",
        "ΟΔΟΣ",
        "ǅungla",
        "Ωmega",
        "Kelvin-\u{212A}",
        "café",
        "cafe\u{301}",
        "ЖУК",
        "🦀-crab",
        "Web_1%",
        "back\\slash",
    ];
    let mut ids = Vec::new();
    for (n, h) in (0u32..).zip(hosts) {
        let inst = host(n, h);
        ids.push(inst.id);
        store.insert_instance(&inst).await.expect("insert");
    }
    let fleet = Fleet::builder(Arc::clone(&store))
        .key_encryption_key(fleet_core::testing::kek())
        .open()
        .await
        .expect("open");
    let by_name = |names: &[&str]| {
        let mut want: Vec<InstanceId> = names
            .iter()
            .map(|n| {
                ids[hosts
                    .iter()
                    .position(|h| h == n)
                    .expect("a host of the list")]
            })
            .collect();
        want.sort();
        want
    };
    // Needle → the hosts that the live view (Rust's folding) selects.
    let cases: [(&str, &[&str]); 16] = [
        ("ß", &["STRASSE-ß", "STRAẞE"]),
        ("ẞ", &["STRASSE-ß", "STRAẞE"]),
        ("ss", &["STRASSE-ß"]),
        ("i\u{307}", &["İstanbul"]),
        ("İ", &["İstanbul"]),
        ("ä", &["ÄRGER"]),
        ("a\u{308}", &["A\u{308}RGER"]),
        ("ς", &["ΟΔΟΣ"]),
        ("ǆ", &["ǅungla"]),
        ("ω", &["Ωmega"]),
        ("-k", &["Kelvin-\u{212A}"]),
        ("é", &["café"]),
        ("\u{301}", &["cafe\u{301}"]),
        ("жук", &["ЖУК"]),
        ("🦀", &["🦀-crab"]),
        ("_1%", &["Web_1%"]),
    ];
    for (needle, expected) in cases {
        let filter = Filter::all().text([needle]);
        let mut view = fleet.view().matching(&filter, &TenantScope::All);
        view.sort();
        assert_eq!(view, by_name(expected), "the live view on text:{needle:?}");
        assert_eq!(
            pushed_down(&store, &filter, 3).await,
            view,
            "list_matching on text:{needle:?}"
        );
    }
    let backslash = Filter::parse(r#"text:"\\""#).expect("filter");
    assert_eq!(
        pushed_down(&store, &backslash, 10).await,
        by_name(&["back\\slash"])
    );
}

/// Needles the live view's text index never matches (only a filter built in code can hold
/// them): empty, or with a line break or NUL.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn needles_the_live_view_never_matches_select_nothing() {
    let (_db, store) = fresh_store().await;
    for n in 0..6 {
        store
            .insert_instance(&host(n, &format!("node-{n}")))
            .await
            .expect("insert");
    }
    for needles in [
        vec![""],
        vec!["node\0"],
        vec!["\0"],
        vec!["node-1\n10.0.0.1"],
        vec!["", "node-2"],
        vec!["node\0", "node-3"],
    ] {
        let filter = Filter::all().text(needles.iter().copied());
        let view = live(&store, &filter).await;
        assert_eq!(
            pushed_down(&store, &filter, 4).await,
            view,
            "text:{needles:?}"
        );
    }
    let one = Filter::all().text(["", "node-2"]);
    assert_eq!(
        live(&store, &one).await.len(),
        1,
        "the non-empty needle still counts"
    );
}

/// Tag and group terms compare exactly and case-sensitively, as the view's interned postings do.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tag_and_group_terms_are_exact_and_case_sensitive() {
    let (_db, store) = fresh_store().await;
    let tagged = [
        ("env", "Prod"),
        ("env", "prod"),
        ("Env", "prod"),
        ("env", "PROD"),
        ("env", ""),
    ];
    for (n, (k, v)) in (0u32..).zip(tagged) {
        let mut inst = instance(n);
        inst.tags = Tags::from_pairs([(k, v)]).expect("tags");
        inst.groups = fleet_core::Groups::from_names([format!("g{n}")]).expect("groups");
        store.insert_instance(&inst).await.expect("insert");
    }
    for text in [
        "env=prod",
        "env=Prod",
        "Env=prod",
        "env!=prod",
        "env in (prod,PROD)",
        "env notin (prod)",
        "env=\"\"",
        "env!=\"\"",
        "Env",
        "!Env",
        "ENV",
        "group:g1",
        "group:g1|g4",
    ] {
        let filter = Filter::parse(text).expect("filter");
        assert_eq!(
            pushed_down(&store, &filter, 2).await,
            live(&store, &filter).await,
            "{text}"
        );
    }
    let prod = Filter::all().tag(TagSelector::Eq(
        fleet_core::TagKey::new("env").expect("key"),
        TagValue::new("prod").expect("value"),
    ));
    assert_eq!(pushed_down(&store, &prod, 10).await.len(), 1);
}

/// Rows written without the folded text (by a binary from before it existed, while replicas
/// are upgraded one by one) are still matched as the live view matches them, and `migrate`
/// fills the text in from Rust.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rows_without_folded_text_match_and_are_backfilled() {
    let (_db, store) = fresh_store().await;
    let mut old = Vec::new();
    for (n, h) in (0u32..).zip(["İSTANBUL", "ΟΔΟΣ", "plain-host", "ÄRGER"]) {
        let mut inst = host(n, h);
        inst.system.ip_addresses = vec![IpAddr::V6(Ipv6Addr::new(
            0xfe80, 0, 0, 0, 0, 0, 0xab, n as u16,
        ))];
        // As the layout-1 store wrote it: no folded text.
        sqlx::query(
            "INSERT INTO fleet_instances (id, tenant, hostname, tags, groups, record) \
             VALUES ($1, NULL, $2, $3, '{}', $4)",
        )
        .bind(inst.id.as_uuid())
        .bind(&inst.system.hostname)
        .bind(serde_json::to_value(&inst.tags).expect("json"))
        .bind(serde_json::to_value(&inst).expect("json"))
        .execute(store.pool())
        .await
        .expect("raw insert");
        old.push(inst);
    }
    store
        .insert_instance(&host(9, "ἈΣ-new"))
        .await
        .expect("insert");
    let filters = [
        Filter::all().text(["i\u{307}s"]),
        Filter::all().text(["ς"]),
        Filter::all().text(["ä", "fe80::ab:2"]),
        Filter::all().text(["FE80::AB:"]),
        Filter::all().text(["-"]),
        Filter::all().text(["host"]).tag(TagSelector::Exists(
            fleet_core::TagKey::new("env").expect("key"),
        )),
    ];
    for filter in &filters {
        for page in [1, 2, 10] {
            assert_eq!(
                pushed_down(&store, filter, page).await,
                live(&store, filter).await,
                "before the backfill: {filter} (pages of {page})"
            );
        }
    }
    store.migrate().await.expect("migrate again (backfill)");
    for inst in &old {
        let text: Option<String> =
            sqlx::query_scalar("SELECT search_text FROM fleet_instances WHERE id = $1")
                .bind(inst.id.as_uuid())
                .fetch_one(store.pool())
                .await
                .expect("read back");
        assert_eq!(
            text.as_deref(),
            Some(searchable_text(&inst.system.hostname, &inst.system.ip_addresses).as_str())
        );
    }
    for filter in &filters {
        assert_eq!(
            pushed_down(&store, filter, 2).await,
            live(&store, filter).await,
            "after the backfill: {filter}"
        );
    }
}

/// Pieces of hostnames: the characters whose case mapping is known to differ between Rust's
/// `to_lowercase` and C libraries, ICU or PostgreSQL's `lower()`, plus LIKE's metacharacters.
const ATOMS: &[&str] = &[
    "ß", "ẞ", "SS", "ss", "İ", "I", "i", "ı", "i\u{307}", "\u{307}", "Ä", "ä", "A\u{308}",
    "\u{308}", "ǅ", "Ǆ", "ǆ", "Σ", "σ", "ς", "ΟΔΟΣ", "ἈΣ", "\u{301}", "e\u{301}", "É", "é", "Ж",
    "ж", "Ё", "ё", "😀", "🇩🇪", "%", "_", "\\", "-", ".", "a", "Z", "0", "\u{212A}", "k", "Ω",
    "\u{2126}", "ω", "ﬃ", "Ⅻ", "Ｈ", "ǰ", "Ꭰ", "ꭰ", "ῼ",
];

fn atom() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => proptest::sample::select(ATOMS).prop_map(str::to_owned),
        1 => any::<char>()
            .prop_filter("hostnames hold no whitespace or control characters", |c| {
                !c.is_whitespace() && !c.is_control()
            })
            .prop_map(String::from),
    ]
}

fn hostname() -> impl Strategy<Value = String> {
    proptest::collection::vec(atom(), 1..7).prop_map(|v| v.concat())
}

fn ip() -> impl Strategy<Value = IpAddr> {
    prop_oneof![
        any::<Ipv4Addr>().prop_map(IpAddr::V4),
        any::<Ipv6Addr>().prop_map(IpAddr::V6),
        any::<Ipv4Addr>().prop_map(|a| IpAddr::V6(a.to_ipv6_mapped())),
        any::<u16>().prop_map(|x| IpAddr::V6(Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0xabcd, x))),
    ]
}

/// How a needle is made: mostly from the generated text, so that it matches often.
#[derive(Debug, Clone)]
enum NeedleSpec {
    /// Characters `start..start+len` of a hostname, then upper-, lower- or as-cased.
    Host(Index, Index, usize, u8),
    /// Part of an IP address's text, uppercased (IPv6 hex digits).
    Ip(Index, Index, usize),
    /// Free atoms.
    Atoms(String),
}

fn needle_spec() -> impl Strategy<Value = NeedleSpec> {
    prop_oneof![
        5 => (any::<Index>(), any::<Index>(), 1usize..5, 0u8..3)
            .prop_map(|(h, s, l, c)| NeedleSpec::Host(h, s, l, c)),
        1 => (any::<Index>(), any::<Index>(), 1usize..6)
            .prop_map(|(h, s, l)| NeedleSpec::Ip(h, s, l)),
        2 => proptest::collection::vec(atom(), 1..3).prop_map(|v| NeedleSpec::Atoms(v.concat())),
    ]
}

fn chars_of(s: &str, start: &Index, len: usize) -> String {
    let chars: Vec<char> = s.chars().collect();
    if chars.is_empty() {
        return "x".into();
    }
    let from = start.index(chars.len());
    chars[from..(from + len).min(chars.len())].iter().collect()
}

fn resolve(spec: &NeedleSpec, hosts: &[(String, Vec<IpAddr>)]) -> String {
    match spec {
        NeedleSpec::Host(h, start, len, case) => {
            let piece = chars_of(&hosts[h.index(hosts.len())].0, start, *len);
            match case {
                0 => piece,
                1 => piece.to_uppercase(),
                _ => piece.to_lowercase(),
            }
        }
        NeedleSpec::Ip(h, start, len) => {
            let (name, ips) = &hosts[h.index(hosts.len())];
            match ips.first() {
                Some(ip) => chars_of(&ip.to_string(), start, *len).to_uppercase(),
                None => chars_of(name, start, *len),
            }
        }
        NeedleSpec::Atoms(s) => s.clone(),
    }
}

type Case = (Vec<(String, Vec<IpAddr>)>, Vec<NeedleSpec>);

fn case() -> impl Strategy<Value = Case> {
    (
        proptest::collection::vec((hostname(), proptest::collection::vec(ip(), 0..3)), 1..12),
        proptest::collection::vec(needle_spec(), 1..6),
    )
}

/// For generated hostnames, IPs and needles (non-ASCII, combining marks, titlecase, final sigma,
/// dotted and dotless i, emoji, `%` `_` `\`), `list_matching` selects exactly what
/// `Filter::matches` and the live view select — through a planner free to scan, and through one
/// pushed onto the indexes (`enable_seqscan = off`).
#[test]
fn text_pushdown_agrees_with_the_live_view_on_generated_text() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let (db, store, indexed) = rt.block_on(async {
        let (db, store) = fresh_store().await;
        let options = PgConnectOptions::from_str(&db.url)
            .expect("url")
            .options([("enable_seqscan", "off")]);
        let pool = PgPoolOptions::new()
            .max_connections(2)
            .connect_with(options)
            .await
            .expect("connect");
        (db, store, PgStore::new(pool))
    });
    let mut runner = TestRunner::new(Config {
        cases: 64,
        failure_persistence: None,
        ..Config::default()
    });
    // How many filters selected some, and how many left some out: the run must be neither
    // all-miss nor all-hit to show anything.
    let (hits, misses) = (std::cell::Cell::new(0u32), std::cell::Cell::new(0u32));
    let result = runner.run(&case(), |(hosts, specs)| {
        rt.block_on(async {
            sqlx::query("TRUNCATE fleet_instances, fleet_heartbeats")
                .execute(store.pool())
                .await
                .expect("truncate");
            let mut instances = Vec::new();
            for (n, (name, ips)) in (0u32..).zip(&hosts) {
                let mut inst = host(n, name);
                inst.system.ip_addresses = ips.clone();
                store.insert_instance(&inst).await.expect("insert");
                instances.push(inst);
            }
            let needles: Vec<String> = specs.iter().map(|s| resolve(s, &hosts)).collect();
            let mut filters: Vec<Filter> = needles
                .iter()
                .map(|n| Filter::all().text([n.as_str()]))
                .collect();
            filters.push(Filter::all().text(needles.iter().map(String::as_str)));
            filters.push(
                Filter::all()
                    .text([needles[0].as_str()])
                    .tag(TagSelector::Eq(
                        fleet_core::TagKey::new("env").expect("key"),
                        TagValue::new("prod").expect("value"),
                    )),
            );
            for filter in &filters {
                let mut reference: Vec<InstanceId> = instances
                    .iter()
                    .filter(|i| filter.matches(i, Status::Online))
                    .map(|i| i.id)
                    .collect();
                reference.sort();
                hits.set(hits.get() + u32::from(!reference.is_empty()));
                misses.set(misses.get() + u32::from(reference.len() < instances.len()));
                let view = live(&store, filter).await;
                prop_assert_eq!(
                    &view,
                    &reference,
                    "live view against Filter::matches: {}",
                    filter
                );
                let sql = pushed_down(&store, filter, 3).await;
                prop_assert_eq!(
                    &sql,
                    &reference,
                    "list_matching: {} over {:?}",
                    filter,
                    hosts
                );
                let sql = pushed_down(&indexed, filter, 5).await;
                prop_assert_eq!(
                    &sql,
                    &reference,
                    "on the indexes: {} over {:?}",
                    filter,
                    hosts
                );
            }
            Ok::<(), TestCaseError>(())
        })
    });
    drop(indexed);
    drop(db);
    if let Err(e) = result {
        panic!("{e}");
    }
    assert!(
        hits.get() >= 64 && misses.get() >= 64,
        "generated filters selected something {} times and left something out {} times",
        hits.get(),
        misses.get()
    );
}
