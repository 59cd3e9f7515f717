//! The audit index file and the thread that fills it.
//!
//! Audit records are looked up by patient (a patient's own access history),
//! organisation, user and time (auditors). Kept as indexes of the tables that
//! hold the records, each read's group commit wrote a page of each to the log: a
//! random leaf of the patient index per record, and the hot leaves of the others
//! per commit; measured on 100,000 patients, that was most of a read's audit
//! commit (docs/BENCHMARKS.md, "Session 12"). Each write paid the same for the
//! record it appends with its data (a PMH recipient import ran 19 % faster
//! without them; PMH "Session 13"). Here the entries of both files' records are
//! added by one thread, in batches sorted by key, in a file of its own, so that
//! no commit waits for them and a batch writes each page it touches once.
//!
//! Invariant: each `audit_<key>` table holds an entry for every record (of either
//! file) with `seq <= audit_indexed.upto` whose key is set, and `upto` only moves
//! in the transaction that added those entries. Queries take records after `upto`
//! from the two tables' tails, so a record is found from the moment its commit
//! returns.
//!
//! `upto` moves over seqs without a gap. The chain's seqs are committed in order
//! (under the writer's mutex), so the records of both files always form an
//! unbroken run from 1; but the indexer reads the two files in two snapshots,
//! taken one after the other, and the second may hold a record whose
//! predecessor, in the other file, committed after the first was taken. That
//! record waits for the next pass. A gap that stays is a record removed from the
//! log: the indexer warns and stops there (queries stay exact, reading the tails);
//! `tsunagi audit verify` names the record.

use std::path::Path;
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use rusqlite::{Connection, params};
use tsunagi_fhir::{FhirError, FhirResult};

use super::{
    BUSY_TIMEOUT_MS, INDEX_BATCH, INDEX_DELAY, SRC_AUDIT_FILE, SRC_DATA, attach, configure, db_err,
    migrate_by_user_version,
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
    conn: Mutex<Indexing>,
    state: Mutex<State>,
    wake: Condvar,
}

/// The indexer's connection and what its passes remember.
struct Indexing {
    conn: Connection,
    /// The first missing seq the last pass stopped at, if any.
    gap: Option<i64>,
    /// The gap already warned about.
    warned: Option<i64>,
}

#[derive(Default)]
struct State {
    /// Records may have been appended since the last pass.
    pending: bool,
    stop: bool,
}

impl AuditIndexer {
    /// Opens (creating or upgrading) the index file at `index`, attaches the audit
    /// file `audit` and the data file `data` to read from, and starts the thread,
    /// which first indexes whatever records they hold beyond `upto`.
    pub(super) fn start(index: &Path, audit: &Path, data: &Path) -> FhirResult<AuditIndexer> {
        let c = Connection::open(index).map_err(db_err)?;
        // NORMAL: a crash may lose the last batches, but each batch and its `upto`
        // are lost together, and the records are still in their files.
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
        attach(&c, audit, "audit")?;
        attach(&c, data, "data")?;
        rebuild_if_ahead(&c)?;
        let shared = Arc::new(Shared {
            conn: Mutex::new(Indexing {
                conn: c,
                gap: None,
                warned: None,
            }),
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

    /// Indexes every record committed now, on the caller's thread (up to a gap).
    pub(super) fn catch_up(&self) -> FhirResult<()> {
        let mut c = lock(&self.shared.conn);
        while c.pass()? == INDEX_BATCH {}
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
        let mut c = lock(&shared.conn);
        loop {
            match c.pass() {
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

/// The tables the records are in, with their `src` in the index: the audit
/// file first (see [`Indexing::pass`]).
const TABLES: [(&str, i64); 2] = [
    ("audit.audit_log", SRC_AUDIT_FILE),
    ("data.audit_log", SRC_DATA),
];

/// The index tables and the record column each is keyed by.
const KEYS: [(&str, &str); 4] = [
    ("audit_patient", "patient"),
    ("audit_org", "org"),
    ("audit_usr", "usr"),
    ("audit_recorded", "recorded"),
];

/// The statement adding one table's records in (`?1`, `?2`] to one index, in key
/// order so that neighbouring entries share the leaves they fill.
fn insert_sql(table: &str, src: i64, index: &str, column: &str) -> String {
    format!(
        "INSERT OR IGNORE INTO main.{index} (src, {column}, seq) SELECT {src}, {column}, seq \
         FROM {table} WHERE seq > ?1 AND seq <= ?2 AND {column} IS NOT NULL ORDER BY 2, 3"
    )
}

/// The end of the unbroken run of seqs after `upto` in `seqs` (sorted), at most
/// `batch` long, and the first missing seq when later ones were seen.
fn unbroken_run(upto: i64, seqs: &[i64], batch: i64) -> (i64, Option<i64>) {
    let mut end = upto;
    for &s in seqs {
        if end - upto == batch {
            return (end, None);
        }
        if s == end + 1 {
            end = s;
        } else if s > end + 1 {
            return (end, Some(end + 1));
        }
    }
    (end, None)
}

impl Indexing {
    /// Adds the next records after `upto` (at most [`INDEX_BATCH`], without a gap)
    /// to the index in one transaction; returns how many records it covered.
    fn pass(&mut self) -> FhirResult<i64> {
        let c = &self.conn;
        // deferred: `BEGIN IMMEDIATE` would also take the audit file's write lock,
        // and the reads' audit commits would wait for this batch
        c.execute_batch("BEGIN").map_err(db_err)?;
        let result = (|| {
            let upto: i64 = c
                .prepare_cached("SELECT upto FROM main.audit_indexed WHERE id = 1")
                .and_then(|mut s| s.query_row([], |r| r.get(0)))
                .map_err(db_err)?;
            // The audit file's snapshot is taken first: a data file record with a
            // lower seq than one seen there committed before it, so the data file's
            // snapshot, taken after, holds it too.
            let mut seqs = Vec::new();
            for (table, _) in TABLES {
                let mut stmt = c
                    .prepare_cached(&format!(
                        "SELECT seq FROM {table} WHERE seq > ?1 ORDER BY seq LIMIT ?2"
                    ))
                    .map_err(db_err)?;
                let rows = stmt
                    .query_map(params![upto, INDEX_BATCH], |r| r.get::<_, i64>(0))
                    .map_err(db_err)?;
                for seq in rows {
                    seqs.push(seq.map_err(db_err)?);
                }
            }
            seqs.sort_unstable();
            let (end, gap) = unbroken_run(upto, &seqs, INDEX_BATCH);
            if end > upto {
                for (table, src) in TABLES {
                    for (index, column) in KEYS {
                        c.prepare_cached(&insert_sql(table, src, index, column))
                            .and_then(|mut s| s.execute(params![upto, end]))
                            .map_err(db_err)?;
                    }
                }
                c.prepare_cached("UPDATE main.audit_indexed SET upto = ?1 WHERE id = 1")
                    .and_then(|mut s| s.execute([end]))
                    .map_err(db_err)?;
            }
            Ok((end - upto, gap))
        })();
        let (count, gap) = match result {
            Ok(r) => {
                if let Err(e) = c.execute_batch("COMMIT") {
                    let _ = c.execute_batch("ROLLBACK");
                    return Err(db_err(e));
                }
                r
            }
            Err(e) => {
                let _ = c.execute_batch("ROLLBACK");
                return Err(e);
            }
        };
        // a gap seen by two passes in a row, a quarter-second apart at least, is
        // not a commit between two snapshots
        if gap.is_some() && gap == self.gap && self.warned != gap {
            tracing::warn!(
                seq = gap,
                "an audit record is missing: the audit index stops before it; run `tsunagi audit verify`"
            );
            self.warned = gap;
        }
        self.gap = gap;
        Ok(count)
    }
}

/// An index that claims records that neither file has (a file was restored from
/// an older backup than the index file) is emptied and rebuilt.
fn rebuild_if_ahead(c: &Connection) -> FhirResult<()> {
    let (upto, max): (i64, i64) = c
        .query_row(
            "SELECT (SELECT upto FROM main.audit_indexed WHERE id = 1), \
             max((SELECT COALESCE(MAX(seq), 0) FROM audit.audit_log), \
                 (SELECT COALESCE(MAX(seq), 0) FROM data.audit_log))",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .map_err(db_err)?;
    if upto > max {
        tracing::warn!(
            upto,
            max,
            "the audit index file covers records the audit records do not include; rebuilding it"
        );
        let deletes: String = KEYS
            .iter()
            .map(|(index, _)| format!("DELETE FROM main.{index}; "))
            .collect();
        c.execute_batch(&format!(
            "BEGIN; {deletes}UPDATE main.audit_indexed SET upto = 0 WHERE id = 1; COMMIT;"
        ))
        .map_err(db_err)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::unbroken_run;

    #[test]
    fn the_run_stops_at_a_gap_or_the_batch() {
        assert_eq!(unbroken_run(10, &[], 5), (10, None));
        assert_eq!(unbroken_run(10, &[11, 12, 13], 5), (13, None));
        assert_eq!(unbroken_run(10, &[11, 12, 14, 15], 5), (12, Some(13)));
        assert_eq!(unbroken_run(10, &[12, 13], 5), (10, Some(11)));
        assert_eq!(unbroken_run(0, &[1, 2, 3, 4, 5, 6, 7], 5), (5, None));
        // a seq at or below the run (a duplicate) neither extends nor breaks it
        assert_eq!(unbroken_run(10, &[11, 11, 12], 5), (12, None));
    }
}
