//! Group commit of registrations (まとめてコミット): prepared five-information
//! Bundles that arrive while a commit is in flight are written together in the
//! next store transaction, so concurrent registrations share one fsync instead
//! of paying one each.
//!
//! Each Bundle is still all-or-nothing and goes through the same engine write
//! work as a single write (policy decision and one audit record per resource in
//! the transaction that writes it). When any Bundle of a group fails (an error or
//! a policy denial), the whole transaction is rolled back and every Bundle of
//! the group is replayed in a transaction of its own, so a failing Bundle never
//! takes another one down and leaves nothing behind. A caller is answered only
//! after the transaction holding its Bundle committed.

use std::sync::Arc;

use tokio::sync::{mpsc, oneshot};
use tsunagi_fhir::{FhirError, FhirResult};
use tsunagi_server::engine::{Denied, WriteWork, Written};

use crate::register::{Prepared, write_prepared};

/// Bundles written together at most.
const MAX_GROUP: usize = 64;
/// Queued Bundles at most (callers wait beyond this).
const QUEUE: usize = 1024;

type Outcome = FhirResult<Result<Vec<Written>, Denied>>;

struct Job {
    work: WriteWork,
    items: Vec<Prepared>,
    /// A copy for replaying the Bundle alone if its group fails: made by the
    /// caller, so the one writer thread does not spend its time copying.
    spare: Vec<Prepared>,
    done: oneshot::Sender<Outcome>,
}

/// The group-commit writer of one service instance. Cheap to clone.
#[derive(Clone)]
pub struct Committer {
    tx: mpsc::Sender<Job>,
}

fn stopped() -> FhirError {
    FhirError::unavailable("the registration writer is not running; retry")
}

impl Committer {
    /// Starts the writer task on the current tokio runtime; it ends when every
    /// clone is dropped and the queue is drained.
    pub fn spawn() -> Committer {
        let (tx, rx) = mpsc::channel(QUEUE);
        tokio::spawn(run(rx));
        Committer { tx }
    }

    /// Writes `items` in one transaction (possibly shared with other Bundles);
    /// resolves after that transaction committed.
    pub async fn write(&self, work: WriteWork, items: Vec<Prepared>) -> Outcome {
        let (done, wait) = oneshot::channel();
        let spare = clone_items(&items);
        self.tx
            .send(Job {
                work,
                items,
                spare,
                done,
            })
            .await
            .map_err(|_| stopped())?;
        wait.await.map_err(|_| stopped())?
    }
}

async fn run(mut rx: mpsc::Receiver<Job>) {
    while let Some(first) = rx.recv().await {
        let mut jobs = vec![first];
        while jobs.len() < MAX_GROUP {
            match rx.try_recv() {
                Ok(j) => jobs.push(j),
                Err(_) => break,
            }
        }
        // one group per store (a service instance serves one store in practice)
        let store = jobs[0].work.store.clone();
        let (mine, others): (Vec<Job>, Vec<Job>) = jobs
            .into_iter()
            .partition(|j| Arc::ptr_eq(&j.work.store, &store));
        for group in [mine, others] {
            if group.is_empty() {
                continue;
            }
            if let Err(e) = tokio::task::spawn_blocking(move || commit_group(group)).await {
                tracing::error!(error = %e, "registration group commit task failed");
            }
        }
    }
}

/// One Bundle in its own transaction.
fn commit_one(work: &WriteWork, items: Vec<Prepared>) -> Outcome {
    let mut tx = work.store.begin()?;
    let r = write_prepared(work, &mut *tx, items)?;
    if r.is_ok() {
        tx.commit()?;
    }
    Ok(r)
}

fn commit_group(mut jobs: Vec<Job>) {
    if jobs.len() == 1 {
        let Some(j) = jobs.into_iter().next() else {
            return;
        };
        let _ = j.done.send(commit_one(&j.work, j.items));
        return;
    }
    let store = jobs[0].work.store.clone();
    let together = (|| -> FhirResult<Option<Vec<Vec<Written>>>> {
        let mut tx = store.begin()?;
        let mut out = Vec::with_capacity(jobs.len());
        for j in jobs.iter_mut() {
            match write_prepared(&j.work, &mut *tx, std::mem::take(&mut j.items))? {
                Ok(w) => out.push(w),
                // a denial: roll back and replay each Bundle on its own
                Err(_) => return Ok(None),
            }
        }
        tx.commit()?;
        Ok(Some(out))
    })();
    match together {
        Ok(Some(written)) => {
            for (j, w) in jobs.into_iter().zip(written) {
                let _ = j.done.send(Ok(Ok(w)));
            }
        }
        other => {
            if let Err(e) = &other {
                tracing::debug!(error = %e, bundles = jobs.len(), "group commit failed; replaying one by one");
            }
            for j in jobs {
                let _ = j.done.send(commit_one(&j.work, j.spare));
            }
        }
    }
}

fn clone_items(items: &[Prepared]) -> Vec<Prepared> {
    items
        .iter()
        .map(|p| Prepared {
            rt: p.rt.clone(),
            id: p.id.clone(),
            resource: p.resource.clone(),
        })
        .collect()
}
