//! Budget alert delivery: a background service that takes the alerts the
//! quotas raise (on a bounded channel) and POSTs each to its budget's webhook,
//! retried with backoff (0.5, 1, 2 s; 4 attempts) on its own connections,
//! never on a request's path. A 4xx other than 408 and 429 is not retried
//! (the same alert would be refused again). It keeps delivering through a
//! graceful stop (requests still draining raise alerts too: a threshold
//! alerts once, so a dropped alert would never be sent); deliveries are
//! tracked in `Shared::alert_deliveries`, and the final stop waits for them,
//! bounded.

use crate::Shared;
use async_trait::async_trait;
use pingora_core::connectors::http::Connector;
use pingora_core::server::ShutdownWatch;
use pingora_core::services::background::BackgroundService;
use pingora_core::upstreams::peer::HttpPeer;
use pingora_http::RequestHeader;
use smartllm_config::Url;
use smartllm_quota::Alert;
use std::sync::Arc;
use std::time::Duration;

pub struct AlertService {
    pub shared: Arc<Shared>,
}

#[async_trait]
impl BackgroundService for AlertService {
    async fn start(&self, _shutdown: ShutdownWatch) {
        let Some(mut alerts) = self
            .shared
            .alerts
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
        else {
            return;
        };
        // Outbound connections for webhooks, kept apart from upstream pools.
        let connector = Arc::new(Connector::new(None));
        // Not ended by Pingora's shutdown signal: the process's end is.
        while let Some(alert) = alerts.recv().await {
            self.shared
                .alert_deliveries
                .spawn(deliver(connector.clone(), alert));
        }
    }
}

/// Attempts per alert (the waits between them: 0.5, 1, 2 s).
const ATTEMPTS: u32 = 4;

/// POST one alert, retrying with backoff while another attempt may succeed.
async fn deliver(connector: Arc<Connector>, alert: Alert) {
    let url = alert.webhook;
    let mut delay = Duration::from_millis(500);
    for attempt in 1..=ATTEMPTS {
        match post(&connector, &url, &alert.body).await {
            Ok(status) if (200..300).contains(&status) => return,
            Ok(status) if !retryable(status) => {
                tracing::error!(
                    attempt,
                    status,
                    host = %url.host,
                    "budget webhook refused the alert; not retried (a 4xx other than 408 or 429)"
                );
                return;
            }
            Ok(status) => {
                tracing::warn!(attempt, status, host = %url.host, "budget webhook refused")
            }
            Err(e) => {
                tracing::warn!(attempt, error = %e, host = %url.host, "budget webhook failed")
            }
        }
        // No wait after the last attempt: nothing follows it.
        if attempt < ATTEMPTS {
            tokio::time::sleep(delay).await;
            delay *= 2;
        }
    }
    tracing::error!(host = %url.host, "budget webhook gave up after {} attempts", ATTEMPTS);
}

/// Whether a webhook's non-2xx answer is worth another attempt: a server
/// error (or anything but a 4xx) may pass later, and so may 408 (Request
/// Timeout) and 429 (Too Many Requests); any other 4xx (a wrong URL, a
/// refused token, a body it will not take) would be refused again. A 2xx is
/// delivered: nothing to retry. (A connection error is always retried.)
fn retryable(status: u16) -> bool {
    let delivered = (200..300).contains(&status);
    let refused = (400..500).contains(&status) && status != 408 && status != 429;
    !delivered && !refused
}

/// Why a webhook could not be delivered (logged, then retried).
#[derive(Debug, thiserror::Error)]
enum WebhookError {
    #[error("resolving the host: {0}")]
    Resolve(std::io::Error),
    #[error("the host has no address")]
    NoAddress,
    #[error("{0}")]
    Http(Box<pingora_error::Error>),
}

async fn post(connector: &Connector, url: &Url, body: &str) -> Result<u16, WebhookError> {
    let addr = tokio::net::lookup_host(url.authority())
        .await
        .map_err(WebhookError::Resolve)?
        .next()
        .ok_or(WebhookError::NoAddress)?;
    let mut peer = HttpPeer::new(
        addr,
        url.tls,
        if url.tls {
            url.host.clone()
        } else {
            String::new()
        },
    );
    peer.options.connection_timeout = Some(Duration::from_secs(5));
    peer.options.read_timeout = Some(Duration::from_secs(10));
    let (mut s, _) = connector
        .get_http_session(&peer)
        .await
        .map_err(WebhookError::Http)?;
    let path = if url.path.is_empty() {
        "/".to_string()
    } else {
        url.path.clone()
    };
    let mut h = RequestHeader::build("POST", path.as_bytes(), None).map_err(WebhookError::Http)?;
    for (k, v) in [
        ("host", url.host_header()),
        ("content-type", "application/json".into()),
        ("content-length", body.len().to_string()),
        (
            "user-agent",
            concat!("smartllm/", env!("CARGO_PKG_VERSION")).into(),
        ),
    ] {
        h.insert_header(k, v).map_err(WebhookError::Http)?;
    }
    s.write_request_header(Box::new(h))
        .await
        .map_err(WebhookError::Http)?;
    s.write_request_body(bytes::Bytes::from(body.to_string()), true)
        .await
        .map_err(WebhookError::Http)?;
    s.finish_request_body().await.map_err(WebhookError::Http)?;
    s.read_response_header().await.map_err(WebhookError::Http)?;
    let status = s.response_header().map(|r| r.status.as_u16()).unwrap_or(0);
    // The answer's body is not needed; read it (bounded) so the exchange ends cleanly.
    let mut waited = Duration::ZERO;
    let _ =
        crate::drain::response_body(&mut s, Duration::from_secs(10), 64 << 10, &mut waited).await;
    Ok(status)
}

#[cfg(test)]
mod tests {
    use super::retryable;

    #[test]
    fn only_answers_that_may_change_are_retried() {
        for again in [408, 429, 500, 502, 503, 504, 0] {
            assert!(retryable(again), "{again}");
        }
        for refused in [200, 204, 400, 401, 403, 404, 405, 410, 413, 422] {
            assert!(!retryable(refused), "{refused}");
        }
    }
}
