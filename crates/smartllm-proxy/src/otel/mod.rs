//! OpenTelemetry spans of a request (`tracing:` in smartllm.yaml), exported
//! by OTLP/HTTP (protobuf) from a thread of their own ([`export`]).
//!
//! A request is one trace: the server span (`POST /v1/chat/completions`),
//! continued from the client's W3C `traceparent`/`tracestate` or started
//! here, and its phases as children: `admit` (with `auth`), `cache lookup`
//! (with `embed` and `search` where a semantic lookup ran them), `route`,
//! one client span per upstream attempt, `chat MODEL` (its span is the parent in the
//! `traceparent` the upstream gets) and, under a streamed attempt, `stream`
//! (to the last byte). Sampling is parent-based: a client's sampled flag
//! decides for its trace, `sample_ratio` for new ones; an unsampled request
//! still sends upstream a `traceparent` of its own (flag 00).
//!
//! The spans live in the request's context ([`crate::Ctx::trace`]), never in
//! a thread-local "current" context (a request moves between threads at every
//! await). They carry no prompt or answer text: models, usage counts, cache
//! outcome, route, provider, status and error codes, and the tenant only as
//! `metrics.label_names` allows.

mod export;

use crate::ctx::Ctx;
use opentelemetry::propagation::TextMapPropagator;
use opentelemetry::trace::{SpanKind, Status, TraceContextExt, Tracer as _, TracerProvider as _};
use opentelemetry::{Context, InstrumentationScope, KeyValue};
use opentelemetry_http::HeaderExtractor;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{Sampler, SdkTracer, SdkTracerProvider, SpanExporter as _};
use opentelemetry_sdk::Resource;
use pingora_http::RequestHeader;
use pingora_proxy::Session;
use smartllm_config::TracingConfig;
use smartllm_protocol::Endpoint;
use std::borrow::Cow;
use std::time::{Duration, SystemTime};

/// `error.type` of an attempt the provider answered with a 5xx or a 429
/// that was passed on to the client (its status is on the span too).
pub const UPSTREAM_STATUS: &str = "upstream_status";

pub use export::QUEUE_SPANS;

/// One OTLP request's bound (connect, send, answer), retries included.
const EXPORT_TIMEOUT: Duration = Duration::from_secs(2);

/// The tracer of a gateway with `tracing.otlp_endpoint` set.
pub struct Tracing {
    provider: SdkTracerProvider,
    tracer: SdkTracer,
}

impl Tracing {
    /// The tracer for `cfg`, with its exporter thread started; None when
    /// tracing is off (or the exporter could not be built: logged).
    pub fn start(cfg: &TracingConfig) -> Option<Tracing> {
        let endpoint = cfg.otlp_endpoint.as_deref()?;
        match Self::build(cfg, endpoint) {
            Ok(t) => {
                tracing::info!(endpoint, sample_ratio = cfg.sample_ratio, service_name = %cfg.service_name, "OpenTelemetry tracing on (OTLP/HTTP)");
                Some(t)
            }
            Err(e) => {
                tracing::error!(endpoint, error = %e, "OpenTelemetry tracing is off: the exporter could not be started");
                None
            }
        }
    }

    fn build(cfg: &TracingConfig, endpoint: &str) -> Result<Tracing, String> {
        use opentelemetry_otlp::{Protocol, WithExportConfig, WithHttpConfig};
        let mut exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .with_http_client(export::StdHttp {
                timeout: EXPORT_TIMEOUT,
            })
            .with_endpoint(endpoint)
            .with_protocol(Protocol::HttpBinary)
            .with_timeout(EXPORT_TIMEOUT)
            .build()
            .map_err(|e| e.to_string())?;
        let resource = Resource::builder()
            .with_service_name(cfg.service_name.clone())
            .with_attribute(KeyValue::new("service.version", env!("CARGO_PKG_VERSION")))
            .build();
        exporter.set_resource(&resource);
        let processor = export::QueueProcessor::start(exporter).map_err(|e| e.to_string())?;
        let provider = SdkTracerProvider::builder()
            .with_span_processor(processor)
            .with_sampler(Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(
                cfg.sample_ratio,
            ))))
            .with_resource(resource)
            .build();
        let tracer = provider.tracer_with_scope(
            InstrumentationScope::builder("smartllm")
                .with_version(env!("CARGO_PKG_VERSION"))
                .build(),
        );
        Ok(Tracing { provider, tracer })
    }

    /// Export what is queued and stop the exporter, within `bound`.
    pub fn shutdown(&self, bound: Duration) {
        match self.provider.shutdown_with_timeout(bound) {
            Ok(()) => tracing::debug!("spans flushed"),
            Err(e) => tracing::warn!(error = %e, "spans not flushed at shutdown"),
        }
    }

    /// The server span of a request that starts now, continuing the client's
    /// trace context when it sent a valid one.
    pub fn request(&self, session: &Session, request_id: &str) -> RequestTrace {
        let h = session.req_header();
        let parent = TraceContextPropagator::new()
            .extract_with_context(&Context::new(), &HeaderExtractor(&h.headers));
        let method = h.method.as_str();
        let name = match route_of(h.uri.path()) {
            Some(route) => format!("{method} {route}"),
            None => method.to_string(),
        };
        // TLS on this connection (the listener's `tls`): the URL's scheme.
        let tls = session.digest().is_some_and(|d| d.ssl_digest.is_some());
        let mut attrs = vec![
            KeyValue::new("http.request.method", method.to_string()),
            KeyValue::new("url.path", h.uri.path().to_string()),
            KeyValue::new("url.scheme", if tls { "https" } else { "http" }),
            KeyValue::new("smartllm.request_id", request_id.to_string()),
        ];
        if let Some(route) = route_of(h.uri.path()) {
            attrs.push(KeyValue::new("http.route", route));
        }
        let span = self
            .tracer
            .span_builder(name)
            .with_kind(SpanKind::Server)
            .with_attributes(attrs)
            .start_with_context(&self.tracer, &parent);
        RequestTrace {
            tracer: self.tracer.clone(),
            cx: parent.with_span(span),
            attempt: None,
        }
    }
}

/// OpenTelemetry's `gen_ai.operation.name` of a request to `endpoint`.
pub fn gen_ai_operation(endpoint: Endpoint) -> &'static str {
    match endpoint {
        Endpoint::Embeddings => "embeddings",
        Endpoint::Completions => "text_completion",
        _ => "chat",
    }
}

/// The span name's route: the API path, or its pattern (ids left out). Any
/// other path is left out of the name (it is the client's to choose).
fn route_of(path: &str) -> Option<Cow<'static, str>> {
    let p = path.trim_end_matches('/');
    if Endpoint::from_path(p).is_some() {
        // One of the API's own paths (with or without `/v1`).
        return Some(if p.starts_with("/v1/") {
            Cow::Owned(p.to_string())
        } else {
            Cow::Owned(format!("/v1{p}"))
        });
    }
    Some(Cow::Borrowed(match p {
        "/v1/models" | "/models" => "/v1/models",
        "/v1/smartllm/usage" => "/v1/smartllm/usage",
        _ if p.starts_with("/v1/models/") => "/v1/models/{id}",
        _ if p.starts_with("/v1/responses/") => "/v1/responses/{id}",
        _ => return None,
    }))
}

/// A request's trace: its server span and the upstream attempt in progress.
pub struct RequestTrace {
    tracer: SdkTracer,
    /// Holds the server span.
    cx: Context,
    /// Holds the span of the upstream attempt in progress.
    attempt: Option<Context>,
}

impl RequestTrace {
    fn child(
        &self,
        parent: &Context,
        name: impl Into<Cow<'static, str>>,
        kind: SpanKind,
    ) -> Context {
        let span = self
            .tracer
            .span_builder(name)
            .with_kind(kind)
            .start_with_context(&self.tracer, parent);
        parent.with_span(span)
    }

    /// Set an attribute of the server span.
    pub fn set(&self, kv: KeyValue) {
        self.cx.span().set_attribute(kv);
    }

    /// Open the span of an upstream attempt (ending the one before if it was
    /// left open), named as OpenTelemetry's GenAI conventions name a client
    /// span: `{gen_ai.operation.name} {gen_ai.request.model}` ("chat
    /// gpt-4o-mini"). The `traceparent` (and `tracestate`) the upstream gets
    /// name it as their parent.
    pub fn start_attempt(&mut self, operation: &str, model: &str, attrs: Vec<KeyValue>) {
        if let Some(prev) = self.attempt.take() {
            prev.span().end();
        }
        let cx = self.child(&self.cx, format!("{operation} {model}"), SpanKind::Client);
        cx.span().set_attributes(attrs);
        self.attempt = Some(cx);
    }

    /// The W3C trace context headers naming the attempt span as the parent.
    pub fn inject(&self, header: &mut RequestHeader) -> pingora_error::Result<()> {
        let Some(cx) = &self.attempt else {
            return Ok(());
        };
        let span = cx.span();
        let sc = span.span_context();
        header.insert_header(
            "traceparent",
            format!(
                "00-{}-{}-{:02x}",
                sc.trace_id(),
                sc.span_id(),
                sc.trace_flags().to_u8()
            ),
        )?;
        let state = sc.trace_state().header();
        if state.is_empty() {
            header.remove_header("tracestate");
        } else {
            header.insert_header("tracestate", state)?;
        }
        Ok(())
    }

    /// End the attempt span: `outcome` is ok, retried or failed; `error` the
    /// error code of a failed one.
    pub fn end_attempt(
        &mut self,
        outcome: &'static str,
        ctx_status: u16,
        error: Option<&'static str>,
    ) {
        let Some(cx) = self.attempt.take() else {
            return;
        };
        let span = cx.span();
        span.set_attribute(KeyValue::new("smartllm.outcome", outcome));
        if ctx_status > 0 && (outcome == "ok" || error == Some(UPSTREAM_STATUS)) {
            span.set_attribute(KeyValue::new(
                "http.response.status_code",
                ctx_status as i64,
            ));
        }
        if let Some(code) = error {
            span.set_attribute(KeyValue::new("error.type", code));
            span.set_status(Status::error(code));
        }
        span.end();
    }

    /// Finish the trace (Pingora's `logging`): the request's outcome on the
    /// server span, then its end.
    pub fn finish(mut self, ctx: &Ctx, status: u16) {
        if let Some(cx) = self.attempt.take() {
            cx.span().end();
        }
        let span = self.cx.span();
        let mut attrs = vec![
            KeyValue::new("http.response.status_code", status as i64),
            KeyValue::new("smartllm.endpoint", ctx.endpoint),
            KeyValue::new("smartllm.stream", ctx.stream),
            KeyValue::new("smartllm.attempts", ctx.attempts as i64),
        ];
        let mut put = |k: &'static str, v: Option<&str>| {
            if let Some(v) = v {
                attrs.push(KeyValue::new(k, v.to_string()));
            }
        };
        put("smartllm.route", ctx.route.as_deref());
        put("smartllm.model", ctx.model());
        put("smartllm.provider", ctx.provider.as_deref());
        put("gen_ai.response.model", ctx.upstream_model.as_deref());
        put("smartllm.cache", ctx.cache_status);
        put("error.type", ctx.error_code);
        if let Some(s) = ctx.cache_similarity {
            attrs.push(KeyValue::new("smartllm.cache.similarity", s as f64));
        }
        if let Some(s) = ctx.cache_verifier {
            attrs.push(KeyValue::new("smartllm.cache.verifier", s as f64));
        }
        if let Some(u) = ctx.usage {
            attrs.push(KeyValue::new(
                "gen_ai.usage.input_tokens",
                u.prompt_tokens as i64,
            ));
            attrs.push(KeyValue::new(
                "gen_ai.usage.output_tokens",
                u.completion_tokens as i64,
            ));
            if ctx.usage_estimated {
                attrs.push(KeyValue::new("smartllm.usage.estimated", true));
            }
        }
        if ctx.key.is_some() {
            let hashed = ctx.rt.as_ref().is_none_or(|rt| {
                rt.config.metrics.label_names == smartllm_config::LabelNames::Hashed
            });
            let tenant = if hashed {
                smartllm_ledger::labels::hash_name(&ctx.tenant)
            } else {
                ctx.tenant.clone()
            };
            attrs.push(KeyValue::new("smartllm.tenant", tenant));
        }
        if ctx.client_gone {
            attrs.push(KeyValue::new("smartllm.client_gone", true));
        }
        span.set_attributes(attrs);
        if status >= 500 {
            span.set_status(Status::error(ctx.error_code.unwrap_or("server_error")));
        } else if let (Some(code), 200) = (ctx.error_code, status) {
            // A stream that failed after its 200.
            span.set_status(Status::error(code));
        }
        span.end();
    }
}

/// A phase's span (a no-op without tracing): a child of the server span, or
/// of the upstream attempt for `stream`. Ended by [`Phase::end`] or when
/// dropped (an early return).
pub struct Phase(Option<(SdkTracer, Context)>);

impl Phase {
    /// A phase of the request, starting now.
    pub fn start(trace: &Option<RequestTrace>, name: &'static str) -> Phase {
        Phase(
            trace
                .as_ref()
                .map(|t| (t.tracer.clone(), t.child(&t.cx, name, SpanKind::Internal))),
        )
    }

    /// A phase of the upstream attempt in progress (the stream), starting now.
    pub fn under_attempt(trace: &Option<RequestTrace>, name: &'static str) -> Phase {
        Phase(trace.as_ref().and_then(|t| {
            let parent = t.attempt.as_ref()?;
            Some((t.tracer.clone(), t.child(parent, name, SpanKind::Internal)))
        }))
    }

    /// A step of this phase, starting now.
    pub fn child(&self, name: &'static str) -> Phase {
        Phase(self.0.as_ref().map(|(tracer, cx)| {
            let span = tracer
                .span_builder(name)
                .with_kind(SpanKind::Internal)
                .start_with_context(tracer, cx);
            (tracer.clone(), cx.with_span(span))
        }))
    }

    pub fn set(&self, kv: KeyValue) {
        if let Some((_, cx)) = &self.0 {
            cx.span().set_attribute(kv);
        }
    }

    /// Mark the phase failed with an error code.
    pub fn error(&self, code: &'static str) {
        if let Some((_, cx)) = &self.0 {
            let span = cx.span();
            span.set_attribute(KeyValue::new("error.type", code));
            span.set_status(Status::error(code));
        }
    }

    /// A step of this phase that ran from `start` to `end` (timed elsewhere).
    pub fn step(&self, name: &'static str, start: SystemTime, end: SystemTime) {
        if let Some((tracer, cx)) = &self.0 {
            let span = tracer
                .span_builder(name)
                .with_kind(SpanKind::Internal)
                .with_start_time(start)
                .start_with_context(tracer, cx);
            cx.with_span(span).span().end_with_timestamp(end);
        }
    }

    pub fn end(self) {
        if let Some((_, cx)) = self.0 {
            cx.span().end();
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn span_names_hold_no_client_chosen_path() {
        use super::route_of;
        assert_eq!(
            route_of("/v1/chat/completions").as_deref(),
            Some("/v1/chat/completions")
        );
        assert_eq!(
            route_of("/chat/completions/").as_deref(),
            Some("/v1/chat/completions")
        );
        assert_eq!(route_of("/v1/messages").as_deref(), Some("/v1/messages"));
        assert_eq!(
            route_of("/v1/responses/resp_123").as_deref(),
            Some("/v1/responses/{id}")
        );
        assert_eq!(
            route_of("/v1/models/gpt-x").as_deref(),
            Some("/v1/models/{id}")
        );
        assert_eq!(route_of("/v1/tell-me-a-secret"), None);
    }
}
