//! A FHIRPath subset evaluator over `serde_json::Value`, for the invariants
//! (`ElementDefinition.constraint.expression`) of the loaded profiles.
//!
//! Covered: path navigation (with choice elements `value` -> `valueQuantity`),
//! indexers, literals (string, integer, decimal, boolean), `$this`, `%resource`,
//! `%context`, `%rootResource`, the operators `. [] + - * / & | = != ~ !~ < > <= >= in contains
//! is as and or xor implies`, unary minus, and the functions listed in
//! [`SUPPORTED_FUNCTIONS`]. Anything else makes [`parse`] or [`evaluate`] return
//! [`FpError::Unsupported`], which the validator reports as a warning (a constraint
//! is never silently passed).
//!
//! Known simplifications (documented in docs/VALIDATION.md): dates and times compare
//! as strings when both sides are strings, `~` is `=` with case-insensitive strings,
//! `htmlChecks()` is a structural check of the narrative, and type tests on
//! elements without a type hint (non-choice complex elements) are lenient.

use std::collections::HashMap;
use std::sync::{LazyLock, Mutex};

use regex::Regex;
use serde_json::Value;

/// Functions the evaluator implements.
pub const SUPPORTED_FUNCTIONS: &[&str] = &[
    "where",
    "select",
    "all",
    "exists",
    "empty",
    "not",
    "count",
    "first",
    "last",
    "tail",
    "skip",
    "take",
    "single",
    "ofType",
    "as",
    "is",
    "indexOf",
    "substring",
    "startsWith",
    "endsWith",
    "contains",
    "matches",
    "length",
    "upper",
    "lower",
    "hasValue",
    "children",
    "descendants",
    "extension",
    "trace",
    "isDistinct",
    "distinct",
    "intersect",
    "union",
    "exclude",
    "iif",
    "htmlChecks",
    "toString",
    "allTrue",
    "anyTrue",
    "allFalse",
    "anyFalse",
    "combine",
    "subsetOf",
    "supersetOf",
    "replace",
    "trim",
    "toInteger",
    "toDecimal",
    "today",
    "now",
    "replaceMatches",
    "resolve",
];

#[derive(Debug, Clone, PartialEq)]
pub enum FpError {
    /// The expression uses something this evaluator does not implement.
    Unsupported(String),
    /// The expression is malformed or failed at run time (e.g. bad regex).
    Invalid(String),
}

impl std::fmt::Display for FpError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            FpError::Unsupported(s) => write!(f, "unsupported FHIRPath: {s}"),
            FpError::Invalid(s) => write!(f, "invalid FHIRPath: {s}"),
        }
    }
}

type R<T> = Result<T, FpError>;

// ---------------------------------------------------------------- lexer

#[derive(Debug, Clone, PartialEq)]
enum Tok {
    Ident(String),
    Str(String),
    Int(i64),
    Dec(f64),
    Var(String), // %resource
    Ext(String), // $this
    Op(&'static str),
}

fn lex(s: &str) -> R<Vec<Tok>> {
    let c: Vec<char> = s.chars().collect();
    let mut i = 0;
    let mut out = Vec::new();
    while i < c.len() {
        let ch = c[i];
        if ch.is_whitespace() {
            i += 1;
            continue;
        }
        if ch == '/' && c.get(i + 1) == Some(&'/') {
            while i < c.len() && c[i] != '\n' {
                i += 1;
            }
            continue;
        }
        if ch == '\'' || ch == '`' {
            let q = ch;
            i += 1;
            let mut v = String::new();
            loop {
                let Some(&d) = c.get(i) else {
                    return Err(FpError::Invalid("unterminated string".into()));
                };
                i += 1;
                if d == q {
                    break;
                }
                if d == '\\' {
                    let Some(&e) = c.get(i) else {
                        return Err(FpError::Invalid("bad escape".into()));
                    };
                    i += 1;
                    match e {
                        'n' => v.push('\n'),
                        't' => v.push('\t'),
                        'r' => v.push('\r'),
                        'f' => v.push('\u{c}'),
                        'u' => {
                            let hex: String = c.iter().skip(i).take(4).collect();
                            i += 4;
                            let n = u32::from_str_radix(&hex, 16)
                                .map_err(|_| FpError::Invalid("bad \\u escape".into()))?;
                            v.push(char::from_u32(n).unwrap_or('\u{fffd}'));
                        }
                        other => v.push(other),
                    }
                } else {
                    v.push(d);
                }
            }
            out.push(if q == '`' { Tok::Ident(v) } else { Tok::Str(v) });
            continue;
        }
        if ch.is_ascii_digit() {
            let st = i;
            while i < c.len() && c[i].is_ascii_digit() {
                i += 1;
            }
            if i + 1 < c.len() && c[i] == '.' && c[i + 1].is_ascii_digit() {
                i += 1;
                while i < c.len() && c[i].is_ascii_digit() {
                    i += 1;
                }
                let t: String = c[st..i].iter().collect();
                out.push(Tok::Dec(
                    t.parse()
                        .map_err(|_| FpError::Invalid("bad number".into()))?,
                ));
            } else {
                let t: String = c[st..i].iter().collect();
                out.push(Tok::Int(
                    t.parse()
                        .map_err(|_| FpError::Invalid("bad number".into()))?,
                ));
            }
            continue;
        }
        if ch.is_alphabetic() || ch == '_' || ch == '%' || ch == '$' {
            let st = i;
            i += 1;
            if ch == '%' && c.get(i) == Some(&'`') {
                return Err(FpError::Unsupported("quoted %variables".into()));
            }
            while i < c.len() && (c[i].is_alphanumeric() || c[i] == '_') {
                i += 1;
            }
            let t: String = c[st..i].iter().collect();
            out.push(match ch {
                '%' => Tok::Var(t[1..].to_string()),
                '$' => Tok::Ext(t[1..].to_string()),
                _ => Tok::Ident(t),
            });
            continue;
        }
        let two: String = c[i..(i + 2).min(c.len())].iter().collect();
        let op2 = ["<=", ">=", "!=", "!~"].into_iter().find(|o| *o == two);
        if let Some(o) = op2 {
            out.push(Tok::Op(o));
            i += 2;
            continue;
        }
        let op = match ch {
            '.' => ".",
            '[' => "[",
            ']' => "]",
            '(' => "(",
            ')' => ")",
            ',' => ",",
            '=' => "=",
            '~' => "~",
            '<' => "<",
            '>' => ">",
            '+' => "+",
            '-' => "-",
            '*' => "*",
            '/' => "/",
            '|' => "|",
            '&' => "&",
            '{' => "{",
            '}' => "}",
            _ => return Err(FpError::Invalid(format!("unexpected character '{ch}'"))),
        };
        out.push(Tok::Op(op));
        i += 1;
    }
    Ok(out)
}

// ---------------------------------------------------------------- parser

/// A parsed FHIRPath expression.
#[derive(Debug, Clone)]
pub enum Expr {
    Str(String),
    Int(i64),
    Dec(f64),
    Bool(bool),
    EmptySet,
    This,
    Var(String),
    /// Member access; `None` receiver means the current focus.
    Member(Option<Box<Expr>>, String),
    Index(Box<Expr>, Box<Expr>),
    Func(Option<Box<Expr>>, String, Vec<Expr>),
    Bin(&'static str, Box<Expr>, Box<Expr>),
    Neg(Box<Expr>),
    TypeOp(&'static str, Box<Expr>, String),
}

struct Parser {
    t: Vec<Tok>,
    p: usize,
    depth: usize,
}

fn word(t: &Tok) -> Option<&str> {
    match t {
        Tok::Ident(s) => Some(s.as_str()),
        _ => None,
    }
}

impl Parser {
    fn peek(&self) -> Option<&Tok> {
        self.t.get(self.p)
    }
    fn peek_op(&self, o: &str) -> bool {
        matches!(self.peek(), Some(Tok::Op(x)) if *x == o)
    }
    fn peek_word(&self, w: &str) -> bool {
        self.peek().and_then(word) == Some(w)
    }
    fn expect(&mut self, o: &str) -> R<()> {
        if self.peek_op(o) {
            self.p += 1;
            Ok(())
        } else {
            Err(FpError::Invalid(format!("expected '{o}'")))
        }
    }

    fn expr(&mut self) -> R<Expr> {
        self.depth += 1;
        if self.depth > 200 {
            return Err(FpError::Invalid("expression nested too deeply".into()));
        }
        let r = self.implies();
        self.depth -= 1;
        r
    }
    fn implies(&mut self) -> R<Expr> {
        let mut l = self.or()?;
        while self.peek_word("implies") {
            self.p += 1;
            let r = self.or()?;
            l = Expr::Bin("implies", Box::new(l), Box::new(r));
        }
        Ok(l)
    }
    fn or(&mut self) -> R<Expr> {
        let mut l = self.and()?;
        loop {
            let op = if self.peek_word("or") {
                "or"
            } else if self.peek_word("xor") {
                "xor"
            } else {
                break;
            };
            self.p += 1;
            let r = self.and()?;
            l = Expr::Bin(op, Box::new(l), Box::new(r));
        }
        Ok(l)
    }
    fn and(&mut self) -> R<Expr> {
        let mut l = self.membership()?;
        while self.peek_word("and") {
            self.p += 1;
            let r = self.membership()?;
            l = Expr::Bin("and", Box::new(l), Box::new(r));
        }
        Ok(l)
    }
    fn membership(&mut self) -> R<Expr> {
        let mut l = self.equality()?;
        loop {
            let op = if self.peek_word("in") {
                "in"
            } else if self.peek_word("contains")
                && !matches!(self.t.get(self.p + 1), Some(Tok::Op("(")))
            {
                "contains"
            } else {
                break;
            };
            self.p += 1;
            let r = self.equality()?;
            l = Expr::Bin(op, Box::new(l), Box::new(r));
        }
        Ok(l)
    }
    fn equality(&mut self) -> R<Expr> {
        let mut l = self.inequality()?;
        loop {
            let op = match self.peek() {
                Some(Tok::Op(o)) if matches!(*o, "=" | "!=" | "~" | "!~") => *o,
                _ => break,
            };
            self.p += 1;
            let r = self.inequality()?;
            l = Expr::Bin(op, Box::new(l), Box::new(r));
        }
        Ok(l)
    }
    fn inequality(&mut self) -> R<Expr> {
        let mut l = self.union()?;
        loop {
            let op = match self.peek() {
                Some(Tok::Op(o)) if matches!(*o, "<" | ">" | "<=" | ">=") => *o,
                _ => break,
            };
            self.p += 1;
            let r = self.union()?;
            l = Expr::Bin(op, Box::new(l), Box::new(r));
        }
        Ok(l)
    }
    fn union(&mut self) -> R<Expr> {
        let mut l = self.type_op()?;
        while self.peek_op("|") {
            self.p += 1;
            let r = self.type_op()?;
            l = Expr::Bin("|", Box::new(l), Box::new(r));
        }
        Ok(l)
    }
    fn type_op(&mut self) -> R<Expr> {
        let mut l = self.additive()?;
        loop {
            let op = if self.peek_word("is") {
                "is"
            } else if self.peek_word("as") {
                "as"
            } else {
                break;
            };
            self.p += 1;
            let name = self.type_name()?;
            l = Expr::TypeOp(op, Box::new(l), name);
        }
        Ok(l)
    }
    fn type_name(&mut self) -> R<String> {
        let mut name = match self.peek().and_then(word) {
            Some(w) => w.to_string(),
            None => return Err(FpError::Invalid("expected a type name".into())),
        };
        self.p += 1;
        while self.peek_op(".") {
            if let Some(w) = self.t.get(self.p + 1).and_then(word) {
                name = w.to_string(); // FHIR.Patient / System.String -> last part
                self.p += 2;
            } else {
                break;
            }
        }
        Ok(name)
    }
    fn additive(&mut self) -> R<Expr> {
        let mut l = self.multiplicative()?;
        loop {
            let op = match self.peek() {
                Some(Tok::Op(o)) if matches!(*o, "+" | "-" | "&") => *o,
                _ => break,
            };
            self.p += 1;
            let r = self.multiplicative()?;
            l = Expr::Bin(op, Box::new(l), Box::new(r));
        }
        Ok(l)
    }
    fn multiplicative(&mut self) -> R<Expr> {
        let mut l = self.unary()?;
        loop {
            let op = match self.peek() {
                Some(Tok::Op("*")) => "*",
                Some(Tok::Op("/")) => "/",
                Some(Tok::Ident(w)) if w == "div" => "div",
                Some(Tok::Ident(w)) if w == "mod" => "mod",
                _ => break,
            };
            self.p += 1;
            let r = self.unary()?;
            l = Expr::Bin(op, Box::new(l), Box::new(r));
        }
        Ok(l)
    }
    fn unary(&mut self) -> R<Expr> {
        if self.peek_op("-") {
            self.p += 1;
            return Ok(Expr::Neg(Box::new(self.unary()?)));
        }
        if self.peek_op("+") {
            self.p += 1;
            return self.unary();
        }
        self.postfix()
    }
    fn postfix(&mut self) -> R<Expr> {
        let mut e = self.term()?;
        loop {
            if self.peek_op(".") {
                self.p += 1;
                let name = match self.peek() {
                    Some(Tok::Ident(w)) => w.clone(),
                    _ => return Err(FpError::Invalid("expected a name after '.'".into())),
                };
                self.p += 1;
                if self.peek_op("(") {
                    let args = self.args(&name)?;
                    e = Expr::Func(Some(Box::new(e)), name, args);
                } else {
                    e = Expr::Member(Some(Box::new(e)), name);
                }
            } else if self.peek_op("[") {
                self.p += 1;
                let i = self.expr()?;
                self.expect("]")?;
                e = Expr::Index(Box::new(e), Box::new(i));
            } else {
                return Ok(e);
            }
        }
    }
    fn args(&mut self, fname: &str) -> R<Vec<Expr>> {
        self.expect("(")?;
        let mut args = Vec::new();
        if self.peek_op(")") {
            self.p += 1;
            return Ok(args);
        }
        loop {
            if matches!(fname, "ofType" | "as" | "is") {
                args.push(Expr::Str(self.type_name()?));
            } else {
                args.push(self.expr()?);
            }
            if self.peek_op(",") {
                self.p += 1;
                continue;
            }
            self.expect(")")?;
            return Ok(args);
        }
    }
    fn term(&mut self) -> R<Expr> {
        let Some(t) = self.peek().cloned() else {
            return Err(FpError::Invalid("unexpected end of expression".into()));
        };
        self.p += 1;
        match t {
            Tok::Str(s) => Ok(Expr::Str(s)),
            Tok::Int(i) => Ok(Expr::Int(i)),
            Tok::Dec(d) => Ok(Expr::Dec(d)),
            Tok::Var(v) => Ok(Expr::Var(v)),
            Tok::Ext(v) => match v.as_str() {
                "this" => Ok(Expr::This),
                other => Err(FpError::Unsupported(format!("${other}"))),
            },
            Tok::Op("(") => {
                let e = self.expr()?;
                self.expect(")")?;
                Ok(e)
            }
            Tok::Op("{") => {
                self.expect("}")?;
                Ok(Expr::EmptySet)
            }
            Tok::Ident(w) => {
                if w == "true" {
                    return Ok(Expr::Bool(true));
                }
                if w == "false" {
                    return Ok(Expr::Bool(false));
                }
                if self.peek_op("(") {
                    let args = self.args(&w)?;
                    Ok(Expr::Func(None, w, args))
                } else {
                    Ok(Expr::Member(None, w))
                }
            }
            Tok::Op(o) => Err(FpError::Invalid(format!("unexpected '{o}'"))),
        }
    }
}

/// Parses an expression; unsupported functions are reported here already.
pub fn parse(src: &str) -> R<Expr> {
    let t = lex(src)?;
    let mut p = Parser { t, p: 0, depth: 0 };
    let e = p.expr()?;
    if p.p != p.t.len() {
        return Err(FpError::Invalid(format!(
            "unexpected token after position {}",
            p.p
        )));
    }
    check_functions(&e)?;
    Ok(e)
}

fn check_functions(e: &Expr) -> R<()> {
    match e {
        Expr::Func(r, name, args) => {
            if !SUPPORTED_FUNCTIONS.contains(&name.as_str()) {
                return Err(FpError::Unsupported(format!("function {name}()")));
            }
            if let Some(r) = r {
                check_functions(r)?;
            }
            args.iter().try_for_each(check_functions)
        }
        Expr::Member(Some(r), _) | Expr::Neg(r) | Expr::TypeOp(_, r, _) => check_functions(r),
        Expr::Index(a, b) | Expr::Bin(_, a, b) => {
            check_functions(a)?;
            check_functions(b)
        }
        Expr::Var(v) if !matches!(v.as_str(), "resource" | "context" | "rootResource" | "ucum") => {
            Err(FpError::Unsupported(format!("%{v}")))
        }
        _ => Ok(()),
    }
}

// ---------------------------------------------------------------- values

/// One item of a FHIRPath collection.
#[derive(Debug, Clone)]
pub enum Item<'a> {
    /// A node of the instance; the type name is known for choice elements
    /// (`valueQuantity` -> `Quantity`) and resources.
    Node(&'a Value, Option<&'a str>),
    Bool(bool),
    Int(i64),
    Dec(f64),
    Str(String),
}

impl<'a> Item<'a> {
    fn as_str(&self) -> Option<&str> {
        match self {
            Item::Node(Value::String(s), _) => Some(s),
            Item::Str(s) => Some(s),
            _ => None,
        }
    }
    fn as_num(&self) -> Option<f64> {
        match self {
            Item::Node(Value::Number(n), _) => n.as_f64(),
            Item::Int(i) => Some(*i as f64),
            Item::Dec(d) => Some(*d),
            _ => None,
        }
    }
    fn as_bool(&self) -> Option<bool> {
        match self {
            Item::Node(Value::Bool(b), _) => Some(*b),
            Item::Bool(b) => Some(*b),
            _ => None,
        }
    }
    fn is_primitive(&self) -> bool {
        !matches!(self, Item::Node(Value::Object(_) | Value::Array(_), _))
    }
    fn to_json(&self) -> Value {
        match self {
            Item::Node(v, _) => (*v).clone(),
            Item::Bool(b) => Value::Bool(*b),
            Item::Int(i) => Value::from(*i),
            Item::Dec(d) => serde_json::Number::from_f64(*d)
                .map(Value::Number)
                .unwrap_or(Value::Null),
            Item::Str(s) => Value::String(s.clone()),
        }
    }
}

/// Hash key of an item for duplicate elimination: primitives by value, nodes
/// by identity (deep-equal distinct nodes are then kept twice).
fn item_key(i: &Item) -> String {
    if let Item::Node(v @ (Value::Object(_) | Value::Array(_)), _) = i {
        return format!("n{:p}", *v);
    }
    match (i.as_str(), i.as_num(), i.as_bool()) {
        (Some(s), _, _) => format!("s{s}"),
        (_, Some(n), _) => format!("d{n}"),
        (_, _, Some(b)) => format!("b{b}"),
        _ => String::new(),
    }
}

fn union<'a>(items: impl Iterator<Item = Item<'a>>) -> Vec<Item<'a>> {
    let mut seen = std::collections::HashSet::new();
    items.filter(|x| seen.insert(item_key(x))).collect()
}

fn items_equal(a: &Item, b: &Item) -> bool {
    if let (Some(x), Some(y)) = (a.as_str(), b.as_str()) {
        return x == y;
    }
    if let (Some(x), Some(y)) = (a.as_num(), b.as_num()) {
        return (x - y).abs() < 1e-9;
    }
    if let (Some(x), Some(y)) = (a.as_bool(), b.as_bool()) {
        return x == y;
    }
    match (a, b) {
        (Item::Node(x, _), Item::Node(y, _)) => x == y,
        _ => false,
    }
}

/// Evaluation context: the resource that contains the focus.
pub struct Ctx<'a> {
    pub resource: &'a Value,
    /// `%rootResource`: the container of a contained resource, else `resource`.
    pub root: &'a Value,
    pub context: &'a Value,
}

const MAX_ITEMS: usize = 1_000_000;

/// Evaluates `e` with `focus` as `$this`; returns the result collection.
pub fn evaluate<'a>(e: &Expr, ctx: &Ctx<'a>, focus: &[Item<'a>]) -> R<Vec<Item<'a>>> {
    eval(e, ctx, focus, 0)
}

/// Result of an invariant: `Some(false)` fails, empty or true passes.
pub fn as_constraint_result(v: &[Item]) -> bool {
    match v {
        [] => true,
        [x] => x.as_bool().unwrap_or(true),
        _ => true,
    }
}

fn single_bool(v: &[Item]) -> R<Option<bool>> {
    match v {
        [] => Ok(None),
        [x] => Ok(Some(x.as_bool().unwrap_or(true))),
        _ => Err(FpError::Invalid(
            "expected a single boolean, got a collection".into(),
        )),
    }
}

fn single_str<'b>(v: &'b [Item]) -> Option<&'b str> {
    match v {
        [x] => x.as_str(),
        _ => None,
    }
}

fn children_of<'a>(v: &'a Value, out: &mut Vec<Item<'a>>) {
    if let Value::Object(m) = v {
        for (k, val) in m {
            if k == "resourceType" || k.starts_with('_') {
                continue;
            }
            match val {
                Value::Array(a) => out.extend(a.iter().map(|x| Item::Node(x, None))),
                x => out.push(Item::Node(x, None)),
            }
        }
    }
}

const TYPE_SUFFIXES: &[&str] = &[
    "Base64Binary",
    "Boolean",
    "Canonical",
    "Code",
    "Date",
    "DateTime",
    "Decimal",
    "Id",
    "Instant",
    "Integer",
    "Markdown",
    "Oid",
    "PositiveInt",
    "String",
    "Time",
    "UnsignedInt",
    "Uri",
    "Url",
    "Uuid",
    "Address",
    "Age",
    "Annotation",
    "Attachment",
    "CodeableConcept",
    "Coding",
    "ContactPoint",
    "Count",
    "Distance",
    "Duration",
    "HumanName",
    "Identifier",
    "Money",
    "Period",
    "Quantity",
    "Range",
    "Ratio",
    "Reference",
    "SampledData",
    "Signature",
    "Timing",
    "ContactDetail",
    "Contributor",
    "DataRequirement",
    "Expression",
    "ParameterDefinition",
    "RelatedArtifact",
    "TriggerDefinition",
    "UsageContext",
    "Dosage",
    "Meta",
];

fn member<'a>(focus: &[Item<'a>], name: &str, out: &mut Vec<Item<'a>>) {
    for it in focus {
        let Item::Node(Value::Object(m), _) = it else {
            continue;
        };
        if let Some(v) = m.get(name) {
            match v {
                Value::Array(a) => out.extend(a.iter().map(|x| Item::Node(x, None))),
                x => out.push(Item::Node(x, None)),
            }
            continue;
        }
        // choice element: value -> valueQuantity
        for (k, v) in m {
            if let Some(suffix) = k.strip_prefix(name)
                && suffix.starts_with(|c: char| c.is_ascii_uppercase())
                && let Some(t) = TYPE_SUFFIXES.iter().find(|t| **t == suffix)
            {
                let tn: &'static str = type_name_of_suffix(t);
                match v {
                    Value::Array(a) => out.extend(a.iter().map(|x| Item::Node(x, Some(tn)))),
                    x => out.push(Item::Node(x, Some(tn))),
                }
            }
        }
    }
}

fn type_name_of_suffix(s: &'static str) -> &'static str {
    match s {
        "Base64Binary" => "base64Binary",
        "Boolean" => "boolean",
        "Canonical" => "canonical",
        "Code" => "code",
        "Date" => "date",
        "DateTime" => "dateTime",
        "Decimal" => "decimal",
        "Id" => "id",
        "Instant" => "instant",
        "Integer" => "integer",
        "Markdown" => "markdown",
        "Oid" => "oid",
        "PositiveInt" => "positiveInt",
        "String" => "string",
        "Time" => "time",
        "UnsignedInt" => "unsignedInt",
        "Uri" => "uri",
        "Url" => "url",
        "Uuid" => "uuid",
        other => other,
    }
}

fn type_matches(it: &Item, t: &str) -> bool {
    let tl = t.to_ascii_lowercase();
    match it {
        Item::Node(v, hint) => {
            if let Some(h) = hint {
                return h.eq_ignore_ascii_case(t)
                    || (tl == "string" && matches!(*h, "code" | "id" | "markdown"));
            }
            match v {
                Value::Object(m) => match m.get("resourceType").and_then(Value::as_str) {
                    Some(rt) => rt == t || matches!(t, "Resource" | "DomainResource"),
                    // complex element without a type hint: lenient
                    None => t.starts_with(|c: char| c.is_ascii_uppercase()),
                },
                Value::String(_) => matches!(
                    tl.as_str(),
                    "string"
                        | "code"
                        | "id"
                        | "uri"
                        | "url"
                        | "canonical"
                        | "date"
                        | "datetime"
                        | "instant"
                        | "time"
                        | "markdown"
                        | "oid"
                        | "uuid"
                        | "base64binary"
                ),
                Value::Bool(_) => tl == "boolean",
                Value::Number(n) => {
                    tl == "decimal"
                        || (n.is_i64()
                            && matches!(tl.as_str(), "integer" | "positiveint" | "unsignedint"))
                }
                _ => false,
            }
        }
        Item::Bool(_) => tl == "boolean",
        Item::Int(_) => tl == "integer",
        Item::Dec(_) => tl == "decimal",
        Item::Str(_) => tl == "string",
    }
}

static REGEX_CACHE: LazyLock<Mutex<HashMap<String, Regex>>> =
    LazyLock::new(|| Mutex::new(HashMap::new()));

fn regex_is_match(pat: &str, s: &str) -> R<bool> {
    let mut cache = REGEX_CACHE.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(r) = cache.get(pat) {
        return Ok(r.is_match(s));
    }
    let r = Regex::new(pat).map_err(|e| FpError::Invalid(format!("bad regex: {e}")))?;
    let m = r.is_match(s);
    if cache.len() < 10_000 {
        cache.insert(pat.to_string(), r);
    }
    Ok(m)
}

fn compare(a: &Item, b: &Item) -> Option<std::cmp::Ordering> {
    if let (Some(x), Some(y)) = (a.as_num(), b.as_num()) {
        return x.partial_cmp(&y);
    }
    if let (Some(x), Some(y)) = (a.as_str(), b.as_str()) {
        return Some(x.cmp(y));
    }
    None
}

/// Narrative check for `htmlChecks()`: a `<div>` with content and none of the
/// active-content elements the FHIR narrative rules forbid.
pub fn html_checks(div: &str) -> bool {
    let t = div.trim_start();
    if !t.starts_with("<div") {
        return false;
    }
    let lower = div.to_ascii_lowercase();
    for bad in [
        "<script",
        "<iframe",
        "<object",
        "<embed",
        "<form",
        "<applet",
        "<base",
        "<link",
        "<meta",
        "javascript:",
    ] {
        if lower.contains(bad) {
            return false;
        }
    }
    // some non-tag content
    let mut in_tag = false;
    let mut has_text = false;
    for ch in div.chars() {
        match ch {
            '<' => in_tag = true,
            '>' => in_tag = false,
            c if !in_tag && !c.is_whitespace() => {
                has_text = true;
                break;
            }
            _ => {}
        }
    }
    has_text || lower.contains("<img")
}

fn eval<'a>(e: &Expr, ctx: &Ctx<'a>, focus: &[Item<'a>], depth: usize) -> R<Vec<Item<'a>>> {
    if depth > 200 {
        return Err(FpError::Invalid("evaluation nested too deeply".into()));
    }
    let d = depth + 1;
    Ok(match e {
        Expr::Str(s) => vec![Item::Str(s.clone())],
        Expr::Int(i) => vec![Item::Int(*i)],
        Expr::Dec(x) => vec![Item::Dec(*x)],
        Expr::Bool(b) => vec![Item::Bool(*b)],
        Expr::EmptySet => vec![],
        Expr::This => focus.to_vec(),
        Expr::Var(v) => match v.as_str() {
            "resource" => vec![Item::Node(ctx.resource, None)],
            "rootResource" => vec![Item::Node(ctx.root, None)],
            "context" => vec![Item::Node(ctx.context, None)],
            "ucum" => vec![Item::Str("http://unitsofmeasure.org".into())],
            other => return Err(FpError::Unsupported(format!("%{other}"))),
        },
        Expr::Member(None, name) => {
            // `Patient.name`: a leading type name filters the focus
            if name.starts_with(|c: char| c.is_ascii_uppercase())
                && focus.iter().all(|it| matches!(it, Item::Node(Value::Object(m), _) if m.get("resourceType").and_then(Value::as_str) == Some(name.as_str())))
                && !focus.is_empty()
            {
                return Ok(focus.to_vec());
            }
            let mut out = Vec::new();
            member(focus, name, &mut out);
            out
        }
        Expr::Member(Some(r), name) => {
            let base = eval(r, ctx, focus, d)?;
            let mut out = Vec::new();
            member(&base, name, &mut out);
            out
        }
        Expr::Index(a, i) => {
            let base = eval(a, ctx, focus, d)?;
            let idx = eval(i, ctx, focus, d)?;
            match idx.first().and_then(Item::as_num) {
                Some(n) if n >= 0.0 => base.into_iter().nth(n as usize).into_iter().collect(),
                _ => vec![],
            }
        }
        Expr::Neg(x) => {
            let v = eval(x, ctx, focus, d)?;
            match v.as_slice() {
                [Item::Int(i)] => vec![Item::Int(-i)],
                [it] => match it.as_num() {
                    Some(n) => vec![Item::Dec(-n)],
                    None => return Err(FpError::Invalid("unary minus on a non-number".into())),
                },
                _ => vec![],
            }
        }
        Expr::TypeOp(op, x, t) => {
            let v = eval(x, ctx, focus, d)?;
            type_op(op, v, t)?
        }
        Expr::Bin(op, a, b) => bin(op, a, b, ctx, focus, d)?,
        Expr::Func(recv, name, args) => {
            let base = match recv {
                Some(r) => eval(r, ctx, focus, d)?,
                None => focus.to_vec(),
            };
            func(name, base, args, ctx, focus, d)?
        }
    })
}

fn type_op<'a>(op: &str, v: Vec<Item<'a>>, t: &str) -> R<Vec<Item<'a>>> {
    Ok(match op {
        "is" => match v.as_slice() {
            [] => vec![],
            [x] => vec![Item::Bool(type_matches(x, t))],
            _ => return Err(FpError::Invalid("'is' on a collection".into())),
        },
        _ => v.into_iter().filter(|x| type_matches(x, t)).collect(),
    })
}

fn bin<'a>(
    op: &str,
    a: &Expr,
    b: &Expr,
    ctx: &Ctx<'a>,
    focus: &[Item<'a>],
    d: usize,
) -> R<Vec<Item<'a>>> {
    // boolean operators with three-valued logic (short-circuit where allowed)
    match op {
        "and" => {
            let l = single_bool(&eval(a, ctx, focus, d)?)?;
            if l == Some(false) {
                return Ok(vec![Item::Bool(false)]);
            }
            let r = single_bool(&eval(b, ctx, focus, d)?)?;
            return Ok(match (l, r) {
                (_, Some(false)) => vec![Item::Bool(false)],
                (Some(true), Some(true)) => vec![Item::Bool(true)],
                _ => vec![],
            });
        }
        "or" => {
            let l = single_bool(&eval(a, ctx, focus, d)?)?;
            if l == Some(true) {
                return Ok(vec![Item::Bool(true)]);
            }
            let r = single_bool(&eval(b, ctx, focus, d)?)?;
            return Ok(match (l, r) {
                (_, Some(true)) => vec![Item::Bool(true)],
                (Some(false), Some(false)) => vec![Item::Bool(false)],
                _ => vec![],
            });
        }
        "xor" => {
            let l = single_bool(&eval(a, ctx, focus, d)?)?;
            let r = single_bool(&eval(b, ctx, focus, d)?)?;
            return Ok(match (l, r) {
                (Some(x), Some(y)) => vec![Item::Bool(x != y)],
                _ => vec![],
            });
        }
        "implies" => {
            let l = single_bool(&eval(a, ctx, focus, d)?)?;
            if l == Some(false) {
                return Ok(vec![Item::Bool(true)]);
            }
            let r = single_bool(&eval(b, ctx, focus, d)?)?;
            return Ok(match (l, r) {
                (_, Some(true)) => vec![Item::Bool(true)],
                (Some(true), Some(false)) => vec![Item::Bool(false)],
                _ => vec![],
            });
        }
        _ => {}
    }
    let l = eval(a, ctx, focus, d)?;
    let r = eval(b, ctx, focus, d)?;
    Ok(match op {
        "|" => union(l.into_iter().chain(r)),
        "=" | "!=" | "~" | "!~" => {
            if l.is_empty() || r.is_empty() {
                if op.starts_with('~') || op == "!~" {
                    vec![Item::Bool((l.is_empty() && r.is_empty()) == (op == "~"))]
                } else {
                    vec![]
                }
            } else {
                let eq = l.len() == r.len()
                    && l.iter().zip(&r).all(|(x, y)| {
                        if op.contains('~') {
                            match (x.as_str(), y.as_str()) {
                                (Some(p), Some(q)) => p.trim().eq_ignore_ascii_case(q.trim()),
                                _ => items_equal(x, y),
                            }
                        } else {
                            items_equal(x, y)
                        }
                    });
                vec![Item::Bool(if op == "=" || op == "~" { eq } else { !eq })]
            }
        }
        "<" | ">" | "<=" | ">=" => match (l.as_slice(), r.as_slice()) {
            ([x], [y]) => match compare(x, y) {
                Some(o) => vec![Item::Bool(match op {
                    "<" => o.is_lt(),
                    ">" => o.is_gt(),
                    "<=" => o.is_le(),
                    _ => o.is_ge(),
                })],
                None => vec![],
            },
            ([], _) | (_, []) => vec![],
            _ => return Err(FpError::Invalid("comparison of collections".into())),
        },
        "in" | "contains" => {
            let (needle, hay) = if op == "in" { (&l, &r) } else { (&r, &l) };
            match needle.as_slice() {
                [] => vec![],
                [x] => vec![Item::Bool(hay.iter().any(|y| items_equal(x, y)))],
                _ => {
                    return Err(FpError::Invalid(
                        "'in' with a collection on the left".into(),
                    ));
                }
            }
        }
        "&" => {
            let s = |v: &[Item]| single_str(v).map(str::to_string).unwrap_or_default();
            vec![Item::Str(s(&l) + &s(&r))]
        }
        "+" | "-" | "*" | "/" | "div" | "mod" => match (l.as_slice(), r.as_slice()) {
            ([x], [y]) => {
                if op == "+"
                    && let (Some(p), Some(q)) = (x.as_str(), y.as_str())
                {
                    return Ok(vec![Item::Str(format!("{p}{q}"))]);
                }
                match (x.as_num(), y.as_num()) {
                    (Some(p), Some(q)) => {
                        let both_int = matches!(x, Item::Int(_)) && matches!(y, Item::Int(_));
                        let v = match op {
                            "+" => p + q,
                            "-" => p - q,
                            "*" => p * q,
                            "/" => {
                                if q == 0.0 {
                                    return Ok(vec![]);
                                }
                                p / q
                            }
                            "div" => {
                                if q == 0.0 {
                                    return Ok(vec![]);
                                }
                                (p / q).trunc()
                            }
                            _ => {
                                if q == 0.0 {
                                    return Ok(vec![]);
                                }
                                p % q
                            }
                        };
                        if both_int && op != "/" {
                            vec![Item::Int(v as i64)]
                        } else {
                            vec![Item::Dec(v)]
                        }
                    }
                    _ => {
                        return Err(FpError::Unsupported(format!(
                            "operator {op} on these operand types"
                        )));
                    }
                }
            }
            _ => vec![],
        },
        other => return Err(FpError::Unsupported(format!("operator {other}"))),
    })
}

fn arg<'a>(
    args: &[Expr],
    i: usize,
    ctx: &Ctx<'a>,
    focus: &[Item<'a>],
    d: usize,
) -> R<Vec<Item<'a>>> {
    match args.get(i) {
        Some(e) => eval(e, ctx, focus, d),
        None => Err(FpError::Invalid(format!("missing argument {}", i + 1))),
    }
}

fn arg_str(
    args: &[Expr],
    i: usize,
    ctx: &Ctx<'_>,
    focus: &[Item<'_>],
    d: usize,
) -> R<Option<String>> {
    if let Some(Expr::Str(s)) = args.get(i) {
        return Ok(Some(s.clone()));
    }
    let v = arg(args, i, ctx, focus, d)?;
    Ok(single_str(&v).map(str::to_string))
}

fn arg_int(args: &[Expr], i: usize, ctx: &Ctx<'_>, focus: &[Item<'_>], d: usize) -> R<Option<i64>> {
    let v = arg(args, i, ctx, focus, d)?;
    Ok(match v.as_slice() {
        [x] => x.as_num().map(|n| n as i64),
        _ => None,
    })
}

fn descendants<'a>(v: &'a Value, out: &mut Vec<Item<'a>>) -> R<()> {
    let mut stack = vec![v];
    while let Some(n) = stack.pop() {
        let mut ch = Vec::new();
        children_of(n, &mut ch);
        for c in ch {
            if let Item::Node(x, _) = c {
                stack.push(x);
            }
            out.push(c);
            if out.len() > MAX_ITEMS {
                return Err(FpError::Invalid("too many items".into()));
            }
        }
    }
    Ok(())
}

fn func<'a>(
    name: &str,
    base: Vec<Item<'a>>,
    args: &[Expr],
    ctx: &Ctx<'a>,
    focus: &[Item<'a>],
    d: usize,
) -> R<Vec<Item<'a>>> {
    let b = |x: bool| vec![Item::Bool(x)];
    let one_str = |base: &[Item]| single_str(base).map(str::to_string);
    Ok(match name {
        "where" | "select" | "all" | "exists" if !args.is_empty() => {
            let crit = &args[0];
            let mut out = Vec::new();
            for it in &base {
                let r = eval(crit, ctx, std::slice::from_ref(it), d)?;
                match name {
                    "where" | "exists" | "all" => {
                        let t = single_bool(&r)?;
                        if name == "all" {
                            if t != Some(true) {
                                return Ok(b(false));
                            }
                        } else if t == Some(true) {
                            if name == "exists" {
                                return Ok(b(true));
                            }
                            out.push(it.clone());
                        }
                    }
                    _ => {
                        out.extend(r);
                        if out.len() > MAX_ITEMS {
                            return Err(FpError::Invalid("too many items".into()));
                        }
                    }
                }
            }
            match name {
                "all" => b(true),
                "exists" => b(false),
                _ => out,
            }
        }
        "exists" => b(!base.is_empty()),
        "empty" => b(base.is_empty()),
        "not" => match single_bool(&base)? {
            Some(x) => b(!x),
            None => vec![],
        },
        "count" => vec![Item::Int(base.len() as i64)],
        "first" => base.into_iter().take(1).collect(),
        "last" => base.into_iter().last().into_iter().collect(),
        "tail" => base.into_iter().skip(1).collect(),
        "skip" => {
            let n = arg_int(args, 0, ctx, focus, d)?.unwrap_or(0).max(0) as usize;
            base.into_iter().skip(n).collect()
        }
        "take" => {
            let n = arg_int(args, 0, ctx, focus, d)?.unwrap_or(0).max(0) as usize;
            base.into_iter().take(n).collect()
        }
        "single" => match base.len() {
            0 | 1 => base,
            _ => {
                return Err(FpError::Invalid(
                    "single() on a collection of several items".into(),
                ));
            }
        },
        "ofType" | "as" | "is" => {
            let t = arg_str(args, 0, ctx, focus, d)?.unwrap_or_default();
            type_op(if name == "is" { "is" } else { "as" }, base, &t)?
        }
        "indexOf" => match (one_str(&base), arg_str(args, 0, ctx, focus, d)?) {
            (Some(s), Some(sub)) => {
                let idx = s
                    .find(&sub)
                    .map(|byte| s[..byte].chars().count() as i64)
                    .unwrap_or(-1);
                vec![Item::Int(idx)]
            }
            _ => vec![],
        },
        "substring" => {
            let Some(s) = one_str(&base) else {
                return Ok(vec![]);
            };
            let start = arg_int(args, 0, ctx, focus, d)?;
            let len = if args.len() > 1 {
                arg_int(args, 1, ctx, focus, d)?
            } else {
                None
            };
            let chars: Vec<char> = s.chars().collect();
            match start {
                Some(st) if st >= 0 && (st as usize) < chars.len() => {
                    let st = st as usize;
                    let end = match len {
                        Some(l) if l >= 0 => (st + l as usize).min(chars.len()),
                        Some(_) => st,
                        None => chars.len(),
                    };
                    vec![Item::Str(chars[st..end].iter().collect())]
                }
                _ => vec![],
            }
        }
        "startsWith" | "endsWith" | "contains" => {
            match (one_str(&base), arg_str(args, 0, ctx, focus, d)?) {
                (Some(s), Some(p)) => b(match name {
                    "startsWith" => s.starts_with(&p),
                    "endsWith" => s.ends_with(&p),
                    _ => s.contains(&p),
                }),
                _ => vec![],
            }
        }
        "matches" => match (one_str(&base), arg_str(args, 0, ctx, focus, d)?) {
            (Some(s), Some(p)) => b(regex_is_match(&p, &s)?),
            _ => vec![],
        },
        "replace" => match (
            one_str(&base),
            arg_str(args, 0, ctx, focus, d)?,
            arg_str(args, 1, ctx, focus, d)?,
        ) {
            (Some(s), Some(p), Some(r)) => vec![Item::Str(s.replace(&p, &r))],
            _ => vec![],
        },
        "replaceMatches" => match (
            one_str(&base),
            arg_str(args, 0, ctx, focus, d)?,
            arg_str(args, 1, ctx, focus, d)?,
        ) {
            (Some(s), Some(p), Some(r)) => {
                let re = Regex::new(&p).map_err(|e| FpError::Invalid(format!("bad regex: {e}")))?;
                vec![Item::Str(re.replace_all(&s, r.as_str()).into_owned())]
            }
            _ => vec![],
        },
        "resolve" => {
            // local references only: `#id` -> a contained resource of %rootResource;
            // anything else cannot be resolved here and makes the invariant unevaluable
            let mut out = Vec::new();
            for it in &base {
                let r = match it {
                    Item::Node(Value::Object(m), _) => m.get("reference").and_then(Value::as_str),
                    other => other.as_str(),
                };
                let Some(r) = r else { continue };
                let Some(id) = r.strip_prefix('#') else {
                    return Err(FpError::Unsupported(format!(
                        "resolve() of the non-local reference '{r}'"
                    )));
                };
                let found = ctx
                    .root
                    .get("contained")
                    .and_then(Value::as_array)
                    .and_then(|a| {
                        a.iter()
                            .find(|c| c.get("id").and_then(Value::as_str) == Some(id))
                    });
                match found {
                    Some(c) => out.push(Item::Node(c, None)),
                    None if id.is_empty() => out.push(Item::Node(ctx.root, None)),
                    None => {}
                }
            }
            out
        }
        "length" => match one_str(&base) {
            Some(s) => vec![Item::Int(s.chars().count() as i64)],
            None => vec![],
        },
        "upper" => one_str(&base)
            .map(|s| Item::Str(s.to_uppercase()))
            .into_iter()
            .collect(),
        "lower" => one_str(&base)
            .map(|s| Item::Str(s.to_lowercase()))
            .into_iter()
            .collect(),
        "trim" => one_str(&base)
            .map(|s| Item::Str(s.trim().to_string()))
            .into_iter()
            .collect(),
        "toString" => match base.as_slice() {
            [x] if x.is_primitive() => match x.to_json() {
                Value::String(s) => vec![Item::Str(s)],
                other => vec![Item::Str(other.to_string())],
            },
            _ => vec![],
        },
        "toInteger" => match base.as_slice() {
            [x] => x
                .as_num()
                .filter(|n| n.fract() == 0.0)
                .map(|n| n as i64)
                .or_else(|| x.as_str().and_then(|s| s.parse().ok()))
                .map(Item::Int)
                .into_iter()
                .collect(),
            _ => vec![],
        },
        "toDecimal" => match base.as_slice() {
            [x] => x
                .as_num()
                .or_else(|| x.as_str().and_then(|s| s.parse().ok()))
                .map(Item::Dec)
                .into_iter()
                .collect(),
            _ => vec![],
        },
        "hasValue" => b(matches!(base.as_slice(), [x] if x.is_primitive())),
        "children" => {
            let mut out = Vec::new();
            for it in &base {
                if let Item::Node(v, _) = it {
                    children_of(v, &mut out);
                }
            }
            out
        }
        "descendants" => {
            let mut out = Vec::new();
            for it in &base {
                if let Item::Node(v, _) = it {
                    descendants(v, &mut out)?;
                }
            }
            out
        }
        "extension" => {
            let url = arg_str(args, 0, ctx, focus, d)?.unwrap_or_default();
            let mut exts = Vec::new();
            member(&base, "extension", &mut exts);
            exts.into_iter()
                .filter(|e| matches!(e, Item::Node(Value::Object(m), _) if m.get("url").and_then(Value::as_str) == Some(url.as_str())))
                .collect()
        }
        "trace" => base,
        "isDistinct" => {
            let mut ok = true;
            'o: for i in 0..base.len() {
                for j in 0..i {
                    if items_equal(&base[i], &base[j]) {
                        ok = false;
                        break 'o;
                    }
                }
            }
            b(ok)
        }
        "distinct" => union(base.into_iter()),
        "intersect" | "exclude" | "union" | "combine" | "subsetOf" | "supersetOf" => {
            let other = arg(args, 0, ctx, focus, d)?;
            match name {
                "intersect" => {
                    let mut out: Vec<Item> = Vec::new();
                    for x in base {
                        if other.iter().any(|y| items_equal(y, &x))
                            && !out.iter().any(|y| items_equal(y, &x))
                        {
                            out.push(x);
                        }
                    }
                    out
                }
                "exclude" => base
                    .into_iter()
                    .filter(|x| !other.iter().any(|y| items_equal(y, x)))
                    .collect(),
                "subsetOf" => b(base.iter().all(|x| other.iter().any(|y| items_equal(y, x)))),
                "supersetOf" => b(other.iter().all(|x| base.iter().any(|y| items_equal(y, x)))),
                "combine" => base.into_iter().chain(other).collect(),
                _ => union(base.into_iter().chain(other)),
            }
        }
        "iif" => {
            let c = single_bool(&arg(args, 0, ctx, focus, d)?)?;
            if c == Some(true) {
                arg(args, 1, ctx, focus, d)?
            } else if args.len() > 2 {
                arg(args, 2, ctx, focus, d)?
            } else {
                vec![]
            }
        }
        "allTrue" => b(base.iter().all(|x| x.as_bool() == Some(true))),
        "anyTrue" => b(base.iter().any(|x| x.as_bool() == Some(true))),
        "allFalse" => b(base.iter().all(|x| x.as_bool() == Some(false))),
        "anyFalse" => b(base.iter().any(|x| x.as_bool() == Some(false))),
        "htmlChecks" => match base.as_slice() {
            [x] => b(x.as_str().map(html_checks).unwrap_or(false)),
            _ => vec![],
        },
        "today" | "now" => return Err(FpError::Unsupported(format!("{name}()"))),
        other => return Err(FpError::Unsupported(format!("function {other}()"))),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn run(expr: &str, v: &Value) -> Vec<Value> {
        let e = parse(expr).unwrap();
        let ctx = Ctx {
            resource: v,
            root: v,
            context: v,
        };
        evaluate(&e, &ctx, &[Item::Node(v, None)])
            .unwrap()
            .iter()
            .map(Item::to_json)
            .collect()
    }

    #[test]
    fn navigation_and_functions() {
        let p = json!({"resourceType":"Patient","name":[{"given":["A","B"]},{"family":"F"}],
            "extension":[{"url":"u","valueIdentifier":{"value":"1311234567"}}]});
        assert_eq!(run("Patient.name.given.count()", &p), vec![json!(2)]);
        assert_eq!(
            run("name.where(family.exists()).family", &p),
            vec![json!("F")]
        );
        assert_eq!(
            run(
                "extension('u').value.ofType(Identifier).value.matches('^[0-4][0-9][1-3][0-9]{7}$')",
                &p
            ),
            vec![json!(true)]
        );
        assert_eq!(
            run("'ab'.substring(1) = 'b' and 'abc'.indexOf('c') = 2", &p),
            vec![json!(true)]
        );
        assert_eq!(
            run("name[1].given.empty() implies true", &p),
            vec![json!(true)]
        );
        assert_eq!(
            run("(1 | 2 | 2).count() = 2 xor false", &p),
            vec![json!(true)]
        );
        assert_eq!(run("'C' in ('C' | 'CM')", &p), vec![json!(true)]);
    }

    #[test]
    fn resolve_local_only() {
        let r = json!({"resourceType":"CareTeam","contained":[{"resourceType":"Practitioner","id":"p"}],
            "participant":[{"member":{"reference":"#p"}},{"member":{"reference":"Practitioner/x"}}]});
        assert_eq!(
            run("participant[0].member.resolve() is Practitioner", &r),
            vec![json!(true)]
        );
        let e = parse("participant[1].member.resolve() is Practitioner").unwrap();
        let ctx = Ctx {
            resource: &r,
            root: &r,
            context: &r,
        };
        assert!(matches!(
            evaluate(&e, &ctx, &[Item::Node(&r, None)]),
            Err(FpError::Unsupported(_))
        ));
        assert_eq!(
            run("'a1b2'.replaceMatches('[0-9]', '#')", &r),
            vec![json!("a#b#")]
        );
    }

    #[test]
    fn unsupported_is_reported() {
        assert!(matches!(
            parse("code.memberOf('x')"),
            Err(FpError::Unsupported(_))
        ));
        assert!(matches!(parse("name.given("), Err(FpError::Invalid(_))));
    }
}
