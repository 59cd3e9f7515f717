//! The audit index file and the thread that fills it.
//!
//! The audit file's records are looked up by patient (a patient's own access
//! history), organisation, user and time (auditors). Kept as indexes of the audit
//! file itself, each read's group commit wrote a page of each to the log: a random
//! leaf of the patient index per record, and the hot leaves of the others per
//! commit; measured on 100,000 patients, that was most of a read's audit commit
//! (docs/BENCHMARKS.md, "Session 12"). Here the entries are added by one thread, in
//! batches sorted by key, in a file of its own, so the commits of reads never wait
//! for them and a batch writes each page it touches once.
//!
//! Invariant: each `audit_<key>` table holds an entry for every record of the
//! audit file with `seq <= audit_indexed.upto` whose key is set, and `upto` only
//! moves in the transaction that added those entries. Queries take records after
//! `upto` from the audit file itself, so a record is found from the moment its
//! append returns.

use std::path::Path;
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use rusqlite::{Connection, params};
use tsunagi_fhir::{FhirError, FhirResult};

use super::{
    BUSY_TIMEOUT_MS, INDEX_BATCH, INDEX_DELAY, configure, db_err, migrate_by_user_version,
};
use crate::schema;

/// Page cache of the indexer's connection, in KiB: the upper levels and the
/// recently touched leaves of the indexes.
const INDEXER_CACHE_KIB: u32 = 32_768;
/// Pause after a failed pass (e.g. another process's indexer holding the file).
const RETRY_AFTER: Duration = Duration::from_secs(1);

/// Owns the indexer thread; stops and joins it when dropped.
pub(super) struct AuditIndexer {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

struct Shared {
    conn: Mutex<Connection>,
    state: Mutex<State>,
    wake: Condvar,
}

#[derive(Default)]
struct State {
    /// Records may have been appended since the last pass.
    pending: bool,
    stop: bool,
}

impl AuditIndexer {
    /// Opens (creating or upgrading) the index file at `index`, attaches the audit
    /// file `audit` to read from, and starts the thread, which first indexes
    /// whatever the audit file holds beyond `upto`.
    pub(super) fn start(index: &Path, audit: &Path) -> FhirResult<AuditIndexer> {
        let c = Connection::open(index).map_err(db_err)?;
        // NORMAL: a crash may lose the last batches, but each batch and its `upto`
        // are lost together, and the records are still in the audit file.
        c.execute_batch(&format!(
            "PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}; PRAGMA synchronous = NORMAL; \
             PRAGMA temp_store = MEMORY; PRAGMA cache_size = -{INDEXER_CACHE_KIB}; \
             PRAGMA wal_autocheckpoint = 4000;"
        ))
        .map_err(db_err)?;
        configure(&c)?;
        migrate_by_user_version(
            &c,
            "main",
            schema::SQLITE_AUDIT_INDEX_FILE,
            "audit index file",
        )?;
        let name = audit
            .to_str()
            .ok_or_else(|| FhirError::internal("the audit file's path is not UTF-8"))?;
        c.execute("ATTACH DATABASE ?1 AS audit", [name])
            .map_err(db_err)?;
        rebuild_if_ahead(&c)?;
        let shared = Arc::new(Shared {
            conn: Mutex::new(c),
            state: Mutex::new(State {
                pending: true,
                stop: false,
            }),
            wake: Condvar::new(),
        });
        let s = shared.clone();
        let thread = std::thread::Builder::new()
            .name("audit-indexer".into())
            .spawn(move || run(&s))
            .map_err(|e| FhirError::internal(format!("could not start the audit indexer: {e}")))?;
        Ok(AuditIndexer {
            shared,
            thread: Some(thread),
        })
    }

    /// Records were appended to the audit file.
    pub(super) fn notify(&self) {
        let mut st = lock(&self.shared.state);
        if !st.pending {
            st.pending = true;
            self.shared.wake.notify_one();
        }
    }

    /// Indexes every record the audit file holds now, on the caller's thread.
    pub(super) fn catch_up(&self) -> FhirResult<()> {
        let c = lock(&self.shared.conn);
        while pass(&c)? == INDEX_BATCH {}
        Ok(())
    }
}

impl Drop for AuditIndexer {
    fn drop(&mut self) {
        lock(&self.shared.state).stop = true;
        self.shared.wake.notify_one();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn run(shared: &Shared) {
    loop {
        {
            let mut st = lock(&shared.state);
            while !st.pending && !st.stop {
                st = shared.wake.wait(st).unwrap_or_else(|p| p.into_inner());
            }
            if st.stop {
                return;
            }
            // let the batch grow; a stop still ends the wait
            st = shared
                .wake
                .wait_timeout_while(st, INDEX_DELAY, |s| !s.stop)
                .unwrap_or_else(|p| p.into_inner())
                .0;
            if st.stop {
                return;
            }
            st.pending = false;
        }
        let c = lock(&shared.conn);
        loop {
            match pass(&c) {
                Ok(n) if n == INDEX_BATCH && !lock(&shared.state).stop => {}
                Ok(_) => break,
                Err(e) => {
                    // db_err logged the cause
                    tracing::warn!(status = e.status, "an audit index pass failed; retrying");
                    drop(c);
                    lock(&shared.state).pending = true;
                    std::thread::sleep(RETRY_AFTER);
                    break;
                }
            }
        }
    }
}

/// One statement per index table, for the records in (`?1`, `?2`], in key order
/// so that neighbouring entries share the leaves they fill.
const INSERTS: [&str; 4] = [
    "INSERT OR IGNORE INTO main.audit_patient (patient, seq) SELECT patient, seq \
     FROM audit.audit_log WHERE seq > ?1 AND seq <= ?2 AND patient IS NOT NULL ORDER BY 1, 2",
    "INSERT OR IGNORE INTO main.audit_org (org, seq) SELECT org, seq \
     FROM audit.audit_log WHERE seq > ?1 AND seq <= ?2 AND org IS NOT NULL ORDER BY 1, 2",
    "INSERT OR IGNORE INTO main.audit_usr (usr, seq) SELECT usr, seq \
     FROM audit.audit_log WHERE seq > ?1 AND seq <= ?2 AND usr IS NOT NULL ORDER BY 1, 2",
    "INSERT OR IGNORE INTO main.audit_recorded (recorded, seq) SELECT recorded, seq \
     FROM audit.audit_log WHERE seq > ?1 AND seq <= ?2 ORDER BY 1, 2",
];

/// Adds the next records after `upto` (at most [`INDEX_BATCH`]) to the index in
/// one transaction; returns how many records it covered.
fn pass(c: &Connection) -> FhirResult<i64> {
    // deferred: `BEGIN IMMEDIATE` would also take the audit file's write lock,
    // and the reads' audit commits would wait for this batch
    c.execute_batch("BEGIN").map_err(db_err)?;
    let result = (|| {
        let upto: i64 = c
            .prepare_cached("SELECT upto FROM main.audit_indexed WHERE id = 1")
            .and_then(|mut s| s.query_row([], |r| r.get(0)))
            .map_err(db_err)?;
        let (count, last): (i64, Option<i64>) = c
            .prepare_cached(
                "SELECT count(*), max(seq) FROM \
                 (SELECT seq FROM audit.audit_log WHERE seq > ?1 ORDER BY seq LIMIT ?2)",
            )
            .and_then(|mut s| {
                s.query_row(params![upto, INDEX_BATCH], |r| Ok((r.get(0)?, r.get(1)?)))
            })
            .map_err(db_err)?;
        let Some(last) = last else {
            return Ok(0);
        };
        for insert in INSERTS {
            c.prepare_cached(insert)
                .and_then(|mut s| s.execute(params![upto, last]))
                .map_err(db_err)?;
        }
        c.prepare_cached("UPDATE main.audit_indexed SET upto = ?1 WHERE id = 1")
            .and_then(|mut s| s.execute([last]))
            .map_err(db_err)?;
        Ok(count)
    })();
    match result {
        Ok(n) => {
            if let Err(e) = c.execute_batch("COMMIT") {
                let _ = c.execute_batch("ROLLBACK");
                return Err(db_err(e));
            }
            Ok(n)
        }
        Err(e) => {
            let _ = c.execute_batch("ROLLBACK");
            Err(e)
        }
    }
}

/// An index that claims records the audit file does not have (the audit file was
/// restored from an older backup than the index file) is emptied and rebuilt.
fn rebuild_if_ahead(c: &Connection) -> FhirResult<()> {
    let (upto, max): (i64, i64) = c
        .query_row(
            "SELECT (SELECT upto FROM main.audit_indexed WHERE id = 1), \
             (SELECT COALESCE(MAX(seq), 0) FROM audit.audit_log)",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .map_err(db_err)?;
    if upto > max {
        tracing::warn!(
            upto,
            max,
            "the audit index file covers records the audit file does not have; rebuilding it"
        );
        c.execute_batch(
            "BEGIN; DELETE FROM main.audit_patient; DELETE FROM main.audit_org; \
             DELETE FROM main.audit_usr; DELETE FROM main.audit_recorded; \
             UPDATE main.audit_indexed SET upto = 0 WHERE id = 1; COMMIT;",
        )
        .map_err(db_err)?;
    }
    Ok(())
}
