//! The platform's own business rules, applied with or without packages.
//!
//! Each rule gets the resource and appends issues. Rules defined so far:
//! - `master-code`: a Coding whose `system` is one of the imported terminology
//!   masters (drug, disease, modifier, JLAC10, J-FAGY) must carry a code that
//!   exists in that master (e.g. a 一般名処方コード that the drug master does
//!   not list is rejected). Systems without an imported master are not checked.
//!
//! Later issues add their rules here (one function each, listed in [`RULES`]).

use serde_json::Value;
use tsunagi_fhir::Issue;

use crate::engine::Engine;

type Rule = fn(&Engine, &Value, &str, &mut Vec<Issue>);

/// The rules in force, by name.
pub const RULES: &[(&str, Rule)] = &[("master-code", master_code)];

pub(crate) fn apply(engine: &Engine, res: &Value, root: &str, issues: &mut Vec<Issue>) {
    for (_, rule) in RULES {
        rule(engine, res, root, issues);
    }
}

fn master_code(engine: &Engine, res: &Value, root: &str, issues: &mut Vec<Issue>) {
    let Some(codes) = engine.codes.as_ref() else {
        return;
    };
    let mut path = root.to_string();
    walk(res, &mut path, 0, &mut |path, m| {
        let (Some(system), Some(code)) = (
            m.get("system").and_then(Value::as_str),
            m.get("code").and_then(Value::as_str),
        ) else {
            return;
        };
        if codes.check_code(system, code) == Some(false) {
            let name = codes
                .system_name(system)
                .unwrap_or_else(|| system.to_string());
            issues.push(Issue::error(
                "code-invalid",
                Some(format!("{path}.code")),
                format!("Code '{code}' does not exist in the {name} (system {system})"),
            ));
        }
    });
}

/// Visits every JSON object with its FHIRPath location (one path buffer, no
/// allocation per node).
fn walk(
    v: &Value,
    path: &mut String,
    depth: usize,
    f: &mut dyn FnMut(&str, &serde_json::Map<String, Value>),
) {
    if depth > 64 {
        return;
    }
    match v {
        Value::Object(m) => {
            f(path, m);
            for (k, x) in m {
                if !(x.is_object() || x.is_array()) {
                    continue;
                }
                let len = path.len();
                path.push('.');
                path.push_str(k);
                walk(x, path, depth + 1, f);
                path.truncate(len);
            }
        }
        Value::Array(a) => {
            for (i, x) in a.iter().enumerate() {
                if !(x.is_object() || x.is_array()) {
                    continue;
                }
                let len = path.len();
                path.push('[');
                path.push_str(&i.to_string());
                path.push(']');
                walk(x, path, depth + 1, f);
                path.truncate(len);
            }
        }
        _ => {}
    }
}
