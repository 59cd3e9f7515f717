//! Parsing FHIR search URL parameters into a validated [`SearchQuery`].
//!
//! Strict by default: an unknown or unsupported parameter is a 400 naming it,
//! because silently ignoring a filter returns data the caller did not ask for.
//! The caller may opt into lenient handling (`Prefer: handling=lenient`); the
//! ignored parameters are then returned for an informational outcome.

use crate::FhirError;
use crate::FhirResult;
use crate::datetime::parse_range;
use crate::index::{normalize_string, split_reference};
use crate::model::model;
use crate::search::*;

/// Page size when `_count` is absent.
pub const DEFAULT_COUNT: usize = 50;
/// Largest `_count` honoured.
pub const MAX_COUNT: usize = 1000;
/// Largest `_offset` honoured (deep paging should narrow the query instead).
pub const MAX_OFFSET: usize = 100_000;

/// Parameters the server handles itself and the parser passes over.
const IGNORED: &[&str] = &["_format", "_pretty", "_total"];

/// A parsed query plus the parameters ignored under lenient handling.
#[derive(Debug, Clone, PartialEq)]
pub struct Parsed {
    pub query: SearchQuery,
    pub ignored: Vec<String>,
}

pub fn parse(resource_type: &str, params: &[(String, String)]) -> FhirResult<SearchQuery> {
    parse_with(resource_type, params, false).map(|p| p.query)
}

pub fn parse_with(
    resource_type: &str,
    params: &[(String, String)],
    lenient: bool,
) -> FhirResult<Parsed> {
    let mut q = SearchQuery::new(resource_type);
    let mut ignored = Vec::new();
    for (key, value) in params {
        let result = parse_one(&mut q, resource_type, key, value);
        match result {
            Ok(()) => {}
            Err(e) if lenient && e.issues.iter().any(|i| i.code == "not-supported") => {
                ignored.push(key.clone())
            }
            Err(e) => return Err(e),
        }
    }
    Ok(Parsed { query: q, ignored })
}

fn bad(key: &str, msg: impl std::fmt::Display) -> FhirError {
    FhirError::bad_request(None, format!("Search parameter '{key}': {msg}"))
}

fn unsupported(key: &str, msg: impl std::fmt::Display) -> FhirError {
    FhirError::new(
        400,
        "not-supported",
        None,
        format!("Search parameter '{key}': {msg}"),
    )
}

fn parse_one(q: &mut SearchQuery, rt: &str, key: &str, value: &str) -> FhirResult<()> {
    if IGNORED.contains(&key) {
        return Ok(());
    }
    match key {
        "_count" => {
            let n: usize = value
                .parse()
                .map_err(|_| bad(key, "must be a non-negative integer"))?;
            q.count = n.min(MAX_COUNT);
            return Ok(());
        }
        "_offset" => {
            let n: usize = value
                .parse()
                .map_err(|_| bad(key, "must be a non-negative integer"))?;
            if n > MAX_OFFSET {
                return Err(bad(
                    key,
                    format!("at most {MAX_OFFSET}; narrow the search instead"),
                ));
            }
            q.offset = n;
            return Ok(());
        }
        "_summary" => {
            return match value {
                "count" => {
                    q.summary = Summary::Count;
                    Ok(())
                }
                "false" => Ok(()),
                other => Err(unsupported(
                    key,
                    format!("only 'count' and 'false' are supported, not '{other}'"),
                )),
            };
        }
        "_sort" => {
            for part in value.split(',').filter(|s| !s.is_empty()) {
                let (desc, name) = match part.strip_prefix('-') {
                    Some(n) => (true, n),
                    None => (false, part),
                };
                let param_type = match name {
                    "_id" => ParamType::Token,
                    "_lastUpdated" => ParamType::Date,
                    _ => {
                        let p = model()
                            .search_param(rt, name)
                            .filter(|p| p.paths.is_some())
                            .ok_or_else(|| {
                                unsupported(key, format!("cannot sort {rt} by '{name}'"))
                            })?;
                        match p.param_type {
                            ParamType::String
                            | ParamType::Token
                            | ParamType::Date
                            | ParamType::Number
                            | ParamType::Quantity => p.param_type,
                            _ => {
                                return Err(unsupported(
                                    key,
                                    format!(
                                        "cannot sort by {} parameter '{name}'",
                                        p.param_type.as_str()
                                    ),
                                ));
                            }
                        }
                    }
                };
                q.sort.push(SortKey {
                    param: name.to_string(),
                    param_type,
                    descending: desc,
                });
            }
            return Ok(());
        }
        "_include" | "_revinclude" => {
            let inc = parse_include(key, value)?;
            if key == "_include" {
                if inc.source_type != rt {
                    return Err(bad(key, format!("source type must be {rt}")));
                }
                q.include.push(inc);
            } else {
                q.revinclude.push(inc);
            }
            return Ok(());
        }
        _ => {}
    }

    let (name, modifier) = match key.split_once(':') {
        Some((n, m)) => (n, Some(m)),
        None => (key, None),
    };
    if name.contains('.') {
        return Err(unsupported(key, "chained parameters are not supported"));
    }
    let values = split_values(value);
    if values.iter().any(|v| v.is_empty()) && modifier != Some("missing") {
        return Err(bad(key, "empty value"));
    }

    if modifier == Some("missing") {
        let b = match value {
            "true" => true,
            "false" => false,
            _ => return Err(bad(key, "':missing' takes true or false")),
        };
        if name == "_id"
            || name == "_lastUpdated"
            || model()
                .search_param(rt, name)
                .is_none_or(|p| p.paths.is_none())
        {
            return Err(unsupported(
                key,
                format!("unknown search parameter for {rt}"),
            ));
        }
        q.clauses.push(Clause {
            param: name.to_string(),
            criterion: Criterion::Missing(b),
        });
        return Ok(());
    }

    let criterion = match name {
        "_id" => {
            no_modifier(key, modifier)?;
            Criterion::Id(values)
        }
        "_lastUpdated" => {
            no_modifier(key, modifier)?;
            Criterion::LastUpdated(
                values
                    .iter()
                    .map(|v| date_match(key, v))
                    .collect::<FhirResult<_>>()?,
            )
        }
        _ => {
            let p = model()
                .search_param(rt, name)
                .ok_or_else(|| unsupported(key, format!("unknown search parameter for {rt}")))?;
            if p.paths.is_none() {
                return Err(unsupported(
                    key,
                    "this parameter's expression is not indexed by this server",
                ));
            }
            match p.param_type {
                ParamType::String => {
                    let mode = match modifier {
                        None => StringMode::StartsWith,
                        Some("exact") => StringMode::Exact,
                        Some("contains") => StringMode::Contains,
                        Some(m) => {
                            return Err(unsupported(
                                key,
                                format!("modifier ':{m}' is not supported on string parameters"),
                            ));
                        }
                    };
                    let values = if mode == StringMode::Exact {
                        values
                    } else {
                        values.iter().map(|v| normalize_string(v)).collect()
                    };
                    Criterion::String { mode, values }
                }
                ParamType::Token => {
                    let negate = match modifier {
                        None => false,
                        Some("not") => true,
                        Some(m) => {
                            return Err(unsupported(
                                key,
                                format!("modifier ':{m}' is not supported on token parameters"),
                            ));
                        }
                    };
                    Criterion::Token {
                        values: values.iter().map(|v| token_match(v)).collect(),
                        negate,
                    }
                }
                ParamType::Date => {
                    no_modifier(key, modifier)?;
                    Criterion::Date(
                        values
                            .iter()
                            .map(|v| date_match(key, v))
                            .collect::<FhirResult<_>>()?,
                    )
                }
                ParamType::Number => {
                    no_modifier(key, modifier)?;
                    Criterion::Number(
                        values
                            .iter()
                            .map(|v| number_match(key, v, false))
                            .collect::<FhirResult<_>>()?,
                    )
                }
                ParamType::Quantity => {
                    no_modifier(key, modifier)?;
                    Criterion::Quantity(
                        values
                            .iter()
                            .map(|v| number_match(key, v, true))
                            .collect::<FhirResult<_>>()?,
                    )
                }
                ParamType::Reference => {
                    let type_modifier = match modifier {
                        None => None,
                        Some(m) if model().is_resource_type(m) => Some(m.to_string()),
                        Some(m) => {
                            return Err(unsupported(
                                key,
                                format!("modifier ':{m}' is not supported on reference parameters"),
                            ));
                        }
                    };
                    Criterion::Reference(
                        values
                            .iter()
                            .map(|v| ref_match(v, type_modifier.as_deref()))
                            .collect(),
                    )
                }
                ParamType::Uri => {
                    no_modifier(key, modifier)?;
                    Criterion::Uri(values)
                }
                ParamType::Composite | ParamType::Special => {
                    return Err(unsupported(
                        key,
                        format!("{} parameters are not supported", p.param_type.as_str()),
                    ));
                }
            }
        }
    };
    q.clauses.push(Clause {
        param: name.to_string(),
        criterion,
    });
    Ok(())
}

fn no_modifier(key: &str, modifier: Option<&str>) -> FhirResult<()> {
    match modifier {
        None => Ok(()),
        Some(m) => Err(unsupported(
            key,
            format!("modifier ':{m}' is not supported here"),
        )),
    }
}

/// Splits on unescaped commas; `\,` is a literal comma.
fn split_values(value: &str) -> Vec<String> {
    let mut out = vec![String::new()];
    let mut chars = value.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\\' if matches!(chars.peek(), Some(',') | Some('|') | Some('$') | Some('\\')) => {
                out.last_mut()
                    .expect("non-empty")
                    .push(chars.next().expect("peeked"));
            }
            ',' => out.push(String::new()),
            c => out.last_mut().expect("non-empty").push(c),
        }
    }
    out
}

fn token_match(v: &str) -> TokenMatch {
    match v.split_once('|') {
        None => TokenMatch {
            system: None,
            code: Some(v.to_string()),
        },
        Some(("", code)) => TokenMatch {
            system: Some(None),
            code: Some(code.to_string()),
        },
        Some((system, "")) => TokenMatch {
            system: Some(Some(system.to_string())),
            code: None,
        },
        Some((system, code)) => TokenMatch {
            system: Some(Some(system.to_string())),
            code: Some(code.to_string()),
        },
    }
}

fn date_match(key: &str, v: &str) -> FhirResult<DateMatch> {
    let (prefix, rest) = Prefix::split(v);
    let (lo, hi) = parse_range(rest).ok_or_else(|| {
        bad(
            key,
            format!("'{rest}' is not a valid FHIR date or dateTime"),
        )
    })?;
    Ok(DateMatch { prefix, lo, hi })
}

fn number_match(key: &str, v: &str, quantity: bool) -> FhirResult<NumberMatch> {
    let (prefix, rest) = Prefix::split(v);
    let (num, system, code) = if quantity {
        let mut parts = rest.splitn(3, '|');
        let n = parts.next().unwrap_or_default();
        let s = parts.next().filter(|s| !s.is_empty()).map(str::to_string);
        let c = parts.next().filter(|s| !s.is_empty()).map(str::to_string);
        (n, s, c)
    } else {
        (rest, None, None)
    };
    let value: f64 = num
        .parse()
        .map_err(|_| bad(key, format!("'{num}' is not a number")))?;
    if !value.is_finite() {
        return Err(bad(key, format!("'{num}' is not a finite number")));
    }
    // Implicit precision: 100 -> [99.5, 100.5); 1.50 -> [1.495, 1.505)
    let decimals = num
        .split_once('.')
        .map(|(_, d)| d.trim_start_matches(|c: char| !c.is_ascii_digit()).len())
        .unwrap_or(0);
    let half = 0.5 * 10f64.powi(-(decimals as i32));
    Ok(NumberMatch {
        prefix,
        value,
        lo: value - half,
        hi: value + half,
        system,
        code,
    })
}

fn ref_match(v: &str, type_modifier: Option<&str>) -> RefMatch {
    let (t, id) = split_reference(v);
    RefMatch {
        target_type: t.or_else(|| type_modifier.map(str::to_string)),
        target_id: id,
    }
}

fn parse_include(key: &str, value: &str) -> FhirResult<Include> {
    let parts: Vec<&str> = value.split(':').collect();
    if parts.len() < 2 || parts.len() > 3 {
        return Err(bad(key, "expected Source:param[:Target]"));
    }
    let (source, param) = (parts[0], parts[1]);
    if !model().is_resource_type(source) {
        return Err(bad(key, format!("unknown resource type '{source}'")));
    }
    let p = model().search_param(source, param).ok_or_else(|| {
        unsupported(
            key,
            format!("unknown search parameter '{param}' for {source}"),
        )
    })?;
    if p.param_type != ParamType::Reference || p.paths.is_none() {
        return Err(unsupported(
            key,
            format!("'{param}' is not an indexed reference parameter of {source}"),
        ));
    }
    let target = parts.get(2).map(|t| t.to_string());
    if let Some(t) = &target
        && !model().is_resource_type(t)
    {
        return Err(bad(key, format!("unknown target type '{t}'")));
    }
    Ok(Include {
        source_type: source.to_string(),
        param: param.to_string(),
        target_type: target,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(rt: &str, pairs: &[(&str, &str)]) -> FhirResult<SearchQuery> {
        let v: Vec<(String, String)> = pairs
            .iter()
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .collect();
        parse(rt, &v)
    }

    #[test]
    fn parses_each_kind() {
        let q = p(
            "Observation",
            &[
                ("patient", "Patient/p1"),
                ("code", "http://loinc.org|1234-5,|x"),
                ("date", "ge2024-01-01"),
                ("value-quantity", "lt5.4|http://unitsofmeasure.org|mg"),
                ("_count", "10"),
                ("_sort", "-date"),
                ("_include", "Observation:patient"),
            ],
        )
        .unwrap();
        assert_eq!(q.count, 10);
        assert_eq!(q.clauses.len(), 4);
        assert_eq!(
            q.clauses[0].criterion,
            Criterion::Reference(vec![RefMatch {
                target_type: Some("Patient".into()),
                target_id: "p1".into()
            }])
        );
        match &q.clauses[1].criterion {
            Criterion::Token {
                values,
                negate: false,
            } => {
                assert_eq!(values[0].system, Some(Some("http://loinc.org".into())));
                assert_eq!(values[1].system, Some(None));
            }
            other => panic!("{other:?}"),
        }
        match &q.clauses[2].criterion {
            Criterion::Date(d) => assert_eq!(d[0].prefix, Prefix::Ge),
            other => panic!("{other:?}"),
        }
        match &q.clauses[3].criterion {
            Criterion::Quantity(n) => {
                assert_eq!(n[0].prefix, Prefix::Lt);
                assert_eq!(n[0].code.as_deref(), Some("mg"));
                assert!((n[0].lo - 5.35).abs() < 1e-9);
            }
            other => panic!("{other:?}"),
        }
        assert!(q.sort[0].descending);
        assert_eq!(q.include[0].param, "patient");
    }

    #[test]
    fn strings_are_normalised_and_escapes_honoured() {
        let q = p(
            "Patient",
            &[("name", "ﾔﾏﾀﾞ,a\\,b"), ("family:exact", "Yamada")],
        )
        .unwrap();
        assert_eq!(
            q.clauses[0].criterion,
            Criterion::String {
                mode: StringMode::StartsWith,
                values: vec!["ヤマダ".into(), "a,b".into()]
            }
        );
        assert_eq!(
            q.clauses[1].criterion,
            Criterion::String {
                mode: StringMode::Exact,
                values: vec!["Yamada".into()]
            }
        );
    }

    #[test]
    fn rejects_unknown_and_malformed_naming_the_parameter() {
        for (k, v) in [
            ("nonsense", "1"),
            ("birthdate", "yesterday"),
            ("_count", "-1"),
            ("name:fuzzy", "x"),
            ("general-practitioner.name", "x"),
            ("_summary", "text"),
        ] {
            let e = p("Patient", &[(k, v)]).unwrap_err();
            assert_eq!(e.status, 400);
            assert!(
                e.issues[0]
                    .message
                    .contains(k.split(':').next().unwrap().split('.').next().unwrap()),
                "{}",
                e.issues[0].message
            );
        }
    }

    #[test]
    fn lenient_ignores_unsupported_only() {
        let v = vec![
            ("nonsense".to_string(), "1".to_string()),
            ("gender".to_string(), "male".to_string()),
        ];
        let parsed = parse_with("Patient", &v, true).unwrap();
        assert_eq!(parsed.ignored, vec!["nonsense".to_string()]);
        assert_eq!(parsed.query.clauses.len(), 1);
        let bad = vec![("birthdate".to_string(), "x".to_string())];
        assert!(parse_with("Patient", &bad, true).is_err());
    }
}
