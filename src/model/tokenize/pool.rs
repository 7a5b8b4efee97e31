//! The tokenization service's threads: a fixed set taking jobs from one
//! bounded queue, so tokenizing never runs on the async runtime and a
//! flood of texts is refused rather than queued without bound.

use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use tokio::sync::oneshot;

use crate::runtime::Threads;

type Job = Box<dyn FnOnce() + Send>;

/// Why work given to the pool did not run to completion.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PrepareError {
    #[error("the preparation queue is full ({capacity} requests waiting to be tokenized); retry shortly")]
    QueueFull { capacity: usize },
    #[error("the deadline passed while the request waited to be tokenized")]
    Expired,
    #[error("the preparation pool has stopped")]
    Stopped,
    #[error("{0}")]
    Panicked(String),
}

/// A fixed set of threads taking jobs from one bounded queue.
pub struct PreparePool {
    /// Taken by `close`; the threads stop once the queue drains.
    jobs: Mutex<Option<mpsc::SyncSender<Job>>>,
    capacity: usize,
}

impl PreparePool {
    /// Starts `threads` threads (at least one) behind a queue of `capacity`
    /// jobs, registered in `registry`. They stop when the pool is closed
    /// (or dropped) and its queue drains.
    pub fn new(threads: usize, capacity: usize, registry: &Threads) -> std::io::Result<Self> {
        let capacity = capacity.max(1);
        let (jobs, queue) = mpsc::sync_channel::<Job>(capacity);
        let queue = Arc::new(Mutex::new(queue));
        for i in 0..threads.max(1) {
            let queue = queue.clone();
            registry.spawn(format!("kiln-prepare-{i}"), move || {
                loop {
                    // The lock is held only while waiting for the next job.
                    let job = match queue.lock() {
                        Ok(q) => q.recv(),
                        Err(poisoned) => poisoned.into_inner().recv(),
                    };
                    match job {
                        Ok(job) => job(),
                        Err(mpsc::RecvError) => return,
                    }
                }
            })?;
        }
        Ok(Self { jobs: Mutex::new(Some(jobs)), capacity })
    }

    /// Refuses new work; the threads finish what is queued, then stop.
    pub fn close(&self) {
        self.sender().take();
    }

    fn sender(&self) -> std::sync::MutexGuard<'_, Option<mpsc::SyncSender<Job>>> {
        self.jobs.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Runs `work` on the pool and waits for it without blocking the
    /// runtime, or refuses at once when the queue is full. Work whose
    /// caller has gone (the call was cancelled) or whose `deadline` passed
    /// while it waited is skipped, never run. A panic in `work` comes back
    /// as `Panicked` with its message.
    pub async fn run<T: Send + 'static>(
        &self,
        deadline: Instant,
        work: impl FnOnce() -> T + Send + 'static,
    ) -> Result<T, PrepareError> {
        let (done, result) = oneshot::channel();
        let job: Job = Box::new(move || {
            if done.is_closed() {
                return;
            }
            if Instant::now() > deadline {
                let _ = done.send(Err(PrepareError::Expired));
                return;
            }
            let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(work))
                .map_err(|panic| PrepareError::Panicked(crate::error::panic_message(panic.as_ref())));
            let _ = done.send(outcome);
        });
        let sent = match self.sender().as_ref() {
            Some(jobs) => jobs.try_send(job),
            None => Err(mpsc::TrySendError::Disconnected(job)),
        };
        sent.map_err(|e| match e {
            mpsc::TrySendError::Full(_) => PrepareError::QueueFull { capacity: self.capacity },
            mpsc::TrySendError::Disconnected(_) => PrepareError::Stopped,
        })?;
        result.await.map_err(|_| PrepareError::Stopped)?
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use std::time::Duration;

    fn later() -> Instant {
        Instant::now() + Duration::from_secs(60)
    }

    #[tokio::test]
    async fn runs_work_off_the_caller_and_survives_a_panic() {
        let pool = PreparePool::new(1, 4, &Threads::default()).expect("threads");
        let caller = std::thread::current().id();
        let worker = pool.run(later(), || std::thread::current().id()).await.expect("ran");
        assert_ne!(worker, caller);
        let panicked = pool.run(later(), || -> u32 { panic!("tokenizer broke") }).await;
        assert_eq!(panicked, Err(PrepareError::Panicked("tokenizer broke".to_string())));
        assert_eq!(pool.run(later(), || 2 + 2).await, Ok(4), "the thread survived the panic");
    }

    #[tokio::test]
    async fn a_full_queue_refuses_and_dead_work_is_skipped() {
        let pool = Arc::new(PreparePool::new(1, 1, &Threads::default()).expect("threads"));
        let (release, gate) = std::sync::mpsc::channel::<()>();
        let (started, running) = oneshot::channel::<()>();
        // Occupies the only thread until released.
        let blocker = tokio::spawn({
            let pool = pool.clone();
            async move {
                pool.run(later(), move || {
                    let _ = started.send(());
                    gate.recv().is_ok()
                })
                .await
            }
        });
        running.await.expect("the blocker runs");
        let ran = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        pool.sender()
            .as_ref()
            .expect("open")
            .try_send(Box::new(|| {}))
            .map_err(|_| "queue empty")
            .expect("one slot free");
        // The queue (capacity 1) now holds that no-op; one more is refused.
        let counted = ran.clone();
        let refused = pool.run(later(), move || counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst)).await;
        assert_eq!(refused, Err(PrepareError::QueueFull { capacity: 1 }));
        release.send(()).expect("release");
        assert_eq!(blocker.await.expect("joined"), Ok(true));
        // A passed deadline is answered without running the work.
        let counted = ran.clone();
        let expired = pool.run(Instant::now(), move || counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst));
        std::thread::sleep(Duration::from_millis(2));
        assert_eq!(expired.await, Err(PrepareError::Expired));
        assert_eq!(ran.load(std::sync::atomic::Ordering::SeqCst), 0, "no refused or expired work ran");
    }

    #[tokio::test]
    async fn work_whose_caller_has_gone_is_skipped() {
        let pool = PreparePool::new(1, 4, &Threads::default()).expect("threads");
        let (release, gate) = std::sync::mpsc::channel::<()>();
        let (started, running) = oneshot::channel::<()>();
        let blocker = pool.run(later(), move || {
            let _ = started.send(());
            gate.recv().is_ok()
        });
        tokio::pin!(blocker);
        assert!(futures::poll!(blocker.as_mut()).is_pending());
        running.await.expect("the blocker runs");
        // Queued behind the blocker, then its caller goes away (a client
        // that cancelled).
        let ran = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counted = ran.clone();
        let abandoned = Box::pin(pool.run(later(), move || counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst)));
        let mut abandoned = abandoned;
        assert!(futures::poll!(abandoned.as_mut()).is_pending(), "queued");
        drop(abandoned);
        release.send(()).expect("release");
        assert_eq!(blocker.await, Ok(true));
        // The pool has moved past the abandoned job once this one runs.
        assert_eq!(pool.run(later(), || 7).await, Ok(7));
        assert_eq!(ran.load(std::sync::atomic::Ordering::SeqCst), 0, "abandoned work was run");
    }
}
