//! Extraction throughput: N Observations (default 10,000,000) of N/10 persons
//! pushed through the extraction pipeline (opt-out filter, keyed pseudonym,
//! safe-field projection, Parquet/Snappy writing). The resources are generated in
//! memory, so the figure excludes reading the primary store.
//!
//! cargo run --release -p tsunagi-research-primary --example extract_bench -- [N] [DIR]

use std::time::Instant;

use serde_json::json;
use tsunagi_research_primary::extract::{ExtractConfig, Extractor};
use tsunagi_research_primary::{LinkageKey, OptOutSnapshot};

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let n: usize = args
        .get(1)
        .map(|s| s.parse())
        .transpose()?
        .unwrap_or(10_000_000);
    let dir = args
        .get(2)
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| std::env::temp_dir().join("tsunagi-extract-bench"));
    let _ = std::fs::remove_dir_all(&dir);
    let persons = (n / 10).max(1);
    let key = LinkageKey::from_bytes([42; 32]);
    let mut optout = OptOutSnapshot::empty();
    // 1% of persons opted out.
    for p in (0..persons).step_by(100) {
        optout.persons.insert(format!("pt-{p}"));
    }
    let cfg = ExtractConfig {
        dataset: "bench".into(),
        research_dir: dir.clone(),
    };
    let mut ex = Extractor::new(&cfg, &key, optout)?;
    let codes = [
        ("29463-7", "kg"),
        ("8480-6", "mm[Hg]"),
        ("2345-7", "mg/dL"),
        ("4548-4", "%"),
    ];
    let started = Instant::now();
    let mut gen_secs = 0.0;
    for i in 0..n {
        let g = Instant::now();
        let (code, unit) = codes[i % codes.len()];
        let person = format!("pt-{}", i % persons);
        let r = json!({
            "resourceType": "Observation", "id": format!("obs-{i}"), "status": "final",
            "category": [{"coding": [{"code": "laboratory"}]}],
            "code": {"coding": [{"system": "http://loinc.org", "code": code, "display": code}]},
            "subject": {"reference": format!("Patient/{person}")},
            "effectiveDateTime": format!("2026-{:02}-{:02}T09:00:00+09:00", 1 + i % 12, 1 + i % 28),
            "valueQuantity": {"value": (i % 1000) as f64 / 10.0, "unit": unit},
            "note": [{"text": "free text is never extracted"}]
        });
        gen_secs += g.elapsed().as_secs_f64();
        ex.push("Observation", &person, &r)?;
        if i > 0 && i % 1_000_000 == 0 {
            eprintln!("{i} rows, {:.0} s", started.elapsed().as_secs_f64());
        }
    }
    let rep = ex.finish("benchmark")?;
    let total = started.elapsed().as_secs_f64();
    let obs = rep
        .tables
        .iter()
        .find(|t| t.name == "observation")
        .expect("table");
    let size = std::fs::metadata(dir.join("datasets/bench/observation.parquet"))?.len();
    println!(
        "observations={n} persons={persons} written={} skipped_opted_out={} total_s={total:.1} generate_json_s={gen_secs:.1} pipeline_s={:.1} rows_per_s_pipeline={:.0} rows_per_s_incl_generation={:.0} parquet_mib={:.1}",
        obs.rows,
        obs.opted_out_skipped,
        total - gen_secs,
        n as f64 / (total - gen_secs),
        n as f64 / total,
        size as f64 / 1048576.0
    );
    Ok(())
}
