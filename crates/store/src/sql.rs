//! The one SQL builder both backends use, parameterised by [`Dialect`].
//!
//! Search semantics live here and nowhere else: SQLite and PostgreSQL run the
//! same statements, differing only in placeholder syntax and a few function
//! names, so a query means the same thing on either backend.
//!
//! Tables (see `schema.rs`): `resource_current` (one row per resource, `rid` is
//! the surrogate key), `resource_version` (one row per version), and the index
//! tables `ix_string`, `ix_token`, `ix_date`, `ix_number` (number and
//! quantity), `ix_reference`, `ix_uri`, which hold entries of current versions
//! only, each keyed by resource and [`param_key`].

use std::fmt::Write as _;

use tsunagi_fhir::search::{
    Clause, Criterion, DateMatch, Include, NumberMatch, ParamType, Prefix, SearchQuery, SortKey,
    StringMode,
};
use tsunagi_fhir::{FhirError, FhirResult};

use crate::api::{AuditFilter, HistoryQuery, LabelFilter, LatestPer, Scope, ScopeRule};

/// SQL flavour.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dialect {
    Sqlite,
    Postgres,
}

impl Dialect {
    /// Numbered placeholder `n` (1-based). SQLite gets `?n` rather than `$n`
    /// because SQLite numbers `$name` parameters by first appearance.
    fn placeholder(self, n: usize) -> String {
        match self {
            Dialect::Sqlite => format!("?{n}"),
            Dialect::Postgres => format!("${n}"),
        }
    }

    /// Substring position function (1-based, 0 when absent).
    fn strpos(self) -> &'static str {
        match self {
            Dialect::Sqlite => "instr",
            Dialect::Postgres => "strpos",
        }
    }

    /// `col` such that SQLite will not use an index for the term (unary `+`),
    /// for planning without statistics; PostgreSQL plans from its own statistics.
    fn noindex(self, col: &'static str) -> &'static str {
        match (self, col) {
            (Dialect::Sqlite, "r.rt") => "+r.rt",
            (Dialect::Sqlite, "r.patient_id") => "+r.patient_id",
            (Dialect::Sqlite, "r.author_org") => "+r.author_org",
            _ => col,
        }
    }

    /// Rewrites a statement written with `$n` placeholders for this dialect.
    /// Used once per static statement at store construction.
    pub fn adapt(self, sql: &str) -> String {
        match self {
            Dialect::Postgres => sql.to_string(),
            Dialect::Sqlite => sql.replace('$', "?"),
        }
    }
}

/// A bound parameter value.
#[derive(Debug, Clone, PartialEq)]
pub enum SqlValue {
    Text(String),
    Int(i64),
    Real(f64),
}

/// A statement with its parameters.
#[derive(Debug, Clone, PartialEq)]
pub struct Built {
    pub sql: String,
    pub params: Vec<SqlValue>,
}

impl Built {
    /// A statement of [`Statements`] whose `$1`, `$2` are a resource type and id.
    pub fn by_id(sql: &str, rt: &str, id: &str) -> Built {
        Built {
            sql: sql.to_string(),
            params: vec![SqlValue::Text(rt.into()), SqlValue::Text(id.into())],
        }
    }
}

struct B {
    d: Dialect,
    sql: String,
    params: Vec<SqlValue>,
    /// The search lists its ids (`_id=`): the order must not be served by the
    /// type's last-updated index (see [`search_where`]).
    ids_listed: bool,
}

impl B {
    fn new(d: Dialect) -> Self {
        B {
            d,
            sql: String::with_capacity(512),
            params: Vec::new(),
            ids_listed: false,
        }
    }
    fn s(&mut self, s: &str) -> &mut Self {
        self.sql.push_str(s);
        self
    }
    fn bind(&mut self, v: SqlValue) -> &mut Self {
        self.params.push(v);
        let p = self.d.placeholder(self.params.len());
        self.sql.push_str(&p);
        self
    }
    fn text(&mut self, v: &str) -> &mut Self {
        self.bind(SqlValue::Text(v.to_string()))
    }
    fn int(&mut self, v: i64) -> &mut Self {
        self.bind(SqlValue::Int(v))
    }
    fn real(&mut self, v: f64) -> &mut Self {
        self.bind(SqlValue::Real(v))
    }
    fn done(self) -> Built {
        Built {
            sql: self.sql,
            params: self.params,
        }
    }
}

/// Columns every resource-returning statement selects, in this order:
/// rid, rt, id, version, last_updated (epoch ms), deleted, body, author_org.
pub const RESOURCE_COLUMNS: &str =
    "r.rid, r.rt, r.id, v.version, v.last_updated, v.deleted, v.body, v.author_org";

/// Columns of the statements that return stored texts ([`Statements::read_text`],
/// [`search_text_page`]), in this order: rt, id, version, last_updated (epoch
/// ms), deleted, body, author_org, patient_id.
pub const TEXT_COLUMNS: &str =
    "r.rt, r.id, v.version, v.last_updated, v.deleted, v.body, v.author_org, r.patient_id";

const FROM_CURRENT: &str =
    " FROM resource_current r JOIN resource_version v ON v.rid = r.rid AND v.version = r.version";

/// Index tables, for `:missing` (a parameter's type is implied by where its entries are).
const INDEX_TABLES: [&str; 6] = [
    "ix_string",
    "ix_token",
    "ix_date",
    "ix_number",
    "ix_reference",
    "ix_uri",
];

/// The key under which the index tables hold the entries of search parameter
/// `param` of `resource_type`: the first 8 bytes of SHA-256 of `type/param`.
/// Derived, not looked up, so every backend, node and version agrees with no
/// table to keep in step and no write to intern a name; the R4 parameters have
/// distinct keys (tested), and a collision of two others is a 2^-64 event.
/// `_security` is keyed without the type: scope rules test labels of rows of
/// any type.
pub fn param_key(resource_type: &str, param: &str) -> i64 {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    if param != SECURITY_PARAM {
        h.update(resource_type.as_bytes());
    }
    h.update(b"/");
    h.update(param.as_bytes());
    let d = h.finalize();
    i64::from_be_bytes([d[0], d[1], d[2], d[3], d[4], d[5], d[6], d[7]])
}

/// Stored for an absent optional part of an entry (token or quantity system,
/// reference type), which is part of the row's key: never a valid FHIR value.
pub const ABSENT: &str = "";

/// Static statements, written once with `$n` placeholders and adapted per dialect.
#[derive(Debug, Clone)]
pub struct Statements {
    pub read: String,
    /// [`TEXT_COLUMNS`] of the current version.
    pub read_text: String,
    pub vread: String,
    pub current: String,
    pub insert_current: String,
    pub update_current: String,
    pub insert_version: String,
    /// The chain's head (PostgreSQL; the SQLite backend's head spans two files).
    pub audit_head: String,
    pub audit_insert: String,
    pub audit_set_head: String,
    /// Records after a seq (PostgreSQL; see `audit_head`).
    pub audit_scan: String,
    pub put_client_key: String,
    pub client_keys: String,
    pub schema_version: String,
}

impl Statements {
    pub fn new(d: Dialect) -> Self {
        let lock = if d == Dialect::Postgres {
            " FOR UPDATE"
        } else {
            ""
        };
        Statements {
            read: d.adapt(&format!("SELECT {RESOURCE_COLUMNS}{FROM_CURRENT} WHERE r.rt = $1 AND r.id = $2")),
            read_text: d.adapt(&format!("SELECT {TEXT_COLUMNS}{FROM_CURRENT} WHERE r.rt = $1 AND r.id = $2")),
            vread: d.adapt(&format!(
                "SELECT {RESOURCE_COLUMNS} FROM resource_current r JOIN resource_version v ON v.rid = r.rid \
                 WHERE r.rt = $1 AND r.id = $2 AND v.version = $3"
            )),
            current: d.adapt(&format!(
                "SELECT rid, version, last_updated, deleted FROM resource_current WHERE rt = $1 AND id = $2{lock}"
            )),
            insert_current: d.adapt(
                "INSERT INTO resource_current (rt, id, version, last_updated, deleted, patient_id, author_org) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT (rt, id) DO NOTHING RETURNING rid",
            ),
            update_current: d.adapt(
                "UPDATE resource_current SET version = $2, last_updated = $3, deleted = $4, patient_id = $5, \
                 author_org = $6 WHERE rid = $1",
            ),
            insert_version: d.adapt(
                "INSERT INTO resource_version (rid, version, rt, last_updated, deleted, author_org, author_user, body) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
            ),
            audit_head: d.adapt(&format!("SELECT seq, hash FROM audit_head WHERE id = 1{lock}")),
            audit_insert: d.adapt(
                "INSERT INTO audit_log (seq, recorded, record, prev_hash, hash, patient, org, usr, purpose) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
            ),
            audit_set_head: d.adapt("UPDATE audit_head SET seq = $1, hash = $2 WHERE id = 1"),
            audit_scan: d.adapt(
                "SELECT seq, recorded, record, prev_hash, hash FROM audit_log WHERE seq > $1 ORDER BY seq LIMIT $2",
            ),
            put_client_key: d.adapt(
                "INSERT INTO client_keys (client_id, kid, org, role, usr, jwk, created, revoked) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8) ON CONFLICT (client_id, kid) DO UPDATE SET \
                 org = excluded.org, role = excluded.role, usr = excluded.usr, jwk = excluded.jwk, \
                 created = excluded.created, revoked = excluded.revoked",
            ),
            client_keys: d.adapt(
                "SELECT client_id, kid, org, role, usr, jwk, created, revoked FROM client_keys \
                 WHERE client_id = $1 ORDER BY created, kid",
            ),
            schema_version: "SELECT COALESCE(MAX(version), 0) FROM schema_migrations".to_string(),
        }
    }
}

/// Whether index criteria are written as correlated `EXISTS` (cheap when the
/// scope already narrows the rows to a few patients' compartments) or as
/// `rid IN (subquery)` (lets the index lookup drive a type-wide search, or one
/// over many patients: a facility's consents list thousands, and a criterion
/// naming one of them is far more selective than all of their compartments).
fn correlated(scope: &Scope) -> bool {
    patients_only(scope) && matches!(scope, Scope::AnyOf(rules) if rules.len() <= FEW_PATIENT_RULES)
}

/// Up to this many patient rules (a patient, a guardian's children, the
/// categories of one consent), the patients' compartments drive a search.
const FEW_PATIENT_RULES: usize = 16;

/// Whether every rule of the scope admits one patient's rows only.
fn patients_only(scope: &Scope) -> bool {
    match scope {
        Scope::Unrestricted => false,
        Scope::AnyOf(rules) => !rules.is_empty() && rules.iter().all(patient_rule),
    }
}

fn patient_rule(r: &ScopeRule) -> bool {
    match r {
        ScopeRule::Patient { .. } => true,
        ScopeRule::Labeled { rule, .. } => patient_rule(rule),
        _ => false,
    }
}

/// Param name under which the store indexes `meta.security` (token index).
pub const SECURITY_PARAM: &str = "_security";

/// `EXISTS` over the resource's security labels of `system` (codes in `codes`
/// when given).
fn label_exists(b: &mut B, system: &str, codes: Option<&[String]>) {
    b.s("EXISTS (SELECT 1 FROM ix_token l WHERE l.rid = r.rid AND l.k = ")
        .int(param_key("", SECURITY_PARAM));
    let start = b.sql.len();
    b.s(" AND l.system = ").text(system);
    if let Some(codes) = codes {
        in_list(b, "l.code", codes);
    }
    per_row_lookup(b, start, "l.");
    b.s(")");
}

fn rule_sql(b: &mut B, rule: &ScopeRule, noindex: bool) {
    rule_sql_for(b, rule, noindex, None)
}

/// [`rule_sql`]; with `patients`, a patient rule admits any patient of that list
/// (see [`patient_groups`]) instead of its own.
fn rule_sql_for(b: &mut B, rule: &ScopeRule, noindex: bool, patients: Option<&[&str]>) {
    let col = |b: &B, c: &'static str| -> &'static str { if noindex { b.d.noindex(c) } else { c } };
    match rule {
        ScopeRule::NonPersonal => {
            let c = col(b, "r.patient_id");
            b.s(c).s(" IS NULL");
        }
        ScopeRule::Patient { id, types } => {
            let c = col(b, "r.patient_id");
            b.s("(").s(c);
            match patients {
                None => {
                    b.s(" = ").text(id);
                }
                Some(ids) => {
                    let list = serde_json::to_string(ids).unwrap_or_else(|_| "[]".into());
                    match b.d {
                        Dialect::Sqlite => {
                            b.s(" IN (SELECT value FROM json_each(").text(&list).s("))")
                        }
                        Dialect::Postgres => b
                            .s(" IN (SELECT jsonb_array_elements_text(")
                            .text(&list)
                            .s("::text::jsonb))"),
                    };
                }
            }
            if let Some(types) = types {
                // over a list, the patients drive (see `search_where`), never the type
                let c = if patients.is_some() {
                    b.d.noindex("r.rt")
                } else {
                    col(b, "r.rt")
                };
                in_list(b, c, types);
            }
            b.s(")");
        }
        ScopeRule::AuthoredBy { org, types } => {
            let c = col(b, "r.author_org");
            b.s("(").s(c).s(" = ").text(org);
            if let Some(types) = types {
                let c = col(b, "r.rt");
                in_list(b, c, types);
            }
            b.s(")");
        }
        ScopeRule::Labeled { rule, filter } => {
            b.s("(");
            rule_sql_for(b, rule, noindex, patients);
            if !filter.deny.is_empty() {
                b.s(" AND NOT ");
                label_exists(b, &filter.system, Some(&filter.deny));
            }
            match (&filter.allow, filter.unlabelled) {
                (None, true) => {}
                (None, false) => {
                    b.s(" AND ");
                    label_exists(b, &filter.system, None);
                }
                (Some(allow), true) => {
                    b.s(" AND (NOT ");
                    label_exists(b, &filter.system, None);
                    b.s(" OR ");
                    label_exists(b, &filter.system, Some(allow));
                    b.s(")");
                }
                (Some(allow), false) => {
                    b.s(" AND ");
                    label_exists(b, &filter.system, Some(allow));
                }
            }
            b.s(")");
        }
        ScopeRule::Label {
            system,
            code,
            types,
        } => {
            b.s("(r.patient_id IS NOT NULL");
            if let Some(types) = types {
                let c = col(b, "r.rt");
                in_list(b, c, types);
            }
            b.s(" AND ");
            label_exists(b, system, Some(std::slice::from_ref(code)));
            b.s(")");
        }
    }
}

/// Appends the scope restriction on alias `r` (always a complete boolean term).
///
/// With `noindex`, SQLite is kept from driving the query from the scope's
/// indexes (another index — a clause or the rowid list — is far more selective).
fn scope_sql(b: &mut B, scope: &Scope, noindex: bool) {
    match scope {
        Scope::Unrestricted => {
            b.s("1 = 1");
        }
        Scope::AnyOf(rules) if rules.is_empty() => {
            b.s("1 = 0");
        }
        Scope::AnyOf(rules) => {
            b.s("(");
            for (i, (rule, patients)) in patient_groups(rules).into_iter().enumerate() {
                if i > 0 {
                    b.s(" OR ");
                }
                match patients {
                    Some(ids) if ids.len() > 1 => rule_sql_for(b, rule, noindex, Some(&ids)),
                    _ => rule_sql(b, rule, noindex),
                }
            }
            b.s(")");
        }
    }
}

/// A patient rule without its patient: its types and its label filter.
type RuleShape<'a> = (Option<&'a Vec<String>>, Option<&'a LabelFilter>);

/// The patient a rule admits, and the rest of it: rules equal in the rest differ
/// only in the patient.
fn patient_part(rule: &ScopeRule) -> Option<(&str, RuleShape<'_>)> {
    match rule {
        ScopeRule::Patient { id, types } => Some((id, (types.as_ref(), None))),
        ScopeRule::Labeled { rule, filter } => match rule.as_ref() {
            ScopeRule::Patient { id, types } => Some((id, (types.as_ref(), Some(filter)))),
            _ => None,
        },
        _ => None,
    }
}

/// The rules in order, those that differ only in the patient merged into their
/// first, with the patients' ids. A facility's live consents give one rule per
/// patient (thousands at a hospital): merged, they are one clause over one bound
/// list, so the statement's text does not grow with them and is prepared once.
fn patient_groups(rules: &[ScopeRule]) -> Vec<(&ScopeRule, Option<Vec<&str>>)> {
    let mut out: Vec<(&ScopeRule, Option<Vec<&str>>)> = Vec::new();
    for rule in rules {
        let Some((id, shape)) = patient_part(rule) else {
            out.push((rule, None));
            continue;
        };
        let same = out.iter_mut().find(|(first, ids)| {
            ids.is_some() && patient_part(first).is_some_and(|(_, s)| s == shape)
        });
        match same {
            Some((_, Some(ids))) => ids.push(id),
            _ => out.push((rule, Some(vec![id]))),
        }
    }
    out
}

/// ` AND col IN (...)`; an empty list admits nothing.
fn in_list(b: &mut B, col: &str, values: &[String]) {
    if values.is_empty() {
        b.s(" AND 1 = 0");
        return;
    }
    b.s(" AND ").s(col).s(" IN (");
    for (i, v) in values.iter().enumerate() {
        if i > 0 {
            b.s(", ");
        }
        b.text(v);
    }
    b.s(")");
}

/// Keeps SQLite looking a correlated subquery's entries up by (rid, k), the
/// table's key, by marking the value columns in the SQL written since `start`
/// (`+x.code`: no index for that term). Both keys begin with `k`, and without
/// statistics SQLite would otherwise take the value index, which the row's
/// rid cannot narrow: a range over every resource's entries per checked row.
/// Only bound parameters follow `start`, so `alias` occurs only as a column prefix.
fn per_row_lookup(b: &mut B, start: usize, alias: &str) {
    if b.d == Dialect::Sqlite {
        let tail = b.sql.split_off(start);
        b.sql.push_str(&tail.replace(alias, &format!("+{alias}")));
    }
}

/// Opens a subquery over an index table restricted to the param; the caller
/// appends `AND (condition)`, then [`close_index`].
fn open_index(b: &mut B, table: &str, rt: &str, param: &str, negate: bool, correlated: bool) {
    let not = if negate { "NOT " } else { "" };
    if correlated {
        b.s(not)
            .s("EXISTS (SELECT 1 FROM ")
            .s(table)
            .s(" x WHERE x.rid = r.rid AND x.k = ");
    } else {
        b.s("r.rid ")
            .s(not)
            .s("IN (SELECT x.rid FROM ")
            .s(table)
            .s(" x WHERE x.k = ");
    }
    b.int(param_key(rt, param));
}

/// Closes what [`open_index`] opened; `start` is where the conditions began.
fn close_index(b: &mut B, start: usize, correlated: bool) {
    if correlated {
        per_row_lookup(b, start, "x.");
    }
    b.s(")");
}

/// Date prefix semantics over a resource range [lo_col, hi_col] and search range [plo, phi].
fn date_cond(b: &mut B, lo: &str, hi: &str, m: &DateMatch) {
    let (plo, phi) = (m.lo, m.hi);
    match m.prefix {
        Prefix::Eq => {
            // `lo <= phi` follows from `lo <= hi <= phi` for every well-formed
            // range; stated, it bounds the index range scan on (lo, hi) from
            // both sides, so `birthdate=D` reads that day's rows, not every row
            // from D onwards. (A stored range with lo > hi, an invalid Period,
            // never matches `eq`.)
            b.s(lo)
                .s(" >= ")
                .int(plo)
                .s(" AND ")
                .s(lo)
                .s(" <= ")
                .int(phi)
                .s(" AND ")
                .s(hi)
                .s(" <= ")
                .int(phi);
        }
        Prefix::Ne => {
            b.s("(")
                .s(lo)
                .s(" < ")
                .int(plo)
                .s(" OR ")
                .s(hi)
                .s(" > ")
                .int(phi)
                .s(")");
        }
        Prefix::Lt => {
            b.s(lo).s(" < ").int(plo);
        }
        Prefix::Le => {
            b.s(lo).s(" <= ").int(phi);
        }
        Prefix::Gt => {
            b.s(hi).s(" > ").int(phi);
        }
        Prefix::Ge => {
            b.s(hi).s(" >= ").int(plo);
        }
        Prefix::Sa => {
            b.s(lo).s(" > ").int(phi);
        }
        Prefix::Eb => {
            b.s(hi).s(" < ").int(plo);
        }
        Prefix::Ap => {
            b.s(lo)
                .s(" <= ")
                .int(phi)
                .s(" AND ")
                .s(hi)
                .s(" >= ")
                .int(plo);
        }
    }
}

/// Number/quantity prefix semantics on `x.value`.
fn number_cond(b: &mut B, m: &NumberMatch, quantity: bool) {
    b.s("(");
    match m.prefix {
        Prefix::Eq => {
            b.s("x.value >= ")
                .real(m.lo)
                .s(" AND x.value < ")
                .real(m.hi);
        }
        Prefix::Ne => {
            b.s("(x.value < ")
                .real(m.lo)
                .s(" OR x.value >= ")
                .real(m.hi)
                .s(")");
        }
        Prefix::Lt | Prefix::Eb => {
            b.s("x.value < ").real(m.value);
        }
        Prefix::Le => {
            b.s("x.value <= ").real(m.value);
        }
        Prefix::Gt | Prefix::Sa => {
            b.s("x.value > ").real(m.value);
        }
        Prefix::Ge => {
            b.s("x.value >= ").real(m.value);
        }
        Prefix::Ap => {
            // "approximately": within 10% of the value (and at least its precision range)
            let d = (m.value.abs() * 0.1).max((m.hi - m.lo) / 2.0);
            b.s("x.value >= ")
                .real(m.value - d)
                .s(" AND x.value <= ")
                .real(m.value + d);
        }
    }
    if quantity {
        if let Some(s) = &m.system {
            b.s(" AND x.system = ").text(s);
        }
        if let Some(c) = &m.code {
            b.s(" AND x.code = ").text(c);
        }
    }
    b.s(")");
}

/// Smallest string greater than every string with prefix `p` (byte/codepoint order),
/// None when there is none (then only the lower bound applies).
fn prefix_upper(p: &str) -> Option<String> {
    let mut chars: Vec<char> = p.chars().collect();
    while let Some(last) = chars.pop() {
        let mut next = last as u32 + 1;
        if (0xD800..=0xDFFF).contains(&next) {
            next = 0xE000;
        }
        if let Some(c) = char::from_u32(next) {
            chars.push(c);
            return Some(chars.into_iter().collect());
        }
    }
    None
}

/// OR-ed alternatives; an empty list matches nothing.
fn alternatives<T>(b: &mut B, items: &[T], mut f: impl FnMut(&mut B, &T)) {
    if items.is_empty() {
        b.s("1 = 0");
        return;
    }
    b.s("(");
    for (i, it) in items.iter().enumerate() {
        if i > 0 {
            b.s(" OR ");
        }
        b.s("(");
        f(b, it);
        b.s(")");
    }
    b.s(")");
}

fn clause_sql(b: &mut B, rt: &str, c: &Clause, corr: bool) {
    let p = c.param.as_str();
    match &c.criterion {
        Criterion::Id(ids) => {
            if ids.is_empty() {
                b.s("1 = 0");
            } else {
                b.s("r.id IN (");
                for (i, id) in ids.iter().enumerate() {
                    if i > 0 {
                        b.s(", ");
                    }
                    b.text(id);
                }
                b.s(")");
            }
        }
        Criterion::LastUpdated(ms) => alternatives(b, ms, |b, m| {
            date_cond(b, "r.last_updated", "r.last_updated", m)
        }),
        Criterion::String { mode, values } => {
            open_index(b, "ix_string", rt, p, false, corr);
            let start = b.sql.len();
            b.s(" AND ");
            let mode = *mode;
            let strpos = b.d.strpos();
            alternatives(b, values, |b, v| match mode {
                StringMode::StartsWith => {
                    b.s("x.norm >= ").text(v);
                    if let Some(up) = prefix_upper(v) {
                        b.s(" AND x.norm < ").text(&up);
                    }
                }
                StringMode::Exact => {
                    b.s("x.exact = ").text(v);
                }
                StringMode::Contains => {
                    b.s(strpos).s("(x.norm, ").text(v).s(") > 0");
                }
            });
            close_index(b, start, corr);
        }
        Criterion::Token { values, negate } => {
            open_index(b, "ix_token", rt, p, *negate, corr);
            let start = b.sql.len();
            b.s(" AND ");
            // several codes of one system (`_tag=s|a,s|b`): `code IN (...)` keeps
            // the lookup on the (k, code, system) index; OR-ed pairs
            // would read every row of the parameter
            let one_system = values.first().and_then(|t| t.system.clone().flatten());
            if values.len() > 1
                && let Some(system) = one_system
                && values.iter().all(|t| {
                    t.code.is_some()
                        && t.system.as_ref().and_then(|s| s.as_deref()) == Some(system.as_str())
                })
            {
                b.s("x.system = ").text(&system).s(" AND x.code IN (");
                for (i, t) in values.iter().enumerate() {
                    if i > 0 {
                        b.s(", ");
                    }
                    b.text(t.code.as_deref().unwrap_or_default());
                }
                b.s(")");
                close_index(b, start, corr);
                return;
            }
            alternatives(b, values, |b, t| {
                let mut any = true;
                match &t.system {
                    None => {}
                    Some(None) => {
                        b.s("x.system = ").text(ABSENT);
                        any = false;
                    }
                    Some(Some(s)) => {
                        b.s("x.system = ").text(s);
                        any = false;
                    }
                }
                if let Some(code) = &t.code {
                    if !any {
                        b.s(" AND ");
                    }
                    b.s("x.code = ").text(code);
                    any = false;
                }
                if any {
                    b.s("1 = 1");
                }
            });
            close_index(b, start, corr);
        }
        Criterion::Date(ms) => {
            open_index(b, "ix_date", rt, p, false, corr);
            let start = b.sql.len();
            b.s(" AND ");
            alternatives(b, ms, |b, m| date_cond(b, "x.lo", "x.hi", m));
            close_index(b, start, corr);
        }
        Criterion::Number(ms) | Criterion::Quantity(ms) => {
            let quantity = matches!(c.criterion, Criterion::Quantity(_));
            open_index(b, "ix_number", rt, p, false, corr);
            let start = b.sql.len();
            b.s(" AND ");
            alternatives(b, ms, |b, m| number_cond(b, m, quantity));
            close_index(b, start, corr);
        }
        Criterion::Reference(refs) => {
            open_index(b, "ix_reference", rt, p, false, corr);
            let start = b.sql.len();
            b.s(" AND ");
            alternatives(b, refs, |b, m| {
                b.s("x.target_id = ").text(&m.target_id);
                if let Some(t) = &m.target_type {
                    b.s(" AND x.target_type = ").text(t);
                }
            });
            close_index(b, start, corr);
        }
        Criterion::Uri(values) => {
            open_index(b, "ix_uri", rt, p, false, corr);
            let start = b.sql.len();
            b.s(" AND ");
            alternatives(b, values, |b, v| {
                b.s("x.value = ").text(v);
            });
            close_index(b, start, corr);
        }
        Criterion::Missing(missing) => {
            b.s(if *missing { "NOT EXISTS (" } else { "EXISTS (" });
            let k = param_key(rt, p);
            for (i, t) in INDEX_TABLES.iter().enumerate() {
                if i > 0 {
                    b.s(" UNION ALL ");
                }
                b.s("SELECT 1 FROM ")
                    .s(t)
                    .s(" x WHERE x.rid = r.rid AND x.k = ")
                    .int(k);
            }
            b.s(")");
        }
    }
}

/// Characters from which a string prefix is trusted to be selective.
const SELECTIVE_PREFIX_CHARS: usize = 3;

/// How selective a clause is likely to be as the driving index lookup, lower is
/// better; None when it should never drive (negations, `:missing`, open ranges,
/// substring matches: those are checked per candidate row instead).
fn drive_rank(c: &Criterion) -> Option<u8> {
    match c {
        Criterion::Reference(_) => Some(0),
        Criterion::Token { negate: false, .. } => Some(1),
        Criterion::Uri(_) => Some(2),
        Criterion::String {
            mode: StringMode::Exact,
            ..
        } => Some(3),
        // A prefix of one or two characters (two kana of a family name) matches
        // 3-13 % of all patients in the benchmark data: an equality on a date (a
        // birth month is about 1/1000) or a number narrows far more, so a short
        // prefix drives only when nothing else can.
        Criterion::String {
            mode: StringMode::StartsWith,
            values,
        } if values
            .iter()
            .all(|v| v.chars().count() >= SELECTIVE_PREFIX_CHARS) =>
        {
            Some(4)
        }
        Criterion::String {
            mode: StringMode::StartsWith,
            ..
        } => Some(7),
        Criterion::Date(ms)
            if ms
                .iter()
                .all(|m| matches!(m.prefix, Prefix::Eq | Prefix::Ap)) =>
        {
            Some(5)
        }
        Criterion::Number(ms) | Criterion::Quantity(ms)
            if ms.iter().all(|m| m.prefix == Prefix::Eq) =>
        {
            Some(6)
        }
        _ => None,
    }
}

/// The clause evaluated as `rid IN (index lookup)` to drive the search; every
/// other clause is a correlated `EXISTS` checked per candidate row. None when a
/// patient scope or `_id` already narrows the candidates better, or no clause
/// is selective: then the type (or patient) index drives, in sort order.
///
/// Choosing in SQL rather than leaving it to the planner keeps SQLite (which has
/// no statistics on a fresh database) from scanning a whole type and keeps it
/// from materialising large, unselective subqueries.
fn driver(q: &SearchQuery, scope: &Scope) -> Option<usize> {
    if correlated(scope)
        || q.clauses
            .iter()
            .any(|c| matches!(c.criterion, Criterion::Id(_)))
    {
        return None;
    }
    q.clauses
        .iter()
        .enumerate()
        .filter_map(|(i, c)| drive_rank(&c.criterion).map(|r| (r, i)))
        .min()
        .map(|(_, i)| i)
}

/// `WHERE ...` for a search: type, not deleted, scope, clauses.
fn search_where(b: &mut B, q: &SearchQuery, scope: &Scope) {
    // With a long `_id` list SQLite (no statistics) prefers walking the whole
    // type in last-updated order to sorting the listed rows; the sort then
    // names the column so that no index can serve it.
    b.ids_listed = q
        .clauses
        .iter()
        .any(|c| matches!(c.criterion, Criterion::Id(_)));
    let driver = driver(q, scope);
    // Without a driving clause, a scope of patients only is driven by the patient
    // index (a facility's consents may list thousands of patients, the type has
    // millions of rows): SQLite would otherwise walk the type in last-updated
    // order to save the sort.
    let rt = if driver.is_some() || patients_only(scope) {
        b.d.noindex("r.rt")
    } else {
        "r.rt"
    };
    b.s(" WHERE ")
        .s(rt)
        .s(" = ")
        .text(&q.resource_type)
        .s(" AND r.deleted = FALSE AND ");
    scope_sql(b, scope, driver.is_some());
    for (i, c) in q.clauses.iter().enumerate() {
        b.s(" AND ");
        clause_sql(b, &q.resource_type, c, driver != Some(i));
    }
}

fn sort_sql(b: &mut B, rt: &str, sort: &[SortKey]) -> FhirResult<()> {
    let lu = if b.ids_listed && b.d == Dialect::Sqlite {
        "+r.last_updated"
    } else {
        "r.last_updated"
    };
    b.s(" ORDER BY ");
    if sort.is_empty() {
        b.s(lu).s(" DESC, r.id ASC");
        return Ok(());
    }
    for k in sort {
        let dir = if k.descending { "DESC" } else { "ASC" };
        match k.param.as_str() {
            "_id" => {
                b.s("r.id ").s(dir);
            }
            "_lastUpdated" => {
                b.s(lu).s(" ").s(dir);
            }
            _ => {
                let (table, col) = match k.param_type {
                    ParamType::String => ("ix_string", "norm"),
                    ParamType::Token => ("ix_token", "code"),
                    ParamType::Date => ("ix_date", "lo"),
                    ParamType::Number | ParamType::Quantity => ("ix_number", "value"),
                    ParamType::Reference => ("ix_reference", "target_id"),
                    ParamType::Uri => ("ix_uri", "value"),
                    ParamType::Composite | ParamType::Special => {
                        return Err(FhirError::not_supported(format!(
                            "sorting by parameter '{}' of type {} is not supported",
                            k.param,
                            k.param_type.as_str()
                        )));
                    }
                };
                let agg = if k.descending { "MAX" } else { "MIN" };
                let _ = write!(
                    b.sql,
                    "(SELECT {agg}(s.{col}) FROM {table} s WHERE s.rid = r.rid AND s.k = "
                );
                b.int(param_key(rt, &k.param))
                    .s(") ")
                    .s(dir)
                    .s(" NULLS LAST");
            }
        }
        b.s(", ");
    }
    b.s("r.id ASC");
    Ok(())
}

/// The page of matches: [`RESOURCE_COLUMNS`], ordered and paged.
pub fn search_page(d: Dialect, q: &SearchQuery, scope: &Scope) -> FhirResult<Built> {
    page_of(d, q, scope, RESOURCE_COLUMNS)
}

/// The page of matches as [`TEXT_COLUMNS`], ordered and paged like [`search_page`].
pub fn search_text_page(d: Dialect, q: &SearchQuery, scope: &Scope) -> FhirResult<Built> {
    page_of(d, q, scope, TEXT_COLUMNS)
}

fn page_of(d: Dialect, q: &SearchQuery, scope: &Scope, columns: &str) -> FhirResult<Built> {
    // The page is chosen over the current rows alone and only its rows are
    // joined to their bodies: ordering every match with its body (as a plain
    // ORDER BY ... LIMIT does) reads and sorts all the matched bodies for
    // every page.
    let mut b = B::new(d);
    b.s("SELECT ")
        .s(columns)
        .s(FROM_CURRENT)
        .s(" WHERE r.rid IN (SELECT r.rid FROM resource_current r");
    search_where(&mut b, q, scope);
    order_and_page(&mut b, q)?;
    b.s(")");
    sort_sql(&mut b, &q.resource_type, &q.sort)?;
    Ok(b.done())
}

/// The ids of a search page (same WHERE, order and paging as [`search_page`]).
pub fn search_ids(d: Dialect, q: &SearchQuery, scope: &Scope) -> FhirResult<Built> {
    let mut b = B::new(d);
    b.s("SELECT r.id FROM resource_current r");
    search_where(&mut b, q, scope);
    order_and_page(&mut b, q)?;
    Ok(b.done())
}

/// `ORDER BY ... LIMIT ... OFFSET ...` of a search page.
fn order_and_page(b: &mut B, q: &SearchQuery) -> FhirResult<()> {
    sort_sql(b, &q.resource_type, &q.sort)?;
    b.s(" LIMIT ")
        .int(to_i64(q.count))
        .s(" OFFSET ")
        .int(to_i64(q.offset));
    Ok(())
}

/// Current, not deleted resources of one type in id order, after `after`
/// (keyset paging: each page costs the same however far the scan has gone).
pub fn scan(d: Dialect, resource_type: &str, after: Option<&str>, limit: usize) -> Built {
    let mut b = B::new(d);
    b.s("SELECT ").s(RESOURCE_COLUMNS).s(FROM_CURRENT);
    b.s(" WHERE r.rt = ")
        .text(resource_type)
        .s(" AND r.deleted = FALSE");
    if let Some(a) = after {
        b.s(" AND r.id > ").text(a);
    }
    b.s(" ORDER BY r.id ASC LIMIT ").int(to_i64(limit));
    b.done()
}

/// Current, not deleted resources of every type in rid order after `after_rid`
/// (keyset paging), for rebuilding the index tables.
pub fn reindex_page(d: Dialect, after_rid: i64, limit: usize) -> Built {
    let mut b = B::new(d);
    b.s("SELECT ").s(RESOURCE_COLUMNS).s(FROM_CURRENT);
    b.s(" WHERE r.deleted = FALSE AND r.rid > ")
        .int(after_rid)
        .s(" ORDER BY r.rid ASC LIMIT ")
        .int(to_i64(limit));
    b.done()
}

/// `SELECT COUNT(*)` of all matches (no paging).
pub fn search_count(d: Dialect, q: &SearchQuery, scope: &Scope) -> Built {
    let mut b = B::new(d);
    b.s("SELECT COUNT(*) FROM resource_current r");
    search_where(&mut b, q, scope);
    b.done()
}

/// `r.rid IN (...)`: the rids of the newest `latest.per` matches of each group.
/// The window runs over the search's own WHERE (type, scope, clauses), so the
/// grouping never sees a row outside the caller's scope.
fn latest_rids(b: &mut B, q: &SearchQuery, scope: &Scope, latest: &LatestPer) {
    b.s("r.rid IN (SELECT w.rid FROM (SELECT r.rid AS rid, ROW_NUMBER() OVER (PARTITION BY g.system, g.code ORDER BY ")
        .s("(SELECT MAX(dd.lo) FROM ix_date dd WHERE dd.rid = r.rid AND dd.k = ")
        .int(param_key(&q.resource_type, &latest.by))
        .s(") DESC NULLS LAST, r.last_updated DESC, r.rid DESC) AS rn FROM resource_current r JOIN ix_token g ON g.rid = r.rid AND g.k = ")
        .int(param_key(&q.resource_type, &latest.param));
    search_where(b, q, scope);
    b.s(") w WHERE w.rn <= ").int(to_i64(latest.per)).s(")");
}

/// The page of a latest-per-group search ([`LatestPer`]), in the search's order.
pub fn search_latest_page(
    d: Dialect,
    q: &SearchQuery,
    scope: &Scope,
    latest: &LatestPer,
) -> FhirResult<Built> {
    let mut b = B::new(d);
    b.s("SELECT ")
        .s(RESOURCE_COLUMNS)
        .s(FROM_CURRENT)
        .s(" WHERE ");
    latest_rids(&mut b, q, scope, latest);
    order_and_page(&mut b, q)?;
    Ok(b.done())
}

/// `SELECT COUNT(*)` of a latest-per-group search.
pub fn search_latest_count(
    d: Dialect,
    q: &SearchQuery,
    scope: &Scope,
    latest: &LatestPer,
) -> Built {
    let mut b = B::new(d);
    b.s("SELECT COUNT(*) FROM resource_current r WHERE ");
    latest_rids(&mut b, q, scope, latest);
    b.done()
}

fn rid_list(b: &mut B, rids: &[i64]) {
    b.s("(");
    for (i, r) in rids.iter().enumerate() {
        if i > 0 {
            b.s(", ");
        }
        b.int(*r);
    }
    b.s(")");
}

/// Resources referenced by `rids` (all of type `inc.source_type`) through
/// `inc.param` (current, not deleted, in scope).
pub fn include(d: Dialect, inc: &Include, rids: &[i64], scope: &Scope) -> Built {
    let mut b = B::new(d);
    b.s("SELECT ")
        .s(RESOURCE_COLUMNS)
        .s(FROM_CURRENT)
        .s(" WHERE r.deleted = FALSE AND ");
    scope_sql(&mut b, scope, true);
    // the rids are all of the source type: the entries are read by (rid, k)
    b.s(" AND r.rid IN (SELECT c.rid FROM ix_reference x JOIN resource_current c ON c.rt = x.target_type AND c.id = x.target_id WHERE x.rid IN ");
    rid_list(&mut b, rids);
    b.s(" AND x.k = ")
        .int(param_key(&inc.source_type, &inc.param));
    if let Some(t) = &inc.target_type {
        b.s(" AND x.target_type = ").text(t);
    }
    b.s(") ORDER BY r.rt, r.id");
    b.done()
}

/// Resources of `inc.source_type` whose `inc.param` references one of `ids` of type `target_type`.
pub fn revinclude(
    d: Dialect,
    inc: &Include,
    target_type: &str,
    ids: &[String],
    scope: &Scope,
) -> Built {
    let mut b = B::new(d);
    b.s("SELECT ")
        .s(RESOURCE_COLUMNS)
        .s(FROM_CURRENT)
        .s(" WHERE r.deleted = FALSE AND ");
    // the type is implied by the key; the reference index drives
    scope_sql(&mut b, scope, true);
    b.s(" AND r.rid IN (SELECT x.rid FROM ix_reference x WHERE x.k = ")
        .int(param_key(&inc.source_type, &inc.param))
        .s(" AND x.target_type = ")
        .text(target_type);
    in_list(&mut b, "x.target_id", ids);
    b.s(") ORDER BY r.rt, r.id");
    b.done()
}

fn compartment_where(b: &mut B, patient_id: &str, scope: &Scope) {
    b.s(" WHERE r.deleted = FALSE AND (r.patient_id = ")
        .text(patient_id);
    b.s(" OR (r.rt = 'Patient' AND r.id = ")
        .text(patient_id)
        .s(")) AND ");
    scope_sql(b, scope, true);
}

/// A patient's compartment: the Patient first, then by type and id.
pub fn compartment_page(
    d: Dialect,
    patient_id: &str,
    scope: &Scope,
    count: usize,
    offset: usize,
) -> Built {
    let mut b = B::new(d);
    b.s("SELECT ").s(RESOURCE_COLUMNS).s(FROM_CURRENT);
    compartment_where(&mut b, patient_id, scope);
    b.s(" ORDER BY CASE WHEN r.rt = 'Patient' AND r.id = ")
        .text(patient_id);
    b.s(" THEN 0 ELSE 1 END, r.rt, r.id LIMIT ")
        .int(to_i64(count))
        .s(" OFFSET ")
        .int(to_i64(offset));
    b.done()
}

pub fn compartment_count(d: Dialect, patient_id: &str, scope: &Scope) -> Built {
    let mut b = B::new(d);
    b.s("SELECT COUNT(*) FROM resource_current r");
    compartment_where(&mut b, patient_id, scope);
    b.done()
}

/// Page size used when a history query asks for `count == 0`.
pub const DEFAULT_HISTORY_COUNT: usize = 50;

/// Versions newest first, with rt/id from the current row.
pub fn history(d: Dialect, q: &HistoryQuery) -> Built {
    let mut b = B::new(d);
    b.s(
        "SELECT v.rid, r.rt, r.id, v.version, v.last_updated, v.deleted, v.body, v.author_org \
         FROM resource_version v JOIN resource_current r ON r.rid = v.rid WHERE 1 = 1",
    );
    if let Some(rt) = &q.resource_type {
        b.s(" AND v.rt = ").text(rt);
    }
    if let Some(id) = &q.id {
        b.s(" AND r.id = ").text(id);
    }
    if let Some(since) = &q.since {
        b.s(" AND v.last_updated >= ").int(since.timestamp_millis());
    }
    b.s(" ORDER BY v.last_updated DESC, v.rid DESC, v.version DESC LIMIT ");
    let count = if q.count == 0 {
        DEFAULT_HISTORY_COUNT
    } else {
        q.count
    };
    b.int(to_i64(count)).s(" OFFSET ").int(to_i64(q.offset));
    b.done()
}

/// Page size used when an audit query asks for `limit == 0`.
pub const DEFAULT_AUDIT_LIMIT: usize = 100;

/// Where an auditors' query reads records from (the SQLite backend keeps its
/// audit records in two files, and indexes both in a third).
#[derive(Clone, Copy, Debug)]
pub enum AuditSource<'a> {
    /// A table whose own indexes serve every filter.
    Table(&'a str),
    /// A table with no index but its `seq`, whose records up to `upto` are found
    /// through the tables `audit_patient`, `audit_usr`, `audit_org` and
    /// `audit_recorded` of `schema` (each keyed `(src, key, seq)`, where `src`
    /// tells the tables indexed there apart); later records by scanning the
    /// table's tail.
    Indexed {
        table: &'a str,
        schema: &'a str,
        src: i64,
        upto: i64,
    },
}

/// Auditors' query over `sources`, newest first. Every branch applies all of the
/// filter to the records themselves; an index only chooses which to look at.
pub fn audit_query(d: Dialect, sources: &[AuditSource<'_>], f: &AuditFilter) -> Built {
    let limit = to_i64(if f.limit == 0 {
        DEFAULT_AUDIT_LIMIT
    } else {
        f.limit
    });
    let mut b = B::new(d);
    let mut branches = 0;
    for source in sources {
        match *source {
            AuditSource::Table(table) => audit_branch(&mut b, &mut branches, table, None, f, limit),
            AuditSource::Indexed {
                table,
                schema,
                src,
                upto,
            } => match audit_index_for(f) {
                Some((index, key)) => {
                    let by = IndexedBy {
                        schema,
                        index,
                        src,
                        key,
                        upto,
                    };
                    audit_branch(&mut b, &mut branches, table, Some(by), f, limit);
                    audit_branch(&mut b, &mut branches, table, None, &after(f, upto), limit);
                }
                None => audit_branch(&mut b, &mut branches, table, None, f, limit),
            },
        }
    }
    b.s(" ORDER BY seq DESC LIMIT ").int(limit);
    b.done()
}

/// The most selective of the audit index file's tables for `f`: its name, and the
/// column and value looked up (None: the time range `since`..`until` on `recorded`).
fn audit_index_for(f: &AuditFilter) -> Option<(&'static str, Option<(&'static str, &str)>)> {
    if let Some(p) = &f.patient {
        Some(("audit_patient", Some(("patient", p))))
    } else if let Some(u) = &f.user {
        Some(("audit_usr", Some(("usr", u))))
    } else if let Some(o) = &f.org {
        Some(("audit_org", Some(("org", o))))
    } else if f.since.is_some() || f.until.is_some() {
        Some(("audit_recorded", None))
    } else {
        None
    }
}

/// `f` restricted to the records after `upto`.
fn after(f: &AuditFilter, upto: i64) -> AuditFilter {
    AuditFilter {
        after_seq: Some(f.after_seq.map_or(upto, |a| a.max(upto))),
        ..f.clone()
    }
}

/// An index that drives one branch of [`audit_query`], covering seqs up to `upto`.
#[derive(Clone, Copy)]
struct IndexedBy<'a> {
    schema: &'a str,
    index: &'a str,
    /// Which table's entries, of those the index holds.
    src: i64,
    /// The column and value looked up; None for the time range of `recorded`.
    key: Option<(&'a str, &'a str)>,
    upto: i64,
}

/// One `UNION ALL` branch: its own newest `limit` records (so that it can stop
/// early), filtered on the record's columns.
fn audit_branch(
    b: &mut B,
    branches: &mut usize,
    table: &str,
    by: Option<IndexedBy<'_>>,
    f: &AuditFilter,
    limit: i64,
) {
    if *branches > 0 {
        b.s(" UNION ALL ");
    }
    let alias = format!("a{branches}");
    *branches += 1;
    b.s("SELECT * FROM (SELECT l.seq, l.recorded, l.record, l.prev_hash, l.hash FROM ")
        .s(table)
        .s(" l");
    let order = match by {
        Some(i) => {
            b.s(" JOIN ")
                .s(i.schema)
                .s(".")
                .s(i.index)
                .s(" i ON i.src = ")
                .int(i.src)
                .s(" AND i.seq = l.seq AND i.seq <= ")
                .int(i.upto);
            match i.key {
                Some((column, value)) => {
                    b.s(" AND i.").s(column).s(" = ").text(value);
                }
                None => {
                    if let Some(s) = &f.since {
                        b.s(" AND i.recorded >= ").int(s.timestamp_millis());
                    }
                    if let Some(u) = &f.until {
                        b.s(" AND i.recorded <= ").int(u.timestamp_millis());
                    }
                }
            }
            // newest first along the index, so that the branch can stop at `limit`
            "i.seq"
        }
        None => "l.seq",
    };
    b.s(" WHERE 1 = 1");
    for (col, v) in [
        ("patient", &f.patient),
        ("org", &f.org),
        ("usr", &f.user),
        ("purpose", &f.purpose),
    ] {
        if let Some(v) = v {
            b.s(" AND l.").s(col).s(" = ").text(v);
        }
    }
    if let Some(s) = &f.since {
        b.s(" AND l.recorded >= ").int(s.timestamp_millis());
    }
    if let Some(u) = &f.until {
        b.s(" AND l.recorded <= ").int(u.timestamp_millis());
    }
    if let Some(a) = f.after_seq {
        b.s(" AND l.seq > ").int(a);
    }
    b.s(" ORDER BY ")
        .s(order)
        .s(" DESC LIMIT ")
        .int(limit)
        .s(") ")
        .s(&alias);
}

fn to_i64(n: usize) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tsunagi_fhir::search::TokenMatch;

    #[test]
    fn prefix_upper_bounds() {
        assert_eq!(prefix_upper("abc").as_deref(), Some("abd"));
        assert_eq!(prefix_upper("").as_deref(), None);
        assert_eq!(prefix_upper("a\u{10FFFF}").as_deref(), Some("b"));
    }

    #[test]
    fn every_r4_search_parameter_has_its_own_key() {
        let m = tsunagi_fhir::model::model();
        let mut seen = std::collections::HashMap::new();
        for rt in m.resource_types() {
            for p in m.indexed_params(rt) {
                let k = param_key(rt, &p.code);
                if let Some(other) = seen.insert(k, (rt.clone(), p.code.clone())) {
                    panic!("{rt}/{} and {}/{} share key {k}", p.code, other.0, other.1);
                }
            }
        }
        assert!(seen.len() > 1000, "only {} parameters", seen.len());
        let security = param_key("", SECURITY_PARAM);
        assert!(!seen.contains_key(&security));
        // the security key does not depend on the type; every other key does
        assert_eq!(param_key("Patient", SECURITY_PARAM), security);
        assert_ne!(
            param_key("Patient", "name"),
            param_key("Practitioner", "name")
        );
    }

    #[test]
    fn a_scope_of_many_patients_is_one_statement_whatever_their_number() {
        let rules = |n: usize| -> Scope {
            let mut r: Vec<ScopeRule> = (0..n)
                .map(|i| ScopeRule::Patient {
                    id: format!("p{i}"),
                    types: Some(vec!["Coverage".into()]),
                })
                .collect();
            r.push(ScopeRule::NonPersonal);
            Scope::AnyOf(r)
        };
        let q = SearchQuery::new("Coverage");
        for d in [Dialect::Sqlite, Dialect::Postgres] {
            let two = search_page(d, &q, &rules(2)).unwrap();
            let many = search_page(d, &q, &rules(3000)).unwrap();
            assert_eq!(
                two.sql, many.sql,
                "{d:?}: the text does not grow with the patients"
            );
            assert_eq!(two.params.len(), many.params.len());
            let list = many
                .params
                .iter()
                .find_map(|p| match p {
                    SqlValue::Text(t) if t.starts_with('[') => Some(t.clone()),
                    _ => None,
                })
                .expect("the patients are bound as one list");
            let ids: Vec<String> = serde_json::from_str(&list).unwrap();
            assert_eq!(ids.len(), 3000);
            assert_eq!((ids[0].as_str(), ids[2999].as_str()), ("p0", "p2999"));
        }
        // one patient keeps the plain equality (and its index)
        let one = search_page(Dialect::Sqlite, &q, &rules(1)).unwrap();
        assert!(!one.sql.contains("json_each"), "{}", one.sql);
    }

    #[test]
    fn placeholders_are_numbered_per_dialect() {
        let q = SearchQuery::new("Patient").with(
            "identifier",
            Criterion::Token {
                values: vec![TokenMatch {
                    system: None,
                    code: Some("1".into()),
                }],
                negate: false,
            },
        );
        let s = search_page(Dialect::Sqlite, &q, &Scope::Unrestricted).unwrap();
        let p = search_page(Dialect::Postgres, &q, &Scope::Unrestricted).unwrap();
        assert_eq!(s.params, p.params);
        assert_eq!(s.sql.replace("?", "$").replace("+r.", "r."), p.sql);
        assert!(p.sql.contains(&format!("${}", p.params.len())));
    }
}
