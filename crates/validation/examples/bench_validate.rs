//! Validation benchmark (not a test): package load time, throughput and peak memory.
//!
//! cargo run --release -p tsunagi-validation --example bench_validate -- \
//!     --packages ../shared/fhir-packages/current --masters DATA_DIR \
//!     --ndjson /tmp/tsunagi-bench-clins.ndjson --examples ../shared/fixtures/jp-examples --loops 20
//!
//! Single-threaded on purpose (the target is per core).

use std::path::PathBuf;
use std::time::Instant;

use serde_json::Value;
use tsunagi_validation::Validator;

fn peak_rss_mb() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
        })
        .map(|kb| kb / 1024.0)
        .unwrap_or(f64::NAN)
}

/// CPU seconds used by this process so far (user + system), from /proc; the
/// machine is shared, so throughput is also reported per CPU-second.
fn cpu_seconds() -> f64 {
    std::fs::read_to_string("/proc/self/stat")
        .ok()
        .and_then(|s| {
            let rest = s.rsplit_once(')')?.1;
            let f: Vec<&str> = rest.split_whitespace().collect();
            let ut: f64 = f.get(11)?.parse().ok()?;
            let st: f64 = f.get(12)?.parse().ok()?;
            Some((ut + st) / 100.0)
        })
        .unwrap_or(f64::NAN)
}

fn files(dir: &std::path::Path, out: &mut Vec<PathBuf>) {
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            let p = e.path();
            if p.is_dir() {
                files(&p, out);
            } else if p.extension().is_some_and(|x| x == "json") {
                out.push(p);
            }
        }
    }
}

fn main() -> anyhow::Result<()> {
    let mut packages = Vec::new();
    let (mut masters, mut ndjson, mut examples, mut loops) = (None, None, None, 10usize);
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--packages" => packages.push(PathBuf::from(args.next().unwrap_or_default())),
            "--masters" => masters = args.next().map(PathBuf::from),
            "--ndjson" => ndjson = args.next().map(PathBuf::from),
            "--examples" => examples = args.next().map(PathBuf::from),
            "--loops" => loops = args.next().and_then(|s| s.parse().ok()).unwrap_or(10),
            other => anyhow::bail!("unknown argument {other}"),
        }
    }
    let (t, c0) = (Instant::now(), cpu_seconds());
    let term = match &masters {
        Some(d) => Some(tsunagi_terminology::Terminology::open(d)?),
        None => None,
    };
    if masters.is_some() {
        println!(
            "masters load: {:.2} s, peak RSS {:.0} MB",
            t.elapsed().as_secs_f64(),
            peak_rss_mb()
        );
    }
    let v = Validator::from_paths(&packages, term)?;
    println!(
        "masters + package load: {:.2} s wall, {:.2} s CPU ({} packages), peak RSS {:.0} MB",
        t.elapsed().as_secs_f64(),
        cpu_seconds() - c0,
        v.packages().len(),
        peak_rss_mb()
    );

    if let Some(dir) = examples {
        let mut fs = Vec::new();
        files(&dir, &mut fs);
        let docs: Vec<Value> = fs
            .iter()
            .filter_map(|f| serde_json::from_slice(&std::fs::read(f).ok()?).ok())
            .collect();
        let _ = docs
            .iter()
            .map(|d| v.validate(d, None).len())
            .sum::<usize>(); // warm caches
        let (t, c0) = (Instant::now(), cpu_seconds());
        let mut n = 0usize;
        for _ in 0..loops {
            for d in &docs {
                std::hint::black_box(v.validate(d, None));
                n += 1;
            }
        }
        let s = t.elapsed().as_secs_f64();
        let c = cpu_seconds() - c0;
        println!(
            "official examples: {} files x {loops} loops = {n} validations in {s:.2} s = {:.0} /s wall, {:.0} /CPU-s, peak RSS {:.0} MB",
            docs.len(),
            n as f64 / s,
            n as f64 / c,
            peak_rss_mb()
        );
    }
    if let Some(file) = ndjson {
        use std::io::BufRead;
        let reader = std::io::BufReader::new(std::fs::File::open(&file)?);
        let (t, c0) = (Instant::now(), cpu_seconds());
        let (mut n, mut errs, mut nobs) = (0usize, 0usize, 0usize);
        let mut obs_time = 0.0;
        for line in reader.lines() {
            let line = line?;
            if line.trim().is_empty() {
                continue;
            }
            let t1 = Instant::now();
            let r: Value = serde_json::from_str(&line)?;
            let issues = v.validate(&r, None);
            if r.get("resourceType").and_then(Value::as_str) == Some("Observation") {
                nobs += 1;
                obs_time += t1.elapsed().as_secs_f64();
            }
            if tsunagi_validation::has_errors(&issues) {
                errs += 1;
            }
            n += 1;
        }
        let s = t.elapsed().as_secs_f64();
        let c = cpu_seconds() - c0;
        println!(
            "ndjson: {n} resources ({errs} with errors) in {s:.2} s = {:.0} resources/s wall, {:.0} /CPU-s (parse + validate); lab Observations alone {:.0} /s wall; peak RSS {:.0} MB",
            n as f64 / s,
            n as f64 / c,
            nobs as f64 / obs_time,
            peak_rss_mb()
        );
    }
    Ok(())
}
