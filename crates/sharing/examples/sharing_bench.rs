//! Benchmark of the sharing service (not a test): registration throughput of
//! five-information Bundles (validation against the JP-CLINS packages and the
//! masters included, written through the engine with policy and audit), then
//! `Patient/$summary` latency for one patient with 5 years of monthly data from
//! 10 institutions. In-process (no HTTP), embedded SQLite.
//!
//! ```sh
//! cargo run --release -p tsunagi-sharing --example sharing_bench -- \
//!     --shared ../shared --dir /tmp/sharing-bench --patients 20000 --concurrency 4
//! ```
//! The resources are the official JP-CLINS examples (Condition, AllergyIntolerance,
//! two lab Observations) plus an infection Observation, re-identified per patient.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use chrono::Utc;
use serde_json::{Value, json};
use tsunagi_policy::identity::{OrgKind, PATIENT_ORG, Principal, Role};
use tsunagi_server::{Ctx, ServerConfig};
use tsunagi_sharing::SharingService;
use tsunagi_sharing::kinds::{INFECTION_CS, INSTITUTION_EXT};
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

#[tokio::main(flavor = "multi_thread")]
async fn main() -> anyhow::Result<()> {
    let shared = PathBuf::from(arg("--shared", "../shared"));
    let dir = PathBuf::from(arg("--dir", "/tmp/sharing-bench"));
    let patients: usize = arg("--patients", "10000").parse()?;
    let conc: usize = arg("--concurrency", "4").parse()?;
    let samples: usize = arg("--samples", "200").parse()?;
    let _ = std::fs::remove_dir_all(&dir);
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
    // patients (setup, not timed)
    let st = store.clone();
    tokio::task::spawn_blocking(move || {
        for chunk in (0..=patients).collect::<Vec<_>>().chunks(2000) {
            let mut tx = st.begin().unwrap();
            for i in chunk {
                let id = if *i == patients {
                    "target".to_string()
                } else {
                    format!("p{i}")
                };
                tx.update(
                    "Patient",
                    &id,
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
    let insts: Vec<String> = (0..10).map(institution).collect();
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
    // registration: one bundle per patient, `conc` concurrent registrations
    let started = Instant::now();
    let mut handles = Vec::new();
    for w in 0..conc {
        let (state, t, ctxs, insts) = (state.clone(), t.clone(), ctxs.clone(), insts.clone());
        handles.push(tokio::spawn(async move {
            let mut n = 0usize;
            let mut i = w;
            while i < patients {
                let c = i % 10;
                let b = bundle(&t, &insts[c], &format!("p{i}"), "2026-11-01");
                tsunagi_sharing::register::register_clins_bundle(
                    &state,
                    &ctxs[c],
                    Utc::now(),
                    b,
                    Some(format!("p{i}")),
                )
                .await
                .unwrap_or_else(|e| panic!("{e}"));
                n += 1;
                i += conc;
            }
            n
        }));
    }
    let mut done = 0;
    for h in handles {
        done += h.await?;
    }
    let secs = started.elapsed().as_secs_f64();
    println!(
        "registration: {done} bundles ({} resources) in {secs:.1} s = {:.0} bundles/s, {:.0} resources/s (concurrency {conc})",
        done * 5,
        done as f64 / secs,
        done as f64 * 5.0 / secs
    );
    // the summary patient: 10 institutions x 60 months
    let started = Instant::now();
    for c in 0..10 {
        for m in 0..60 {
            let date = format!("{}-{:02}-15", 2021 + m / 12, m % 12 + 1);
            let b = bundle2(&t, &insts[c], "target", &format!("target-{m}"), &date);
            tsunagi_sharing::register::register_clins_bundle(
                &state,
                &ctxs[c],
                Utc::now(),
                b,
                Some("target".into()),
            )
            .await
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        }
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
        "$summary: {samples} calls, {size} entries each, p50 {:.1} ms, p99 {:.1} ms",
        pct(&mut lat, 0.5),
        pct(&mut lat, 0.99)
    );
    println!(
        "database {} MB; load average {}",
        store.size_bytes()? / 1_000_000,
        std::fs::read_to_string("/proc/loadavg")
            .unwrap_or_default()
            .trim()
    );
    Ok(())
}
