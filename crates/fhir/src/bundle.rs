//! Bundle construction helpers shared by the REST API and the services.

use serde_json::{Value, json};

/// A paging link (`self`, `first`, `next`, `previous`).
#[derive(Debug, Clone)]
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
    let entries: Vec<Value> = entries.into_iter().map(entry_value).collect();
    if !entries.is_empty() {
        b["entry"] = Value::Array(entries);
    }
    b
}

fn entry_value(e: Entry) -> Value {
    let mut v = crate::object([
        ("fullUrl", Value::String(e.full_url)),
        ("resource", e.resource),
    ]);
    if let Some(mode) = e.search_mode {
        v["search"] = json!({ "mode": mode });
    }
    v
}

/// A [`searchset`] Bundle written as JSON text while it is built, so that a
/// stored resource goes in as its stored text ([`SearchsetText::entry_text`]);
/// the bytes are those `serde_json` writes for [`searchset`] of the same entries.
#[derive(Debug)]
pub struct SearchsetText {
    out: Vec<u8>,
    entries: usize,
}

impl SearchsetText {
    pub fn new(total: Option<u64>, links: Vec<Link>) -> Self {
        let mut out = serde_json::to_vec(&searchset(total, links, Vec::new())).unwrap_or_default();
        // reopen the object: the entries follow its last member
        out.pop();
        SearchsetText { out, entries: 0 }
    }

    fn next(&mut self) {
        self.out.extend_from_slice(if self.entries == 0 {
            br#","entry":["#
        } else {
            b","
        });
        self.entries += 1;
    }

    /// Appends an entry whose resource is given as a value.
    pub fn entry(&mut self, e: Entry) {
        self.next();
        // writing a Value (string keys only) into a Vec cannot fail
        let _ = serde_json::to_writer(&mut self.out, &entry_value(e));
    }

    /// Appends an entry whose resource is a store's text (written by
    /// `serde_json`: one JSON object), which goes in unchecked.
    pub fn entry_text(&mut self, full_url: &str, text: &str, search_mode: Option<&str>) {
        self.next();
        self.out.extend_from_slice(br#"{"fullUrl":"#);
        let _ = serde_json::to_writer(&mut self.out, full_url);
        self.out.extend_from_slice(br#","resource":"#);
        self.out.extend_from_slice(text.as_bytes());
        if let Some(mode) = search_mode {
            self.out.extend_from_slice(br#","search":{"mode":"#);
            let _ = serde_json::to_writer(&mut self.out, mode);
            self.out.push(b'}');
        }
        self.out.push(b'}');
    }

    /// The finished Bundle's JSON text.
    pub fn finish(mut self) -> Vec<u8> {
        if self.entries > 0 {
            self.out.push(b']');
        }
        self.out.push(b'}');
        self.out
    }
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

    #[test]
    fn searchset_text_is_the_searchset_bytes() {
        let links = || {
            vec![
                Link {
                    relation: "self",
                    url: "http://x/Patient?name=\"a\"".into(),
                },
                Link {
                    relation: "next",
                    url: "n".into(),
                },
            ]
        };
        let p = json!({"resourceType": "Patient", "id": "p1", "name": [{"text": "山田 \"t\""}]});
        let outcome = json!({"resourceType": "OperationOutcome", "issue": []});
        let entry = |r: &Value, mode| Entry {
            full_url: "http://x/Patient/p1".into(),
            resource: r.clone(),
            search_mode: mode,
        };
        for (total, links, n) in [(None, Vec::new(), 0), (Some(7), links(), 3)] {
            let mut t = SearchsetText::new(total, links.clone());
            let mut want = Vec::new();
            for i in 0..n {
                let mode = [Some("match"), None, Some("include")][i];
                t.entry_text("http://x/Patient/p1", &p.to_string(), mode);
                want.push(entry(&p, mode));
            }
            if n > 0 {
                t.entry(entry(&outcome, Some("outcome")));
                want.push(entry(&outcome, Some("outcome")));
            }
            assert_eq!(
                String::from_utf8(t.finish()).unwrap(),
                searchset(total, links, want).to_string()
            );
        }
    }
}
