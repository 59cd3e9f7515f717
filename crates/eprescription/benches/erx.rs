//! E-prescription benchmark driver (not a timed test).
//!
//! ```sh
//! B="cargo bench -p tsunagi-eprescription --bench erx --"
//! $B generate --data-dir /tmp/x --patients 1000000          # synthetic patients + 2 years of medication lines
//! $B serve --data-dir /tmp/x --listen 127.0.0.1:8090 &       # platform + eligibility + e-prescription
//! $B loadgen --url http://127.0.0.1:8090 --data-dir /tmp/x --patients 1000000 --mode check --concurrency 32
//! $B loadgen ... --mode prescribe                             # registration throughput
//! $B loadgen ... --mode cycle                                 # prescribe → accept → dispense
//! ```
//!
//! `generate` writes, per patient, a Patient and the service's active-medication
//! index holding two years of prescription and dispensing lines (pruned to the
//! look-back window exactly as the service prunes), directly through the store
//! in batches. It does not write the MedicationRequest/MedicationDispense rows
//! behind those lines: a check reads only the index (one primary-key read), so
//! the rows would only make the database larger. Synthetic patients are written
//! with the benchmark pharmacy as author, so the pharmacy may identify them
//! (`patient` identity) without a card reception in the `cycle` workload.

/// The allocator of the `tsunagi` binary, so the figures are the product's.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use chrono::NaiveDate;
use clap::Parser;
use serde_json::{Value, json};
use tsunagi_eprescription::model::{Med, MedIndex, SERVICE_ORG, index_id, to_basic};
use tsunagi_eprescription::{Config, EprescriptionService};
use tsunagi_policy::identity::{OrgKind, Principal, Role};
use tsunagi_server::{ServerConfig, latency};
use tsunagi_store::WriteContext;

const CLINIC: &str = "1310543218";
const PHARMACY: &str = "1340222221";

/// A small pool of real YJ codes (several share ingredients or classes).
const CODES: &[&str] = &[
    "2325003F1020", // famotidine tab
    "2325003B2029", // famotidine powder (same ingredient)
    "2325005F1020", // other H2 blocker (same class)
    "1149019F1560", // loxoprofen
    "2233002F1280", // carbocisteine
    "2171022F1022", // nifedipine-like class 2171
    "3332001F1028", // warfarin class
    "2144001F1027", // class 2144
    "3969007F1024", // class 3969
    "4490003F1021", // class 4490
    "1124007F1024", // class 1124
    "6132013F1020", // antibiotic
];

#[derive(Parser)]
enum Cli {
    /// Serves the platform with the eligibility and e-prescription services.
    Serve {
        #[arg(long)]
        data_dir: PathBuf,
        #[arg(long, default_value = "127.0.0.1:8090")]
        listen: SocketAddr,
        #[arg(long)]
        database: Option<String>,
        #[arg(long, default_value_t = 2)]
        threads: usize,
    },
    /// Writes synthetic patients and their medication indexes.
    Generate {
        #[arg(long)]
        data_dir: PathBuf,
        #[arg(long)]
        database: Option<String>,
        #[arg(long, default_value_t = 100_000)]
        patients: u64,
        /// Prescriptions per patient over two years.
        #[arg(long, default_value_t = 8)]
        per_patient: u64,
        #[arg(long, default_value_t = 2000)]
        batch: u64,
    },
    /// Load generator (separate process).
    Loadgen {
        #[arg(long)]
        url: String,
        #[arg(long)]
        data_dir: PathBuf,
        #[arg(long, default_value_t = 100_000)]
        patients: u64,
        /// check | prescribe | cycle
        #[arg(long, default_value = "check")]
        mode: String,
        #[arg(long, default_value_t = 32)]
        concurrency: usize,
        #[arg(long, default_value_t = 20)]
        seconds: u64,
    },
}

fn today() -> NaiveDate {
    (chrono::Utc::now() + chrono::Duration::hours(9)).date_naive()
}

fn rng(x: &mut u64) -> u64 {
    *x ^= *x << 13;
    *x ^= *x >> 7;
    *x ^= *x << 17;
    *x
}

fn pid(i: u64) -> String {
    format!("bp{i:07}")
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().filter(|a| a != "--bench").collect();
    if args.len() < 2 {
        println!("usage: erx serve|generate|loadgen (see the file's docs)");
        return Ok(());
    }
    match Cli::parse_from(args) {
        Cli::Serve {
            data_dir,
            listen,
            database,
            threads,
        } => serve(data_dir, listen, database, threads),
        Cli::Generate {
            data_dir,
            database,
            patients,
            per_patient,
            batch,
        } => generate(data_dir, database, patients, per_patient, batch),
        Cli::Loadgen {
            url,
            data_dir,
            patients,
            mode,
            concurrency,
            seconds,
        } => loadgen(url, data_dir, patients, mode, concurrency, seconds),
    }
}

fn serve(
    data_dir: PathBuf,
    listen: SocketAddr,
    database: Option<String>,
    threads: usize,
) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads)
        .enable_all()
        .build()?;
    let config = ServerConfig {
        data_dir: data_dir.clone(),
        listen,
        database,
        base_url: Some(format!("http://{listen}/fhir")),
        ..ServerConfig::default()
    };
    let store =
        tsunagi_server::open_store(&config).map_err(|e| anyhow::anyhow!("open store: {e}"))?;
    let erx = EprescriptionService::open(store.clone(), &data_dir, Config::default())
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let elig =
        tsunagi_eligibility::EligibilityService::open(store.clone(), &data_dir, Default::default())
            .map_err(|e| anyhow::anyhow!("{e}"))?;
    rt.block_on(async move {
        let state = tsunagi_server::Builder::new(config, store)
            .service(Arc::new(elig))
            .service(Arc::new(erx))
            .build()
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        let listener = tokio::net::TcpListener::bind(listen).await?;
        println!("serving on http://{listen}");
        tsunagi_server::serve(state, listener, async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await?;
        anyhow::Ok(())
    })
}

fn generate(
    data_dir: PathBuf,
    database: Option<String>,
    patients: u64,
    per_patient: u64,
    batch: u64,
) -> anyhow::Result<()> {
    let config = ServerConfig {
        data_dir,
        database,
        ..ServerConfig::default()
    };
    let store =
        tsunagi_server::open_store(&config).map_err(|e| anyhow::anyhow!("open store: {e}"))?;
    let today = today();
    let keep_from = today - chrono::Duration::days(365);
    let svc = WriteContext {
        org: Some(SERVICE_ORG.into()),
        user: None,
    };
    let ph = WriteContext {
        org: Some(PHARMACY.into()),
        user: Some("bench".into()),
    };
    let t0 = Instant::now();
    let mut x: u64 = 0x2545_F491_4F6C_DD1D;
    let mut lines_total = 0u64;
    let mut i = 0;
    let err = |e: tsunagi_fhir::FhirError| anyhow::anyhow!("{e}");
    while i < patients {
        let mut tx = store.begin().map_err(err)?;
        let end = (i + batch).min(patients);
        for p in i..end {
            let id = pid(p);
            let patient = json!({"resourceType": "Patient", "id": id, "gender": "female", "birthDate": "1960-01-01"});
            tx.update("Patient", &id, patient, None, &ph).map_err(err)?;
            let mut idx = MedIndex {
                patient: id.clone(),
                meds: Vec::new(),
            };
            for k in 0..per_patient {
                // spread over two years, the newest possibly still running
                let age = rng(&mut x) % 730;
                let start = today - chrono::Duration::days(age as i64);
                let days = [7u32, 14, 28, 30, 56][(rng(&mut x) % 5) as usize];
                for l in 0..2 {
                    let code = CODES[(rng(&mut x) % CODES.len() as u64) as usize];
                    idx.meds.push(Med {
                        code: code.into(),
                        display: code.into(),
                        start,
                        days,
                        org: if k % 2 == 0 {
                            "1310123458".into()
                        } else {
                            CLINIC.into()
                        },
                        source: format!("MedicationRequest/{id}-{k}-{l}"),
                        rx: Some(format!("erx-{id}-{k}")),
                    });
                }
            }
            lines_total += idx.meds.len() as u64;
            idx.prune(keep_from);
            let iid = index_id(&id);
            tx.update(
                "Basic",
                &iid,
                to_basic(&iid, "medication-index", Some(&id), &idx),
                None,
                &svc,
            )
            .map_err(err)?;
        }
        tx.commit().map_err(err)?;
        i = end;
        if i % (batch * 10) == 0 || i == patients {
            let s = t0.elapsed().as_secs_f64();
            eprintln!(
                "{i} patients, {lines_total} lines, {:.0} patients/s",
                i as f64 / s
            );
        }
    }
    println!(
        "{patients} patients ({lines_total} medication lines over two years) in {:.0} s; database {} MB",
        t0.elapsed().as_secs_f64(),
        store.size_bytes().unwrap_or(0) / 1_000_000
    );
    Ok(())
}

fn mr(code: &str, days: u32) -> Value {
    json!({"resourceType": "MedicationRequest", "status": "active", "intent": "order",
        "medicationCodeableConcept": {"coding": [{"system": "urn:oid:1.2.392.100495.20.1.73", "code": code, "display": code}]},
        "subject": {"reference": "urn:uuid:00000000-0000-0000-0000-000000000001"},
        "authoredOn": today().to_string(),
        "dispenseRequest": {"expectedSupplyDuration": {"value": days, "unit": "日", "system": "http://unitsofmeasure.org", "code": "d"}}})
}

fn bundle(codes: &[&str]) -> Value {
    let entries: Vec<Value> = codes
        .iter()
        .enumerate()
        .map(|(i, c)| json!({"fullUrl": format!("urn:uuid:00000000-0000-0000-0000-0000000001{i:02}"), "resource": mr(c, 14)}))
        .collect();
    json!({"resourceType": "Bundle", "type": "document", "entry": entries})
}

struct Tokens {
    doctor: String,
    pharmacist: String,
}

fn tokens(data_dir: &std::path::Path) -> anyhow::Result<Tokens> {
    let keys = tsunagi_policy::ServerKeys::load_or_create(data_dir)
        .map_err(|e| anyhow::anyhow!("server key: {e}"))?;
    let mk = |org: &str, kind, role| -> anyhow::Result<String> {
        let p = Principal::new(org, kind, vec![], role, Some("loadgen".into()), None, false)
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        keys.issue(&p, chrono::Duration::hours(2))
            .map_err(|e| anyhow::anyhow!("token: {e}"))
    };
    Ok(Tokens {
        doctor: mk(CLINIC, OrgKind::Clinic, Role::Doctor)?,
        pharmacist: mk(PHARMACY, OrgKind::Pharmacy, Role::Pharmacist)?,
    })
}

fn param_str(v: &Value, name: &str) -> Option<String> {
    v["parameter"]
        .as_array()?
        .iter()
        .find(|p| p["name"] == name)
        .and_then(|p| {
            p.get("valueString")
                .or_else(|| p.get("valueId"))
                .and_then(Value::as_str)
                .map(str::to_string)
        })
}

async fn post(
    client: &reqwest::Client,
    url: &str,
    path: &str,
    token: &str,
    body: &Value,
) -> Option<Value> {
    let r = client
        .post(format!("{url}/fhir/{path}"))
        .bearer_auth(token)
        .header("content-type", "application/fhir+json")
        .body(serde_json::to_vec(body).unwrap_or_default())
        .send()
        .await
        .ok()?;
    if !r.status().is_success() {
        return None;
    }
    r.json().await.ok()
}

/// One unit of work of the mode; true on success.
async fn one(
    client: &reqwest::Client,
    url: &str,
    t: &Tokens,
    mode: &str,
    x: &mut u64,
    patients: u64,
) -> bool {
    let p = pid(rng(x) % patients);
    let codes = [
        CODES[(rng(x) % CODES.len() as u64) as usize],
        CODES[(rng(x) % CODES.len() as u64) as usize],
    ];
    match mode {
        "check" => {
            let body = json!({"resourceType": "Parameters", "parameter": [
                {"name": "patient", "valueString": p},
                {"name": "medicationRequest", "resource": mr(codes[0], 14)},
                {"name": "medicationRequest", "resource": mr(codes[1], 14)},
            ]});
            post(client, url, "$erx-check", &t.doctor, &body)
                .await
                .is_some()
        }
        _ => {
            let body = json!({"resourceType": "Parameters", "parameter": [
                {"name": "patient", "valueString": p},
                {"name": "prescription", "resource": bundle(&codes)},
            ]});
            let Some(r) = post(client, url, "$erx-prescribe", &t.doctor, &body).await else {
                return false;
            };
            if mode == "prescribe" {
                return true;
            }
            let (Some(id), Some(ex)) = (
                param_str(&r, "prescriptionId"),
                param_str(&r, "exchangeNumber"),
            ) else {
                return false;
            };
            let acc = json!({"resourceType": "Parameters", "parameter": [
                {"name": "exchangeNumber", "valueString": ex},
                {"name": "patient", "valueString": p},
            ]});
            if post(client, url, "$erx-accept", &t.pharmacist, &acc)
                .await
                .is_none()
            {
                return false;
            }
            let md = |c: &str| {
                json!({"resourceType": "MedicationDispense", "status": "completed",
                "medicationCodeableConcept": {"coding": [{"system": "urn:oid:1.2.392.100495.20.1.73", "code": c}]},
                "daysSupply": {"value": 14, "unit": "日", "system": "http://unitsofmeasure.org", "code": "d"},
                "whenHandedOver": today().to_string()})
            };
            let disp = json!({"resourceType": "Parameters", "parameter": [
                {"name": "prescriptionId", "valueString": id},
                {"name": "medicationDispense", "resource": md(codes[0])},
                {"name": "medicationDispense", "resource": md(codes[1])},
            ]});
            post(client, url, "$erx-dispense", &t.pharmacist, &disp)
                .await
                .is_some()
        }
    }
}

fn loadgen(
    url: String,
    data_dir: PathBuf,
    patients: u64,
    mode: String,
    concurrency: usize,
    seconds: u64,
) -> anyhow::Result<()> {
    let t = Arc::new(tokens(&data_dir)?);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let client = reqwest::Client::builder()
            .pool_max_idle_per_host(concurrency)
            .build()?;
        let url = url.trim_end_matches('/').to_string();
        let m = mode.clone();
        let load = latency::drive(concurrency, seconds, move |x| {
            let (client, url, t, mode) = (client.clone(), url.clone(), t.clone(), m.clone());
            async move {
                let mut x = x;
                let t0 = Instant::now();
                let ok = one(&client, &url, &t, &mode, &mut x, patients.max(1)).await;
                ok.then(|| vec![latency::micros(t0)])
            }
        })
        .await?;
        let empty = Vec::new();
        let all = load.steps.first().unwrap_or(&empty);
        println!(
            "{mode}: {} in {:.1}s: {:.0}/s, p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms, {} errors (concurrency {concurrency})",
            all.len(),
            load.seconds,
            all.len() as f64 / load.seconds,
            latency::ms(all, 0.50),
            latency::ms(all, 0.99),
            latency::ms(all, 1.0),
            load.errors,
        );
        anyhow::Ok(())
    })
}
