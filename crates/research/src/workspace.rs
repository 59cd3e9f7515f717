//! The Visiting analysis environment (Visiting解析環境): one workspace per approved
//! project, holding exactly the approved extract, and aggregate-only queries.
//!
//! On approval the approved tables, columns and period are copied from the
//! dataset into the project's workspace directory (DataFusion reads the dataset,
//! the copy is Parquet). A query context registers only the workspace's files, so
//! nothing outside the approval can be named.
//!
//! An analyst's SQL defines a cohort (any single read-only SELECT: DDL, DML, COPY
//! and statements are refused by [`SQLOptions`]); it never leaves the platform.
//! The platform itself wraps it in the aggregation the analyst asks for (group-by
//! columns and measures) with the DataFrame API — no string splicing — and counts
//! persons (distinct `pid`) per cell when the cohort has a `pid`, rows otherwise.
//! The aggregate then goes through [`crate::sdc`].

use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow::array::{Array, ArrayRef, Float64Array, Int64Array, RecordBatch};
use arrow::compute::cast;
use arrow::datatypes::DataType;
use arrow::util::display::{ArrayFormatter, FormatOptions};
use chrono::NaiveDate;
use datafusion::execution::context::SQLOptions;
use datafusion::functions_aggregate::expr_fn::{avg, count, count_distinct, stddev, sum};
use datafusion::prelude::{Expr, ParquetReadOptions, SessionContext, ident, lit};
use futures_util::StreamExt;
use parquet::arrow::ArrowWriter;
use parquet::basic::Compression;
use parquet::file::properties::WriterProperties;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::sdc;

/// What an approval grants: per table, the columns; and the period.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Scope {
    pub dataset: String,
    pub tables: BTreeMap<String, Vec<String>>,
    #[serde(default)]
    pub period: Option<Period>,
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Period {
    pub from: NaiveDate,
    pub to: NaiveDate,
}

/// An aggregate request: the cohort SQL, group-by columns and measures.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct QuerySpec {
    pub sql: String,
    #[serde(default, rename = "groupBy")]
    pub group_by: Vec<String>,
    #[serde(default)]
    pub measures: Vec<Measure>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Measure {
    /// `avg`, `sum` or `stddev` (no min/max/median: they are one person's value).
    #[serde(rename = "fn")]
    pub func: String,
    pub column: String,
}

fn safe_ident(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
}

/// Error for the caller (400) naming the field at fault, or an internal failure.
#[derive(Debug)]
pub enum WsError {
    Invalid(String, String),
    Internal(String),
}

impl<E: std::fmt::Display> From<E> for WsError {
    fn from(e: E) -> Self {
        WsError::Internal(e.to_string())
    }
}

fn invalid(field: &str, msg: impl Into<String>) -> WsError {
    WsError::Invalid(field.to_string(), msg.into())
}

/// Checks a scope against the dataset manifest: tables and columns exist.
pub fn check_scope(scope: &Scope, manifest: &Value) -> Result<(), WsError> {
    if scope.tables.is_empty() {
        return Err(invalid("scope.tables", "name at least one table"));
    }
    for (t, cols) in &scope.tables {
        let def = manifest["tables"]
            .as_array()
            .and_then(|ts| ts.iter().find(|x| x["name"] == t.as_str()))
            .ok_or_else(|| invalid(&format!("scope.tables.{t}"), "no such table in the dataset"))?;
        if cols.is_empty() {
            return Err(invalid(
                &format!("scope.tables.{t}"),
                "name at least one column",
            ));
        }
        for c in cols {
            let known = def["columns"]
                .as_array()
                .is_some_and(|cs| cs.iter().any(|x| x["name"] == c.as_str()));
            if !known || !safe_ident(c) {
                return Err(invalid(
                    &format!("scope.tables.{t}"),
                    format!("no column '{c}'"),
                ));
            }
        }
    }
    if let Some(p) = scope.period
        && p.from > p.to
    {
        return Err(invalid("scope.period", "from is after to"));
    }
    Ok(())
}

fn writer(path: &Path, schema: arrow::datatypes::SchemaRef) -> Result<ArrowWriter<File>, WsError> {
    let props = WriterProperties::builder()
        .set_compression(Compression::SNAPPY)
        .build();
    Ok(ArrowWriter::try_new(
        File::create(path)?,
        schema,
        Some(props),
    )?)
}

/// Copies exactly the approved tables, columns and period into `ws_dir`.
/// Returns the row count per table.
pub async fn materialise(
    dataset_dir: &Path,
    manifest: &Value,
    scope: &Scope,
    ws_dir: &Path,
) -> Result<BTreeMap<String, u64>, WsError> {
    check_scope(scope, manifest)?;
    let tmp = ws_dir.with_extension("partial");
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp)?;
    }
    std::fs::create_dir_all(&tmp)?;
    let ctx = SessionContext::new();
    let mut rows = BTreeMap::new();
    for (t, cols) in &scope.tables {
        let src = dataset_dir.join(format!("{t}.parquet"));
        ctx.register_parquet(
            format!("src_{t}"),
            src.to_string_lossy().as_ref(),
            ParquetReadOptions::default(),
        )
        .await?;
        let def = manifest["tables"]
            .as_array()
            .and_then(|ts| ts.iter().find(|x| x["name"] == t.as_str()))
            .cloned()
            .unwrap_or_default();
        // Identifiers and dates were validated above, so the SQL is built from
        // known column names and ISO dates only.
        let select = cols
            .iter()
            .map(|c| format!("\"{c}\""))
            .collect::<Vec<_>>()
            .join(", ");
        let filter = match (scope.period, def["periodColumn"].as_str()) {
            (Some(p), Some(pc)) => format!(
                " WHERE \"{pc}\" >= DATE '{}' AND \"{pc}\" <= DATE '{}'",
                p.from, p.to
            ),
            _ => String::new(),
        };
        let df = ctx
            .sql(&format!("SELECT {select} FROM \"src_{t}\"{filter}"))
            .await?;
        let schema = Arc::new(df.schema().as_arrow().clone());
        let mut w = writer(&tmp.join(format!("{t}.parquet")), schema)?;
        let mut stream = df.execute_stream().await?;
        let mut n = 0u64;
        while let Some(b) = stream.next().await {
            let b = b?;
            n += b.num_rows() as u64;
            w.write(&b)?;
        }
        w.close()?;
        rows.insert(t.clone(), n);
    }
    if ws_dir.exists() {
        std::fs::remove_dir_all(ws_dir)?;
    }
    std::fs::rename(&tmp, ws_dir)?;
    Ok(rows)
}

/// A session over one workspace: only its files are registered.
pub async fn session(ws_dir: &Path) -> Result<SessionContext, WsError> {
    let ctx = SessionContext::new();
    for e in std::fs::read_dir(ws_dir)? {
        let p = e?.path();
        if p.extension().and_then(|x| x.to_str()) == Some("parquet")
            && let Some(name) = p.file_stem().and_then(|s| s.to_str())
        {
            ctx.register_parquet(
                name,
                p.to_string_lossy().as_ref(),
                ParquetReadOptions::default(),
            )
            .await?;
        }
    }
    Ok(ctx)
}

/// The aggregate of a query before disclosure control, plus what counted.
pub struct Aggregate {
    pub dims: Vec<String>,
    pub measures: Vec<String>,
    pub cells: Vec<sdc::Cell>,
    /// `persons` (distinct pid) or `rows`.
    pub unit: &'static str,
}

/// Runs the cohort SQL and the platform's aggregation. No row-level result
/// leaves this function.
pub async fn aggregate(ctx: &SessionContext, q: &QuerySpec) -> Result<Aggregate, WsError> {
    if q.group_by.len() > sdc::MAX_DIMS {
        return Err(invalid(
            "groupBy",
            format!("at most {} columns", sdc::MAX_DIMS),
        ));
    }
    let opts = SQLOptions::new()
        .with_allow_ddl(false)
        .with_allow_dml(false)
        .with_allow_statements(false);
    let df = ctx
        .sql_with_options(&q.sql, opts)
        .await
        .map_err(|e| invalid("sql", e.to_string()))?;
    let schema = df.schema().clone();
    let has = |c: &str| schema.fields().iter().any(|f| f.name() == c);
    for (i, g) in q.group_by.iter().enumerate() {
        if !has(g) {
            return Err(invalid(
                &format!("groupBy[{i}]"),
                format!("the cohort has no column '{g}'"),
            ));
        }
    }
    let mut aggs: Vec<Expr> = Vec::new();
    let unit = if has("pid") {
        aggs.push(count_distinct(ident("pid")).alias("__n"));
        "persons"
    } else {
        aggs.push(count(lit(1)).alias("__n"));
        "rows"
    };
    let mut names = Vec::new();
    for (i, m) in q.measures.iter().enumerate() {
        let field = schema
            .fields()
            .iter()
            .find(|f| f.name() == &m.column)
            .ok_or_else(|| {
                invalid(
                    &format!("measures[{i}].column"),
                    format!("the cohort has no column '{}'", m.column),
                )
            })?;
        if !field.data_type().is_numeric() {
            return Err(invalid(
                &format!("measures[{i}].column"),
                "measures need a numeric column",
            ));
        }
        let c = ident(m.column.clone());
        let e = match m.func.as_str() {
            "avg" => avg(c),
            "sum" => sum(c),
            "stddev" => stddev(c),
            _ => {
                return Err(invalid(
                    &format!("measures[{i}].fn"),
                    "one of avg, sum, stddev (min, max and median would publish one person's value)",
                ));
            }
        };
        let name = format!("{}_{}", m.func, m.column);
        aggs.push(e.alias(format!("__m{i}")));
        names.push(name);
    }
    let groups: Vec<Expr> = q.group_by.iter().map(|g| ident(g.clone())).collect();
    let batches = df.aggregate(groups, aggs)?.collect().await?;
    let mut cells = Vec::new();
    let fmt = FormatOptions::default().with_null("(null)");
    for b in &batches {
        cells.extend(batch_cells(b, q.group_by.len(), names.len(), &fmt)?);
    }
    Ok(Aggregate {
        dims: q.group_by.clone(),
        measures: names,
        cells,
        unit,
    })
}

fn batch_cells(
    b: &RecordBatch,
    dims: usize,
    measures: usize,
    fmt: &FormatOptions,
) -> Result<Vec<sdc::Cell>, WsError> {
    let formatters = (0..dims)
        .map(|i| ArrayFormatter::try_new(b.column(i).as_ref(), fmt))
        .collect::<Result<Vec<_>, _>>()?;
    let n: ArrayRef = cast(b.column(dims), &DataType::Int64)?;
    let n = n
        .as_any()
        .downcast_ref::<Int64Array>()
        .ok_or_else(|| WsError::Internal("count is not an integer".into()))?
        .clone();
    let ms: Vec<Float64Array> = (0..measures)
        .map(|i| -> Result<Float64Array, WsError> {
            let a = cast(b.column(dims + 1 + i), &DataType::Float64)?;
            Ok(a.as_any()
                .downcast_ref::<Float64Array>()
                .ok_or_else(|| WsError::Internal("measure is not numeric".into()))?
                .clone())
        })
        .collect::<Result<_, _>>()?;
    Ok((0..b.num_rows())
        .map(|r| sdc::Cell {
            key: formatters.iter().map(|f| f.value(r).to_string()).collect(),
            count: n.value(r).max(0) as u64,
            measures: ms
                .iter()
                .map(|m| (!m.is_null(r)).then(|| m.value(r)))
                .collect(),
        })
        .collect())
}

/// Paths of a project's workspace under the research data directory.
pub fn dir(research_dir: &Path, project: &str) -> PathBuf {
    research_dir.join("workspaces").join(project)
}
