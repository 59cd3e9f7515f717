//! Opening a project's workspace, and the anonymised form of it.
//!
//! A pseudonymised approval gets the approved extract as it is. An anonymised
//! approval gets it transformed ([`crate::anon`]) before anyone can query it:
//! - `pid` replaced by a workspace-only id (keyed with a secret drawn for this
//!   workspace and then discarded, so it links to no dataset pseudonym);
//! - `patient.birth_date` truncated to year/month (`birth_ym`, e.g. `2003/7`);
//! - every other date shifted per person by a secret offset within ±30 days;
//! - k-anonymity over (sex, birth_ym) measured; below the configured k the
//!   workspace is refused (and the approval with it).

use std::collections::BTreeMap;
use std::fs::File;
use std::path::Path;
use std::sync::Arc;

use arrow::array::{Array, ArrayRef, Date32Array, RecordBatch, StringArray};
use arrow::datatypes::{DataType, Field, Schema};
use chrono::Datelike;
use parquet::arrow::ArrowWriter;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use rand::RngCore;
use serde_json::Value;
use tsunagi_fhir::FhirError;

use crate::anon::{self, Val};
use crate::service::{Application, Form, Research};
use crate::workspace;

/// Days a date may move in an anonymised workspace.
pub const SHIFT_DAYS: i64 = 30;

pub async fn open_workspace(
    r: &Research,
    app: &Application,
    manifest: &Value,
) -> Result<BTreeMap<String, u64>, FhirError> {
    let ws = workspace::dir(&r.dir, &app.id);
    let rows = workspace::materialise(
        &r.dataset_dir(&app.scope.dataset),
        manifest,
        &app.scope,
        &ws,
    )
    .await
    .map_err(|e| match e {
        workspace::WsError::Invalid(f, m) => FhirError::bad_request(Some(&f), m),
        workspace::WsError::Internal(m) => FhirError::internal(m),
    })?;
    if app.form == Form::Anonymised {
        let k = r.config.k_anonymity;
        let ws2 = ws.clone();
        let res = tokio::task::spawn_blocking(move || anonymise_dir(&ws2, k))
            .await
            .map_err(|e| FhirError::internal(e.to_string()))?;
        if let Err(e) = res {
            let _ = std::fs::remove_dir_all(&ws);
            return Err(e);
        }
    }
    Ok(rows)
}

fn internal<E: std::fmt::Display>(e: E) -> FhirError {
    FhirError::internal(e.to_string())
}

/// Rewrites every table of the workspace in anonymised form and checks k.
pub fn anonymise_dir(ws: &Path, k: usize) -> Result<(), FhirError> {
    let mut secret = [0u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut secret);
    let secret: String = secret.iter().map(|b| format!("{b:02x}")).collect();
    for e in std::fs::read_dir(ws).map_err(internal)? {
        let path = e.map_err(internal)?.path();
        if path.extension().and_then(|x| x.to_str()) != Some("parquet") {
            continue;
        }
        let table = path
            .file_stem()
            .and_then(|s| s.to_str())
            .unwrap_or("")
            .to_string();
        let reader = ParquetRecordBatchReaderBuilder::try_new(File::open(&path).map_err(internal)?)
            .map_err(internal)?
            .build()
            .map_err(internal)?;
        let mut out = Vec::new();
        for b in reader {
            out.push(anonymise_batch(&b.map_err(internal)?, &table, &secret)?);
        }
        if table == "patient"
            && let Some(first) = out.first()
        {
            let schema = first.schema();
            if schema.index_of("sex").is_ok() && schema.index_of("birth_ym").is_ok() {
                check_k(&out, k)?;
            }
        }
        let tmp = path.with_extension("anon");
        {
            let schema = match out.first() {
                Some(b) => b.schema(),
                None => continue,
            };
            let mut w = ArrowWriter::try_new(File::create(&tmp).map_err(internal)?, schema, None)
                .map_err(internal)?;
            for b in &out {
                w.write(b).map_err(internal)?;
            }
            w.close().map_err(internal)?;
        }
        std::fs::rename(&tmp, &path).map_err(internal)?;
    }
    Ok(())
}

fn check_k(batches: &[RecordBatch], k: usize) -> Result<(), FhirError> {
    let mut t = anon::Table {
        columns: vec!["sex".into(), "birth_ym".into()],
        rows: vec![],
    };
    for b in batches {
        let col = |n: &str| -> Vec<Val> {
            let s = utf8(b.column(b.schema().index_of(n).unwrap_or(0)));
            (0..b.num_rows())
                .map(|i| match &s {
                    Some(s) if !s.is_null(i) => Val::Text(s.value(i).to_string()),
                    _ => Val::Null,
                })
                .collect()
        };
        let (sex, ym) = (col("sex"), col("birth_ym"));
        t.rows
            .extend(sex.into_iter().zip(ym).map(|(a, b)| vec![a, b]));
    }
    let rep = anon::measure_k(&t, &t.columns.clone(), k).map_err(internal)?;
    if rep.k < k {
        return Err(FhirError::conflict(format!(
            "the anonymised extract has k-anonymity {} over (sex, birth_ym), below the required {k}; narrow or coarsen the request",
            rep.k
        )));
    }
    Ok(())
}

/// A string column as plain UTF-8, whatever string layout the engine wrote
/// (DataFusion materialises `Utf8View`); None for a non-string column.
fn utf8(a: &ArrayRef) -> Option<StringArray> {
    arrow::compute::cast(a, &DataType::Utf8)
        .ok()?
        .as_any()
        .downcast_ref::<StringArray>()
        .cloned()
}

fn anonymise_batch(b: &RecordBatch, table: &str, secret: &str) -> Result<RecordBatch, FhirError> {
    let schema = b.schema();
    let pid: Option<Vec<Option<String>>> = schema.index_of("pid").ok().map(|i| {
        let a = utf8(b.column(i));
        (0..b.num_rows())
            .map(|r| {
                a.as_ref()
                    .and_then(|a| (!a.is_null(r)).then(|| a.value(r).to_string()))
            })
            .collect()
    });
    let mut fields = Vec::new();
    let mut cols: Vec<ArrayRef> = Vec::new();
    for (i, f) in schema.fields().iter().enumerate() {
        let a = b.column(i);
        match (f.name().as_str(), f.data_type()) {
            ("pid", _) => {
                let ids: StringArray = match &pid {
                    Some(p) => p
                        .iter()
                        .map(|v| v.as_ref().map(|v| workspace_id(secret, v)))
                        .collect(),
                    None => StringArray::new_null(b.num_rows()),
                };
                fields.push(Field::new("pid", DataType::Utf8, f.is_nullable()));
                cols.push(Arc::new(ids));
            }
            ("birth_date", DataType::Date32) if table == "patient" => {
                let d = date_array(a)?;
                let ym: StringArray = (0..d.len())
                    .map(|r| {
                        (!d.is_null(r)).then(|| {
                            let x = d.value_as_date(r).unwrap_or_default();
                            format!("{}/{}", x.year(), x.month())
                        })
                    })
                    .collect();
                fields.push(Field::new("birth_ym", DataType::Utf8, true));
                cols.push(Arc::new(ym));
            }
            (_, DataType::Date32) => {
                let d = date_array(a)?;
                let shifted: Date32Array = (0..d.len())
                    .map(|r| {
                        if d.is_null(r) {
                            return None;
                        }
                        let off = match pid.as_ref().and_then(|p| p[r].as_ref()) {
                            Some(p) => anon::shift_days(secret, p, SHIFT_DAYS),
                            None => 0,
                        };
                        Some(d.value(r) + off as i32)
                    })
                    .collect();
                fields.push(f.as_ref().clone());
                cols.push(Arc::new(shifted));
            }
            _ => {
                fields.push(f.as_ref().clone());
                cols.push(a.clone());
            }
        }
    }
    RecordBatch::try_new(Arc::new(Schema::new(fields)), cols).map_err(internal)
}

fn date_array(a: &ArrayRef) -> Result<Date32Array, FhirError> {
    a.as_any()
        .downcast_ref::<Date32Array>()
        .cloned()
        .ok_or_else(|| FhirError::internal("date column is not Date32"))
}

fn workspace_id(secret: &str, pid: &str) -> String {
    use sha2::{Digest, Sha256};
    let h = Sha256::new()
        .chain_update(secret.as_bytes())
        .chain_update([0])
        .chain_update(pid.as_bytes())
        .finalize();
    h[..8].iter().map(|b| format!("{b:02x}")).collect()
}
