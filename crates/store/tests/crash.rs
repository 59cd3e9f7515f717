//! kill -9 durability of the SQLite backend.
//!
//! The test re-executes its own binary as a child (switched by an environment
//! variable) that commits transactions of several resources in a loop and
//! prints each transaction's number after `commit` returns. The parent kills
//! it with SIGKILL mid-stream, reopens the database and checks that every
//! acknowledged transaction is fully there and none is there in part. After each
//! transaction the child also appends a stand-alone audit record (as a read does),
//! which goes to the audit file: the chain through both files must survive too.

use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use serde_json::json;
use tsunagi_fhir::search::{Criterion, SearchQuery, TokenMatch};
use tsunagi_store::sqlite::SqliteStore;
use tsunagi_store::{Scope, Store, WriteContext, audit};

const CHILD_ENV: &str = "TSUNAGI_CRASH_CHILD_DB";
const TEST_NAME: &str = "kill9_keeps_every_acknowledged_transaction";
/// Resources per transaction.
const PER_TX: usize = 5;

fn child(path: &str) -> ! {
    let store = SqliteStore::open(std::path::Path::new(path)).expect("child open");
    let ctx = WriteContext {
        org: Some("A".into()),
        user: None,
    };
    let mut out = std::io::stdout();
    for n in 0.. {
        let mut tx = store.begin().expect("begin");
        for k in 0..PER_TX {
            let id = format!("t{n}-{k}");
            let body = json!({"resourceType": "Patient", "identifier": [{"system": "urn:crash", "value": id}]});
            tx.create("Patient", &id, body, &ctx).expect("create");
        }
        tx.audit_append(&[json!({"tx": n})]).expect("audit");
        tx.commit().expect("commit");
        store
            .audit_append(&[json!({"read": n})])
            .expect("stand-alone audit");
        // acknowledged: only now may the parent count on it
        writeln!(out, "COMMITTED {n}").expect("stdout");
        out.flush().expect("flush");
    }
    unreachable!()
}

#[test]
fn kill9_keeps_every_acknowledged_transaction() {
    if let Ok(path) = std::env::var(CHILD_ENV) {
        child(&path);
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("crash.db");
    let exe = std::env::current_exe().unwrap();
    let mut proc = Command::new(exe)
        .args(["--exact", TEST_NAME, "--nocapture", "--test-threads=1"])
        .env(CHILD_ENV, &path)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = proc.stdout.take().unwrap();
    let seen = Arc::new(AtomicUsize::new(0));
    let seen_w = seen.clone();
    let reader = std::thread::spawn(move || {
        let mut acked = Vec::new();
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            // libtest may print its own text on the same line before ours
            if let Some(pos) = line.find("COMMITTED ") {
                acked.push(line[pos + 10..].trim().parse::<usize>().unwrap());
                seen_w.store(acked.len(), Ordering::SeqCst);
            }
        }
        acked
    });
    // let the child get going (slow CI machines included), then kill it mid-stream
    let started = Instant::now();
    while seen.load(Ordering::SeqCst) < 20 && started.elapsed() < Duration::from_secs(30) {
        std::thread::sleep(Duration::from_millis(10));
    }
    std::thread::sleep(Duration::from_millis(700));
    proc.kill().unwrap(); // SIGKILL
    proc.wait().unwrap();
    let acked = reader.join().unwrap();
    assert!(
        acked.len() >= 3,
        "the child committed too little to test anything: {acked:?}"
    );
    let last = *acked.last().unwrap();
    assert!(
        acked.iter().enumerate().all(|(i, n)| i == *n),
        "acknowledgements are not consecutive from 0 (first {:?}, {} of them, last {last})",
        acked.first(),
        acked.len()
    );

    let store = SqliteStore::open(&path).unwrap();
    let present = |n: usize| {
        (0..PER_TX)
            .filter(|k| {
                store
                    .read("Patient", &format!("t{n}-{k}"))
                    .unwrap()
                    .is_some()
            })
            .count()
    };
    for n in 0..=last {
        assert_eq!(
            present(n),
            PER_TX,
            "acknowledged transaction {n} is incomplete"
        );
    }
    // the transaction in flight at the kill (and anything after) is all or nothing
    for n in last + 1..last + 4 {
        let p = present(n);
        assert!(
            p == 0 || p == PER_TX,
            "transaction {n} is partially present ({p}/{PER_TX})"
        );
    }
    // indexes and audit log came through consistently too
    let q = SearchQuery::new("Patient").with(
        "identifier",
        Criterion::Token {
            values: vec![TokenMatch {
                system: Some(Some("urn:crash".into())),
                code: Some(format!("t{last}-0")),
            }],
            negate: false,
        },
    );
    assert_eq!(store.search(&q, &Scope::Unrestricted).unwrap().total, 1);
    let report = audit::verify_chain(audit::scan_all(&store));
    assert!(report.ok(), "{report:?}");
    assert!(
        report.checked as usize >= 2 * (last + 1),
        "every acknowledged transaction's and read's audit entry is there ({} for {} acknowledged)",
        report.checked,
        last + 1
    );
}
