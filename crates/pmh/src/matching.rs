//! Person matching (本人照合): a recipient row names a person by the municipality's
//! data (name, kana, birth date, sex, address); we find the platform's Patient.
//!
//! Rule, deliberately conservative: candidates are the patients born that day of
//! the same sex whose kana name equals the row's (NFKC, spaces removed, so
//! half-width/full-width and spacing differences do not matter). When a kanji
//! name is given and several candidates remain, the kanji name narrows them, then
//! the address. Exactly one left is a match; none is `not-found`; more than one is
//! `ambiguous`. Both go to the review list, never to a guess.
//!
//! The index is prepared in memory per birth date on first use (one indexed
//! `birthdate` query per distinct date of the file, not one per row), so a large
//! file costs at most ~36,500 lookups however many rows it has.

use std::collections::HashMap;

use chrono::NaiveDate;
use serde_json::Value;
use tsunagi_fhir::index::normalize_string;
use tsunagi_fhir::{FhirResult, query};
use tsunagi_store::{Scope, Store};

/// Who a row names.
#[derive(Debug, Clone, PartialEq)]
pub struct PersonData {
    pub family_name: String,
    pub given_name: String,
    pub family_kana: String,
    pub given_kana: String,
    pub birth_date: NaiveDate,
    /// male, female, other, unknown.
    pub gender: String,
    pub address: String,
}

/// Outcome of matching.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Match {
    Found(String),
    NotFound,
    Ambiguous(Vec<String>),
}

#[derive(Debug, Clone)]
struct Candidate {
    id: String,
    gender: String,
    kana: Vec<String>,
    kanji: Vec<String>,
    address: Vec<String>,
}

/// Folds a name or address for comparison: NFKC, lowercase, no spaces.
pub fn fold(s: &str) -> String {
    normalize_string(s)
        .chars()
        .filter(|c| !c.is_whitespace())
        .collect()
}

fn names(p: &Value, representation: &str) -> Vec<String> {
    p.get("name")
        .and_then(Value::as_array)
        .map(|ns| {
            ns.iter()
                .filter(|n| {
                    let rep = n
                        .pointer("/extension/0/valueCode")
                        .and_then(Value::as_str)
                        .unwrap_or("IDE");
                    rep == representation
                })
                .map(|n| {
                    let family = n.get("family").and_then(Value::as_str).unwrap_or("");
                    let given: String = n
                        .get("given")
                        .and_then(Value::as_array)
                        .map(|g| g.iter().filter_map(Value::as_str).collect())
                        .unwrap_or_default();
                    if family.is_empty() && given.is_empty() {
                        fold(n.get("text").and_then(Value::as_str).unwrap_or(""))
                    } else {
                        fold(&format!("{family}{given}"))
                    }
                })
                .filter(|s| !s.is_empty())
                .collect()
        })
        .unwrap_or_default()
}

fn candidate(p: &Value) -> Option<Candidate> {
    Some(Candidate {
        id: p.get("id")?.as_str()?.to_string(),
        gender: p
            .get("gender")
            .and_then(Value::as_str)
            .unwrap_or("unknown")
            .to_string(),
        kana: names(p, "SYL"),
        kanji: names(p, "IDE"),
        address: p
            .get("address")
            .and_then(Value::as_array)
            .map(|a| {
                a.iter()
                    .filter_map(|x| x.get("text").and_then(Value::as_str))
                    .map(fold)
                    .collect()
            })
            .unwrap_or_default(),
    })
}

/// The per-import matching index.
#[derive(Default)]
pub struct Matcher {
    by_birth: HashMap<NaiveDate, Vec<Candidate>>,
    /// Queries made (for the benchmark notes).
    pub lookups: usize,
}

impl Matcher {
    fn candidates(&mut self, store: &dyn Store, born: NaiveDate) -> FhirResult<&[Candidate]> {
        if !self.by_birth.contains_key(&born) {
            self.lookups += 1;
            let mut all = Vec::new();
            let mut offset = 0;
            loop {
                let q = query::parse(
                    "Patient",
                    &[
                        ("birthdate".into(), born.to_string()),
                        ("_count".into(), "1000".into()),
                        ("_offset".into(), offset.to_string()),
                    ],
                )?;
                let found = store.search(&q, &Scope::Unrestricted)?;
                let n = found.matches.len();
                all.extend(
                    found
                        .matches
                        .iter()
                        .filter(|s| !s.deleted)
                        .filter_map(|s| s.resource.as_ref())
                        .filter_map(candidate),
                );
                if n < 1000 {
                    break;
                }
                offset += n;
            }
            self.by_birth.insert(born, all);
        }
        Ok(self.by_birth.get(&born).map(Vec::as_slice).unwrap_or(&[]))
    }

    /// Matches one person (see the module docs for the rule).
    pub fn find(&mut self, store: &dyn Store, who: &PersonData) -> FhirResult<Match> {
        let kana = fold(&format!("{}{}", who.family_kana, who.given_kana));
        let kanji = fold(&format!("{}{}", who.family_name, who.given_name));
        let address = fold(&who.address);
        let cands = self.candidates(store, who.birth_date)?;
        let mut left: Vec<&Candidate> = cands
            .iter()
            .filter(|c| c.gender == who.gender && c.kana.contains(&kana))
            .collect();
        if left.len() > 1 && !kanji.is_empty() {
            let narrowed: Vec<&Candidate> = left
                .iter()
                .copied()
                .filter(|c| c.kanji.contains(&kanji))
                .collect();
            if !narrowed.is_empty() {
                left = narrowed;
            }
        }
        if left.len() > 1 && !address.is_empty() {
            let narrowed: Vec<&Candidate> = left
                .iter()
                .copied()
                .filter(|c| c.address.contains(&address))
                .collect();
            if !narrowed.is_empty() {
                left = narrowed;
            }
        }
        Ok(match left.as_slice() {
            [] => Match::NotFound,
            [one] => Match::Found(one.id.clone()),
            many => Match::Ambiguous(many.iter().map(|c| c.id.clone()).collect()),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn folds_width_and_spaces() {
        assert_eq!(fold("ﾔﾏﾀﾞ ﾀﾛｳ"), fold("ヤマダ　タロウ"));
        assert_ne!(fold("ヤマダ"), fold("ヤマタ"));
    }

    #[test]
    fn reads_jp_core_names() {
        let p = json!({"resourceType": "Patient", "id": "p1", "gender": "male",
            "name": [
              {"extension": [{"url": "x", "valueCode": "IDE"}], "family": "山田", "given": ["太郎"]},
              {"extension": [{"url": "x", "valueCode": "SYL"}], "family": "ヤマダ", "given": ["タロウ"]}],
            "address": [{"text": "東京都千代田区1-1"}]});
        let c = candidate(&p).unwrap();
        assert_eq!(c.kana, vec![fold("ヤマダタロウ")]);
        assert_eq!(c.kanji, vec![fold("山田太郎")]);
        assert_eq!(c.address, vec![fold("東京都千代田区1-1")]);
    }
}
