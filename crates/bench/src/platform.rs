//! The platform-core benchmark: the real `tsunagi` binary serves a fresh
//! database; this process generates the data, drives `tsunagi import`, and is the
//! HTTP load generator (keep-alive reqwest client, C concurrent tasks).

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde_json::{Value, json};
use tsunagi_bench::synth::{
    JLAC10_SYSTEM, RESOURCES_PER_PATIENT, Rng, Synth, hospital, hospital_organization, resource_ref,
};

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

#[derive(clap::Args, Debug)]
pub struct PlatformArgs {
    /// Storage backend of the server.
    #[arg(long, value_enum, default_value = "sqlite")]
    backend: Backend,
    /// PostgreSQL URL for --backend postgres. The database named in it is DROPPED and recreated.
    #[arg(
        long,
        default_value = "postgres://postgres@127.0.0.1:5432/tsunagi_bench"
    )]
    database: String,
    /// Patients (20 resources each).
    #[arg(long, default_value_t = 2000)]
    patients: u64,
    /// Concurrent HTTP clients.
    #[arg(long, default_value_t = 8)]
    concurrency: usize,
    /// Seconds per read/search measurement.
    #[arg(long, default_value_t = 20.0)]
    duration: f64,
    /// Every N-th patient is ingested by transaction Bundle over HTTP; the rest by `tsunagi import`.
    #[arg(long, default_value_t = 10)]
    http_every: u64,
    /// Hospitals the patients are spread over (each imports and reads its own patients).
    #[arg(long, default_value_t = 4)]
    hospitals: usize,
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// The tsunagi binary (default: `tsunagi` next to this executable).
    #[arg(long)]
    tsunagi: Option<PathBuf>,
    /// Working directory for the data directory and NDJSON files (wiped first).
    #[arg(long, default_value = "/root/.cache/tsunagi-bench-run")]
    work_dir: PathBuf,
    /// Port the server listens on (127.0.0.1).
    #[arg(long, default_value_t = 18480)]
    port: u16,
    /// Also write the JSON result to this file.
    #[arg(long)]
    json_out: Option<PathBuf>,
    /// Keep the work directory (and PostgreSQL database) afterwards.
    #[arg(long)]
    keep: bool,
    /// Measure reads and searches only, on the database an earlier `--keep` run of the
    /// same backend, `--patients`, `--hospitals` and `--seed` left: no generation,
    /// import or HTTP ingest (their figures are null). For comparing server builds.
    #[arg(long, requires = "keep")]
    reuse: bool,
    /// Load generator of the read and search phases: this program's own HTTP client,
    /// or wrk (a C load generator; Debian package `wrk`), which leaves the server more
    /// of the two cores.
    #[arg(long, value_enum, default_value = "builtin")]
    client: LoadClient,
    /// Measure the read phase only, no searches (A/B runs of the read path).
    #[arg(long)]
    reads_only: bool,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum LoadClient {
    Builtin,
    Wrk,
}

impl LoadClient {
    /// The name in the JSON result, as on the command line.
    fn name(self) -> &'static str {
        match self {
            LoadClient::Builtin => "builtin",
            LoadClient::Wrk => "wrk",
        }
    }
}

/// Latency summary in milliseconds.
fn summarize(mut lat_us: Vec<u64>, errors: u64, seconds: f64) -> Value {
    lat_us.sort_unstable();
    let q = |p: f64| -> f64 {
        tsunagi_server::latency::nearest_rank(&lat_us, p).map_or(0.0, |us| us as f64 / 1000.0)
    };
    let mean = if lat_us.is_empty() {
        0.0
    } else {
        lat_us.iter().sum::<u64>() as f64 / lat_us.len() as f64 / 1000.0
    };
    json!({
        "requests": lat_us.len(),
        "errors": errors,
        "seconds": round2(seconds),
        "per_second": round2(lat_us.len() as f64 / seconds.max(1e-9)),
        "mean_ms": round2(mean),
        "p50_ms": round2(q(0.50)),
        "p90_ms": round2(q(0.90)),
        "p99_ms": round2(q(0.99)),
        "max_ms": round2(q(1.0)),
    })
}

fn round2(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}

fn read_first_line(path: &str, key: &str) -> Option<String> {
    std::fs::read_to_string(path)
        .ok()?
        .lines()
        .find(|l| l.starts_with(key))
        .and_then(|l| l.split_once(':').or_else(|| l.split_once('=')))
        .map(|(_, v)| v.trim().trim_matches('"').to_string())
}

pub fn machine() -> Value {
    json!({
        "nproc": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        "cpu": read_first_line("/proc/cpuinfo", "model name"),
        "mem_total": read_first_line("/proc/meminfo", "MemTotal"),
        "os": read_first_line("/etc/os-release", "PRETTY_NAME"),
        "kernel": std::fs::read_to_string("/proc/sys/kernel/osrelease").ok().map(|s| s.trim().to_string()),
        "date_utc": chrono::Utc::now().format("%Y-%m-%d %H:%M UTC").to_string(),
    })
}

/// (VmHWM, VmRSS) of a process in KiB.
fn proc_mem(pid: u32) -> (u64, u64) {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |k: &str| -> u64 {
        text.lines()
            .find(|l| l.starts_with(k))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    (field("VmHWM:"), field("VmRSS:"))
}

/// CPU seconds (user + system) a process has used so far.
fn proc_cpu(pid: &str) -> f64 {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let Some((_, rest)) = text.rsplit_once(')') else {
        return 0.0;
    };
    let f: Vec<&str> = rest.split_whitespace().collect();
    // after the command: state is field 3, utime 14 and stime 15 (1-based); then
    // cutime 16 and cstime 17, the CPU of waited-for children (the wrk client)
    let fields: &[usize] = if pid == "self" {
        &[11, 12, 13, 14]
    } else {
        &[11, 12]
    };
    let ticks: u64 = fields
        .iter()
        .filter_map(|i| f.get(*i).and_then(|v| v.parse::<u64>().ok()))
        .sum();
    ticks as f64 / 100.0
}

/// Adds the CPU the server and the load generator (this process, or wrk) spent in a
/// phase (robust to a shared machine: wall-clock rates fall with contention, CPU per
/// request does not).
fn add_cpu(v: &mut Value, server_pid: u32, server0: f64, client0: f64, requests: f64) {
    let server = proc_cpu(&server_pid.to_string()) - server0;
    let client = proc_cpu("self") - client0;
    v["server_cpu_s"] = json!(round2(server));
    v["client_cpu_s"] = json!(round2(client));
    v["server_cpu_us_per_request"] = json!((server * 1e6 / requests.max(1.0)).round());
}

struct Ctx {
    args: PlatformArgs,
    tsunagi: PathBuf,
    data_dir: PathBuf,
    synth: Synth,
    /// CPU seconds of the last `tsunagi` command (sampled every 50 ms).
    last_cpu: std::cell::Cell<f64>,
}

impl Ctx {
    fn db_args(&self) -> Vec<String> {
        let mut v = vec![
            "--data-dir".to_string(),
            self.data_dir.display().to_string(),
        ];
        if self.args.backend == Backend::Postgres {
            v.push("--database".into());
            v.push(self.args.database.clone());
        }
        v
    }

    /// Runs `tsunagi ARGS`, returning stdout, wall seconds and the peak RSS (KiB, sampled).
    fn tsunagi(&self, args: &[String]) -> anyhow::Result<(String, f64, u64)> {
        let started = Instant::now();
        let mut child = Command::new(&self.tsunagi)
            .args(args)
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("running {}", self.tsunagi.display()))?;
        let pid = child.id();
        let mut peak = 0;
        let mut cpu = 0.0f64;
        loop {
            if let Some(_status) = child.try_wait()? {
                break;
            }
            peak = peak.max(proc_mem(pid).0);
            cpu = cpu.max(proc_cpu(&pid.to_string()));
            std::thread::sleep(Duration::from_millis(50));
        }
        self.last_cpu.set(cpu);
        let out = child.wait_with_output()?;
        let secs = started.elapsed().as_secs_f64();
        if !out.status.success() {
            bail!(
                "tsunagi {} failed ({}): {}{}",
                args.join(" "),
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok((
            String::from_utf8_lossy(&out.stdout).into_owned(),
            secs,
            peak,
        ))
    }

    fn is_http(&self, n: u64) -> bool {
        self.args.http_every > 0 && n % self.args.http_every == self.args.http_every - 1
    }
}

/// Drops and recreates the database named in `url` (connecting to `postgres`).
fn fresh_pg_database(url: &str) -> anyhow::Result<()> {
    let (base, name) = url
        .rsplit_once('/')
        .context("--database must end in /DBNAME")?;
    let name = name.split('?').next().unwrap_or(name);
    if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
        bail!("database name '{name}' must be [A-Za-z0-9_]+");
    }
    let mut c = postgres::Client::connect(&format!("{base}/postgres"), postgres::NoTls)?;
    // separate statements: DROP/CREATE DATABASE cannot run in a transaction block
    c.batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))?;
    c.batch_execute(&format!("CREATE DATABASE {name}"))?;
    Ok(())
}

fn pg_database_size(url: &str) -> anyhow::Result<u64> {
    let mut c = postgres::Client::connect(url, postgres::NoTls)?;
    let row = c.query_one("SELECT pg_database_size(current_database())", &[])?;
    Ok(row.get::<_, i64>(0) as u64)
}

/// The files of the embedded store, each with its log and shared-memory index.
fn sqlite_size(dir: &Path) -> u64 {
    let db = dir.join("tsunagi.db");
    [
        tsunagi_store::sqlite::audit_file(&db),
        tsunagi_store::sqlite::audit_index_file(&db),
        db,
    ]
    .into_iter()
    .flat_map(|f| {
        ["", "-wal", "-shm"].map(|suffix| {
            let mut p = f.clone().into_os_string();
            p.push(suffix);
            PathBuf::from(p)
        })
    })
    .filter_map(|f| std::fs::metadata(f).ok())
    .map(|m| m.len())
    .sum()
}

pub fn run(args: PlatformArgs) -> anyhow::Result<()> {
    let tsunagi = match &args.tsunagi {
        Some(p) => p.clone(),
        None => std::env::current_exe()?
            .parent()
            .context("executable has no directory")?
            .join("tsunagi"),
    };
    if !tsunagi.exists() {
        bail!(
            "{} not found: build it (cargo build --release -p tsunagi) or pass --tsunagi",
            tsunagi.display()
        );
    }
    let work = args.work_dir.join(format!(
        "{}-{}",
        match args.backend {
            Backend::Sqlite => "sqlite",
            Backend::Postgres => "postgres",
        },
        args.patients
    ));
    let data_dir = work.join("data");
    if args.reuse {
        if args.backend == Backend::Sqlite && !data_dir.join("tsunagi.db").exists() {
            bail!(
                "--reuse: no database in {} (run once with --keep)",
                data_dir.display()
            );
        }
    } else {
        if work.exists() {
            std::fs::remove_dir_all(&work)?;
        }
        std::fs::create_dir_all(&data_dir)?;
        if args.backend == Backend::Postgres {
            fresh_pg_database(&args.database)?;
        }
    }
    let synth = Synth::new(args.seed, args.hospitals);
    let ctx = Ctx {
        tsunagi,
        data_dir,
        synth,
        args,
        last_cpu: std::cell::Cell::new(0.0),
    };
    let machine = machine();
    eprintln!("machine: {machine}");
    let result = bench(&ctx, &work);
    if !ctx.args.keep {
        let _ = std::fs::remove_dir_all(&work);
    }
    let mut result = result?;
    result["machine"] = machine;
    let text = serde_json::to_string_pretty(&result)?;
    println!("{text}");
    if let Some(p) = &ctx.args.json_out {
        std::fs::write(p, &text)?;
    }
    human(&result);
    Ok(())
}

fn human(r: &Value) {
    let ms = |v: &Value| {
        format!(
            "p50 {} ms, p99 {} ms; server CPU {} us/request",
            v["p50_ms"], v["p99_ms"], v["server_cpu_us_per_request"]
        )
    };
    eprintln!(
        "\n== platform core: {} backend, {} patients, {} resources ==",
        r["backend"], r["patients"], r["resources"]
    );
    eprintln!(
        "ingest via import:      {} resources/s",
        r["ingest_import"]["resources_per_second"]
    );
    eprintln!(
        "ingest via transaction: {} resources/s ({} bundles/s, {})",
        r["ingest_transaction"]["resources_per_second"],
        r["ingest_transaction"]["bundles_per_second"],
        ms(&r["ingest_transaction"]["latency"])
    );
    eprintln!(
        "  server CPU per transaction-ingested resource: {} us",
        r["ingest_transaction"]["server_cpu_us_per_request"]
    );
    eprintln!(
        "read:                   {}/s, {}",
        r["read"]["per_second"],
        ms(&r["read"])
    );
    for (k, v) in r["search"].as_object().into_iter().flatten() {
        eprintln!("search {k}: {}/s, {}", v["per_second"], ms(v));
    }
    eprintln!(
        "server peak memory: {} MiB; database size: {} MiB",
        r["server_peak_rss_mib"], r["database_mib"]
    );
}

/// Steps 1–3: the organisations, the NDJSON per hospital, `tsunagi import` of each.
fn load_by_import(ctx: &Ctx, work: &Path) -> anyhow::Result<Value> {
    let a = &ctx.args;
    let db = ctx.db_args();
    // 1. organisations
    let orgs = work.join("orgs.ndjson");
    {
        let mut w = BufWriter::new(File::create(&orgs)?);
        for i in 0..a.hospitals {
            serde_json::to_writer(&mut w, &hospital_organization(&hospital(i)))?;
            w.write_all(b"\n")?;
        }
        w.flush()?;
    }
    let mut cmd = vec!["import".to_string()];
    cmd.extend(db.iter().cloned());
    cmd.push(orgs.display().to_string());
    ctx.tsunagi(&cmd)?;

    // 2. NDJSON per hospital (the author organisation of an import is its --org)
    eprintln!("generating {} patients ...", a.patients);
    let gen_started = Instant::now();
    let mut files = Vec::new();
    let mut writers = Vec::new();
    for i in 0..a.hospitals {
        let p = work.join(format!("import-{i}.ndjson"));
        writers.push(BufWriter::with_capacity(1 << 20, File::create(&p)?));
        files.push(p);
    }
    let mut import_resources = 0u64;
    let mut import_bytes = 0u64;
    for n in 0..a.patients {
        if ctx.is_http(n) {
            continue;
        }
        let w = &mut writers[ctx.synth.hospital_of(n)];
        for r in ctx.synth.patient(n) {
            let line = serde_json::to_vec(&r)?;
            import_bytes += line.len() as u64 + 1;
            w.write_all(&line)?;
            w.write_all(b"\n")?;
            import_resources += 1;
        }
    }
    for mut w in writers {
        w.flush()?;
    }
    eprintln!(
        "generated {import_resources} resources ({:.0} MiB) in {:.1}s",
        import_bytes as f64 / 1048576.0,
        gen_started.elapsed().as_secs_f64()
    );

    // 3. import
    let mut import_secs = 0.0;
    let mut import_cpu = 0.0;
    let mut import_peak = 0;
    for (i, f) in files.iter().enumerate() {
        let h = hospital(i);
        let mut cmd = vec!["import".to_string(), "--org".into(), h.code.clone()];
        cmd.extend(db.iter().cloned());
        cmd.push(f.display().to_string());
        let (out, secs, peak) = ctx.tsunagi(&cmd)?;
        eprintln!("import hospital {i}: {}", out.trim());
        import_secs += secs;
        import_cpu += ctx.last_cpu.get();
        import_peak = import_peak.max(peak);
        let _ = std::fs::remove_file(f);
    }
    let ingest_import = json!({
        "resources": import_resources,
        "bytes": import_bytes,
        "seconds": round2(import_secs),
        "resources_per_second": round2(import_resources as f64 / import_secs),
        "import_process_peak_rss_mib": import_peak / 1024,
        "import_cpu_s": round2(import_cpu),
        "resources_per_cpu_second": round2(import_resources as f64 / import_cpu.max(1e-9)),
    });
    eprintln!("import: {ingest_import}");
    Ok(ingest_import)
}

fn bench(ctx: &Ctx, work: &Path) -> anyhow::Result<Value> {
    let a = &ctx.args;
    let db = ctx.db_args();
    let ingest_import = if a.reuse {
        Value::Null
    } else {
        load_by_import(ctx, work)?
    };

    // 4. tokens: a doctor per hospital
    let mut tokens = Vec::new();
    for i in 0..a.hospitals {
        let mut cmd = vec![
            "token".to_string(),
            "issue".into(),
            "--org".into(),
            hospital(i).code,
            "--role".into(),
            "doctor".into(),
            "--user".into(),
            format!("bench-doctor-{i}"),
            "--ttl".into(),
            "86400".into(),
        ];
        cmd.extend(db.iter().cloned());
        tokens.push(format!("Bearer {}", ctx.tsunagi(&cmd)?.0.trim()));
    }

    // 5. the server
    let log = File::create(work.join("server.log"))?;
    let mut cmd = vec![
        "serve".to_string(),
        "--listen".into(),
        format!("127.0.0.1:{}", a.port),
    ];
    cmd.extend(db.iter().cloned());
    let child = Command::new(&ctx.tsunagi)
        .args(&cmd)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()?;
    let mut server = ServerGuard(Some(child));
    let pid = server.pid();
    let base = format!("http://127.0.0.1:{}", a.port);

    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let tokens = Arc::new(tokens);
    let result = rt.block_on(async {
        let client = reqwest::Client::builder()
            .pool_max_idle_per_host(a.concurrency * 2)
            .timeout(Duration::from_secs(120))
            .build()?;
        wait_ready(&client, &base).await?;
        let ingest_tx = if a.reuse {
            eprintln!("server up (pid {pid}); reusing the database");
            Value::Null
        } else {
            eprintln!("server up (pid {pid}); HTTP ingest ...");
            let (c0, s0) = (proc_cpu(&pid.to_string()), proc_cpu("self"));
            let mut ingest_tx = http_ingest(ctx, &client, &base, &tokens).await?;
            let n = ingest_tx["resources"].as_f64().unwrap_or(0.0);
            add_cpu(&mut ingest_tx, pid, c0, s0, n);
            eprintln!("transaction ingest: {ingest_tx}");
            ingest_tx
        };
        let (hwm_after_ingest, _) = proc_mem(pid);

        let synth = Arc::new(ctx.synth.clone());
        let patients = a.patients;
        let dur = Duration::from_secs_f64(a.duration);

        let phases = Phases {
            client: &client,
            base: &base,
            tokens: &tokens,
            concurrency: a.concurrency,
            dur,
            server_pid: pid,
            load_client: a.client,
            work,
        };
        eprintln!("reads ...");
        let s = synth.clone();
        let read = phases
            .measure("read", move |rng| {
                let n = rng.below(patients);
                let (rt, id) = resource_ref(n, rng.below(RESOURCES_PER_PATIENT as u64) as usize);
                (s.hospital_of(n), format!("/fhir/{rt}/{id}"), vec![])
            })
            .await?;

        let mut searches = serde_json::Map::new();
        if a.reads_only {
            return anyhow::Ok((ingest_tx, read, Value::Object(searches), hwm_after_ingest));
        }
        let s = synth.clone();
        let obs = phases
            .measure("search observation", move |rng| {
                let n = rng.below(patients);
                let k = s.key(n);
                let code = rng.pick(&k.lab_codes).clone();
                (
                    k.hospital,
                    "/fhir/Observation".to_string(),
                    vec![
                        ("patient", format!("Patient/{}", k.id)),
                        ("code", format!("{JLAC10_SYSTEM}|{code}")),
                        ("_sort", "-date".into()),
                        ("_count", "10".into()),
                    ],
                )
            })
            .await?;
        searches.insert("a_observation_patient_code_sort_date".into(), obs);

        let s = synth.clone();
        let ident = phases
            .measure("search identifier", move |rng| {
                let k = s.key(rng.below(patients));
                (
                    k.hospital,
                    "/fhir/Patient".to_string(),
                    vec![("identifier", format!("{}|{}", k.mrn_system, k.mrn))],
                )
            })
            .await?;
        searches.insert("b_patient_identifier".into(), ident);

        let s = synth.clone();
        let cond = phases
            .measure("search condition", move |rng| {
                let k = s.key(rng.below(patients));
                (
                    k.hospital,
                    "/fhir/Condition".to_string(),
                    vec![("patient", format!("Patient/{}", k.id))],
                )
            })
            .await?;
        searches.insert("c_condition_patient".into(), cond);

        let s = synth.clone();
        let name = phases
            .measure("search name+birthdate", move |rng| {
                let k = s.key(rng.below(patients));
                let prefix: String = k.family_kana.chars().take(2).collect();
                (
                    k.hospital,
                    "/fhir/Patient".to_string(),
                    vec![
                        ("name", prefix),
                        ("birthdate", k.birth_date[..7].to_string()),
                    ],
                )
            })
            .await?;
        searches.insert("d_patient_kana_name_birth_month".into(), name);

        anyhow::Ok((ingest_tx, read, Value::Object(searches), hwm_after_ingest))
    });
    let (hwm, rss) = proc_mem(pid);
    let db_bytes = match a.backend {
        Backend::Sqlite => sqlite_size(&ctx.data_dir),
        Backend::Postgres => pg_database_size(&a.database).unwrap_or(0),
    };
    server.stop();
    if a.backend == Backend::Postgres && !a.keep {
        let _ = drop_pg_database(&a.database);
    }
    let (ingest_tx, read, search, hwm_after_ingest) = result?;
    Ok(json!({
        "backend": match a.backend { Backend::Sqlite => "sqlite", Backend::Postgres => "postgres" },
        "patients": a.patients,
        "resources": a.patients * RESOURCES_PER_PATIENT as u64,
        "hospitals": a.hospitals,
        "concurrency": a.concurrency,
        "client": a.client.name(),
        "duration_s": a.duration,
        "ingest_import": ingest_import,
        "ingest_transaction": ingest_tx,
        "read": read,
        "search": search,
        "server_peak_rss_mib": hwm / 1024,
        "server_peak_rss_after_ingest_mib": hwm_after_ingest / 1024,
        "server_rss_end_mib": rss / 1024,
        "database_bytes": db_bytes,
        "database_mib": db_bytes / 1048576,
    }))
}

fn drop_pg_database(url: &str) -> anyhow::Result<()> {
    let (base, name) = url.rsplit_once('/').context("no database name")?;
    let name = name.split('?').next().unwrap_or(name);
    let mut c = postgres::Client::connect(&format!("{base}/postgres"), postgres::NoTls)?;
    c.batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))?;
    Ok(())
}

/// Stops the server with SIGTERM (graceful), or kills it, when dropped.
struct ServerGuard(Option<Child>);

impl ServerGuard {
    fn pid(&self) -> u32 {
        self.0.as_ref().map(Child::id).unwrap_or(0)
    }
    fn stop(&mut self) {
        let Some(mut c) = self.0.take() else { return };
        let _ = Command::new("kill")
            .args(["-TERM", &c.id().to_string()])
            .status();
        for _ in 0..100 {
            if let Ok(Some(_)) = c.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = c.kill();
        let _ = c.wait();
    }
}

impl Drop for ServerGuard {
    fn drop(&mut self) {
        self.stop();
    }
}

async fn wait_ready(client: &reqwest::Client, base: &str) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(120);
    while Instant::now() < deadline {
        if let Ok(r) = client.get(format!("{base}/readyz")).send().await
            && r.status().is_success()
        {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    bail!("the server did not become ready at {base}")
}

async fn http_ingest(
    ctx: &Ctx,
    client: &reqwest::Client,
    base: &str,
    tokens: &Arc<Vec<String>>,
) -> anyhow::Result<Value> {
    let a = &ctx.args;
    // Pre-serialised so the clock measures the server, not the generator.
    let bundles: Vec<(usize, Vec<u8>)> = (0..a.patients)
        .filter(|n| ctx.is_http(*n))
        .map(|n| {
            (
                ctx.synth.hospital_of(n),
                serde_json::to_vec(&ctx.synth.transaction(n)).expect("serialisable"),
            )
        })
        .collect();
    let bytes: usize = bundles.iter().map(|b| b.1.len()).sum();
    let bundles = Arc::new(bundles);
    let next = Arc::new(AtomicUsize::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..a.concurrency {
        let (client, base, tokens, bundles, next, errors) = (
            client.clone(),
            base.to_string(),
            tokens.clone(),
            bundles.clone(),
            next.clone(),
            errors.clone(),
        );
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some((h, body)) = bundles.get(i) else {
                    break;
                };
                let t = Instant::now();
                let r = client
                    .post(format!("{base}/fhir"))
                    .header("authorization", &tokens[*h])
                    .header("content-type", "application/fhir+json")
                    .body(body.clone())
                    .send()
                    .await;
                let ok = match r {
                    Ok(r) => {
                        let status = r.status();
                        let text = r.text().await.unwrap_or_default();
                        if !status.is_success() && errors.load(Ordering::Relaxed) < 3 {
                            eprintln!("transaction failed: {status}: {text:.500}");
                        }
                        status.is_success()
                    }
                    Err(e) => {
                        eprintln!("transaction failed: {e}");
                        false
                    }
                };
                if ok {
                    lat.push(t.elapsed().as_micros() as u64);
                } else {
                    errors.fetch_add(1, Ordering::Relaxed);
                }
            }
            lat
        }));
    }
    let mut lat = Vec::new();
    for t in tasks {
        lat.extend(t.await?);
    }
    let secs = started.elapsed().as_secs_f64();
    let n = lat.len() as f64;
    let errors = errors.load(Ordering::Relaxed);
    Ok(json!({
        "bundles": bundles.len(),
        "resources": bundles.len() * RESOURCES_PER_PATIENT,
        "bytes": bytes,
        "seconds": round2(secs),
        "bundles_per_second": round2(n / secs),
        "resources_per_second": round2(n * RESOURCES_PER_PATIENT as f64 / secs),
        "concurrency": a.concurrency,
        "latency": summarize(lat, errors, secs),
    }))
}

type Request = (usize, String, Vec<(&'static str, String)>);

/// The URL of a request: base, path and the encoded query.
fn request_url(
    base: &str,
    path: &str,
    query: &[(&'static str, String)],
) -> anyhow::Result<reqwest::Url> {
    let mut url = reqwest::Url::parse(&format!("{base}{path}"))?;
    if !query.is_empty() {
        url.query_pairs_mut()
            .extend_pairs(query.iter().map(|(k, v)| (*k, v.as_str())));
    }
    Ok(url)
}

/// What every measured read or search phase shares.
struct Phases<'a> {
    client: &'a reqwest::Client,
    base: &'a str,
    tokens: &'a Arc<Vec<String>>,
    concurrency: usize,
    dur: Duration,
    server_pid: u32,
    load_client: LoadClient,
    work: &'a Path,
}

impl Phases<'_> {
    /// Measures one phase of GETs made by `make`, with the CPU both sides spent.
    async fn measure(
        &self,
        label: &str,
        make: impl Fn(&mut Rng) -> Request + Send + Sync + 'static,
    ) -> anyhow::Result<Value> {
        let make = Arc::new(make);
        // wrk does not read the answers: a short run of the built-in client first
        // tells how many resources the phase's requests return.
        let sample = match self.load_client {
            LoadClient::Builtin => None,
            LoadClient::Wrk => {
                let m = make.clone();
                let dur = Duration::from_millis(500);
                Some(load(self.client, self.base, self.tokens, 1, dur, move |r| m(r)).await)
            }
        };
        let (c0, s0) = (proc_cpu(&self.server_pid.to_string()), proc_cpu("self"));
        let mut v = match self.load_client {
            LoadClient::Builtin => {
                let m = make.clone();
                let (c, d) = (self.concurrency, self.dur);
                load(self.client, self.base, self.tokens, c, d, move |r| m(r)).await
            }
            LoadClient::Wrk => load_wrk(self, &*make)?,
        };
        let n = v["requests"].as_f64().unwrap_or(0.0);
        add_cpu(&mut v, self.server_pid, c0, s0, n);
        if let Some(sample) = sample {
            v["mean_results_sampled"] = sample["mean_results_sampled"].clone();
        }
        v["client"] = json!(self.load_client.name());
        eprintln!("{label}: {v}");
        Ok(v)
    }
}

/// Requests written for wrk, which replays them in a loop.
const WRK_REQUESTS: u64 = 100_000;

/// wrk's script: replays "token index<TAB>target" lines, each thread from its own
/// offset.
const WRK_SCRIPT: &str = r#"local counter = 0
function setup(thread)
  thread:set("offset", counter * 7919)
  counter = counter + 1
end
local reqs, tokens, i = {}, {}, 0
function init(args)
  for line in io.lines(args[1]) do
    local t, p = line:match("^(%d+)\t(.*)$")
    reqs[#reqs + 1] = { tonumber(t) + 1, p }
  end
  for line in io.lines(args[2]) do tokens[#tokens + 1] = line end
  i = offset or 0
end
function request()
  i = i + 1
  local r = reqs[(i % #reqs) + 1]
  return wrk.format("GET", r[2], { ["Authorization"] = tokens[r[1]], ["Accept"] = "application/fhir+json" })
end
"#;

/// Runs wrk (one thread, C connections) over requests made by `make`.
fn load_wrk(
    p: &Phases<'_>,
    make: &(dyn Fn(&mut Rng) -> Request + Send + Sync),
) -> anyhow::Result<Value> {
    let requests = p.work.join("wrk-requests.tsv");
    let mut w = BufWriter::new(File::create(&requests)?);
    let mut rng = Rng::new(0xBE4C_0000);
    for _ in 0..WRK_REQUESTS {
        let (h, path, query) = make(&mut rng);
        let url = request_url(p.base, &path, &query)?;
        match url.query() {
            Some(q) => writeln!(w, "{h}\t{}?{q}", url.path())?,
            None => writeln!(w, "{h}\t{}", url.path())?,
        }
    }
    w.flush()?;
    let tokens = p.work.join("wrk-tokens.txt");
    std::fs::write(&tokens, p.tokens.join("\n") + "\n")?;
    let script = p.work.join("wrk.lua");
    std::fs::write(&script, WRK_SCRIPT)?;
    let out = Command::new("wrk")
        .arg("-t1")
        .arg(format!("-c{}", p.concurrency))
        .arg(format!("-d{}s", p.dur.as_secs_f64().ceil().max(1.0) as u64))
        .args(["--timeout", "30s", "--latency", "-s"])
        .arg(&script)
        .arg(p.base)
        .arg("--")
        .arg(&requests)
        .arg(&tokens)
        .output()
        .context("running wrk (Debian: apt-get install wrk)")?;
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        bail!(
            "wrk failed: {}{}",
            text,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    parse_wrk(&text).with_context(|| format!("reading wrk's report:\n{text}"))
}

/// A duration as wrk prints it (`477.00us`, `2.46ms`, `1.02s`, `1.50m`), in ms.
fn wrk_ms(s: &str) -> Option<f64> {
    let (num, unit) = s.split_at(s.find(|c: char| c.is_ascii_alphabetic())?);
    let n: f64 = num.parse().ok()?;
    Some(match unit {
        "us" => n / 1000.0,
        "ms" => n,
        "s" => n * 1000.0,
        "m" => n * 60_000.0,
        "h" => n * 3_600_000.0,
        _ => return None,
    })
}

/// The figures of wrk's `--latency` report, named as [`summarize`] names them.
/// Non-2xx answers and socket errors are errors and not counted as requests.
fn parse_wrk(text: &str) -> anyhow::Result<Value> {
    let words = |prefix: &str| -> Option<Vec<&str>> {
        text.lines()
            .map(str::trim)
            .find(|l| l.starts_with(prefix))
            .map(|l| l.split_whitespace().collect())
    };
    let pct = |p: &str| words(p).and_then(|w| w.get(1).and_then(|v| wrk_ms(v)));
    let latency = words("Latency ").context("no latency line")?;
    let (mean, max) = (
        latency
            .get(1)
            .and_then(|v| wrk_ms(v))
            .context("latency mean")?,
        latency
            .get(3)
            .and_then(|v| wrk_ms(v))
            .context("latency max")?,
    );
    let total_line = text
        .lines()
        .map(str::trim)
        .find(|l| l.contains(" requests in "))
        .context("no request count")?;
    let w: Vec<&str> = total_line.split_whitespace().collect();
    let total: u64 = w
        .first()
        .and_then(|v| v.parse().ok())
        .context("request count")?;
    let seconds = w
        .get(3)
        .map(|v| v.trim_end_matches(','))
        .and_then(wrk_ms)
        .context("run time")?
        / 1000.0;
    let non_2xx: u64 = words("Non-2xx or 3xx responses:")
        .and_then(|w| w.last().and_then(|v| v.parse().ok()))
        .unwrap_or(0);
    let socket: u64 = text
        .lines()
        .map(str::trim)
        .find(|l| l.starts_with("Socket errors:"))
        .map(|l| {
            l.split(|c: char| !c.is_ascii_digit())
                .filter_map(|n| n.parse::<u64>().ok())
                .sum()
        })
        .unwrap_or(0);
    let ok = total.saturating_sub(non_2xx);
    Ok(json!({
        "requests": ok,
        "errors": non_2xx + socket,
        "seconds": round2(seconds),
        "per_second": round2(ok as f64 / seconds.max(1e-9)),
        "mean_ms": round2(mean),
        "p50_ms": round2(pct("50%").context("p50")?),
        "p90_ms": round2(pct("90%").context("p90")?),
        "p99_ms": round2(pct("99%").context("p99")?),
        "max_ms": round2(max),
    }))
}

/// C clients issue GETs made by `make` for `dur`; latencies of 200 responses.
/// Every 50th response is parsed to count how many resources it returned.
async fn load(
    client: &reqwest::Client,
    base: &str,
    tokens: &Arc<Vec<String>>,
    concurrency: usize,
    dur: Duration,
    make: impl Fn(&mut Rng) -> Request + Send + Sync + 'static,
) -> Value {
    let make = Arc::new(make);
    let errors = Arc::new(AtomicU64::new(0));
    let sampled = Arc::new(AtomicU64::new(0));
    let sampled_entries = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let deadline = started + dur;
    let mut tasks = Vec::new();
    for t in 0..concurrency {
        let (client, base, tokens, make, errors, sampled, sampled_entries) = (
            client.clone(),
            base.to_string(),
            tokens.clone(),
            make.clone(),
            errors.clone(),
            sampled.clone(),
            sampled_entries.clone(),
        );
        tasks.push(tokio::spawn(async move {
            let mut rng = Rng::new(0xBE4C_0000 + t as u64);
            let mut lat = Vec::with_capacity(1 << 16);
            let mut i = 0u64;
            while Instant::now() < deadline {
                i += 1;
                let (h, path, query) = make(&mut rng);
                let t0 = Instant::now();
                let url = request_url(&base, &path, &query).expect("valid URL");
                let r = client
                    .get(url)
                    .header("authorization", &tokens[h])
                    .header("accept", "application/fhir+json")
                    .send()
                    .await;
                match r {
                    Ok(r) if r.status().is_success() => match r.bytes().await {
                        Ok(body) => {
                            lat.push(t0.elapsed().as_micros() as u64);
                            if i.is_multiple_of(50) {
                                let v: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
                                let n = match v["resourceType"].as_str() {
                                    Some("Bundle") => {
                                        v["entry"].as_array().map(Vec::len).unwrap_or(0)
                                    }
                                    Some(_) => 1,
                                    None => 0,
                                };
                                sampled.fetch_add(1, Ordering::Relaxed);
                                sampled_entries.fetch_add(n as u64, Ordering::Relaxed);
                            }
                        }
                        Err(_) => {
                            errors.fetch_add(1, Ordering::Relaxed);
                        }
                    },
                    Ok(r) => {
                        let status = r.status();
                        let text = r.text().await.unwrap_or_default();
                        if errors.fetch_add(1, Ordering::Relaxed) < 3 {
                            eprintln!("GET {path} {query:?}: {status}: {text:.300}");
                        }
                    }
                    Err(e) => {
                        if errors.fetch_add(1, Ordering::Relaxed) < 3 {
                            eprintln!("GET {path}: {e}");
                        }
                    }
                }
            }
            lat
        }));
    }
    let mut lat = Vec::new();
    for t in tasks {
        if let Ok(l) = t.await {
            lat.extend(l);
        }
    }
    let secs = started.elapsed().as_secs_f64();
    let mut v = summarize(lat, errors.load(Ordering::Relaxed), secs);
    // null when no client reached its 50th answer: "0 results" would be a claim
    v["mean_results_sampled"] = match sampled.load(Ordering::Relaxed) {
        0 => Value::Null,
        s => json!(round2(
            sampled_entries.load(Ordering::Relaxed) as f64 / s as f64
        )),
    };
    v
}

#[cfg(test)]
mod wrk_report {
    use super::{parse_wrk, wrk_ms};

    /// A report wrk 4.1 printed (`--latency`), with the error lines it adds when
    /// some answers fail.
    const REPORT: &str = "Running 1s test @ http://127.0.0.1:18555/missing
  1 threads and 2 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency   666.78us  428.69us   6.26ms   94.10%
    Req/Sec     2.92k   204.60     3.08k    81.82%
  Latency Distribution
     50%  596.00us
     75%  757.00us
     90%    0.94ms
     99%    2.69ms
  3184 requests in 1.10s, 1.58MB read
  Socket errors: connect 0, read 2, write 0, timeout 1
  Non-2xx or 3xx responses: 184
Requests/sec:   2897.09
Transfer/sec:      1.44MB
";

    #[test]
    fn failed_answers_are_errors_not_requests() {
        let v = parse_wrk(REPORT).unwrap();
        assert_eq!(v["requests"], 3000);
        assert_eq!(v["errors"], 184 + 3);
        assert_eq!(v["seconds"], 1.1);
        assert_eq!(v["per_second"], 2727.27);
        assert_eq!(v["p50_ms"], 0.6);
        assert_eq!(v["p90_ms"], 0.94);
        assert_eq!(v["p99_ms"], 2.69);
        assert_eq!(v["max_ms"], 6.26);
        assert_eq!(v["mean_ms"], 0.67);
    }

    #[test]
    fn units_and_a_truncated_report() {
        assert_eq!(wrk_ms("477.00us"), Some(0.477));
        assert_eq!(wrk_ms("1.50m"), Some(90_000.0));
        assert_eq!(wrk_ms("12"), None);
        assert!(parse_wrk(&REPORT[..REPORT.find("  Latency Distribution").unwrap()]).is_err());
    }
}
