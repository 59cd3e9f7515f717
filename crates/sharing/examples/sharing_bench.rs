//! Benchmark of the sharing service (not a test), in-process (no HTTP), embedded
//! SQLite, through the engine (policy decisions, audit records):
//!
//! 1. **Background** (setup, not timed as registration): `--patients` patients,
//!    each with one five-information Bundle from one of 10 institutions. Loaded
//!    through the bulk path, like `tsunagi import --skip-validation`: the service's
//!    own registration rules (`prepare_clins`: ids, labels, kinds) but no profile
//!    validation, one transaction per `--batch` patients, one `import` audit
//!    record per patient. `--keep` reuses a directory already loaded.
//! 2. **Registration throughput**: `--baseline` Bundles one at a time, then
//!    `--register` Bundles with `--concurrency` registrations in flight, through
//!    `register_clins_bundle` (validation against JP-CLINS + JP Core + R4 and the
//!    masters, service rules, group commit with policy and audit), each for a
//!    fresh patient. Bodies are serialised before the clock starts and parsed
//!    inside it.
//! 3. **`Patient/$summary`** for one patient with 5 years of monthly data from 10
//!    institutions (600 Bundles registered through the full path), read as the
//!    patient (own scope, withheld labels filtered in SQL), `--samples` calls.
//!
//! ```sh
//! cargo run --release -p tsunagi-sharing --example sharing_bench -- \
//!     --shared ../shared --dir /tmp/sharing-bench --patients 1000000 \
//!     --baseline 500 --register 20000 --concurrency 64 --samples 200
//! ```
//! The resources are the official JP-CLINS examples (Condition, AllergyIntolerance,
//! two lab Observations) plus an infection Observation, re-identified per patient.

/// The allocator of the `tsunagi` binary, so the figures are the product's.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use chrono::Utc;
use serde_json::{Value, json};
use tsunagi_policy::audit::AuditRecord;
use tsunagi_policy::identity::Purpose;
use tsunagi_policy::identity::{OrgKind, PATIENT_ORG, Principal, Role};
use tsunagi_server::{Ctx, ServerConfig};
use tsunagi_sharing::SharingService;
use tsunagi_sharing::kinds::{INFECTION_CS, INSTITUTION_EXT};
use tsunagi_sharing::register::prepare_clins;
use tsunagi_store::{Store, WriteContext};

fn arg(name: &str, default: &str) -> String {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1).cloned())
        .unwrap_or_else(|| default.to_string())
}

fn read(shared: &Path, rel: &str) -> Value {
    serde_json::from_slice(
        &std::fs::read(shared.join("fixtures/jp-examples/clinical-core").join(rel)).unwrap(),
    )
    .unwrap()
}

fn institution(i: usize) -> String {
    let body = format!("13100{:04}", 1000 + i);
    let digits: Vec<u8> = body.bytes().map(|b| b - b'0').collect();
    format!(
        "{body}{}",
        tsunagi_policy::ids::mod10_w21_check_digit(&digits)
    )
}

struct Templates {
    patient: Value,
    condition: Value,
    allergy: Value,
    alb: Value,
    k: Value,
}

fn set_inst(r: &mut Value, inst: &str) {
    for e in r["extension"].as_array_mut().into_iter().flatten() {
        if e["url"] == INSTITUTION_EXT {
            e["valueIdentifier"]["value"] = json!(inst);
        }
    }
}

fn set_id(r: &mut Value, v: &str) {
    r["identifier"] = json!([{"system": "http://jpfhir.jp/fhir/core/IdSystem/resourceInstance-identifier", "value": v}]);
}

/// One five-information Bundle of `inst` for patient `key`, observations on `date`.
fn bundle(t: &Templates, inst: &str, key: &str, date: &str) -> Value {
    bundle2(t, inst, key, key, date)
}

/// As [`bundle`], with the diagnosis and allergy under `fixed` (re-registered,
/// so replaced) and the results under `monthly` (new each time).
fn bundle2(t: &Templates, inst: &str, fixed: &str, monthly: &str, date: &str) -> Value {
    let mut cond = t.condition.clone();
    let mut alg = t.allergy.clone();
    let mut alb = t.alb.clone();
    let mut k = t.k.clone();
    let mut inf = t.alb.clone();
    for (r, key, suffix) in [
        (&mut cond, fixed, "dx"),
        (&mut alg, fixed, "alg"),
        (&mut alb, monthly, "alb"),
        (&mut k, monthly, "k"),
        (&mut inf, monthly, "inf"),
    ] {
        set_inst(r, inst);
        set_id(r, &format!("{inst}-{key}-{suffix}"));
    }
    for r in [&mut alb, &mut k, &mut inf] {
        r["effectiveDateTime"] = json!(format!("{date}T09:00:00+09:00"));
    }
    inf.as_object_mut().unwrap().remove("meta");
    inf["code"] = json!({"coding": [{"system": INFECTION_CS, "code": "5F016141002305151", "display": "HBs抗原(S/CO)"}], "text": "HBs抗原"});
    inf["valueQuantity"] =
        json!({"value": 0.1, "unit": "S/CO", "system": "http://unitsofmeasure.org", "code": "1"});
    let mut entries = vec![
        json!({"fullUrl": "http://jpfhir.jp/fhir/eCS/Patient/Example-JP-Patient-eCS-MAKINO", "resource": t.patient}),
    ];
    for (i, r) in [cond, alg, alb, k, inf].into_iter().enumerate() {
        entries.push(
            json!({"fullUrl": format!("urn:uuid:00000000-0000-0000-0000-{i:012}"), "resource": r}),
        );
    }
    json!({"resourceType": "Bundle", "type": "collection", "entry": entries})
}

fn validator(shared: &Path, dir: &Path) -> Arc<tsunagi_validation::Validator> {
    use tsunagi_terminology::{MasterKind, import};
    let mdir = dir.join("masters");
    std::fs::create_dir_all(&mdir).unwrap();
    for (f, k) in [
        ("masters/drug-master-y.csv", MasterKind::Drug),
        ("masters/disease-master-b.csv", MasterKind::Disease),
        ("masters/modifier-master-z.csv", MasterKind::Modifier),
        (
            "codesets/jp-clins-1.5.2/CodeSystem-jp-clins-codesystem-JLAC10-corelabo-cs.json",
            MasterKind::Jlac10,
        ),
        (
            "codesets/jp-clins-1.5.2/CodeSystem-jp-clins-codesystem-JLAC10-infectionlabo-cs.json",
            MasterKind::Jlac10,
        ),
        (
            "codesets/jfagy/JFAGY_J9FN_20250401_R01.csv",
            MasterKind::Jfagy,
        ),
    ] {
        import(&shared.join(f), k, &mdir).unwrap();
    }
    let term = tsunagi_terminology::Terminology::open(&mdir).unwrap();
    let paths: Vec<PathBuf> = [
        "current/hl7.fhir.r4.core-4.0.1.tgz",
        "variants/jp-core.r4-1.1.2-url.tgz",
        "jp-clins.r4-1.5.2.tgz",
    ]
    .iter()
    .map(|p| shared.join("fhir-packages").join(p))
    .collect();
    Arc::new(tsunagi_validation::Validator::from_paths(&paths, Some(term)).unwrap())
}

fn pct(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(f64::total_cmp);
    tsunagi_server::latency::nearest_rank(v, p).unwrap_or(0.0)
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ")
}

fn operator() -> Principal {
    Principal::new(
        "operator",
        OrgKind::Operator,
        vec![],
        Role::Operator,
        Some("bench".into()),
        None,
        false,
    )
    .unwrap()
}

/// The bulk path: Patients and their five-information entries written straight
/// into the store (no profile validation), `batch` patients per transaction,
/// one `import` audit record per patient. Generation runs on a second thread.
fn load_background(
    store: &dyn Store,
    t: &Templates,
    insts: &[String],
    patients: usize,
    batch: usize,
) -> anyhow::Result<()> {
    let actor = operator();
    let wctx = WriteContext {
        org: Some(actor.org.clone()),
        user: actor.user.clone(),
    };
    let now = Utc::now();
    let started = Instant::now();
    type Batch = Vec<(String, Vec<(String, String, Value)>)>;
    let (tx, rx) = std::sync::mpsc::sync_channel::<Batch>(4);
    std::thread::scope(|scope| -> anyhow::Result<()> {
        scope.spawn(move || {
            let mut out: Batch = Vec::with_capacity(batch);
            for i in 0..patients {
                let pid = format!("p{i}");
                let inst = &insts[i % insts.len()];
                let b = bundle(t, inst, &pid, "2026-11-01");
                let mut rows = vec![(
                    "Patient".to_string(),
                    pid.clone(),
                    json!({"resourceType": "Patient", "id": pid}),
                )];
                for p in prepare_clins(b, inst, &pid, now).expect("background bundle") {
                    rows.push((p.rt, p.id, p.resource));
                }
                out.push((pid, rows));
                if out.len() >= batch && tx.send(std::mem::take(&mut out)).is_err() {
                    return;
                }
            }
            let _ = tx.send(out);
        });
        let mut done = 0usize;
        for b in rx {
            let mut txn = store.begin().map_err(|e| anyhow::anyhow!("{e}"))?;
            let mut records = Vec::with_capacity(b.len());
            for (pid, rows) in b {
                let mut refs = Vec::with_capacity(rows.len());
                for (rt, id, v) in rows {
                    let (s, _) = txn
                        .update(&rt, &id, v, None, &wctx)
                        .map_err(|e| anyhow::anyhow!("{e}"))?;
                    refs.push(format!("{rt}/{id}/_history/{}", s.version));
                }
                let mut rec = AuditRecord::new(
                    &actor,
                    Purpose::Operations,
                    "import",
                    uuid::Uuid::new_v4().to_string(),
                )
                .with_patient(Some(pid))
                .with_resources(refs);
                rec.reason = Some("benchmark background load, imported without validation".into());
                records.push(rec.to_json());
                done += 1;
            }
            txn.audit_append(&records)
                .map_err(|e| anyhow::anyhow!("{e}"))?;
            txn.commit().map_err(|e| anyhow::anyhow!("{e}"))?;
            if done % 100_000 < batch {
                eprintln!(
                    "  background: {done} patients in {:.0} s (load {})",
                    started.elapsed().as_secs_f64(),
                    loadavg()
                );
            }
        }
        Ok(())
    })?;
    println!(
        "background: {patients} patients, {} resources, bulk path in {:.0} s ({:.0} resources/s)",
        patients * 6,
        started.elapsed().as_secs_f64(),
        (patients * 6) as f64 / started.elapsed().as_secs_f64()
    );
    Ok(())
}

#[tokio::main(flavor = "multi_thread")]
async fn main() -> anyhow::Result<()> {
    let shared = PathBuf::from(arg("--shared", "../shared"));
    let dir = PathBuf::from(arg("--dir", "/tmp/sharing-bench"));
    let patients: usize = arg("--patients", "10000").parse()?;
    let register: usize = arg("--register", "5000").parse()?;
    let conc: usize = arg("--concurrency", "64").parse()?;
    let samples: usize = arg("--samples", "200").parse()?;
    let batch: usize = arg("--batch", "2000").parse()?;
    let keep = std::env::args().any(|a| a == "--keep");
    let build = if cfg!(debug_assertions) {
        "debug"
    } else {
        "release"
    };
    println!(
        "sharing_bench: build {build}, patients {patients}, register {register}, concurrency {conc}, load {}",
        loadavg()
    );
    let marker = dir.join(format!("background-{patients}"));
    let reuse = keep && marker.exists();
    if !reuse {
        let _ = std::fs::remove_dir_all(&dir);
    }
    std::fs::create_dir_all(&dir)?;
    let store: Arc<dyn Store> = Arc::new(tsunagi_store::sqlite::SqliteStore::open(
        &dir.join("tsunagi.db"),
    )?);
    let (sh, d2) = (shared.clone(), dir.clone());
    let v = tokio::task::spawn_blocking(move || validator(&sh, &d2)).await?;
    let t = Templates {
        patient: read(&shared, "Patient-Example-JP-Patient-eCS-MAKINO.json"),
        condition: read(&shared, "Condition-Example-JP-Condition-eCS-01.json"),
        allergy: read(
            &shared,
            "AllergyIntolerance-Example-JP-AllergyIntolerance-eCS-01.json",
        ),
        alb: read(&shared, "Observation-Example-JP-Obs-LabResult-eCS-Alb.json"),
        k: read(&shared, "Observation-Example-JP-Obs-LabResult-eCS-K.json"),
    };
    let t = Arc::new(t);
    let insts: Vec<String> = (0..10).map(institution).collect();
    if reuse {
        println!(
            "background: reusing {} ({patients} patients)",
            dir.display()
        );
    } else {
        let (st, t2, i2) = (store.clone(), t.clone(), insts.clone());
        tokio::task::spawn_blocking(move || load_background(&*st, &t2, &i2, patients, batch))
            .await??;
        std::fs::write(&marker, b"")?;
    }
    // the registration patients and the summary patient (setup, not timed)
    let run = uuid::Uuid::new_v4().simple().to_string()[..8].to_string();
    let baseline_n: usize = arg("--baseline", "500").parse()?;
    let reg_ids: Vec<String> = (0..register + baseline_n)
        .map(|i| format!("m{run}-{i}"))
        .collect();
    let st = store.clone();
    let ids2 = reg_ids.clone();
    tokio::task::spawn_blocking(move || {
        let mut all = ids2;
        all.push("target".into());
        for chunk in all.chunks(2000) {
            let mut tx = st.begin().unwrap();
            for id in chunk {
                tx.update(
                    "Patient",
                    id,
                    json!({"resourceType": "Patient", "id": id}),
                    None,
                    &WriteContext {
                        org: Some("operator".into()),
                        user: None,
                    },
                )
                .unwrap();
            }
            tx.commit().unwrap();
        }
    })
    .await?;
    let cfg = ServerConfig {
        data_dir: dir.clone(),
        ..ServerConfig::default()
    };
    let sharing = SharingService::new(Default::default());
    let state = tsunagi_server::Builder::new(cfg, store.clone())
        .validator(v)
        .service(Arc::new(sharing.clone()))
        .build()
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let ctxs: Vec<Ctx> = insts
        .iter()
        .map(|i| {
            Ctx::new(
                Principal::new(
                    i,
                    OrgKind::Hospital,
                    vec![],
                    Role::Doctor,
                    Some("bench".into()),
                    None,
                    true,
                )
                .unwrap(),
                None,
            )
        })
        .collect();
    let ctxs = Arc::new(ctxs);
    // warm-up (not timed): the validator compiles the profiles it meets on
    // first use; a running server has done so long before
    {
        let v2 = state.engine.validator.clone();
        let warm: Vec<Value> = (0..20)
            .map(|i| bundle(&t, &insts[i % 10], &format!("warm-{i}"), "2026-11-01"))
            .collect();
        tokio::task::spawn_blocking(move || {
            for b in &warm {
                tsunagi_server::validate::gate(&*v2, b).map_err(|e| anyhow::anyhow!("{e}"))?;
            }
            anyhow::Ok(())
        })
        .await??;
    }
    // registration: first `--baseline` Bundles one at a time (each its own
    // commit, as without group commit), then `--register` with `conc` in flight.
    // The request bodies are made before the clock starts and parsed inside it,
    // as a server parses what clients send.
    let baseline: usize = arg("--baseline", "500").parse()?;
    let (first, rest) = reg_ids.split_at(baseline.min(reg_ids.len()));
    for (ids, c) in [(first.to_vec(), 1), (rest.to_vec(), conc)] {
        if ids.is_empty() {
            continue;
        }
        let bodies: Vec<(usize, String, Vec<u8>)> = ids
            .iter()
            .enumerate()
            .map(|(i, id)| {
                let b = bundle(&t, &insts[i % 10], id, "2026-11-01");
                (i % 10, id.clone(), serde_json::to_vec(&b).unwrap())
            })
            .collect();
        let bodies = Arc::new(bodies);
        let load_before = loadavg();
        let started = Instant::now();
        let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let mut handles = Vec::new();
        for _ in 0..c {
            let (state, ctxs, bodies, next, shared) = (
                state.clone(),
                ctxs.clone(),
                bodies.clone(),
                next.clone(),
                sharing.shared.clone(),
            );
            handles.push(tokio::spawn(async move {
                let mut n = 0usize;
                loop {
                    let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    let Some((inst, id, body)) = bodies.get(i) else {
                        return n;
                    };
                    let b: Value = serde_json::from_slice(body).unwrap();
                    tsunagi_sharing::register::register_clins_bundle(
                        &state,
                        &shared,
                        &ctxs[*inst],
                        Utc::now(),
                        b,
                        Some(id.clone()),
                    )
                    .await
                    .unwrap_or_else(|e| panic!("{e}"));
                    n += 1;
                }
            }));
        }
        let mut done = 0;
        for h in handles {
            done += h.await?;
        }
        let secs = started.elapsed().as_secs_f64();
        println!(
            "registration: {done} bundles ({} resources) in {secs:.1} s = {:.0} bundles/s, {:.0} resources/s (concurrency {c}; load {load_before} before, {} after)",
            done * 5,
            done as f64 / secs,
            done as f64 * 5.0 / secs,
            loadavg()
        );
    }
    // the summary patient: 10 institutions x 60 months, registered concurrently
    // per institution (each institution's months in order)
    let started = Instant::now();
    let mut hs = Vec::new();
    for c in 0..10 {
        let (state, t, ctxs, insts, shared) = (
            state.clone(),
            t.clone(),
            ctxs.clone(),
            insts.clone(),
            sharing.shared.clone(),
        );
        hs.push(tokio::spawn(async move {
            for m in 0..60 {
                let date = format!("{}-{:02}-15", 2021 + m / 12, m % 12 + 1);
                let b = bundle2(&t, &insts[c], "target", &format!("target-{m}"), &date);
                tsunagi_sharing::register::register_clins_bundle(
                    &state,
                    &shared,
                    &ctxs[c],
                    Utc::now(),
                    b,
                    Some("target".into()),
                )
                .await
                .map_err(|e| anyhow::anyhow!("{e}"))?;
            }
            anyhow::Ok(())
        }));
    }
    for h in hs {
        h.await??;
    }
    println!(
        "summary patient: 600 bundles (20 current entries replaced monthly + 1800 results) in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    let me = Ctx::new(
        Principal::new(
            PATIENT_ORG,
            OrgKind::Patient,
            vec![],
            Role::Patient,
            None,
            Some("target".into()),
            false,
        )
        .unwrap(),
        None,
    );
    let rules = tsunagi_sharing::retention::Rules::default();
    let mut lat = Vec::new();
    let mut size = 0;
    let load_before = loadavg();
    for i in 0..samples + 5 {
        let s = Instant::now();
        let b = tsunagi_sharing::summary::build(&state, &me, "target", Utc::now(), &rules)
            .await
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        if i >= 5 {
            lat.push(s.elapsed().as_secs_f64() * 1000.0);
        }
        size = b["entry"].as_array().map(|a| a.len()).unwrap_or(0);
    }
    println!(
        "$summary: {samples} calls, {size} entries each, p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms (load {load_before} before, {} after)",
        pct(&mut lat, 0.5),
        pct(&mut lat, 0.99),
        lat.iter().cloned().fold(0.0, f64::max),
        loadavg()
    );
    println!(
        "database {} MB; load average {}",
        store.size_bytes()? / 1_000_000,
        loadavg()
    );
    Ok(())
}
