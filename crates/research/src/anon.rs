//! Anonymisation (匿名加工): configurable transformations of a table and the
//! k-anonymity measurement that gates a release.
//!
//! Columns not named in the spec are dropped (deny by default). The release is
//! refused when the smallest equivalence class over the quasi-identifiers is
//! below `k`.

use std::collections::{BTreeMap, HashMap};

use chrono::{Datelike, NaiveDate};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// A cell of a table to anonymise.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(untagged)]
pub enum Val {
    Null,
    Text(String),
    Num(f64),
    Date(NaiveDate),
}

impl Val {
    pub fn text(s: &str) -> Val {
        Val::Text(s.to_string())
    }
    fn key(&self) -> String {
        match self {
            Val::Null => String::new(),
            Val::Text(s) => s.clone(),
            Val::Num(n) => num(*n),
            Val::Date(d) => d.to_string(),
        }
    }
}

/// How one column is released.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "kebab-case")]
pub enum Transform {
    /// Copied unchanged.
    Keep,
    /// A new record id per released row, `prefix` + zero-padded sequence starting at
    /// `start` (not derived from any id, so the release cannot be linked back).
    RecordId {
        prefix: String,
        width: usize,
        #[serde(default = "one")]
        start: usize,
    },
    /// A date truncated to `month` (`2003/7`) or `year` (`2003`).
    TruncateDate { to: DateUnit },
    /// Every date of the same person moved by one secret offset in
    /// [-max_days, max_days] (keeps intervals within a person).
    ShiftDate {
        max_days: i64,
        person_column: String,
    },
    /// Numeric bands `lo～hi` of `width`, with values at or above `top` released as
    /// `top以上` and values below `bottom` as `bottom未満`.
    Band {
        width: f64,
        #[serde(default)]
        bottom: Option<f64>,
        #[serde(default)]
        top: Option<f64>,
    },
    /// Categories seen fewer than `min_count` times in the release become `other`
    /// (default `その他`).
    RareCategory {
        min_count: usize,
        #[serde(default = "sonota")]
        other: String,
    },
}

fn one() -> usize {
    1
}
fn sonota() -> String {
    "その他".into()
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DateUnit {
    Month,
    Year,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AnonSpec {
    /// Output columns in order, each with its transform; other columns are dropped.
    pub columns: Vec<(String, Transform)>,
    /// Columns (after transformation) whose combination could single someone out.
    pub quasi_identifiers: Vec<String>,
    /// Smallest equivalence class size allowed in a release.
    pub k: usize,
    /// Secret of this release for date shifting (never published).
    #[serde(default)]
    pub secret: String,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Table {
    pub columns: Vec<String>,
    pub rows: Vec<Vec<Val>>,
}

impl Table {
    fn col(&self, name: &str) -> Result<usize, String> {
        self.columns
            .iter()
            .position(|c| c == name)
            .ok_or_else(|| format!("no column '{name}'"))
    }
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct KReport {
    /// Smallest equivalence class (0 for an empty table).
    pub k: usize,
    pub classes: usize,
    /// Rows in classes smaller than the required k.
    pub rows_below: usize,
}

/// k-anonymity of `table` over `qis`.
pub fn measure_k(table: &Table, qis: &[String], required: usize) -> Result<KReport, String> {
    let idx: Vec<usize> = qis.iter().map(|q| table.col(q)).collect::<Result<_, _>>()?;
    let mut classes: HashMap<Vec<String>, usize> = HashMap::new();
    for r in &table.rows {
        *classes
            .entry(idx.iter().map(|&i| r[i].key()).collect())
            .or_default() += 1;
    }
    Ok(KReport {
        k: classes.values().copied().min().unwrap_or(0),
        classes: classes.len(),
        rows_below: classes.values().filter(|&&n| n < required).sum(),
    })
}

pub fn num(n: f64) -> String {
    if n.fract() == 0.0 && n.abs() < 1e15 {
        format!("{}", n as i64)
    } else {
        format!("{n}")
    }
}

fn band(v: f64, width: f64, bottom: Option<f64>, top: Option<f64>) -> String {
    if let Some(t) = top
        && v >= t
    {
        return format!("{}以上", num(t));
    }
    if let Some(b) = bottom
        && v < b
    {
        return format!("{}未満", num(b));
    }
    let lo = (v / width).floor() * width;
    format!("{}～{}", num(lo), num(lo + width))
}

pub fn shift_days(secret: &str, person: &str, max: i64) -> i64 {
    let h = Sha256::new()
        .chain_update(secret.as_bytes())
        .chain_update([0])
        .chain_update(person.as_bytes())
        .finalize();
    let x = u64::from_be_bytes(h[..8].try_into().expect("8 bytes"));
    (x % (2 * max as u64 + 1)) as i64 - max
}

/// Applies the spec. Errors name the column at fault.
pub fn transform(input: &Table, spec: &AnonSpec) -> Result<Table, String> {
    let mut out_cols = Vec::new();
    let mut cols: Vec<Vec<Val>> = Vec::new();
    for (name, t) in &spec.columns {
        let i = input.col(name)?;
        let src: Vec<&Val> = input.rows.iter().map(|r| &r[i]).collect();
        let col: Vec<Val> = match t {
            Transform::Keep => src.into_iter().cloned().collect(),
            Transform::RecordId {
                prefix,
                width,
                start,
            } => (0..src.len())
                .map(|n| Val::Text(format!("{prefix}{:0width$}", start + n)))
                .collect(),
            Transform::TruncateDate { to } => src
                .into_iter()
                .map(|v| match v {
                    Val::Date(d) => Ok(Val::Text(match to {
                        DateUnit::Month => format!("{}/{}", d.year(), d.month()),
                        DateUnit::Year => format!("{}", d.year()),
                    })),
                    Val::Null => Ok(Val::Null),
                    _ => Err(format!("{name}: truncate-date needs dates")),
                })
                .collect::<Result<_, _>>()?,
            Transform::ShiftDate {
                max_days,
                person_column,
            } => {
                let p = input.col(person_column)?;
                if spec.secret.is_empty() {
                    return Err(format!("{name}: shift-date needs the release secret"));
                }
                input
                    .rows
                    .iter()
                    .map(|r| match &r[i] {
                        Val::Date(d) => Ok(Val::Date(
                            *d + chrono::Duration::days(shift_days(
                                &spec.secret,
                                &r[p].key(),
                                *max_days,
                            )),
                        )),
                        Val::Null => Ok(Val::Null),
                        _ => Err(format!("{name}: shift-date needs dates")),
                    })
                    .collect::<Result<_, _>>()?
            }
            Transform::Band { width, bottom, top } => {
                if *width <= 0.0 {
                    return Err(format!("{name}: band width must be positive"));
                }
                src.into_iter()
                    .map(|v| match v {
                        Val::Num(n) => Ok(Val::Text(band(*n, *width, *bottom, *top))),
                        Val::Null => Ok(Val::Null),
                        _ => Err(format!("{name}: band needs numbers")),
                    })
                    .collect::<Result<_, _>>()?
            }
            Transform::RareCategory { min_count, other } => {
                let mut freq: BTreeMap<String, usize> = BTreeMap::new();
                for v in &src {
                    *freq.entry(v.key()).or_default() += 1;
                }
                src.into_iter()
                    .map(|v| match v {
                        Val::Null => Val::Null,
                        v if freq[&v.key()] < *min_count => Val::Text(other.clone()),
                        v => v.clone(),
                    })
                    .collect()
            }
        };
        out_cols.push(name.clone());
        cols.push(col);
    }
    let rows = (0..input.rows.len())
        .map(|r| cols.iter().map(|c| c[r].clone()).collect())
        .collect();
    Ok(Table {
        columns: out_cols,
        rows,
    })
}

/// Transforms and checks k; refuses (Err) a release below the configured k.
pub fn release(input: &Table, spec: &AnonSpec) -> Result<(Table, KReport), String> {
    let t = transform(input, spec)?;
    let rep = measure_k(&t, &spec.quasi_identifiers, spec.k)?;
    if rep.k < spec.k {
        return Err(format!(
            "k-anonymity {} is below the required {} ({} rows in classes smaller than {}); coarsen the quasi-identifiers",
            rep.k, spec.k, rep.rows_below, spec.k
        ));
    }
    Ok((t, rep))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(y: i32, m: u32, day: u32) -> Val {
        Val::Date(NaiveDate::from_ymd_opt(y, m, day).unwrap())
    }

    /// A small cohort whose second record is the worked example of the policy
    /// material: 厚労花子, 女, 2003/7/26, 53.4 kg, systolic 211, 膵島細胞症.
    fn cohort() -> Table {
        let t = Val::text;
        let mut rows = vec![
            vec![
                t("山田一郎"),
                t("男"),
                d(1980, 3, 2),
                Val::Num(71.0),
                Val::Num(128.0),
                t("高血圧症"),
            ],
            vec![
                t("厚労花子"),
                t("女"),
                d(2003, 7, 26),
                Val::Num(53.4),
                Val::Num(211.0),
                t("膵島細胞症"),
            ],
        ];
        for i in 0..8 {
            rows.push(vec![
                t(&format!("女性{i}")),
                t("女"),
                d(2003, 7, 1 + i),
                Val::Num(50.0 + i as f64),
                Val::Num(120.0 + i as f64),
                t("2型糖尿病"),
            ]);
            rows.push(vec![
                t(&format!("男性{i}")),
                t("男"),
                d(1980, 3, 10 + i),
                Val::Num(70.0 + i as f64),
                Val::Num(130.0 + i as f64),
                t("高血圧症"),
            ]);
        }
        rows.push(vec![
            t("女性8"),
            t("女"),
            d(2003, 7, 20),
            Val::Num(55.0),
            Val::Num(118.0),
            t("2型糖尿病"),
        ]);
        Table {
            columns: ["name", "sex", "birth_date", "weight", "systolic", "disease"]
                .map(String::from)
                .to_vec(),
            rows,
        }
    }

    fn spec(k: usize) -> AnonSpec {
        AnonSpec {
            columns: vec![
                (
                    "name".into(),
                    Transform::RecordId {
                        prefix: "B".into(),
                        width: 3,
                        start: 1,
                    },
                ),
                ("sex".into(), Transform::Keep),
                (
                    "birth_date".into(),
                    Transform::TruncateDate {
                        to: DateUnit::Month,
                    },
                ),
                (
                    "weight".into(),
                    Transform::Band {
                        width: 5.0,
                        bottom: None,
                        top: None,
                    },
                ),
                (
                    "systolic".into(),
                    Transform::Band {
                        width: 20.0,
                        bottom: Some(101.0),
                        top: Some(201.0),
                    },
                ),
                (
                    "disease".into(),
                    Transform::RareCategory {
                        min_count: 3,
                        other: "その他".into(),
                    },
                ),
            ],
            quasi_identifiers: vec!["sex".into(), "birth_date".into()],
            k,
            secret: String::new(),
        }
    }

    #[test]
    fn worked_example_reproduces_exactly() {
        let (out, rep) = release(&cohort(), &spec(5)).unwrap();
        let row: Vec<String> = out.rows[1].iter().map(Val::key).collect();
        assert_eq!(row, ["B002", "女", "2003/7", "50～55", "201以上", "その他"]);
        assert_eq!(
            out.columns,
            ["name", "sex", "birth_date", "weight", "systolic", "disease"]
        );
        assert!(rep.k >= 5, "{rep:?}");
        // No input name survives anywhere in the release.
        for r in &out.rows {
            for v in r {
                assert!(!v.key().contains("花子") && !v.key().contains("郎"));
            }
        }
    }

    #[test]
    fn pseudonymised_form_keeps_clinical_values() {
        let spec = AnonSpec {
            columns: vec![
                (
                    "name".into(),
                    Transform::RecordId {
                        prefix: "A".into(),
                        width: 3,
                        start: 1,
                    },
                ),
                ("sex".into(), Transform::Keep),
                ("birth_date".into(), Transform::Keep),
                ("weight".into(), Transform::Keep),
                ("systolic".into(), Transform::Keep),
                ("disease".into(), Transform::Keep),
            ],
            quasi_identifiers: vec![],
            k: 1,
            secret: String::new(),
        };
        let out = transform(&cohort(), &spec).unwrap();
        let row: Vec<String> = out.rows[1].iter().map(Val::key).collect();
        assert_eq!(
            row,
            ["A002", "女", "2003-07-26", "53.4", "211", "膵島細胞症"]
        );
    }

    #[test]
    fn release_below_k_is_refused() {
        // Full birth dates make every person unique.
        let mut s = spec(5);
        s.columns[2].1 = Transform::Keep;
        let err = release(&cohort(), &s).unwrap_err();
        assert!(err.contains("below the required 5"), "{err}");
        let rep = measure_k(&transform(&cohort(), &s).unwrap(), &s.quasi_identifiers, 5).unwrap();
        assert_eq!(rep.k, 1);
    }

    #[test]
    fn unnamed_columns_are_dropped_and_bands_and_codes() {
        let mut s = spec(1);
        s.columns.retain(|(c, _)| c != "name");
        let out = transform(&cohort(), &s).unwrap();
        assert!(!out.columns.contains(&"name".to_string()));
        assert_eq!(band(99.0, 20.0, Some(101.0), Some(201.0)), "101未満");
        assert_eq!(band(150.0, 20.0, Some(101.0), Some(201.0)), "140～160");
        assert_eq!(band(201.0, 20.0, None, Some(201.0)), "201以上");
    }

    #[test]
    fn date_shift_is_per_person_and_keeps_intervals() {
        let t = Table {
            columns: vec!["pid".into(), "day".into()],
            rows: vec![
                vec![Val::text("p1"), d(2026, 1, 1)],
                vec![Val::text("p1"), d(2026, 1, 11)],
                vec![Val::text("p2"), d(2026, 1, 1)],
            ],
        };
        let s = AnonSpec {
            columns: vec![(
                "day".into(),
                Transform::ShiftDate {
                    max_days: 30,
                    person_column: "pid".into(),
                },
            )],
            quasi_identifiers: vec![],
            k: 1,
            secret: "s3cret".into(),
        };
        let out = transform(&t, &s).unwrap();
        let (Val::Date(a), Val::Date(b)) = (&out.rows[0][0], &out.rows[1][0]) else {
            panic!()
        };
        assert_eq!((*b - *a).num_days(), 10);
        let Val::Date(a0) = &t.rows[0][1] else {
            panic!()
        };
        assert!((*a - *a0).num_days().abs() <= 30);
        let mut no_secret = s.clone();
        no_secret.secret.clear();
        assert!(transform(&t, &no_secret).is_err());
    }
}
