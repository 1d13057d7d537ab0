//! `providers.yaml`: each provider's kind, base URL, key source, extra
//! headers, timeouts (defaulting to the server's), health check and circuit
//! breaker.

use super::{relative_to, valid_name};
use crate::raw::{RawCircuitBreaker, RawProviders};
use crate::{
    ApiKeySource, CircuitBreakerConfig, HealthCheckConfig, HealthCheckKind, Issues, ProviderConfig,
    ProviderKind, ServerConfig, TokenLimitField, Url, PROVIDERS_FILE,
};
use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

pub(super) fn resolve_providers(
    dir: &Path,
    providers: RawProviders,
    server: &ServerConfig,
    v: &mut Issues<'_>,
) -> BTreeMap<String, ProviderConfig> {
    let mut resolved = BTreeMap::new();
    for (name, p) in providers.providers {
        let at = format!("providers.{name}");
        if !valid_name(&name) {
            v.push(
                PROVIDERS_FILE,
                &at,
                "provider names may only use letters, digits, '-', '_' and '.'",
            );
        }
        let kind = match p.kind.as_str() {
            "openai" => ProviderKind::OpenAi,
            "anthropic" => ProviderKind::Anthropic,
            other => {
                v.push(
                    PROVIDERS_FILE,
                    format!("{at}.kind"),
                    format!("unknown kind {other:?}: use openai or anthropic"),
                );
                ProviderKind::OpenAi
            }
        };
        let base_url = match Url::parse(&p.base_url) {
            Ok(u) => u,
            Err(err) => {
                v.push(PROVIDERS_FILE, format!("{at}.base_url"), err.to_string());
                continue;
            }
        };
        if p.tls_ca_file.is_some() && !base_url.tls {
            v.push(
                PROVIDERS_FILE,
                format!("{at}.tls_ca_file"),
                "only applies to https:// base URLs",
            );
        }
        let api_key = match (p.api_key_env, p.api_key_file) {
            (Some(_), Some(_)) => {
                v.push(
                    PROVIDERS_FILE,
                    format!("{at}.api_key_file"),
                    "set api_key_env or api_key_file, not both",
                );
                ApiKeySource::None
            }
            (Some(env), None) => ApiKeySource::Env(env),
            (None, Some(file)) => ApiKeySource::File(relative_to(dir, &file)),
            (None, None) => ApiKeySource::None,
        };
        let mut headers = Vec::new();
        for (k, val) in p.headers {
            let lower = k.to_ascii_lowercase();
            if http_header_name_ok(&lower) && !val.contains(['\r', '\n']) {
                if [
                    "host",
                    "content-length",
                    "authorization",
                    "x-api-key",
                    "transfer-encoding",
                    "connection",
                ]
                .contains(&lower.as_str())
                {
                    v.push(
                        PROVIDERS_FILE,
                        format!("{at}.headers.{k}"),
                        "this header is set by the gateway and cannot be configured",
                    );
                } else {
                    headers.push((lower, val));
                }
            } else {
                v.push(
                    PROVIDERS_FILE,
                    format!("{at}.headers.{k}"),
                    "not a valid HTTP header",
                );
            }
        }
        let max_tokens_field = match p.max_tokens_field.as_deref() {
            Some("max_tokens") => Some(TokenLimitField::MaxTokens),
            Some("max_completion_tokens") => Some(TokenLimitField::MaxCompletionTokens),
            Some(other) => {
                v.push(
                    PROVIDERS_FILE,
                    format!("{at}.max_tokens_field"),
                    format!("unknown field {other:?}: use max_tokens or max_completion_tokens"),
                );
                None
            }
            // OpenAI's own API (and its regional hosts): the name every
            // model takes (its reasoning models refuse `max_tokens`).
            // Elsewhere (Azure's older API versions, compatible servers)
            // the client's name goes as given.
            None if base_url.host == "api.openai.com"
                || base_url.host.ends_with(".api.openai.com") =>
            {
                Some(TokenLimitField::MaxCompletionTokens)
            }
            None => None,
        };
        let hc = p.health_check;
        let hc_kind = match hc.as_ref().and_then(|h| h.kind.as_deref()).unwrap_or("tcp") {
            "tcp" => HealthCheckKind::Tcp,
            "http" => HealthCheckKind::Http,
            "none" => HealthCheckKind::None,
            other => {
                v.push(
                    PROVIDERS_FILE,
                    format!("{at}.health_check.kind"),
                    format!("unknown kind {other:?}: use tcp, http or none"),
                );
                HealthCheckKind::Tcp
            }
        };
        let health_check = HealthCheckConfig {
            kind: hc_kind,
            path: hc
                .as_ref()
                .and_then(|h| h.path.clone())
                .unwrap_or_else(|| format!("{}/models", base_url.path)),
            interval: hc
                .as_ref()
                .and_then(|h| h.interval)
                .map(|d| d.0)
                .unwrap_or(Duration::from_secs(5))
                .max(Duration::from_millis(100)),
            failures: hc.as_ref().and_then(|h| h.failures).unwrap_or(2).max(1),
            successes: hc.as_ref().and_then(|h| h.successes).unwrap_or(1).max(1),
        };
        resolved.insert(
            name.clone(),
            ProviderConfig {
                name,
                kind,
                base_url,
                api_key,
                headers,
                anthropic_version: p.anthropic_version.unwrap_or_else(|| "2023-06-01".into()),
                drop_thinking: p.drop_thinking.unwrap_or(false),
                responses: p.responses.unwrap_or(false) && kind == ProviderKind::OpenAi,
                tls_ca_file: p.tls_ca_file.map(|f| relative_to(dir, &f)),
                stream_usage: p.stream_usage.unwrap_or(true),
                max_tokens_field,
                connect_timeout: p
                    .connect_timeout
                    .map(|d| d.0)
                    .unwrap_or(server.upstream_connect_timeout),
                first_byte_timeout: p
                    .first_byte_timeout
                    .map(|d| d.0)
                    .unwrap_or(server.upstream_first_byte_timeout),
                idle_timeout: p
                    .idle_timeout
                    .map(|d| d.0)
                    .unwrap_or(server.upstream_idle_timeout),
                health_check,
                circuit_breaker: resolve_breaker(p.circuit_breaker.as_ref()),
            },
        );
    }
    resolved
}

fn resolve_breaker(raw: Option<&RawCircuitBreaker>) -> CircuitBreakerConfig {
    let d = CircuitBreakerConfig::default();
    match raw {
        None => d,
        Some(r) => CircuitBreakerConfig {
            failures: r.failures.unwrap_or(d.failures),
            cooldown: r.cooldown.map(|c| c.0).unwrap_or(d.cooldown),
        },
    }
    .validated()
}

fn http_header_name_ok(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}
