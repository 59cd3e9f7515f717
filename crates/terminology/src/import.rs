//! Importing the published master files.

use std::path::Path;

use serde_json::Value;

use crate::csv::{decode, split};
use crate::{
    Allergen, Disease, Drug, HotCode, Interaction, LabCode, MasterKind, Modifier,
    interaction_ingredient, store_dir,
};

/// A row that could not be imported.
#[derive(Debug, Clone, PartialEq)]
pub struct LineError {
    /// 1-based line number in the file.
    pub line: usize,
    pub message: String,
}

/// What an import did.
#[derive(Debug, Clone, PartialEq)]
pub struct ImportReport {
    pub kind: MasterKind,
    pub encoding: &'static str,
    pub imported: usize,
    pub errors: Vec<LineError>,
}

fn digits(s: &str, n: usize) -> bool {
    s.len() == n && s.bytes().all(|b| b.is_ascii_digit())
}

/// Imports `file` as master `kind` into `DATA_DIR/terminology/`, replacing the
/// previous copy of that master. Bad rows are reported by line and skipped.
pub fn import(file: &Path, kind: MasterKind, data_dir: &Path) -> anyhow::Result<ImportReport> {
    import_with_progress(file, kind, data_dir, &|_, _| {})
}

/// As [`import`], calling `progress(done_lines, total_lines)` along the way.
pub fn import_with_progress(
    file: &Path,
    kind: MasterKind,
    data_dir: &Path,
    progress: &dyn Fn(usize, usize),
) -> anyhow::Result<ImportReport> {
    let bytes =
        std::fs::read(file).map_err(|e| anyhow::anyhow!("cannot read {}: {e}", file.display()))?;
    let (text, encoding) = decode(&bytes);
    let mut errors = Vec::new();
    let json: Value = match kind {
        MasterKind::Drug => {
            serde_json::to_value(parse_rows(&text, &mut errors, progress, false, drug_row))?
        }
        MasterKind::Disease => {
            serde_json::to_value(parse_rows(&text, &mut errors, progress, false, disease_row))?
        }
        MasterKind::Modifier => serde_json::to_value(parse_rows(
            &text,
            &mut errors,
            progress,
            false,
            modifier_row,
        ))?,
        MasterKind::Jfagy => serde_json::to_value(parse_jfagy(&text, &mut errors, progress)?)?,
        MasterKind::Interactions => {
            let header = text
                .lines()
                .next()
                .is_some_and(|l| l.trim_start_matches('"').starts_with("code_a"));
            serde_json::to_value(parse_rows(
                &text,
                &mut errors,
                progress,
                header,
                interaction_row,
            ))?
        }
        MasterKind::Hot => {
            // MEDIS ships the file with a header line of column names.
            let header = text.lines().next().is_some_and(|l| {
                l.trim_start_matches(['"', '\u{feff}'])
                    .starts_with("基準番号")
            });
            serde_json::to_value(parse_rows(&text, &mut errors, progress, header, hot_row))?
        }
        MasterKind::Jlac10 => {
            if text.trim_start().starts_with('{') {
                serde_json::to_value(parse_jlac10_codesystem(&text)?)?
            } else {
                serde_json::to_value(parse_jlac10_csv(&text, &mut errors, progress)?)?
            }
        }
    };
    let imported = json.as_array().map(Vec::len).unwrap_or(0);
    if imported == 0 {
        anyhow::bail!(
            "{}: no valid rows for a {:?} master ({} bad lines)",
            file.display(),
            kind,
            errors.len()
        );
    }
    let dir = store_dir(data_dir);
    std::fs::create_dir_all(&dir)?;
    // merge JLAC10 sets (core and infection come as two files)
    let json = if kind == MasterKind::Jlac10 && dir.join(kind.file_name()).is_file() {
        let old: Vec<LabCode> =
            serde_json::from_slice(&std::fs::read(dir.join(kind.file_name()))?).unwrap_or_default();
        let new: Vec<LabCode> = serde_json::from_value(json)?;
        let sets: Vec<&str> = new.iter().map(|l| l.codeset.as_str()).collect();
        let mut merged: Vec<LabCode> = old
            .into_iter()
            .filter(|l| !sets.contains(&l.codeset.as_str()))
            .collect();
        merged.extend(new);
        serde_json::to_value(merged)?
    } else {
        json
    };
    let tmp = dir.join(format!("{}.tmp", kind.file_name()));
    std::fs::write(&tmp, serde_json::to_vec(&json)?)?;
    std::fs::rename(&tmp, dir.join(kind.file_name()))?;
    Ok(ImportReport {
        kind,
        encoding,
        imported,
        errors,
    })
}

fn parse_rows<T>(
    text: &str,
    errors: &mut Vec<LineError>,
    progress: &dyn Fn(usize, usize),
    header: bool,
    row: fn(&[String]) -> Result<T, String>,
) -> Vec<T> {
    let lines: Vec<&str> = text.lines().collect();
    let total = lines.len();
    let mut out = Vec::with_capacity(total);
    for (i, l) in lines.iter().enumerate() {
        if i % 1000 == 0 {
            progress(i, total);
        }
        if (header && i == 0) || l.trim().is_empty() || l.starts_with('#') {
            continue;
        }
        match split(l).and_then(|f| row(&f)) {
            Ok(r) => out.push(r),
            Err(message) => errors.push(LineError {
                line: i + 1,
                message,
            }),
        }
    }
    progress(total, total);
    out
}

fn cols(f: &[String], allowed: &[usize]) -> Result<(), String> {
    if allowed.contains(&f.len()) {
        Ok(())
    } else {
        Err(format!(
            "expected {} columns, found {}",
            allowed
                .iter()
                .map(usize::to_string)
                .collect::<Vec<_>>()
                .join(" or "),
            f.len()
        ))
    }
}

fn drug_row(f: &[String]) -> Result<Drug, String> {
    cols(f, &[40, 42])?;
    if f[1] != "Y" {
        return Err(format!(
            "column 2 (マスター種別) must be 'Y' for the drug master, found '{}'",
            f[1]
        ));
    }
    if !digits(&f[2], 9) {
        return Err(format!(
            "column 3 (医薬品コード) must be 9 digits, found '{}'",
            f[2]
        ));
    }
    Ok(Drug {
        receipt_code: f[2].clone(),
        name: f[4].clone(),
        kana: f[6].clone(),
        unit: f[9].clone(),
        price: f[11].clone(),
        yj_code: f[31].clone(),
        general_code: f[36].clone(),
        general_name: f[37].clone(),
        generic: f[16] == "1",
        dosage_form: f[27].clone(),
    })
}

fn hot_row(f: &[String]) -> Result<HotCode, String> {
    cols(f, &[24])?;
    let base = f[0].trim();
    if !(digits(base, 9) || digits(base, 13)) {
        return Err(format!(
            "column 1 (基準番号（ＨＯＴコード）) must be 9 or 13 digits, found '{base}'"
        ));
    }
    let yj = f[7].trim();
    if crate::yj::ingredient(yj).is_none() {
        return Err(format!(
            "column 8 (個別医薬品コード) must be a 12-character YJ code, found '{yj}'"
        ));
    }
    let receipt = f[8].trim();
    if !(receipt.is_empty() || digits(receipt, 9)) {
        return Err(format!(
            "column 9 (レセプト電算処理システムコード（１）) must be 9 digits or empty, found '{receipt}'"
        ));
    }
    Ok(HotCode {
        hot9: base[..9].to_string(),
        yj_code: yj.to_string(),
        receipt_code: receipt.to_string(),
        name: f[11].trim().to_string(),
    })
}

fn interaction_row(f: &[String]) -> Result<Interaction, String> {
    cols(f, &[3])?;
    for (i, c) in f[..2].iter().enumerate() {
        if interaction_ingredient(c.trim()).is_none() {
            return Err(format!(
                "column {} must be a YJ code, 一般名コード or 7-digit ingredient, found '{c}'",
                i + 1
            ));
        }
    }
    if f[2].trim().is_empty() {
        return Err("column 3 (reason) must not be empty".into());
    }
    Ok(Interaction {
        code_a: f[0].trim().to_string(),
        code_b: f[1].trim().to_string(),
        reason: f[2].trim().to_string(),
    })
}

fn disease_row(f: &[String]) -> Result<Disease, String> {
    cols(f, &[46])?;
    if f[1] != "B" {
        return Err(format!(
            "column 2 (マスター種別) must be 'B' for the disease master, found '{}'",
            f[1]
        ));
    }
    if !digits(&f[2], 7) {
        return Err(format!(
            "column 3 (傷病名コード) must be 7 digits, found '{}'",
            f[2]
        ));
    }
    if !f[10].is_empty() && !digits(&f[10], 8) {
        return Err(format!(
            "column 11 (病名管理番号) must be 8 digits, found '{}'",
            f[10]
        ));
    }
    Ok(Disease {
        code: f[2].clone(),
        name: f[5].clone(),
        short_name: f[7].clone(),
        kana: f[9].clone(),
        key_number: f[10].clone(),
        exchange_code: f[12].clone(),
        icd10: f[15].clone(),
        icd10_secondary: f[16].clone(),
    })
}

fn modifier_row(f: &[String]) -> Result<Modifier, String> {
    cols(f, &[19])?;
    if f[1] != "Z" {
        return Err(format!(
            "column 2 (マスター種別) must be 'Z' for the modifier master, found '{}'",
            f[1]
        ));
    }
    if !digits(&f[2], 4) {
        return Err(format!(
            "column 3 (修飾語コード) must be 4 digits, found '{}'",
            f[2]
        ));
    }
    Ok(Modifier {
        code: f[2].clone(),
        name: f[6].clone(),
        kana: f[9].clone(),
        key_number: f[16].clone(),
        exchange_code: f[17].clone(),
        class: f[18].clone(),
    })
}

fn header_index(text: &str, names: &[&str]) -> anyhow::Result<Vec<usize>> {
    let first = text.lines().next().unwrap_or("");
    let h = split(first).map_err(|e| anyhow::anyhow!("header: {e}"))?;
    names
        .iter()
        .map(|n| {
            h.iter().position(|x| x.trim() == *n).ok_or_else(|| {
                anyhow::anyhow!("header has no column '{n}' (found: {})", h.join(","))
            })
        })
        .collect()
}

fn parse_jfagy(
    text: &str,
    errors: &mut Vec<LineError>,
    progress: &dyn Fn(usize, usize),
) -> anyhow::Result<Vec<Allergen>> {
    let ix = header_index(
        text,
        &[
            "JFAGYCODE",
            "JPTERM",
            "JPKANA",
            "ENTERM",
            "LEVEL",
            "MAINFLAG",
            "CXGCATEGORY",
        ],
    )?;
    let lines: Vec<&str> = text.lines().collect();
    let mut out = Vec::new();
    for (i, l) in lines.iter().enumerate().skip(1) {
        if i % 1000 == 0 {
            progress(i, lines.len());
        }
        if l.trim().is_empty() {
            continue;
        }
        let r = split(l).and_then(|f| {
            let g = |k: usize| {
                f.get(ix[k])
                    .cloned()
                    .ok_or_else(|| format!("missing column {}", ix[k] + 1))
            };
            let code = g(0)?;
            if code.is_empty()
                || code.len() > 12
                || !code.bytes().all(|b| b.is_ascii_alphanumeric())
            {
                return Err(format!("JFAGYCODE '{code}' is not a J-FAGY code"));
            }
            Ok(Allergen {
                code,
                term: g(1)?,
                kana: g(2)?,
                english: g(3)?,
                level: g(4)?
                    .parse()
                    .map_err(|_| "LEVEL is not a number".to_string())?,
                major: g(5)? == "1",
                deleted: g(6)? == "3",
            })
        });
        match r {
            Ok(a) => out.push(a),
            Err(message) => errors.push(LineError {
                line: i + 1,
                message,
            }),
        }
    }
    progress(lines.len(), lines.len());
    Ok(out)
}

fn parse_jlac10_csv(
    text: &str,
    errors: &mut Vec<LineError>,
    progress: &dyn Fn(usize, usize),
) -> anyhow::Result<Vec<LabCode>> {
    let ix = header_index(
        text,
        &[
            "codeset",
            "group_code",
            "jlac10_code",
            "display",
            "display_ja",
            "specimen",
            "method",
        ],
    )?;
    let lines: Vec<&str> = text.lines().collect();
    let mut out = Vec::new();
    for (i, l) in lines.iter().enumerate().skip(1) {
        if l.trim().is_empty() {
            continue;
        }
        if i % 100 == 0 {
            progress(i, lines.len());
        }
        let r = split(l).and_then(|f| {
            let g = |k: usize| {
                f.get(ix[k])
                    .cloned()
                    .ok_or_else(|| format!("missing column {}", ix[k] + 1))
            };
            let code = g(2)?;
            if code.len() != 17 || !code.bytes().all(|b| b.is_ascii_alphanumeric()) {
                return Err(format!("'{code}' is not a 17-character JLAC10 code"));
            }
            Ok(LabCode {
                code,
                codeset: g(0)?,
                group: g(1)?,
                display: g(3)?,
                item_name: g(4)?,
                specimen: g(5)?,
                method: g(6)?,
            })
        });
        match r {
            Ok(a) => out.push(a),
            Err(message) => errors.push(LineError {
                line: i + 1,
                message,
            }),
        }
    }
    Ok(out)
}

fn parse_jlac10_codesystem(text: &str) -> anyhow::Result<Vec<LabCode>> {
    let cs: Value = serde_json::from_str(text)?;
    let url = cs.get("url").and_then(Value::as_str).unwrap_or("");
    let codeset = if url.contains("CoreLabo") {
        "corelabo"
    } else if url.contains("InfectionLabo") {
        "infectionlabo"
    } else {
        anyhow::bail!("CodeSystem {url} is not a JP-CLINS JLAC10 lab item set");
    };
    let mut out = Vec::new();
    for g in cs
        .get("concept")
        .and_then(Value::as_array)
        .map(Vec::as_slice)
        .unwrap_or(&[])
    {
        let group = g
            .get("code")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string();
        for c in g
            .get("concept")
            .and_then(Value::as_array)
            .map(Vec::as_slice)
            .unwrap_or(&[])
        {
            let s = |k: &str| c.get(k).and_then(Value::as_str).unwrap_or("").to_string();
            let prop = |k: &str| {
                c.get("property")
                    .and_then(Value::as_array)
                    .and_then(|a| {
                        a.iter()
                            .find(|p| p.get("code").and_then(Value::as_str) == Some(k))
                    })
                    .and_then(|p| p.get("valueString").or_else(|| p.get("valueCode")))
                    .and_then(Value::as_str)
                    .unwrap_or("")
                    .to_string()
            };
            let ja = c
                .get("designation")
                .and_then(Value::as_array)
                .and_then(|a| {
                    a.iter()
                        .find(|d| d.get("language").and_then(Value::as_str) == Some("ja"))
                })
                .and_then(|d| d.get("value"))
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_string();
            out.push(LabCode {
                code: s("code"),
                codeset: codeset.into(),
                group: group.clone(),
                display: s("display"),
                item_name: ja,
                specimen: prop("specimen"),
                method: prop("method"),
            });
        }
    }
    Ok(out)
}
