//! Getting finished spans out of the process without ever blocking a proxy
//! thread: a span processor that hands each sampled span to a bounded queue
//! (a full queue drops it and counts the drop), and one exporter thread that
//! batches the queue and sends it with the OTLP exporter over the gateway's
//! own small HTTP/1.1 client (plain `std` I/O on that thread: no async
//! runtime, no reqwest/hyper).

use crate::metrics;
use async_trait::async_trait;
use bytes::Bytes;
use opentelemetry_http::{HttpClient, HttpError, Request, Response};
use opentelemetry_sdk::error::{OTelSdkError, OTelSdkResult};
use opentelemetry_sdk::trace::{SpanData, SpanExporter, SpanProcessor};
use std::io::{Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Spans waiting for export; beyond, new ones are dropped (and counted).
pub const QUEUE_SPANS: usize = 8192;
/// Spans sent in one OTLP request.
const BATCH_SPANS: usize = 512;
/// How long a span waits at most before its batch is sent.
const BATCH_DELAY: Duration = Duration::from_millis(500);
/// A collector's answer larger than this is cut (only partial-success
/// details are read from it).
const MAX_RESPONSE: usize = 64 << 10;

enum Msg {
    Span(Box<SpanData>),
    /// Export what is queued, then answer.
    Flush(mpsc::Sender<()>),
    /// Export what is queued, then stop.
    Shutdown(mpsc::Sender<()>),
}

/// The bounded queue in front of the exporter thread.
#[derive(Debug)]
pub struct QueueProcessor {
    tx: SyncSender<Msg>,
    worker: Mutex<Option<std::thread::JoinHandle<()>>>,
    /// Spans dropped because the queue was full, not yet logged (the
    /// exporter thread says so, at most once a minute).
    full: Arc<AtomicU64>,
}

impl std::fmt::Debug for Msg {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Msg::Span(_) => "Span",
            Msg::Flush(_) => "Flush",
            Msg::Shutdown(_) => "Shutdown",
        })
    }
}

impl QueueProcessor {
    /// Start the exporter thread (`smartllm-otel`) with `exporter`.
    pub fn start<E: SpanExporter + 'static>(exporter: E) -> std::io::Result<QueueProcessor> {
        let (tx, rx) = mpsc::sync_channel(QUEUE_SPANS);
        let full = Arc::new(AtomicU64::new(0));
        let dropped = full.clone();
        let worker = std::thread::Builder::new()
            .name("smartllm-otel".into())
            .spawn(move || run(exporter, rx, &dropped))?;
        Ok(QueueProcessor {
            tx,
            worker: Mutex::new(Some(worker)),
            full,
        })
    }

    /// Send a control message, waiting for room in the queue until `deadline`.
    fn control(&self, make: impl Fn(mpsc::Sender<()>) -> Msg, deadline: Instant) -> OTelSdkResult {
        let (done, wait) = mpsc::channel();
        let mut msg = make(done);
        loop {
            match self.tx.try_send(msg) {
                Ok(()) => break,
                Err(TrySendError::Full(m)) if Instant::now() < deadline => {
                    msg = m;
                    std::thread::sleep(Duration::from_millis(5));
                }
                Err(TrySendError::Full(_)) => return Err(OTelSdkError::Timeout(Duration::ZERO)),
                Err(TrySendError::Disconnected(_)) => return Err(OTelSdkError::AlreadyShutdown),
            }
        }
        match wait.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
            Ok(()) => Ok(()),
            Err(RecvTimeoutError::Timeout) => Err(OTelSdkError::Timeout(Duration::ZERO)),
            Err(RecvTimeoutError::Disconnected) => Err(OTelSdkError::AlreadyShutdown),
        }
    }
}

impl SpanProcessor for QueueProcessor {
    fn on_start(&self, _span: &mut opentelemetry_sdk::trace::Span, _cx: &opentelemetry::Context) {}

    /// Called on the thread that ended the span (a proxy thread): never waits.
    fn on_end(&self, span: SpanData) {
        match self.tx.try_send(Msg::Span(Box::new(span))) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) => {
                metrics::trace_spans_dropped("queue_full", 1);
                self.full.fetch_add(1, Ordering::Relaxed);
            }
            Err(TrySendError::Disconnected(_)) => metrics::trace_spans_dropped("shutdown", 1),
        }
    }

    fn force_flush(&self) -> OTelSdkResult {
        self.control(Msg::Flush, Instant::now() + Duration::from_secs(5))
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        let r = self.control(Msg::Shutdown, Instant::now() + timeout);
        if r.is_ok() {
            if let Some(w) = self.worker.lock().ok().and_then(|mut w| w.take()) {
                let _ = w.join();
            }
        }
        r
    }
}

/// The exporter thread: a batch goes out when it is full, when the oldest
/// span in it has waited [`BATCH_DELAY`], and on flush or shutdown.
/// How often a failing export is logged again.
const EXPORT_WARN_EVERY: Duration = Duration::from_secs(60);

fn run<E: SpanExporter>(exporter: E, rx: Receiver<Msg>, full: &AtomicU64) {
    let mut batch: Vec<SpanData> = Vec::with_capacity(BATCH_SPANS);
    let mut due: Option<Instant> = None;
    // A collector that is down is said once, then at most once a minute
    // with what was dropped meanwhile, and once when it answers again with
    // all it dropped (not a line a batch for as long as it is down): (when
    // said last, dropped since, dropped in all).
    let mut failing: Option<(Instant, u64, u64)> = None;
    // Spans the full queue dropped are said at most once a minute too.
    let mut full_said: Option<Instant> = None;
    let mut export = |batch: &mut Vec<SpanData>| {
        if full_said.is_none_or(|t| t.elapsed() >= EXPORT_WARN_EVERY) {
            let lost = full.swap(0, Ordering::Relaxed);
            if lost > 0 {
                tracing::warn!(spans = lost, "the span queue was full: spans dropped (the OTLP endpoint is slow or down, or there are more spans than it takes: lower tracing.sample_ratio)");
                full_said = Some(Instant::now());
            }
        }
        if batch.is_empty() {
            return;
        }
        let n = batch.len() as u64;
        let spans = std::mem::replace(batch, Vec::with_capacity(BATCH_SPANS));
        match futures_executor_block_on(exporter.export(spans)) {
            Ok(()) => {
                metrics::trace_spans_exported(n);
                if let Some((_, _, total)) = failing.take() {
                    tracing::info!(
                        spans_dropped = total,
                        "exporting spans to the OTLP endpoint works again"
                    );
                }
            }
            Err(e) => {
                metrics::trace_spans_dropped("export_failed", n);
                match &mut failing {
                    Some((said, dropped, total)) if said.elapsed() < EXPORT_WARN_EVERY => {
                        *dropped += n;
                        *total += n;
                    }
                    _ => {
                        let (dropped, total) = failing.map_or((n, n), |(_, d, t)| (d + n, t + n));
                        tracing::warn!(error = %e, spans = dropped, "exporting spans to the OTLP endpoint failed; they are dropped (said again at most once a minute while it fails)");
                        failing = Some((Instant::now(), 0, total));
                    }
                }
            }
        }
    };
    loop {
        let msg = match due {
            Some(at) => rx.recv_timeout(at.saturating_duration_since(Instant::now())),
            None => rx.recv().map_err(|_| RecvTimeoutError::Disconnected),
        };
        match msg {
            Ok(Msg::Span(s)) => {
                batch.push(*s);
                due.get_or_insert_with(|| Instant::now() + BATCH_DELAY);
                if batch.len() >= BATCH_SPANS {
                    export(&mut batch);
                    due = None;
                }
            }
            Ok(Msg::Flush(done)) => {
                export(&mut batch);
                due = None;
                let _ = done.send(());
            }
            Ok(Msg::Shutdown(done)) => {
                export(&mut batch);
                let _ = exporter.shutdown();
                let _ = done.send(());
                return;
            }
            Err(RecvTimeoutError::Timeout) => {
                export(&mut batch);
                due = None;
            }
            Err(RecvTimeoutError::Disconnected) => {
                export(&mut batch);
                return;
            }
        }
    }
}

/// Drive a future to completion on this thread. The OTLP exporter's future
/// only awaits [`StdHttp::send_bytes`], which does its I/O synchronously, and
/// its retry back-off, which sleeps the thread outside a Tokio runtime.
fn futures_executor_block_on<F: std::future::Future>(f: F) -> F::Output {
    use std::task::{Context, Poll, Wake, Waker};
    struct Unpark(std::thread::Thread);
    impl Wake for Unpark {
        fn wake(self: std::sync::Arc<Self>) {
            self.0.unpark();
        }
    }
    let waker = Waker::from(std::sync::Arc::new(Unpark(std::thread::current())));
    let mut cx = Context::from_waker(&waker);
    let mut f = std::pin::pin!(f);
    loop {
        match f.as_mut().poll(&mut cx) {
            Poll::Ready(v) => return v,
            Poll::Pending => std::thread::park(),
        }
    }
}

/// OTLP/HTTP over plain HTTP/1.1, one connection per export (batches go out
/// at most every [`BATCH_DELAY`]), bounded by `timeout` at every step.
#[derive(Debug)]
pub struct StdHttp {
    pub timeout: Duration,
}

#[async_trait]
impl HttpClient for StdHttp {
    async fn send_bytes(&self, request: Request<Bytes>) -> Result<Response<Bytes>, HttpError> {
        post(&request, self.timeout)
    }
}

fn post(request: &Request<Bytes>, timeout: Duration) -> Result<Response<Bytes>, HttpError> {
    let uri = request.uri();
    if uri.scheme_str() != Some("http") {
        return Err(format!("{uri}: only http:// endpoints are supported").into());
    }
    let host = uri.host().ok_or("the endpoint has no host")?;
    let port = uri.port_u16().unwrap_or(80);
    let authority = uri.authority().map_or(host, |a| a.as_str());
    let path = uri.path_and_query().map_or("/", |p| p.as_str());
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let mut last_err: Option<std::io::Error> = None;
    let mut stream = None;
    for addr in (host, port).to_socket_addrs()? {
        match TcpStream::connect_timeout(&addr, timeout) {
            Ok(s) => {
                stream = Some(s);
                break;
            }
            Err(e) => last_err = Some(e),
        }
    }
    let mut stream = match (stream, last_err) {
        (Some(s), _) => s,
        (None, Some(e)) => return Err(e.into()),
        (None, None) => return Err(format!("{host}: no address").into()),
    };
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    let _ = stream.set_nodelay(true);
    let body = request.body();
    let mut head = format!(
        "POST {path} HTTP/1.1\r\nhost: {authority}\r\ncontent-length: {}\r\nconnection: close\r\nuser-agent: smartllm/{}\r\n",
        body.len(),
        env!("CARGO_PKG_VERSION")
    );
    for (k, v) in request.headers() {
        if let Ok(v) = v.to_str() {
            head.push_str(k.as_str());
            head.push_str(": ");
            head.push_str(v);
            head.push_str("\r\n");
        }
    }
    head.push_str("\r\n");
    stream.write_all(head.as_bytes())?;
    stream.write_all(body)?;
    stream.flush()?;
    let mut buf = Vec::new();
    stream
        .take(MAX_RESPONSE as u64)
        .read_to_end(&mut buf)
        .or_else(|e| if buf.is_empty() { Err(e) } else { Ok(0) })?;
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut resp = httparse::Response::new(&mut headers);
    let head_len = match resp.parse(&buf)? {
        httparse::Status::Complete(n) => n,
        httparse::Status::Partial => {
            return Err("the collector's answer ended in its header".into())
        }
    };
    let status = resp.code.ok_or("the collector's answer has no status")?;
    let mut out = Response::builder().status(status);
    for h in resp.headers.iter() {
        out = out.header(h.name, h.value);
    }
    Ok(out.body(Bytes::copy_from_slice(&buf[head_len..]))?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use opentelemetry::trace::{Tracer as _, TracerProvider as _};
    use opentelemetry_sdk::trace::SdkTracerProvider;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::{Arc, Condvar};

    /// An exporter stuck until the test opens it (a collector that hangs).
    #[derive(Debug, Default)]
    struct Gate {
        open: Arc<(Mutex<bool>, Condvar)>,
        got: Arc<AtomicUsize>,
    }

    impl SpanExporter for Gate {
        async fn export(&self, batch: Vec<SpanData>) -> OTelSdkResult {
            let (lock, cv) = &*self.open;
            let mut open = lock.lock().unwrap();
            while !*open {
                open = cv.wait(open).unwrap();
            }
            self.got.fetch_add(batch.len(), Ordering::SeqCst);
            Ok(())
        }
    }

    #[test]
    fn a_stuck_exporter_never_blocks_ending_spans_and_the_queue_stays_bounded() {
        let gate = Gate::default();
        let (open, got) = (gate.open.clone(), gate.got.clone());
        let processor = QueueProcessor::start(gate).unwrap();
        let full = processor.full.clone();
        let provider = SdkTracerProvider::builder()
            .with_span_processor(processor)
            .build();
        let tracer = provider.tracer("test");
        let started = Instant::now();
        let total = QUEUE_SPANS + 3 * BATCH_SPANS;
        for _ in 0..total {
            drop(tracer.start("span"));
        }
        // Ending spans only hands them over (or drops them): no waiting on the exporter.
        assert!(started.elapsed() < Duration::from_secs(5));
        // What the full queue dropped waits to be said...
        assert!(full.load(Ordering::SeqCst) >= (2 * BATCH_SPANS) as u64);
        *open.0.lock().unwrap() = true;
        open.1.notify_all();
        provider.force_flush().unwrap();
        // ... and the exporter thread said it (a log line, not only a metric).
        assert_eq!(full.load(Ordering::SeqCst), 0);
        let n = got.load(Ordering::SeqCst);
        assert!(
            (QUEUE_SPANS..=QUEUE_SPANS + BATCH_SPANS).contains(&n),
            "{n} of {total} spans exported"
        );
        provider
            .shutdown_with_timeout(Duration::from_secs(5))
            .unwrap();
    }

    #[test]
    fn the_http_client_posts_and_reads_the_answer() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let server = std::thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            let mut buf = vec![0u8; 4096];
            let mut got = Vec::new();
            while !got.ends_with(b"payload") {
                let n = s.read(&mut buf).unwrap();
                assert!(n > 0);
                got.extend_from_slice(&buf[..n]);
            }
            s.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                .unwrap();
            String::from_utf8(got).unwrap()
        });
        let req = Request::builder()
            .method("POST")
            .uri(format!("http://{addr}/v1/traces"))
            .header("content-type", "application/x-protobuf")
            .body(Bytes::from_static(b"payload"))
            .unwrap();
        let resp = post(&req, Duration::from_secs(5)).unwrap();
        assert_eq!(resp.status(), 200);
        assert_eq!(resp.body().as_ref(), b"ok");
        let sent = server.join().unwrap();
        assert!(sent.starts_with("POST /v1/traces HTTP/1.1\r\n"), "{sent}");
        assert!(
            sent.contains("content-type: application/x-protobuf\r\n"),
            "{sent}"
        );
        assert!(sent.contains("content-length: 7\r\n"), "{sent}");
        // Nothing listens there: an error, not a hang.
        let req = Request::builder()
            .uri("http://127.0.0.1:1/v1/traces")
            .body(Bytes::new())
            .unwrap();
        assert!(post(&req, Duration::from_secs(1)).is_err());
    }
}
