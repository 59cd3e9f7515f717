//! The hash-chained audit log: entry hashing and chain verification.
//!
//! Each entry's hash covers the previous entry's hash, its own sequence number,
//! its timestamp and its record in canonical JSON, so altering, removing or
//! reordering any stored entry is detectable by re-walking the chain. The head
//! `(seq, hash)` should be anchored outside the database (e.g. published
//! periodically) so that truncating the tail or re-forging the whole chain is
//! detectable too.

use chrono::{DateTime, Utc};
use serde_json::Value;
use sha2::{Digest, Sha256};
use tsunagi_fhir::FhirResult;

use crate::api::{AuditEntry, Store};

/// `prev_hash` of the first entry.
pub const GENESIS_HASH: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// Hex SHA-256 over `prev_hash`, `seq`, `recorded` (RFC 3339, milliseconds, `Z`)
/// and the record as canonical JSON, separated by newlines.
pub fn entry_hash(prev_hash: &str, seq: i64, recorded: &DateTime<Utc>, record: &Value) -> String {
    let mut h = Sha256::new();
    h.update(prev_hash.as_bytes());
    h.update(b"\n");
    h.update(seq.to_string().as_bytes());
    h.update(b"\n");
    h.update(
        recorded
            .to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
            .as_bytes(),
    );
    h.update(b"\n");
    let mut canon = String::new();
    canonical_json(record, &mut canon);
    h.update(canon.as_bytes());
    hex(&h.finalize())
}

fn hex(bytes: &[u8]) -> String {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(HEX[(b >> 4) as usize] as char);
        s.push(HEX[(b & 15) as usize] as char);
    }
    s
}

/// Serialises with object keys sorted recursively (by UTF-8 bytes) and no
/// whitespace. The workspace keeps insertion order in `serde_json::Map`, so a
/// plain `to_string` would hash the same record differently depending on how
/// it was built. Keys and scalars are written as `serde_json` writes them,
/// straight into `out` (every audit append runs this).
pub fn canonical_json(v: &Value, out: &mut String) {
    let mut buf = std::mem::take(out).into_bytes();
    canonical_into(v, &mut buf);
    // only serde_json's output and ASCII punctuation were appended to UTF-8
    *out = String::from_utf8(buf)
        .unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned());
}

fn canonical_into(v: &Value, out: &mut Vec<u8>) {
    match v {
        Value::Object(m) => {
            let mut entries: Vec<(&String, &Value)> = m.iter().collect();
            entries.sort_unstable_by(|a, b| a.0.cmp(b.0));
            out.push(b'{');
            for (i, (k, x)) in entries.into_iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                scalar(k, out);
                out.push(b':');
                canonical_into(x, out);
            }
            out.push(b'}');
        }
        Value::Array(a) => {
            out.push(b'[');
            for (i, x) in a.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                canonical_into(x, out);
            }
            out.push(b']');
        }
        other => scalar(other, out),
    }
}

fn scalar<T: serde::Serialize + ?Sized>(v: &T, out: &mut Vec<u8>) {
    // writing a string or a JSON scalar to a Vec cannot fail
    let _ = serde_json::to_writer(out, v);
}

/// What is wrong with an entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProblemKind {
    /// The entry's content no longer matches its hash (record, time or hash edited).
    Altered,
    /// Entries before this seq are missing (a gap in the sequence); `count` of them.
    Missing { count: i64 },
    /// An authentic entry stored under the wrong seq (entries swapped or renumbered).
    Reordered { belongs_at: i64 },
    /// A self-consistent entry whose `prev_hash` differs from the hash of the
    /// entry before it: an entry was re-forged or inserted before it.
    BadLink,
    /// The chain ends before the expected (externally anchored) head.
    Truncated { expected_seq: i64 },
    /// The entry at the expected head's seq has a different hash.
    HeadMismatch,
    /// An entry could not be read.
    Unreadable,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChainProblem {
    /// The seq where the problem shows (for `Missing`, the first missing seq).
    pub seq: i64,
    pub kind: ProblemKind,
}

/// Result of walking the chain.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct VerifyReport {
    /// Entries examined.
    pub checked: u64,
    pub problems: Vec<ChainProblem>,
    /// Last entry seen: (seq, hash). Anchor it outside the database.
    pub head: Option<(i64, String)>,
}

impl VerifyReport {
    pub fn ok(&self) -> bool {
        self.problems.is_empty()
    }
}

/// How far from its stated seq a moved entry is looked for.
const REORDER_WINDOW: i64 = 16;

/// Verifies a chain given in `seq` order, starting at the first entry.
pub fn verify_chain(entries: impl Iterator<Item = FhirResult<AuditEntry>>) -> VerifyReport {
    verify_chain_against(entries, None)
}

/// As [`verify_chain`], and checks that the chain reaches `expected_head`
/// (seq, hash) recorded earlier outside the database, detecting a truncated tail.
pub fn verify_chain_against(
    entries: impl Iterator<Item = FhirResult<AuditEntry>>,
    expected_head: Option<(i64, &str)>,
) -> VerifyReport {
    let mut report = VerifyReport::default();
    let mut prev: Option<(i64, String)> = None;
    let mut seen_expected = false;
    let mut prev_flagged = false;
    for e in entries {
        let e = match e {
            Ok(e) => e,
            Err(_) => {
                let seq = prev.as_ref().map_or(1, |p| p.0 + 1);
                report.problems.push(ChainProblem {
                    seq,
                    kind: ProblemKind::Unreadable,
                });
                break;
            }
        };
        report.checked += 1;
        let expected_seq = prev.as_ref().map_or(1, |p| p.0 + 1);
        let gap = e.seq > expected_seq;
        if gap {
            report.problems.push(ChainProblem {
                seq: expected_seq,
                kind: ProblemKind::Missing {
                    count: e.seq - expected_seq,
                },
            });
        }
        let linked = match &prev {
            None => e.prev_hash == GENESIS_HASH,
            Some((_, h)) => &e.prev_hash == h,
        };
        let mut flagged = false;
        if entry_hash(&e.prev_hash, e.seq, &e.recorded, &e.record) != e.hash {
            // An authentic entry moved to another seq still verifies at its own seq.
            let belongs = (1..=REORDER_WINDOW)
                .flat_map(|d| [e.seq - d, e.seq + d])
                .filter(|s| *s > 0)
                .find(|s| entry_hash(&e.prev_hash, *s, &e.recorded, &e.record) == e.hash);
            let kind = match belongs {
                Some(belongs_at) => ProblemKind::Reordered { belongs_at },
                None => ProblemKind::Altered,
            };
            report.problems.push(ChainProblem { seq: e.seq, kind });
            flagged = true;
        } else if e.seq < expected_seq || (!gap && !prev_flagged && !linked) {
            report.problems.push(ChainProblem {
                seq: e.seq,
                kind: ProblemKind::BadLink,
            });
            flagged = true;
        }
        prev_flagged = flagged;
        if let Some((s, h)) = expected_head
            && s == e.seq
        {
            seen_expected = true;
            if h != e.hash {
                report.problems.push(ChainProblem {
                    seq: e.seq,
                    kind: ProblemKind::HeadMismatch,
                });
            }
        }
        prev = Some((e.seq, e.hash));
    }
    if let Some((s, _)) = expected_head
        && !seen_expected
        && prev.as_ref().is_none_or(|p| p.0 < s)
    {
        let seq = prev.as_ref().map_or(1, |p| p.0 + 1);
        report.problems.push(ChainProblem {
            seq,
            kind: ProblemKind::Truncated { expected_seq: s },
        });
    }
    report.head = prev;
    report
}

/// The whole audit log of a store in `seq` order, read in pages.
pub fn scan_all(store: &dyn Store) -> impl Iterator<Item = FhirResult<AuditEntry>> + '_ {
    const PAGE: usize = 1000;
    let mut after = 0i64;
    let mut buf: std::vec::IntoIter<AuditEntry> = Vec::new().into_iter();
    let mut done = false;
    std::iter::from_fn(move || {
        loop {
            if let Some(e) = buf.next() {
                after = e.seq;
                return Some(Ok(e));
            }
            if done {
                return None;
            }
            match store.audit_scan(after, PAGE) {
                Ok(page) => {
                    done = page.len() < PAGE;
                    if page.is_empty() {
                        return None;
                    }
                    buf = page.into_iter();
                }
                Err(e) => {
                    done = true;
                    return Some(Err(e));
                }
            }
        }
    })
}

#[cfg(test)]
mod tests {
    /// The former implementation, kept to pin the hashed bytes: a change here
    /// would make every stored chain fail verification.
    fn canonical_reference(v: &Value, out: &mut String) {
        match v {
            Value::Object(m) => {
                let mut keys: Vec<&String> = m.keys().collect();
                keys.sort();
                out.push('{');
                for (i, k) in keys.iter().enumerate() {
                    if i > 0 {
                        out.push(',');
                    }
                    out.push_str(&Value::String((*k).clone()).to_string());
                    out.push(':');
                    canonical_reference(&m[k.as_str()], out);
                }
                out.push('}');
            }
            Value::Array(a) => {
                out.push('[');
                for (i, x) in a.iter().enumerate() {
                    if i > 0 {
                        out.push(',');
                    }
                    canonical_reference(x, out);
                }
                out.push(']');
            }
            other => out.push_str(&other.to_string()),
        }
    }

    #[test]
    fn canonical_bytes_are_unchanged() {
        let v = serde_json::json!({"z": [1, 2.5, -3e300, null, true, "\u{1}\"\\/\n日本"],
            "a": {"é": 1, "e": {"y": [], "x": {}}, "": ""}, "Z": 0, "10": "x", "9": 18446744073709551615u64});
        let (mut new, mut old) = (String::from("prefix:"), String::from("prefix:"));
        canonical_json(&v, &mut new);
        canonical_reference(&v, &mut old);
        assert_eq!(new, old);
        assert!(new.starts_with("prefix:{\"10\":\"x\",\"9\""), "{new}");
    }

    use super::*;
    use serde_json::json;

    fn chain(n: i64) -> Vec<AuditEntry> {
        let mut prev = GENESIS_HASH.to_string();
        let t = DateTime::from_timestamp_millis(1_700_000_000_123).unwrap();
        (1..=n)
            .map(|seq| {
                let record = json!({"n": seq, "b": [1, {"z": 1, "a": 2}]});
                let hash = entry_hash(&prev, seq, &t, &record);
                let e = AuditEntry {
                    seq,
                    recorded: t,
                    record,
                    prev_hash: prev.clone(),
                    hash: hash.clone(),
                };
                prev = hash;
                e
            })
            .collect()
    }

    #[test]
    fn canonical_is_key_order_independent() {
        let a: Value = serde_json::from_str(r#"{"b":1,"a":{"y":[1,2],"x":"s"}}"#).unwrap();
        let b: Value = serde_json::from_str(r#"{"a":{"x":"s","y":[1,2]},"b":1}"#).unwrap();
        let t = Utc::now();
        assert_eq!(entry_hash("p", 1, &t, &a), entry_hash("p", 1, &t, &b));
        let mut s = String::new();
        canonical_json(&a, &mut s);
        assert_eq!(s, r#"{"a":{"x":"s","y":[1,2]},"b":1}"#);
    }

    #[test]
    fn detects_each_kind() {
        let c = chain(10);
        let r = verify_chain(c.clone().into_iter().map(Ok));
        assert!(r.ok(), "{r:?}");
        assert_eq!(r.head, Some((10, c[9].hash.clone())));

        let mut altered = c.clone();
        altered[2].record = json!({"evil": true});
        let r = verify_chain(altered.into_iter().map(Ok));
        assert_eq!(
            r.problems,
            vec![ChainProblem {
                seq: 3,
                kind: ProblemKind::Altered
            }]
        );

        let mut missing = c.clone();
        missing.remove(4);
        let r = verify_chain(missing.into_iter().map(Ok));
        assert_eq!(
            r.problems,
            vec![ChainProblem {
                seq: 5,
                kind: ProblemKind::Missing { count: 1 }
            }]
        );

        let mut swapped = c.clone();
        swapped.swap(6, 7);
        let (a, b) = (swapped[6].seq, swapped[7].seq);
        swapped[6].seq = b;
        swapped[7].seq = a;
        let r = verify_chain(swapped.into_iter().map(Ok));
        assert_eq!(
            r.problems,
            vec![
                ChainProblem {
                    seq: 7,
                    kind: ProblemKind::Reordered { belongs_at: 8 }
                },
                ChainProblem {
                    seq: 8,
                    kind: ProblemKind::Reordered { belongs_at: 7 }
                }
            ]
        );

        let mut forged = c.clone();
        forged[3].record = json!({"evil": true});
        forged[3].hash = entry_hash(
            &forged[3].prev_hash,
            4,
            &forged[3].recorded,
            &forged[3].record,
        );
        let r = verify_chain(forged.into_iter().map(Ok));
        assert_eq!(
            r.problems,
            vec![ChainProblem {
                seq: 5,
                kind: ProblemKind::BadLink
            }]
        );

        let r = verify_chain_against(c[..8].iter().cloned().map(Ok), Some((10, &c[9].hash)));
        assert_eq!(
            r.problems,
            vec![ChainProblem {
                seq: 9,
                kind: ProblemKind::Truncated { expected_seq: 10 }
            }]
        );
    }
}
