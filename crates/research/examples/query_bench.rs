//! Cohort aggregation latency and disclosure-control overhead.
//!
//! Generates (once) a workspace of N observation rows (default 100,000,000) of
//! N/10 persons plus their patient table, then runs typical cohort aggregations
//! through the product path (`workspace::aggregate`, DataFusion over Parquet) and
//! times `sdc::protect` on each result and on a large synthetic table.
//!
//! cargo run --release -p tsunagi-research --example query_bench -- [N] [DIR]

use std::fs::File;
use std::sync::Arc;
use std::time::Instant;

use arrow::array::{Date32Array, Float64Array, RecordBatch, StringArray};
use arrow::datatypes::{DataType, Field, Schema};
use parquet::arrow::ArrowWriter;
use parquet::basic::Compression;
use parquet::file::properties::WriterProperties;
use tsunagi_research::sdc;
use tsunagi_research::workspace::{self, Measure, QuerySpec};

fn props() -> WriterProperties {
    WriterProperties::builder()
        .set_compression(Compression::SNAPPY)
        .build()
}

fn generate(dir: &std::path::Path, n: usize) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir)?;
    let persons = (n / 10).max(1);
    let pid = |p: usize| {
        format!(
            "{:032x}",
            (p as u128).wrapping_mul(0x9E3779B97F4A7C15F39CC0605CEDC835)
        )
    };
    let schema = Arc::new(Schema::new(vec![
        Field::new("pid", DataType::Utf8, false),
        Field::new("sex", DataType::Utf8, true),
        Field::new("birth_date", DataType::Date32, true),
    ]));
    let mut w = ArrowWriter::try_new(
        File::create(dir.join("patient.parquet"))?,
        schema.clone(),
        Some(props()),
    )?;
    for start in (0..persons).step_by(1 << 16) {
        let end = (start + (1 << 16)).min(persons);
        w.write(&RecordBatch::try_new(
            schema.clone(),
            vec![
                Arc::new(StringArray::from_iter_values((start..end).map(pid))),
                Arc::new(StringArray::from_iter_values((start..end).map(|p| {
                    if p.is_multiple_of(2) {
                        "female"
                    } else {
                        "male"
                    }
                }))),
                Arc::new(Date32Array::from_iter_values(
                    (start..end).map(|p| -7000 + (p % 25000) as i32),
                )),
            ],
        )?)?;
    }
    w.close()?;
    let schema = Arc::new(Schema::new(vec![
        Field::new("pid", DataType::Utf8, false),
        Field::new("code", DataType::Utf8, true),
        Field::new("effective_date", DataType::Date32, true),
        Field::new("value_num", DataType::Float64, true),
    ]));
    let codes = [
        "29463-7", "8480-6", "2345-7", "4548-4", "3094-0", "2160-0", "1742-6", "2093-3",
    ];
    let mut w = ArrowWriter::try_new(
        File::create(dir.join("observation.parquet"))?,
        schema.clone(),
        Some(props()),
    )?;
    let t = Instant::now();
    for start in (0..n).step_by(1 << 16) {
        let end = (start + (1 << 16)).min(n);
        w.write(&RecordBatch::try_new(
            schema.clone(),
            vec![
                Arc::new(StringArray::from_iter_values(
                    (start..end).map(|i| pid((i * 7919) % persons)),
                )),
                Arc::new(StringArray::from_iter_values(
                    (start..end).map(|i| codes[i % codes.len()]),
                )),
                Arc::new(Date32Array::from_iter_values(
                    (start..end).map(|i| 20454 + (i % 365) as i32),
                )),
                Arc::new(Float64Array::from_iter_values(
                    (start..end).map(|i| (i % 2000) as f64 / 10.0),
                )),
            ],
        )?)?;
        if start % (10 << 20) < (1 << 16) {
            eprintln!("generated {end} rows, {:.0} s", t.elapsed().as_secs_f64());
        }
    }
    w.close()?;
    Ok(())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let n: usize = args
        .get(1)
        .map(|s| s.parse())
        .transpose()?
        .unwrap_or(100_000_000);
    let dir = args
        .get(2)
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| std::env::temp_dir().join(format!("tsunagi-query-bench-{n}")));
    if !dir.join("observation.parquet").exists() {
        let t = Instant::now();
        generate(&dir, n)?;
        println!("generate rows={n} s={:.1}", t.elapsed().as_secs_f64());
    }
    let ctx = workspace::session(&dir)
        .await
        .map_err(|e| anyhow::anyhow!("{e:?}"))?;
    let queries = [
        ("rows by code (unit rows)", QuerySpec {
            sql: "SELECT code, value_num FROM observation".into(),
            group_by: vec!["code".into()],
            measures: vec![Measure { func: "avg".into(), column: "value_num".into() }],
        }),
        ("persons by code, one quarter", QuerySpec {
            sql: "SELECT pid, code, value_num FROM observation WHERE effective_date >= DATE '2026-01-01' AND effective_date < DATE '2026-04-01'".into(),
            group_by: vec!["code".into()],
            measures: vec![Measure { func: "avg".into(), column: "value_num".into() }],
        }),
        ("persons by sex x code x month, join patient, HbA1c>=6.5 cohort", QuerySpec {
            sql: "SELECT o.pid, p.sex, o.code, date_part('month', o.effective_date) AS month, o.value_num FROM observation o JOIN patient p ON o.pid = p.pid WHERE o.code IN ('4548-4', '2345-7')".into(),
            group_by: vec!["sex".into(), "code".into(), "month".into()],
            measures: vec![Measure { func: "avg".into(), column: "value_num".into() }],
        }),
    ];
    for (name, q) in &queries {
        let t = Instant::now();
        let agg = workspace::aggregate(&ctx, q)
            .await
            .map_err(|e| anyhow::anyhow!("{e:?}"))?;
        let q_s = t.elapsed().as_secs_f64();
        let cells = agg.cells.len();
        let t = Instant::now();
        let p =
            sdc::protect(&agg.dims, &agg.measures, agg.cells, 10).map_err(anyhow::Error::msg)?;
        let sdc_ms = t.elapsed().as_secs_f64() * 1000.0;
        println!(
            "query=\"{name}\" rows={n} unit={} cells={cells} query_s={q_s:.2} sdc_ms={sdc_ms:.3} published_rows={} suppressed={}+{}",
            agg.unit,
            p.rows.len(),
            p.primary,
            p.secondary
        );
    }
    // Disclosure control on a large table: 3 dimensions 50 x 20 x 10, counts 0..40.
    let mut cells = Vec::new();
    let mut s = 1u64;
    for a in 0..50 {
        for b in 0..20 {
            for c in 0..10 {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                cells.push(sdc::Cell {
                    key: vec![a.to_string(), b.to_string(), c.to_string()],
                    count: (s >> 33) % 40,
                    measures: vec![Some(1.0)],
                });
            }
        }
    }
    let dims: Vec<String> = ["a", "b", "c"].map(String::from).to_vec();
    let t = Instant::now();
    let p = sdc::protect(&dims, &["m".into()], cells, 10).map_err(anyhow::Error::msg)?;
    println!(
        "sdc_table cells=10000 dims=3 published_rows={} primary={} secondary={} sdc_ms={:.1}",
        p.rows.len(),
        p.primary,
        p.secondary,
        t.elapsed().as_secs_f64() * 1000.0
    );
    Ok(())
}
