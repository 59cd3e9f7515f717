//! Lexical checks of the FHIR R4 primitive types (https://hl7.org/fhir/R4/datatypes.html).

use std::sync::LazyLock;

use regex::Regex;
use serde_json::Value;

static RE: LazyLock<Vec<(&'static str, Regex)>> = LazyLock::new(|| {
    let date = r"([0-9]([0-9]([0-9][1-9]|[1-9]0)|[1-9]00)|[1-9]000)(-(0[1-9]|1[0-2])(-(0[1-9]|[1-2][0-9]|3[0-1]))?)?";
    let tz = r"(Z|(\+|-)((0[0-9]|1[0-3]):[0-5][0-9]|14:00))";
    let time = r"([01][0-9]|2[0-3]):[0-5][0-9]:([0-5][0-9]|60)(\.[0-9]+)?";
    let list = vec![
        ("code", r"^[^\s]+( [^\s]+)*$".to_string()),
        ("id", r"^[A-Za-z0-9\-\.]{1,64}$".to_string()),
        ("oid", r"^urn:oid:[0-2](\.(0|[1-9][0-9]*))+$".to_string()),
        (
            "uuid",
            r"^urn:uuid:[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$".to_string(),
        ),
        ("uri", r"^\S*$".to_string()),
        ("date", format!("^{date}$")),
        (
            "dateTime",
            format!(
                r"^([0-9]([0-9]([0-9][1-9]|[1-9]0)|[1-9]00)|[1-9]000)(-(0[1-9]|1[0-2])(-(0[1-9]|[1-2][0-9]|3[0-1])(T{time}{tz})?)?)?$"
            ),
        ),
        (
            "instant",
            format!(
                r"^([0-9]([0-9]([0-9][1-9]|[1-9]0)|[1-9]00)|[1-9]000)-(0[1-9]|1[0-2])-(0[1-9]|[1-2][0-9]|3[0-1])T{time}{tz}$"
            ),
        ),
        ("time", format!("^{time}$")),
        (
            "base64Binary",
            r"^(\s*([0-9a-zA-Z\+/=]){4}\s*)+$".to_string(),
        ),
    ];
    list.into_iter()
        .map(|(k, r)| (k, Regex::new(&r).expect("primitive regex")))
        .collect()
});

fn re(name: &str) -> &'static Regex {
    &RE.iter()
        .find(|(k, _)| *k == name)
        .expect("known primitive")
        .1
}

fn valid_calendar_day(s: &str) -> bool {
    // s starts with YYYY-MM-DD
    let (Some(y), Some(m), Some(d)) = (s.get(0..4), s.get(5..7), s.get(8..10)) else {
        return true;
    };
    let (Ok(y), Ok(m), Ok(d)) = (y.parse::<u32>(), m.parse::<u32>(), d.parse::<u32>()) else {
        return true;
    };
    let leap = (y % 4 == 0 && y % 100 != 0) || y % 400 == 0;
    let days = match m {
        2 if leap => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    };
    d <= days
}

/// True for the FHIR primitive type codes.
pub fn is_primitive(t: &str) -> bool {
    t.starts_with(|c: char| c.is_ascii_lowercase())
        || matches!(
            t,
            "String" | "Boolean" | "Integer" | "Decimal" | "Date" | "DateTime" | "Time"
        )
}

/// Checks one JSON value against primitive type `t`; returns a message on failure.
pub fn check(t: &str, v: &Value) -> Option<String> {
    let t = match t {
        "String" => "string",
        "Boolean" => "boolean",
        "Integer" => "integer",
        "Decimal" => "decimal",
        "Date" => "date",
        "DateTime" => "dateTime",
        "Time" => "time",
        other => other,
    };
    match t {
        "boolean" => (!v.is_boolean())
            .then(|| format!("must be a JSON boolean (true/false), found {}", kind(v))),
        "integer" | "positiveInt" | "unsignedInt" | "integer64" => {
            let Some(n) = v.as_i64().or_else(|| {
                v.as_f64()
                    .filter(|f| f.fract() == 0.0 && f.abs() < 1e15)
                    .map(|f| f as i64)
            }) else {
                return Some(format!("must be a JSON integer number, found {}", kind(v)));
            };
            if v.as_f64().is_some_and(|f| f.fract() != 0.0) {
                return Some("must be an integer".into());
            }
            if t != "integer64" && !(-2147483648..=2147483647).contains(&n) {
                return Some(format!("{n} is outside the 32-bit integer range"));
            }
            match t {
                "positiveInt" if n < 1 => {
                    Some(format!("{n} is not a positiveInt (must be 1 or more)"))
                }
                "unsignedInt" if n < 0 => {
                    Some(format!("{n} is not an unsignedInt (must be 0 or more)"))
                }
                _ => None,
            }
        }
        "decimal" => (!v.is_number()).then(|| format!("must be a JSON number, found {}", kind(v))),
        _ => {
            let Some(s) = v.as_str() else {
                return Some(format!("must be a JSON string, found {}", kind(v)));
            };
            if s.is_empty() {
                return Some("must not be an empty string (leave the element out instead)".into());
            }
            if t != "xhtml"
                && t != "markdown"
                && t != "string"
                && s.trim() != s
                && t != "base64Binary"
            {
                return Some(format!("'{s}' has leading or trailing whitespace"));
            }
            let bad = |what: &str| Some(format!("'{}' is not a valid {what}", truncate(s)));
            match t {
                "code" if !re("code").is_match(s) => {
                    bad("code (no leading/trailing or double whitespace)")
                }
                "id" if !re("id").is_match(s) => bad("id (1-64 of A-Z a-z 0-9 - .)"),
                "oid" if !re("oid").is_match(s) => bad("oid (urn:oid:...)"),
                "uuid" if !re("uuid").is_match(s) => bad("uuid (urn:uuid: + lower-case UUID)"),
                "uri" | "url" | "canonical" if !re("uri").is_match(s) => bad("URI (no whitespace)"),
                "date" if !re("date").is_match(s) || !valid_calendar_day(s) => {
                    bad("date (YYYY, YYYY-MM or YYYY-MM-DD)")
                }
                "dateTime" if !re("dateTime").is_match(s) || !valid_calendar_day(s) => bad(
                    "dateTime (YYYY, YYYY-MM, YYYY-MM-DD or YYYY-MM-DDThh:mm:ss+zz:zz; a time needs a time zone)",
                ),
                "instant" if !re("instant").is_match(s) || !valid_calendar_day(s) => {
                    bad("instant (YYYY-MM-DDThh:mm:ss[.sss]+zz:zz or Z)")
                }
                "time" if !re("time").is_match(s) => bad("time (hh:mm:ss)"),
                "base64Binary" if !re("base64Binary").is_match(s) => bad("base64Binary"),
                "xhtml" if !s.trim_start().starts_with("<div") => {
                    bad("XHTML narrative (must be a <div> element)")
                }
                _ => None,
            }
        }
    }
}

fn truncate(s: &str) -> String {
    if s.chars().count() > 60 {
        format!("{}...", s.chars().take(60).collect::<String>())
    } else {
        s.to_string()
    }
}

pub fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn formats() {
        assert!(check("date", &json!("2024-02-30")).is_some());
        assert!(check("date", &json!("2024-02-29")).is_none());
        assert!(check("dateTime", &json!("2024-01-01T10:00:00")).is_some());
        assert!(check("dateTime", &json!("2024-01-01T10:00:00+09:00")).is_none());
        assert!(check("instant", &json!("2024-01-01")).is_some());
        assert!(check("id", &json!("a b")).is_some());
        assert!(check("code", &json!("a  b")).is_some());
        assert!(check("boolean", &json!("true")).is_some());
        assert!(check("positiveInt", &json!(0)).is_some());
        assert!(check("string", &json!("")).is_some());
    }
}
