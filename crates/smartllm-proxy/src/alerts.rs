//! Budget alert delivery: a background service that takes the alerts the
//! quotas raise (on a bounded channel) and POSTs each to its budget's webhook,
//! retried with backoff (0.5, 1, 2 s; 4 attempts) on its own connections,
//! never on a request's path. A 4xx other than 408 and 429 is not retried
//! (the same alert would be refused again), nor is a redirect (3xx), which
//! is not followed: the log names where it points. The URL's path and query
//! string are sent as written, and each of the host's addresses is tried
//! in turn until one takes the connection. It keeps delivering through a
//! graceful stop (requests still draining raise alerts too: a threshold
//! alerts once, so a dropped alert would never be sent); deliveries are
//! tracked in `Shared::alert_deliveries`, and the final stop waits for them,
//! bounded.

use crate::Shared;
use async_trait::async_trait;
use pingora_core::connectors::http::Connector;
use pingora_core::protocols::http::client::HttpSession;
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
    let (budget, what) = (alert.budget.as_str(), alert.what.as_str());
    let mut delay = Duration::from_millis(500);
    for attempt in 1..=ATTEMPTS {
        match post(&connector, &url, &alert.body).await {
            Ok(Answer { status, .. }) if (200..300).contains(&status) => return,
            // Not followed: a POST redirected elsewhere (to a login page,
            // from http to https) is the configured URL's mistake, and the
            // same answer would come back at every attempt.
            Ok(Answer { status, location }) if (300..400).contains(&status) => {
                tracing::error!(
                    attempt,
                    status,
                    host = %url.host,
                    budget,
                    alert = what,
                    location = location.as_deref().unwrap_or("(none)"),
                    "budget webhook answered with a redirect, which is not followed; the alert is dropped: set the webhook to the URL it names (location)"
                );
                smartllm_quota::metrics::webhook_failed(budget);
                return;
            }
            Ok(Answer { status, .. }) if !retryable(status) => {
                tracing::error!(
                    attempt,
                    status,
                    host = %url.host,
                    budget,
                    alert = what,
                    "budget webhook refused the alert; not retried (a 4xx other than 408 or 429)"
                );
                smartllm_quota::metrics::webhook_failed(budget);
                return;
            }
            Ok(Answer { status, .. }) => {
                tracing::warn!(attempt, status, host = %url.host, budget, alert = what, "budget webhook refused")
            }
            Err(e) => {
                tracing::warn!(attempt, error = %e, host = %url.host, budget, alert = what, "budget webhook failed")
            }
        }
        // No wait after the last attempt: nothing follows it.
        if attempt < ATTEMPTS {
            tokio::time::sleep(delay).await;
            delay *= 2;
        }
    }
    tracing::error!(host = %url.host, budget, alert = what, "budget webhook gave up after {} attempts; the alert is lost", ATTEMPTS);
    smartllm_quota::metrics::webhook_failed(budget);
}

/// Whether a webhook's non-2xx answer is worth another attempt: a server
/// error (or anything but a 3xx or 4xx) may pass later, and so may 408
/// (Request Timeout) and 429 (Too Many Requests); any other 4xx (a wrong
/// URL, a refused token, a body it will not take) would be refused again,
/// and a redirect (3xx, not followed) would be given again. A 2xx is
/// delivered: nothing to retry. (A connection error is always retried.)
fn retryable(status: u16) -> bool {
    let delivered = (200..300).contains(&status);
    let redirected = (300..400).contains(&status);
    let refused = (400..500).contains(&status) && status != 408 && status != 429;
    !delivered && !redirected && !refused
}

/// A webhook's answer: its status, and where a redirect points.
struct Answer {
    status: u16,
    location: Option<String>,
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

async fn post(connector: &Connector, url: &Url, body: &str) -> Result<Answer, WebhookError> {
    let lookup = tokio::net::lookup_host(url.authority());
    let addrs: Vec<std::net::SocketAddr> =
        match tokio::time::timeout(crate::runtime::RESOLVE_TIMEOUT, lookup).await {
            Ok(a) => a.map_err(WebhookError::Resolve)?.collect(),
            Err(_) => {
                return Err(WebhookError::Resolve(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    "no DNS answer in time",
                )))
            }
        };
    post_to(connector, url, &addrs, body).await
}

/// [`post`] to the host at `addrs`.
async fn post_to(
    connector: &Connector,
    url: &Url,
    addrs: &[std::net::SocketAddr],
    body: &str,
) -> Result<Answer, WebhookError> {
    let mut s = connect(connector, url, addrs).await?;
    // The path and query exactly as configured (a trailing slash can
    // matter; Google Chat authenticates by `?key=...&token=...`).
    let target = if url.target.starts_with('/') {
        url.target.clone()
    } else {
        format!("/{}", url.target)
    };
    let mut h =
        RequestHeader::build("POST", target.as_bytes(), None).map_err(WebhookError::Http)?;
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
    let (status, location) = s.response_header().map_or((0, None), |r| {
        (
            r.status.as_u16(),
            r.headers
                .get(http::header::LOCATION)
                .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned()),
        )
    });
    // The answer's body is not needed; read it (bounded) so the exchange ends cleanly.
    let mut waited = Duration::ZERO;
    let _ =
        crate::drain::response_body(&mut s, Duration::from_secs(10), 64 << 10, &mut waited).await;
    Ok(Answer { status, location })
}

/// A connection to the first of `addrs` (the webhook host's addresses)
/// that takes one: a host whose IPv6 address is unreachable from here, or
/// one of whose addresses is down, is still reached through another.
async fn connect(
    connector: &Connector,
    url: &Url,
    addrs: &[std::net::SocketAddr],
) -> Result<HttpSession, WebhookError> {
    let mut failed = WebhookError::NoAddress;
    for (i, addr) in addrs.iter().enumerate() {
        let mut peer = HttpPeer::new(
            *addr,
            url.tls,
            if url.tls {
                url.host.clone()
            } else {
                String::new()
            },
        );
        peer.options.connection_timeout = Some(Duration::from_secs(5));
        peer.options.read_timeout = Some(Duration::from_secs(10));
        match connector.get_http_session(&peer).await {
            Ok((s, _)) => return Ok(s),
            Err(e) => {
                if i + 1 < addrs.len() {
                    tracing::debug!(address = %addr, error = %e, host = %url.host, "budget webhook: connecting failed; trying the host's next address");
                }
                failed = WebhookError::Http(e);
            }
        }
    }
    Err(failed)
}

#[cfg(test)]
mod tests {
    use super::retryable;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[test]
    fn only_answers_that_may_change_are_retried() {
        for again in [408, 429, 500, 502, 503, 504, 0] {
            assert!(retryable(again), "{again}");
        }
        for refused in [
            200, 204, 301, 302, 303, 307, 308, 400, 401, 403, 404, 405, 410, 413, 422,
        ] {
            assert!(!retryable(refused), "{refused}");
        }
    }

    /// The alert goes to the webhook's path and query as written (through
    /// the host's second address when its first refuses the connection),
    /// and a redirect's Location comes back to be logged.
    #[tokio::test]
    async fn posted_to_the_url_as_written_on_an_address_that_answers() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let up = listener.local_addr().unwrap();
        // An address nothing listens on: its connection is refused.
        let down = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap()
        };
        let mut server = tokio::task::JoinSet::new();
        server.spawn(async move {
            let (mut c, _) = listener.accept().await.unwrap();
            let mut seen = Vec::new();
            let mut buf = [0u8; 4096];
            while !seen.windows(4).any(|w| w == b"\r\n\r\n") {
                let n = c.read(&mut buf).await.unwrap();
                assert!(n > 0, "the request ended early");
                seen.extend_from_slice(&buf[..n]);
            }
            c.write_all(
                b"HTTP/1.1 308 Permanent Redirect\r\nLocation: https://hooks.example/new\r\nContent-Length: 0\r\n\r\n",
            )
            .await
            .unwrap();
            String::from_utf8_lossy(&seen).into_owned()
        });
        let url = smartllm_config::Url::parse_webhook(&format!(
            "http://{up}/hooks/abc/?key=K&token=T%3D"
        ))
        .unwrap();
        let connector = pingora_core::connectors::http::Connector::new(None);
        let answer = super::post_to(&connector, &url, &[down, up], "{}").await;
        let seen = server.join_next().await.unwrap().unwrap();
        let answer = answer.unwrap_or_else(|e| panic!("{e}"));
        assert!(
            seen.starts_with("POST /hooks/abc/?key=K&token=T%3D HTTP/1.1\r\n"),
            "{seen}"
        );
        assert_eq!(answer.status, 308);
        assert_eq!(
            answer.location.as_deref(),
            Some("https://hooks.example/new")
        );
        assert!(!retryable(answer.status));
    }
}
