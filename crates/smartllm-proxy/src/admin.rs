//! The admin listener (loopback by default): `/metrics`, `/healthz`, `/readyz`,
//! `/admin/config` and `POST /admin/reload`. Nothing here reveals a secret:
//! provider keys are reported only as set, missing or not needed.

use crate::reload::{reload, ReloadOutcome};
use crate::Shared;
use async_trait::async_trait;
use http::Response;
use pingora_core::apps::http_app::ServeHttp;
use pingora_core::protocols::http::ServerSession;
use serde_json::{json, Value};
use smartllm_cache::Purge;
use smartllm_protocol::admin_query::{self, PurgeTarget, QueryError};
use std::sync::Arc;
use std::time::UNIX_EPOCH;

pub struct AdminApp {
    pub shared: Arc<Shared>,
}

fn reply(status: u16, content_type: &str, body: Vec<u8>) -> Response<Vec<u8>> {
    Response::builder()
        .status(status)
        .header("content-type", content_type)
        .header("content-length", body.len())
        .header("cache-control", "no-store")
        .body(body)
        .unwrap_or_else(|_| Response::new(Vec::new()))
}

fn json_reply(status: u16, v: &Value) -> Response<Vec<u8>> {
    reply(
        status,
        "application/json",
        serde_json::to_vec_pretty(v).unwrap_or_default(),
    )
}

impl AdminApp {
    /// Pingora starts the admin and API services side by side, so the admin
    /// listener can answer before the API listener is bound: ready also means
    /// the API port accepts a connection (probed until it first does).
    async fn api_listening(&self) -> bool {
        use std::sync::atomic::Ordering;
        if self.shared.api_listening.load(Ordering::Relaxed) {
            return true;
        }
        let mut addr = self.shared.runtime.load().config.server.listen;
        if addr.ip().is_unspecified() {
            addr.set_ip(if addr.is_ipv4() {
                std::net::Ipv4Addr::LOCALHOST.into()
            } else {
                std::net::Ipv6Addr::LOCALHOST.into()
            });
        }
        let up = matches!(
            tokio::time::timeout(
                std::time::Duration::from_millis(500),
                tokio::net::TcpStream::connect(addr)
            )
            .await,
            Ok(Ok(_))
        );
        if up {
            self.shared.api_listening.store(true, Ordering::Relaxed);
        }
        up
    }

    fn readyz(&self, listening: bool) -> (bool, Value) {
        let s = &self.shared;
        let rt = s.runtime.load_full();
        let embedder = match (&s.components.embedder, &s.components.self_test) {
            (Some(e), Some(t)) => {
                let i = e.info();
                let h = e.health();
                json!({
                    "ready": t.nearest_ok && h.ok(),
                    "workers_live": h.workers_live,
                    "failing_runs": h.failing_runs,
                    "last_failure_s": h.last_failure_s,
                    "model": i.model.display().to_string(),
                    "onnxruntime": i.onnxruntime.display().to_string(),
                    "device": i.device,
                    "threads": i.threads,
                    "dim": i.dim,
                    "max_seq_len": i.max_seq_len,
                    "load_ms": i.load_ms,
                    "self_test": {
                        "embed_ms": t.embed_ms,
                        "paraphrase_cosine": t.paraphrase_cosine,
                        "unrelated_cosine": t.unrelated_cosine,
                        "faiss_nearest_ok": t.nearest_ok,
                    }
                })
            }
            _ => json!({"ready": false}),
        };
        let store = match &s.components.store {
            Some(st) => {
                let i = st.info();
                json!({"ready": true, "path": i.path.display().to_string(), "column_families": i.column_families,
                    "estimated_keys": i.estimated_keys, "live_data_bytes": i.live_data_bytes})
            }
            None => json!({"ready": false}),
        };
        let mut models = serde_json::Map::new();
        for (name, pool) in &rt.pools {
            let backends: Vec<Value> = pool
                .lb
                .backends()
                .get_backend()
                .iter()
                .map(|b| json!({"address": b.addr.to_string(), "healthy": pool.lb.backends().ready(b), "weight": b.weight}))
                .collect();
            models.insert(name.clone(), json!({"backends": backends}));
        }
        let ready = s.ready() && listening;
        (
            ready,
            json!({
                "status": if s.stopping.load(std::sync::atomic::Ordering::SeqCst) || s.draining.load(std::sync::atomic::Ordering::SeqCst) { "draining" } else if ready { "ready" } else { "not_ready" },
                "listener": {
                    "ready": listening,
                    "address": rt.config.server.listen.to_string(),
                    "h2c": rt.config.server.h2c,
                    "tls": rt.tls.as_ref().map(|t| json!({
                        "certificate_sha256": t.fingerprint,
                        "client_certificates": t.client_verifier.is_some(),
                    })),
                },
                "admin_listener": {
                    "address": rt.config.server.admin_listen.to_string(),
                    "tls": rt.admin_tls.as_ref().map(|t| json!({
                        "certificate_sha256": t.fingerprint,
                        "client_certificates": t.client_verifier.is_some(),
                    })),
                },
                "config": {"version": rt.version, "digest": rt.config.digest, "demo_mode": rt.demo_mode},
                "embedder": embedder,
                "store": store,
                "upstreams": models,
            }),
        )
    }

    fn config(&self) -> Value {
        let rt = self.shared.runtime.load_full();
        let status = self
            .shared
            .reload_status
            .lock()
            .map(|s| s.clone())
            .unwrap_or_default();
        let providers: Vec<Value> = rt
            .providers
            .values()
            .map(|p| {
                let key = match &p.key {
                    Ok(Some(_)) => "set".to_string(),
                    Ok(None) if p.demo => "demo".to_string(),
                    Ok(None) => "not needed".to_string(),
                    Err(e) => format!("missing: {e}"),
                };
                json!({"name": p.name(), "kind": p.cfg.kind.as_str(), "base_url": format!("{}://{}{}", if p.url.tls {"https"} else {"http"}, p.url.authority(), p.url.path), "key": key, "demo": p.demo})
            })
            .collect();
        let models: Vec<Value> = rt
            .config
            .models
            .iter()
            .map(|m| json!({"name": m.name, "deployments": m.deployments.iter().map(|d| json!({"provider": d.provider, "model": d.upstream_model, "weight": d.weight})).collect::<Vec<_>>()}))
            .collect();
        json!({
            "version": rt.version,
            "digest": rt.config.digest,
            "dir": rt.config.dir.display().to_string(),
            "demo_mode": rt.demo_mode,
            "providers": providers,
            "models": models,
            "routes": rt.config.routes.values().map(|r| json!({"name": r.name, "model": r.model})).collect::<Vec<_>>(),
            "reload": {
                "last_result": status.last_result,
                "last_error": status.last_error,
                "last_at": status.last_at.and_then(|t| t.duration_since(UNIX_EPOCH).ok()).map(|d| d.as_secs()),
                "restart_required": status.restart_required,
                "warnings": status.warnings,
            }
        })
    }
}

/// Keeps web pages out of an admin API that has no token (it is then on
/// loopback, where any page the operator's browser opens can send requests
/// to it). A page whose host name was made to point at 127.0.0.1 (DNS
/// rebinding) is refused by its `Host`, which must be a loopback address or
/// `localhost` (or absent: browsers always send one); a form's POST from
/// another origin (cross-site request forgery: purging the cache, a reload)
/// is refused by [`cross_site`], for every method but GET and HEAD. With a
/// token, browsers cannot send it for another site (the dashboard's cookie
/// admits GET only) and the host name is the operator's business; but a
/// page can still send the dashboard's sign-in (`sign_in`: `/ui?token=` as
/// an `<img>`, a form posted to `/ui/login`) a wrong token, and each one
/// would count against the operator's own address (see [`Guesses`]) until
/// its CLI is answered 429: those are refused from another site too, before
/// they are counted.
fn browser_guard(
    method: &str,
    headers: &http::HeaderMap,
    open: bool,
    sign_in: bool,
) -> Result<(), &'static str> {
    let header = |n: &str| headers.get(n).and_then(|v| v.to_str().ok());
    let host = header("host").unwrap_or("");
    if !open {
        if sign_in && cross_site(headers, host) {
            return Err("The dashboard takes its token only from its own sign-in form or an address typed into the browser, not from another site's page.");
        }
        return Ok(());
    }
    if !host.is_empty() && !loopback_host(host) {
        return Err("The admin API without a token answers only to a loopback Host (127.0.0.1, [::1] or localhost).");
    }
    if method == "GET" || method == "HEAD" {
        return Ok(());
    }
    if cross_site(headers, host) {
        return Err("A request from another origin (a web page) may not change anything through the admin API.");
    }
    Ok(())
}

/// Whether a browser sent the request for another site's page: by
/// `Sec-Fetch-Site` (an address typed or bookmarked reads `none`) or, from
/// browsers without it, by an `Origin` that is not `host`'s. Tools send
/// neither.
fn cross_site(headers: &http::HeaderMap, host: &str) -> bool {
    let header = |n: &str| headers.get(n).and_then(|v| v.to_str().ok());
    match header("sec-fetch-site") {
        Some(site) => site != "same-origin" && site != "none",
        None => header("origin").is_some_and(|origin| {
            let authority = origin
                .split_once("://")
                .map_or(origin, |(_, rest)| rest)
                .trim_end_matches('/');
            !authority.eq_ignore_ascii_case(host)
        }),
    }
}

/// `host[:port]` names a loopback address or `localhost`.
fn loopback_host(host: &str) -> bool {
    let name = if let Some(rest) = host.strip_prefix('[') {
        rest.split_once(']').map_or(rest, |(ip, _)| ip)
    } else {
        host.rsplit_once(':').map_or(host, |(h, port)| {
            if port.chars().all(|c| c.is_ascii_digit()) {
                h
            } else {
                host
            }
        })
    };
    name.eq_ignore_ascii_case("localhost")
        || name
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// Compare secrets without leaking where they differ through timing.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    // A length mismatch alone decides the answer (folding the lengths' XOR
    // into a byte would let lengths 65,536 apart compare equal).
    let mut diff = u8::from(a.len() != b.len());
    for i in 0..a.len().max(b.len()) {
        diff |= a.get(i).copied().unwrap_or(0) ^ b.get(i).copied().unwrap_or(0xff);
    }
    diff == 0
}

/// An OpenAI-shaped `invalid_request` error with `status`.
fn invalid(status: u16, message: String) -> Response<Vec<u8>> {
    json_reply(
        status,
        &json!({"error": {"message": message, "type": "invalid_request_error", "param": null, "code": "invalid_request"}}),
    )
}

/// A refused admin query as a 400 naming the parameter.
fn query_error(e: QueryError) -> Response<Vec<u8>> {
    json_reply(
        400,
        &json!({"error": {"message": e.message, "type": "invalid_request_error", "param": e.param, "code": e.code}}),
    )
}

fn ledger_unavailable() -> Response<Vec<u8>> {
    json_reply(
        409,
        &json!({"error": {"message": "the ledger is not available", "type": "invalid_request_error", "param": null, "code": "ledger_unavailable"}}),
    )
}

fn ledger_error(e: impl std::fmt::Display) -> Response<Vec<u8>> {
    json_reply(
        500,
        &json!({"error": {"message": e.to_string(), "type": "server_error", "param": null, "code": "ledger_error"}}),
    )
}

/// The grouping value of the row that sums the rows past a costs query's
/// `limit` (in every grouping column).
const OTHER_ROWS: &str = "(other)";

/// The first `limit` of `rows` (the ledger gives them costliest first) and,
/// when there were more, the rest summed into one row whose every grouping
/// column reads [`OTHER_ROWS`] (added to a kept row of that very group, such
/// as the ledger's own `(other)` tag, rather than repeating it); with the
/// number of rows summed so (0: nothing was cut).
fn cut_rows(
    mut rows: Vec<smartllm_ledger::Row>,
    dims: &[smartllm_ledger::Dim],
    limit: usize,
) -> (Vec<smartllm_ledger::Row>, usize) {
    if rows.len() <= limit {
        return (rows, 0);
    }
    let rest = rows.split_off(limit);
    let cut = rest.len();
    let mut other = smartllm_ledger::Row {
        group: dims.iter().map(|d| (*d, OTHER_ROWS.to_string())).collect(),
        ..smartllm_ledger::Row::default()
    };
    for r in &rest {
        add_row(&mut other, r);
    }
    match rows.iter_mut().find(|r| r.group == other.group) {
        Some(same) => add_row(same, &other),
        None => rows.push(other),
    }
    (rows, cut)
}

/// `into += r`, counter by counter (saturating, as the ledger sums).
fn add_row(into: &mut smartllm_ledger::Row, r: &smartllm_ledger::Row) {
    into.requests = into.requests.saturating_add(r.requests);
    into.input_tokens = into.input_tokens.saturating_add(r.input_tokens);
    into.output_tokens = into.output_tokens.saturating_add(r.output_tokens);
    into.cached_tokens = into.cached_tokens.saturating_add(r.cached_tokens);
    into.cache_write_tokens = into.cache_write_tokens.saturating_add(r.cache_write_tokens);
    into.reasoning_tokens = into.reasoning_tokens.saturating_add(r.reasoning_tokens);
    into.cost_usd += r.cost_usd;
    into.saved_usd += r.saved_usd;
    into.errors = into.errors.saturating_add(r.errors);
    into.estimated = into.estimated.saturating_add(r.estimated);
}

/// `/admin/costs`'s answer from the ledger's rows: at most `limit` of them
/// by name plus the `(other)` row (see [`cut_rows`]), as CSV or as JSON with
/// the window, the total of every row, `truncated` and `other_rows` (how
/// many rows the `(other)` row sums). Run off the async threads: a long
/// window grouped finely holds many rows, and serializing them takes time.
fn costs_answer(
    rows: Vec<smartllm_ledger::Row>,
    dims: &[smartllm_ledger::Dim],
    from: u64,
    to: u64,
    csv: bool,
    limit: usize,
) -> Response<Vec<u8>> {
    let (mut requests, mut input_tokens, mut output_tokens) = (0u64, 0u64, 0u64);
    let (mut cost_usd, mut saved_usd) = (0.0f64, 0.0f64);
    for r in &rows {
        requests = requests.saturating_add(r.requests);
        input_tokens = input_tokens.saturating_add(r.input_tokens);
        output_tokens = output_tokens.saturating_add(r.output_tokens);
        cost_usd += r.cost_usd;
        saved_usd += r.saved_usd;
    }
    let (rows, other_rows) = cut_rows(rows, dims, limit);
    if csv {
        return reply(
            200,
            "text/csv; charset=utf-8",
            smartllm_ledger::to_csv(&rows, dims).into_bytes(),
        );
    }
    json_reply(
        200,
        &json!({
            "from": smartllm_ledger::format_hour(from / 3600),
            "to": smartllm_ledger::format_hour(to.div_ceil(3600)),
            "rows": rows,
            "total": {
                "requests": requests,
                "cost_usd": cost_usd,
                "saved_usd": saved_usd,
                "input_tokens": input_tokens,
                "output_tokens": output_tokens,
            },
            "truncated": other_rows > 0,
            "other_rows": other_rows,
        }),
    )
}

impl AdminApp {
    /// `GET /admin/costs?since=24h|from=UNIX&to=UNIX&group_by=model,app[&format=csv][&limit=1000]`
    /// `[&tenant=T][&app=A|T/A][&key=NAME]`
    /// (group_by: hour, day, tenant, app, key, model, provider, route, tag;
    /// limit: the costliest rows answered by name, the rest summed into one).
    async fn costs(&self, query: &str) -> Response<Vec<u8>> {
        let Some(ledger) = self.shared.ledger.clone() else {
            return ledger_unavailable();
        };
        let q = match admin_query::costs(query, smartllm_ledger::now_secs()) {
            Ok(q) => q,
            Err(e) => return query_error(e),
        };
        let (from, to, csv, limit) = (q.from, q.to, q.csv, q.limit);
        // `app=tenant/app` names both (an app's name alone is every
        // tenant's app of that name).
        let (tenant, app) = match q.app.as_deref().and_then(|a| a.split_once('/')) {
            Some((t, a)) => {
                if q.tenant.as_deref().is_some_and(|x| x != t) {
                    return query_error(QueryError::invalid(
                        "app",
                        format!(
                            "app={t}/{a} names another tenant than tenant={}",
                            q.tenant.unwrap_or_default()
                        ),
                    ));
                }
                (Some(t.to_string()), Some(a.to_string()))
            }
            None => (q.tenant.clone(), q.app.clone()),
        };
        let filter = smartllm_ledger::Filter {
            tenant,
            app,
            key: q.key.clone(),
        };
        let mut dims = vec![smartllm_ledger::Dim::Model];
        if let Some(names) = q.group_by {
            dims.clear();
            for d in names {
                match smartllm_ledger::Dim::parse(&d) {
                    Some(d) => dims.push(d),
                    None => {
                        return query_error(QueryError::invalid(
                            "group_by",
                            format!(
                                "unknown group_by {d:?}: use hour, day, tenant, app, key, model, provider, route or tag"
                            ),
                        ))
                    }
                }
            }
        }
        let by = dims;
        // The rows are read, cut to `limit` and serialized off the async
        // threads (the admin listener's /readyz and /metrics share them).
        let answer = if q.fleet {
            let Some(fleet) = self.shared.fleet_sync.clone().filter(|f| f.shares_costs()) else {
                return json_reply(
                    409,
                    &json!({"error": {"message": "the fleet's cost view needs fleet.redis with fleet.share_costs", "type": "invalid_request_error", "param": "scope", "code": "fleet_unavailable"}}),
                );
            };
            if to - from > crate::fleet_sync::COST_RETENTION_SECS {
                return query_error(QueryError::invalid(
                    "since",
                    "the fleet keeps 400 days of costs: ask for a shorter window".into(),
                ));
            }
            // This gateway's latest counters go to the fleet first.
            let l = ledger.clone();
            let _ = tokio::task::spawn_blocking(move || l.flush()).await;
            fleet
                .wait_costs_sent(std::time::Duration::from_secs(2))
                .await;
            match fleet.cost_counters(from, to).await {
                Ok(counters) => {
                    tokio::task::spawn_blocking(move || {
                        let rows = smartllm_ledger::rows_from(counters, from, to, &by, &filter);
                        Ok(costs_answer(rows, &by, from, to, csv, limit))
                    })
                    .await
                }
                Err(e) => {
                    return json_reply(
                        503,
                        &json!({"error": {"message": format!("the fleet's cost view cannot be read: {e}"), "type": "server_error", "param": null, "code": "fleet_unavailable"}}),
                    )
                }
            }
        } else {
            tokio::task::spawn_blocking(move || {
                ledger
                    .query_where(from, to, &by, &filter)
                    .map(|rows| costs_answer(rows, &by, from, to, csv, limit))
            })
            .await
        };
        match answer {
            Ok(Ok(answer)) => answer,
            Ok(Err(e)) => ledger_error(e),
            Err(e) => ledger_error(e),
        }
    }

    /// `GET /admin/suggestions?since=7d` (or from/to): what cheaper models
    /// for simple traffic and more cache coverage would have saved.
    async fn suggestions(&self, query: &str) -> Response<Vec<u8>> {
        let Some(ledger) = self.shared.ledger.clone() else {
            return ledger_unavailable();
        };
        let (from, to) =
            match admin_query::window(query, smartllm_ledger::now_secs(), 7 * 86_400, &[]) {
                Ok(w) => (w.from, w.to),
                Err(e) => return query_error(e),
            };
        // The mix is read, weighed and serialized off the async threads (the
        // answer is a report of bounded size, not the mix's rows: no limit).
        let rt = self.shared.runtime.load_full();
        let answer = tokio::task::spawn_blocking(move || {
            ledger.mix(from, to).map(|rows| {
                let report = smartllm_router::suggest::suggest(&rt.config, &rows);
                json_reply(
                    200,
                    &json!({
                        "from": smartllm_ledger::format_hour(from / 3600),
                        "to": smartllm_ledger::format_hour(to.div_ceil(3600)),
                        "report": report,
                    }),
                )
            })
        })
        .await;
        match answer {
            Ok(Ok(answer)) => answer,
            Ok(Err(e)) => ledger_error(e),
            Err(e) => ledger_error(e),
        }
    }

    /// `GET /admin/requests/expensive?since=24h[&to=UNIX]&limit=20`: the
    /// costliest of the last requests that reached a model in the window
    /// (`to` exclusive; metadata only, never prompts).
    fn expensive(&self, query: &str) -> Response<Vec<u8>> {
        let (window, limit) = match admin_query::expensive(
            query,
            smartllm_ledger::now_secs(),
            crate::recent::CAPACITY,
        ) {
            Ok(q) => q,
            Err(e) => return query_error(e),
        };
        let window_ms = window.start.saturating_mul(1000)..window.end.saturating_mul(1000);
        let (requests, kept) = self.shared.recent.costliest(window_ms, limit);
        json_reply(
            200,
            &json!({"requests": requests, "kept": kept, "capacity": crate::recent::CAPACITY}),
        )
    }

    /// `GET /admin/models`: static profiles, live measurements, deployments
    /// with health and circuit state.
    fn models(&self) -> Value {
        let rt = self.shared.runtime.load_full();
        let live = self.shared.profiles.all();
        let feedback = self.shared.feedback.snapshot();
        let models: Vec<Value> = rt
            .config
            .models
            .iter()
            .map(|m| {
                let p = &m.profile;
                let price = rt.config.price(&m.name);
                let quality: serde_json::Map<String, Value> = smartllm_config::Task::ALL
                    .iter()
                    .map(|t| (t.as_str().to_string(), json!(p.quality(*t))))
                    .collect();
                // Where each task's quality came from: measured (profiles.yaml),
                // configured, benchmarks or default.
                let quality_source: serde_json::Map<String, Value> = smartllm_config::Task::ALL
                    .iter()
                    .map(|t| (t.as_str().to_string(), json!(p.quality_source[t.index()].as_str())))
                    .collect();
                let deployments: Vec<Value> = rt
                    .pool(&m.name)
                    .map(|pool| {
                        pool.lb
                            .backends()
                            .get_backend()
                            .iter()
                            .flat_map(|b| {
                                let healthy = pool.lb.backends().ready(b);
                                let mut on: Vec<_> = pool.deployments_on(b, false).collect();
                                on.sort_by_key(|(i, _, _)| *i);
                                on.into_iter()
                                    .map(|(_, d, id)| {
                                        json!({"provider": d.provider.name(), "upstream_model": d.upstream_model, "address": b.addr.to_string(), "healthy": healthy,
                                            "circuit": self.shared.breakers.state(id).as_str()})
                                    })
                                    .collect::<Vec<_>>()
                            })
                            .collect()
                    })
                    .unwrap_or_default();
                json!({
                    "name": m.name,
                    "available": rt.pool(&m.name).is_some_and(|p| crate::routing::pool_available(&self.shared, p)),
                    "static": {
                        "context_window": p.context_window,
                        "capabilities": p.capabilities,
                        "quality": quality,
                        "quality_source": quality_source,
                        "tokens_per_second": p.tokens_per_second,
                        "latency_ms": p.latency.as_secs_f64() * 1e3,
                        "pricing": {"input_per_1m": m.pricing.input_per_1m, "output_per_1m": m.pricing.output_per_1m,
                            "cached_input_per_1m": m.pricing.cached_input_per_1m, "per_request": m.pricing.per_request,
                            "cache_write_5m_per_1m": price.map(|p| p.cache_write_5m_per_1m),
                            "cache_write_1h_per_1m": price.map(|p| p.cache_write_1h_per_1m),
                            "reasoning_per_1m": price.and_then(|p| p.reasoning_per_1m),
                            "audio_input_per_1m": price.and_then(|p| p.audio_input_per_1m),
                            "audio_output_per_1m": price.and_then(|p| p.audio_output_per_1m),
                            "long_context": price.and_then(|p| p.long_context),
                            "source": match price.map(|p| &p.source) {
                                Some(smartllm_config::PriceSource::Configured) => "models.yaml".to_string(),
                                Some(smartllm_config::PriceSource::Catalog(name)) => format!("catalog:{name}"),
                                _ => "unpriced".to_string(),
                            }},
                    },
                    "live": live.get(&m.name),
                    // Users' scores by task, all tenants together (each tenant's
                    // steer only its own requests).
                    "feedback": feedback.get(&m.name).map(|by_task| {
                        by_task
                            .iter()
                            .map(|(task, v)| (task.to_string(), json!({"votes": v.votes, "implicit": v.implicit, "mean_score": v.mean()})))
                            .collect::<serde_json::Map<String, Value>>()
                    }),
                    "deployments": deployments,
                })
            })
            .collect();
        json!({"models": models})
    }

    /// `POST /admin/route/explain` with a chat request (its `model` a routed
    /// alias) and optionally `"explain": {"headers": {..}, "tenant", "app", "key", "user"}`.
    async fn explain(&self, body: &[u8]) -> Response<Vec<u8>> {
        let bad = |msg: String| invalid(400, msg);
        let Ok(Value::Object(mut req)) = serde_json::from_slice::<Value>(body) else {
            return bad(
                "POST a chat request as JSON: {\"model\": \"auto\", \"messages\": [...]}".into(),
            );
        };
        let who = req.remove("explain").unwrap_or(Value::Null);
        let rt = self.shared.runtime.load_full();
        let name = req
            .get("model")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string();
        // As a request resolves it: an alias, or the alias whose `match`
        // pattern takes a name that is no model's.
        let route = rt.config.routes.get(&name).or_else(|| {
            rt.config
                .model(&name)
                .is_none()
                .then(|| rt.config.route_matching(&name))
                .flatten()
        });
        let Some(route) = route else {
            return bad(format!(
                "{name:?} is not a route alias (routes.yaml defines: {})",
                rt.config
                    .routes
                    .keys()
                    .cloned()
                    .collect::<Vec<_>>()
                    .join(", ")
            ));
        };
        let s = |k: &str| who.get(k).and_then(Value::as_str).map(str::to_string);
        let (tenant, app, key, user) = (
            s("tenant").unwrap_or_else(|| "anonymous".into()),
            s("app").unwrap_or_else(|| "-".into()),
            s("key").unwrap_or_else(|| "-".into()),
            s("user").or_else(|| req.get("user").and_then(Value::as_str).map(str::to_string)),
        );
        let headers = who
            .get("headers")
            .and_then(Value::as_object)
            .map(|h| {
                h.iter()
                    .filter_map(|(k, v)| Some((k.to_ascii_lowercase(), v.as_str()?.to_string())))
                    .collect()
            })
            .unwrap_or_default();
        let info = smartllm_router::RequestInfo {
            headers,
            tenant: &tenant,
            app: &app,
            key: &key,
            user: user.as_deref(),
            budget_pressure: who
                .get("budget_pressure")
                .and_then(Value::as_f64)
                .unwrap_or(0.0),
            budget_left_usd: who
                .get("budget_left_usd")
                .and_then(Value::as_f64)
                .map(|v| v.max(0.0)),
        };
        if !route.is_routed() {
            return json_reply(
                200,
                &json!({"route": route.name, "model": route.model, "reason": "alias", "fallbacks": route.fallback}),
            );
        }
        let (d, f) = crate::routing::decide_with(
            &self.shared,
            &rt,
            &req,
            route,
            None,
            None,
            &info,
            &Default::default(),
            &[],
        )
        .await;
        json_reply(200, &json!({"decision": d, "features": f}))
    }

    /// `POST /admin/cache/explain` with `{"a": PROMPT, "b": PROMPT, "model":
    /// ROUTE_OR_MODEL}` (model optional): would a request whose last user turn
    /// is `a` be served the stored answer of `b` (same namespace assumed)?
    /// The embedder's cosine, the threshold of that route's cache policy, the
    /// precision guard's verdict, the verifier's score (always computed; it
    /// decides only where the policy turns it on; `null` with
    /// `verifier_error` when a shared frame's parts could not be embedded
    /// and the score would not decide, a 503 when it would), and the
    /// decision: for operators checking a complaint ("it answered the wrong
    /// question").
    async fn cache_explain(&self, body: &[u8]) -> Response<Vec<u8>> {
        let req: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
        let text = |k: &str| req.get(k).and_then(Value::as_str).map(str::to_string);
        let (Some(a), Some(b)) = (text("a"), text("b")) else {
            return invalid(
                400,
                "POST {\"a\": \"a prompt\", \"b\": \"a stored prompt\", \"model\": \"auto\"} (model optional)".into(),
            );
        };
        // The precision guard's word diff grows with the square of the words.
        for (field, t) in [("a", &a), ("b", &b)] {
            if t.len() > MAX_EXPLAIN_TEXT {
                return query_error(QueryError::invalid(
                    field,
                    format!(
                        "{field} is {} bytes: /admin/cache/explain takes prompts of at most {MAX_EXPLAIN_TEXT} bytes (32 KiB)",
                        t.len()
                    ),
                ));
            }
        }
        let Some(embedder) = self.shared.components.embedder.clone() else {
            return invalid(503, "the embedder is not loaded (see /readyz)".into());
        };
        let rt = self.shared.runtime.load_full();
        let model = text("model").unwrap_or_default();
        // A name no request could use would be judged by the defaults (a
        // typo's verdict, not the route's): refused, naming it.
        if !model.is_empty() && rt.config.resolve_model(&model).is_none() {
            return json_reply(
                404,
                &json!({"error": {"message": format!("'{model}' is no model or route of the running config (GET /v1/models lists them)."), "type": "invalid_request_error", "param": "model", "code": "unknown_route"}}),
            );
        }
        // The alias the name resolves to, as a request's would (by name,
        // or by an alias's `match` pattern).
        let route = rt
            .config
            .resolve_model(&model)
            .and_then(|(_, r)| r)
            .map(|r| r.name.as_str());
        let policy = rt.config.cache.policy(route, &model).clone();
        let texts = vec![
            smartllm_cache::embedding_text(&a),
            smartllm_cache::embedding_text(&b),
        ];
        let states = match embedder.token_states(texts).await {
            Ok(v) if v.len() == 2 => v,
            Ok(_) => return invalid(500, "the embedder returned no vectors".into()),
            Err(e) => return invalid(503, format!("embedding failed: {e}")),
        };
        // Alignment and the guard's word diff grow with the square of the
        // length: off the async threads.
        let tails = embedder.clone();
        let scored = tokio::task::spawn_blocking(move || {
            let (va, vb) = (
                smartllm_embed::pool(&states[0]),
                smartllm_embed::pool(&states[1]),
            );
            let similarity = smartllm_embed::cosine(&va, &vb);
            // As a lookup judges it: the same wording needs no verdict; a
            // shared context or template is set aside and what differs is
            // judged (one more model run, whose failure is reported, not
            // replaced by the whole texts' score, which a lookup never uses).
            let verifier = if smartllm_cache::same_wording(&a, &b) {
                Ok(1.0)
            } else {
                match smartllm_cache::score_differing_parts(&tails, &a, &b) {
                    Some(score) => score,
                    None => Ok(smartllm_cache::Verifier::for_model(&tails.info().model)
                        .score_pair(similarity, &states[0], &states[1], smartllm_embed::DIM)),
                }
            };
            let guard = smartllm_cache::near_miss(&a, &b).or_else(|| {
                smartllm_cache::unread_tails_differ(&tails, &a, &b).then_some("beyond_window")
            });
            // The exact stage answers these before any embedding.
            let exact = smartllm_cache::exact_text(&a) == smartllm_cache::exact_text(&b);
            (similarity, verifier, guard, exact)
        })
        .await;
        let Ok((similarity, verifier, guard, exact)) = scored else {
            return invalid(500, "the verifier failed".into());
        };
        // The parts' model run failed: an error where the verifier's score
        // decides, else the verdict without it.
        let decides = policy.enabled && policy.semantic && !exact && policy.verifier.is_some();
        let (verifier, verifier_error) = match verifier {
            Ok(v) => (Some(v), None),
            Err(e) if decides => {
                return invalid(
                    503,
                    format!("embedding the parts the prompts differ in failed: {e}"),
                )
            }
            Err(e) => (
                None,
                Some(format!(
                    "embedding the parts the prompts differ in failed: {e}"
                )),
            ),
        };
        let above = similarity >= policy.similarity_threshold;
        let verified = policy
            .verifier
            .is_none_or(|pass| verifier.is_some_and(|v| v >= pass));
        let serve =
            policy.enabled && (exact || (policy.semantic && above && guard.is_none() && verified));
        let reason = if !policy.enabled {
            "the cache is off for this route"
        } else if exact {
            "served by the exact stage (the same question but for fillers, spacing or trailing punctuation)"
        } else if !policy.semantic {
            "the cache's semantic stage is off for this route"
        } else if !above {
            "similarity below the threshold"
        } else if guard.is_some() {
            "the precision guard refused"
        } else if !verified {
            "the verifier refused (a different question that reads alike)"
        } else {
            "served"
        };
        json_reply(
            200,
            &json!({
                "similarity": similarity,
                "threshold": policy.similarity_threshold,
                "guard": guard,
                "verifier": verifier,
                "verifier_error": verifier_error,
                "verifier_threshold": policy.verifier,
                "serve": serve,
                "reason": reason,
                "embedder": embedder.info().model.file_name().map(|f| f.to_string_lossy().into_owned()),
            }),
        )
    }

    /// `POST /admin/cache/purge?all=true | ?namespace=HEX | ?route=NAME |
    /// ?tenant=NAME`
    async fn purge(&self, query: &str) -> Response<Vec<u8>> {
        let what = match admin_query::purge(query) {
            Ok(PurgeTarget::All) => Purge::All,
            Ok(PurgeTarget::Namespace(ns)) => Purge::Namespace(ns),
            Ok(PurgeTarget::Route(r)) => Purge::Route(r),
            Ok(PurgeTarget::Tenant(t)) => Purge::Tenant(t),
            Err(e) => return query_error(e),
        };
        // A tenant's erasure also takes the Responses API conversations
        // this gateway keeps for it (with the cache off too).
        // With the store off now (`store.responses: false`), what it kept
        // before is still in the data dir: removed all the same.
        let responses = match &what {
            Purge::Tenant(t) => match (&self.shared.responses, &self.shared.components.store) {
                (Some(r), _) => Some((Ok(r.clone()), t.clone())),
                (None, Some(store)) => Some((Err(store.clone()), t.clone())),
                (None, None) => None,
            },
            _ => None,
        };
        let cache = self.shared.cache.clone();
        if cache.is_none() && responses.is_none() {
            return json_reply(
                409,
                &json!({"error": {"message": "the cache is not available", "type": "invalid_request_error", "param": null, "code": "cache_unavailable"}}),
            );
        }
        let label = format!("{what:?}");
        let published = what.clone();
        let issued = smartllm_cache::now_ms();
        // A route name the running config does not know: nothing purged
        // says so (a typo, or a model name an alias pattern takes), rather
        // than a quiet success. (A route since removed still purges its
        // entries by its name.)
        // (With a shared cache the fleet is told anyway: another gateway may
        // still know the route, in a rolling config change.)
        let shares = self
            .shared
            .fleet_sync
            .as_ref()
            .is_some_and(|f| f.shares_cache());
        let unknown_route = match &what {
            Purge::Route(r) if !shares => {
                let rt = self.shared.runtime.load_full();
                let c = &rt.config;
                (c.model(r).is_none() && !c.routes.contains_key(r)).then(|| {
                    match c.resolve_model(r).and_then(|(_, route)| route) {
                        Some(route) => format!(
                            "Nothing was purged: '{r}' is no route or model of the running config; requests for it go to the route '{}', so purge that.",
                            route.name
                        ),
                        None => format!(
                            "Nothing was purged: '{r}' is no route or model of the running config."
                        ),
                    }
                })
            }
            // Likewise a tenant no key has (a typo): the tenants of keys
            // since removed, `anonymous` and an open gateway's `key:HEX`
            // callers still purge what they stored.
            Purge::Tenant(t) if !shares => {
                let rt = self.shared.runtime.load_full();
                let known = t == "anonymous"
                    || t.starts_with("key:")
                    || rt.config.keys.keys.iter().any(|k| &k.tenant == t);
                (!known).then(|| {
                    format!("Nothing was purged: no key of the running config has the tenant '{t}', and no entry stored for it is left.")
                })
            }
            _ => None,
        };
        let is_tenant = matches!(what, Purge::Tenant(_));
        let unknown_param = match &what {
            Purge::Tenant(_) => ("tenant", "unknown_tenant"),
            _ => ("route", "unknown_route"),
        };
        let purged = tokio::task::spawn_blocking(move || {
            let n = match &cache {
                Some(c) => c.purge_at(&what, issued).map_err(|e| e.to_string())?,
                None => 0,
            };
            // The cache's part is done: whatever becomes of this one, the
            // fleet is told (below) and the reply says what failed.
            let kept = responses.map(|(r, tenant)| {
                match r {
                    Ok(r) => r
                        .purge_tenant_at(&tenant, issued)
                        .map(Option::unwrap_or_default),
                    Err(store) => crate::responses_store::purge_tenant_records(&store, &tenant),
                }
                .map_err(|e| e.to_string())
            });
            Ok::<_, String>((n, kept))
        })
        .await;
        match purged {
            Ok(Ok((0, None | Some(Ok(0))))) if unknown_route.is_some() => json_reply(
                404,
                &json!({"error": {"message": unknown_route, "type": "invalid_request_error", "param": unknown_param.0, "code": unknown_param.1}}),
            ),
            Ok(Ok((n, kept))) => {
                tracing::info!(purge = %label, removed = n, stored_responses_removed = ?kept, "cache purged");
                // The fleet's share: queued for its Redis (never dropped).
                let fleet = match &self.shared.fleet_sync {
                    Some(fleet) if fleet.shares_cache() => {
                        fleet.publish(crate::fleet_sync::CacheEvent::Purge(published, issued));
                        "queued"
                    }
                    _ => "not_shared",
                };
                let mut reply = json!({"result": "purged", "removed": n, "fleet": fleet});
                if is_tenant {
                    // An erasure: the deleted values leave the disk's files
                    // now, not whenever RocksDB would compact them.
                    crate::erase_from_disk(&self.shared);
                    reply["disk"] = json!("compacting");
                }
                match kept {
                    Some(Ok(kept)) => reply["stored_responses_removed"] = json!(kept),
                    Some(Err(e)) => {
                        tracing::error!(purge = %label, error = %e, "the purge removed the cache entries but not the stored responses");
                        return json_reply(
                            500,
                            &json!({"error": {"message": format!("the cache entries were purged ({n}), and the fleet told, but removing the stored responses failed: {e}; run the purge again"), "type": "server_error", "param": null, "code": "purge_failed"}}),
                        );
                    }
                    None => {}
                }
                json_reply(200, &reply)
            }
            Ok(Err(e)) => json_reply(
                500,
                &json!({"error": {"message": e.to_string(), "type": "server_error", "param": null, "code": "purge_failed"}}),
            ),
            Err(e) => json_reply(
                500,
                &json!({"error": {"message": e.to_string(), "type": "server_error", "param": null, "code": "purge_failed"}}),
            ),
        }
    }
}

/// `smartllm_upstream_healthy{model,address}` series of deployments the
/// running config no longer has (a reload dropped them, or DNS moved them to
/// another address) left out of a scrape: the exporter cannot delete one
/// series, and a stale "healthy" would mislead whoever reads it.
fn drop_stale_health_series(text: String, rt: &crate::Runtime) -> String {
    const SERIES: &str = "smartllm_upstream_healthy{";
    // Likewise a circuit of a deployment no longer configured: its series
    // went to 0 ("closed") when it was dropped, which would end an alert
    // on a provider that still fails.
    const CIRCUIT: &str = "smartllm_circuit_state{";
    if !text.contains(SERIES) && !text.contains(CIRCUIT) {
        return text;
    }
    let deployments = crate::health::deployment_ids(rt);
    let live: std::collections::HashSet<(String, String)> = rt
        .pools
        .iter()
        .flat_map(|(model, pool)| {
            pool.lb
                .backends()
                .get_backend()
                .iter()
                .map(|b| (model.clone(), b.addr.to_string()))
                .collect::<Vec<_>>()
        })
        .collect();
    let label = |line: &str, name: &str| -> Option<String> {
        let start = line.find(&format!("{name}=\""))? + name.len() + 2;
        let len = line[start..].find('"')?;
        Some(line[start..start + len].to_string())
    };
    let mut out = String::with_capacity(text.len());
    for line in text.lines() {
        if line.starts_with(CIRCUIT) {
            if let Some(id) = label(line, "deployment") {
                if !deployments.contains(&id) {
                    continue;
                }
            }
        }
        if line.starts_with(SERIES) {
            if let (Some(model), Some(address)) = (label(line, "model"), label(line, "address")) {
                if !live.contains(&(model, address)) {
                    continue;
                }
            }
        }
        out.push_str(line);
        out.push('\n');
    }
    out
}

/// The longest prompt (`a` or `b`, in bytes) `/admin/cache/explain` weighs.
const MAX_EXPLAIN_TEXT: usize = 32 << 10;

/// The most an admin request body may hold, and how long it may take to arrive.
const MAX_ADMIN_BODY: usize = 1 << 20;
const ADMIN_BODY_DEADLINE: std::time::Duration = std::time::Duration::from_secs(10);

/// An admin request's body: at most [`MAX_ADMIN_BODY`] bytes (413 beyond, by
/// its Content-Length or as it arrives) within [`ADMIN_BODY_DEADLINE`] (408).
async fn read_body(session: &mut ServerSession) -> Result<Vec<u8>, (u16, &'static str, String)> {
    let too_large = || {
        (
            413,
            "admin_body_too_large",
            format!("Admin request bodies are limited to {MAX_ADMIN_BODY} bytes."),
        )
    };
    let declared = crate::drain::declared_length(session.req_header());
    if declared.is_some_and(|n| n > MAX_ADMIN_BODY as u64) {
        return Err(too_large());
    }
    let read = async {
        let mut body = Vec::new();
        while let Some(chunk) = session.read_request_body().await.map_err(|e| {
            (
                400,
                "admin_body_unreadable",
                format!(
                    "The request body could not be read: {}.",
                    e.etype().as_str()
                ),
            )
        })? {
            if body.len() + chunk.len() > MAX_ADMIN_BODY {
                return Err(too_large());
            }
            body.extend_from_slice(&chunk);
        }
        Ok(body)
    };
    match tokio::time::timeout(ADMIN_BODY_DEADLINE, read).await {
        Ok(r) => r,
        Err(_) => Err((
            408,
            "request_timeout",
            format!(
                "The request body did not arrive within {}s.",
                ADMIN_BODY_DEADLINE.as_secs()
            ),
        )),
    }
}

/// Wrong admin tokens an address may try in [`GUESS_WINDOW`] before it is
/// refused (429) for the rest of the window, right token or not: a guesser
/// gets ten tries a minute, not thousands a second.
const MAX_GUESSES: u32 = 10;
const GUESS_WINDOW: std::time::Duration = std::time::Duration::from_secs(60);
/// Addresses followed at once (past it the expired ones go, then the
/// oldest: never every lockout at once).
const MAX_GUESSERS: usize = 10_000;

/// Wrong tokens by client address (see [`guesser`]): how many, since when.
type GuessMap = std::collections::HashMap<std::net::IpAddr, (u32, std::time::Instant)>;

#[derive(Default)]
struct Guesses(std::sync::Mutex<GuessMap>);

/// The address a guesser is followed by: an IPv6 client's /64 (one host
/// is usually given a whole /64, so its every address would otherwise
/// bring ten more tries), an IPv4 one (also when written IPv6-mapped) as
/// it is.
fn guesser(ip: std::net::IpAddr) -> std::net::IpAddr {
    match ip.to_canonical() {
        std::net::IpAddr::V6(v6) => {
            std::net::Ipv6Addr::from(v6.to_bits() & !u128::from(u64::MAX)).into()
        }
        v4 => v4,
    }
}

impl Guesses {
    /// The map, waited for: a lock that a busy map skipped would let a
    /// guesser through uncounted. It is a std mutex taken on the proxy's
    /// threads, but held only to read or bump one entry (or, at most once
    /// per new address, to sweep a bounded map), so the wait is that short.
    fn map(&self) -> std::sync::MutexGuard<'_, GuessMap> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Seconds `ip` must still wait, if it used up its guesses.
    fn locked(&self, ip: std::net::IpAddr, now: std::time::Instant) -> Option<u64> {
        let map = self.map();
        let (n, since) = map.get(&guesser(ip))?;
        let left = GUESS_WINDOW
            .checked_sub(now.saturating_duration_since(*since))
            .filter(|l| !l.is_zero())?;
        (*n >= MAX_GUESSES).then(|| left.as_secs().max(1))
    }

    /// `ip` sent a wrong token.
    fn wrong(&self, ip: std::net::IpAddr, now: std::time::Instant) {
        let ip = guesser(ip);
        let mut map = self.map();
        if map.len() >= MAX_GUESSERS && !map.contains_key(&ip) {
            map.retain(|_, (_, since)| now.saturating_duration_since(*since) < GUESS_WINDOW);
            // All still counting: the one followed longest goes (its window
            // ends first), not every lockout with it.
            if map.len() >= MAX_GUESSERS {
                let oldest = map
                    .iter()
                    .min_by_key(|(_, (_, since))| *since)
                    .map(|(k, _)| *k);
                if let Some(oldest) = oldest {
                    map.remove(&oldest);
                }
            }
        }
        let e = map.entry(ip).or_insert((0, now));
        if now.saturating_duration_since(e.1) >= GUESS_WINDOW {
            *e = (0, now);
        }
        e.0 += 1;
    }
}

static GUESSES: std::sync::LazyLock<Guesses> = std::sync::LazyLock::new(Guesses::default);

/// Whether a request carried an admin credential (a bearer token, the
/// dashboard's `?token=` or its sign-in form): a wrong one is a guess. A
/// request with none (a browser before signing in) is not.
fn carries_token(method: &str, path: &str, query: &str, headers: &http::HeaderMap) -> bool {
    headers.contains_key("authorization")
        || (method == "POST" && path == "/ui/login")
        || (path.starts_with("/ui")
            && smartllm_protocol::admin_query::form_value(query, "token").is_some())
}

/// The token of an `Authorization: Bearer TOKEN` header; the scheme's
/// case is not significant (`bearer`, `BEARER`: RFC 9110).
fn bearer(value: &str) -> Option<&str> {
    let (scheme, token) = (value.get(..7)?, value.get(7..)?);
    scheme.eq_ignore_ascii_case("bearer ").then_some(token)
}

/// The methods an admin URL answers (its `Allow` when another one is
/// used: a 405, not a 404 that reads as a mistyped URL); `None` for an
/// unknown URL. Kept with the routes in [`AdminApp::response`].
fn allowed_methods(path: &str) -> Option<&'static str> {
    Some(match path {
        "/metrics"
        | "/healthz"
        | "/readyz"
        | "/admin/config"
        | "/admin/models"
        | "/admin/suggestions"
        | "/admin/costs"
        | "/admin/budgets"
        | "/admin/requests/expensive"
        | "/admin/cache/stats" => "GET",
        "/admin/route/explain"
        | "/admin/cache/explain"
        | "/admin/cache/purge"
        | "/admin/cache/rebuild"
        | "/admin/reload" => "POST",
        _ => return None,
    })
}

/// A 405 for `method` on the known admin URL `path`, with its `Allow`.
fn method_not_allowed(method: &str, path: &str) -> Response<Vec<u8>> {
    let allow = allowed_methods(path).unwrap_or("GET");
    let mut r = json_reply(
        405,
        &json!({"error": {"message": format!("{path} answers {allow}, not {method}."), "type": "invalid_request_error", "param": null, "code": "method_not_allowed"}}),
    );
    r.headers_mut()
        .insert(http::header::ALLOW, http::HeaderValue::from_static(allow));
    r
}

/// `POST /admin/reload`'s answer: a config that does not load is the
/// caller's to fix (400); a loader that panicked is the gateway's fault
/// (500), whatever the files say.
fn reload_answer(result: Result<ReloadOutcome, crate::reload::ReloadError>) -> Response<Vec<u8>> {
    match result {
        Ok(ReloadOutcome::Applied {
            version,
            restart_required,
            changed,
            warnings,
        }) => json_reply(
            200,
            &json!({"result": "applied", "version": version, "changed": changed, "restart_required": restart_required, "warnings": warnings}),
        ),
        Ok(ReloadOutcome::Unchanged) => json_reply(200, &json!({"result": "unchanged"})),
        Err(e @ crate::reload::ReloadError::LoaderPanicked(_)) => json_reply(
            500,
            &json!({"error": {"message": e.to_string(), "type": "server_error", "param": null, "code": "reload_failed"}}),
        ),
        Err(e) => json_reply(
            400,
            &json!({"error": {"message": e.to_string(), "type": "invalid_request_error", "param": null, "code": "invalid_config"}}),
        ),
    }
}

#[async_trait]
impl ServeHttp for AdminApp {
    async fn response(&self, session: &mut ServerSession) -> Response<Vec<u8>> {
        let method = session.req_header().method.as_str().to_string();
        let path = session.req_header().uri.path().to_string();
        // Authenticate first: a caller without the token never gets its body read.
        // The dashboard's session cookie (see `ui`) admits GET requests only.
        let rt = self.shared.runtime.load_full();
        let client_ip = session
            .client_addr()
            .and_then(|a| a.as_inet())
            .map(|a| a.ip());
        let carries = carries_token(
            &method,
            &path,
            session.req_header().uri.query().unwrap_or(""),
            &session.req_header().headers,
        );
        // A token sent without `Authorization` came through the dashboard's
        // sign-in, which only a browser uses.
        let sign_in = carries && !session.req_header().headers.contains_key("authorization");
        // Before the guesses are looked at or counted: a web page's wrong
        // token is refused, never held against the operator's address.
        if let Err(why) = browser_guard(
            &method,
            &session.req_header().headers,
            rt.admin_token.is_none(),
            sign_in,
        ) {
            session.set_keepalive(None);
            return json_reply(
                403,
                &json!({"error": {"message": why, "type": "permission_error", "param": null, "code": "admin_origin_refused"}}),
            );
        }
        let guessing = rt.admin_token.is_some() && carries;
        let now = std::time::Instant::now();
        if let Some(wait) = client_ip
            .filter(|_| guessing)
            .and_then(|ip| GUESSES.locked(ip, now))
        {
            session.set_keepalive(None);
            let mut r = json_reply(
                429,
                &json!({"error": {"message": format!("Too many wrong admin tokens from this address: try again in {wait}s."), "type": "rate_limit_error", "param": null, "code": "admin_token_guesses"}}),
            );
            if let Ok(v) = http::HeaderValue::from_str(&wait.to_string()) {
                r.headers_mut().insert("retry-after", v);
            }
            return r;
        }
        let authorized = rt.admin_token.as_ref().is_none_or(|token| {
            let given = session
                .req_header()
                .headers
                .get("authorization")
                .and_then(|v| v.to_str().ok())
                .and_then(bearer)
                .unwrap_or("");
            constant_time_eq(given.as_bytes(), token.as_bytes())
                || (method == "GET" && crate::ui::cookie_ok(&session.req_header().headers, token))
        });
        // (The dashboard's form and `?token=` are judged by `ui::serve`.)
        if guessing && !authorized && !crate::ui::is_ui(&path) {
            if let Some(ip) = client_ip {
                GUESSES.wrong(ip, now);
            }
        }
        if path.starts_with("/admin/") && !authorized {
            // The body is left unread: the connection cannot be reused.
            session.set_keepalive(None);
            return json_reply(
                401,
                &json!({"error": {"message": "The admin API needs its token: send 'Authorization: Bearer ADMIN_TOKEN' (admin.token_env / admin.token_file).", "type": "invalid_request_error", "param": null, "code": "invalid_admin_token"}}),
            );
        }
        let body = match read_body(session).await {
            Ok(b) => b,
            Err((status, code, message)) => {
                session.set_keepalive(None);
                return json_reply(
                    status,
                    &json!({"error": {"message": message, "type": "invalid_request_error", "param": null, "code": code}}),
                );
            }
        };
        if crate::ui::is_ui(&path) {
            let r = crate::ui::serve(
                &method,
                &path,
                session.req_header().uri.query().unwrap_or(""),
                &body,
                authorized,
                rt.admin_token.as_deref(),
                rt.admin_tls.is_some(),
            );
            if guessing && r.status() == 401 {
                if let Some(ip) = client_ip {
                    GUESSES.wrong(ip, now);
                }
            }
            return r;
        }
        match (method.as_str(), path.as_str()) {
            ("GET", "/metrics") => {
                // Budgets' shares as known now: a new day reads 0 (with a
                // fleet, the fleet's spend, read from Redis at each scrape).
                self.shared.quotas.refresh_all(&rt.config).await;
                self.shared
                    .quotas
                    .export_budget_gauges(&rt.config.keys.budgets);
                // jemalloc serves Rust and the native libraries (ONNX Runtime,
                // FAISS, RocksDB) alike; RSS beyond `resident` is code and stacks.
                if tikv_jemalloc_ctl::epoch::advance().is_ok() {
                    for (kind, v) in [
                        ("allocated", tikv_jemalloc_ctl::stats::allocated::read()),
                        ("resident", tikv_jemalloc_ctl::stats::resident::read()),
                    ] {
                        if let Ok(v) = v {
                            crate::metrics::heap(kind, v as u64);
                        }
                    }
                }
                if let Some(store) = &self.shared.components.store {
                    let m = store.memory();
                    crate::metrics::store_memory("block_cache", m.block_cache);
                    crate::metrics::store_memory("memtables", m.memtables);
                }
                let text = drop_stale_health_series(
                    self.shared.metrics.render(),
                    &self.shared.runtime.load(),
                );
                reply(200, "text/plain; version=0.0.4", text.into_bytes())
            }
            ("GET", "/healthz") => json_reply(200, &json!({"status": "ok"})),
            ("GET", "/readyz") => {
                let listening = self.api_listening().await;
                let (ready, body) = self.readyz(listening);
                // With an admin token, a probe without it gets the verdict
                // only: the details (paths, addresses, the config's digest)
                // are the operator's.
                let body = if authorized {
                    body
                } else {
                    json!({"status": body["status"]})
                };
                json_reply(if ready { 200 } else { 503 }, &body)
            }
            ("GET", "/admin/config") => json_reply(200, &self.config()),
            ("GET", "/admin/models") => json_reply(200, &self.models()),
            ("POST", "/admin/route/explain") => self.explain(&body).await,
            ("POST", "/admin/cache/explain") => self.cache_explain(&body).await,
            ("GET", "/admin/suggestions") => {
                self.suggestions(session.req_header().uri.query().unwrap_or(""))
                    .await
            }
            ("GET", "/admin/costs") => {
                self.costs(session.req_header().uri.query().unwrap_or(""))
                    .await
            }
            ("GET", "/admin/budgets") => {
                // The fleet's figures, not only this gateway's.
                self.shared.quotas.refresh_all(&rt.config).await;
                json_reply(
                    200,
                    &json!({"budgets": self.shared.quotas.budget_status(&rt.config.keys.budgets)}),
                )
            }
            ("GET", "/admin/requests/expensive") => {
                self.expensive(session.req_header().uri.query().unwrap_or(""))
            }
            ("GET", "/admin/cache/stats") => match &self.shared.cache {
                Some(c) => {
                    let rt = self.shared.runtime.load_full();
                    json_reply(
                        200,
                        &json!({"enabled": rt.config.cache.enabled, "stats": c.stats()}),
                    )
                }
                None => json_reply(200, &json!({"enabled": false})),
            },
            ("POST", "/admin/cache/purge") => {
                self.purge(session.req_header().uri.query().unwrap_or(""))
                    .await
            }
            ("POST", "/admin/cache/rebuild") => match self.shared.cache.clone() {
                Some(c) => match tokio::task::spawn_blocking(move || c.rebuild()).await {
                    Ok(Ok(smartllm_cache::Rebuilt::Now(n))) => {
                        json_reply(200, &json!({"result": "rebuilt", "vectors": n}))
                    }
                    // Too many to hold flat: trained from RocksDB in the
                    // background (`index_building` in /admin/cache/stats).
                    Ok(Ok(smartllm_cache::Rebuilt::InBackground { about })) => json_reply(
                        202,
                        &json!({"result": "rebuilding", "vectors_estimate": about}),
                    ),
                    Ok(Err(e)) => json_reply(
                        500,
                        &json!({"error": {"message": e.to_string(), "type": "server_error", "param": null, "code": "rebuild_failed"}}),
                    ),
                    Err(e) => json_reply(
                        500,
                        &json!({"error": {"message": e.to_string(), "type": "server_error", "param": null, "code": "rebuild_failed"}}),
                    ),
                },
                None => json_reply(
                    409,
                    &json!({"error": {"message": "the cache is not available", "type": "invalid_request_error", "param": null, "code": "cache_unavailable"}}),
                ),
            },
            ("POST", "/admin/reload") => reload_answer(reload(&self.shared, "admin").await),
            _ if allowed_methods(&path).is_some() => method_not_allowed(&method, &path),
            _ => json_reply(
                404,
                &json!({"error": {"message": format!("Unknown admin URL: {method} {path}. Try /ui, /metrics, /healthz, /readyz, /admin/config, /admin/models, /admin/costs, /admin/suggestions, /admin/budgets, /admin/requests/expensive, /admin/cache/stats, POST /admin/route/explain, POST /admin/cache/explain, POST /admin/reload, POST /admin/cache/purge, POST /admin/cache/rebuild."), "type": "invalid_request_error", "param": null, "code": "unknown_url"}}),
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    /// A header map of these names and values.
    fn headers(pairs: &[(&str, &str)]) -> http::HeaderMap {
        let mut m = http::HeaderMap::new();
        for (k, v) in pairs {
            m.insert(
                http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                v.parse().unwrap(),
            );
        }
        m
    }

    #[test]
    fn web_pages_are_kept_out_of_the_admin_api() {
        use super::{browser_guard, loopback_host};
        let h = headers;
        for ok in [
            "127.0.0.1:9090",
            "localhost:9090",
            "[::1]:9090",
            "127.0.0.2",
            "LOCALHOST",
        ] {
            assert!(loopback_host(ok), "{ok}");
        }
        for bad in [
            "evil.example:9090",
            "10.0.0.1:9090",
            "",
            "[::2]:1",
            "localhost.evil.example",
        ] {
            assert!(!loopback_host(bad), "{bad}");
        }
        // DNS rebinding: open API, a foreign Host; no Host at all is a tool.
        assert!(browser_guard("GET", &h(&[("host", "evil.example:9090")]), true, false).is_err());
        assert!(browser_guard("GET", &h(&[("host", "127.0.0.1:9090")]), true, false).is_ok());
        assert!(browser_guard("GET", &h(&[]), true, false).is_ok());
        // With a token, none of it applies.
        assert!(browser_guard("GET", &h(&[("host", "admin.internal:9090")]), false, false).is_ok());
        // Cross-site writes.
        let csrf = h(&[
            ("host", "127.0.0.1:9090"),
            ("origin", "https://evil.example"),
        ]);
        assert!(browser_guard("POST", &csrf, true, false).is_err());
        assert!(
            browser_guard("GET", &csrf, true, false).is_ok(),
            "reads are kept by CORS"
        );
        let fetch = h(&[("host", "127.0.0.1:9090"), ("sec-fetch-site", "cross-site")]);
        assert!(browser_guard("DELETE", &fetch, true, false).is_err());
        let sibling = h(&[
            ("host", "127.0.0.1:9090"),
            ("sec-fetch-site", "same-site"),
            ("origin", "http://127.0.0.1:8080"),
        ]);
        assert!(browser_guard("POST", &sibling, true, false).is_err());
        // The dashboard's own requests (a no-referrer page's form posts with
        // `Origin: null`), and tools that send no Origin.
        let own = h(&[
            ("host", "127.0.0.1:9090"),
            ("origin", "http://127.0.0.1:9090"),
        ]);
        assert!(browser_guard("POST", &own, true, false).is_ok());
        let form = h(&[
            ("host", "127.0.0.1:9090"),
            ("origin", "null"),
            ("sec-fetch-site", "same-origin"),
        ]);
        assert!(browser_guard("POST", &form, true, false).is_ok());
        assert!(browser_guard("POST", &h(&[("host", "127.0.0.1:9090")]), true, false).is_ok());
    }

    /// With a token, another site's page may not use the dashboard's
    /// sign-in (an `<img>` of `/ui?token=x`, a form posted to `/ui/login`):
    /// its wrong tokens would lock the operator's own address out. Refused
    /// before anything is counted; an address typed into the browser, the
    /// dashboard's own form and tools pass.
    #[test]
    fn sign_ins_from_other_sites_are_refused() {
        use super::browser_guard;
        let h = headers;
        let img = h(&[("host", "127.0.0.1:9090"), ("sec-fetch-site", "cross-site")]);
        assert!(browser_guard("GET", &img, false, true).is_err());
        let form = h(&[
            ("host", "admin.internal:9090"),
            ("origin", "https://evil.example"),
        ]);
        assert!(browser_guard("POST", &form, false, true).is_err());
        // Not a sign-in (a bearer token, a cookie): the token decides.
        assert!(browser_guard("GET", &img, false, false).is_ok());
        assert!(browser_guard("POST", &form, false, false).is_ok());
        let typed = h(&[("host", "admin.internal:9090"), ("sec-fetch-site", "none")]);
        assert!(browser_guard("GET", &typed, false, true).is_ok());
        let own = h(&[
            ("host", "admin.internal:9090"),
            ("origin", "null"),
            ("sec-fetch-site", "same-origin"),
        ]);
        assert!(browser_guard("POST", &own, false, true).is_ok());
        let tool = h(&[("host", "admin.internal:9090")]);
        assert!(browser_guard("GET", &tool, false, true).is_ok());
        assert!(browser_guard("POST", &tool, false, true).is_ok());
    }

    use super::constant_time_eq;

    #[test]
    fn costs_past_the_limit_are_summed_into_one_row() {
        use super::{costs_answer, cut_rows, OTHER_ROWS};
        use smartllm_ledger::{Dim, Row};
        let tag = |t: &str| -> std::collections::BTreeMap<Dim, String> {
            [(Dim::Tag, t.to_string())].into_iter().collect()
        };
        // Costliest first, as the ledger answers.
        let rows: Vec<Row> = (0..5)
            .map(|i| Row {
                group: tag(&format!("t{i}")),
                requests: 2,
                input_tokens: 10,
                cost_usd: (5 - i) as f64,
                ..Row::default()
            })
            .collect();
        let dims = [Dim::Tag];
        // Within the limit: as they are.
        let (kept, cut) = cut_rows(rows.clone(), &dims, 5);
        assert_eq!(cut, 0);
        assert_eq!(kept, rows);
        // Past it: the first rows and one that sums the others.
        let (kept, cut) = cut_rows(rows.clone(), &dims, 2);
        assert_eq!((kept.len(), cut), (3, 3));
        assert_eq!(kept[..2], rows[..2]);
        let other = &kept[2];
        assert_eq!(other.group[&Dim::Tag], OTHER_ROWS);
        assert_eq!((other.requests, other.input_tokens), (6, 30));
        assert_eq!(other.cost_usd, 3.0 + 2.0 + 1.0);
        let cost = |rows: &[Row]| rows.iter().map(|r| r.cost_usd).sum::<f64>();
        assert_eq!(cost(&kept), cost(&rows));
        // A kept row of that very group (the ledger's own `(other)` tag)
        // takes the sum: no group is answered twice.
        let mut tagged = rows.clone();
        tagged[1].group = tag(OTHER_ROWS);
        let (kept, cut) = cut_rows(tagged, &dims, 2);
        assert_eq!((kept.len(), cut), (2, 3));
        assert_eq!(kept[1].requests, 8);

        // The JSON says so; its total is every row's.
        let answer = costs_answer(rows.clone(), &dims, 0, 3600, false, 2);
        let v: serde_json::Value = serde_json::from_slice(answer.body()).unwrap();
        assert_eq!(v["truncated"], true);
        assert_eq!(v["other_rows"], 3);
        assert_eq!(v["rows"].as_array().map(Vec::len), Some(3));
        assert_eq!(v["rows"][2]["group"]["tag"], OTHER_ROWS);
        assert_eq!(v["total"]["requests"], 10);
        assert_eq!(v["total"]["cost_usd"], 15.0);
        let whole = costs_answer(rows.clone(), &dims, 0, 3600, false, 1000);
        let v: serde_json::Value = serde_json::from_slice(whole.body()).unwrap();
        assert_eq!(v["truncated"], false);
        assert_eq!(v["other_rows"], 0);
        // The CSV ends with the `(other)` row.
        let csv = costs_answer(rows, &dims, 0, 3600, true, 2);
        let text = String::from_utf8(csv.into_body()).unwrap();
        assert_eq!(text.lines().count(), 4, "{text}");
        assert!(
            text.lines().last().unwrap().starts_with("(other),"),
            "{text}"
        );
    }

    /// Ten wrong tokens a minute per address; then 429 until the minute
    /// is over; another address is not held back.
    #[test]
    fn wrong_tokens_are_limited_per_address() {
        let g = super::Guesses::default();
        let (a, b): (std::net::IpAddr, std::net::IpAddr) =
            ("10.0.0.1".parse().unwrap(), "10.0.0.2".parse().unwrap());
        let t0 = std::time::Instant::now();
        for _ in 0..super::MAX_GUESSES {
            assert_eq!(g.locked(a, t0), None);
            g.wrong(a, t0);
        }
        assert_eq!(g.locked(a, t0), Some(60));
        let later = t0 + std::time::Duration::from_secs(45);
        assert_eq!(g.locked(a, later), Some(15));
        assert_eq!(g.locked(b, later), None);
        let after = t0 + super::GUESS_WINDOW;
        assert_eq!(g.locked(a, after), None);
        // A new minute starts a new count.
        g.wrong(a, after);
        assert_eq!(g.locked(a, after), None);
    }

    /// A busy map waits rather than letting a guess through uncounted;
    /// an IPv6 client is followed by its /64; a full map makes room by
    /// dropping the oldest entry, not every lockout.
    #[test]
    fn wrong_tokens_are_always_counted_and_kept() {
        use super::{guesser, Guesses, MAX_GUESSERS, MAX_GUESSES};
        use std::net::IpAddr;
        let t0 = std::time::Instant::now();

        // The map held by another thread: the guess is counted once it is free.
        let g = Guesses::default();
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        for _ in 0..MAX_GUESSES - 1 {
            g.wrong(a, t0);
        }
        std::thread::scope(|s| {
            let held = g.0.lock().unwrap();
            let counting = s.spawn(|| g.wrong(a, t0));
            std::thread::sleep(std::time::Duration::from_millis(50));
            drop(held);
            counting.join().unwrap();
        });
        assert_eq!(g.locked(a, t0), Some(60));

        // Two addresses of one /64 are one guesser; another /64 is not;
        // an IPv4-mapped address is its IPv4 one.
        let g = Guesses::default();
        let (v6a, v6b, other): (IpAddr, IpAddr, IpAddr) = (
            "2001:db8:1:2::1".parse().unwrap(),
            "2001:db8:1:2:ffff::9".parse().unwrap(),
            "2001:db8:1:3::1".parse().unwrap(),
        );
        assert_eq!(guesser(v6a), "2001:db8:1:2::".parse::<IpAddr>().unwrap());
        assert_eq!(guesser("::ffff:10.0.0.1".parse().unwrap()), a);
        assert_eq!(guesser(a), a);
        for i in 0..MAX_GUESSES {
            g.wrong(if i % 2 == 0 { v6a } else { v6b }, t0);
        }
        assert_eq!(g.locked(v6a, t0), Some(60));
        assert_eq!(g.locked(v6b, t0), Some(60));
        assert_eq!(g.locked(other, t0), None);

        // A full map: the locked address stays locked while others come.
        let g = Guesses::default();
        for _ in 0..MAX_GUESSES {
            g.wrong(a, t0 + std::time::Duration::from_secs(1));
        }
        for i in 0..MAX_GUESSERS as u32 + 10 {
            let ip = IpAddr::from(std::net::Ipv4Addr::from(0x0b00_0000 + i));
            // The first ones are older than `a`: they go first.
            let at = if i < 20 {
                t0
            } else {
                t0 + std::time::Duration::from_secs(2)
            };
            g.wrong(ip, at);
        }
        let now = t0 + std::time::Duration::from_secs(3);
        assert!(g.0.lock().unwrap().len() <= MAX_GUESSERS);
        assert_eq!(g.locked(a, now), Some(58));
    }

    /// The bearer scheme in any case; 405 with `Allow` for a known URL's
    /// wrong method; a loader that panicked is the gateway's error (500).
    #[tokio::test]
    async fn admin_answers_say_what_went_wrong() {
        use super::{allowed_methods, bearer, method_not_allowed, reload_answer};
        assert_eq!(bearer("Bearer t0k"), Some("t0k"));
        assert_eq!(bearer("bearer t0k"), Some("t0k"));
        assert_eq!(bearer("BEARER t0k"), Some("t0k"));
        assert_eq!(bearer("Basic dXNlcg=="), None);
        assert_eq!(bearer("Bearer"), None);
        assert_eq!(bearer("Bearér t"), None);

        assert_eq!(allowed_methods("/admin/reload"), Some("POST"));
        assert_eq!(allowed_methods("/admin/costs"), Some("GET"));
        assert_eq!(allowed_methods("/admin/nope"), None);
        let r = method_not_allowed("GET", "/admin/reload");
        assert_eq!(r.status(), 405);
        assert_eq!(r.headers()["allow"], "POST");
        let r = method_not_allowed("DELETE", "/metrics");
        assert_eq!(r.status(), 405);
        assert_eq!(r.headers()["allow"], "GET");

        let mut loader = tokio::task::JoinSet::<()>::new();
        loader.spawn(async { panic!("the loader's bug") });
        let panicked = loader.join_next().await.unwrap().unwrap_err();
        let r = reload_answer(Err(crate::reload::ReloadError::LoaderPanicked(panicked)));
        assert_eq!(r.status(), 500);
        let v: serde_json::Value = serde_json::from_slice(r.body()).unwrap();
        assert_eq!(v["error"]["type"], "server_error");
        let r = reload_answer(Err(crate::reload::ReloadError::WouldDemo("x".into())));
        assert_eq!(r.status(), 400);
    }

    #[test]
    fn constant_time_compare() {
        assert!(constant_time_eq(b"secret", b"secret"));
        assert!(!constant_time_eq(b"secret", b"secreT"));
        assert!(!constant_time_eq(b"secret", b"secret2"));
        assert!(!constant_time_eq(b"", b"x"));
        assert!(constant_time_eq(b"", b""));
        // Lengths whose XOR has no bits in its low 16: still different.
        let long = [0u8; 65_536];
        assert!(!constant_time_eq(b"", &long));
        let mut padded = b"secret".to_vec();
        padded.extend(std::iter::repeat_n(0xff, 65_536));
        assert!(!constant_time_eq(b"secret", &padded));
    }
}
