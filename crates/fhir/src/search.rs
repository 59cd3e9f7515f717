//! Typed search: the model a parsed FHIR search query becomes, and the index
//! values extracted from resources that the store matches it against.
//!
//! Parsing lives in [`crate::query`]; extraction in [`crate::index`]. The store
//! only sees these types, so both backends interpret a query identically.

/// FHIR search parameter type (R4 `SearchParamType`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ParamType {
    Number,
    Date,
    String,
    Token,
    Reference,
    Quantity,
    Uri,
    Composite,
    Special,
}

impl ParamType {
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "number" => ParamType::Number,
            "date" => ParamType::Date,
            "string" => ParamType::String,
            "token" => ParamType::Token,
            "reference" => ParamType::Reference,
            "quantity" => ParamType::Quantity,
            "uri" => ParamType::Uri,
            "composite" => ParamType::Composite,
            "special" => ParamType::Special,
            _ => return None,
        })
    }
    pub fn as_str(self) -> &'static str {
        match self {
            ParamType::Number => "number",
            ParamType::Date => "date",
            ParamType::String => "string",
            ParamType::Token => "token",
            ParamType::Reference => "reference",
            ParamType::Quantity => "quantity",
            ParamType::Uri => "uri",
            ParamType::Composite => "composite",
            ParamType::Special => "special",
        }
    }
}

/// One value a resource is indexed under for one search parameter.
#[derive(Debug, Clone, PartialEq)]
pub enum IndexValue {
    /// String params: `norm` is case- and width-folded (NFKC + lowercase) for the
    /// default starts-with match; `exact` is the original for `:exact`.
    String {
        norm: String,
        exact: String,
    },
    /// Token params (code, Coding, CodeableConcept, Identifier, boolean, ContactPoint).
    Token {
        system: Option<String>,
        code: String,
    },
    /// Date params as an inclusive range of epoch milliseconds (UTC).
    Date {
        lo: i64,
        hi: i64,
    },
    Number {
        value: f64,
    },
    Quantity {
        value: f64,
        system: Option<String>,
        code: Option<String>,
    },
    /// A reference: relative `Type/id` splits into both; an absolute URL keeps `target_type` None.
    Reference {
        target_type: Option<String>,
        target_id: String,
    },
    Uri(String),
}

#[derive(Debug, Clone, PartialEq)]
pub struct IndexEntry {
    /// Search parameter code (e.g. `identifier`, `patient`, `_lastUpdated` is never indexed here).
    pub param: String,
    pub value: IndexValue,
}

/// Comparison prefix for ordered parameters (date, number, quantity).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Prefix {
    Eq,
    Ne,
    Lt,
    Le,
    Gt,
    Ge,
    Sa,
    Eb,
    Ap,
}

impl Prefix {
    /// Splits a prefix off a value (`ge2024-01-01` -> (Ge, "2024-01-01")).
    pub fn split(value: &str) -> (Prefix, &str) {
        let p = match value.get(..2) {
            Some("eq") => Prefix::Eq,
            Some("ne") => Prefix::Ne,
            Some("lt") => Prefix::Lt,
            Some("le") => Prefix::Le,
            Some("gt") => Prefix::Gt,
            Some("ge") => Prefix::Ge,
            Some("sa") => Prefix::Sa,
            Some("eb") => Prefix::Eb,
            Some("ap") => Prefix::Ap,
            _ => return (Prefix::Eq, value),
        };
        (p, &value[2..])
    }
}

/// `system|code` forms of a token search value.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenMatch {
    /// None: any system; Some(None): `|code` (no system); Some(Some(s)): that system.
    pub system: Option<Option<String>>,
    /// None: `system|` (any code in the system).
    pub code: Option<String>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct DateMatch {
    pub prefix: Prefix,
    /// Inclusive range of the search value, epoch ms.
    pub lo: i64,
    pub hi: i64,
}

#[derive(Debug, Clone, PartialEq)]
pub struct NumberMatch {
    pub prefix: Prefix,
    pub value: f64,
    /// Implicit precision range of the value as written (`100` -> [99.5, 100.5)).
    pub lo: f64,
    pub hi: f64,
    /// Quantity only.
    pub system: Option<String>,
    pub code: Option<String>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct RefMatch {
    pub target_type: Option<String>,
    pub target_id: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StringMode {
    StartsWith,
    Exact,
    Contains,
}

/// The values of one search parameter occurrence; the alternatives are OR-ed.
#[derive(Debug, Clone, PartialEq)]
pub enum Criterion {
    Id(Vec<String>),
    LastUpdated(Vec<DateMatch>),
    String {
        mode: StringMode,
        values: Vec<String>,
    },
    Token {
        values: Vec<TokenMatch>,
        negate: bool,
    },
    Date(Vec<DateMatch>),
    Number(Vec<NumberMatch>),
    Quantity(Vec<NumberMatch>),
    Reference(Vec<RefMatch>),
    Uri(Vec<String>),
    /// `param:missing=true|false`
    Missing(bool),
}

/// One occurrence of a search parameter in the query; occurrences are AND-ed.
#[derive(Debug, Clone, PartialEq)]
pub struct Clause {
    pub param: String,
    pub criterion: Criterion,
}

#[derive(Debug, Clone, PartialEq)]
pub struct SortKey {
    /// `_id`, `_lastUpdated`, or a string/token/date/number parameter.
    pub param: String,
    pub param_type: ParamType,
    pub descending: bool,
}

/// `_include=Source:param[:Target]` (or `_revinclude`).
#[derive(Debug, Clone, PartialEq)]
pub struct Include {
    pub source_type: String,
    pub param: String,
    pub target_type: Option<String>,
}

/// What the caller asked for the total / summary.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Summary {
    #[default]
    None,
    /// `_summary=count`: only the total.
    Count,
}

/// A validated search over one resource type.
#[derive(Debug, Clone, PartialEq)]
pub struct SearchQuery {
    pub resource_type: String,
    pub clauses: Vec<Clause>,
    pub sort: Vec<SortKey>,
    pub count: usize,
    pub offset: usize,
    pub include: Vec<Include>,
    pub revinclude: Vec<Include>,
    pub summary: Summary,
}

impl SearchQuery {
    pub fn new(resource_type: impl Into<String>) -> Self {
        SearchQuery {
            resource_type: resource_type.into(),
            clauses: Vec::new(),
            sort: Vec::new(),
            count: crate::query::DEFAULT_COUNT,
            offset: 0,
            include: Vec::new(),
            revinclude: Vec::new(),
            summary: Summary::None,
        }
    }

    pub fn with(mut self, param: &str, criterion: Criterion) -> Self {
        self.clauses.push(Clause {
            param: param.to_string(),
            criterion,
        });
        self
    }
}
