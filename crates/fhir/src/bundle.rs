//! Bundle construction helpers shared by the REST API and the services.

use serde_json::{Value, json};

/// A paging link (`self`, `first`, `next`, `previous`).
pub struct Link {
    pub relation: &'static str,
    pub url: String,
}

/// One entry of a searchset or collection Bundle.
pub struct Entry {
    pub full_url: String,
    pub resource: Value,
    /// `match` or `include` for searchsets; None otherwise.
    pub search_mode: Option<&'static str>,
}

/// A `searchset` Bundle. `total` is omitted when None.
pub fn searchset(total: Option<u64>, links: Vec<Link>, entries: Vec<Entry>) -> Value {
    let mut b = json!({ "resourceType": "Bundle", "type": "searchset" });
    if let Some(t) = total {
        b["total"] = json!(t);
    }
    set_links(&mut b, links);
    let entries: Vec<Value> = entries
        .into_iter()
        .map(|e| {
            let mut v = crate::object([
                ("fullUrl", Value::String(e.full_url)),
                ("resource", e.resource),
            ]);
            if let Some(mode) = e.search_mode {
                v["search"] = json!({ "mode": mode });
            }
            v
        })
        .collect();
    if !entries.is_empty() {
        b["entry"] = Value::Array(entries);
    }
    b
}

/// A `searchset` Bundle of resources a service found itself: `total` is their
/// number, each entry the resource (moved in), with `search.mode` when given.
pub fn searchset_of(resources: Vec<Value>, mode: Option<&'static str>) -> Value {
    let total = resources.len();
    let entries = resources
        .into_iter()
        .map(|r| match mode {
            Some(m) => crate::object([("resource", r), ("search", json!({ "mode": m }))]),
            None => crate::object([("resource", r)]),
        })
        .collect();
    crate::object([
        ("resourceType", Value::from("Bundle")),
        ("type", Value::from("searchset")),
        ("total", Value::from(total)),
        ("entry", Value::Array(entries)),
    ])
}

/// One version in a `history` Bundle.
pub struct HistoryEntry {
    pub full_url: String,
    /// None for a delete.
    pub resource: Option<Value>,
    pub method: &'static str,
    pub url: String,
    pub status: &'static str,
    pub last_modified: String,
    pub etag: String,
}

pub fn history(links: Vec<Link>, entries: Vec<HistoryEntry>) -> Value {
    let mut b = json!({ "resourceType": "Bundle", "type": "history", "total": entries.len() });
    set_links(&mut b, links);
    let entries: Vec<Value> = entries
        .into_iter()
        .map(|e| {
            let mut v = json!({
                "fullUrl": e.full_url,
                "request": { "method": e.method, "url": e.url },
                "response": { "status": e.status, "lastModified": e.last_modified, "etag": e.etag },
            });
            if let Some(r) = e.resource {
                v["resource"] = r;
            }
            v
        })
        .collect();
    if !entries.is_empty() {
        b["entry"] = Value::Array(entries);
    }
    b
}

fn set_links(b: &mut Value, links: Vec<Link>) {
    if !links.is_empty() {
        b["link"] = Value::Array(
            links
                .into_iter()
                .map(|l| json!({ "relation": l.relation, "url": l.url }))
                .collect(),
        );
    }
}

/// Weak ETag for a version: `W/"3"`.
pub fn etag(version: i64) -> String {
    format!("W/\"{version}\"")
}

/// Parses `W/"3"` or `"3"` into 3.
pub fn parse_etag(s: &str) -> Option<i64> {
    let s = s.trim();
    let s = s.strip_prefix("W/").unwrap_or(s);
    s.trim_matches('"').parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn etags_roundtrip() {
        assert_eq!(parse_etag(&etag(12)), Some(12));
        assert_eq!(parse_etag("\"4\""), Some(4));
        assert_eq!(parse_etag("W/\"x\""), None);
    }

    #[test]
    fn searchset_shape() {
        let b = searchset(
            Some(1),
            vec![Link {
                relation: "self",
                url: "u".into(),
            }],
            vec![Entry {
                full_url: "f".into(),
                resource: json!({"resourceType": "Patient"}),
                search_mode: Some("match"),
            }],
        );
        assert_eq!(b["total"], 1);
        assert_eq!(b["entry"][0]["search"]["mode"], "match");
        assert_eq!(b["link"][0]["relation"], "self");
    }
}
