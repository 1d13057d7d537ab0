//! `tracing:` of `smartllm.yaml`: OpenTelemetry spans exported by OTLP/HTTP
//! (protobuf) to a collector, sampled by ratio; off without `otlp_endpoint`.

use crate::raw::RawTracing;
use crate::{Issues, TracingConfig, Url, MAIN_FILE};

/// The path OTLP/HTTP receivers take traces on.
const TRACES_PATH: &str = "/v1/traces";

pub(super) fn resolve_tracing(raw: RawTracing, v: &mut Issues<'_>) -> TracingConfig {
    let default = TracingConfig::default();
    let otlp_endpoint = raw
        .otlp_endpoint
        .filter(|e| !e.trim().is_empty())
        .and_then(|e| match Url::parse(e.trim()) {
            Ok(u) if u.tls => {
                v.push(
                    MAIN_FILE,
                    "tracing.otlp_endpoint",
                    format!("{e:?}: https is not supported; send spans to a collector (or agent) over http:// on the host or its network"),
                );
                None
            }
            Ok(u) => {
                let path = if u.path.ends_with(TRACES_PATH) {
                    u.path.clone()
                } else {
                    format!("{}{TRACES_PATH}", u.path)
                };
                Some(format!("http://{}{path}", u.authority()))
            }
            Err(err) => {
                v.push(MAIN_FILE, "tracing.otlp_endpoint", err.to_string());
                None
            }
        });
    let sample_ratio = match raw.sample_ratio {
        None => default.sample_ratio,
        Some(r) if (0.0..=1.0).contains(&r) => r,
        Some(r) => {
            v.push(
                MAIN_FILE,
                "tracing.sample_ratio",
                format!("{r} is not between 0 and 1"),
            );
            default.sample_ratio
        }
    };
    let service_name = match raw.service_name {
        None => default.service_name,
        Some(n) if !n.trim().is_empty() && n.len() <= 255 && !n.chars().any(char::is_control) => n,
        Some(_) => {
            v.push(
                MAIN_FILE,
                "tracing.service_name",
                "must be 1 to 255 printable characters",
            );
            default.service_name
        }
    };
    TracingConfig {
        otlp_endpoint,
        sample_ratio,
        service_name,
    }
}

#[cfg(test)]
mod tests {
    use crate::test_support::*;
    use crate::*;

    #[test]
    fn tracing_is_off_by_default_and_resolves_the_traces_url() {
        let dir = write_dir(&[(MAIN_FILE, "")]);
        let c = load_dir(dir.path()).unwrap();
        assert_eq!(c.tracing, TracingConfig::default());
        assert_eq!(c.tracing.otlp_endpoint, None);

        let dir = write_dir(&[(
            MAIN_FILE,
            "tracing:\n  otlp_endpoint: http://collector:4318\n  sample_ratio: 0.25\n  service_name: gw-eu\n",
        )]);
        let c = load_dir(dir.path()).unwrap();
        assert_eq!(
            c.tracing.otlp_endpoint.as_deref(),
            Some("http://collector:4318/v1/traces")
        );
        assert_eq!(c.tracing.sample_ratio, 0.25);
        assert_eq!(c.tracing.service_name, "gw-eu");

        // A full traces URL is kept as it is.
        let dir = write_dir(&[(
            MAIN_FILE,
            "tracing:\n  otlp_endpoint: http://127.0.0.1:9/otel/v1/traces\n",
        )]);
        let c = load_dir(dir.path()).unwrap();
        assert_eq!(
            c.tracing.otlp_endpoint.as_deref(),
            Some("http://127.0.0.1:9/otel/v1/traces")
        );
    }

    #[test]
    fn tracing_errors_name_the_key_and_line() {
        let dir = write_dir(&[(
            MAIN_FILE,
            "logging:\n  level: info\ntracing:\n  otlp_endpoint: https://otel.example.com\n  sample_ratio: 1.5\n  service_name: \"\"\n",
        )]);
        let text = load_dir(dir.path()).unwrap_err().to_string();
        assert!(
            text.contains("smartllm.yaml:4: tracing.otlp_endpoint: \"https://otel.example.com\": https is not supported"),
            "{text}"
        );
        assert!(
            text.contains("smartllm.yaml:5: tracing.sample_ratio: 1.5 is not between 0 and 1"),
            "{text}"
        );
        assert!(
            text.contains("smartllm.yaml:6: tracing.service_name: must be 1 to 255"),
            "{text}"
        );
        let dir = write_dir(&[(MAIN_FILE, "tracing:\n  otlp_endpoint: collector:4318\n")]);
        let text = load_dir(dir.path()).unwrap_err().to_string();
        assert!(
            text.contains("smartllm.yaml:2: tracing.otlp_endpoint: \"collector:4318\" is not an http:// or https:// URL"),
            "{text}"
        );
        let dir = write_dir(&[(MAIN_FILE, "tracing:\n  endpoint: http://x:4318\n")]);
        let text = load_dir(dir.path()).unwrap_err().to_string();
        assert!(text.contains("tracing"), "{text}");
    }

    #[test]
    fn tracing_is_restart_only() {
        let a = write_dir(&[(MAIN_FILE, "")]);
        let b = write_dir(&[(
            MAIN_FILE,
            "tracing:\n  otlp_endpoint: http://127.0.0.1:4318\n",
        )]);
        let old = load_dir(a.path()).unwrap();
        let new = load_dir(b.path()).unwrap();
        let changes = old.restart_only_changes(&new);
        assert_eq!(changes.len(), 1, "{changes:?}");
        assert_eq!(
            changes[0], "tracing.otlp_endpoint: (off) -> http://127.0.0.1:4318/v1/traces",
            "key by key, in the file's terms"
        );
        assert_eq!(old.with_restart_only_from(new).tracing.otlp_endpoint, None);
    }
}
