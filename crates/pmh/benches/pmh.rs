//! PMH benchmark driver (not a timed test).
//!
//! ```sh
//! B="cargo bench -p tsunagi-pmh --bench pmh --"
//! # persons first (the eligibility driver), then recipients matched to them
//! E="cargo bench -p tsunagi-eligibility --bench coverage --"
//! $E coverage generate /tmp/p/cov.ndjson --persons 100000
//! $E coverage import /tmp/p/cov.ndjson --insurer 06130017 --data-dir /tmp/p/data
//! $B pmh programmes crates/pmh/data/demo-municipal-programmes.json --data-dir /tmp/p/data
//! $B pmh generate /tmp/p/rec.csv --persons 100000 --programmes 10          # 1,000,000 rows
//! $B pmh import /tmp/p/rec.csv --municipality 131016 --data-dir /tmp/p/data  # rows/s
//! # $eligibility with subsidies: the eligibility driver's serve + loadgen on the same data
//! # ceiling reports: in-process server, concurrent facilities
//! $B ceiling --reports 4000 --concurrency 16 [--database 'host=... dbname=...']
//! ```

/// The allocator of the `tsunagi` binary, so the figures are the product's.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;
use serde_json::{Value, json};
use tsunagi_eligibility::consent::{Category, Grant, GrantKind};
use tsunagi_eligibility::{Config, EligibilityService, SystemClock};
use tsunagi_pmh::PmhService;
use tsunagi_pmh::cli::{PmhArgs, run_pmh};
use tsunagi_policy::identity::{OrgKind, Principal, Role};
use tsunagi_server::ServerConfig;
use tsunagi_store::WriteContext;

#[derive(Parser)]
enum Cli {
    /// `tsunagi pmh ...` (programmes, import, generate).
    Pmh(PmhArgs),
    /// Ceiling-report throughput with concurrent facilities (in-process server).
    Ceiling {
        #[arg(long, default_value_t = 4000)]
        reports: usize,
        #[arg(long, default_value_t = 16)]
        concurrency: usize,
        #[arg(long, default_value_t = 50)]
        patients: usize,
        #[arg(long, default_value_t = 4)]
        facilities: usize,
        #[arg(long)]
        database: Option<String>,
    },
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().filter(|a| a != "--bench").collect();
    if args.len() < 2 {
        println!("usage: pmh pmh ...|ceiling (see the file's docs)");
        return Ok(());
    }
    match Cli::parse_from(args) {
        Cli::Pmh(a) => std::process::exit(run_pmh(a)?),
        Cli::Ceiling {
            reports,
            concurrency,
            patients,
            facilities,
            database,
        } => ceiling(reports, concurrency, patients, facilities, database),
    }
}

fn facility_code(i: usize) -> String {
    let body = format!("1310{:05}", 10000 + i);
    let d: Vec<u8> = body.bytes().map(|b| b - b'0').collect();
    format!("{body}{}", tsunagi_policy::ids::mod10_w21_check_digit(&d))
}

fn ceiling(
    reports: usize,
    concurrency: usize,
    patients: usize,
    facilities: usize,
    database: Option<String>,
) -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let config = ServerConfig {
        data_dir: dir.path().to_path_buf(),
        database: database.clone(),
        ..ServerConfig::default()
    };
    let store = tsunagi_server::open_store(&config).map_err(|e| anyhow::anyhow!("{e}"))?;
    // persons and their recipient rows (programme 54, ceiling 1,000,000 yen so it is never reached)
    let mut tx = store.begin().map_err(|e| anyhow::anyhow!("{e}"))?;
    let wc = WriteContext {
        org: Some("1310123458".into()),
        user: None,
    };
    let mut rows = Vec::new();
    for i in 0..patients {
        let id = format!("bench-{i}");
        let kana = format!("ベンチ{}", tsunagi_pmh::cli::recipient_number(i as u64));
        tx.update(
            "Patient",
            &id,
            json!({"resourceType": "Patient", "id": id, "gender": "female", "birthDate": "1980-01-01",
                "name": [{"extension": [{"url": "http://hl7.org/fhir/StructureDefinition/iso21090-EN-representation", "valueCode": "SYL"}], "family": kana}]}),
            None,
            &wc,
        )
        .map_err(|e| anyhow::anyhow!("{e}"))?;
        rows.push(json!({"payerNumber": "54136015", "recipientNumber": tsunagi_pmh::cli::recipient_number(i as u64),
            "programme": "54", "familyKana": kana, "birthDate": "1980-01-01", "sex": "female",
            "start": "2026-01-01", "monthlyCeiling": 1_000_000}));
    }
    tx.commit().map_err(|e| anyhow::anyhow!("{e}"))?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let st = store.clone();
    rt.block_on(async move {
        let elig = EligibilityService::in_memory(Config::default(), Arc::new(SystemClock));
        // the PostgreSQL client blocks: open off the async workers
        let (st2, el) = (st.clone(), elig.shared.clone());
        let pmh = tokio::task::spawn_blocking(move || PmhService::open(st2, Some(el)))
            .await?
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        let now = chrono::Utc::now();
        let orgs: Vec<String> = (0..facilities).map(facility_code).collect();
        for org in &orgs {
            for i in 0..patients {
                elig.shared.consent.insert(Grant {
                    id: uuid::Uuid::new_v4().to_string(),
                    patient: format!("bench-{i}"),
                    org: org.clone(),
                    categories: vec![Category::A],
                    start: now - chrono::Duration::minutes(1),
                    end: now + chrono::Duration::hours(2),
                    kind: GrantKind::Reception,
                    setting: "outpatient".into(),
                });
            }
        }
        let state = tsunagi_server::Builder::new(config, st.clone())
            .service(Arc::new(elig))
            .service(Arc::new(pmh))
            .build()
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let keys = state.keys.clone();
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(tsunagi_server::serve(state, listener, async move {
            let _ = stop_rx.await;
        }));
        let token = |org: &str, kind: OrgKind, role: Role| {
            let p = Principal::new(org, kind, vec![], role, Some("bench".into()), None, false).expect("principal");
            keys.issue(&p, chrono::Duration::hours(1)).expect("token")
        };
        let muni = token("131016", OrgKind::Municipality, Role::MunicipalityStaff);
        let client = reqwest::Client::new();
        let base = format!("http://{addr}");
        let r = client
            .post(format!("{base}/pmh/recipients"))
            .bearer_auth(&muni)
            .header("Content-Type", "application/json")
            .json(&json!({"recipients": rows}))
            .send()
            .await?;
        let body: Value = r.json().await?;
        anyhow::ensure!(body["written"].as_u64() == Some(patients as u64), "recipients: {body}");
        let tokens: Vec<String> = orgs.iter().map(|o| token(o, OrgKind::Clinic, Role::Clerk)).collect();
        let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let started = Instant::now();
        let mut tasks = Vec::new();
        for w in 0..concurrency {
            let (client, base, tokens, next) = (client.clone(), base.clone(), tokens.clone(), next.clone());
            tasks.push(tokio::spawn(async move {
                let mut lat = Vec::new();
                loop {
                    let k = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    if k >= reports {
                        break;
                    }
                    let t = &tokens[(k + w) % tokens.len()];
                    let body = json!({"patient": format!("Patient/bench-{}", k % patients), "programme": "54",
                        "date": "2026-11-05", "amount": 100});
                    let t0 = Instant::now();
                    let r = client
                        .post(format!("{base}/pmh/ceiling-reports"))
                        .bearer_auth(t)
                        .json(&body)
                        .send()
                        .await?;
                    let status = r.status();
                    let _ = r.bytes().await?;
                    anyhow::ensure!(status == 201, "report answered {status}");
                    lat.push(t0.elapsed());
                }
                Ok::<Vec<Duration>, anyhow::Error>(lat)
            }));
        }
        let mut lat = Vec::new();
        for t in tasks {
            lat.extend(t.await??);
        }
        let secs = started.elapsed().as_secs_f64();
        lat.sort();
        let pct = |p: f64| {
            tsunagi_server::latency::nearest_rank(&lat, p).map_or(0.0, |d| d.as_secs_f64() * 1000.0)
        };
        // no lost update: every patient's month sums to its reports
        let mut lost = 0i64;
        for i in 0..patients {
            let expected = (reports / patients + usize::from(i < reports % patients)) as i64 * 100;
            let st2 = st.clone();
            let (s, _) = tokio::task::spawn_blocking(move || {
                tsunagi_pmh::ceiling::status(&*st2, &format!("bench-{i}"), "54", "2026-11", chrono::NaiveDate::from_ymd_opt(2026, 11, 5).unwrap())
            })
            .await?
            .map_err(|e| anyhow::anyhow!("{e}"))?;
            lost += expected - s.used;
        }
        println!(
            "backend {}: {reports} reports, concurrency {concurrency}, {facilities} facilities, {patients} patients: {:.0} reports/s, p50 {:.1} ms, p99 {:.1} ms; lost updates: {lost} yen",
            st.backend(),
            reports as f64 / secs,
            pct(0.50),
            pct(0.99)
        );
        let _ = stop_tx.send(());
        let _ = server.await;
        Ok::<(), anyhow::Error>(())
    })?;
    drop(rt);
    drop(store);
    Ok(())
}
