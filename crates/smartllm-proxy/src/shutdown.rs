//! Graceful stop. Pingora's own SIGTERM path waits a fixed grace period and
//! then cancels whatever is still running, which would cut long LLM streams.
//! This watcher drains first: on SIGTERM the gateway reports not ready, answers
//! new requests with 503 (`Connection: close`, `Retry-After`), and waits until
//! every in-flight request has finished (bounded by
//! `server.graceful_shutdown_timeout`); only then does Pingora stop. SIGQUIT
//! (graceful upgrade: sockets handed to a new process) and SIGINT (fast stop)
//! keep Pingora's meaning.

use crate::Shared;
use async_trait::async_trait;
use pingora_core::server::{ShutdownSignal, ShutdownSignalWatch};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::signal::unix::{signal, Signal, SignalKind};

/// Set once this watcher's SIGTERM, SIGINT and SIGQUIT handlers are in
/// place: until then the process's own early handler (`smartllm serve`)
/// ends it on SIGTERM or SIGINT, which would otherwise be lost while it
/// starts as a container's PID 1 (no default action there).
pub static SIGNALS_HANDLED: std::sync::atomic::AtomicBool =
    std::sync::atomic::AtomicBool::new(false);

pub struct DrainingShutdown {
    pub shared: Arc<Shared>,
    pub drain_timeout: Duration,
}

async fn next(s: &mut Option<Signal>) {
    match s {
        Some(s) => {
            s.recv().await;
        }
        None => std::future::pending::<()>().await,
    }
}

fn install(kind: SignalKind, name: &str) -> Option<Signal> {
    match signal(kind) {
        Ok(s) => Some(s),
        Err(e) => {
            tracing::error!(error = %e, signal = name, "cannot install a signal handler");
            None
        }
    }
}

#[async_trait]
impl ShutdownSignalWatch for DrainingShutdown {
    async fn recv(&self) -> ShutdownSignal {
        let mut quit = install(SignalKind::quit(), "SIGQUIT");
        let mut term = install(SignalKind::terminate(), "SIGTERM");
        let mut int = install(SignalKind::interrupt(), "SIGINT");
        SIGNALS_HANDLED.store(true, Ordering::SeqCst);
        tokio::select! {
            _ = next(&mut quit) => {
                // The new process takes the listeners: this one's HTTP/2
                // clients get GOAWAY and its HTTP/1.1 answers close their
                // connections, so none is reused as it goes.
                pingora_core::protocols::http::v2::server::begin_drain();
                ShutdownSignal::GracefulUpgrade
            }
            _ = next(&mut int) => ShutdownSignal::FastShutdown,
            _ = next(&mut term) => {
                // Not ready from now on, so load balancers take this
                // instance out...
                self.shared.stopping.store(true, Ordering::SeqCst);
                crate::metrics::draining();
                // HTTP/2 clients are told at once (GOAWAY): their next
                // requests go to a new connection, not to this instance;
                // HTTP/1.1 answers from now on close their connections.
                pingora_core::protocols::http::v2::server::begin_drain();
                // ...while it still serves for `server.drain_delay`: one that
                // has not yet noticed still gets answers, not 503s.
                let delay = self.shared.runtime.load().config.server.drain_delay;
                if !delay.is_zero() {
                    tracing::info!(delay = ?delay, "SIGTERM: /readyz reports draining; still serving until server.drain_delay has passed");
                    tokio::select! {
                        _ = tokio::time::sleep(delay) => {}
                        _ = next(&mut int) => return ShutdownSignal::FastShutdown,
                    }
                }
                self.shared.draining.store(true, Ordering::SeqCst);
                let started = *self.shared.drain_started.get_or_init(Instant::now);
                tracing::info!(in_flight = self.shared.in_flight.load(Ordering::SeqCst), "SIGTERM: draining in-flight requests");
                loop {
                    let n = self.shared.in_flight.load(Ordering::SeqCst);
                    if n == 0 {
                        tracing::info!(ms = started.elapsed().as_millis() as u64, "drained; stopping");
                        break;
                    }
                    if started.elapsed() >= self.drain_timeout {
                        tracing::warn!(in_flight = n, timeout = ?self.drain_timeout, "drain timeout reached: ending the streams still in flight");
                        self.shared.drain_expired.send_replace(true);
                        break;
                    }
                    tokio::select! {
                        _ = tokio::time::sleep(Duration::from_millis(25)) => {}
                        _ = next(&mut int) => return ShutdownSignal::FastShutdown,
                    }
                }
                ShutdownSignal::GracefulTerminate
            }
        }
    }
}
