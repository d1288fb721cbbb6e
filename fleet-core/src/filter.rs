//! `Filter`: which instances a summary, list or bulk operation is about — one textual syntax.
//!
//! # Grammar
//!
//! ```text
//! filter     = [ term *( sep term ) ]           ; terms are ANDed
//! sep        = 1*( " " / "," )
//! term       = field-term / tag-term
//! field-term = field ":" value *( "|" value )   ; values are ORed
//! field      = "status" / "group" / "tenant" / "text"
//! tag-term   = key                              ; the tag is set
//!            / "!" key                          ; the tag is not set
//!            / key ( "=" / "==" ) value         ; set, with this value
//!            / key "!=" value                   ; not set, or set to another value
//!            / key "in" "(" value *( "," value ) ")"     ; set, to one of these
//!            / key "notin" "(" value *( "," value ) ")"  ; not set, or set to none of these
//! value      = bare / quoted
//! quoted     = DQUOTE *( char / "\" DQUOTE / "\\" ) DQUOTE
//! ```
//!
//! Whitespace may surround operators and list items. A bare value is a run of characters other
//! than whitespace and `, | ( ) " ! =`; quote anything else (or an empty tag value: `env=""`).
//! Keys and values follow the tag rules of [`crate::tag`]; `status` values are `online`,
//! `warning`, `offline`; `group` and `tenant` values follow their naming rules.
//!
//! `text:` matches, case-insensitively, a substring of the hostname or of any IP address in its
//! usual text form (`text:web-0|10.1.` matches `web-01` and anything in `10.1.*`).
//!
//! Examples: `status:online|warning env=production`,
//! `region in (us-east,eu-west) !decommissioned`, `group:database-servers text:"db 1"`.
//!
//! # Canonical form
//!
//! [`Filter`]'s `Display` prints the canonical form: terms in the order given, separated by one
//! space; values of each term sorted and de-duplicated; values quoted only when they must be.
//! Parsing the canonical form gives back the same `Filter`.
//!
//! # Limits
//!
//! A filter is input from operators (and the web), and evaluating one costs in proportion to its
//! size, so parsing refuses filters beyond these limits, each refusal naming the limit
//! ([`FilterParseError::limit`], a [`FilterLimit`]):
//!
//! | limit | constant | what |
//! |---|---|---|
//! | [`FilterLimit::Length`] | [`MAX_FILTER_LEN`] | bytes of filter text |
//! | [`FilterLimit::Terms`] | [`MAX_TERMS`] | terms |
//! | [`FilterLimit::Values`] | [`MAX_VALUES`] | values in one term (`a\|b\|…`, `in (…)`) |
//! | [`FilterLimit::TotalValues`] | [`MAX_TOTAL_VALUES`] | values in the whole filter, every term counted |
//! | [`FilterLimit::TextLength`] | [`MAX_TEXT_LEN`] | characters of one `text:` value |
//! | [`FilterLimit::TotalTextLength`] | [`MAX_TOTAL_TEXT_LEN`] | characters of all `text:` values together |
//!
//! Values are counted as written, before duplicates are removed. A filter built in code
//! ([`Filter::and`] and friends) is trusted and not limited; the live view bounds the work it does
//! per lock hold for any filter (see [`crate::live::query`]).
//!
//! # Errors
//!
//! A syntax error is a [`FilterParseError`] carrying the 0-based **character** position of the
//! mistake and what was expected there; a filter beyond a limit is one too, with
//! [`limit`](FilterParseError::limit) set.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::{GroupName, Groups, Instance, Status, TagKey, TagValue, Tags, TenantId};

/// Longest accepted filter text, in bytes ([`FilterLimit::Length`]).
pub const MAX_FILTER_LEN: usize = 4096;
/// Most terms in one filter ([`FilterLimit::Terms`]).
pub const MAX_TERMS: usize = 64;
/// Most values in one term ([`FilterLimit::Values`]).
pub const MAX_VALUES: usize = 64;
/// Most values in one filter, all terms together ([`FilterLimit::TotalValues`]).
pub const MAX_TOTAL_VALUES: usize = 256;
/// Longest free-text needle, in characters ([`FilterLimit::TextLength`]).
pub const MAX_TEXT_LEN: usize = 253;
/// Most characters of free text in one filter, all `text:` values together
/// ([`FilterLimit::TotalTextLength`]).
pub const MAX_TOTAL_TEXT_LEN: usize = 1024;

/// A documented limit on the size of a filter (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum FilterLimit {
    /// [`MAX_FILTER_LEN`]: bytes of filter text.
    Length,
    /// [`MAX_TERMS`]: terms in the filter.
    Terms,
    /// [`MAX_VALUES`]: values in one term.
    Values,
    /// [`MAX_TOTAL_VALUES`]: values in the whole filter.
    TotalValues,
    /// [`MAX_TEXT_LEN`]: characters of one `text:` value.
    TextLength,
    /// [`MAX_TOTAL_TEXT_LEN`]: characters of all `text:` values together.
    TotalTextLength,
}

impl FilterLimit {
    /// Every limit.
    pub const ALL: [Self; 6] = [
        Self::Length,
        Self::Terms,
        Self::Values,
        Self::TotalValues,
        Self::TextLength,
        Self::TotalTextLength,
    ];

    /// The limit's stable name, its constant's in lower case (`max_total_values`): what error
    /// replies carry.
    pub const fn name(self) -> &'static str {
        match self {
            Self::Length => "max_filter_len",
            Self::Terms => "max_terms",
            Self::Values => "max_values",
            Self::TotalValues => "max_total_values",
            Self::TextLength => "max_text_len",
            Self::TotalTextLength => "max_total_text_len",
        }
    }

    /// The limit's value.
    pub const fn max(self) -> usize {
        match self {
            Self::Length => MAX_FILTER_LEN,
            Self::Terms => MAX_TERMS,
            Self::Values => MAX_VALUES,
            Self::TotalValues => MAX_TOTAL_VALUES,
            Self::TextLength => MAX_TEXT_LEN,
            Self::TotalTextLength => MAX_TOTAL_TEXT_LEN,
        }
    }

    /// What it counts, for messages ("values in the whole filter").
    const fn counts(self) -> &'static str {
        match self {
            Self::Length => "bytes of filter text",
            Self::Terms => "terms",
            Self::Values => "values in one term",
            Self::TotalValues => "values in the whole filter",
            Self::TextLength => "characters in one text value",
            Self::TotalTextLength => "characters of text values in the whole filter",
        }
    }
}

impl fmt::Display for FilterLimit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A selector over one tag key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TagSelector {
    /// `k`: the tag is set.
    Exists(TagKey),
    /// `!k`: the tag is not set.
    Absent(TagKey),
    /// `k=v`: the tag is set to `v`.
    Eq(TagKey, TagValue),
    /// `k!=v`: the tag is not set, or set to something other than `v`.
    NotEq(TagKey, TagValue),
    /// `k in (a,b)`: the tag is set to one of the values.
    In(TagKey, Vec<TagValue>),
    /// `k notin (a,b)`: the tag is not set, or set to none of the values.
    NotIn(TagKey, Vec<TagValue>),
}

impl TagSelector {
    /// The key this selector is about.
    pub fn key(&self) -> &TagKey {
        match self {
            Self::Exists(k) | Self::Absent(k) | Self::Eq(k, _) | Self::NotEq(k, _) => k,
            Self::In(k, _) | Self::NotIn(k, _) => k,
        }
    }

    /// Whether `tags` satisfy this selector.
    pub fn matches(&self, tags: &Tags) -> bool {
        let v = tags.get(self.key().as_str());
        match self {
            Self::Exists(_) => v.is_some(),
            Self::Absent(_) => v.is_none(),
            Self::Eq(_, want) => v == Some(want),
            Self::NotEq(_, want) => v != Some(want),
            Self::In(_, set) => v.is_some_and(|v| set.contains(v)),
            Self::NotIn(_, set) => !v.is_some_and(|v| set.contains(v)),
        }
    }
}

/// One term of a filter; see the module docs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Term {
    /// `status:a|b`
    Status(Vec<Status>),
    /// `group:a|b`: a member of any of them.
    Group(Vec<GroupName>),
    /// `tenant:a|b`
    Tenant(Vec<TenantId>),
    /// `text:a|b`: hostname or IP contains any of them (lowercased needles).
    Text(Vec<String>),
    /// A tag selector.
    Tag(TagSelector),
}

fn normalize<T: Ord>(mut v: Vec<T>) -> Vec<T> {
    v.sort();
    v.dedup();
    v
}

impl Term {
    fn normalized(self) -> Self {
        match self {
            Self::Status(v) => Self::Status(normalize(v)),
            Self::Group(v) => Self::Group(normalize(v)),
            Self::Tenant(v) => Self::Tenant(normalize(v)),
            Self::Text(v) => {
                Self::Text(normalize(v.into_iter().map(|s| s.to_lowercase()).collect()))
            }
            Self::Tag(TagSelector::In(k, v)) => Self::Tag(TagSelector::In(k, normalize(v))),
            Self::Tag(TagSelector::NotIn(k, v)) => Self::Tag(TagSelector::NotIn(k, normalize(v))),
            other => other,
        }
    }
}

/// A conjunction of [`Term`]s. The empty filter matches every instance.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Filter {
    terms: Vec<Term>,
}

impl Filter {
    /// The filter that matches everything.
    pub fn all() -> Self {
        Self::default()
    }

    /// Parses the textual syntax (see the module docs).
    pub fn parse(s: &str) -> Result<Self, FilterParseError> {
        Parser::new(s)?.parse()
    }

    /// Adds a term (its values are normalized: sorted, de-duplicated, text lowercased).
    pub fn and(mut self, term: Term) -> Self {
        self.terms.push(term.normalized());
        self
    }

    /// Adds `status:…`.
    pub fn status(self, statuses: impl IntoIterator<Item = Status>) -> Self {
        self.and(Term::Status(statuses.into_iter().collect()))
    }

    /// Adds a tag selector.
    pub fn tag(self, selector: TagSelector) -> Self {
        self.and(Term::Tag(selector))
    }

    /// Adds `group:…`.
    pub fn group(self, groups: impl IntoIterator<Item = GroupName>) -> Self {
        self.and(Term::Group(groups.into_iter().collect()))
    }

    /// Adds `tenant:…`.
    pub fn tenant(self, tenants: impl IntoIterator<Item = TenantId>) -> Self {
        self.and(Term::Tenant(tenants.into_iter().collect()))
    }

    /// Adds `text:…`.
    pub fn text<S: Into<String>>(self, needles: impl IntoIterator<Item = S>) -> Self {
        self.and(Term::Text(needles.into_iter().map(Into::into).collect()))
    }

    /// The terms.
    pub fn terms(&self) -> &[Term] {
        &self.terms
    }

    /// Whether this filter matches everything.
    pub fn is_all(&self) -> bool {
        self.terms.is_empty()
    }

    /// Evaluates the filter against one instance with status `status` — the reference semantics
    /// that indexed evaluation (the live view, SQL push-down) must agree with.
    pub fn matches(&self, instance: &Instance, status: Status) -> bool {
        self.terms.iter().all(|term| match term {
            Term::Status(s) => s.contains(&status),
            Term::Group(g) => g.iter().any(|g| instance.groups.contains(g.as_str())),
            Term::Tenant(t) => instance.tenant.as_ref().is_some_and(|it| t.contains(it)),
            Term::Text(needles) => {
                let host = instance.system.hostname.to_lowercase();
                needles.iter().any(|n| {
                    host.contains(n.as_str())
                        || instance
                            .system
                            .ip_addresses
                            .iter()
                            .any(|ip| ip.to_string().contains(n.as_str()))
                })
            }
            Term::Tag(sel) => sel.matches(&instance.tags),
        })
    }

    /// Like [`matches`](Self::matches), over the parts a caller has at hand.
    pub fn matches_parts(
        &self,
        tenant: Option<&TenantId>,
        status: Status,
        tags: &Tags,
        groups: &Groups,
        searchable: &str,
    ) -> bool {
        self.terms.iter().all(|term| match term {
            Term::Status(s) => s.contains(&status),
            Term::Group(g) => g.iter().any(|g| groups.contains(g.as_str())),
            Term::Tenant(t) => tenant.is_some_and(|it| t.contains(it)),
            Term::Text(needles) => needles.iter().any(|n| searchable.contains(n.as_str())),
            Term::Tag(sel) => sel.matches(tags),
        })
    }
}

impl std::str::FromStr for Filter {
    type Err = FilterParseError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

impl Serialize for Filter {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Filter {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        Self::parse(&s).map_err(serde::de::Error::custom)
    }
}

fn is_bare_char(c: char) -> bool {
    !(c.is_whitespace() || c.is_control() || matches!(c, ',' | '|' | '(' | ')' | '"' | '!' | '='))
}

fn is_key_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | '/')
}

fn write_value(f: &mut fmt::Formatter<'_>, v: &str) -> fmt::Result {
    if !v.is_empty() && v.chars().all(is_bare_char) && v != "in" && v != "notin" {
        return f.write_str(v);
    }
    f.write_str("\"")?;
    for c in v.chars() {
        if c == '"' || c == '\\' {
            f.write_str("\\")?;
        }
        write!(f, "{c}")?;
    }
    f.write_str("\"")
}

fn write_joined<T: AsRef<str>>(f: &mut fmt::Formatter<'_>, items: &[T], sep: &str) -> fmt::Result {
    for (i, v) in items.iter().enumerate() {
        if i > 0 {
            f.write_str(sep)?;
        }
        write_value(f, v.as_ref())?;
    }
    Ok(())
}

impl fmt::Display for Term {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Status(v) => {
                f.write_str("status:")?;
                let names: Vec<&str> = v.iter().map(|s| s.as_str()).collect();
                write_joined(f, &names, "|")
            }
            Self::Group(v) => {
                f.write_str("group:")?;
                write_joined(f, v, "|")
            }
            Self::Tenant(v) => {
                f.write_str("tenant:")?;
                write_joined(f, v, "|")
            }
            Self::Text(v) => {
                f.write_str("text:")?;
                write_joined(f, v, "|")
            }
            Self::Tag(sel) => match sel {
                TagSelector::Exists(k) => write!(f, "{k}"),
                TagSelector::Absent(k) => write!(f, "!{k}"),
                TagSelector::Eq(k, v) => {
                    write!(f, "{k}=")?;
                    write_value(f, v.as_str())
                }
                TagSelector::NotEq(k, v) => {
                    write!(f, "{k}!=")?;
                    write_value(f, v.as_str())
                }
                TagSelector::In(k, v) => {
                    write!(f, "{k} in (")?;
                    write_joined(f, v, ",")?;
                    f.write_str(")")
                }
                TagSelector::NotIn(k, v) => {
                    write!(f, "{k} notin (")?;
                    write_joined(f, v, ",")?;
                    f.write_str(")")
                }
            },
        }
    }
}

impl fmt::Display for Filter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, t) in self.terms.iter().enumerate() {
            if i > 0 {
                f.write_str(" ")?;
            }
            write!(f, "{t}")?;
        }
        Ok(())
    }
}

/// A filter that did not parse, or was larger than a limit allows: where, and what was wrong.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}", self.describe())]
pub struct FilterParseError {
    /// 0-based character offset of the mistake in the filter text (for a limit, where the filter
    /// went past it).
    pub position: usize,
    /// What was expected or wrong.
    pub message: String,
    /// The limit the filter went past; `None` for a syntax error.
    pub limit: Option<FilterLimit>,
}

impl FilterParseError {
    fn describe(&self) -> String {
        match self.limit {
            None => format!(
                "filter syntax error at position {}: {}",
                self.position, self.message
            ),
            Some(l) => format!(
                "filter too large at position {}: {} (limit {} = {})",
                self.position,
                self.message,
                l.name(),
                l.max()
            ),
        }
    }
}

struct Parser {
    chars: Vec<char>,
    pos: usize,
    /// Values read so far, all terms together ([`MAX_TOTAL_VALUES`]).
    values: usize,
    /// Characters of `text:` values read so far ([`MAX_TOTAL_TEXT_LEN`]).
    text_chars: usize,
}

type PResult<T> = Result<T, FilterParseError>;

impl Parser {
    fn new(s: &str) -> PResult<Self> {
        if s.len() > MAX_FILTER_LEN {
            // The character at which the text passes the byte limit.
            let position = s
                .char_indices()
                .take_while(|&(i, c)| i + c.len_utf8() <= MAX_FILTER_LEN)
                .count();
            return Err(Self::too_large(position, FilterLimit::Length));
        }
        Ok(Self {
            chars: s.chars().collect(),
            pos: 0,
            values: 0,
            text_chars: 0,
        })
    }

    fn err<T>(&self, position: usize, message: impl Into<String>) -> PResult<T> {
        Err(FilterParseError {
            position,
            message: message.into(),
            limit: None,
        })
    }

    fn too_large(position: usize, limit: FilterLimit) -> FilterParseError {
        FilterParseError {
            position,
            message: format!("more than {} {}", limit.max(), limit.counts()),
            limit: Some(limit),
        }
    }

    fn limit<T>(&self, position: usize, limit: FilterLimit) -> PResult<T> {
        Err(Self::too_large(position, limit))
    }

    /// Counts one more value starting at `position` against [`MAX_TOTAL_VALUES`].
    fn count_value(&mut self, position: usize) -> PResult<()> {
        if self.values == MAX_TOTAL_VALUES {
            return self.limit(position, FilterLimit::TotalValues);
        }
        self.values += 1;
        Ok(())
    }

    fn peek(&self) -> Option<char> {
        self.chars.get(self.pos).copied()
    }

    fn peek_at(&self, i: usize) -> Option<char> {
        self.chars.get(self.pos + i).copied()
    }

    fn skip_ws(&mut self) {
        while self.peek().is_some_and(char::is_whitespace) {
            self.pos += 1;
        }
    }

    fn describe(&self) -> String {
        match self.peek() {
            None => "end of filter".to_string(),
            Some(c) => format!("{c:?}"),
        }
    }

    fn parse(mut self) -> PResult<Filter> {
        let mut filter = Filter::all();
        loop {
            while self.peek().is_some_and(|c| c.is_whitespace() || c == ',') {
                self.pos += 1;
            }
            if self.peek().is_none() {
                return Ok(filter);
            }
            if filter.terms.len() == MAX_TERMS {
                return self.limit(self.pos, FilterLimit::Terms);
            }
            let term = self.term()?;
            filter = filter.and(term);
            // A term must be followed by a separator or the end.
            match self.peek() {
                None => {}
                Some(c) if c.is_whitespace() || c == ',' => {}
                Some(_) => {
                    return self.err(
                        self.pos,
                        format!(
                            "expected a space or ',' between terms, found {}",
                            self.describe()
                        ),
                    );
                }
            }
        }
    }

    fn word(&mut self, pred: fn(char) -> bool) -> (usize, String) {
        let start = self.pos;
        while self.peek().is_some_and(pred) {
            self.pos += 1;
        }
        (start, self.chars[start..self.pos].iter().collect())
    }

    fn term(&mut self) -> PResult<Term> {
        if self.peek() == Some('!') {
            self.pos += 1;
            let key = self.key()?;
            return Ok(Term::Tag(TagSelector::Absent(key)));
        }
        let (start, word) = self.word(is_key_char);
        if word.is_empty() {
            return self.err(start, format!("expected a term, found {}", self.describe()));
        }
        if self.peek() == Some(':') {
            self.pos += 1;
            return self.field_term(start, &word);
        }
        let key = match TagKey::new(word) {
            Ok(k) => k,
            Err(e) => return self.err(start, e.to_string()),
        };
        self.tag_term(key)
    }

    fn key(&mut self) -> PResult<TagKey> {
        let (start, word) = self.word(is_key_char);
        if word.is_empty() {
            return self.err(
                start,
                format!("expected a tag key, found {}", self.describe()),
            );
        }
        TagKey::new(word).or_else(|e| self.err(start, e.to_string()))
    }

    /// A bare or quoted value; returns its start position and text.
    fn value(&mut self, bare: fn(char) -> bool) -> PResult<(usize, String)> {
        let start = self.pos;
        if self.peek() == Some('"') {
            self.pos += 1;
            let mut s = String::new();
            loop {
                match self.peek() {
                    None => return self.err(start, "unterminated quoted value"),
                    Some('"') => {
                        self.pos += 1;
                        return Ok((start, s));
                    }
                    Some('\\') => match self.peek_at(1) {
                        Some(c @ ('"' | '\\')) => {
                            s.push(c);
                            self.pos += 2;
                        }
                        _ => return self.err(self.pos, "only \\\" and \\\\ may be escaped"),
                    },
                    Some(c) if c.is_control() => {
                        return self.err(self.pos, "control characters are not allowed");
                    }
                    Some(c) => {
                        s.push(c);
                        self.pos += 1;
                    }
                }
            }
        }
        let (start, word) = self.word(bare);
        if word.is_empty() {
            return self.err(
                start,
                format!("expected a value, found {}", self.describe()),
            );
        }
        Ok((start, word))
    }

    fn field_term(&mut self, start: usize, field: &str) -> PResult<Term> {
        let mut raw = Vec::new();
        loop {
            if raw.len() == MAX_VALUES {
                return self.limit(self.pos, FilterLimit::Values);
            }
            self.count_value(self.pos)?;
            raw.push(self.value(is_bare_char)?);
            if self.peek() == Some('|') {
                self.pos += 1;
            } else {
                break;
            }
        }
        let term = match field {
            "status" => Term::Status(self.convert(raw, |s| s.parse())?),
            "group" => Term::Group(self.convert(raw, GroupName::new)?),
            "tenant" => Term::Tenant(self.convert(raw, TenantId::new)?),
            "text" => {
                for (pos, v) in &raw {
                    if v.is_empty() {
                        return self.err(*pos, "search text must not be empty");
                    }
                    let chars = v.chars().count();
                    if chars > MAX_TEXT_LEN {
                        return self.limit(*pos, FilterLimit::TextLength);
                    }
                    self.text_chars += chars;
                    if self.text_chars > MAX_TOTAL_TEXT_LEN {
                        return self.limit(*pos, FilterLimit::TotalTextLength);
                    }
                }
                Term::Text(raw.into_iter().map(|(_, v)| v).collect())
            }
            other => {
                return self.err(
                    start,
                    format!("unknown field {other:?}: expected status, group, tenant or text"),
                );
            }
        };
        Ok(term)
    }

    fn convert<T, E: fmt::Display>(
        &self,
        raw: Vec<(usize, String)>,
        f: impl Fn(String) -> Result<T, E>,
    ) -> PResult<Vec<T>> {
        raw.into_iter()
            .map(|(pos, v)| f(v).or_else(|e| self.err(pos, e.to_string())))
            .collect()
    }

    fn tag_value(&mut self) -> PResult<TagValue> {
        self.count_value(self.pos)?;
        let (pos, v) = self.value(is_bare_char)?;
        TagValue::new(v).or_else(|e| self.err(pos, e.to_string()))
    }

    fn tag_term(&mut self, key: TagKey) -> PResult<Term> {
        let after_key = self.pos;
        self.skip_ws();
        match (self.peek(), self.peek_at(1)) {
            (Some('='), Some('=')) => {
                self.pos += 2;
                self.skip_ws();
                Ok(Term::Tag(TagSelector::Eq(key, self.tag_value()?)))
            }
            (Some('='), _) => {
                self.pos += 1;
                self.skip_ws();
                Ok(Term::Tag(TagSelector::Eq(key, self.tag_value()?)))
            }
            (Some('!'), Some('=')) => {
                self.pos += 2;
                self.skip_ws();
                Ok(Term::Tag(TagSelector::NotEq(key, self.tag_value()?)))
            }
            _ => {
                // `in (` / `notin (`? Otherwise this was a bare key (exists).
                let (_, word) = self.word(is_key_char);
                if word == "in" || word == "notin" {
                    self.skip_ws();
                    if self.peek() == Some('(') {
                        self.pos += 1;
                        let values = self.list()?;
                        return Ok(Term::Tag(if word == "in" {
                            TagSelector::In(key, values)
                        } else {
                            TagSelector::NotIn(key, values)
                        }));
                    }
                }
                self.pos = after_key;
                match self.chars.get(after_key) {
                    None => Ok(Term::Tag(TagSelector::Exists(key))),
                    Some(c) if c.is_whitespace() || *c == ',' => {
                        Ok(Term::Tag(TagSelector::Exists(key)))
                    }
                    Some(_) => self.err(
                        after_key,
                        format!("expected an operator, found {}", self.describe()),
                    ),
                }
            }
        }
    }

    fn list(&mut self) -> PResult<Vec<TagValue>> {
        let mut values = Vec::new();
        loop {
            self.skip_ws();
            if values.len() == MAX_VALUES {
                return self.limit(self.pos, FilterLimit::Values);
            }
            values.push(self.tag_value()?);
            self.skip_ws();
            match self.peek() {
                Some(',') => self.pos += 1,
                Some(')') => {
                    self.pos += 1;
                    return Ok(values);
                }
                _ => {
                    return self.err(
                        self.pos,
                        format!("expected ',' or ')', found {}", self.describe()),
                    );
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn round(s: &str) -> String {
        Filter::parse(s)
            .map(|f| f.to_string())
            .unwrap_or_else(|e| panic!("{s}: {e}"))
    }

    #[test]
    fn canonical_forms() {
        assert_eq!(round(""), "");
        assert_eq!(round("  ,, "), "");
        assert_eq!(round("status:warning|online"), "status:online|warning");
        assert_eq!(
            round("env = prod,tier!=critical"),
            "env=prod tier!=critical"
        );
        assert_eq!(round("env==prod"), "env=prod");
        assert_eq!(round("region in ( us , eu ,us)"), "region in (eu,us)");
        assert_eq!(round("region notin (x)"), "region notin (x)");
        assert_eq!(round("env !env"), "env !env");
        assert_eq!(round("text:WEB|\"a b\""), "text:\"a b\"|web");
        assert_eq!(round("text:fe80::1"), "text:fe80::1");
        assert_eq!(round("env=\"\""), "env=\"\"");
        assert_eq!(
            round("group:db|web tenant:acme"),
            "group:db|web tenant:acme"
        );
        assert_eq!(round("example.com/team=infra"), "example.com/team=infra");
        // A key followed by a term named `in` that is not a list.
        assert_eq!(round("env in"), "env in");
    }

    #[test]
    fn errors_carry_positions() {
        let cases = [
            ("status:sleeping", 7, "status"),
            ("env=prod foo:bar", 9, "unknown field"),
            ("region in (a,b", 14, "expected ','"),
            ("env=", 4, "expected a value"),
            ("=x", 0, "expected a term"),
            ("text:\"abc", 5, "unterminated"),
            ("env<3", 3, "expected an operator"),
            ("env=-x", 4, "tag value"),
            ("group:DB", 6, "group name"),
            ("env)", 3, "expected an operator"),
            ("status:online)", 13, "between terms"),
            ("!", 1, "expected a tag key"),
        ];
        for (input, pos, msg) in cases {
            let e = Filter::parse(input).expect_err(input);
            assert_eq!(e.position, pos, "{input}: {e}");
            assert!(e.to_string().contains(msg), "{input}: {e}");
        }
    }

    #[test]
    fn positions_count_characters_not_bytes() {
        let e = Filter::parse("text:\"é\" status:x").unwrap_err();
        assert_eq!(e.position, 16);
    }

    #[test]
    fn limits() {
        let long = "a ".repeat(MAX_FILTER_LEN);
        assert!(Filter::parse(&long).is_err());
        let many = (0..=MAX_TERMS)
            .map(|i| format!("k{i}"))
            .collect::<Vec<_>>()
            .join(" ");
        assert!(Filter::parse(&many).unwrap_err().message.contains("terms"));
    }

    /// `text:` terms of `per_term` values each (`wNNNN`, 5 characters), `values` in all.
    fn text_values(values: usize, per_term: usize) -> String {
        text_terms(values, per_term, |i| format!("w{i:04}"))
    }

    /// The filter of issue 16: 1,024 two-letter text values in 64 terms, 3.3 KB.
    fn issue_16_filter() -> String {
        text_terms(1024, 16, |i| {
            let l = |n: usize| char::from(b'a' + (n % 26) as u8);
            format!("{}{}", l(i / 26), l(i))
        })
    }

    fn text_terms(values: usize, per_term: usize, value: impl Fn(usize) -> String) -> String {
        (0..values)
            .collect::<Vec<_>>()
            .chunks(per_term)
            .map(|c| {
                let vals: Vec<String> = c.iter().map(|&i| value(i)).collect();
                format!("text:{}", vals.join("|"))
            })
            .collect::<Vec<_>>()
            .join(" ")
    }

    fn refused(input: &str) -> FilterParseError {
        Filter::parse(input).expect_err("over a limit")
    }

    #[test]
    fn every_limit_is_refused_by_name() {
        // Length: one byte too many, the position is the character where it went past.
        let e = refused(&format!("{}x", "a ".repeat(MAX_FILTER_LEN / 2)));
        assert_eq!(e.limit, Some(FilterLimit::Length));
        assert_eq!(e.position, MAX_FILTER_LEN);
        let ok = "é".repeat(MAX_FILTER_LEN / 2);
        assert!(Filter::parse(&format!("text:{}", &ok[..200])).is_ok());
        let e = refused(&format!("k {ok}"));
        assert_eq!(e.limit, Some(FilterLimit::Length));
        assert_eq!(e.position, 2 + (MAX_FILTER_LEN - 2) / 2);

        // Terms.
        let terms = |n: usize| {
            (0..n)
                .map(|i| format!("k{i}"))
                .collect::<Vec<_>>()
                .join(" ")
        };
        assert_eq!(
            Filter::parse(&terms(MAX_TERMS)).unwrap().terms().len(),
            MAX_TERMS
        );
        let e = refused(&terms(MAX_TERMS + 1));
        assert_eq!(e.limit, Some(FilterLimit::Terms));

        // Values in one term, in both spellings.
        let vals = |n: usize| (0..n).map(|i| format!("v{i}")).collect::<Vec<_>>();
        assert!(Filter::parse(&format!("group:{}", vals(MAX_VALUES).join("|"))).is_ok());
        let e = refused(&format!("group:{}", vals(MAX_VALUES + 1).join("|")));
        assert_eq!(e.limit, Some(FilterLimit::Values));
        let e = refused(&format!("k in ({})", vals(MAX_VALUES + 1).join(",")));
        assert_eq!(e.limit, Some(FilterLimit::Values));

        // Values in the whole filter: every term within its own limit, the sum over it. Tag
        // `=`/`!=` values count too.
        let groups = |n: usize| {
            (0..n)
                .collect::<Vec<_>>()
                .chunks(MAX_VALUES)
                .map(|c| {
                    let v: Vec<String> = c.iter().map(|i| format!("g{i}")).collect();
                    format!("group:{}", v.join("|"))
                })
                .collect::<Vec<_>>()
                .join(" ")
        };
        assert!(Filter::parse(&groups(MAX_TOTAL_VALUES)).is_ok());
        let e = refused(&groups(MAX_TOTAL_VALUES + 1));
        assert_eq!(e.limit, Some(FilterLimit::TotalValues));
        let e = refused(&format!("{} env=prod", groups(MAX_TOTAL_VALUES)));
        assert_eq!(e.limit, Some(FilterLimit::TotalValues));
        assert_eq!(e.position, groups(MAX_TOTAL_VALUES).chars().count() + 5);
        // The 1,024 text values of issue 16, inside the per-term and length limits.
        assert!(issue_16_filter().len() <= MAX_FILTER_LEN);
        let e = refused(&issue_16_filter());
        assert_eq!(e.limit, Some(FilterLimit::TotalValues));

        // One text value.
        let long = "x".repeat(MAX_TEXT_LEN);
        assert!(Filter::parse(&format!("text:{long}")).is_ok());
        let e = refused(&format!("text:a|{long}x"));
        assert_eq!(e.limit, Some(FilterLimit::TextLength));
        assert_eq!(e.position, 7);

        // All text values together: 205 values of 5 characters is over 1,024 characters.
        assert!(Filter::parse(&text_values(MAX_TOTAL_TEXT_LEN / 5, 64)).is_ok());
        let e = refused(&text_values(MAX_TOTAL_TEXT_LEN / 5 + 1, 64));
        assert_eq!(e.limit, Some(FilterLimit::TotalTextLength));
    }

    #[test]
    fn limit_errors_name_the_limit_and_syntax_errors_do_not() {
        let e = refused(&issue_16_filter());
        let shown = e.to_string();
        assert!(shown.contains("max_total_values"), "{shown}");
        assert!(shown.contains(&MAX_TOTAL_VALUES.to_string()), "{shown}");
        assert!(shown.starts_with("filter too large"), "{shown}");
        let e = Filter::parse("status:sleeping").unwrap_err();
        assert_eq!(e.limit, None);
        assert!(e.to_string().starts_with("filter syntax error"));
        let names: std::collections::HashSet<_> =
            FilterLimit::ALL.iter().map(|l| l.name()).collect();
        assert_eq!(names.len(), FilterLimit::ALL.len(), "names are distinct");
    }

    #[test]
    fn selector_semantics_on_missing_keys() {
        let tags = Tags::from_pairs([("env", "prod")]).unwrap();
        let k = |s: &str| TagKey::new(s).unwrap();
        let v = |s: &str| TagValue::new(s).unwrap();
        assert!(TagSelector::NotEq(k("tier"), v("x")).matches(&tags));
        assert!(TagSelector::NotIn(k("tier"), vec![v("x")]).matches(&tags));
        assert!(!TagSelector::In(k("tier"), vec![v("x")]).matches(&tags));
        assert!(TagSelector::Absent(k("tier")).matches(&tags));
        assert!(!TagSelector::NotEq(k("env"), v("prod")).matches(&tags));
    }
}
