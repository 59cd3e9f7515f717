//! The one percentile definition and the one closed-loop driver of every load
//! generator and benchmark, so the p50/p99 figures in docs/BENCHMARKS.md mean
//! the same thing everywhere.

/// Nearest-rank percentile (`p` in 0..=1) of an ascending slice: the smallest value
/// with at least `p` of the samples at or below it. None when there are no samples.
pub fn nearest_rank<T: Copy>(sorted: &[T], p: f64) -> Option<T> {
    if sorted.is_empty() {
        return None;
    }
    let i = ((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1;
    Some(sorted[i])
}

/// What one iteration of a load generator's worker reports: the latency (µs) of
/// each timed step, or `None` when a step failed or answered wrongly.
pub type Steps = Option<Vec<u32>>;

/// A load run's outcome: per timed step, the measured latencies (µs, ascending).
pub struct Load {
    pub steps: Vec<Vec<u32>>,
    pub errors: u64,
    pub seconds: f64,
}

/// Runs `one` on `concurrency` tasks of the current runtime, each with its own
/// random sequence (`one` gets the next value): 2 s of warm-up, then `seconds`
/// measured. The one closed-loop driver of the load generators.
pub async fn drive<F, Fut>(
    concurrency: usize,
    seconds: u64,
    one: F,
) -> Result<Load, tokio::task::JoinError>
where
    F: Fn(u64) -> Fut + Clone + Send + Sync + 'static,
    Fut: std::future::Future<Output = Steps> + Send,
{
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    use std::time::{Duration, Instant};

    let stop = Arc::new(AtomicBool::new(false));
    let measuring = Arc::new(AtomicBool::new(false));
    let errors = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for w in 0..concurrency {
        let one = one.clone();
        let (stop, measuring, errors) = (stop.clone(), measuring.clone(), errors.clone());
        tasks.push(tokio::spawn(async move {
            let mut lat: Vec<Vec<u32>> = Vec::new();
            let mut x: u64 = 0x9E37_79B9_7F4A_7C15 ^ (w as u64 + 1);
            while !stop.load(Ordering::Relaxed) {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                let r = one(x).await;
                if !measuring.load(Ordering::Relaxed) {
                    continue;
                }
                match r {
                    Some(steps) => {
                        lat.resize_with(lat.len().max(steps.len()), Vec::new);
                        for (k, us) in steps.into_iter().enumerate() {
                            lat[k].push(us);
                        }
                    }
                    None => {
                        errors.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
            lat
        }));
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    measuring.store(true, Ordering::Relaxed);
    let t0 = Instant::now();
    tokio::time::sleep(Duration::from_secs(seconds)).await;
    measuring.store(false, Ordering::Relaxed);
    let elapsed = t0.elapsed().as_secs_f64();
    stop.store(true, Ordering::Relaxed);
    let mut all: Vec<Vec<u32>> = Vec::new();
    for t in tasks {
        let lat = t.await?;
        all.resize_with(all.len().max(lat.len()), Vec::new);
        for (k, l) in lat.into_iter().enumerate() {
            all[k].extend(l);
        }
    }
    for l in &mut all {
        l.sort_unstable();
    }
    Ok(Load {
        steps: all,
        errors: errors.load(Ordering::Relaxed),
        seconds: elapsed,
    })
}

/// Nearest-rank percentile of ascending µs samples, in ms (0 when there are none).
pub fn ms(sorted: &[u32], p: f64) -> f64 {
    nearest_rank(sorted, p).map_or(0.0, |us| us as f64 / 1000.0)
}

/// Microseconds since `t`, saturated to u32.
pub fn micros(t: std::time::Instant) -> u32 {
    t.elapsed().as_micros().min(u32::MAX as u128) as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn drive_keeps_each_step_apart_and_counts_failures() {
        let load = drive(2, 1, |x| async move {
            tokio::task::yield_now().await;
            (x % 4 != 0).then(|| vec![1, 2])
        })
        .await
        .unwrap();
        assert_eq!(load.steps.len(), 2);
        assert!(!load.steps[0].is_empty());
        assert_eq!(load.steps[0].len(), load.steps[1].len());
        assert!(load.steps[0].iter().all(|&us| us == 1));
        assert!(load.steps[1].iter().all(|&us| us == 2));
        assert!(load.errors > 0, "one value in four fails");
        assert!(load.seconds >= 1.0);
    }

    #[test]
    fn nearest_rank_of_a_hundred_samples() {
        let v: Vec<u32> = (1..=100).collect();
        assert_eq!(nearest_rank(&v, 0.5), Some(50));
        assert_eq!(nearest_rank(&v, 0.99), Some(99));
        assert_eq!(nearest_rank(&v, 1.0), Some(100));
        assert_eq!(nearest_rank(&v, 0.0), Some(1));
        assert_eq!(nearest_rank::<u32>(&[], 0.5), None);
    }
}
