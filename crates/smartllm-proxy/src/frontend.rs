//! The HTTP front of the API listener: Pingora's `HttpProxy` wrapped with the
//! connection-level policy Pingora 0.9 leaves to its users, read from the live
//! config for every request (hot-reloadable):
//!
//! - **Header deadline** (`server.client_header_timeout`). Pingora times out
//!   each *read* of the request head, so a client that sends a byte every few
//!   seconds (slowloris) could hold a connection for hours. Here the whole
//!   request line and headers must arrive within the deadline, counted from
//!   the connection's start, or on a keep-alive connection from the previous
//!   answer plus `server.keepalive_timeout`. A client that misses it is
//!   disconnected, as nginx does with `client_header_timeout`, and counted in
//!   `smartllm_client_timeouts_total{phase="header"}`.
//! - **Keep-alive idle timeout** (`server.keepalive_timeout`).
//! - **HTTP/1.1 pipelining** (`server.http1_pipelining`): requests sent before
//!   the previous answer are served in order, one at a time (RFC 9112 §9.3.2),
//!   instead of the connection closing after the first answer.
//!
//! HTTP/2 comes by ALPN on a TLS listener, or as cleartext prior-knowledge
//! h2c with `server.h2c` (both read at start). Its streams arrive with their
//! heads read, so the header deadline is HTTP/1's alone; an h2 connection with
//! no stream open is closed after `server.keepalive_timeout` (as at start).

use crate::{metrics, Gateway, Shared};
use async_trait::async_trait;
use pingora_core::apps::{HttpServerApp, HttpServerOptions, ReusedHttpStream};
use pingora_core::protocols::http::ServerSession;
use pingora_core::server::configuration::ServerConf;
use pingora_core::server::ShutdownWatch;
use pingora_proxy::HttpProxy;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

tokio::task_local! {
    /// Set once the current request's head has been read and parsed.
    static HEAD_READ: Arc<AtomicBool>;
}

/// Called by the proxy once a request's head is complete: from here on the
/// header deadline no longer applies to it.
pub(crate) fn head_complete() {
    // Outside a `Frontend` (h2 streams, tests) there is no deadline to stop.
    let _ = HEAD_READ.try_with(|read| read.store(true, Ordering::Release));
}

/// Carried from one request to the next on a keep-alive connection, so the
/// next one knows its connection is not new (see `persist_connection_context`).
pub(crate) struct Reused;

pub struct Frontend {
    proxy: Arc<HttpProxy<Gateway>>,
    shared: Arc<Shared>,
}

impl Frontend {
    pub fn new(conf: &Arc<ServerConf>, gateway: Gateway) -> Self {
        let shared = gateway.shared.clone();
        let mut proxy = pingora_proxy::http_proxy(conf, gateway);
        let mut options = HttpServerOptions::default();
        {
            let rt = shared.runtime.load();
            let s = &rt.config.server;
            // Pingora turns h2c off by itself on TLS connections (ALPN decides).
            options.h2c = s.h2c;
            options.h2_idle_timeout =
                Some(Duration::from_secs(keepalive_secs(s.keepalive_timeout)));
            // A connection that says nothing (no h2c preface on the plain
            // listener, none after ALPN h2) goes after the header timeout.
            // Set at start: a reload's new value applies after a restart.
            options.h2_preface_timeout = Some(s.client_header_timeout);
        }
        proxy.server_options = Some(options);
        Frontend {
            proxy: Arc::new(proxy),
            shared,
        }
    }
}

/// Whole seconds for Pingora's keep-alive setting (at least 1).
fn keepalive_secs(d: Duration) -> u64 {
    d.as_secs().max(1)
}

#[async_trait]
impl HttpServerApp for Frontend {
    async fn process_new_http(
        self: &Arc<Self>,
        mut session: ServerSession,
        shutdown: &ShutdownWatch,
    ) -> Option<ReusedHttpStream> {
        // An h2 stream arrives with its head already read.
        if session.is_http2() {
            return self.proxy.process_new_http(session, shutdown).await;
        }
        let (head_timeout, keepalive, pipelining) = {
            let rt = self.shared.runtime.load();
            let s = &rt.config.server;
            (
                s.client_header_timeout,
                s.keepalive_timeout,
                s.http1_pipelining,
            )
        };
        let reused = session.take_connection_user_context().is_some();
        // None means Pingora (shutdown) or the last answer ruled reuse out.
        if session.get_keepalive().is_some() {
            session.set_keepalive(Some(keepalive_secs(keepalive)));
        }
        session.set_pipelining_enabled(pipelining);
        let limit = if reused {
            head_timeout + Duration::from_secs(keepalive_secs(keepalive))
        } else {
            head_timeout
        };

        let read = Arc::new(AtomicBool::new(false));
        let serve = HEAD_READ.scope(read.clone(), self.proxy.process_new_http(session, shutdown));
        tokio::pin!(serve);
        tokio::select! {
            biased;
            out = &mut serve => return out,
            _ = pingora_timeout::sleep(limit) => {}
        }
        if read.load(Ordering::Acquire) {
            return serve.await;
        }
        // Still reading the head: drop the session, closing the connection.
        metrics::client_timeout("header");
        tracing::debug!(
            limit_ms = limit.as_millis() as u64,
            reused,
            "request head not complete in time (server.client_header_timeout): connection closed"
        );
        None
    }

    fn h2_options(&self) -> Option<pingora_core::protocols::http::v2::server::H2Options> {
        self.proxy.h2_options()
    }

    fn server_options(&self) -> Option<&HttpServerOptions> {
        self.proxy.server_options()
    }

    async fn http_cleanup(&self) {
        self.proxy.http_cleanup().await
    }
}
