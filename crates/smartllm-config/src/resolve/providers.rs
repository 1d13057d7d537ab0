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
        let tls_ca_file = p.tls_ca_file.as_deref().map(|f| relative_to(dir, f));
        match &tls_ca_file {
            Some(_) if !base_url.tls => v.push(
                PROVIDERS_FILE,
                format!("{at}.tls_ca_file"),
                "only applies to https:// base URLs",
            ),
            // Read it now, as `serve` does when it builds the provider.
            Some(path) => {
                if let Err(e) = crate::tls::ca_bundle(path) {
                    v.push(PROVIDERS_FILE, format!("{at}.tls_ca_file"), e.to_string());
                }
            }
            None => {}
        }
        // Zero would fail every request to the provider at once.
        for (key, value) in [
            ("connect_timeout", &p.connect_timeout),
            ("first_byte_timeout", &p.first_byte_timeout),
            ("idle_timeout", &p.idle_timeout),
        ] {
            if value.as_ref().is_some_and(|d| d.0.is_zero()) {
                v.push(
                    PROVIDERS_FILE,
                    format!("{at}.{key}"),
                    "must be greater than 0",
                );
            }
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
        let mut headers: Vec<(String, String)> = Vec::new();
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
                } else if headers.iter().any(|(name, _)| *name == lower) {
                    // Sent as one header: one value would silently win.
                    v.push(
                        PROVIDERS_FILE,
                        format!("{at}.headers.{k}"),
                        "header given twice (names are case-insensitive)",
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
                drop_builtin_tools: p.drop_builtin_tools.unwrap_or(false),
                responses: p.responses.unwrap_or(false) && kind == ProviderKind::OpenAi,
                tls_ca_file,
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

#[cfg(test)]
mod tests {
    use crate::test_support::*;
    use crate::*;
    use std::time::Duration;

    const CERT: &str = include_str!("../testdata/cert.pem");
    const KEY: &str = include_str!("../testdata/key.pem");

    fn load(providers: &str, files: &[(&str, &str)]) -> Result<Config, ConfigError> {
        let mut all = vec![
            (MAIN_FILE, "data_dir: /tmp/x\n"),
            (PROVIDERS_FILE, providers),
        ];
        all.extend_from_slice(files);
        load_dir(write_dir(&all).path())
    }

    #[test]
    fn provider_timeouts_of_zero_are_refused() {
        let p = "providers:\n  p.1:\n    kind: openai\n    base_url: http://127.0.0.1:1/v1\n    connect_timeout: 0s\n    first_byte_timeout: 0ms\n    idle_timeout: 0\n";
        let text = load(p, &[]).unwrap_err().to_string();
        for (line, key) in [
            (5, "connect_timeout"),
            (6, "first_byte_timeout"),
            (7, "idle_timeout"),
        ] {
            assert!(
                text.contains(&format!(
                    "providers.yaml:{line}: providers.p.1.{key}: must be greater than 0"
                )),
                "{text}"
            );
        }
        let p = "providers:\n  p:\n    kind: openai\n    base_url: http://127.0.0.1:1/v1\n    first_byte_timeout: 30s\n";
        let c = load(p, &[]).unwrap();
        assert_eq!(c.providers["p"].first_byte_timeout, Duration::from_secs(30));
        assert_eq!(
            c.providers["p"].idle_timeout,
            c.server.upstream_idle_timeout
        );
    }

    #[test]
    fn a_ca_file_serve_would_refuse_fails_the_load() {
        let p = "providers:\n  p:\n    kind: openai\n    base_url: https://api.example.com/v1\n    tls_ca_file: ca.pem\n";
        let cases: [(&[(&str, &str)], &str); 4] = [
            (&[], "cannot read"),
            (&[("ca.pem", "")], "holds no PEM certificate"),
            (
                &[("ca.pem", "not a certificate\n")],
                "holds no PEM certificate",
            ),
            (&[("ca.pem", KEY)], "holds no PEM certificate"),
        ];
        for (files, want) in cases {
            let text = load(p, files).unwrap_err().to_string();
            assert!(
                text.contains("providers.yaml:5: providers.p.tls_ca_file: ")
                    && text.contains("ca.pem")
                    && text.contains(want),
                "{want}: {text}"
            );
        }
        let c = load(p, &[("ca.pem", CERT)]).unwrap();
        assert!(c.providers["p"]
            .tls_ca_file
            .as_ref()
            .unwrap()
            .ends_with("ca.pem"));
        // Over plain HTTP the file is not used: only that is said.
        let plain = p.replace("https://", "http://");
        let text = load(&plain, &[]).unwrap_err().to_string();
        assert!(
            text.contains("providers.p.tls_ca_file: only applies to https:// base URLs")
                && !text.contains("cannot read"),
            "{text}"
        );
    }

    #[test]
    fn header_names_differing_only_in_case_are_refused() {
        let p = "providers:\n  p:\n    kind: openai\n    base_url: http://127.0.0.1:1/v1\n    headers:\n      OpenAI-Organization: org-a\n      openai-organization: org-b\n";
        let err = load(p, &[]).unwrap_err();
        assert_eq!(err.issues.len(), 1, "{err}");
        let text = err.to_string();
        assert!(
            text.contains("providers.yaml:7: providers.p.headers.openai-organization: header given twice (names are case-insensitive)"),
            "{text}"
        );
        let p = "providers:\n  p:\n    kind: openai\n    base_url: http://127.0.0.1:1/v1\n    headers:\n      OpenAI-Organization: org-a\n      OpenAI-Project: proj\n";
        let c = load(p, &[]).unwrap();
        assert_eq!(
            c.providers["p"].headers,
            [
                ("openai-organization".to_string(), "org-a".to_string()),
                ("openai-project".to_string(), "proj".to_string())
            ]
        );
    }
}
