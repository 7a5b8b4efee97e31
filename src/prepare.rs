//! The preparation pool: a few OS threads that turn a request's inputs into
//! what its model computes on (tokenizing text) before the request queues.
//! The async runtime keeps answering calls and the executor thread only
//! runs the model; the batcher needs the token counts to form batches.

use std::sync::mpsc;
use std::sync::{Arc, Mutex};

use tokio::sync::oneshot;

type Job = Box<dyn FnOnce() + Send>;

/// A fixed set of threads taking jobs from one queue.
pub struct PreparePool {
    jobs: mpsc::Sender<Job>,
}

impl PreparePool {
    /// Starts `threads` threads (at least one). They stop when the pool is
    /// dropped and its queue drains.
    pub fn new(threads: usize) -> std::io::Result<Self> {
        let (jobs, queue) = mpsc::channel::<Job>();
        let queue = Arc::new(Mutex::new(queue));
        for i in 0..threads.max(1) {
            let queue = queue.clone();
            std::thread::Builder::new().name(format!("kiln-prepare-{i}")).spawn(move || {
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
        Ok(Self { jobs })
    }

    /// Runs `work` on the pool and waits for it without blocking the
    /// runtime. A panic in `work` comes back as `Err` with its message.
    pub async fn run<T: Send + 'static>(&self, work: impl FnOnce() -> T + Send + 'static) -> Result<T, String> {
        let (done, result) = oneshot::channel();
        let job: Job = Box::new(move || {
            let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(work))
                .map_err(|panic| crate::executor::panic_message(panic.as_ref()));
            let _ = done.send(outcome);
        });
        self.jobs.send(job).map_err(|_| "the preparation pool has stopped".to_string())?;
        result.await.map_err(|_| "the preparation pool has stopped".to_string())?
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn runs_work_off_the_caller_and_survives_a_panic() {
        let pool = PreparePool::new(1).expect("threads");
        let caller = std::thread::current().id();
        let worker = pool.run(|| std::thread::current().id()).await.expect("ran");
        assert_ne!(worker, caller);
        let panicked = pool.run(|| -> u32 { panic!("tokenizer broke") }).await;
        assert_eq!(panicked, Err("tokenizer broke".to_string()));
        assert_eq!(pool.run(|| 2 + 2).await, Ok(4), "the thread survived the panic");
    }
}
