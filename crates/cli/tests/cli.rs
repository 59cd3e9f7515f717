//! The `tsunagi` binary, run as an operator would: `demo`, `token issue`,
//! `import` and `audit verify`, each against its own temporary data directory.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use serde_json::Value;
use tsunagi_policy::ServerKeys;
use tsunagi_policy::identity::{OrgKind, Role};
use tsunagi_policy::ids::{
    validate_insurer_number, validate_local_government_code, validate_medical_institution_code,
};
use tsunagi_store::Store;

/// The binary, with no configuration leaking in from the environment.
fn tsunagi() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_tsunagi"));
    for var in [
        "TSUNAGI_DATA_DIR",
        "TSUNAGI_DATABASE",
        "TSUNAGI_CONFIG",
        "TSUNAGI_LISTEN",
        "TSUNAGI_BASE_URL",
        "TSUNAGI_MAX_BODY_BYTES",
        "TSUNAGI_LOG_FORMAT",
    ] {
        c.env_remove(var);
    }
    c.env("RUST_LOG", "warn");
    c
}

fn run(args: &[&str]) -> Output {
    tsunagi().args(args).output().expect("run tsunagi")
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Kills the child when dropped (a failing assertion must not leave a server running).
struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts `tsunagi demo` in `dir` on a free port and waits for its listening line.
/// Returns the child and the server's root URL.
fn start_demo(dir: &Path) -> (Running, String) {
    let child = tsunagi()
        .args(["demo", "--data-dir"])
        .arg(dir)
        .args(["--listen", "127.0.0.1:0"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn tsunagi demo");
    let mut running = Running(child);
    let err = running.0.stderr.take().expect("stderr");
    let (tx, rx) = mpsc::channel::<String>();
    std::thread::spawn(move || {
        for line in BufReader::new(err).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let mut seen = Vec::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        match rx.recv_timeout(left) {
            Ok(line) => {
                if let Some(rest) = line.strip_prefix("tsunagi listening on ") {
                    let url = rest.split_whitespace().next().expect("url").to_string();
                    return (running, url);
                }
                seen.push(line);
            }
            Err(_) => panic!(
                "tsunagi demo did not report listening; exit {:?}; stderr:\n{}",
                running.0.try_wait(),
                seen.join("\n")
            ),
        }
    }
}

/// A data directory holding the demo dataset (the demo server started and stopped).
fn demo_dir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("tempdir");
    let (server, _) = start_demo(dir.path());
    drop(server);
    dir
}

fn http_get(url: &str) -> (u16, String) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let r = reqwest::Client::new()
            .get(url)
            .timeout(Duration::from_secs(10))
            .send()
            .await
            .expect("GET");
        let status = r.status().as_u16();
        (status, r.text().await.unwrap_or_default())
    })
}

#[test]
fn demo_writes_listing_and_serves() {
    let dir = tempfile::tempdir().unwrap();
    let (server, root) = start_demo(dir.path());
    assert_eq!(
        http_get(&format!("{root}/healthz")),
        (200, "ok".to_string())
    );
    let (status, body) = http_get(&format!("{root}/fhir/metadata"));
    assert_eq!(status, 200);
    assert!(body.contains("CapabilityStatement"));
    drop(server);

    let listing: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("demo.json")).unwrap())
            .expect("demo.json is JSON");
    let orgs = listing["organisations"].as_array().expect("organisations");
    assert!(orgs.len() >= 7, "{} organisations", orgs.len());
    let kinds: Vec<&str> = orgs.iter().filter_map(|o| o["kind"].as_str()).collect();
    for k in [
        "hospital",
        "clinic",
        "dental-clinic",
        "pharmacy",
        "insurer",
        "municipality",
        "operator",
    ] {
        assert!(kinds.contains(&k), "no {k} among {kinds:?}");
    }
    for o in orgs {
        let code = o["code"].as_str().expect("code");
        let kind: OrgKind = o["kind"].as_str().unwrap().parse().expect("known kind");
        let valid = match kind {
            OrgKind::Hospital | OrgKind::Clinic | OrgKind::DentalClinic | OrgKind::Pharmacy => {
                validate_medical_institution_code(code).map_err(|e| e.to_string())
            }
            OrgKind::Insurer => validate_insurer_number(code).map_err(|e| e.to_string()),
            OrgKind::Municipality => {
                validate_local_government_code(code).map_err(|e| e.to_string())
            }
            _ => Ok(()),
        };
        assert!(valid.is_ok(), "{o}: {valid:?}");
    }
    let patients = listing["patients"].as_array().expect("patients");
    assert!(patients.len() >= 20, "{} patients", patients.len());
    for p in patients {
        assert!(p["id"].is_string() && p["name"].is_string(), "{p}");
        let insurer = p["insurance"]["insurerNumber"].as_str().expect("insurer");
        assert!(validate_insurer_number(insurer).is_ok(), "{p}");
    }

    // the dataset is in the store, and a second run keeps it (one version each)
    let (server, _) = start_demo(dir.path());
    drop(server);
    let store = tsunagi_store::SqliteStore::open(&dir.path().join("tsunagi.db")).unwrap();
    for p in patients {
        let id = p["id"].as_str().unwrap();
        let stored = store.read("Patient", id).unwrap().expect("patient stored");
        assert_eq!(stored.version, 1, "{id} rewritten by the second run");
    }
}

#[test]
fn token_issue() {
    let dir = demo_dir();
    let listing: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("demo.json")).unwrap())
            .unwrap();
    let code = |kind: &str| {
        listing["organisations"]
            .as_array()
            .unwrap()
            .iter()
            .find(|o| o["kind"] == kind)
            .and_then(|o| o["code"].as_str())
            .unwrap_or_else(|| panic!("no {kind} in the demo"))
            .to_string()
    };
    let d = dir.path().to_str().unwrap();
    let hospital = code("hospital");

    let o = run(&[
        "token",
        "issue",
        "--data-dir",
        d,
        "--org",
        &hospital,
        "--role",
        "doctor",
        "--user",
        "dr-1",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let token = stdout(&o).trim().to_string();
    assert_eq!(token.split('.').count(), 3, "not a JWT: {token}");
    let keys = ServerKeys::load_or_create(dir.path()).unwrap();
    let p = keys.verify(&token, chrono::Utc::now()).expect("verifies");
    assert_eq!(p.org, hospital);
    assert_eq!(p.org_kind, OrgKind::Hospital);
    assert_eq!(p.role, Role::Doctor);
    assert_eq!(p.user.as_deref(), Some("dr-1"));
    assert!(p.has_flag("emergency-designated"), "{p:?}");

    // a patient token for a demo patient
    let pid = listing["patients"][0]["id"].as_str().unwrap();
    let o = run(&[
        "token",
        "issue",
        "--data-dir",
        d,
        "--org",
        "patient",
        "--role",
        "patient",
        "--patient",
        pid,
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let p = keys.verify(stdout(&o).trim(), chrono::Utc::now()).unwrap();
    assert_eq!(p.patient.as_deref(), Some(pid));

    // refused: an unknown organisation, a role the kind does not allow, a missing patient
    let o = run(&[
        "token",
        "issue",
        "--data-dir",
        d,
        "--org",
        "9999999999",
        "--role",
        "doctor",
    ]);
    assert!(!o.status.success());
    assert!(stdout(&o).trim().is_empty(), "printed a token anyway");
    assert!(stderr(&o).contains("9999999999"), "{}", stderr(&o));
    assert!(stderr(&o).contains("not registered"), "{}", stderr(&o));

    let pharmacy = code("pharmacy");
    let o = run(&[
        "token",
        "issue",
        "--data-dir",
        d,
        "--org",
        &pharmacy,
        "--role",
        "doctor",
    ]);
    assert!(!o.status.success());
    assert!(stdout(&o).trim().is_empty());
    assert!(stderr(&o).contains("doctor"), "{}", stderr(&o));

    let o = run(&[
        "token",
        "issue",
        "--data-dir",
        d,
        "--org",
        "patient",
        "--role",
        "patient",
        "--patient",
        "no-such-patient",
    ]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("no-such-patient"), "{}", stderr(&o));

    let o = run(&[
        "token",
        "issue",
        "--data-dir",
        d,
        "--org",
        &hospital,
        "--role",
        "surgeon",
    ]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("surgeon"), "{}", stderr(&o));
}

const NDJSON: &str = concat!(
    r#"{"resourceType":"Patient","id":"imp-1","name":[{"family":"輸入","given":["花子"]}],"birthDate":"1990-01-01"}"#,
    "\n",
    r#"{"resourceType":"Patient","id":"imp-2","name":[{"family":"壊れ"}]"#,
    "\n",
    "\n",
    r#"{"resourceType":"Observation","id":"imp-obs","status":"final","code":{"text":"体重"},"subject":{"reference":"Patient/imp-1"}}"#,
    "\n",
);

#[test]
fn import_reports_bad_lines() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("in.ndjson");
    std::fs::write(&file, NDJSON).unwrap();
    let data = dir.path().join("data");
    let o = run(&[
        "import",
        "--data-dir",
        data.to_str().unwrap(),
        file.to_str().unwrap(),
    ]);
    assert_eq!(o.status.code(), Some(1), "{}\n{}", stdout(&o), stderr(&o));
    assert!(stderr(&o).contains("line 2:"), "{}", stderr(&o));
    assert!(!stderr(&o).contains("line 4:"), "{}", stderr(&o));
    assert!(
        stdout(&o).contains("imported 2 resources"),
        "{}",
        stdout(&o)
    );
    assert!(stdout(&o).contains("1 line(s) failed"), "{}", stdout(&o));

    let store = tsunagi_store::SqliteStore::open(&data.join("tsunagi.db")).unwrap();
    assert!(store.read("Patient", "imp-1").unwrap().is_some());
    assert!(store.read("Observation", "imp-obs").unwrap().is_some());
    assert!(store.read("Patient", "imp-2").unwrap().is_none());
    // the import is audited
    let entries = store.audit_scan(0, 100).unwrap();
    assert!(
        entries
            .iter()
            .any(|e| e.record["action"] == "import" && e.record["patient"] == "imp-1"),
        "{entries:?}"
    );
}

#[test]
fn audit_verify_detects_tampering() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("in.ndjson");
    let lines: String = (1..=3)
        .map(|i| {
            format!(
                "{{\"resourceType\":\"Patient\",\"id\":\"av-{i}\",\"name\":[{{\"family\":\"監査{i}\"}}]}}\n"
            )
        })
        .collect();
    std::fs::write(&file, lines).unwrap();
    let data = dir.path().join("data");
    let d = data.to_str().unwrap();
    // one record per batch of one: three records
    let o = run(&[
        "import",
        "--data-dir",
        d,
        "--batch",
        "1",
        file.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}\n{}", stdout(&o), stderr(&o));

    let o = run(&["audit", "verify", "--data-dir", d]);
    assert_eq!(o.status.code(), Some(0), "{}\n{}", stdout(&o), stderr(&o));
    assert!(stdout(&o).contains("audit trail OK"), "{}", stdout(&o));
    assert!(stdout(&o).contains("checked 3 record(s)"), "{}", stdout(&o));

    // an auditor edits the database behind the server's back
    {
        let db = rusqlite::Connection::open(data.join("tsunagi.db")).unwrap();
        let n = db
            .execute(
                "UPDATE audit_log SET record = '{\"action\":\"import\",\"patient\":\"someone-else\"}' WHERE seq = 2",
                [],
            )
            .unwrap();
        assert_eq!(n, 1);
    }
    let o = run(&["audit", "verify", "--data-dir", d]);
    assert_eq!(o.status.code(), Some(1), "{}\n{}", stdout(&o), stderr(&o));
    let out = stdout(&o);
    assert!(out.contains("seq 2: altered"), "{out}");
    assert!(!out.contains("seq 1:") && !out.contains("seq 3:"), "{out}");
    assert!(out.contains("audit trail FAILED"), "{out}");
}

/// `tsunagi serve` on PostgreSQL starts, answers, and exits 0 on SIGTERM.
/// (The synchronous PostgreSQL client must not be opened or dropped on the
/// server's async runtime: it blocks on a runtime of its own.)
#[test]
fn serve_on_postgres_starts_and_stops() {
    let url = match std::env::var("TSUNAGI_TEST_PG") {
        Ok(u) if !u.trim().is_empty() => u,
        _ => {
            use std::io::Write;
            let _ = writeln!(
                std::io::stderr(),
                "SKIPPED: TSUNAGI_TEST_PG is unset; serve_on_postgres_starts_and_stops not run"
            );
            return;
        }
    };
    let schema = format!("tsunagi_cli_{}", std::process::id());
    /// Drops the test schema however the test ends.
    struct TempSchema(tsunagi_store::postgres::PgStore, String);
    impl Drop for TempSchema {
        fn drop(&mut self) {
            let _ = self
                .0
                .raw_execute(&format!("DROP SCHEMA IF EXISTS {} CASCADE", self.1));
        }
    }
    let _schema_guard = TempSchema(
        tsunagi_store::postgres::PgStore::connect_in_schema(&url, &schema, 1)
            .expect("connect to TSUNAGI_TEST_PG"),
        schema.clone(),
    );
    let option = format!("-c search_path={schema}");
    let database = if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        let sep = if url.contains('?') { '&' } else { '?' };
        format!(
            "{url}{sep}options={}",
            option.replace(' ', "%20").replace('=', "%3D")
        )
    } else {
        format!("{url} options='{option}'")
    };
    let dir = tempfile::tempdir().unwrap();
    let mut child = tsunagi()
        .args(["serve", "--data-dir"])
        .arg(dir.path())
        .args(["--listen", "127.0.0.1:0", "--database", &database])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn tsunagi serve");
    let err = child.stderr.take().unwrap();
    let (tx, rx) = mpsc::channel::<String>();
    std::thread::spawn(move || {
        for line in BufReader::new(err).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let mut running = Running(child);
    let mut seen = Vec::new();
    let root = loop {
        match rx.recv_timeout(Duration::from_secs(60)) {
            Ok(line) => {
                if let Some(rest) = line.strip_prefix("tsunagi listening on ") {
                    break rest.split_whitespace().next().unwrap().to_string();
                }
                seen.push(line);
            }
            Err(_) => panic!(
                "tsunagi serve did not start on PostgreSQL ({:?}):\n{}",
                running.0.try_wait(),
                seen.join("\n")
            ),
        }
    };
    assert_eq!(http_get(&format!("{root}/readyz")), (200, "ready".into()));
    let pid = running.0.id().to_string();
    assert!(
        Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap()
            .success()
    );
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(s) = running.0.try_wait().unwrap() {
            break s;
        }
        assert!(std::time::Instant::now() < deadline, "did not stop");
        std::thread::sleep(Duration::from_millis(50));
    };
    let rest: Vec<String> = rx.try_iter().collect();
    assert_eq!(status.code(), Some(0), "{}", rest.join("\n"));
}

fn http_get_bearer(url: &str, token: &str) -> (u16, String) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let r = reqwest::Client::new()
            .get(url)
            .bearer_auth(token)
            .timeout(Duration::from_secs(10))
            .send()
            .await
            .expect("GET");
        let status = r.status().as_u16();
        (status, r.text().await.unwrap_or_default())
    })
}

/// Masters imported with `tsunagi masters import` answer `CodeSystem/$lookup` and
/// `$validate-code` on the running server.
#[test]
fn imported_masters_answer_lookup_and_validate_code() {
    let master = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../../shared/masters/drug-master-y.csv"
    );
    assert!(
        Path::new(master).exists(),
        "reference drug master missing: {master}"
    );
    let dir = demo_dir();
    let o = tsunagi()
        .args(["masters", "import", master, "--kind", "drug", "--data-dir"])
        .arg(dir.path())
        .output()
        .expect("run masters import");
    assert!(o.status.success(), "{}", stderr(&o));
    let (_server, url) = start_demo(dir.path());
    let o = tsunagi()
        .args([
            "token",
            "issue",
            "--org",
            "1310123458",
            "--role",
            "doctor",
            "--data-dir",
        ])
        .arg(dir.path())
        .output()
        .expect("token");
    let token = stdout(&o).trim().to_string();
    let drug = "urn:oid:1.2.392.100495.20.2.74";
    // ガスター散２％ (レセプト電算コード 610406079) is in the 2024-03 master
    let (status, body) = http_get_bearer(
        &format!("{url}/fhir/CodeSystem/$lookup?system={drug}&code=610406079"),
        &token,
    );
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("ガスター散"), "{body}");
    let (status, body) = http_get_bearer(
        &format!("{url}/fhir/CodeSystem/$validate-code?system={drug}&code=999999999"),
        &token,
    );
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("\"valueBoolean\":false"), "{body}");
    let (status, body) = http_get_bearer(
        &format!("{url}/fhir/CodeSystem/$lookup?system={drug}&code=999999999"),
        &token,
    );
    assert_eq!(status, 404, "{body}");
    let (status, _) = http_get_bearer(
        &format!("{url}/fhir/CodeSystem/$lookup?system=http://example.org/none&code=1"),
        &token,
    );
    assert_eq!(status, 404);
}
