//! Statistical disclosure control (統計的開示制御) of aggregate outputs.
//!
//! An output is a table of counts (and optional measures) by up to
//! [`MAX_DIMS`] dimensions. The released table carries every margin (the totals
//! by each dimension and the grand total), so:
//! 1. **primary suppression**: every cell or total whose count is in 1..threshold
//!    is suppressed (zero cells are absent, not published);
//! 2. **secondary suppression**: in every line (the cells that sum to one total
//!    along one dimension, together with that total) a single suppressed entry
//!    could be recovered by subtraction, so while some line has exactly one
//!    suppressed entry, the smallest unsuppressed entry of that line is suppressed
//!    too; this repeats until no line has exactly one.
//!
//! Measures (sum, average, ...) are published only for inner cells whose count is
//! not suppressed; totals carry counts only.

use std::collections::{BTreeMap, BTreeSet};

use serde::Serialize;

pub const MAX_DIMS: usize = 4;
/// The label of a total in a dimension column.
pub const TOTAL: &str = "(total)";

/// One inner cell of an aggregate: its dimension values, count and measures.
#[derive(Debug, Clone, PartialEq)]
pub struct Cell {
    pub key: Vec<String>,
    pub count: u64,
    pub measures: Vec<Option<f64>>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Row {
    /// Dimension values; [`TOTAL`] marks a margin.
    pub key: Vec<String>,
    /// None when suppressed.
    pub count: Option<u64>,
    pub measures: Vec<Option<f64>>,
    pub suppressed: Option<&'static str>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Protected {
    pub dimensions: Vec<String>,
    pub measures: Vec<String>,
    pub rows: Vec<Row>,
    pub primary: usize,
    pub secondary: usize,
    pub threshold: u64,
}

type Key = Vec<Option<String>>;

/// Applies primary and secondary suppression. `dims` names the key columns.
pub fn protect(
    dims: &[String],
    measures: &[String],
    cells: Vec<Cell>,
    threshold: u64,
) -> Result<Protected, String> {
    let d = dims.len();
    if d > MAX_DIMS {
        return Err(format!("at most {MAX_DIMS} dimensions"));
    }
    // Every key with its count: inner cells and all margins (None = total).
    let mut counts: BTreeMap<Key, u64> = BTreeMap::new();
    let mut inner: BTreeMap<Key, Vec<Option<f64>>> = BTreeMap::new();
    for c in cells {
        if c.key.len() != d {
            return Err("cell key does not match the dimensions".into());
        }
        if c.count == 0 {
            continue;
        }
        let key: Key = c.key.into_iter().map(Some).collect();
        for mask in 0..(1u32 << d) {
            let m: Key = key
                .iter()
                .enumerate()
                .map(|(i, v)| {
                    if mask & (1 << i) != 0 {
                        None
                    } else {
                        v.clone()
                    }
                })
                .collect();
            *counts.entry(m).or_default() += c.count;
        }
        *inner.entry(key).or_default() = c.measures;
    }
    // Lines: a total (None at dimension i) and its members along dimension i.
    let mut lines: BTreeMap<(usize, Key), Vec<Key>> = BTreeMap::new();
    for k in counts.keys() {
        for i in 0..d {
            if let Some(_v) = &k[i] {
                let mut t = k.clone();
                t[i] = None;
                lines.entry((i, t)).or_default().push(k.clone());
            }
        }
    }
    let primary: BTreeSet<Key> = counts
        .iter()
        .filter(|(_, n)| **n < threshold)
        .map(|(k, _)| k.clone())
        .collect();
    let primary_n = primary.len();
    let mut secondary: BTreeSet<Key> = BTreeSet::new();
    loop {
        let mut changed = false;
        for ((_, total), members) in &lines {
            let hidden = members
                .iter()
                .chain(std::iter::once(total))
                .filter(|k| primary.contains(*k) || secondary.contains(*k))
                .count();
            if hidden != 1 {
                continue;
            }
            // Smallest visible member, else the total itself.
            let pick = members
                .iter()
                .filter(|k| !primary.contains(*k) && !secondary.contains(*k))
                .min_by_key(|k| (counts[*k], (*k).clone()))
                .cloned()
                .unwrap_or_else(|| total.clone());
            if !primary.contains(&pick) && secondary.insert(pick) {
                changed = true;
            }
        }
        if !changed {
            break;
        }
    }
    let rows = counts
        .iter()
        .map(|(k, n)| {
            let why = if primary.contains(k) {
                Some("primary")
            } else if secondary.contains(k) {
                Some("secondary")
            } else {
                None
            };
            let m = match (why, inner.get(k)) {
                (None, Some(m)) => m.clone(),
                _ => vec![None; measures.len()],
            };
            Row {
                key: k
                    .iter()
                    .map(|v| v.clone().unwrap_or_else(|| TOTAL.to_string()))
                    .collect(),
                count: if why.is_some() { None } else { Some(*n) },
                measures: m,
                suppressed: why,
            }
        })
        .collect();
    Ok(Protected {
        dimensions: dims.to_vec(),
        measures: measures.to_vec(),
        rows,
        primary: primary_n,
        secondary: secondary.len(),
        threshold,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cell(k: &[&str], n: u64) -> Cell {
        Cell {
            key: k.iter().map(|s| s.to_string()).collect(),
            count: n,
            measures: vec![Some(n as f64 * 1.5)],
        }
    }

    fn dims(n: usize) -> Vec<String> {
        ["a", "b", "c"][..n].iter().map(|s| s.to_string()).collect()
    }

    fn get<'a>(p: &'a Protected, k: &[&str]) -> &'a Row {
        p.rows.iter().find(|r| r.key == k).unwrap()
    }

    /// No suppressed value can be recovered: for every line with a published
    /// total, at least two entries are hidden or none is.
    fn assert_no_recovery(p: &Protected) {
        let d = p.dimensions.len();
        for total in &p.rows {
            for i in 0..d {
                if total.key[i] != TOTAL {
                    continue;
                }
                let members: Vec<&Row> = p
                    .rows
                    .iter()
                    .filter(|r| {
                        r.key[i] != TOTAL && (0..d).all(|j| j == i || r.key[j] == total.key[j])
                    })
                    .collect();
                let hidden = members.iter().filter(|r| r.count.is_none()).count()
                    + usize::from(total.count.is_none());
                assert_ne!(
                    hidden, 1,
                    "line {:?} along {i} has one hidden entry",
                    total.key
                );
            }
        }
    }

    #[test]
    fn one_dimension_small_cell_and_its_partner_are_hidden() {
        let p = protect(
            &dims(1),
            &["avg".into()],
            vec![
                cell(&["x"], 50),
                cell(&["y"], 3),
                cell(&["z"], 20),
                cell(&["w"], 12),
            ],
            10,
        )
        .unwrap();
        assert_eq!(get(&p, &["y"]).count, None);
        assert_eq!(get(&p, &["y"]).suppressed, Some("primary"));
        // The smallest other cell goes too, so y is not total - (x + z + w).
        assert_eq!(get(&p, &["w"]).suppressed, Some("secondary"));
        assert_eq!(get(&p, &["w"]).measures, vec![None]);
        assert_eq!(get(&p, &["x"]).count, Some(50));
        assert_eq!(get(&p, &["x"]).measures, vec![Some(75.0)]);
        assert_eq!(get(&p, &[TOTAL]).count, Some(85));
        assert_eq!((p.primary, p.secondary), (1, 1));
        assert_no_recovery(&p);
    }

    #[test]
    fn two_dimensions_have_no_recoverable_cell() {
        let mut cells = Vec::new();
        let counts = [[40, 3, 25], [12, 30, 18], [15, 20, 2]];
        for (i, row) in counts.iter().enumerate() {
            for (j, n) in row.iter().enumerate() {
                cells.push(cell(&[&format!("r{i}"), &format!("c{j}")], *n));
            }
        }
        let p = protect(&dims(2), &[], cells, 10).unwrap();
        assert_eq!(get(&p, &["r0", "c1"]).count, None);
        assert_eq!(get(&p, &["r2", "c2"]).count, None);
        assert_eq!(get(&p, &[TOTAL, TOTAL]).count, Some(165));
        assert!(p.secondary >= 2);
        assert_no_recovery(&p);
    }

    #[test]
    fn single_member_line_hides_its_total() {
        let p = protect(
            &dims(2),
            &[],
            vec![
                cell(&["a", "x"], 4),
                cell(&["b", "x"], 40),
                cell(&["b", "y"], 30),
            ],
            10,
        )
        .unwrap();
        // Row total of a equals the only cell of a: hidden too.
        assert_eq!(get(&p, &["a", TOTAL]).count, None);
        assert_no_recovery(&p);
    }

    #[test]
    fn many_random_tables_never_leak() {
        let mut seed = 7u64;
        let mut next = move || {
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (seed >> 33) % 40
        };
        for _ in 0..200 {
            let mut cells = Vec::new();
            for i in 0..4 {
                for j in 0..3 {
                    for k in 0..2 {
                        cells.push(cell(
                            &[&i.to_string(), &j.to_string(), &k.to_string()],
                            next(),
                        ));
                    }
                }
            }
            let p = protect(&dims(3), &[], cells, 10).unwrap();
            assert_no_recovery(&p);
            for r in &p.rows {
                if let Some(n) = r.count {
                    assert!(n >= 10);
                }
            }
        }
    }
}
