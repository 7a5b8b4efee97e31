//! A steady client load that counts every answer, for tests that change
//! the server under it.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tonic::Code;

use super::TestServer;

/// What the steady load saw.
#[derive(Default, Debug)]
pub struct Tally {
    pub sent: u64,
    pub by_version: BTreeMap<String, u64>,
    pub errors: Vec<(Code, String)>,
}

pub struct Load {
    stop: Arc<AtomicBool>,
    tasks: Vec<tokio::task::JoinHandle<Tally>>,
}

/// `clients` clients, each sending one row at a time with a short pause,
/// until stopped.
pub async fn steady_load(server: &TestServer, clients: usize) -> Load {
    let stop = Arc::new(AtomicBool::new(false));
    let row = super::wdbc().0[0].clone();
    let mut tasks = Vec::new();
    for _ in 0..clients {
        let (stop, mut client, row) = (stop.clone(), server.client().await, row.clone());
        tasks.push(tokio::spawn(async move {
            let mut tally = Tally::default();
            while !stop.load(Ordering::Relaxed) {
                tally.sent += 1;
                match client.infer_fp32("risk", "features", std::slice::from_ref(&row)).await {
                    Ok(r) => *tally.by_version.entry(r.model_version).or_default() += 1,
                    Err(status) => tally.errors.push((status.code(), status.message().to_string())),
                }
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            tally
        }));
    }
    Load { stop, tasks }
}

impl Load {
    pub async fn finish(self) -> Tally {
        self.stop.store(true, Ordering::Relaxed);
        let mut total = Tally::default();
        for task in self.tasks {
            let t = task.await.expect("client task");
            total.sent += t.sent;
            for (v, n) in t.by_version {
                *total.by_version.entry(v).or_default() += n;
            }
            total.errors.extend(t.errors);
        }
        let answered: u64 = total.by_version.values().sum::<u64>() + total.errors.len() as u64;
        assert_eq!(answered, total.sent, "every request sent got exactly one answer");
        total
    }
}
