//! Draining on shutdown. When the signal comes, health turns NOT_SERVING
//! (Watch streams receive it, then end), new inference calls are answered
//! UNAVAILABLE, and everything admitted is answered; once `drain_timeout`
//! passes, whatever is still waiting is answered UNAVAILABLE (and counted)
//! so that the process can exit within it.

use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};

use futures::{Stream, StreamExt};
use tokio::sync::watch;
use tonic::{Request, Response, Status};
use tonic_health::pb::health_server::Health;
use tonic_health::pb::{HealthCheckRequest, HealthCheckResponse, health_check_response::ServingStatus};
use tonic_health::server::HealthService;

/// The server's drain state, shared by the door, the pipeline and health.
#[derive(Debug)]
pub struct Drain {
    draining: AtomicBool,
    started: watch::Sender<bool>,
    expired: watch::Sender<bool>,
}

impl Default for Drain {
    fn default() -> Self {
        Self { draining: AtomicBool::new(false), started: watch::channel(false).0, expired: watch::channel(false).0 }
    }
}

impl Drain {
    /// True from the shutdown signal on: new calls are refused.
    pub fn draining(&self) -> bool {
        self.draining.load(Ordering::Acquire)
    }

    /// The shutdown signal came.
    pub fn start(&self) {
        self.draining.store(true, Ordering::Release);
        self.started.send_replace(true);
    }

    /// The drain timeout passed: calls still waiting give up.
    pub fn expire(&self) {
        self.expired.send_replace(true);
    }

    /// Completes once the drain timeout has passed.
    pub fn expired(&self) -> impl Future<Output = ()> + Send + 'static {
        let mut expired = self.expired.subscribe();
        async move {
            let _ = expired.wait_for(|e| *e).await;
        }
    }

    fn started(&self) -> impl Future<Output = ()> + Send + 'static {
        let mut started = self.started.subscribe();
        async move {
            let _ = started.wait_for(|s| *s).await;
        }
    }
}

/// `grpc.health.v1.Health` over tonic's own service, with Watch streams
/// that end once the drain starts (after saying NOT_SERVING), so that no
/// open Watch holds the shutdown.
pub struct DrainingHealth {
    inner: HealthService,
    drain: std::sync::Arc<Drain>,
}

impl DrainingHealth {
    pub fn new(inner: HealthService, drain: std::sync::Arc<Drain>) -> Self {
        Self { inner, drain }
    }
}

type WatchStream = Pin<Box<dyn Stream<Item = Result<HealthCheckResponse, Status>> + Send>>;

#[tonic::async_trait]
impl Health for DrainingHealth {
    async fn check(&self, request: Request<HealthCheckRequest>) -> Result<Response<HealthCheckResponse>, Status> {
        self.inner.check(request).await
    }

    type WatchStream = WatchStream;

    async fn watch(&self, request: Request<HealthCheckRequest>) -> Result<Response<WatchStream>, Status> {
        let inner = self.inner.watch(request).await?.into_inner();
        let last = HealthCheckResponse { status: ServingStatus::NotServing as i32 };
        // The last word is NOT_SERVING even if the stream is cut before it
        // relayed the change.
        let stream = inner.take_until(self.drain.started()).chain(futures::stream::once(async move { Ok(last) }));
        Ok(Response::new(Box::pin(stream)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn watch_streams_say_not_serving_and_end_when_the_drain_starts() {
        let (reporter, _) = tonic_health::server::health_reporter();
        reporter.set_service_status("m", tonic_health::ServingStatus::Serving).await;
        let drain = std::sync::Arc::new(Drain::default());
        let health = DrainingHealth::new(HealthService::from_health_reporter(reporter.clone()), drain.clone());
        let request = Request::new(HealthCheckRequest { service: "m".into() });
        let mut stream = health.watch(request).await.expect("watch").into_inner();
        let first = stream.next().await.expect("a status").expect("ok");
        assert_eq!(first.status, ServingStatus::Serving as i32);
        reporter.set_service_status("m", tonic_health::ServingStatus::NotServing).await;
        drain.start();
        let mut last = None;
        while let Some(item) = stream.next().await {
            last = Some(item.expect("ok").status);
        }
        assert_eq!(last, Some(ServingStatus::NotServing as i32), "the stream ended on NOT_SERVING");
        assert!(drain.draining());
    }
}
