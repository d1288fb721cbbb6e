//! Property tests of the filter language: print → parse is the identity on filters, canonical
//! printing is stable, and no input makes the parser panic.

use fleet_core::filter::{Filter, TagSelector, Term};
use fleet_core::{GroupName, Status, TagKey, TagValue, TenantId};
use proptest::prelude::*;

fn key() -> impl Strategy<Value = TagKey> {
    prop_oneof![
        "[a-zA-Z0-9]([a-zA-Z0-9._-]{0,8}[a-zA-Z0-9])?",
        "[a-z0-9]{1,6}(\\.[a-z0-9]{1,6}){0,2}/[a-zA-Z0-9]{1,8}",
        Just("in".to_string()),
        Just("notin".to_string()),
    ]
    .prop_map(|s| TagKey::new(s).unwrap())
}

fn value() -> impl Strategy<Value = TagValue> {
    prop_oneof![
        Just(String::new()),
        Just("in".to_string()),
        "[a-zA-Z0-9]([a-zA-Z0-9._-]{0,8}[a-zA-Z0-9])?"
    ]
    .prop_map(|s| TagValue::new(s).unwrap())
}

fn name() -> impl Strategy<Value = String> {
    "[a-z0-9]([a-z0-9._-]{0,8}[a-z0-9])?"
}

fn status() -> impl Strategy<Value = Status> {
    prop_oneof![
        Just(Status::Online),
        Just(Status::Warning),
        Just(Status::Offline)
    ]
}

fn text() -> impl Strategy<Value = String> {
    // Anything without control characters, including quotes, backslashes, spaces, operators.
    prop_oneof!["[a-z0-9.:-]{1,12}", "[ -~éü]{1,12}"]
}

fn term() -> impl Strategy<Value = Term> {
    let values = || prop::collection::vec(value(), 1..4);
    prop_oneof![
        prop::collection::vec(status(), 1..4).prop_map(Term::Status),
        prop::collection::vec(name(), 1..4)
            .prop_map(|v| Term::Group(v.into_iter().map(|n| GroupName::new(n).unwrap()).collect())),
        prop::collection::vec(name(), 1..4)
            .prop_map(|v| Term::Tenant(v.into_iter().map(|n| TenantId::new(n).unwrap()).collect())),
        prop::collection::vec(text(), 1..4).prop_map(Term::Text),
        key().prop_map(|k| Term::Tag(TagSelector::Exists(k))),
        key().prop_map(|k| Term::Tag(TagSelector::Absent(k))),
        (key(), value()).prop_map(|(k, v)| Term::Tag(TagSelector::Eq(k, v))),
        (key(), value()).prop_map(|(k, v)| Term::Tag(TagSelector::NotEq(k, v))),
        (key(), values()).prop_map(|(k, v)| Term::Tag(TagSelector::In(k, v))),
        (key(), values()).prop_map(|(k, v)| Term::Tag(TagSelector::NotIn(k, v))),
    ]
}

fn filter() -> impl Strategy<Value = Filter> {
    prop::collection::vec(term(), 0..8)
        .prop_map(|terms| terms.into_iter().fold(Filter::all(), Filter::and))
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 1024, ..ProptestConfig::default() })]

    /// parse(print(f)) == f for every filter.
    #[test]
    fn print_then_parse_is_identity(f in filter()) {
        let printed = f.to_string();
        let parsed = Filter::parse(&printed);
        prop_assert_eq!(parsed.as_ref(), Ok(&f), "printed as {:?}", printed);
    }

    /// Any text either fails with a position inside it, or parses to a filter whose canonical
    /// form parses back to the same filter.
    #[test]
    fn parse_never_panics_and_canonical_form_is_stable(s in "[ -~é\\t]{0,40}") {
        match Filter::parse(&s) {
            Ok(f) => {
                let again = Filter::parse(&f.to_string());
                prop_assert_eq!(again, Ok(f));
            }
            Err(e) => prop_assert!(e.position <= s.chars().count(), "{e} for {s:?}"),
        }
    }

    /// Same, for inputs built from the language's own tokens (which reach deeper).
    #[test]
    fn token_soup(parts in prop::collection::vec(prop_oneof![
        Just("status:"), Just("group:"), Just("text:"), Just("tenant:"), Just("env"), Just("="),
        Just("!="), Just("!"), Just(" in "), Just(" notin "), Just("("), Just(")"), Just(","),
        Just("|"), Just("\""), Just(" "), Just("online"), Just("prod"), Just("a.b/c"), Just("\\"),
    ], 0..16)) {
        let s: String = parts.concat();
        match Filter::parse(&s) {
            Ok(f) => prop_assert_eq!(Filter::parse(&f.to_string()), Ok(f)),
            Err(e) => prop_assert!(e.position <= s.chars().count(), "{e} for {s:?}"),
        }
    }
}
